"""End-to-end conversion of a synthetic cohort: pairing, de-identification, splits, resume, bad input."""

import csv
import glob
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from data_prep import convert, options, records, synthetic
from data_prep.options import Options, Settings
from data_prep.reports import clean_text

SALT = "unit-test-salt-7f3a"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    synthetic.generate(out, patients=5, seed=11, small=True)
    return out


def _convert(cohort, out, *extra):
    return convert.main(
        [
            "--dicom_dir",
            str(cohort / "dicom"),
            "--reports",
            str(cohort / "reports.csv"),
            "--out",
            str(out),
            "--salt",
            SALT,
            "--shard_size",
            "4",
            "--frames",
            "8",
            "--image_size",
            "64",
            *extra,
        ]
    )


def _records(out):
    got = {}
    for split in records.SPLITS:
        for shard in records.list_shards(str(out), split):
            for raw in records.ShardReader(shard):
                ex = records.decode_example(raw)
                got.setdefault(ex["video_id"][0].decode(), []).append((split, ex))
    return got


def _output_files(out):
    """{path: bytes} of every file a conversion wrote (shards, indexes, manifest parts, plan, manifest, info)."""
    paths = glob.glob(str(out / "**"), recursive=True) + glob.glob(str(out / ".*" / "*"))
    return {p: open(p, "rb").read() for p in paths if os.path.isfile(p)}


