"""Saliency maps scored against the truth: the scores on maps with known answers, the device masks mapped
into the records' pixels, earlier-stage PromptCAM, and --score_truth end to end on a tiny cohort."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from data_prep import synthetic
from data_prep.synthetic import truth_by_video_id
from echoclip_jax import models, tokenizers
from echoclip_jax.data import videos
from echoclip_jax.demo import device_masks
from echoclip_jax.saliency import scores as ss
from echoclip_jax.saliency.maps import SaliencyMapper
from echoclip_jax.weights import conversion
from tests.echoclip_jax.test_interpret import S, small_config, speckle

REPO = pathlib.Path(__file__).resolve().parents[3]
SALT = "saliency-test-salt"


def known_case():
    """A 20x20 sector in a 32x32 frame, and a 2x2 device mask in it."""
    sector = np.zeros((32, 32), bool)
    sector[6:26, 6:26] = True
    mask = np.zeros((32, 32), bool)
    mask[10:12, 10:12] = True
    return sector, mask


def test_pointing_and_mass_share_of_maps_with_known_answers():
    sector, mask = known_case()
    target = ss.dilate(mask, 3)
    on = np.zeros((32, 32), np.float32)
    on[10, 10], on[20, 20] = 1.0, 0.5  # the peak on the device, a third of the mass elsewhere
    assert ss.pointing(on, target, sector) == 1.0
    assert ss.mass_share(on, mask, sector) == pytest.approx(2 / 3)
    near = np.zeros((32, 32), np.float32)
    near[10, 14] = 1.0  # 3 px right of the mask's last column: within the tolerance
    assert ss.pointing(near, target, sector) == 1.0 and ss.mass_share(near, mask, sector) == 0.0
    far = np.zeros((32, 32), np.float32)
    far[22, 22], far[10, 10] = 1.0, 0.25
    assert ss.pointing(far, target, sector) == 0.0
    assert ss.mass_share(far, mask, sector) == pytest.approx(0.2)
    outside = far.copy()
    outside[0, 0] = 9.0  # outside the sector: ignored, even as the global maximum
    assert ss.pointing(outside, target, sector) == 0.0 and ss.mass_share(outside, mask, sector) == pytest.approx(0.2)
    assert ss.pointing(np.zeros((32, 32)), target, sector) == 0.0  # no evidence is a miss
    hits, shares = ss.score_frames(np.stack([on, far, on]), np.stack([mask, mask, np.zeros_like(mask)]), sector)
    assert hits == [1.0, 0.0] and len(shares) == 2  # the frame without a device is left out


def test_uniform_baseline_is_the_hit_rate_of_a_random_sector_pixel():
    sector, mask = known_case()
    # the 2x2 mask dilated by a radius-3 disk: the pixels within 3 px (Euclidean) of a mask pixel; rows 7..14
    # hold 2, 6, 6, 8, 8, 6, 6, 2 of them
    dilated = ss.dilate(mask, 3)
    yy, xx = np.mgrid[:32, :32]
    near = np.zeros((32, 32), bool)
    for y, x in zip(*np.nonzero(mask)):
        near |= (yy - y) ** 2 + (xx - x) ** 2 <= 9
    assert (dilated == near).all() and dilated.sum() == 2 + 6 + 6 + 8 + 8 + 6 + 6 + 2
    hits, shares = ss.score_frames(ss.uniform_map(sector)[None], mask[None], sector)
    assert hits == [pytest.approx(44 / 400)] and shares == [pytest.approx(4 / 400)]
    centre = ss.centre_map(sector)
    assert np.unravel_index(np.argmax(centre), centre.shape) in ((15, 15), (15, 16), (16, 15), (16, 16))
    assert (centre[~sector] == 0).all()
    assert ss.score_frames(centre[None], mask[None], sector)[0] == [0.0]  # the centre is 4 px from the mask


def test_parse_methods():
    got = ss.parse_methods("promptcam, promptcam:1,gradient,smoothgrad:4")
    assert got == [
        ("promptcam:last", "promptcam", {"cam_stage": "last"}),
        ("promptcam:1", "promptcam", {"cam_stage": "1"}),
        ("gradient", "gradient", {"smoothgrad_samples": 0}),
        ("smoothgrad:4", "gradient", {"smoothgrad_samples": 4}),
    ]
    for bad in ("smoothgrad", "gradcam", "gradient:2", ""):
        with pytest.raises(ValueError):
            ss.parse_methods(bad)


def test_device_prompts_are_the_zero_shot_sentences():
    prompts = device_masks.device_prompts()
    assert prompts["pacemaker"][0] == "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."
    assert prompts["tavr"][0].startswith("A BIOPROSTHETIC STENT-VALVE")
    assert prompts["mitraclip"][1].startswith("ONE MITRACLIP") and prompts["mitraclip"][2].startswith("TWO")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small version-2 cohort converted as the demo converts it (64 px, 8 frames)."""

    root = tmp_path_factory.mktemp("v2")
    synthetic.generate(root / "cohort", patients=8, seed=3, small=True, version=2)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.convert",
            "--dicom_dir",
            str(root / "cohort" / "dicom"),
            "--reports",
            str(root / "cohort" / "reports.csv"),
            "--out",
            str(root / "records"),
            "--salt",
            SALT,
            "--image_size",
            str(S),
            "--frames",
            "8",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (root / "salt").write_text(SALT)
    return root


