"""One video's frames: echogenicity of the beating heart and its devices, speckle, attenuation, and the
overlays outside the sector, with the per-video truth (geometry in pixels)."""

from __future__ import annotations

import math

import numpy as np

from data_prep.synthetic.cohort import FULL, SMALL, VideoSpec, lv_scale
from data_prep.synthetic.devices import device_mask
from data_prep.synthetic.geometry import (
    Heart,
    ellipse,
    make_geometry,
    make_heart,
    myocardial_thickness,
    volume_fraction,
)
from data_prep.synthetic.overlays import draw_overlay


def echogenicity(u, v, heart: Heart, f: float, phase: float, spec: VideoSpec):
    """(mean echo brightness 0 blood .. 1 bright, device mask) at sector coordinates (u, v) for the
    LV cavity at `f` times its end-diastolic area."""
    e = 0.30 + 0.12 * np.exp(-v / 0.06) + 0.05 * np.sin(7 * u + 3 * v)  # tissue + near-field clutter
    # Pericardium: a bright rim around the heart.
    r_peri = ellipse(u, v, 0.0, 0.55, 0.44, 0.47, 0.0)
    e = np.where(np.abs(np.sqrt(r_peri) - 1) < 0.045, 0.6, e)
    atrial = math.sqrt(1 + 0.25 * (1 - f))  # atria fill while the ventricles empty
    aa, ab = heart.atrium_ab[0] * atrial, heart.atrium_ab[1] * atrial
    rv = math.sqrt(1 - 0.6 * (1 - f))
    for (cu, cv), (a, b), ang in (
        (heart.ra_c, (aa, ab), 0.0),
        (heart.la_c, (aa, ab), heart.lv_axis),
        (heart.rv_c, (heart.rv_ab[0] * rv, heart.rv_ab[1] * rv), math.atan2(heart.rv_c[0], heart.rv_c[1])),
    ):
        e = np.where(ellipse(u, v, cu, cv, a + 0.03, b + 0.03, ang) <= 1, 0.6, e)
        e = np.where(ellipse(u, v, cu, cv, a, b, ang) <= 1, 0.05, e)
    # LV territory: tissue out to its ED epicardium, so no other chamber shows where the LV shrank.
    cu, cv = heart.lv_c
    ed_out = (heart.lv_a + heart.wall, heart.lv_b + heart.wall)
    e = np.where(ellipse(u, v, cu, cv, ed_out[0] * 1.04, ed_out[1] * 1.04, heart.lv_axis) <= 1, 0.40, e)
    k = math.sqrt(f)
    a, b = heart.lv_a * k, heart.lv_b * k
    t = float(myocardial_thickness(a, b, heart))
    e = np.where(ellipse(u, v, cu, cv, a + t, b + t, heart.lv_axis) <= 1, 0.65, e)
    e = np.where(ellipse(u, v, cu, cv, a, b, heart.lv_axis) <= 1, 0.045, e)
    return e, device_mask(u, v, heart, b + t, phase, spec)


