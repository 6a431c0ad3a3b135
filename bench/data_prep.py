"""Videos per second per core of the DICOM -> record pipeline, against two baselines in the same run.

floor: decode only the kept frames at full resolution (data_prep.dicom_io.read_frames, the best full decode
we have); naive: decode every frame. The pipeline (decode kept frames, JPEG ones at a reduced DCT scale +
sector mask + crop/resize + JPEG + Example) should cost at most 1.3x the floor.
Usage: python bench/data_prep.py [--patients 2] [--frames 32] [--repeats 2]
"""
import argparse
import datetime
import glob
import os
import pathlib
import sys
import tempfile
import time

# This file's name equals the package's: keep bench/ off the import path so `data_prep` is the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from data_prep import convert, dicom_io, sector, synthetic


def _rate(fn, paths, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, time.perf_counter() - t)
    return len(paths) / best


def _stages(paths, headers, settings):
    """Mean milliseconds per video of each step of convert_video, to see where the time goes."""
    total = dict.fromkeys(("decode (scaled)", "sector mask", "crop+resize", "jpeg"), 0.0)
    for p in paths:
        h = headers[p]
        t0 = time.perf_counter()
        frames, scale = dicom_io.read_frames_scaled(p, dicom_io.kept_indices(h.num_frames, settings.frames),
                                                    min_side=settings.image_size * 5 // 4)
        t1 = time.perf_counter()
        mask = sector.sector_mask(frames, tuple(tuple(v // scale for v in r) for r in h.regions))
        t2 = time.perf_counter()
        out = sector.crop_resize(frames, mask, settings.image_size)
        t3 = time.perf_counter()
        [convert.encode_jpeg(f, settings.jpeg_quality) for f in out]
        t4 = time.perf_counter()
        for k, dt in zip(total, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            total[k] += dt * 1000 / len(paths)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    settings = convert.Settings(frames=args.frames)
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
            job = convert.Job(path=p, ref="", source="dicom", video_id="0", patient_id="0", study_id="0",
                              study_day=0, report="", ef=0.0, fps=h.fps, num_frames=h.num_frames, regions=h.regions)
            convert.convert_video(job, settings)

        rates = {name: _rate(fn, paths, args.repeats) for name, fn in
                 (("floor: decode kept frames", floor), ("pipeline", pipeline), ("naive: decode all frames", naive))}
        stages = _stages(paths, headers, settings)
    frames = sum(h.num_frames for h in headers.values()) / len(headers)
    h0 = next(iter(headers.values()))
    ratio = rates["floor: decode kept frames"] / rates["pipeline"]
    lines = [f"{len(paths)} synthetic videos, {h0.rows}x{h0.cols}, {frames:.0f} frames on average, "
             f"{args.frames} kept, 1 process", "", "| what | videos/s per core | cost vs floor |", "| --- | --- | --- |"]
    for name, r in rates.items():
        lines.append(f"| {name} | {r:.2f} | {rates['floor: decode kept frames'] / r:.2f}x |")
    lines += ["", f"pipeline / floor = {ratio:.2f}x (target <= 1.3x)", "",
              "ms per video by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())]
    print("\n".join(lines))
    bench = pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
    with open(bench, "a") as f:
        f.write(f"\n## data_prep: DICOM -> records ({datetime.date.today().isoformat()})\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
