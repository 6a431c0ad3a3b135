import csv
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_prep import records
from echoclip_jax import models, tokenizers
from echoclip_jax.config import files
from echoclip_jax.evaluation import outputs as eval_outputs
from echoclip_jax.evaluation import (
    study_level,
    sweep,
    task_table,
)
from echoclip_jax.evaluation import zero_shot as zs
from echoclip_jax.inference import embedder as embedder_lib
from echoclip_jax.training import checkpoint
from echoclip_jax.weights import conversion
from echoclip_jax.weights import loader as weights

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
PACER = "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."


def _angle(ef):
    return np.deg2rad(ef)  # 1 EF point = 1 degree, so similarity falls off with |EF - value|


class OracleEmbedder:
    """Stands in for a model that understands the prompts perfectly: dimension 0 is 'pacer lead',
    dimensions 1-2 encode EF as an angle. Tests the wiring (labels, prompts, scoring) in isolation."""

    temporal_pool = "mean"

    def texts(self, texts):
        out = []
        for t in texts:
            m = re.search(r"EJECTION FRACTION IS (?:ESTIMATED TO BE )?(\d+)%", t)
            if "PACER LEAD" in t:
                v = [1.0, 0, 0, 0]
            elif m:
                a = _angle(float(m.group(1)))
                v = [0, np.cos(a), np.sin(a), 0]
            else:
                v = [0, 0, 0, 1.0]
            out.append(v)
        return np.asarray(out, np.float32)


