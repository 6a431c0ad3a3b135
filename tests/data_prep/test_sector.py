"""Sector masking on synthetic videos whose true fan geometry is known (data_prep.synthetic's truth)."""

import math

import numpy as np
import pytest
from PIL import Image

from data_prep import sector, synthetic


def _video(has_regions, small=True):
    specs, _, _ = synthetic.plan_cohort(2, seed=3, small=small)
    spec = next(s for s in specs if s.has_regions == has_regions)
    frames, truth = synthetic.render_video(spec)
    yy, xx = np.mgrid[: frames.shape[1], : frames.shape[2]]
    u, v = xx - truth["sector_apex_x"], yy - truth["sector_apex_y"]
    fan = (np.hypot(u, v) <= truth["sector_radius"] + 0.5) & (
        np.abs(np.arctan2(u, v)) <= math.radians(truth["sector_half_angle_deg"]) + 0.01
    )
    box = (truth["sector_x0"], truth["sector_y0"], truth["sector_x1"], truth["sector_y1"])
    return frames, fan, box


@pytest.mark.parametrize("small", [True, False], ids=["160x208", "600x800-subsampled-search"])
@pytest.mark.parametrize("with_regions", [True, False])
def test_mask_is_the_fan_and_nothing_else(with_regions, small):
    frames, fan, box = _video(True, small)
    mask = sector.sector_mask(frames[::2], [box] if with_regions else ())
    assert not (mask & ~fan).any()  # burned-in text, probe label, depth ticks, ECG: all outside
    assert mask.sum() >= 0.9 * fan.sum()


def test_prepare_blanks_text_and_ecg_and_fills_the_square():
    frames, fan, box = _video(False)
    out = sector.prepare(frames, (), image_size=64)
    assert out.shape == (len(frames), 64, 64, 3) and out.dtype == np.uint8
    green = out[..., 1].astype(int) - out[..., 0].astype(int)
    assert green.max() < 40  # the green ECG trace is gone
    assert out[:, :2].max() == 0  # the rows above the apex (where the name/id/date were) are black
    assert out[:, 40:, 20:44].mean() > 20  # the fan fills the crop


def test_crop_resize_matches_a_plain_masked_resize():
    """The fast path (contiguous multiply, reduce + bilinear) against masking with np.where and resizing."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)
    mask = np.zeros((90, 120), bool)
    mask[10:80, 30:100] = True
    mask[40, 20:30] = True
    out = sector.crop_resize(frames, mask, 32)
    top, left, side = sector.square_box(mask)
    assert (top, left, side) == (5, 20, 80)  # rows 10..79, cols 20..99: an 80 square centred on them
    padded = np.zeros((3, 110, 140, 3), np.uint8)
    padded[:, 10:100, 10:130] = np.where(mask[..., None], frames, 0)
    crop = padded[:, top + 10 : top + 10 + side, left + 10 : left + 10 + side]
    for i in range(3):
        ref = np.asarray(Image.fromarray(crop[i]).reduce(2).resize((32, 32), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(out[i], ref)


def test_grey_frames_give_what_their_rgb_repeat_gives():
    """The pipeline keeps monochrome videos one channel until the output: same mask, same pixels."""
    frames, _, box = _video(True)
    grey = frames.max(axis=-1, keepdims=True)
    rgb = np.repeat(grey, 3, axis=-1)
    for regions in ([box], ()):
        mask = sector.sector_mask(grey, regions)
        np.testing.assert_array_equal(mask, sector.sector_mask(rgb, regions))
        for size in (48, sector.square_box(mask)[2]):  # resized, and a crop already at the size
            out = sector.crop_resize(grey, mask, size)
            assert out.shape == (len(frames), size, size, 3)
            np.testing.assert_array_equal(out, sector.crop_resize(rgb, mask, size))


def test_static_video_falls_back_to_region_rectangle():
    frames, _, box = _video(True)
    still = np.repeat(frames[:1], 3, axis=0)
    mask = sector.sector_mask(still, [box])
    x0, y0, x1, y1 = box
    assert mask.sum() == (x1 - x0 + 1) * (y1 - y0 + 1)
