"""The paper's configs through every job, as a user runs them: each stage is the README's CLI in its own process.

configs/echoclip.py and configs/echoclip_r.py as shipped (ConvNeXt-Base at 224, CLIP text tower, bfloat16
compute, drop path, fsdp), with only the batch size and step counts changed: a few-patient synthetic cohort
converted at 224 with videos of different lengths -> train 3 steps, SIGTERM after the first and resume ->
sweep evaluation of every checkpoint (no --frames) -> export to open_clip, loaded by
`open_clip.create_model_and_transforms("local-dir:...")` with embeddings equal to ours in float32 ->
`embed` (frames, a video, texts) -> `interpret` on the records and on a real vendor's ultrasound DICOM.
EchoCLIP-R's journey keeps its records, workdir and evaluation in a bucket (gs://, a real GCS server on
127.0.0.1), as on a pod slice; EchoCLIP's on local disk.
"""

import csv
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from data_prep import records
from echoclip_jax import tokenizers
from echoclip_jax.config import files
from echoclip_jax.data.loader import iterate_videos
from echoclip_jax.runtime import storage

from .conftest import REPO, read_metrics, xla_flags

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

TEMPLATE_VOCAB = os.path.join(REPO, "..", "shared", "echoclip_reference", "template_vocab.txt")
SCALE = [
    "--config.batch_size=8",
    "--config.total_steps=3",
    "--config.checkpoint_every_steps=1",
    "--config.log_every_steps=1",
    "--config.eval_batches=1",
]


def _env() -> dict:
    """Read at call time: the session's compilation cache (conftest) is in os.environ by then, so the resumed
    run and the later jobs reuse the programs the first run compiled."""
    return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags(2)}


