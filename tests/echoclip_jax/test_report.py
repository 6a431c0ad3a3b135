"""Retrieval-based preliminary reports: findings from report text by the zero-shot rules, the vote and its
support, the nearest report of a study identical to a bank study, the evaluation against a truth, no PHI."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.plan import salted_hash
from data_prep.synthetic import read_phi
from echoclip_jax import report as report_command
from echoclip_jax import tokenizers
from echoclip_jax.data import loader as data
from echoclip_jax.inference.embedder import Embedder
from echoclip_jax.retrieval import bank as bank_lib
from echoclip_jax.retrieval import ops
from echoclip_jax.retrieval import report as retrieval_report
from echoclip_jax.retrieval.bank import Bank
from echoclip_jax.runtime import storage

from .conftest import REPO, tiny_overrides
from .test_search import CONFIGS, SALT, init_params, tiny  # noqa: F401 (the module-scoped model fixture)

PACER = "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."
TAVR = "A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION."
REPORTS = [
    f"MODERATE DILATED LEFT VENTRICLE. LV EJECTION FRACTION IS 35%. {PACER}",
    f"THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 38%. {PACER} NORMAL RIGHT VENTRICULAR SIZE.",
    "NORMAL LEFT VENTRICULAR SIZE. LV EJECTION FRACTION IS 62%.",
    f"MODERATE DILATED LEFT VENTRICLE BY VOLUME. LV EJECTION FRACTION IS 33%. {TAVR}",
    "THE STUDY IMAGES ARE OF TECHNICALLY ADEQUATE QUALITY.",
]


def test_findings_come_from_the_zero_shot_rules():
    got = retrieval_report.report_findings(REPORTS)
    assert got[0] == {
        "ef": 35.0,
        "ef_band": "moderately reduced",
        "pacemaker": "present",
        "tavr": "absent",
        "mitraclip": "absent",
        "lv_size": "moderate",
    }
    assert (got[1]["ef"], got[1]["ef_band"], got[1]["lv_size"]) == (38.0, "moderately reduced", None)
    assert (got[2]["ef_band"], got[2]["lv_size"], got[2]["pacemaker"]) == ("normal", "normal", "absent")
    assert got[3]["lv_size"] == "moderate" and got[3]["tavr"] == "present"  # the table's "... BY VOLUME" phrase
    assert got[4]["ef"] is None and got[4]["ef_band"] is None and got[4]["lv_size"] is None
    assert [retrieval_report.ef_band(e) for e in (75, 60, 50, 40, 20)] == [
        "hyperdynamic",
        "normal",
        "mildly reduced",
        "moderately reduced",
        "severely reduced",
    ]


def test_nearest_report_and_vote_with_support():
    """Bank vectors chosen so the query's neighbours are known: rows 1, 0, 3, 2, 4 in that order."""
    vectors = np.eye(5, dtype=np.float32)
    bank = Bank("test bank", [f"s{i}" for i in range(5)], REPORTS, vectors, "text")
    query = np.asarray([0.5, 0.6, 0.1, 0.3, 0.0], np.float32)
    rows, sims = bank.retrieve(query, 3)
    assert list(rows) == [1, 0, 3]
    out = retrieval_report.compose(bank, rows, sims)
    assert out["nearest_report"] == {"id": "s1", "similarity": pytest.approx(0.6), "text": REPORTS[1]}
    f = out["findings"]
    assert f["ef"] == {
        "value": 35.0,
        "support": 3,
        "stated": 3,
        "of": 3,
        "mean_similarity": pytest.approx(0.4667, abs=1e-4),
    }
    assert f["ef_band"]["value"] == "moderately reduced" and f["ef_band"]["support"] == 3
    assert f["pacemaker"] == {
        "value": "present",
        "support": 2,
        "stated": 3,
        "of": 3,
        "mean_similarity": pytest.approx(0.55),
    }
    assert f["lv_size"] == {
        "value": "moderate",
        "support": 2,
        "stated": 2,
        "of": 3,
        "mean_similarity": pytest.approx(0.4),
    }
    assert list(bank.retrieve(query, 2, exclude_ids={"s1"})[0]) == [0, 3]  # a study's own report is left out
    text = retrieval_report.render(out, "Study q")
    assert text.startswith(retrieval_report.DISCLAIMER) and "NOT A DIAGNOSIS" in text and "about 35%" in text