def _hash(kind, value):  # the documented id scheme, recomputed independently
    return hmac.new(SALT.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def converted(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert _convert(cohort, out) == 0
    return out


def test_cohort_converts_with_paired_reports_days_and_splits(cohort, converted):
    truth = synthetic.read_truth(cohort)
    got = _records(converted)
    assert len(got) == len(truth) and all(len(v) == 1 for v in got.values())
    clinical = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(open(cohort / "reports_clinical.csv"))}
    patient_split = {}
    for row in truth:
        ds = pydicom.dcmread(cohort / row["path"], stop_before_pixels=True)
        [(split, ex)] = got[_hash("video", ds.SOPInstanceUID)]
        assert ex["patient_id"] == [_hash("patient", ds.PatientID).encode()]
        assert ex["study_id"] == [_hash("study", ds.StudyInstanceUID).encode()]
        # the report's clinical text, normalised, with the identifiers around it removed
        assert clean_text(clinical[ds.StudyInstanceUID]).strip().encode() in ex["report"][0]
        assert ds.PatientID.encode() not in ex["report"][0]
        assert ex["study_day"] == [int(row["study_day"])]
        assert ex["num_frames"] == [min(8, int(row["frames"]))] == [len(ex["frames"])]
        assert ex["fps"][0] == pytest.approx(float(row["fps"]), rel=1e-3)
        assert np.isnan(ex["ef"][0]) and ex["source"] == [b"dicom"] and ex["image_size"] == [64]
        frame = np.asarray(Image.open(io.BytesIO(ex["frames"][0])))
        assert frame.shape == (64, 64, 3)
        assert patient_split.setdefault(row["patient"], split) == split  # never a patient in two splits
    info = json.load(open(converted / "dataset_info.json"))
    assert sum(s["num_videos"] for s in info["splits"].values()) == len(truth)
    manifest = [json.loads(line) for line in open(converted / "manifest.jsonl")]
    assert len(manifest) == len(truth) and {m["status"] for m in manifest} == {"converted"}


def _text_band_rows(row, image_size):
    """Output rows that show input rows above the fan's apex (the burned-in name, id, date), computed
    from the true fan geometry: the crop is the square centred on the fan's bounding box."""
    x0, y0, x1, y1 = (int(row[k]) for k in ("sector_x0", "sector_y0", "sector_x1", "sector_y1"))
    side = max(y1 - y0 + 1, x1 - x0 + 1)
    top = (y0 + y1 + 1 - side) // 2
    return max(0, int((y0 - top) * image_size / side) - 2)  # 2 rows of margin for the detected fan's edge


def test_no_phi_in_any_output_byte_or_log_and_the_text_band_is_blank(cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.convert",
        "--dicom_dir",
        str(cohort / "dicom"),
        "--reports",
        str(cohort / "reports.csv"),
        "--out",
        str(out),
        "--salt_file",
        str(tmp_path / "salt"),
        "--frames",
        "8",
        "--image_size",
        "64",
        "--shard_size",
        "4",
        "--workers",
        "2",
    ]
    (tmp_path / "salt").write_text(SALT)
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    phi = synthetic.read_phi(cohort) + [SALT]
    phi = {form.lower().encode() for s in phi for form in (s, clean_text(s).strip()) if form.strip()}
    blobs = {"stdout": proc.stdout, "stderr": proc.stderr, **_output_files(out)}
    assert len(blobs) > 6
    for name, data in blobs.items():
        data = data.lower()  # report text is upper-cased by clean_text: look for every case
        for s in phi:
            assert s not in data, f"{s!r} found in {name}"
        assert b"dicom/P0" not in data  # input paths are hashed in the manifest
    truth = {}
    for row in synthetic.read_truth(cohort):
        ds = pydicom.dcmread(cohort / row["path"], stop_before_pixels=True)
        truth[_hash("video", ds.SOPInstanceUID)] = row
    checked = 0
    for vid, [(_, ex)] in _records(out).items():
        band = _text_band_rows(truth[vid], 64)
        assert band >= 3  # the test is meaningful: the crop does include the text rows
        for jpeg in ex["frames"]:
            frame = np.asarray(Image.open(io.BytesIO(jpeg)))
            assert frame[:band].max() <= 8, f"burned-in text rows not blank in {vid}"
            checked += 1
    assert checked == sum(min(8, int(r["frames"])) for r in truth.values())


def test_rerun_is_a_no_op_and_another_salt_is_refused(cohort, converted, capsys):
    before = {p: os.path.getmtime(p) for p in glob.glob(str(converted / "*.tfrecord"))}
    assert _convert(cohort, converted) == 0
    assert {p: os.path.getmtime(p) for p in before} == before
    assert "already done" in capsys.readouterr().err
    assert (
        convert.main(
            [
                "--dicom_dir",
                str(cohort / "dicom"),
                "--reports",
                str(cohort / "reports.csv"),
                "--out",
                str(converted),
                "--salt",
                "another-salt-123",
                "--shard_size",
                "4",
                "--frames",
                "8",
                "--image_size",
                "64",
            ]
        )
        == 1
    )  # the run is refused: exit 1, nothing rewritten


def test_killed_conversion_resumes_with_every_record_once(cohort, converted, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "data_prep.convert",
        "--dicom_dir",
        str(cohort / "dicom"),
        "--reports",
        str(cohort / "reports.csv"),
        "--out",
        str(out),
        "--salt",
        SALT,
        "--shard_size",
        "1",
        "--frames",
        "8",
        "--image_size",
        "64",
        "--jpeg_quality",
        "100",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(glob.glob(str(out / "*.tfrecord"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "conversion finished before it could be killed"
    finished = {p: os.path.getmtime(p) for p in glob.glob(str(out / "*.tfrecord"))}
    assert finished and not os.path.exists(out / "manifest.jsonl")
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert all(os.path.getmtime(p) == t for p, t in finished.items())  # finished shards were not redone
    assert not glob.glob(str(out / "*.tmp"))
    got = _records(out)
    assert all(len(v) == 1 for v in got.values())
    assert sorted(got) == sorted(_records(converted))


def test_bad_inputs_are_skipped_with_reasons(cohort, tmp_path):
    src = tmp_path / "export"
    for patient in ("P00001", "P00002"):
        shutil.copytree(cohort / "dicom" / patient, src / patient)
    files = sorted(glob.glob(str(src / "P00001" / "**" / "*.dcm"), recursive=True))
    orphan = sorted(glob.glob(str(src / "P00002" / "**" / "*.dcm"), recursive=True))[0]
    orphan_study = pydicom.dcmread(orphan, stop_before_pixels=True).StudyInstanceUID
    n_inputs = len(glob.glob(str(src / "**" / "*.dcm"), recursive=True)) + 1
    (src / "readme.txt").write_text("not dicom")
    raw = open(files[0], "rb").read()
    open(files[0], "wb").write(raw[: len(raw) // 2])  # truncated
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    reports = tmp_path / "reports.csv"
    rows = list(csv.DictReader(open(cohort / "reports.csv")))
    with open(reports, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["StudyInstanceUID"] != orphan_study)
    args = ["--dicom_dir", str(src), "--reports", str(reports), "--salt", SALT, "--frames", "4", "--image_size", "32"]
    assert convert.main([*args, "--out", str(tmp_path / "o1"), "--max_skipped_fraction", "0.9"]) == 0
    manifest = [json.loads(line) for line in open(tmp_path / "o1" / "manifest.jsonl")]
    assert len(manifest) == n_inputs
    reasons = [m["reason"] for m in manifest if m["status"] == "skipped"]
    assert "not a DICOM file" in reasons and "no PixelData" in reasons and "no report for this study" in reasons
    assert any("cannot decode pixels" in r or "unreadable" in r for r in reasons)
    assert convert.main([*args, "--out", str(tmp_path / "o2"), "--max_skipped_fraction", "0.0"]) == 3
    assert convert.main([*args, "--out", str(tmp_path / "o3"), "--report_column", "text"]) == 1


def test_the_command_line_and_the_dataclasses_share_their_defaults(tmp_path):
    parser = convert.build_parser()
    args = parser.parse_args(["--dicom_dir", "d", "--reports", "r.csv", "--out", str(tmp_path), "--salt", SALT])
    assert options.from_args(parser, args) == Options(out=str(tmp_path), dicom_dir="d", reports="r.csv", salt=SALT)


def test_options_are_checked_for_library_callers_too(tmp_path):
    with pytest.raises(ValueError, match="--reports is required with --dicom_dir"):
        Options(out=str(tmp_path), dicom_dir="d", salt=SALT)
    with pytest.raises(ValueError, match="--jpeg_quality 1..100"):
        Options(out=str(tmp_path), echonet_dir="e", salt=SALT, settings=Settings(jpeg_quality=0))
    with pytest.raises(ValueError, match="inside --out"):  # the default map would sit beside a salt in --out
        Options(out=str(tmp_path), echonet_dir="e", salt_file=str(tmp_path / "salt"))
    with pytest.raises(ValueError, match="--phone_region 'XX'"):
        Options(out=str(tmp_path), dicom_dir="d", reports="r.csv", salt=SALT, phone_region="XX")


def test_progress_shows_counts_and_rates_when_asked_and_only_then(cohort, converted, capsys):
    n = len(synthetic.read_truth(cohort))
    assert _convert(cohort, converted) == 0  # auto: stderr is not a terminal here, so no bars
    assert "scan headers" not in capsys.readouterr().err
    shard = sorted(glob.glob(str(converted / "*.tfrecord")))[0]
    k = len(records.ShardReader(shard))
    os.remove(shard)  # so that the rerun converts that shard's videos again
    assert _convert(cohort, converted, "--progress", "on") == 0
    err = capsys.readouterr().err
    assert re.search(rf"scan headers: 100%\S* {n}/{n} \[[^]]*file/s\]", err), err
    assert re.search(r"de-identify reports: 100%\S* (\d+)/\1 \[[^]]*report/s\]", err), err
    assert re.search(rf"convert: 100%\S* {k}/{k} \[[^]]*video/s\]", err), err


def test_the_path_map_resolves_every_manifest_line_and_stays_out_of_the_output(cohort, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(cohort / "dicom" / "P00001", src / "P00001")
    (src / "P00001" / "notes.txt").write_text("not dicom")
    truncated = sorted(glob.glob(str(src / "**" / "*.dcm"), recursive=True))[0]
    raw = open(truncated, "rb").read()
    open(truncated, "wb").write(raw[: len(raw) // 3])
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "salt").write_text(SALT)
    args = [
        "--dicom_dir",
        str(src),
        "--reports",
        str(cohort / "reports.csv"),
        "--salt_file",
        str(secret / "salt"),
        "--frames",
        "4",
        "--image_size",
        "32",
        "--max_skipped_fraction",
        "1.0",
    ]
    out = tmp_path / "out"
    assert convert.main([*args, "--out", str(out)]) == 0
    map_file = secret / ("salt" + options.PATH_MAP_SUFFIX)  # beside the salt file by default
    entries = [json.loads(line) for line in open(map_file)]
    assert stat.S_IMODE(os.stat(map_file).st_mode) == 0o600
    paths = {e["input"]: e["path"] for e in entries}
    manifest = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert len(entries) == len(paths) == len(manifest) == len(glob.glob(str(src / "**" / "*.*"), recursive=True))
    for line in manifest:
        assert line["input"].startswith("sha256:") and (src / paths[line["input"]]).is_file()
    skipped = {paths[m["input"]]: m["reason"] for m in manifest if m["status"] == "skipped"}
    assert skipped["P00001/notes.txt"] == "not a DICOM file"
    assert os.path.relpath(truncated, src) in skipped and len(skipped) == 2
    for path, data in _output_files(out).items():
        assert not [p for p in [str(src), *paths.values()] if p.encode() in data], path
    assert convert.main([*args, "--out", str(out)]) == 0  # a rerun adds nothing to the map
    assert [json.loads(line) for line in open(map_file)] == entries
    inside = tmp_path / "inside"
    with pytest.raises(SystemExit) as e:
        convert.main([*args, "--out", str(inside), "--path_map", str(inside / "map.jsonl")])
    assert e.value.code == 2 and not inside.exists()
