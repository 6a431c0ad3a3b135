"""Videos per second per core of the DICOM -> record pipeline, against two baselines in the same run.

floor: decode only the kept frames at full resolution (data_prep.dicom_io.read_frames, the best full decode
we have); naive: decode every frame. The pipeline (decode kept frames at a reduced scale: JPEG ones in the
DCT domain, others box-reduced, grey ones kept one channel; + sector mask + crop/resize + JPEG + Example)
should cost at most 1.3x the floor.
Usage: python bench/data_prep.py [--patients 2] [--frames 32] [--repeats 3]
"""

import argparse
import datetime
import glob
import os
import pathlib
import sys
import tempfile
import time

import pydicom

# This file's name equals the package's: keep bench/ off the import path so `data_prep` is the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from data_prep import dicom_io, options, plan, sector, shards, synthetic


def _times(fns, paths, repeats):
    """{name: {path: best seconds}} over `repeats` rounds; the contenders alternate video by video, so a change
    in the shared machine's load hits them alike, and their order rotates each round (none always runs on the
    caches the previous one warmed)."""
    best = {name: dict.fromkeys(paths, float("inf")) for name in fns}
    names = list(fns)
    for r in range(repeats):
        for p in paths:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                fns[name](p)
                best[name][p] = min(best[name][p], time.perf_counter() - t)
    return best


def _encoding(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"{ds.PhotometricInterpretation}, {ds.file_meta.TransferSyntaxUID.name}"


def _stages(paths, headers, settings):
    """Mean milliseconds per video of each step of convert_video, to see where the time goes."""
    total = dict.fromkeys(("decode (scaled)", "sector mask", "crop+resize", "jpeg"), 0.0)
    for p in paths:
        h = headers[p]
        t0 = time.perf_counter()
        frames, scale = dicom_io.read_frames_scaled(
            p,
            dicom_io.kept_indices(h.num_frames, settings.frames),
            min_side=settings.image_size * 5 // 4,
            keep_grey=True,
        )
        t1 = time.perf_counter()
        mask = sector.sector_mask(frames, tuple(tuple(v // scale for v in r) for r in h.regions))
        t2 = time.perf_counter()
        out = sector.crop_resize(frames, mask, settings.image_size)
        t3 = time.perf_counter()
        [shards.encode_jpeg(f, settings.jpeg_quality) for f in out]
        t4 = time.perf_counter()
        for k, dt in zip(total, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            total[k] += dt * 1000 / len(paths)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    settings = options.Settings(frames=args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(tmp, patients=args.patients, seed=0, small=False)
        paths = sorted(glob.glob(f"{tmp}/dicom/**/*.dcm", recursive=True))
        headers = {p: dicom_io.read_header(p) for p in paths}

        def floor(p):
            dicom_io.read_frames(p, dicom_io.kept_indices(headers[p].num_frames, args.frames))

        def naive(p):
            dicom_io.read_frames(p, list(range(headers[p].num_frames)))

        def pipeline(p):
            h = headers[p]
            job = plan.Job(
                path=p,
                ref="",
                source="dicom",
                video_id="0",
                patient_id="0",
                study_id="0",
                study_day=0,
                report="",
                ef=0.0,
                fps=h.fps,
                num_frames=h.num_frames,
                regions=h.regions,
            )
            shards.convert_video(job, settings)

        load = os.getloadavg()[0]
        times = _times(
            {"floor: decode kept frames": floor, "pipeline": pipeline, "naive: decode all frames": naive},
            paths,
            args.repeats,
        )
        stages = _stages(paths, headers, settings)
        encodings = {p: _encoding(p) for p in paths}
    rates = {name: len(paths) / sum(t.values()) for name, t in times.items()}
    frames = sum(h.num_frames for h in headers.values()) / len(headers)
    h0 = next(iter(headers.values()))
    ratio = rates["floor: decode kept frames"] / rates["pipeline"]
    lines = [
        f"{len(paths)} synthetic videos, {h0.rows}x{h0.cols}, {frames:.0f} frames on average, "
        f"{args.frames} kept, 1 process; each video's best of {args.repeats} rounds, the three alternating "
        f"video by video; load average {load:.1f} at start",
        "",
        "| what | videos/s per core | cost vs floor |",
        "| --- | --- | --- |",
    ]
    for name, r in rates.items():
        lines.append(f"| {name} | {r:.2f} | {rates['floor: decode kept frames'] / r:.2f}x |")
    lines += [
        "",
        f"pipeline / floor = {ratio:.2f}x (target <= 1.3x)",
        "",
        "| encoding | videos | floor ms/video | pipeline ms/video | pipeline / floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for enc in sorted(set(encodings.values())):
        mine = [p for p in paths if encodings[p] == enc]
        f, q = (1000 * sum(times[n][p] for p in mine) / len(mine) for n in ("floor: decode kept frames", "pipeline"))
        lines.append(f"| {enc} | {len(mine)} | {f:.0f} | {q:.0f} | {q / f:.2f}x |")
    lines += ["", "ms per video by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())]
    print("\n".join(lines))
    bench = pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    with open(bench, "a") as f:
        f.write(f"\n## data_prep: DICOM -> records ({datetime.date.today().isoformat()})\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