def test_agreement_against_a_truth():
    preds = [
        {
            "ef": {"value": v},
            "ef_band": {"value": retrieval_report.ef_band(v)},
            "pacemaker": {"value": p},
            "tavr": {"value": "absent"},
            "mitraclip": {"value": "absent"},
            "lv_size": {"value": s},
        }
        for v, p, s in ((40, "present", "mild"), (60, "absent", "normal"), (30, "absent", "severe"))
    ]
    truth = [
        {"ef": 44, "pacemaker": 1, "tavr": 0, "mitraclip": 0, "lv_size": "mild"},
        {"ef": 52, "pacemaker": 0, "tavr": 1, "mitraclip": 0, "lv_size": "normal"},
        {"ef": 30, "pacemaker": 1, "tavr": 0, "mitraclip": 0, "lv_size": "moderate"},
    ]
    got = retrieval_report.agreement(preds, truth)
    assert got["ef_within_5"] == pytest.approx(2 / 3) and got["ef_band_accuracy"] == pytest.approx(2 / 3)
    assert got["pacemaker_accuracy"] == pytest.approx(2 / 3) and got["pacemaker_balanced_accuracy"] == 0.75
    assert got["tavr_balanced_accuracy"] == 0.5 and got["mitraclip_balanced_accuracy"] is None
    assert got["devices_balanced_accuracy"] == pytest.approx(0.625) and got["lv_size_accuracy"] == pytest.approx(2 / 3)


def _study_truth(records_dir) -> dict:
    """truth.csv per salted study id (the records' study_id: data_prep's salted hash of the StudyInstanceUID)."""
    with open(os.path.join(os.path.dirname(records_dir), "syn", "truth.csv"), newline="") as f:
        return {salted_hash(SALT, "study", r["StudyInstanceUID"]): r for r in csv.DictReader(f)}


def _phi_hits(records_dir, paths, texts=()):
    phi = [s.lower() for s in read_phi(os.path.join(os.path.dirname(records_dir), "syn"))]
    blobs = [
        open(os.path.join(d, n), "rb").read().decode("utf-8", "replace").lower()
        for p in paths
        for d, _, ns in os.walk(p)
        for n in ns
    ] + [t.lower() for t in texts]
    return [s for s in phi for b in blobs if s in b]


def test_report_of_a_study_identical_to_a_bank_study(records_dir, tiny, tmp_path, bucket, capsys):  # noqa: F811
    """The CLI on a study directory holding exactly the frames of one bank study: its nearest report is that
    study's, and with k=1 the voted findings are that study's truth (EF, devices); the same with the bank and
    the study on a bucket and the report written there."""
    config, spec, _ = tiny
    index = ops.build(
        str(tmp_path / "index"),
        checkpoint=spec,
        config=config,
        data_dir=records_dir,
        splits=["train"],
        report_bank=True,
        batch_size=16,
    )
    videos = list(data.iterate_videos(records_dir, "train"))
    study = videos[0]["study_id"]
    (tmp_path / "study").mkdir()
    for i, v in enumerate(v for v in videos if v["study_id"] == study):
        np.save(tmp_path / "study" / f"video{i}.npy", v["frames"])
    overrides = [f"--config.{k}={v}" for k, v in tiny_overrides(records_dir).items() if k.startswith(("model", "tok"))]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "echoclip_jax.report",
            "--checkpoint",
            spec,
            "--config",
            "configs/tiny.py",
            *overrides,
            "--video",
            str(tmp_path / "study"),
            "--bank",
            index.path,
            "--match",
            "image",
            "--k",
            "1",
            "--out",
            str(tmp_path / "R"),
            "--batch_size",
            "16",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "R" / "report.json").read_text())
    assert got["nearest_report"]["id"] == study and got["nearest_report"]["similarity"] > 0.9999
    assert got["nearest_report"]["text"] == videos[0]["report"]
    truth = _study_truth(records_dir)[study]
    assert got["findings"]["ef"]["value"] == float(truth["ef"])
    for device in retrieval_report.DEVICES:
        assert got["findings"][device]["value"] == ("present" if truth[device] == "1" else "absent")
    assert got["disclaimer"] == retrieval_report.DISCLAIMER
    assert (tmp_path / "R" / "report.txt").read_text().startswith(retrieval_report.DISCLAIMER)
    assert retrieval_report.DISCLAIMER in r.stdout and str(tmp_path / "study") not in json.dumps(got)
    assert _phi_hits(records_dir, [tmp_path / "R", tmp_path / "index"], [r.stdout, r.stderr]) == []

    # the bank and the study read from a bucket, the report written to it: the same report
    storage.copytree(index.path, f"{bucket}/index")
    storage.copytree(tmp_path / "study", f"{bucket}/study")
    argv = ["report", "--checkpoint", spec, "--config", str(CONFIGS / "tiny.py"), *overrides, "--video"]
    argv += [f"{bucket}/study", "--bank", f"{bucket}/index", "--match", "image", "--k", "1", "--out", f"{bucket}/R"]
    assert report_command.main([*argv, "--batch_size", "16"]) == 0
    remote = storage.load_json(f"{bucket}/R/report.json")
    named = ("query", "bank")  # the study's name (a hash of its path) and the bank's path
    assert {k: v for k, v in remote.items() if k not in named} == {k: v for k, v in got.items() if k not in named}
    assert remote["bank"] == f"{bucket}/index [train]"
    text = storage.read_text(f"{bucket}/R/report.txt")
    assert text == (tmp_path / "R" / "report.txt").read_text().replace(got["query"], remote["query"])
    assert report_command.main([*argv[:-2], "--out", "s3://b/R"]) == 2
    assert "--out=s3://b/R: the scheme s3:// is not supported" in capsys.readouterr().err


