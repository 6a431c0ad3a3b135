"""Cohort version 2: standard views whose pixels bear out the truth, device masks that cover the device
pixels, reports in readers' own words (none of the prompts' sentences) whose labels are still the truth,
and version 1 left byte for byte as it was.

EF is measured from the decoded pixels of every view (dark cavity inside the LV's known region, max/min
area over the frames), never taken from the generator's variables.
"""

import csv
import dataclasses
import glob
import hashlib
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from data_prep import records, synthetic
from data_prep.plan import salted_hash
from data_prep.report_deid import Deidentifier
from data_prep.report_identifiers import identifiers_from_dataset
from data_prep.reports import clean_text
from data_prep.synthetic import truth_by_video_id
from data_prep.synthetic.render_views import render_view_video
from echoclip_jax.evaluation import task_table
from tests.data_prep.test_synthetic import _fan, _lv_region, decode_cohort

PATIENTS, SEED = 8, 21
VIEW_WORDS = ("A4C", "A2C", "PLAX", "PSAX", "APICAL", "PARASTERNAL", "SUBCOSTAL", "CHAMBER", "LONG AXIS", "SHORT AXIS")
LV_SIZE_VALUE = {"normal": 0.0, "mild": 1.0, "moderate": 2.0, "severe": 3.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_v2")
    summary = synthetic.generate(out, PATIENTS, seed=SEED, small=True, version=2)
    return out, summary


@pytest.fixture(scope="module")
def truth(cohort):
    return synthetic.read_truth(cohort[0])


@pytest.fixture(scope="module")
def decoded(cohort, truth):
    return [(row, ds, gray) for row, ds, _, gray in decode_cohort(cohort[0], truth)]


@pytest.fixture(scope="module")
def tasks():
    return task_table.load_tasks()


def _group(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def test_studies_hold_several_distinct_views_that_no_header_names(cohort, truth, decoded):
    out, summary = cohort
    assert summary["cohort_version"] == 2 and summary["videos"] == len(truth)
    assert set(summary["views"]) == set(synthetic.VIEWS) and all(summary["views"].values())
    for uid, videos in _group(truth, "StudyInstanceUID").items():
        views = [v["view"] for v in videos]
        assert len(views) >= 3 and len(set(views)) == len(views), views
    for row, ds, _ in decoded:
        header = " ".join(str(e.value) for e in ds.iterall() if e.keyword != "PixelData").upper()
        assert not [w for w in VIEW_WORDS if w in header], row["view"]
    text = (out / "reports.csv").read_text().upper()
    assert not [w for w in VIEW_WORDS if w in text]


def test_ef_measured_from_pixels_matches_truth_in_every_view(decoded):
    errors = {}
    for row, _, gray in decoded:
        region = _lv_region(row, gray.shape[1:])
        assert not (region & ~_fan(row, gray.shape[1:])).any(), row["view"]  # the whole LV is in the sector
        dark = ndimage.uniform_filter(gray, size=(1, 3, 3)) < 60
        areas = (dark & region).sum((1, 2))
        assert areas.min() > 0
        errors.setdefault(row["view"], []).append(100.0 * (areas.max() - areas.min()) / areas.max() - float(row["ef"]))
    assert set(errors) == set(synthetic.VIEWS)
    every = np.abs(np.concatenate(list(errors.values())))
    assert every.max() <= 5.0 and every.mean() <= 2.5, {v: np.round(e, 1) for v, e in errors.items()}


def test_devices_show_only_in_the_views_that_show_them(truth, decoded):
    for row, _, gray in decoded:
        for device in synthetic.DEVICES:
            expected = int(row[device]) and row["view"] in synthetic.DEVICE_VIEWS[device]
            assert int(row[f"{device}_visible"]) == int(bool(expected))
        bright = ((ndimage.uniform_filter(gray, size=(1, 3, 3)) >= 235) & _fan(row, gray.shape[1:])).sum((1, 2)).mean()
        if any(int(row[f"{d}_visible"]) for d in synthetic.DEVICES):
            assert bright >= 12 and int(row["device_pixels_max"]) >= 20, (row["view"], row["devices"], bright)
        else:
            assert bright <= 5 and int(row["device_pixels_max"]) == 0, (row["view"], bright)
    # A study's answer is the union of its videos: every device of a study shows in some video of it, and
    # every device is missed by some video of a study that has it (one video does not always tell).
    videos, _, _ = synthetic.plan_cohort(150, 3, small=True, version=2)
    missed = {d: 0 for d in synthetic.DEVICES}
    for study in _group([dataclasses.asdict(v) | {"uid": v.phi["StudyInstanceUID"]} for v in videos], "uid").values():
        for d in study[0]["devices"]:
            shown = [v["view"] in synthetic.DEVICE_VIEWS[d] for v in study]
            missed[d] += not all(shown)
            assert any(shown), (d, [v["view"] for v in study])
    assert all(missed.values()), missed


def test_device_masks_cover_the_device_pixels(cohort, truth, decoded):
    videos, _, _ = synthetic.plan_cohort(PATIENTS, SEED, small=True, version=2)
    by_path = {v.path: v for v in videos}
    checked = set()
    for row, ds, gray in decoded:
        shown = [d for d in synthetic.DEVICES if int(row[f"{d}_visible"])]
        mask = synthetic.device_mask(cohort[0], row["path"])
        assert mask.shape == gray.shape and mask.dtype == bool
        assert int(mask.sum((1, 2)).max()) == int(row["device_pixels_max"])
        if not shown:
            assert not mask.any()
            continue
        assert not (mask & ~_fan(row, gray.shape[1:])).any()  # devices lie inside the sector
        for d in shown:
            assert synthetic.device_mask(cohort[0], row["path"], d).any(), d
        # In the written file: the bright pixels of the sector are the device's.
        bright = (gray >= 235) & _fan(row, gray.shape[1:], pad=-2)
        assert (bright & mask).sum() >= 0.9 * bright.sum()
        if frozenset(shown) in checked:
            continue
        checked.add(frozenset(shown))
        # Rendered with and without its devices (every random draw the same): what differs is the mask.
        spec = by_path[row["path"]]
        with_dev, _, shapes = render_view_video(spec)
        without, _, _ = render_view_video(spec, draw_devices=False)
        differ = (with_dev != without).any(-1)
        assert differ.any() and not (differ & ~mask).any()
        assert differ[mask].mean() > 0.97
        assert with_dev[mask].min() >= 250 - 6 * 3  # near-saturated metal: 250, noise sd 3
        redrawn = np.stack([synthetic.rasterize(s, *gray.shape[1:]) for s in shapes])
        np.testing.assert_array_equal(redrawn, mask)
    assert {d for s in checked for d in s} == set(synthetic.DEVICES), checked
    with pytest.raises(KeyError, match="IM9999"):
        synthetic.device_mask(cohort[0], "dicom/P00001/S01/IM9999.dcm")


def _reports(cohort, name):
    with open(cohort[0] / name, newline="") as fh:
        return {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(fh)}


def _expected(task, rows):
    """truth.csv's label for the task, per video; NaN where the cohort states nothing about it."""
    col = {
        "ejection_fraction": "ef",
        "pacemaker": "pacemaker",
        "tavr": "tavr",
        "mitraclip": "mitraclip",
        "no_valvular_heart_disease": "no_valvular_heart_disease",
        "normal_wall_thickness": "normal_wall_thickness",
    }.get(task.name)
    if task.name == "left_ventricle_size":
        return np.array([LV_SIZE_VALUE[r["lv_size"]] for r in rows])
    if col:
        return np.array([float(r[col]) for r in rows])
    unstated = 0.0 if task.mode == "binary" or 0.0 in task.value_mapping else np.nan
    return np.full(len(rows), unstated)


def test_report_labels_equal_the_truth_for_every_task(cohort, truth, tasks):
    clinical, full = _reports(cohort, "reports_clinical.csv"), _reports(cohort, "reports.csv")
    for source in (clinical, full):
        reports = [clean_text(source[r["StudyInstanceUID"]]) for r in truth]
        for task in tasks:
            got, want = task_table.task_labels(task, reports), _expected(task, truth)
            np.testing.assert_array_equal(got, want, err_msg=task.name)
    ef_task = next(t for t in tasks if t.name == "ejection_fraction")
    ef = np.array([float(r["ef"]) for r in truth])
    np.testing.assert_array_equal(task_table.task_labels(ef_task, reports, {"ef": ef}), ef)
    assert {r["lv_size"] for r in truth} > {"normal"} and any(int(r["mitraclip"]) for r in truth)
    for r in truth:  # the clip count is worded too
        text = clinical[r["StudyInstanceUID"]].upper()
        assert (r["n_mitraclips"] == "2") == ("TWO MITRA" in text) and (r["n_mitraclips"] == "1") == (
            "ONE MITRA" in text or "SINGLE MITRA" in text
        )


def test_reports_hold_none_of_the_prompt_sentences(tasks):
    _, studies, _ = synthetic.plan_cohort(120, 9, small=True, version=2)
    reports = [clean_text(synthetic.clinical_report(s)) for s in studies]
    for task in tasks:
        prompts = list(task.label_sources) + list(task.testers)
        patterns = [task_table.source_pattern(p) for p in prompts]  # "<#>" matches any number: every EF prompt
        literal = [
            " ".join(p.split()).rstrip(". ") for p in task_table.build_prompts(task)[0] + prompts if "<#>" not in p
        ]
        for text in reports:
            squashed = " ".join(text.upper().split())
            assert not [p.pattern for p in patterns if p.search(squashed)], (task.name, text)
            assert not [p for p in literal if p in squashed], (task.name, text)


def test_readers_word_the_findings_differently():
    _, studies, _ = synthetic.plan_cohort(120, 9, small=True, version=2)
    texts = [synthetic.clinical_report(s) for s in studies]
    ef_task = task_table.load_tasks(names=["ejection_fraction"])[0]
    ef_frames = {
        next(p.pattern for p in map(task_table.source_pattern, ef_task.report_phrases) if p.search(clean_text(t)))
        for t in texts
    }
    assert len(ef_frames) >= 5
    assert 0.2 < np.mean([t == t.upper() for t in texts]) < 0.8  # house styles: upper case and mixed case
    assert len({t.split(". ")[0] for t in texts}) > len(texts) / 4  # openings vary
    assert any(t.upper().startswith("IMPRESSION") for t in texts) and any("LEFT VENTRICLE:" in t.upper() for t in texts)
    for term, device in (
        ("PACE", "pacemaker"),
        ("TAVR", "tavr"),
        ("TRANSCATHETER AORTIC", "tavr"),
        ("MITRACLIP", "mitraclip"),
        ("MITRAL CLIP", "mitraclip"),
    ):
        assert any(term in t.upper() for t, s in zip(texts, studies) if device in s["devices"]), term


def test_report_phrases_leave_version_1_labels_as_they_were(tasks):
    _, studies, _ = synthetic.plan_cohort(150, 2, small=True)
    reports = [clean_text(synthetic.clinical_report(s)) for s in studies]
    assert sum(bool(t.report_phrases) for t in tasks) >= 7
    for task in tasks:
        narrow = dataclasses.replace(task, report_phrases=(), report_phrase_values=())
        np.testing.assert_array_equal(
            task_table.task_labels(task, reports), task_table.task_labels(narrow, reports), task.name
        )


def test_deidentified_reports_keep_the_clinical_text_and_labels(cohort, truth, tasks):
    out = cohort[0]
    phi = json.loads((out / "phi.json").read_text())
    needles = {s.lower() for s in phi["strings"] + phi["by_field"]["report_numbers"] if s.strip()}
    full, clinical = _reports(cohort, "reports.csv"), _reports(cohort, "reports_clinical.csv")
    deid = Deidentifier()
    for uid, videos in _group(truth, "StudyInstanceUID").items():
        ids = identifiers_from_dataset(pydicom.dcmread(out / videos[0]["path"], stop_before_pixels=True))
        scrubbed, removed = deid(full[uid], ids)
        assert removed and clean_text(clinical[uid]).strip() in clean_text(scrubbed)
        assert not [s for s in needles if s in scrubbed.lower()], scrubbed
        for task in tasks:
            assert task_table.extract_label(task, clean_text(scrubbed)) == task_table.extract_label(
                task, clean_text(clinical[uid])
            )


def test_convert_reads_a_version_2_cohort(cohort, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "data_prep.convert",
        "--dicom_dir",
        str(cohort[0] / "dicom"),
        "--reports",
        str(cohort[0] / "reports.csv"),
        "--out",
        str(tmp_path / "records"),
        "--salt",
        "v2-test-salt-0415",
        "--frames",
        "2",
        "--image_size",
        "32",
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    manifest = [json.loads(line) for line in open(tmp_path / "records" / "manifest.jsonl")]
    assert sum(m["status"] == "converted" for m in manifest) == cohort[1]["videos"]
    # every record joins its truth row through the salted video id (what evaluation of the cohort uses)

    truth = truth_by_video_id(cohort[0], "v2-test-salt-0415")
    seen = 0
    for split in ("train", "val", "test"):
        for shard in records.list_shards(str(tmp_path / "records"), split):
            for raw in records.ShardReader(shard):
                ex = records.decode_example(raw)
                row = truth[ex["video_id"][0].decode()]
                assert ex["study_id"][0].decode() == salted_hash(b"v2-test-salt-0415", "study", row["StudyInstanceUID"])
                seen += 1
    assert seen == cohort[1]["videos"] == len(truth)


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.generate(a, 2, seed=5, small=True, version=2)
    synthetic.generate(b, 2, seed=5, small=True, version=2, workers=2)
    synthetic.generate(c, 2, seed=6, small=True, version=2)
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert "device_geometry.jsonl" in files
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ("truth.csv", "reports.csv", "device_geometry.jsonl"):
        assert (a / f).read_bytes() != (c / f).read_bytes()
    v1 = tmp_path / "v1"
    synthetic.generate(v1, 2, seed=5, small=True)  # same seed, other version: other study UIDs
    assert not {r["StudyInstanceUID"] for r in synthetic.read_truth(v1)} & {
        r["StudyInstanceUID"] for r in synthetic.read_truth(a)
    }


# sha256 of version 1's output for (6 patients, seed 3, --small), as written before version 2 existed.
V1_SHA256 = {
    "truth.csv": "0c4ad7a5508fee7c1e6c802e7b0f887b7eaa1ff5ab7539d5309cd39c7b59236f",
    "reports.csv": "96c327f7503e4374b0c8e713b9e70d7c0cc9dd9c8583a3bba104ff0cc3e10936",
    "reports_clinical.csv": "e0745454a169400f1cc9a87e54de8632508005e9466c618a9bf782dd9e436f50",
    "phi.json": "ab194db92a1b367c7d95c1c772dd4fe29daad2816665208c1c4c56c4e4336640",
    "cohort.json": "328c2443c19cca0223810c9a9a14fd5697bb11c1e62d0d1ea5ce5ed8a5235ea4",
}
V1_UNCOMPRESSED_PIXELS_SHA256 = "6560e8f750c7c5110d4c103fa1bcc83748a348fec9dc749a8f93e402112d337d"


def test_version_1_is_the_default_and_unchanged(tmp_path):
    out = tmp_path / "v1"
    assert synthetic.main(["--out", str(out), "--patients", "6", "--seed", "3", "--small"]) == 0
    for name, digest in V1_SHA256.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    h = hashlib.sha256()  # the raw (RGB / MONOCHROME2) files' pixels; JPEG bytes depend on the libjpeg build
    for path in sorted(glob.glob(str(out / "dicom" / "**" / "*.dcm"), recursive=True)):
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID != pydicom.uid.JPEGBaseline8Bit:
            h.update(path.split(str(out) + "/")[1].encode())
            h.update(ds.PixelData)
    assert h.hexdigest() == V1_UNCOMPRESSED_PIXELS_SHA256
    assert not (out / "device_geometry.jsonl").exists()


def test_cli_cohort_version(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--cohort_version", "2", "--out", str(out), "--patients", "1", "--small"]) == 0
    assert json.loads(capsys.readouterr().out)["cohort_version"] == 2
    assert (out / "device_geometry.jsonl").is_file()
    with pytest.raises(SystemExit):
        synthetic.main(["--cohort_version", "3", "--out", str(tmp_path / "x"), "--patients", "1"])
    with pytest.raises(ValueError, match="--cohort_version"):
        synthetic.plan_cohort(1, 0, True, version=3)
    with pytest.raises(FileNotFoundError, match="device_geometry"):
        synthetic.read_device_geometry(tmp_path)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"mode": "binary", "label_sources": ["X."], "report_phrases": ["", "Y"]}, "report_phrases"),
        (
            {"mode": "categorical", "label_sources": ["A."], "values": [1], "report_phrases": ["B"]},
            "report_phrase_values",
        ),
        (
            {"mode": "regression", "label_sources": ["EF IS <#>%."], "range": [0, 100], "report_phrases": ["EF HIGH"]},
            "report phrase needs a <#>",
        ),
    ],
)
def test_report_phrases_in_a_task_table_are_checked(tmp_path, spec, problem):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"mytask": spec}))
    with pytest.raises(ValueError, match=problem):
        task_table.load_tasks(str(path))


