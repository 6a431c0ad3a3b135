"""A synthetic echocardiography cohort written as real DICOM, with known answers.

Every later stage (DICOM conversion, de-identification, training, zero-shot evaluation) needs data
whose truth is known. Each video is an apical-4-chamber-like phantom: a fan-shaped sector with speckle,
four chambers, and a left ventricle whose cavity AREA follows a cardiac cycle, so its ejection fraction
(EF = (EDA - ESA) / EDA of the LV cavity area in the image plane) is a known integer in [10, 80] %.
Devices are bright structures: a pacemaker lead in the right heart, a prosthetic (stent) aortic valve
at the crux, one or two mitral clips at the mitral annulus. Outside the sector, as on real scanners:
an ECG trace, a probe label, depth ticks and burned-in text with the fake patient's name, id and date.
Headers carry fake PHI (and one private tag repeating the name), so de-identification can be tested.

Writes, under ``--out``:
  dicom/Pnnnnn/Snn/IMnnnn.dcm  Ultrasound Multi-frame Image Storage; JPEG Baseline YBR_FULL_422 for most,
                               explicit-VR uncompressed RGB or MONOCHROME2 for some; most carry a
                               SequenceOfUltrasoundRegions (tissue sector + ECG), some do not.
  reports.csv                  StudyInstanceUID, AccessionNumber, report (one EchoCLIP-style report per study,
                               with the patient's and staff's identifiers in a header line and sign-off)
  reports_clinical.csv         StudyInstanceUID, report: the same reports' clinical text alone (never read by
                               the pipeline; what a de-identified report must still say)
  truth.csv                    per video: the true EF, devices, LV size, heart rate, geometry (never read
                               by the pipeline; for tests and evaluation only)
  phi.json                     every fake PHI string written anywhere, for privacy tests to grep for
                               (`strings`; `by_field.report_numbers` are bare numbers, to look for in text)
  cohort.json                  the arguments and counts

Cohort version 2 (`--cohort_version 2`; the default stays 1, byte-identical to earlier releases): each
study holds 3-4 (full size: 4-5) videos, each a different standard view (apical 4- and 2-chamber,
parasternal long and short axis, subcostal; `views`), the LV beating to the study's EF in every view and a
device drawn only in the views that would show it (`cohort.DEVICE_VIEWS`), so a study tells more than any
one of its videos. No header, burned-in label or report names the view. Reports are worded as different
readers write them (`reports_v2`), with none of the zero-shot prompts' sentences; the header line and
sign-off with the identifiers are version 1's. It writes, besides the files above:
  truth.csv                    also: view, pacemaker_visible / tavr_visible / mitraclip_visible (the
                               device is in the study AND this view shows it), device_pixels_max (the
                               largest device mask of any frame, pixels), and what the report states
                               besides the findings: no_valvular_heart_disease, normal_wall_thickness
  device_geometry.jsonl        per video, each frame's device shapes in the DICOM frame's pixels (never
                               read by the pipeline); `device_mask(out_dir, path)` redraws the exact
                               boolean mask [frames, rows, cols] the renderer used (`device_shapes`)

Pure numpy + Pillow + pydicom: no JAX, so it runs wherever data_prep runs. The package's modules, by what
they draw: `cohort` (the plan: patients, studies, videos, fake PHI), `geometry` (sector and chambers),
`devices`, `overlays` (burned-in text, ECG), `render` (the frames), `dicom_writer`, `reports`; version 2's
`views` (the standard views' scenes), `device_shapes` (devices as pixel shapes, their masks),
`render_views` (the frames), `reports_v2` (readers' wording).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import pathlib

import pydicom

from data_prep import options
from data_prep.plan import salted_hash
from data_prep.synthetic.cohort import (  # noqa: F401  (the cohort's vocabulary, for tests and callers)
    COHORT_VERSIONS,
    DEVICE_VIEWS,
    DEVICES,
    EF_DEFINITION,
    ENCODINGS,
    LV_SIZES,
    VIEWS,
    VideoSpec,
    plan_cohort,
)
from data_prep.synthetic.device_shapes import device_mask, rasterize, read_device_geometry  # noqa: F401
from data_prep.synthetic.dicom_writer import write_dicom
from data_prep.synthetic.render import render_video
from data_prep.synthetic.render_views import render_view_video
from data_prep.synthetic.reports import clinical_report, systolic_function, write_report  # noqa: F401
from data_prep.synthetic.reports_v2 import clinical_report_v2


def _make_one(args: tuple[VideoSpec, str]) -> tuple[dict, dict | None]:
    """Render one video, write its DICOM file, return its truth.csv row and (version 2) its line of
    device_geometry.jsonl (run in worker processes)."""
    spec, out_dir = args
    if spec.version == 1:
        (frames, geo_truth), geometry = render_video(spec), None
    else:
        frames, geo_truth, shapes = render_view_video(spec)
        geometry = dict(path=spec.path, rows=frames.shape[1], cols=frames.shape[2], frames=shapes)
    write_dicom(pathlib.Path(out_dir) / spec.path, frames, spec, geo_truth)
    return dict(
        path=spec.path,
        StudyInstanceUID=spec.phi["StudyInstanceUID"],
        patient=spec.patient,
        study_index=spec.study_index,
        study_day=spec.study_day,
        video_index=spec.video_index,
        ef=spec.ef,
        ef_definition=EF_DEFINITION,
        devices=";".join(spec.devices),
        pacemaker=int("pacemaker" in spec.devices),
        tavr=int("tavr" in spec.devices),
        mitraclip=int("mitraclip" in spec.devices),
        n_mitraclips=spec.n_mitraclips,
        lv_size=spec.lv_size,
        heart_rate=spec.heart_rate,
        fps=round(spec.fps, 4),
        frame_time_ms=spec.frame_time_ms,
        frames=spec.frames,
        rows=frames.shape[1],
        cols=frames.shape[2],
        encoding=spec.encoding,
        has_us_regions=int(spec.has_regions),
        **geo_truth,
    ), geometry


_OUTPUTS = ("reports.csv", "reports_clinical.csv", "truth.csv", "phi.json", "cohort.json", "device_geometry.jsonl")


def generate(out_dir, patients: int, seed: int = 0, small: bool = False, workers: int = 1, version: int = 1) -> dict:
    """Writes the cohort under `out_dir` (which must not already hold one); returns cohort.json's content.
    `version` 1: one A4C-like phantom per video (byte-identical to earlier releases); 2: standard views,
    reports in readers' own words, device geometry per frame (see the package docstring)."""
    out = pathlib.Path(out_dir)
    existing = [name for name in ("dicom", *_OUTPUTS) if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds a cohort ({', '.join(existing)}); choose an empty --out")
    videos, studies, phi = plan_cohort(patients, seed, small, version)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(out)) for spec in videos]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            made = list(pool.map(_make_one, jobs, chunksize=4))
    else:
        made = [_make_one(job) for job in jobs]
    truth = [row for row, _ in made]
    if version == 2:
        states = {s["StudyInstanceUID"]: clinical_report_v2(s)[1] for s in studies}
        truth = [dict(row, **states[row["StudyInstanceUID"]]) for row in truth]
        with open(out / "device_geometry.jsonl", "w") as fh:
            fh.writelines(json.dumps(geometry, separators=(",", ":")) + "\n" for _, geometry in made)
    with open(out / "truth.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(truth[0]))
        writer.writeheader()
        writer.writerows(truth)
    with open(out / "reports.csv", "w", newline="") as fh, open(out / "reports_clinical.csv", "w", newline="") as ch:
        writer, clinical = csv.writer(fh), csv.writer(ch)
        writer.writerow(["StudyInstanceUID", "AccessionNumber", "report"])
        clinical.writerow(["StudyInstanceUID", "report"])
        for study in studies:
            text, written = write_report(study)
            writer.writerow([study["StudyInstanceUID"], study["AccessionNumber"], text])
            clinical.writerow([study["StudyInstanceUID"], clinical_report(study)])
            for kind, values in written.items():
                phi.setdefault(kind, []).extend(values)
    phi = {k: sorted(set(v)) for k, v in phi.items()}
    all_phi = sorted({s for kind, values in phi.items() if kind != "report_numbers" for s in values})
    (out / "phi.json").write_text(json.dumps({"strings": all_phi, "by_field": phi}, indent=1) + "\n")
    summary = dict(patients=patients, seed=seed, small=small) | ({} if version == 1 else dict(cohort_version=2))
    summary |= dict(
        studies=len(studies),
        videos=len(videos),
        ef_definition=EF_DEFINITION,
        encodings={e: sum(v.encoding == e for v in videos) for e in ENCODINGS},
        without_us_regions=sum(not v.has_regions for v in videos),
    )
    if version == 2:
        summary["views"] = {view: sum(v.view == view for v in videos) for view in VIEWS}
    (out / "cohort.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_phi(out_dir) -> list[str]:
    """Every fake PHI string of a cohort (names, ids, dates, UIDs, burned-in text) for privacy checks."""
    path = pathlib.Path(out_dir) / "phi.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no phi.json; is {out_dir} a cohort written by data_prep.synthetic?")
    return json.loads(path.read_text())["strings"]


def read_truth(out_dir) -> list[dict]:
    """truth.csv rows as dicts of strings."""
    path = pathlib.Path(out_dir) / "truth.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no truth.csv; is {out_dir} a cohort written by data_prep.synthetic?")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def truth_by_video_id(out_dir, salt: str | bytes) -> dict[str, dict]:
    """truth.csv rows keyed by the `video_id` that data_prep.convert gives each video with this `salt` (the
    salted hash of the DICOM's SOPInstanceUID), so evaluation can join records to their truth. Only for the
    synthetic cohort: the truth never travels with the records."""

    salt = salt.encode("utf-8") if isinstance(salt, str) else salt
    out = {}
    for row in read_truth(out_dir):
        sop = pydicom.dcmread(pathlib.Path(out_dir) / row["path"], stop_before_pixels=True).SOPInstanceUID
        out[salted_hash(salt, "video", str(sop))] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created; must not hold a cohort)")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="160x208 frames, 16-24 per video (fast tests)")
    parser.add_argument("--workers", type=int, default=1, help="processes (the output is the same for any)")
    parser.add_argument(
        "--cohort_version",
        type=int,
        choices=COHORT_VERSIONS,
        default=1,
        help=(
            "1 (default): one apical-4-chamber-like phantom per video, reports in the zero-shot prompts' own "
            "sentences (byte-identical to earlier releases); 2: several standard views per study (A4C, A2C, PLAX, "
            "PSAX, subcostal; devices only where each view shows them), reports worded by different readers "
            "with none of the prompts' sentences, per-frame device geometry in device_geometry.jsonl"
        ),
    )
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, args.patients, args.seed, args.small, args.workers, args.cohort_version)
    except (ValueError, OSError) as err:
        return options.failed("data_prep.synthetic", err)
    print(json.dumps(summary))
    return 0