def all_cases(cohort, frames=0):
    truth = truth_by_video_id(cohort / "cohort", SALT)
    return [
        c
        for split in ("train", "val", "test")
        for c in device_masks.device_cases(
            str(cohort / "records"),
            split,
            truth,
            cohort_dir=str(cohort / "cohort"),
            image_size=S,
            frames=frames,
            limit=0,
        )
    ]


def test_device_mask_lines_up_with_the_bright_device_pixels(cohort):
    cases = all_cases(cohort)
    assert len({c[0] for c in cases}) >= 2 and len(cases) >= 4, [c[0] for c in cases]
    for device, row, frames, masks, sector in cases:
        grey = frames.max(-1).astype(float)
        assert masks.any(axis=(1, 2)).all(), device
        inside, rest = grey[masks].mean(), grey[~masks & sector[None]].mean()
        assert inside > 2 * rest and inside > rest + 80, (device, inside, rest)  # the device is bright
        for dy, dx in ((0, 3), (0, -3), (3, 0), (-3, 0)):  # the mask moved by 3 px: the pixels it newly
            shifted = np.roll(masks, (dy, dx), axis=(1, 2)) & ~masks  # covers are darker (a lead moved
            if shifted.sum() >= 4:  # along itself newly covers only its ends)
                assert grey[shifted].mean() < inside - 25, (device, dy, dx)
        assert not (masks & ~sector[None]).any()
        found = videos.sector_from_frames(frames)
        assert (found & sector).sum() / (found | sector).sum() > 0.93  # the frames' sector = data_prep's


@pytest.fixture(scope="module")
def tiny_mapper():
    c = small_config()
    model = models.build_model(c.model, rngs=nnx.Rngs(0))
    return c, model, SaliencyMapper(model, tokenizers.from_config(c.tokenizer), image_size=S, batch_size=8)