def _oracle_split(rng, n=24, frames=3):
    ef = rng.integers(20, 76, n).astype(float)
    pacer = np.arange(n) % 3 == 0
    emb = np.zeros((n, frames, 4))
    for i in range(n):
        for t in range(frames):
            a = _angle(ef[i] + rng.normal(scale=1.0))
            emb[i, t] = [0.8 * pacer[i], np.cos(a), np.sin(a), 0.3]
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    reports = [(PACER + " " if p else "") + f"LV EJECTION FRACTION IS {int(e)}%." for p, e in zip(pacer, ef)]
    reports[1] = "NORMAL RIGHT VENTRICLE."  # no EF sentence: unknown EF label
    videos = emb.mean(1)
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    split = embedder_lib.SplitEmbeddings(
        frames=emb,
        videos=videos,
        patient_id=[f"p{i // 4}" for i in range(n)],
        study_id=[f"s{i // 2}" for i in range(n)],
        study_day=np.asarray([(i // 2) % 2 * 100 for i in range(n)], float),
        report=reports,
        ef=np.full(n, np.nan),
    )
    return split, ef, pacer


def test_compute_metrics_with_an_oracle_model():
    rng = np.random.default_rng(0)
    split, ef, pacer = _oracle_split(rng)
    tasks = task_table.load_tasks(names=["ejection_fraction", "pacemaker"])
    results, curves = sweep.compute_metrics(OracleEmbedder(), split, tasks)
    pm = results["tasks"]["pacemaker"]
    assert pm["n"] == 24 and pm["n_pos"] == int(pacer.sum())
    assert pm["auc"] == 1.0 and pm["f1"] == 1.0
    efr = results["tasks"]["ejection_fraction"]
    assert efr["n"] == 23  # report 1 has no EF sentence
    assert efr["mae"] < 1.5 and efr["mae_repository"] < 1.5 and efr["r2"] > 0.95
    np.testing.assert_allclose(curves["regression"]["ejection_fraction"]["true"], np.delete(ef, 1))
    assert results["retrieval"]["image_to_text"]["num_candidates"] == 24
    assert results["patient_identification"]["n_studies"] == 12
    assert results["patient_identification"]["n_same"] == 6  # 6 patients x 1 pair of studies
    assert set(results["clinical_change"]) == {"pacemaker"}


def test_calibration_split_sets_the_threshold():
    rng = np.random.default_rng(1)
    split, _, _ = _oracle_split(rng)
    calib, _, _ = _oracle_split(rng)
    tasks = task_table.load_tasks(names=["pacemaker"])
    results, _ = sweep.compute_metrics(OracleEmbedder(), split, tasks, calibration=calib)
    assert results["tasks"]["pacemaker"]["threshold_source"] == "calibration"


def _result(name, step, auc):
    return {
        "name": name,
        "step": step,
        "checkpoint": f"orbax:w@{step}",
        "split": "test",
        "tasks": {
            "pacemaker": {"mode": "binary", "auc": auc, "n": 10},
            "ejection_fraction": {"mode": "regression", "mae": 9.5, "r2": None},
        },
        "retrieval": {"image_to_text": {"mean_rank_fraction": 0.3}},
    }


def test_results_summary_and_plots(tmp_path):
    out = str(tmp_path)
    sweep.write_json(os.path.join(out, "200.json"), _result("200", 200, 0.8))
    sweep.write_json(os.path.join(out, "100.json"), _result("100", 100, float("nan")))
    sweep.write_json(os.path.join(out, "final.json"), _result("final", None, 0.9))
    assert not any(p.endswith(".tmp") for p in os.listdir(out))
    assert json.load(open(os.path.join(out, "100.json")))["tasks"]["pacemaker"]["auc"] is None  # NaN -> null
    with open(sweep.write_summary(out)) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["100", "200", "final"]  # by step, unnamed steps last
    assert rows[0]["tasks/pacemaker/auc"] == "" and rows[1]["tasks/pacemaker/auc"] == "0.8"
    assert rows[2]["step"] == "" and rows[2]["retrieval/image_to_text/mean_rank_fraction"] == "0.3"
    path = sweep.plot_metrics_vs_step(out)
    curves = {
        "binary": {"pacemaker": {"labels": np.array([0, 1, 1, 0]), "scores": np.array([0.1, 0.9, 0.6, 0.4])}},
        "regression": {"ejection_fraction": {"true": np.array([30.0, 60.0]), "pred": np.array([35.0, 50.0])}},
        "patient_identification": {"labels": np.array([1, 0]), "scores": np.array([0.9, 0.1])},
    }
    written = sweep.plot_checkpoint(out, "200", curves)
    assert sorted(os.path.basename(p) for p in written) == ["200_ejection_fraction.png", "200_roc.png"]
    for p in [path, *written]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flatten_keeps_numbers_only():
    flat = eval_outputs.flatten({"a": {"b": 1, "c": "x", "d": None, "e": {"f": 2.5}}, "g": True})
    assert flat.keys() == {"a/b", "a/d", "a/e/f"} and math.isnan(flat["a/d"])


def test_bad_checkpoint_spec():
    with pytest.raises(ValueError, match="--checkpoint '/just/a/path': expected KIND:PATH"):
        sweep.list_sources(checkpoint="/just/a/path")


# ------------------------------------------------------------------------- the CLI, end to end


RAGGED = (1, 5, 3, 6, 2, 4)  # frames per video, in turn: real exports have videos of different lengths


def _write_records(out, rng, image_size=64, frames=RAGGED):
    """A tiny record set in the records format (data_prep.records): 2 studies per patient, a pacer appearing in the
    second study of some patients, EF in every report; video i of a split has frames[i % len(frames)]
    frames (an int: all the same)."""

    ids, cycle = [], (frames,) if isinstance(frames, int) else tuple(frames)
    for split, patients in (("train", 6), ("val", 3), ("test", 4)):
        count = 0
        path = os.path.join(out, records.shard_name(split, 0, 1))
        with records.TFRecordWriter(path) as w:
            for p in range(patients):
                for study in range(2):
                    pacer = study == 1 and p % 2 == 0
                    for v in range(2):
                        ef = float(rng.integers(20, 75))
                        jpegs, n_frames = [], cycle[count % len(cycle)]
                        count += 1
                        for _ in range(n_frames):
                            img = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
                            buf = io.BytesIO()
                            Image.fromarray(img).save(buf, format="JPEG")
                            jpegs.append(buf.getvalue())
                        pid, sid = f"{split}patient{p:04d}", f"{split}patient{p:04d}study{study}"
                        ids += [pid, sid]
                        report = (PACER + " " if pacer else "") + f"LV EJECTION FRACTION IS {int(ef)}%. "
                        w.write(
                            records.encode_example(
                                {
                                    "video_id": f"{sid}video{v}".encode(),
                                    "patient_id": pid.encode(),
                                    "study_id": sid.encode(),
                                    "study_day": study * 200,
                                    "frames": jpegs,
                                    "num_frames": n_frames,
                                    "image_size": image_size,
                                    "fps": 30.0,
                                    "report": report.encode(),
                                    "ef": ef,
                                    "source": b"dicom",
                                }
                            )
                        )
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(
            {"source": "dicom", "max_frames": max(cycle), "image_size": image_size, "features": records.SCHEMA}, f
        )
    return ids


def _cli(*args, timeout=600):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


@pytest.mark.slow
def test_sweep_over_three_checkpoints_is_resumable(tmp_path):
    data_dir, workdir, out = tmp_path / "records", tmp_path / "work", tmp_path / "eval"
    data_dir.mkdir()
    ids = _write_records(str(data_dir), np.random.default_rng(0))
    tiny = [
        "--config",
        "configs/tiny.py",
        "--config.batch_size=8",
        "--config.total_steps=3",
        "--config.checkpoint_every_steps=1",
        "--config.keep_checkpoints=5",
        "--config.model.vision.image_size=64",
    ]
    r = _cli("echoclip_jax.train", *tiny, f"--config.data_dir={data_dir}", "--workdir", str(workdir))
    assert r.returncode == 0, r.stderr[-3000:]

    steps = checkpoint.all_steps(str(workdir))
    assert len(steps) == 3, steps
    evaluate_args = [
        "echoclip_jax.evaluate",
        *tiny,
        "--workdir",
        str(workdir),
        "--data_dir",
        str(data_dir),
        "--split",
        "test",
        "--out",
        str(out),
        "--tasks",
        "ef,pacemaker",
        "--batch_size",
        "16",
    ]
    r = _cli(*evaluate_args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluated 3 checkpoint(s), skipped 0" in r.stdout
    results = {s: json.load(open(out / f"{s}.json")) for s in steps}
    for s, res in results.items():
        # ragged videos (1 to 6 frames), no --frames: every frame of every video is evaluated
        assert (
            res["step"] == s
            and res["num_videos"] == 16
            and res["num_frames"] == sum(RAGGED[i % len(RAGGED)] for i in range(16))
        )
        assert res["frames_per_video"]["min"] == 1 and res["frames_per_video"]["max"] == 6
        assert res["tasks"]["ejection_fraction"]["n"] == 16
        assert res["tasks"]["pacemaker"]["n_pos"] == 4  # patients 0 and 2, second study, 2 videos each
        assert 0.0 <= res["tasks"]["pacemaker"]["auc"] <= 1.0
        assert res["retrieval"]["text_to_image"]["num_candidates"] == 16
        assert res["patient_identification"]["n_same"] == 4
        assert res["clinical_change"]["pacemaker"]["n"] == 4
    with open(out / "summary.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == steps
    plots = set(os.listdir(out / "plots"))
    assert {f"{s}_roc.png" for s in steps} | {f"{s}_ejection_fraction.png" for s in steps} <= plots
    assert "metrics_vs_step.png" in plots
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    # Nothing that identifies a patient, study or video reaches the outputs.
    for name in os.listdir(out):
        if name.endswith((".json", ".csv")):
            text = (out / name).read_text()
            assert not any(i in text for i in ids), name
    mtimes = {s: os.path.getmtime(out / f"{s}.json") for s in steps}
    r = _cli(*evaluate_args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluated 0 checkpoint(s), skipped 3" in r.stdout
    assert {s: os.path.getmtime(out / f"{s}.json") for s in steps} == mtimes
    # A sweep cut off before its last checkpoint: the rerun evaluates only that one.
    os.remove(out / f"{steps[-1]}.json")
    r = _cli(*evaluate_args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluated 1 checkpoint(s), skipped 2" in r.stdout
    assert {s: os.path.getmtime(out / f"{s}.json") for s in steps[:-1]} == {s: mtimes[s] for s in steps[:-1]}
    assert json.load(open(out / f"{steps[-1]}.json"))["step"] == steps[-1]
    with open(out / "summary.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == steps


def test_cli_reports_missing_arguments_and_unknown_tasks(tmp_path):
    r = _cli("echoclip_jax.evaluate", "--config", "configs/tiny.py", "--data_dir", str(tmp_path))
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr
    r = _cli(
        "echoclip_jax.evaluate",
        "--config",
        "configs/tiny.py",
        "--data_dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "e"),
        "--workdir",
        str(tmp_path),
        "--tasks",
        "ef,nope",
    )
    assert r.returncode != 0 and "unknown task(s) ['nope']" in r.stderr


def test_ragged_records_evaluate_every_frame_of_every_video(tmp_path, capsys):
    """Records whose videos have 1 to 6 frames, evaluated without --frames (then with --frames 2): the
    split's embeddings keep each video's own frames, the zero-shot figures are the per-video rules applied
    to them, and video embeddings are the mean of each video's frames."""

    data_dir = tmp_path / "records"
    data_dir.mkdir()
    _write_records(str(data_dir), np.random.default_rng(0), image_size=32)
    config = files.load(CONFIGS / "tiny.py")
    config.model.vision.image_size, config.model.vision.depthwise_impl, config.model.embed_dim = 32, "lax", 32
    config.model.text.layers, config.model.text.width, config.model.text.heads = 1, 32, 2
    model = models.build_model(config.model, rngs=nnx.Rngs(0))
    weights_file = tmp_path / "m.safetensors"
    conversion.save(
        f"safetensors:{weights_file}",
        config.model,
        {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))},
    )
    tasks = task_table.load_tasks(names=["ejection_fraction", "pacemaker"])
    sources = sweep.list_sources(checkpoint=f"safetensors:{weights_file}")
    sweep.run(
        config, sources, data_dir=str(data_dir), split="test", out_dir=str(tmp_path / "e"), tasks=tasks, batch_size=8
    )
    res = json.load(open(tmp_path / "e" / "m.json"))
    lengths = [RAGGED[i % len(RAGGED)] for i in range(16)]
    assert res["num_videos"] == 16 and res["num_frames"] == sum(lengths)
    assert res["frames_per_video"] == {"min": 1, "max": 6, "mean": pytest.approx(np.mean(lengths))}

    embedder = embedder_lib.Embedder(
        weights.load_model(f"safetensors:{weights_file}", config.model),
        tokenizers.from_config(config.tokenizer),
        batch_size=8,
    )
    split = embedder_lib.embed_split(embedder, str(data_dir), "test", frames=None, image_size=32)
    assert list(split.lengths) == lengths
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_video = [split.frames[a : a + n] for a, n in zip(starts, lengths)]
    for frames, video in zip(per_video, split.videos):
        mean = frames.mean(0)
        np.testing.assert_allclose(video, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    # EF: the paper's rule per video on its own frames, then the MAE against the records' EF labels
    texts, values = task_table.build_prompts(tasks[0])
    prompts = embedder.texts(texts)
    pred = [zs.predict_regression(zs.similarities(f[None], prompts), values)[0] for f in per_video]
    labels = task_table.task_labels(tasks[0], split.report, {"ef": split.ef})
    assert res["tasks"]["ejection_fraction"]["mae"] == pytest.approx(
        np.mean(np.abs(np.asarray(pred) - labels)), rel=1e-5
    )
    # --frames K for speed: at most K frames of each video
    short = embedder_lib.embed_split(embedder, str(data_dir), "test", frames=2, image_size=32, progress="on")
    assert list(short.lengths) == [min(2, n) for n in lengths]
    bar = capsys.readouterr().err  # a long split shows its progress: counts of the split's videos, and a rate
    assert "embed test" in bar and "16/16" in bar and "video/s" in bar


# ------------------------------------------------------------------------------- study level


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _ragged_split(frames_per_video, study_ids, reports, *, ef=None, patients=None, rng=None):
    """A SplitEmbeddings of ragged videos: frames_per_video[i] is video i's [T_i, D] frames."""
    frames = np.concatenate([_unit(f) for f in frames_per_video]).astype(np.float32)
    videos = np.stack([_unit(_unit(f).mean(0)) for f in frames_per_video]).astype(np.float32)
    n = len(frames_per_video)
    return embedder_lib.SplitEmbeddings(
        frames=frames,
        videos=videos,
        lengths=[len(f) for f in frames_per_video],
        patient_id=patients or [f"patient-{s}" for s in study_ids],
        study_id=list(study_ids),
        study_day=np.zeros(n),
        report=list(reports),
        ef=np.full(n, np.nan) if ef is None else np.asarray(ef),
    )


def test_study_layout_on_a_hand_computed_case():
    """3 studies over 5 ragged videos, interleaved in the split: a study's frames are its videos' frames
    end to end, its embedding the normalised mean of its video embeddings, its report and EF its own."""
    rng = np.random.default_rng(0)
    lengths = [2, 1, 3, 1, 2]
    per_video = [rng.normal(size=(t, 4)) for t in lengths]
    ids = ["b", "a", "b", "c", "a"]  # first seen: b (videos 0, 2), a (1, 4), c (3)
    reports = ["", "REPORT A.", "REPORT B.", "REPORT C.", "REPORT A."]  # video 0 carries no report
    split = _ragged_split(per_video, ids, reports, ef=[np.nan, 40.0, 55.0, np.nan, 41.0])
    st = study_level.Studies(split)
    assert st.num_studies == 3
    np.testing.assert_array_equal(st.video_order, [0, 2, 1, 4, 3])
    np.testing.assert_array_equal(st.lengths, [5, 3, 1])
    np.testing.assert_array_equal(st.videos_per_study, [2, 2, 1])
    # frame rows of the split: video 0 = rows 0-1, 1 = 2, 2 = 3-5, 3 = 6, 4 = 7-8
    np.testing.assert_array_equal(st.frame_index, [0, 1, 3, 4, 5, 2, 7, 8, 6])
    for s, members in enumerate([[0, 2], [1, 4], [3]]):
        expected = _unit(split.videos[members].astype(np.float64).mean(0))
        np.testing.assert_allclose(st.embeddings[s], expected, rtol=1e-6)
    assert st.report == ["REPORT B.", "REPORT A.", "REPORT C."]  # first non-empty report of the study
    np.testing.assert_array_equal(st.ef, [55.0, 40.0, np.nan])
    # binary rule over the study's frames: study b's score is the mean over its 5 frames, not of 2 videos
    sims = rng.uniform(-1, 1, size=(9, 2))
    task = task_table.load_tasks(names=["pacemaker"])[0]
    frame_score = sims.mean(1)
    np.testing.assert_allclose(
        st.binary_scores(task, sims),
        [frame_score[[0, 1, 3, 4, 5]].mean(), frame_score[[2, 7, 8]].mean(), frame_score[6]],
        rtol=1e-12,
    )
    # weighted pool: video weights = softmax(video score / T) within the study, spread over its frames
    weighted = study_level.Studies(split, pool="weighted", temperature=0.1)
    v = np.asarray(
        [
            frame_score[[0, 1]].mean(),
            frame_score[2],
            frame_score[[3, 4, 5]].mean(),
            frame_score[6],
            frame_score[[7, 8]].mean(),
        ]
    )
    w_b = np.exp(v[[0, 2]] / 0.1) / np.exp(v[[0, 2]] / 0.1).sum()
    w_a = np.exp(v[[1, 4]] / 0.1) / np.exp(v[[1, 4]] / 0.1).sum()
    np.testing.assert_allclose(weighted.video_weights(task, sims), [w_b[0], w_a[0], w_b[1], 1.0, w_a[1]])
    np.testing.assert_allclose(weighted.binary_scores(task, sims), [w_b @ v[[0, 2]], w_a @ v[[1, 4]], v[3]])


def _one_view_cohort(rng, studies=12, views=3):
    """Studies of `views` videos; in every second study a pacer lead shows in one view only (a different
    view from study to study), and the report, so every video's label, says it. EF in every report and
    visible in every view."""
    per_video, ids, reports, patients = [], [], [], []
    for s in range(studies):
        pacer, ef = s % 2 == 0, float(rng.integers(25, 70))
        for v in range(views):
            t = 1 + (s + v) % 3
            a = _angle(ef + rng.normal(scale=1.0, size=t))
            shows = pacer and v == s % views
            per_video.append(
                np.stack([0.8 * shows + 0.05 * rng.random(t), np.cos(a), np.sin(a), np.full(t, 0.3)], axis=1)
            )
            ids.append(f"study{s}")
            patients.append(f"patient{s // 2}")
            reports.append((PACER + " " if pacer else "") + f"LV EJECTION FRACTION IS {int(ef)}%.")
    return _ragged_split(per_video, ids, reports, patients=patients)


@pytest.mark.parametrize("pool", ["mean", "weighted"])
def test_study_level_sees_a_finding_that_shows_in_one_view(pool):
    """The lead shows in one of a study's three views: per video, the views without it carry the study's
    positive label and look negative (AUC well below 1); per study, every frame of every view counts, so
    every positive study outscores every negative one."""
    split = _one_view_cohort(np.random.default_rng(0))
    tasks = task_table.load_tasks(names=["ejection_fraction", "pacemaker"])
    results, curves = sweep.compute_metrics(OracleEmbedder(), split, tasks, study_pool=pool)
    video, study = results["tasks"]["pacemaker"], results["study"]["tasks"]["pacemaker"]
    assert video["n"] == 36 and video["n_pos"] == 18 and video["auc"] < 0.8
    assert study["n"] == 12 and study["n_pos"] == 6 and study["auc"] == 1.0 and study["f1"] == 1.0
    assert results["study"]["pool"] == pool and results["study"]["num_studies"] == 12
    assert results["study"]["tasks"]["ejection_fraction"]["mae"] < 1.5
    assert len(curves["study"]["binary"]["pacemaker"]["labels"]) == 12


class TableEmbedder:
    """Text embeddings looked up in a table (retrieval on a hand-built case)."""

    def __init__(self, table):
        self.table = table

    def texts(self, texts):
        return np.asarray([self.table[t] for t in texts], np.float32)


def test_study_retrieval_on_a_known_case():
    """Three studies (two videos each) and their reports. Study embeddings: s0 ~ e0, s1 = (e1 + e2)/sqrt 2,
    s2 ~ e2; reports R0 = e0, R1 ~ e1 + 0.2 e3, R2 = e2. Study to report: s0 -> R0 rank 1; s1 is nearer
    R2 (0.707) than its own R1 (0.693): rank 2; s2 -> R2 rank 1. Report to study: each report's own study
    is its nearest (R2: s2 0.99 > s1 0.707): ranks 1, 1, 1."""
    e = np.eye(4)
    per_video = [e[[0]], e[[0]] + 0.2 * e[[3]], e[[1]] + e[[2]], e[[1]] + e[[2]], e[[2]], e[[2]] + 0.1 * e[[3]]]
    reports = ["R0.", "R0.", "R1.", "R1.", "R2.", "R2."]
    table = {"R0.": e[0], "R1.": _unit(e[1] + 0.2 * e[3]), "R2.": e[2]}
    split = _ragged_split(per_video, ["s0", "s0", "s1", "s1", "s2", "s2"], reports)
    results, _ = sweep.compute_metrics(TableEmbedder(table), split, [], level="study")
    r = results["study"]["retrieval"]
    assert r["image_to_text"]["num_candidates"] == 3
    assert r["image_to_text"]["mean_rank"] == pytest.approx(4 / 3)  # ranks 1, 2, 1
    assert r["image_to_text"]["mean_rank_fraction"] == pytest.approx((1 + 2 + 1) / 9)
    assert r["text_to_image"]["mean_rank"] == 1.0 and r["text_to_image"]["recall@1"] == 1.0
    assert r["image_to_text"]["recall@1"] == pytest.approx(2 / 3)
    pid = results["study"]["patient_identification"]
    assert pid["n_studies"] == 3 and pid["n_same"] == 0  # one study per patient: no same-patient pair
    assert "tasks" not in results and "retrieval" not in results  # --level study: no video block


def test_study_patient_identification_equals_the_video_blocks():
    """metrics.patient_identification already pools videos per study: the study block's figure is the
    same computation on the study embeddings, so the two agree."""
    split = _one_view_cohort(np.random.default_rng(1))
    results, _ = sweep.compute_metrics(OracleEmbedder(), split, task_table.load_tasks(names=["pacemaker"]))
    video, study = results["patient_identification"], results["study"]["patient_identification"]
    assert video["n_studies"] == study["n_studies"] == 12 and video["n_same"] == study["n_same"] == 6
    assert study["auc"] == pytest.approx(video["auc"], abs=1e-12)


def _ids_of(split):
    return sorted(set(split.study_id) | set(split.patient_id))


def test_levels_json_layout_and_no_identifiers(tmp_path, monkeypatch):
    """run() end to end on stand-in embeddings: --level video writes today's keys only; --level both on
    the same directory adds the study block and keeps the video keys bit for bit (and equals a fresh
    --level both); no study or patient id reaches any output; a task without labels gets no panel."""

    split = _one_view_cohort(np.random.default_rng(2))
    monkeypatch.setattr(weights, "load_model", lambda spec, cfg: None)
    monkeypatch.setattr(tokenizers, "from_config", lambda cfg: None)
    monkeypatch.setattr(sweep, "Embedder", lambda model, tok, batch_size: OracleEmbedder())
    monkeypatch.setattr(sweep, "embed_split", lambda *a, **k: split)

    class Config:
        class model:
            class vision:
                image_size = 64

        tokenizer = None

    tasks = task_table.load_tasks(names=["ejection_fraction", "pacemaker", "tavr"])  # no TAVR in any report
    source = [sweep.Source(name="final", step=None, spec="safetensors:x")]
    common = dict(data_dir="unused", split="test", tasks=tasks)
    video_dir, both_dir = tmp_path / "v", tmp_path / "b"
    assert sweep.run(Config, source, out_dir=str(video_dir), level="video", **common) == ["final"]
    only_video = json.load(open(video_dir / "final.json"))
    assert "study" not in only_video and set(sweep.VIDEO_KEYS) <= set(only_video)
    assert sweep.run(Config, source, out_dir=str(video_dir), level="video", **common) == []  # resumable
    assert sweep.run(Config, source, out_dir=str(video_dir), level="both", **common) == ["final"]
    merged = json.load(open(video_dir / "final.json"))
    sweep.run(Config, source, out_dir=str(both_dir), level="both", **common)
    fresh = json.load(open(both_dir / "final.json"))
    for key in sweep.VIDEO_KEYS:
        assert json.dumps(merged[key]) == json.dumps(only_video[key]) == json.dumps(fresh[key]), key
    assert json.dumps(merged["study"]) == json.dumps(fresh["study"])
    study = fresh["study"]
    assert {"tasks", "retrieval", "patient_identification", "num_studies", "clinical_change"} <= set(study)
    assert study["num_studies"] == 12 and study["num_videos"] == 36
    assert study["tasks"]["pacemaker"]["auc"] == 1.0 and study["tasks"]["tavr"]["n_pos"] == 0
    with open(both_dir / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["study/tasks/pacemaker/auc"] == "1" and "tasks/pacemaker/auc" in row
    plots = set(os.listdir(both_dir / "plots"))
    assert {
        "final_roc.png",
        "final_study_roc.png",
        "final_ejection_fraction.png",
        "final_study_ejection_fraction.png",
        "final_levels.png",
    } <= plots
    panels = eval_outputs.level_panels(fresh)
    assert "tavr auc" not in panels and set(panels["pacemaker auc"]) == {"better", "video", "study"}
    assert panels["pacemaker auc"]["study"] > panels["pacemaker auc"]["video"]
    ids = _ids_of(split)
    for d in (video_dir, both_dir):
        for name in os.listdir(d):
            if name.endswith((".json", ".csv")):
                text = (d / name).read_text()
                assert not any(i in text for i in ids), name
        assert not any(i in name for i in ids for name in os.listdir(d / "plots"))