def box_blur(x: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """Separable mean filter with edge padding (cumulative sums: cheap at any kernel size)."""
    for axis, k in ((0, ky), (1, kx)):
        if k <= 1:
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (k // 2 + 1, k - 1 - k // 2)
        cs = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
        hi = np.take(cs, np.arange(k, cs.shape[axis]), axis=axis)
        lo = np.take(cs, np.arange(0, cs.shape[axis] - k), axis=axis)
        x = (hi - lo) / k
    return x


def fan_pixels(geo, layout):
    """(u, v, fan_box, fan): the sector's bounding box in apex-centred units of its radius (u across, v down
    the beam), the fan inside that box, and the fan as a full-frame mask."""
    x0, y0, x1, y1 = geo.bbox
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    u, v = (xx - geo.apex_x) / geo.radius, (yy - geo.apex_y) / geo.radius
    r, ang = np.hypot(u, v), np.arctan2(u, v)
    fan_box = (r <= 1.0) & (np.abs(ang) <= geo.half_angle)
    fan = np.zeros((layout.rows, layout.cols), bool)
    fan[y0 : y1 + 1, x0 : x1 + 1] = fan_box
    return u, v, fan_box, fan


def paint_frame(frame, img, fan_box, bbox, overlay, overlay_mask, cursor_rows, cursor: int) -> None:
    """Writes one frame in place: the echo image `img` (grey levels, the sector's bounding box) inside the
    fan, black around it, then the burned-in overlay and the ECG sweep's cursor column."""
    x0, y0, x1, y1 = bbox
    frame[y0 : y1 + 1, x0 : x1 + 1] = np.where(fan_box, np.clip(img, 0, 255), 0).astype(np.uint8)[..., None]
    frame[overlay_mask] = overlay[overlay_mask]
    frame[cursor_rows, cursor] = (255, 255, 255)


def geometry_truth(geo, heart) -> dict:
    """The truth file's geometry columns, in pixels: the sector (apex, radius, half-angle, bounding box,
    depth) and the LV's end-diastolic cavity ellipse (centre, semi-axes, axis angle)."""
    x0, y0, x1, y1 = geo.bbox
    return dict(
        sector_apex_x=round(geo.apex_x, 2),
        sector_apex_y=round(geo.apex_y, 2),
        sector_radius=round(geo.radius, 2),
        sector_half_angle_deg=round(math.degrees(geo.half_angle), 2),
        sector_x0=x0,
        sector_y0=y0,
        sector_x1=x1,
        sector_y1=y1,
        depth_cm=round(geo.depth_cm, 3),
        lv_center_x=round(geo.apex_x + heart.lv_c[0] * geo.radius, 2),
        lv_center_y=round(geo.apex_y + heart.lv_c[1] * geo.radius, 2),
        lv_ed_semi_across_px=round(heart.lv_a * geo.radius, 2),
        lv_ed_semi_along_px=round(heart.lv_b * geo.radius, 2),
        lv_axis_deg=round(math.degrees(heart.lv_axis), 3),
    )


def render_video(spec: VideoSpec) -> tuple[np.ndarray, dict]:
    """Frames (T, H, W, 3) uint8 RGB and the per-video truth (geometry in pixels)."""
    layout = SMALL if spec.small else FULL
    rng = np.random.default_rng(list(spec.seed))
    geo = make_geometry(rng, layout)
    heart = make_heart(rng, lv_scale(spec.ef))
    gain = float(rng.uniform(0.85, 1.15))
    phase0 = float(rng.uniform(0, 1))
    u, v, fan_box, fan = fan_pixels(geo, layout)
    overlay, sweep_s = draw_overlay(spec, layout, geo, fan, phase0)
    overlay_mask = overlay.any(-1)
    ecg_cursor_rows = slice(layout.rows - layout.ecg, layout.rows)
    depth_gain = (1.0 - 0.25 * v) * gain  # attenuation, partly compensated
    frames = np.zeros((spec.frames, layout.rows, layout.cols, 3), np.uint8)
    for i in range(spec.frames):
        t = i * spec.frame_time_ms / 1000.0
        phase = phase0 + t * spec.heart_rate / 60.0
        f = float(volume_fraction(np.array(phase), spec.ef / 100.0))
        e, device = echogenicity(u, v, heart, f, float(np.mod(phase, 1.0)), spec)
        speckle = 0.45 + 0.55 * rng.rayleigh(math.sqrt(2 / math.pi), size=e.shape)
        img = box_blur(e * speckle * depth_gain * 255.0, *layout.speckle_blur)
        img += rng.normal(0, 2.0, size=img.shape)
        img[device] = 250.0 + rng.normal(0, 3.0, size=int(device.sum()))
        paint_frame(
            frames[i],
            img,
            fan_box,
            geo.bbox,
            overlay,
            overlay_mask,
            ecg_cursor_rows,
            int((t % sweep_s) / sweep_s * layout.cols),
        )
    truth = geometry_truth(geo, heart)
    return frames, truth
