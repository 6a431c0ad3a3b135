"""Conversion with reports that carry identifiers of every kind: none reaches any output, the clinical text does.

The synthetic cohort's reports wrap their clinical text in a header line and sign-off with the study's own
header identifiers, staff names no header holds, dates, times, phone and fax numbers, e-mail, addresses
and URLs; `reports_clinical.csv` holds the clinical text alone."""

import csv
import glob
import json
import os
import subprocess
import sys

import pydicom
import pytest

from data_prep import convert, records, synthetic
from data_prep.plan import salted_hash
from data_prep.reports import clean_text
from echoclip_jax.evaluation import task_table
from echoclip_jax.tokenizers import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE_VOCAB = os.path.join(REPO, "..", "shared", "echoclip_reference", "template_vocab.txt")
SALT = "deid-test-salt-91c2"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    synthetic.generate(out, patients=8, seed=4, small=True)
    return out


def _run(cohort, out, *extra):
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
        "--frames",
        "2",
        "--image_size",
        "32",
        "--shard_size",
        "6",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def converted(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = _run(cohort, out, "--workers", "2")  # the de-identifier crosses to spawned workers
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return out, proc


def _reports_by_study(out, cohort):
    """{StudyInstanceUID: the report its records hold}, every video of a study agreeing."""
    study_of = {}
    for path in glob.glob(str(cohort / "dicom" / "**" / "*.dcm"), recursive=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study_of[salted_hash(SALT.encode(), "study", ds.StudyInstanceUID)] = ds.StudyInstanceUID
    got = {}
    for split in records.SPLITS:
        for shard in records.list_shards(str(out), split):
            for raw in records.ShardReader(shard):
                ex = records.decode_example(raw)
                uid = study_of[ex["study_id"][0].decode()]
                assert got.setdefault(uid, ex["report"][0].decode()) == ex["report"][0].decode()
    return got


def test_no_report_identifier_reaches_any_output_and_the_clinical_text_does(cohort, converted):
    out, proc = converted
    phi = json.loads((cohort / "phi.json").read_text())
    fields = phi["by_field"]
    for kind in ("report_header_values", "report_staff", "report_dates", "report_contact", "report_numbers"):
        assert fields[kind], f"the cohort has no {kind}: the test would prove nothing"
    needles = {form.lower().encode() for s in phi["strings"] for form in (s, clean_text(s).strip()) if form.strip()}
    blobs = {"stdout": proc.stdout, "stderr": proc.stderr}
    for path in glob.glob(str(out / "**"), recursive=True) + glob.glob(str(out / ".*" / "*")):
        if os.path.isfile(path):
            blobs[path] = open(path, "rb").read()
    for name, data in blobs.items():
        data = data.lower()
        assert not [s for s in needles if s in data], name
    reports = _reports_by_study(out, cohort)
    clinical = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(open(cohort / "reports_clinical.csv"))}
    assert reports and set(reports) <= set(clinical)
    for uid, report in reports.items():
        assert clean_text(clinical[uid]).strip() in report  # EF values, device sentences, grades, unchanged
        assert not [n for n in fields["report_numbers"] if n.lower() in report.lower()], report


def test_counts_per_category_are_audited_without_values(cohort, converted):
    out, proc = converted
    info = json.load(open(out / "dataset_info.json"))["report_deid"]
    n_studies = len(_reports_by_study(out, cohort))
    assert info["mode"] == "on" and info["reports"] == n_studies and info["reports_with_removals"] == n_studies
    for category in ("signature", "id", "date", "phone", "email", "institution"):
        assert info["removed"].get(category, 0) >= 1, (category, info["removed"])
    assert set(info["removed"]) <= set(convert.report_deid.CATEGORIES)
    assert f"removed from {n_studies} of {n_studies} reports" in proc.stderr.decode()
    lines = [json.loads(line) for line in open(out / "manifest.jsonl")]
    converted_lines = [m for m in lines if m["status"] == "converted"]
    assert converted_lines and all(m["report_removed"] for m in converted_lines)
    assert all(isinstance(v, int) for m in converted_lines for v in m["report_removed"].values())


def test_tokenizers_and_zero_shot_labels_read_the_scrubbed_reports_as_the_clinical_ones(cohort, converted):
    out, _ = converted
    reports = _reports_by_study(out, cohort)
    clinical = {
        r["StudyInstanceUID"]: clean_text(r["report"]) for r in csv.DictReader(open(cohort / "reports_clinical.csv"))
    }
    uids = sorted(reports)
    scrubbed, truth = [reports[u] for u in uids], [clinical[u] for u in uids]
    template = get_tokenizer("template", path=TEMPLATE_VOCAB, context_length=77)
    # the template tokenizer drops what is not a report phrase: the leftover labels ("EXAM DATE.") vanish
    assert (template.encode(scrubbed) == template.encode(truth)).all()
    for task in task_table.load_tasks(names=["ejection_fraction", "pacemaker", "tavr", "mitraclip"]):
        a, b = task_table.task_labels(task, scrubbed), task_table.task_labels(task, truth)
        assert ((a == b) | (a != a) & (b != b)).all(), task.name
    assert get_tokenizer("clip_bpe", context_length=77).encode(scrubbed).shape == (len(uids), 77)


def test_report_deid_off_says_so_and_keeps_the_text(cohort, tmp_path):
    proc = _run(cohort, tmp_path / "off", "--report_deid", "off")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "report de-identification is OFF" in proc.stderr.decode()
    info = json.load(open(tmp_path / "off" / "dataset_info.json"))["report_deid"]
    assert info["mode"] == "off" and info["removed"] == {}
    staff = json.loads((cohort / "phi.json").read_text())["by_field"]["report_staff"]
    text = " ".join(_reports_by_study(tmp_path / "off", cohort).values())
    assert any(s in text for s in staff)  # off is off: what the default run removes is there


def test_bad_detector_or_region_is_refused_before_any_work(cohort, tmp_path):
    proc = _run(cohort, tmp_path / "bad", "--report_detector", "nerd")
    assert proc.returncode == 2 and b"--report_detector 'nerd'" in proc.stderr
    proc = _run(cohort, tmp_path / "bad2", "--report_detector", f"wordlist:{tmp_path / 'none.txt'}")
    assert proc.returncode == 2 and b"none.txt" in proc.stderr
    proc = _run(cohort, tmp_path / "bad3", "--phone_region", "XX")
    assert proc.returncode == 2 and b"--phone_region" in proc.stderr
    assert not (tmp_path / "bad").exists()