def test_earlier_stage_cam_has_the_stage_resolution(tiny_mapper):
    _, _, mapper = tiny_mapper
    frames = speckle(np.random.default_rng(0), 3, blob_at=(20, 20))
    text = mapper.text_embeddings(["A PACEMAKER LEAD IS SEEN."])
    for stage, side in (("last", 2), ("2", 4), ("1", 8), ("0", 16)):
        grid, sims = mapper.maps("promptcam", frames, text, cam_stage=stage, grid=True)
        assert grid.shape == (1, 3, side, side) and mapper.cam_grid_size(stage) == side
        full, full_sims = mapper.maps("promptcam", frames, text, cam_stage=stage)
        assert full.shape == (1, 3, S, S)
        np.testing.assert_allclose(sims, full_sims, rtol=1e-5, atol=1e-6)
        block = full[0, :, S // side // 2 - 1 :: S // side, S // side // 2 - 1 :: S // side] if side < S else full[0]
        assert block.shape == grid[0].shape  # the upsampled map follows the grid's values
        assert np.corrcoef(block.ravel(), grid[0].ravel())[0, 1] > 0.9 or grid.std() == 0
    with pytest.raises(ValueError, match="stage 4"):
        mapper.maps("promptcam", frames, text, cam_stage=4)


def test_cli_scores_a_tiny_cohort_end_to_end(cohort, tiny_mapper, tmp_path):
    c, model, _ = tiny_mapper
    weights = tmp_path / "tiny.safetensors"
    conversion.save(
        f"safetensors:{weights}", c.model, {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    )
    arch = [
        "--config.model.embed_dim=32",
        "--config.model.text.layers=1",
        "--config.model.text.width=32",
        "--config.model.text.heads=2",
        f"--config.model.vision.image_size={S}",
    ]
    base = [
        sys.executable,
        "-m",
        "echoclip_jax.interpret",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--checkpoint",
        f"safetensors:{weights}",
        "--data_dir",
        str(cohort / "records"),
        "--split",
        "train",
        "--frames",
        "3",
        "--batch_size",
        "8",
        *arch,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "scores"
    result = subprocess.run(
        base
        + [
            "--score_truth",
            str(cohort / "cohort"),
            "--salt_file",
            str(cohort / "salt"),
            "--limit",
            "3",
            "--score_methods",
            "promptcam:1,gradient,smoothgrad:2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["methods"]) == {"promptcam:1", "gradient", "smoothgrad:2", "uniform", "centre"}
    assert scores["cam_grid"] == {"promptcam:1": 8} and scores["tolerance_px"] == 3
    pooled = {m: v["all"] for m, v in scores["methods"].items()}
    assert len({(v["videos"], v["frames"]) for v in pooled.values()}) == 1  # the same frames for all
    assert pooled["uniform"]["videos"] == 3 and 0 < pooled["uniform"]["frames"] <= 3 * 3 * 2
    for v in pooled.values():
        assert 0 <= v["pointing_game"] <= 1 and 0 <= v["mass_share"] <= 1
    assert pooled["uniform"]["pointing_game"] > pooled["uniform"]["mass_share"]  # dilated vs exact mask
    assert (out / "score_frames.png").stat().st_size > 5000
    text = (out / "scores.json").read_text() + result.stdout
    for vid, row in truth_by_video_id(cohort / "cohort", SALT).items():
        assert vid not in text and row["patient"] not in text and row["path"] not in text

    maps_out = tmp_path / "maps"  # plain maps of records: every map zero outside the sector
    result = subprocess.run(
        base + ["--limit", "2", "--cam_stage", "1", "--prompt", "PACER LEAD.", "--out", str(maps_out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((maps_out / "index.json").read_text())
    for entry in index["videos"]:
        summary = json.loads((maps_out / entry["video"] / "summary.json").read_text())
        assert summary["cam_stage"] == {"stage": 1, "grid": 8} and len(summary["frame_indices"]) == 3
        frames = np.stack(
            [
                np.asarray(__import__("PIL.Image").Image.open(p))
                for p in sorted((maps_out / entry["video"] / summary["prompts"][0]["dir"]).glob("promptcam_*.png"))
            ]
        )
        sector = videos.sector_from_frames(frames)
        for method in ("promptcam", "gradient"):
            maps = np.load(maps_out / entry["video"] / summary["prompts"][0]["dir"] / f"{method}.npy")
            assert maps.shape == (3, S, S) and maps.max() > 0
            assert (maps[:, ~sector] == 0).all() and summary["sector_pixels"] < S * S * 0.8
