"""What scanners burn in outside the sector: the patient's name, id and date, the heart rate, a probe label
and depth ticks beside the fan, and the ECG trace in the bottom band."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep.synthetic.cohort import Layout, VideoSpec
from data_prep.synthetic.geometry import Geometry


def ecg_value(phase: np.ndarray) -> np.ndarray:
    """A PQRST complex per cycle with the R wave at phase 0 (end-diastole)."""
    d = np.mod(phase + 0.5, 1.0) - 0.5
    g = lambda mu, sd: np.exp(-0.5 * ((d - mu) / sd) ** 2)  # noqa: E731
    return g(0, 0.012) - 0.2 * g(0.03, 0.01) - 0.1 * g(-0.025, 0.008) + 0.3 * g(0.3, 0.045) + 0.15 * g(-0.15, 0.03)


def draw_overlay(spec: VideoSpec, layout: Layout, geo: Geometry, fan: np.ndarray, phase0: float, label: str = "A4C"):
    """Static burned-in graphics outside the sector, as (mask, RGB colour) images, and the ECG sweep.
    `label` is burned in beside the fan (version 1: "A4C"; version 2: a probe name, never the view)."""
    img = Image.new("RGB", (layout.cols, layout.rows))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=layout.font_px)
    line = layout.font_px + 2
    white = (230, 230, 230)
    draw.text((3, 1), spec.phi["burned_name"], fill=white, font=font)
    draw.text((3, 1 + line), spec.phi["burned_id"], fill=white, font=font)
    for i, text in enumerate((f"HR {spec.heart_rate:.0f} {spec.fps:.0f}Hz", spec.phi["burned_date"])):
        draw.text((layout.cols - 3 - draw.textlength(text, font=font), 1 + i * line), text, fill=white, font=font)
    # A label in the bounding box's corner, beside the fan: cropping alone does not remove it.
    x0, y0, x1, y1 = geo.bbox
    draw.text((x0 + 1, y0 + 2), label, fill=(200, 200, 120), font=font)
    px_per_cm = geo.radius / geo.depth_cm
    for cm in range(0, int(geo.depth_cm) + 1):  # depth ticks beside the fan (kept only outside it)
        y = geo.apex_y + cm * px_per_cm
        draw.line([(x1 - max(2, layout.font_px // 3), y), (x1, y)], fill=white)
    pixels = np.asarray(img).copy()
    pixels[fan] = 0
    # ECG: a static sweep of ~2.5 cycles across the band; the cursor moves frame by frame.
    band_top = layout.rows - layout.ecg
    xs = np.arange(layout.cols)
    sweep_s = 2.5 * 60.0 / spec.heart_rate
    amp = (layout.ecg - 4) * 0.7
    ys = band_top + layout.ecg * 0.72 - amp * ecg_value(phase0 + xs / layout.cols * 2.5)
    ys = np.clip(np.round(ys).astype(int), band_top, layout.rows - 1)
    lo = np.minimum(ys, np.concatenate([ys[:1], ys[:-1]]))
    hi = np.maximum(ys, np.concatenate([ys[:1], ys[:-1]]))
    rows = np.arange(layout.rows)[:, None]
    trace = (rows >= lo[None] - (layout.font_px > 12)) & (rows <= hi[None])
    pixels[trace] = (70, 220, 70)
    return pixels, sweep_s