def test_report_phrases_label_but_are_never_prompts(tasks):
    by_name = {t.name: t for t in tasks}
    assert (
        task_table.extract_label(by_name["left_ventricle_size"], "THE LEFT VENTRICLE IS MODERATE DILATED. LVEF 30%.")
        == 2.0
    )
    assert task_table.extract_label(by_name["ejection_fraction"], "NORMAL LV CAVITY SIZE. LVEF 62%. EF 40%.") == 62.0
    assert task_table.extract_label(by_name["pacemaker"], "NOTE IS MADE OF A PACER LEAD IN THE RIGHT HEART.") == 1.0
    for task in tasks:
        prompts = task_table.build_prompts(task)[0]
        assert not [p for p in task.report_phrases if p in prompts or p in task.label_sources]


@pytest.mark.slow
def test_full_size_views(tmp_path):
    synthetic.generate(tmp_path, 1, seed=1, small=False, version=2)
    rows = synthetic.read_truth(tmp_path)
    for row in rows[:2]:
        ds = pydicom.dcmread(tmp_path / row["path"])
        assert (ds.Rows, ds.Columns) == (600, 800) and 30 <= int(ds.NumberOfFrames) <= 100
        mask = synthetic.device_mask(tmp_path, row["path"])
        assert mask.shape == (int(ds.NumberOfFrames), 600, 800)
        assert int(mask.sum((1, 2)).max()) == int(row["device_pixels_max"])