def test_reports_for_a_split_against_a_records_bank(records_dir, tiny, tmp_path, project_logs):  # noqa: F811
    """Every val study and video gets a report from train reports of other patients; no PHI in the outputs."""
    config, spec, model = tiny

    embedder = Embedder(model, tokenizers.from_config(config.tokenizer), batch_size=16)
    bank = bank_lib.load_bank(records_dir, embedder, match="text", splits=["train"])
    train = list(data.iterate_videos(records_dir, "train"))
    assert sorted(bank.ids) == sorted({v["study_id"] for v in train})
    summary = retrieval_report.report_records(
        embedder,
        bank,
        records_dir,
        "val",
        out=str(tmp_path / "R"),
        k=3,
        levels=("study", "video"),
        baseline=True,
        image_size=config.model.vision.image_size,
    )
    val = list(data.iterate_videos(records_dir, "val"))
    rows = {lv: [json.loads(x) for x in open(tmp_path / "R" / f"{lv}_reports.jsonl")] for lv in ("study", "video")}
    assert summary["levels"] == {"study": len({v["study_id"] for v in val}), "video": len(val)}
    assert [r["video_id"] for r in rows["video"]] == [v["video_id"] for v in val]
    val_patients = {v["patient_id"] for v in val}
    patient_of = dict(zip(bank.ids, bank.patients))
    for row in rows["study"] + rows["video"]:
        assert row["disclaimer"] == retrieval_report.DISCLAIMER and row["k"] == 3 and "random_findings" in row
        assert all(patient_of[n["id"]] not in val_patients for n in row["neighbours"])
        sims = [n["similarity"] for n in row["neighbours"]]
        assert sims == sorted(sims, reverse=True)
    # the text similarities are the model's: the study embedding against the bank's report embeddings
    first = rows["video"][0]
    want = bank.vectors @ embedder.videos([val[0]["frames"]]).videos[0]
    assert first["neighbours"][0]["similarity"] == pytest.approx(float(want.max()), abs=1e-5)
    assert (tmp_path / "R" / "reports.txt").read_text().startswith(retrieval_report.DISCLAIMER)
    assert _phi_hits(records_dir, [tmp_path / "R"], project_logs) == []


def test_lv_size_in_other_readers_words():
    reports = [
        "LV CAVITY SIZE IS MILD INCREASED. EF 40%.",
        "LEFT VENTRICULAR CAVITY SIZE IS WITHIN NORMAL LIMITS.",
        "THE LV IS SEVERE ENLARGED.",
        "NORMAL LV CAVITY SIZE. MODERATE LV DILATATION.",
        "EF 55%.",
    ]
    got = [f["lv_size"] for f in retrieval_report.report_findings(reports)]
    assert got[:3] == ["mild", "normal", "severe"] and got[4] is None
    assert got[3] in ("normal", "moderate")  # two statements: one of them, never a third class
