"""echoclip_jax.probe: linear and attentive probes on frozen embeddings, beside their baselines."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_prep import options, records
from data_prep.plan import salted_hash
from data_prep.synthetic import read_truth, truth_by_video_id
from echoclip_jax import models, probe, probe_labels
from echoclip_jax.config import files as config_files
from echoclip_jax.demo import labels as demo_labels
from echoclip_jax.inference.embedder import SplitEmbeddings
from echoclip_jax.probes import attentive as probe_attentive
from echoclip_jax.probes import labels as labels_lib
from echoclip_jax.probes import linear
from echoclip_jax.probes import pipeline as probe_pipeline
from echoclip_jax.runtime import storage
from echoclip_jax.weights import conversion

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _split(frames: list, patients: list, studies: list | None = None, tag: str = "tr") -> SplitEmbeddings:
    """SplitEmbeddings of videos whose frame embeddings are `frames` (one [T_i, D] array each); the video
    embedding is the mean pool, as a model with temporal_pool "mean" makes it. Ids look like real ones
    (distinct strings) so the tests can grep the outputs for them."""
    n = len(frames)
    videos = np.stack([f.mean(0) for f in frames])
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    studies = studies if studies is not None else [f"{tag}study{p}x{i}" for i, p in enumerate(patients)]
    return SplitEmbeddings(
        frames=np.concatenate(frames).astype(np.float32),
        videos=videos.astype(np.float32),
        lengths=np.asarray([len(f) for f in frames]),
        patient_id=list(patients),
        study_id=list(studies),
        study_day=np.zeros(n),
        report=[""] * n,
        ef=np.full(n, np.nan),
        video_id=[f"{tag}video{i:05d}" for i in range(n)],
    )


def _ids(split: SplitEmbeddings) -> set:
    return set(split.video_id) | set(split.patient_id) | set(split.study_id)


def _assert_no_ids(out_dir, ids, *texts):
    """No id appears in any file under out_dir (JSON and PNG bytes alike) or in the given log texts."""
    for root, _, files in os.walk(out_dir):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            assert not any(i.encode() in data for i in ids), name
    for text in texts:
        assert not any(i in text for i in ids)


def _separable(rng, n, tag, patients_per=3):
    """Videos of 1-4 frames around one of 3 class centres in 8 dims; EF a linear function of the mean."""
    centres = rng.normal(size=(3, 8)) * 3
    w = rng.normal(size=8)
    cls = rng.integers(0, 3, n)
    cls[: n // 2] = 0  # a majority class, so the baseline has something to find
    frames = [centres[c] + rng.normal(scale=0.3, size=(int(rng.integers(1, 5)), 8)) for c in cls]
    split = _split(frames, [f"{tag}patient{i // patients_per}" for i in range(n)], tag=tag)
    ef = 50 + 10 * split.videos @ w
    return split, np.asarray(["a4c", "plax", "psax"])[cls], ef


def _table(split, **columns):
    return {name: {v: str(x) for v, x in zip(split.video_id, values)} for name, values in columns.items()}


def test_linear_probe_on_a_separable_case_beats_its_baseline_and_writes_no_ids(tmp_path, project_logs):
    rng = np.random.default_rng(0)
    centres_rng = np.random.default_rng(1)
    train, view_tr, ef_tr = _separable(centres_rng, 150, "tr")
    centres_rng = np.random.default_rng(1)  # the same centres and weights for the evaluated split
    test, view_ev, ef_ev = _separable(centres_rng, 60, "ev")
    del rng
    table = {
        k: {**_table(train, view=view_tr, ef=ef_tr)[k], **_table(test, view=view_ev, ef=ef_ev)[k]}
        for k in ("view", "ef")
    }
    res = probe_pipeline.probe_splits(train, test, table, key="video_id", out_dir=str(tmp_path), probes=("linear",))
    view = res["labels"]["view"]
    assert view["task"] == "classification" and view["task_source"] == "detected"
    assert view["classes"] == ["a4c", "plax", "psax"] and view["n_train"] == 150 and view["n_eval"] == 60
    lin = view["probes"]["linear"]
    assert lin["metrics"]["accuracy"] >= 0.97 and lin["metrics"]["auc_macro_ovr"] >= 0.99
    assert view["baseline"]["accuracy"] == pytest.approx(np.mean(view_ev == "a4c"))  # the majority class
    assert view["baseline"]["accuracy"] < 0.8 and view["baseline"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert np.sum(lin["metrics"]["confusion_matrix"]["matrix"]) == 60
    assert lin["hyperparameters"]["C"] in linear.C_GRID and lin["hyperparameters"]["cv_folds"] == 5
    ef = res["labels"]["ef"]
    assert ef["task"] == "regression"
    assert ef["probes"]["linear"]["metrics"]["mae"] < 0.1 and ef["probes"]["linear"]["metrics"]["r2"] > 0.999
    assert ef["baseline"]["mae"] > 3 and ef["baseline"]["mae"] == pytest.approx(np.mean(np.abs(ef_ev - ef_tr.mean())))
    stored = json.load(open(tmp_path / "probe.json"))
    assert stored["labels"]["view"]["probes"]["linear"]["metrics"]["accuracy"] == lin["metrics"]["accuracy"]
    assert sorted(os.listdir(tmp_path / "plots")) == ["ef_linear_pred_vs_true.png", "view_linear_confusion.png"]
    for name in os.listdir(tmp_path / "plots"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(m.startswith("view (classification)") for m in project_logs)  # the per-label log line
    _assert_no_ids(tmp_path, _ids(train) | _ids(test), "\n".join(project_logs))


def test_labels_from_and_outputs_to_a_bucket_as_on_local_disk(tmp_path, bucket, capsys):
    """The labels CSV read from a bucket and probe.json and plots/ written to one hold what they hold on
    local disk; a path flag of another scheme exits 2 naming it."""
    centres_rng = np.random.default_rng(1)
    train, _, ef_tr = _separable(centres_rng, 60, "tr")
    centres_rng = np.random.default_rng(1)
    test, _, ef_ev = _separable(centres_rng, 30, "ev")
    rows = [["video_id", "ef"]]  # a regression: its probe fits in a fraction of a second
    for split, ef in ((train, ef_tr), (test, ef_ev)):
        rows += [[v, f"{e:.3f}"] for v, e in zip(split.video_id, ef)]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    storage.copy(tmp_path / "labels.csv", f"{bucket}/labels.csv")
    outputs = {}
    for where, labels_csv, out in (
        ("local", str(tmp_path / "labels.csv"), str(tmp_path / "P")),
        ("gs", f"{bucket}/labels.csv", f"{bucket}/P"),
    ):
        probe_pipeline.run(
            None,
            "safetensors:unused",
            "unused",
            labels_csv,
            labels=["ef"],
            out_dir=out,
            probes=("linear",),
            embeddings={"train": train, "test": test},
        )
        outputs[where] = {name: storage.read_bytes(storage.join(out, name)) for name in storage.files_under(out)}
    assert sorted(outputs["gs"]) == ["plots/ef_linear_pred_vs_true.png", "probe.json"]
    assert json.loads(outputs["gs"]["probe.json"]) == json.loads(outputs["local"]["probe.json"])
    assert outputs["gs"] == outputs["local"]
    _assert_no_ids(tmp_path / "P", _ids(train) | _ids(test))
    args = ["probe", "--config", str(CONFIGS / "tiny.py"), "--checkpoint", "safetensors:m", "--data_dir", str(tmp_path)]
    args += ["--labels", "s3://b/labels.csv", "--label", "ef", "--out", str(tmp_path / "Q")]
    assert probe.main(args) == 2
    assert "--labels=s3://b/labels.csv: the scheme s3:// is not supported" in capsys.readouterr().err


def _one_frame(rng, n, tag, dim=16):
    """Videos of 2-12 frames: distractors are noise; ONE frame per video carries a marker (dim 0) and the
    label (the sign of dim 1). Mean pooling drowns that frame among its distractors; attention can find it."""
    frames, y = [], []
    for _ in range(n):
        t = int(rng.integers(2, 13))
        x = rng.normal(size=(t, dim))
        x[:, 0] = 0
        key, label = int(rng.integers(t)), int(rng.integers(2))
        x[key, 0], x[key, 1] = 4.0, (1 if label else -1) * rng.uniform(1, 2)
        frames.append(x)
        y.append(label)
    return _split(frames, [f"{tag}patient{i // 2}" for i in range(n)], tag=tag), np.asarray(y)


def test_attentive_probe_finds_the_one_frame_that_carries_the_label(tmp_path):
    rng = np.random.default_rng(0)
    train, y_tr = _one_frame(rng, 200, "tr")
    test, y_ev = _one_frame(rng, 100, "ev")
    table = {"device": {**_table(train, d=y_tr)["d"], **_table(test, d=y_ev)["d"]}}
    res = probe_pipeline.probe_splits(train, test, table, key="video_id", out_dir=str(tmp_path))
    probes = res["labels"]["device"]["probes"]
    attentive, linear = probes["attentive"]["metrics"]["accuracy"], probes["linear"]["metrics"]["accuracy"]
    assert attentive >= 0.95, (attentive, linear)
    assert linear <= attentive - 0.15, (attentive, linear)  # the mean-pooled embedding cannot get it as well
    hp = probes["attentive"]["hyperparameters"]
    assert hp["epochs"] == 60 and hp["seed"] == 0 and hp["final_train_loss"] < 0.1
    # seeded: the same run gives the same figures
    again = probe_pipeline.probe_splits(train, test, table, key="video_id", out_dir=None, probes=("attentive",))
    assert again["labels"]["device"]["probes"]["attentive"]["metrics"] == probes["attentive"]["metrics"]


def test_attentive_predictions_do_not_depend_on_padding():
    """An item's prediction is the same alone or batched beside a longer item (another bucket's padding)."""

    rng = np.random.default_rng(0)
    items = [rng.normal(size=(int(t), 6)).astype(np.float32) for t in rng.integers(1, 20, 40)]
    y = rng.normal(size=40)
    fitted = probe_attentive.fit(items, y, "regression", epochs=2)
    together = probe_attentive.predict(fitted, [items[0], np.ones((30, 6), np.float32)])
    alone = probe_attentive.predict(fitted, [items[0]])
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-5)


def test_cv_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    groups = [f"p{g}" for g in rng.integers(0, 17, 120)]
    folds = linear.cv_folds(groups)
    assert len(folds) == 5
    held_out = np.concatenate([test for _, test in folds])
    assert sorted(held_out) == list(range(120))  # every item held out exactly once
    g = np.asarray(groups)
    for train, test in folds:
        assert not set(g[train]) & set(g[test])
    # the linear probe fits on exactly such folds
    x = rng.normal(size=(120, 4))
    _, hp, used = linear.fit_linear(x, x[:, 0] > 0, groups, "classification")
    assert hp["cv_folds"] == len(used) == 5 and hp["cv_grouped_by"] == "patient_id"
    for train, test in used:
        assert not set(g[train]) & set(g[test])
    assert linear.cv_folds(["p0"] * 5) == []  # one patient: no folds, the default strength
    _, hp, _ = linear.fit_linear(x[:5], x[:5, 0], ["p0"] * 5, "regression")
    assert hp["alpha"] == 1.0 and hp["cv"].startswith("none")


@pytest.mark.parametrize(
    "values, task",
    [
        (["0", "1", "", "1"], "classification"),
        (["a4c", "plax", "3"], "classification"),
        (["1", "2.0", "3"], "classification"),
        ([str(v) for v in range(20, 76)], "regression"),  # EF: many distinct integers
        (["0.5", "1.5", "0.5"], "regression"),
        ([], "classification"),
    ],
)
def test_label_type_detection(values, task):
    assert labels_lib.detect_task(values) == task


def test_missing_labels_are_skipped_and_counted_and_study_keys_pool_videos(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(3, 4)) for _ in range(12)]
    train = _split(frames[:8], [f"trp{i // 4}" for i in range(8)], [f"trs{i // 2}" for i in range(8)], "tr")
    test = _split(frames[8:], [f"evp{i // 4}" for i in range(4)], [f"evs{i // 2}" for i in range(4)], "ev")
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "ef", "other"])
        for i, v in enumerate(train.video_id[:6]):  # videos 6, 7 of train: no row
            w.writerow([v, "" if i == 0 else 30 + 5 * i, "x"])  # video 0: empty label
        for v in test.video_id:
            w.writerow([v, 50, "x"])
    table = labels_lib.read_labels(str(path), "video_id", ["ef"])
    res = probe_pipeline.probe_splits(
        train, test, table, key="video_id", out_dir=None, probes=("linear",), tasks={"ef": "regression"}
    )
    ef = res["labels"]["ef"]
    assert ef["task_source"] == "given" and ef["n_train"] == 5 and ef["n_eval"] == 4
    assert ef["skipped"] == {
        "train": {"no_label_row": 2, "empty_label": 1},
        "eval": {"no_label_row": 0, "empty_label": 0},
    }
    with pytest.raises(ValueError, match=r"no column\(s\) \['nope'\]"):
        labels_lib.read_labels(str(path), "video_id", ["nope"])
    # study key: a study is the re-normalised mean of its videos, over all their frames
    items = labels_lib.items_for(train, "study_id")
    assert len(items.keys) == 4 and [len(f) for f in items.frames] == [6] * 4
    mean = train.videos[:2].mean(0)
    np.testing.assert_allclose(items.embeddings[0], mean / np.linalg.norm(mean), rtol=1e-5)
    np.testing.assert_allclose(items.frames[0], np.concatenate(frames[:2]), rtol=1e-6)
    study_table = {"ef": {"trs0": "40", "trs1": "45", "trs2": "", "evs0": "50"}}
    res = probe_pipeline.probe_splits(
        train, test, study_table, key="study_id", out_dir=None, probes=("linear",), tasks={"ef": "regression"}
    )
    assert res["n_items"] == {"train": 4, "eval": 2}
    assert res["labels"]["ef"]["skipped"] == {
        "train": {"no_label_row": 1, "empty_label": 1},
        "eval": {"no_label_row": 1, "empty_label": 0},
    }
    # a patient on both sides would flatter the probe: refused
    leaky = _split(frames[8:], ["trp0"] * 4, tag="ev")
    with pytest.raises(ValueError, match="1 patient\\(s\\) in both"):
        probe_pipeline.probe_splits(train, leaky, table, key="video_id", out_dir=None)
    # one class in training: an error for that label, not a crash
    one = probe_pipeline.probe_splits(
        train, test, {"c": {v: "a" for v in train.video_id} | {test.video_id[0]: "b"}}, key="video_id", out_dir=None
    )
    assert one["labels"]["c"]["error"] == "one class only in the training split"


def test_synthetic_labels_csv(tmp_path, bucket):
    """Labels CSVs from a cohort: keyed by the salted ids data_prep.convert would give; the cohort, the salt
    file and the CSV on a bucket alike."""

    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.synthetic",
            "--out",
            str(tmp_path / "c"),
            "--patients",
            "1",
            "--small",
            "--cohort_version",
            "2",
        ],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    salt_file = tmp_path / "salt"
    salt_file.write_text("a-secret-salt\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "echoclip_jax.probe_labels",
            "--cohort",
            str(tmp_path / "c"),
            "--salt_file",
            str(salt_file),
            "--out",
            str(tmp_path / "v.csv"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "v.csv")))
    truth = truth_by_video_id(str(tmp_path / "c"), b"a-secret-salt")
    assert list(rows[0]) == ["video_id", "view", "ef", "pacemaker", "tavr", "mitraclip", "lv_size"]
    assert {r["video_id"]: r["view"] for r in rows} == {k: t["view"] for k, t in truth.items()}
    n = demo_labels.write_synthetic_labels(
        str(tmp_path / "c"), "a-secret-salt", str(tmp_path / "s.csv"), key="study_id"
    )
    studies = {t["StudyInstanceUID"]: t["ef"] for t in read_truth(str(tmp_path / "c"))}
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert n == len(rows) == len(studies) and "view" not in rows[0]
    assert {r["study_id"]: r["ef"] for r in rows} == {
        salted_hash(b"a-secret-salt", "study", u): ef for u, ef in studies.items()
    }
    with pytest.raises(ValueError, match="at least 8 bytes"):
        options.load_salt("short")
    storage.copytree(tmp_path / "c", f"{bucket}/c")
    storage.copy(salt_file, f"{bucket}/salt")
    args = ["probe_labels", "--cohort", f"{bucket}/c", "--salt_file", f"{bucket}/salt", "--out", f"{bucket}/v.csv"]
    assert probe_labels.main(args) == 0
    assert storage.read_bytes(f"{bucket}/v.csv") == (tmp_path / "v.csv").read_bytes()


# ------------------------------------------------------------------------- the CLI, end to end

TINY = {
    "model.vision.image_size": 32,
    "model.vision.depthwise_impl": "lax",
    "model.embed_dim": 32,
    "model.text.layers": 1,
    "model.text.width": 32,
    "model.text.heads": 2,
}


def _write_records(out, rng, image_size=32):
    """Tiny records (data_prep.records): 4 train and 2 test patients, 2 studies each of 2 videos of
    1-4 frames. Returns every id written."""

    ids = []
    for split, patients in (("train", 4), ("test", 2)):
        with records.TFRecordWriter(os.path.join(out, records.shard_name(split, 0, 1))) as w:
            for p in range(patients):
                for s in range(2):
                    for v in range(2):
                        pid, sid = f"{split}patient{p:04d}", f"{split}patient{p:04d}study{s}"
                        vid, n_frames = f"{sid}video{v}", 1 + (p + s + v) % 4
                        jpegs = []
                        for _ in range(n_frames):
                            buf = io.BytesIO()
                            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(
                                buf, format="JPEG"
                            )
                            jpegs.append(buf.getvalue())
                        ids += [pid, sid, vid]
                        w.write(
                            records.encode_example(
                                {
                                    "video_id": vid.encode(),
                                    "patient_id": pid.encode(),
                                    "study_id": sid.encode(),
                                    "study_day": s * 100,
                                    "frames": jpegs,
                                    "num_frames": n_frames,
                                    "image_size": image_size,
                                    "fps": 30.0,
                                    "report": b"NORMAL.",
                                    "ef": 55.0,
                                    "source": b"dicom",
                                }
                            )
                        )
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump({"source": "dicom", "max_frames": 4, "image_size": image_size, "features": records.SCHEMA}, f)
    return sorted(set(ids))


def test_cli_end_to_end_on_tiny_records(tmp_path):
    (tmp_path / "records").mkdir()
    ids = _write_records(str(tmp_path / "records"), np.random.default_rng(0))
    config = config_files.load(CONFIGS / "tiny.py")
    for k, v in TINY.items():
        *parents, leaf = k.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = v
    model = models.build_model(config.model, rngs=nnx.Rngs(0))
    conversion.save(
        f"safetensors:{tmp_path / 'm.safetensors'}",
        config.model,
        {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))},
    )
    train = [i for i in ids if "video" in i and i.startswith("train")]
    test = [i for i in ids if "video" in i and i.startswith("test")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "side", "score"])
        for i, v in enumerate(train + test[:-1]):  # the last test video has no row
            w.writerow([v, "left" if i % 2 else "right", "" if i == 0 else i])  # train video 0: no score
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
        + " --xla_force_host_platform_device_count=2",
    }
    args = [
        sys.executable,
        "-m",
        "echoclip_jax.probe",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        *[f"--config.{k}={v}" for k, v in TINY.items()],
        "--checkpoint",
        f"safetensors:{tmp_path / 'm.safetensors'}",
        "--data_dir",
        str(tmp_path / "records"),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--label",
        "side",
        "--label",
        "score",
        "--task",
        "score=regression",
        "--key",
        "video_id",
        "--out",
        str(tmp_path / "out"),
        "--batch_size",
        "8",
        "--epochs",
        "3",
    ]
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "out" / "probe.json"))
    assert res["n_items"] == {"train": 16, "eval": 8} and res["embed_dim"] == 32
    side, score = res["labels"]["side"], res["labels"]["score"]
    assert side["task"] == "classification" and score["task"] == "regression" and score["task_source"] == "given"
    assert side["n_train"] == 16 and side["n_eval"] == 7 and side["skipped"]["eval"]["no_label_row"] == 1
    assert score["n_train"] == 15 and score["skipped"]["train"]["empty_label"] == 1
    for label in (side, score):
        assert set(label["probes"]) == {"linear", "attentive"}
        assert label["probes"]["attentive"]["hyperparameters"]["epochs"] == 3
    for m in (side["baseline"], *(p["metrics"] for p in side["probes"].values())):
        assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] == 7
    assert len(os.listdir(tmp_path / "out" / "plots")) == 4
    _assert_no_ids(tmp_path / "out", ids, r.stdout, r.stderr)
    r = subprocess.run(args[:-4] + ["--task", "score=ordinal"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "expected NAME=regression or NAME=classification" in r.stderr
