"""Saliency maps (echoclip_jax.interpret): a planted device is found, the CLI writes what it promises."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_prep import synthetic
from echoclip_jax import models, tokenizers
from echoclip_jax.config import files
from echoclip_jax.data import videos as video_files
from echoclip_jax.data.videos import sector_from_frames
from echoclip_jax.runtime import storage
from echoclip_jax.saliency import maps as saliency_maps
from echoclip_jax.saliency import outputs as saliency_outputs
from echoclip_jax.weights import conversion

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

S = 64  # image size: a 2x2 last-stage map in ConvNeXt-atto
BLOB = 12
DEVICE, NO_DEVICE = "A PACEMAKER LEAD IS SEEN.", "NO DEVICE IS SEEN."
REPO = pathlib.Path(__file__).resolve().parents[2]


def small_config():
    c = files.load(CONFIGS / "tiny.py")
    c.model.vision.image_size = S
    c.model.vision.depthwise_impl = "lax"  # compiles in a fraction of the CPU shifted-sum version's time
    c.model.embed_dim = 32
    c.model.text.layers, c.model.text.width, c.model.text.heads = 1, 32, 2
    return c


def speckle(rng, n, blob_at=None):
    """uint8 [n, S, S, 3] grey speckle of random brightness, optionally with a bright square (the device)."""
    x = rng.uniform(30, 110, size=(n, 1, 1, 1)) * rng.gamma(4.0, 0.25, size=(n, S, S, 1))
    if blob_at is not None:
        y0, x0 = blob_at
        x[:, y0 : y0 + BLOB, x0 : x0 + BLOB] = 250
    return np.repeat(np.clip(x, 0, 255), 3, axis=-1).astype(np.uint8)


def plant_device_detector(model, tokenizer, *, big=100.0, threshold=1.0, gain=4.0):
    """Set the weights so that the image embedding provably moves toward the DEVICE prompt's text
    embedding with the amount of bright (> ~190/255) pixels, and depends on nothing else.

    Channel 0 carries each 4x4 patch's mean normalised brightness u, channel 1 a large constant, which
    makes every LayerNorm an affine map of the small channels. The first block writes
    d = GELU(gain * (u - threshold)) (zero on speckle, positive on the device) to channel 2; every
    other block is switched off (layer scale 0); the downsampling convolutions average d; the head maps
    mean(d) onto the DEVICE text direction and the constant onto an orthogonal one (NO_DEVICE's), so
    cos(image, DEVICE) = m / sqrt(m^2 + 1) with m the pooled d."""
    v = model.visual
    set_ = lambda p, value: (
        p.set_value(jnp.asarray(value, p[...].dtype))
        if hasattr(p, "set_value")
        else p.__setitem__(..., jnp.asarray(value, p[...].dtype))
    )

    def norm_passthrough(ln, channels, keep_constant):
        n = ln.scale[...].shape[0]
        scale, bias = np.zeros(n), np.zeros(n)
        scale[channels] = big / np.sqrt(n - 1)  # undo the normalisation by the constant's spread
        bias[channels] = big / (n - 1)  # and its share of the mean
        if keep_constant:
            bias[1] = big
        set_(ln.scale, scale)
        set_(ln.bias, bias)

    kernel = np.zeros(v.stem_conv.kernel[...].shape)
    kernel[:, :, :, 0] = 1.0 / kernel[:, :, :, 0].size
    set_(v.stem_conv.kernel, kernel)
    set_(v.stem_conv.bias, np.eye(kernel.shape[-1])[1] * big)
    norm_passthrough(v.stem_norm, [0], keep_constant=True)
    for si, stage in enumerate(v.stages):
        if stage.downsample_conv is not None:
            norm_passthrough(stage.downsample_norm, [2], keep_constant=False)
            kernel = np.zeros(stage.downsample_conv.kernel[...].shape)
            kernel[:, :, 2, 2] = 0.25
            set_(stage.downsample_conv.kernel, kernel)
            set_(stage.downsample_conv.bias, np.eye(kernel.shape[-1])[1] * big)
        for bi, block in enumerate(stage.blocks):
            set_(block.gamma, np.zeros(block.gamma[...].shape))
            if si == 0 and bi == 0:
                dw = np.zeros(block.conv_dw.kernel[...].shape)
                dw[3, 3, :] = 1.0
                set_(block.conv_dw.kernel, dw)
                set_(block.conv_dw.bias, np.zeros(dw.shape[-1]))
                norm_passthrough(block.norm, [0], keep_constant=False)
                w1 = np.zeros(block.fc1.kernel[...].shape)
                w1[0, 0] = gain
                set_(block.fc1.kernel, w1)
                set_(block.fc1.bias, -gain * threshold * np.eye(w1.shape[1])[0])
                w2 = np.zeros(block.fc2.kernel[...].shape)
                w2[0, 2] = 1.0
                set_(block.fc2.kernel, w2)
                set_(block.fc2.bias, np.zeros(w2.shape[1]))
                set_(block.gamma, np.eye(w2.shape[1])[2])
    n = v.head_norm.scale[...].shape[0]
    norm_passthrough(v.head_norm, [2], keep_constant=False)
    bias = np.asarray(v.head_norm.bias[...]).copy()
    bias[1] = 1.0
    set_(v.head_norm.bias, bias)
    text = np.asarray(model.encode_text(jnp.asarray(tokenizer.encode([DEVICE, NO_DEVICE]))))
    device = text[0] / np.linalg.norm(text[0])
    other = text[1] - (text[1] @ device) * device
    proj = np.zeros((n, device.shape[0]))
    proj[2], proj[1] = device, other / np.linalg.norm(other)
    set_(v.proj.kernel, proj)
    return model


@pytest.fixture(scope="module")
def planted():
    c = small_config()
    model = models.build_model(c.model, rngs=nnx.Rngs(0))
    tok = tokenizers.from_config(c.tokenizer)
    return c, plant_device_detector(model, tok), tok


@pytest.fixture(scope="module")
def mapper(planted):
    c, model, tok = planted
    return saliency_maps.SaliencyMapper(model, tok, image_size=S, batch_size=8)


def test_forward_features_then_head_is_encode_image():
    c = small_config()
    model = models.build_model(c.model, rngs=nnx.Rngs(1))
    model.eval()
    x = models.preprocess_images(speckle(np.random.default_rng(0), 2, blob_at=(5, 9)))
    feats = model.visual.forward_features(x)
    assert feats.shape == (2, S // 32, S // 32, 320)
    np.testing.assert_allclose(
        np.asarray(models.l2_normalize(model.visual.forward_head(feats))),
        np.asarray(model.encode_image(x)),
        rtol=1e-5,
        atol=1e-6,
    )


POSITIONS = ((8, 34), (44, 6))


def device_video():
    """8 frames: 4 with the device at POSITIONS[0], 4 at POSITIONS[1] (one batch, one compilation)."""
    rng = np.random.default_rng(2)
    return np.concatenate([speckle(rng, 4, blob_at=p) for p in POSITIONS])


def test_planted_model_similarity_depends_on_the_device(mapper):
    rng = np.random.default_rng(1)
    text = mapper.text_embeddings([DEVICE, NO_DEVICE])
    _, with_device = mapper.maps("promptcam", device_video(), text)
    _, without = mapper.maps("promptcam", speckle(rng, 8), text)
    assert with_device[0].min() > without[0].max() + 0.05, (with_device, without)


def assert_highlights_device(mapper, method):
    frames = device_video()
    maps, sims = mapper.maps(method, frames, mapper.text_embeddings([DEVICE, NO_DEVICE]))
    assert maps.shape == (2, 8, S, S) and sims.shape == (2, 8)
    assert np.isfinite(maps).all() and (maps >= 0).all()
    for k in range(len(frames)):
        y0, x0 = POSITIONS[k // 4]
        inside = np.zeros((S, S), bool)
        inside[y0 : y0 + BLOB, x0 : x0 + BLOB] = True
        ratio = maps[0, k][inside].mean() / max(maps[0, k][~inside].mean(), 1e-12)
        assert ratio > 3.0, (method, k, ratio)


@pytest.mark.parametrize("method", saliency_outputs.METHODS)
def test_saliency_highlights_the_planted_device(mapper, method):
    assert_highlights_device(mapper, method)


@pytest.mark.slow
def test_smoothgrad_highlights_the_planted_device(planted):
    _, model, tok = planted
    assert_highlights_device(
        saliency_maps.SaliencyMapper(model, tok, image_size=S, batch_size=8, smoothgrad_samples=4), "gradient"
    )


def test_frames_beyond_one_batch_are_padded_and_kept_in_order(mapper):
    frames = device_video()
    text = mapper.text_embeddings([DEVICE, NO_DEVICE])
    whole, sims = mapper.maps("promptcam", frames, text)
    tail, tail_sims = mapper.maps("promptcam", frames[3:], text)  # 5 frames: padded to the batch of 8
    np.testing.assert_allclose(tail, whole[:, 3:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tail_sims, sims[:, 3:], rtol=1e-5, atol=1e-6)


def test_videos_of_different_lengths_share_batches_and_match_one_by_one(mapper, tmp_path):
    """Ragged videos (1, 5 and 12 frames) mapped together, as run() does: each video's maps and similarities
    equal those of the video mapped alone, and run() writes every frame of each."""
    rng = np.random.default_rng(3)
    videos = [speckle(rng, 1, blob_at=POSITIONS[0]), speckle(rng, 5), device_video()[:4].repeat(3, axis=0)]
    text = mapper.text_embeddings([DEVICE, NO_DEVICE])
    for method in saliency_outputs.METHODS[:1]:
        together = mapper.maps_of_videos(method, videos, text)
        for (maps, sims), frames in zip(together, videos):
            alone, alone_sims = mapper.maps(method, frames, text)
            assert maps.shape == (2, len(frames), S, S)
            np.testing.assert_allclose(maps, alone, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(sims, alone_sims, rtol=1e-5, atol=1e-6)
    named = [video_files.Video(f"v{i}", "npy", v, list(range(len(v)))) for i, v in enumerate(videos)]
    index = saliency_outputs.run(
        mapper, prompts=[DEVICE], out_dir=str(tmp_path), videos=iter(named), methods=("promptcam",)
    )
    assert [v["num_frames"] for v in index] == [1, 5, 12]
    for i, frames in enumerate(videos):
        maps = np.load(tmp_path / f"v{i}" / saliency_outputs.prompt_slug(0, DEVICE) / "promptcam.npy")
        sector = sector_from_frames(frames)  # run() keeps the maps inside the frames' scan sector only
        assert (maps[:, ~sector] == 0).all()
        np.testing.assert_allclose(maps, mapper.maps("promptcam", frames, text)[0][0] * sector, rtol=1e-5, atol=1e-7)


def test_load_video_npy_and_errors(tmp_path):
    video = np.random.default_rng(0).integers(0, 256, size=(10, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "clip one.npy", video)
    v = video_files.load_video(str(tmp_path / "clip one.npy"), image_size=S, frames=4)
    assert v.frames.shape == (4, S, S, 3) and v.frames.dtype == np.uint8
    assert v.frame_indices == [0, 3, 6, 9] and v.name == "clip_one" and v.source == "npy"
    np.save(tmp_path / "float.npy", video.astype(np.float32))
    with pytest.raises(ValueError, match="float.npy.*uint8"):
        video_files.load_video(str(tmp_path / "float.npy"), image_size=S)
    (tmp_path / "x.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="x.mp4.*unsupported"):
        video_files.load_video(str(tmp_path / "x.mp4"), image_size=S)
    with pytest.raises(FileNotFoundError, match="missing.avi"):
        video_files.load_video(str(tmp_path / "missing.avi"), image_size=S)


def test_dicom_is_masked_and_named_without_identifiers(tmp_path):
    synthetic.generate(tmp_path / "cohort", patients=1, seed=0, small=True)
    path = sorted((tmp_path / "cohort" / "dicom").rglob("*.dcm"))[0]
    v = video_files.load_video(str(path), image_size=S, frames=3)
    assert v.frames.shape == (3, S, S, 3) and v.source == "dicom"
    assert v.name.startswith("dicom-") and path.stem not in v.name and "P0000" not in v.name
    assert (v.frames[:, 0, 0] == 0).all()  # outside the sector (where burned-in text sits) is blank


def test_prompt_slug_and_overlay():
    assert saliency_outputs.prompt_slug(3, "Severe AS / 50%!") == "p03-severe-as-50"
    assert saliency_outputs.prompt_slug(0, "???") == "p00"
    frame = np.full((4, 4, 3), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = saliency_outputs.overlay(frame, heat)
    assert (out[1:, :] == 100).all() and (out[0, 1:] == 100).all()  # zero saliency: the frame unchanged
    assert not (out[0, 0] == 100).all()


def test_cli_end_to_end(tmp_path, planted, reference_dir):
    c, model, _ = planted
    weights = tmp_path / "planted.safetensors"
    conversion.save(
        f"safetensors:{weights}", c.model, {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    )
    np.save(tmp_path / "device.npy", np.concatenate([device_video(), speckle(np.random.default_rng(5), 2)]))
    out = tmp_path / "maps"
    cmd = [
        sys.executable,
        "-m",
        "echoclip_jax.interpret",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--checkpoint",
        f"safetensors:{weights}",
        "--video",
        str(tmp_path / "device.npy"),
        "--video",
        str(reference_dir / "example_video.avi"),
        "--frames",
        "3",
        "--prompt",
        DEVICE,
        "--prompt",
        NO_DEVICE,
        "--out",
        str(out),
        "--batch_size",
        "8",
        # --config must agree with the architecture stored beside the weights (weights.load's rule)
        "--config.model.embed_dim=32",
        "--config.model.text.layers=1",
        "--config.model.text.width=32",
        "--config.model.text.heads=2",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert [v["video"] for v in index["videos"]] == ["device", "example_video"]
    for name in ("device", "example_video"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["num_frames"] == 3 and summary["methods"] == ["promptcam", "gradient"]
        assert [p["prompt"] for p in summary["prompts"]] == [DEVICE, NO_DEVICE]
        for entry in summary["prompts"]:
            assert len(entry["similarity"]) == 3
            for method in ("promptcam", "gradient"):
                maps = np.load(out / name / entry["dir"] / f"{method}.npy")
                assert maps.shape == (3, S, S) and maps.dtype == np.float32
                assert entry["maps"][method]["max"] == pytest.approx(float(maps.max()))
                pngs = sorted((out / name / entry["dir"]).glob(f"{method}_*.png"))
                assert len(pngs) == 3
                assert Image.open(pngs[0]).size == (S, S)
    device = json.loads((out / "device" / "summary.json").read_text())
    assert device["frame_indices"] == [0, 4, 9]  # frames 0 and 4 carry the device, 9 does not
    sims = device["prompts"][0]["similarity"]
    assert min(sims[:2]) > sims[2] + 0.05


def test_cli_rejects_bad_arguments(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "echoclip_jax.interpret",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--checkpoint",
        "safetensors:x",
        "--prompt",
        "p",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--video" in result.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "echoclip_jax.interpret", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--prompt" in help_.stdout and "promptcam" in help_.stdout  # absl exits 1 after --help


def test_maps_written_to_a_bucket_equal_those_written_to_local_disk(mapper, tmp_path, bucket):
    """interpret's outputs (maps, overlays, summaries, index) under --out gs://... are the local run's files,
    byte for byte; a --video on the bucket is read as the local file is (same name, same frames)."""
    rng = np.random.default_rng(7)
    frames = np.concatenate([speckle(rng, 2, blob_at=POSITIONS[0]), speckle(rng, 1)])
    np.save(tmp_path / "clip.npy", frames)
    storage.copy(tmp_path / "clip.npy", f"{bucket}/videos/clip.npy")
    out = {}
    sides = ((str(tmp_path / "clip.npy"), str(tmp_path / "maps")), (f"{bucket}/videos/clip.npy", f"{bucket}/maps"))
    for video, root in sides:
        loaded = video_files.load_video(video, image_size=S, frames=0)
        saliency_outputs.run(mapper, prompts=[DEVICE], out_dir=root, videos=[loaded], methods=("promptcam",))
        out[root] = {rel: storage.read_bytes(storage.join(root, rel)) for rel in storage.files_under(root)}
    local, remote = out.values()
    slug = saliency_outputs.prompt_slug(0, DEVICE)
    pngs = [f"clip/{slug}/promptcam_{k:03d}.png" for k in range(3)]
    assert sorted(remote) == sorted(["index.json", "clip/summary.json", f"clip/{slug}/promptcam.npy", *pngs])
    assert remote == local