def _cli(*args, timeout=1500):
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{' '.join(args[:1])} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 patients converted at 224 with up to 18 frames each: the videos keep 16-18 frames, as in an export."""
    root = tmp_path_factory.mktemp("journey")
    _cli("data_prep.synthetic", "--out", str(root / "syn"), "--patients", "4", "--seed", "1", "--small")
    _cli(
        "data_prep.convert",
        "--dicom_dir",
        str(root / "syn" / "dicom"),
        "--reports",
        str(root / "syn" / "reports.csv"),
        "--out",
        str(root / "rec"),
        "--salt",
        "journey-salt",
        "--frames",
        "18",
        "--image_size",
        "224",
        "--split_fractions",
        "0.5,0.5,0.0",
        "--shard_size",
        "8",
    )
    lengths = [
        records.decode_example(raw)["num_frames"][0]
        for shard in records.list_shards(str(root / "rec"), "val")
        for raw in records.ShardReader(shard)
    ]
    assert len(set(lengths)) > 1, f"the val split's videos must differ in length, got {lengths}"
    return root


def _logged(work) -> bool:
    """Whether the run has logged a step (metrics.jsonl holds a row)."""
    try:
        return bool(read_metrics(work))
    except (FileNotFoundError, ValueError):
        return False


def _first_video(rec_dir: str) -> np.ndarray:
    """The first val video's frames, uint8 [K, 224, 224, 3]."""
    return next(iterate_videos(rec_dir, "val"))["frames"]


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("name", ["echoclip", "echoclip_r"])
def test_paper_config_through_every_job(name, cohort, tmp_path, request):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    started = time.time()
    config = ["--config", os.path.join(REPO, "configs", f"{name}.py")]
    if name == "echoclip":  # the recipe starts from open_clip's convnext_base (random weights here)
        torch.manual_seed(0)
        laion = open_clip.create_model("convnext_base", pretrained=None)
        torch.save(laion.state_dict(), tmp_path / "laion.bin")
        config.append(f"--config.init.path={tmp_path / 'laion.bin'}")
        del laion
    else:  # EchoCLIP-R's template tokenizer, pointed at its vocabulary file
        config.append(f"--config.tokenizer.path={TEMPLATE_VOCAB}")
    rec, work, eval_out = str(cohort / "rec"), str(tmp_path / "work"), str(tmp_path / "eval")
    if name == "echoclip_r":  # the pod's layout: records, workdir and evaluation in a bucket
        bucket = request.getfixturevalue("bucket")
        storage.copytree(rec, f"{bucket}/rec")
        rec, work, eval_out = f"{bucket}/rec", f"{bucket}/work", f"{bucket}/eval"

    # train; SIGTERM once step 1 is logged: it saves and exits 0; the same command resumes to step 3
    train = [
        sys.executable,
        "-m",
        "echoclip_jax.train",
        *config,
        *SCALE,
        f"--config.data_dir={rec}",
        "--workdir",
        str(work),
    ]
    proc = subprocess.Popen(train, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 1500
        while not _logged(work) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=900)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "preempted: saved step" in out, out[-4000:]
    stopped = read_metrics(work)[-1]["step"]
    r = subprocess.run(train, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(work)
    assert stopped < 3 and [m["step"] for m in rows] == list(range(1, 4))
    assert all(np.isfinite(m["loss"]) for m in rows)

    # sweep evaluation over every checkpoint of the run, videos of different lengths, no --frames
    evaluate = [
        "echoclip_jax.evaluate",
        *config,
        *SCALE,
        "--workdir",
        str(work),
        "--data_dir",
        rec,
        "--split",
        "val",
        "--out",
        eval_out,
        "--batch_size",
        "16",
    ]
    _cli(*evaluate)
    summary = list(csv.DictReader(io.StringIO(storage.read_text(f"{eval_out}/summary.csv"))))
    assert len(summary) == 3, summary  # every checkpoint kept by the run
    result = storage.load_json(f"{eval_out}/{summary[-1]['name']}.json")
    assert np.isfinite(result["retrieval"]["image_to_text"]["mean_rank_fraction"])
    assert "evaluated 0 checkpoint(s), skipped 3" in _cli(*evaluate).stdout  # a rerun skips what is done

    # export to open_clip; open_clip loads it and computes our embeddings (float32 on both sides)
    oc_dir = tmp_path / "open_clip"
    r = _cli("echoclip_jax.convert", *config, "--src", f"orbax:{work}", "--dst", f"open_clip:{oc_dir}")
    assert "verified" in r.stdout
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    model.eval()
    video = _first_video(rec)
    frames = video[:3]
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "video.npy", video[None])
    texts = [
        "LV EJECTION FRACTION IS 35%.",
        "NORMAL LEFT VENTRICULAR SIZE.",
        "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.",
    ]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    ours = {}
    for kind, source in (("frames", "--images"), ("video", "--images"), ("texts", "--texts")):
        path = tmp_path / (f"{kind}.txt" if kind == "texts" else f"{kind}.npy")
        _cli(
            "echoclip_jax.embed",
            *config,
            "--config.model.dtype=float32",
            "--checkpoint",
            f"orbax:{work}",
            source,
            str(path),
            "--out",
            str(tmp_path / f"{kind}_emb.npy"),
        )
        ours[kind] = np.load(tmp_path / f"{kind}_emb.npy")
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255 - mean) / std

    cfg = files.load(CONFIGS / f"{name}.py")
    if name == "echoclip_r":
        cfg.tokenizer.path = TEMPLATE_VOCAB
    ids = torch.from_numpy(tokenizers.from_config(cfg.tokenizer).encode(texts).astype(np.int64))
    with torch.no_grad():
        theirs_img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        theirs_txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1).numpy()
    np.testing.assert_allclose(ours["frames"], theirs_img[:3], atol=2e-4)
    np.testing.assert_allclose(ours["texts"], theirs_txt, atol=2e-4)
    video_mean = theirs_img.mean(0)  # EchoCLIP's video embedding: the mean of the normalised frame embeddings
    np.testing.assert_allclose(ours["video"][0], video_mean / np.linalg.norm(video_mean), atol=2e-4)

    # interpret: the records (ragged, no --frames) and a real vendor's multi-frame ultrasound DICOM

    maps = tmp_path / "maps"
    _cli(
        "echoclip_jax.interpret",
        *config,
        "--checkpoint",
        f"open_clip:{oc_dir}",
        "--data_dir",
        rec,
        "--split",
        "val",
        "--limit",
        "2",
        "--prompt",
        "pacemaker",
        "--out",
        str(maps),
        "--batch_size",
        "8",
    )
    _cli(
        "echoclip_jax.interpret",
        *config,
        "--checkpoint",
        f"open_clip:{oc_dir}",
        "--video",
        get_testdata_file("color3d_jpeg_baseline.dcm"),
        "--frames",
        "4",
        "--prompt",
        "pacemaker",
        "--out",
        str(tmp_path / "maps_dicom"),
        "--batch_size",
        "8",
    )
    for root in (maps, tmp_path / "maps_dicom"):
        index = json.loads((root / "index.json").read_text())
        assert index and all(os.path.exists(root / v) for v in os.listdir(root) if v != "index.json")
    print(f"{name}: journey took {time.time() - started:.0f} s")
