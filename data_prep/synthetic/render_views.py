"""Cohort version 2's frames: one standard view (data_prep.synthetic.views) per video, with the LV beating to
its known EF and the devices this view shows drawn from exact pixel shapes (device_shapes), which come back
as truth. Tissue, speckle, attenuation and the overlays are version 1's (render.py); the view's name is
never burned in (the probe label is the same on every view)."""

from __future__ import annotations

import math

import numpy as np

from data_prep.synthetic.cohort import FULL, SMALL, VideoSpec, lv_scale
from data_prep.synthetic.device_shapes import frame_shapes, rasterize, visible_devices
from data_prep.synthetic.geometry import ellipse, myocardial_thickness, volume_fraction
from data_prep.synthetic.overlays import draw_overlay
from data_prep.synthetic.render import box_blur, fan_pixels, geometry_truth, paint_frame
from data_prep.synthetic.views import PROBE_LABEL, Scene, make_scene, make_view_geometry

_MOTION = {
    "ventricle": lambda f: math.sqrt(1 - 0.6 * (1 - f)),
    "atrium": lambda f: math.sqrt(1 + 0.25 * (1 - f)),
    "static": lambda f: 1.0,
}


def scene_echogenicity(u, v, scene: Scene, f: float) -> tuple[np.ndarray, float]:
    """(mean echo brightness 0 blood .. 1 bright, the LV base's distance from its centre) at sector
    coordinates (u, v), the LV cavity at `f` times its end-diastolic area. Tissue stays below the
    devices' near-saturated metal."""
    e = 0.30 + 0.12 * np.exp(-v / 0.06) + 0.05 * np.sin(7 * u + 3 * v)  # tissue + near-field clutter
    if scene.liver:  # echogenic, coarse liver parenchyma above the diaphragm
        liver = ellipse(u, v, 0.0, 0.0, *scene.rims[0][1], 0.0) < 1
        e = np.where(liver, 0.42 + 0.07 * np.sin(17 * u + 11 * v) * np.cos(9 * v - 5 * u), e)
    for (cu, cv), (a, b), ang, half in scene.rims:  # pericardium, diaphragm: bright rims (half: of radius 1)
        e = np.where(np.abs(np.sqrt(ellipse(u, v, cu, cv, a, b, ang)) - 1) < half, 0.6, e)
    for ch in scene.chambers:
        k = _MOTION[ch.motion](f)
        (cu, cv), a, b = ch.c, ch.ab[0] * k, ch.ab[1] * k
        e = np.where(ellipse(u, v, cu, cv, a + 0.03, b + 0.03, ch.angle) <= 1, 0.6, e)
        e = np.where(ellipse(u, v, cu, cv, a, b, ch.angle) <= 1, 0.05, e)
    h = scene.heart  # LV territory: tissue out to its ED epicardium, so no other chamber shows where it shrank
    cu, cv = h.lv_c
    e = np.where(ellipse(u, v, cu, cv, (h.lv_a + h.wall) * 1.04, (h.lv_b + h.wall) * 1.04, h.lv_axis) <= 1, 0.40, e)
    k = math.sqrt(f)
    a, b = h.lv_a * k, h.lv_b * k
    t = float(myocardial_thickness(a, b, h))
    e = np.where(ellipse(u, v, cu, cv, a + t, b + t, h.lv_axis) <= 1, 0.65, e)
    e = np.where(ellipse(u, v, cu, cv, a, b, h.lv_axis) <= 1, 0.045, e)
    return e, b + t


def render_view_video(spec: VideoSpec, draw_devices: bool = True) -> tuple[np.ndarray, dict, list[list[dict]]]:
    """Frames (T, H, W, 3) uint8 RGB, the per-video truth (geometry in pixels, the view, which devices it
    shows) and each frame's device shapes. `draw_devices=False` renders the very same video without them
    (every random draw is the same), to check that the shapes cover what the devices change."""
    layout = SMALL if spec.small else FULL
    rng = np.random.default_rng(list(spec.seed) + [2])
    geo = make_view_geometry(rng, layout, spec.view)
    scene = make_scene(rng, spec.view, lv_scale(spec.ef))
    heart = scene.heart
    gain = float(rng.uniform(0.85, 1.15))
    phase0 = float(rng.uniform(0, 1))
    x0, y0, x1, y1 = geo.bbox
    u, v, fan_box, fan = fan_pixels(geo, layout)
    overlay, sweep_s = draw_overlay(spec, layout, geo, fan, phase0, label=PROBE_LABEL)
    overlay_mask = overlay.any(-1)
    ecg_cursor_rows = slice(layout.rows - layout.ecg, layout.rows)
    depth_gain = (1.0 - 0.25 * v) * gain  # attenuation, partly compensated
    frames = np.zeros((spec.frames, layout.rows, layout.cols, 3), np.uint8)
    all_shapes, most_pixels = [], 0
    for i in range(spec.frames):
        t = i * spec.frame_time_ms / 1000.0
        phase = phase0 + t * spec.heart_rate / 60.0
        f = float(volume_fraction(np.array(phase), spec.ef / 100.0))
        e, base_dist = scene_echogenicity(u, v, scene, f)
        speckle = 0.45 + 0.55 * rng.rayleigh(math.sqrt(2 / math.pi), size=e.shape)
        img = box_blur(e * speckle * depth_gain * 255.0, *layout.speckle_blur)
        img += rng.normal(0, 2.0, size=img.shape)
        metal = 250.0 + rng.normal(0, 3.0, size=img.shape)  # drawn whether or not a device is: same stream
        shapes = frame_shapes(scene, geo, spec.devices, spec.n_mitraclips, float(np.mod(phase, 1.0)), base_dist)
        all_shapes.append(shapes)
        if shapes:
            device = rasterize(shapes, layout.rows, layout.cols)
            most_pixels = max(most_pixels, int(device.sum()))
            if draw_devices:
                img = np.where(device[y0 : y1 + 1, x0 : x1 + 1], metal, img)
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
    shown = visible_devices(spec.devices, spec.view)
    truth = dict(
        view=spec.view,
        **geometry_truth(geo, heart),
        **{f"{d}_visible": int(d in shown) for d in ("pacemaker", "tavr", "mitraclip")},
        device_pixels_max=most_pixels,
    )
    return frames, truth, all_shapes
