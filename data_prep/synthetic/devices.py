"""The devices: a pacemaker lead, a stent-frame aortic valve prosthesis, mitral clips, drawn as masks of
near-saturated metal in sector units."""

from __future__ import annotations

import math

import numpy as np

from data_prep.synthetic.cohort import VideoSpec
from data_prep.synthetic.geometry import Heart, ellipse


def device_mask(u, v, heart: Heart, base_dist: float, phase: float, spec: VideoSpec) -> np.ndarray:
    """Where the devices are: drawn after speckle as near-saturated metal, brighter than any tissue."""
    mask = np.zeros(u.shape, bool)
    s, c = math.sin(heart.lv_axis), math.cos(heart.lv_axis)
    if "pacemaker" in spec.devices:
        # A lead from the right atrium through the tricuspid valve to the RV apex; it sways a little.
        sway = 0.012 * math.sin(2 * math.pi * phase)
        rv_axis = math.atan2(heart.rv_c[0], heart.rv_c[1])
        apex = (
            heart.rv_c[0] - math.sin(rv_axis) * heart.rv_ab[1] * 0.75 + sway,
            heart.rv_c[1] - math.cos(rv_axis) * heart.rv_ab[1] * 0.75,
        )
        start = (heart.ra_c[0] - 0.03, heart.ra_c[1] + 0.06)
        ctrl = (heart.rv_c[0] + 0.05 - sway, heart.rv_c[1] + 0.12)
        tt = np.linspace(0, 1, 40)[:, None, None]
        pu = (1 - tt) ** 2 * start[0] + 2 * (1 - tt) * tt * ctrl[0] + tt**2 * apex[0]
        pv = (1 - tt) ** 2 * start[1] + 2 * (1 - tt) * tt * ctrl[1] + tt**2 * apex[1]
        d2 = np.min((u[None] - pu) ** 2 + (v[None] - pv) ** 2, axis=0)
        mask |= d2 < 0.024**2
    if "tavr" in spec.devices:
        # A stent frame with its diamond lattice at the crux, between the atria below the LV base.
        cu = (heart.la_c[0] + heart.ra_c[0]) / 2 + 0.02
        cv = heart.la_c[1] - 0.02
        hw, hh, th = 0.065, 0.06, 0.028
        du, dv = np.abs(u - cu), np.abs(v - cv)
        inside = (du <= hw) & (dv <= hh)
        frame = inside & ((du > hw - th) | (dv > hh - th))
        period = 0.05
        lattice = inside & ((np.mod(u - cu + v - cv, period) < 0.018) | (np.mod(u - cu - v + cv, period) < 0.018))
        mask |= frame | lattice
    if spec.n_mitraclips:
        # Clips on the mitral leaflets at the LV base; they ride with the annulus.
        d = base_dist + 0.02
        cu, cv = heart.lv_c[0] + s * d, heart.lv_c[1] + c * d
        offsets = (0.0,) if spec.n_mitraclips == 1 else (-0.05, 0.05)
        for off in offsets:
            mask |= ellipse(u, v, cu + c * off, cv - s * off, 0.042, 0.06, heart.lv_axis) <= 1
    return mask
