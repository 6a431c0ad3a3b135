"""The standard views of cohort version 2: which chambers each shows, where, and where its devices sit.

Each view is a `Scene` in sector units (u across, v depth; the sector apex at (0, 0), its radius 1):
  a4c        apical 4-chamber: LV, RV, LA, RA, long axes along the beam (version 1's heart)
  a2c        apical 2-chamber: LV and LA only (no right heart)
  plax       parasternal long axis: the LV lying across the image, RV(OT) above it, aortic root and LA
  psax       parasternal short axis (mid-ventricle): a round LV with the RV crescent beside it
  subcostal  subcostal 4-chamber: liver in the near field, the heart deep with its long axis across
Every view shows the LV (so its EF is measurable from the pixels of each video); a device shows only in
the views where it would be seen (`DEVICE_VIEWS`): a pacemaker lead where the right ventricle is, a
transcatheter aortic valve where the aortic root is cut along its axis, mitral clips where the mitral
leaflets are. The view is truth only: no DICOM header, burned-in label or report names it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_prep.synthetic.cohort import Layout
from data_prep.synthetic.geometry import Geometry, Heart, make_heart

VIEW_NAMES = {
    "a4c": "apical 4-chamber",
    "a2c": "apical 2-chamber",
    "plax": "parasternal long axis",
    "psax": "parasternal short axis",
    "subcostal": "subcostal 4-chamber",
}
# Sector half-angle (degrees) and imaging depth (cm) ranges: parasternal views are shallower and
# narrower, the subcostal deeper and wider (the heart lies behind the liver).
SECTOR = {
    "a4c": ((38, 44), (14, 18)),
    "a2c": ((38, 44), (14, 18)),
    "plax": ((36, 40), (12, 16)),
    "psax": ((36, 40), (11, 14)),
    "subcostal": ((44, 48), (18, 22)),
}
PROBE_LABEL = "S5-1"  # burned in beside the fan of every view (version 1 burns in "A4C")


@dataclasses.dataclass(frozen=True)
class Chamber:
    """A blood pool with a bright wall: `motion` "ventricle" shrinks with the LV, "atrium" fills as it
    empties, "static" (a vessel) does neither. `angle` as geometry.ellipse (from the depth direction)."""

    c: tuple[float, float]
    ab: tuple[float, float]
    angle: float
    motion: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """One view: the LV (a Heart's lv_* and wall fields; the others are A4C's), the other chambers, bright
    rims (pericardium, diaphragm) as (centre, semi-axes, angle, half-thickness), and device anchors."""

    view: str
    heart: Heart
    chambers: tuple[Chamber, ...]
    rims: tuple[tuple, ...]
    liver: bool = False  # subcostal: echogenic liver above the diaphragm rim
    lead: tuple | None = None  # pacemaker lead (start, control, end) of a quadratic Bezier; None: unseen
    lead_points: int = 40  # samples along the lead (a short oblique segment in the short-axis view)
    stent: tuple | None = None  # transcatheter valve (centre, half length, half width, axis angle)
    clips: bool = False  # mitral clips at the LV base


def make_view_geometry(rng: np.random.Generator, layout: Layout, view: str) -> Geometry:
    """The scan sector of a view in pixels (apex at the top centre, as version 1's)."""
    (a_lo, a_hi), (d_lo, d_hi) = SECTOR[view]
    r_max = layout.rows - layout.header - layout.ecg - 2
    return Geometry(
        apex_x=layout.cols / 2 + rng.uniform(-3, 3),
        apex_y=layout.header + 1.0,
        radius=r_max * rng.uniform(0.94, 1.0),
        half_angle=math.radians(rng.uniform(a_lo, a_hi)),
        depth_cm=float(rng.uniform(d_lo, d_hi)),
    )


def _unit(angle: float) -> tuple[float, float]:
    return math.sin(angle), math.cos(angle)


def _along(c, angle: float, dist: float) -> tuple[float, float]:
    s, co = _unit(angle)
    return c[0] + s * dist, c[1] + co * dist


def _lv(c, axis: float, a: float, b: float) -> Heart:
    """A Heart holding only the LV (the other chambers of a non-apical view are Scene.chambers)."""
    return Heart(
        lv_c=c,
        lv_axis=axis,
        lv_a=a,
        lv_b=b,
        wall=0.05,
        rv_c=(0.0, 0.0),
        rv_ab=(0.0, 0.0),
        la_c=(0.0, 0.0),
        ra_c=(0.0, 0.0),
        atrium_ab=(0.0, 0.0),
    )


def _a4c(rng, scale: float) -> Scene:
    h = make_heart(rng, scale)
    rv_axis = math.atan2(h.rv_c[0], h.rv_c[1])
    chambers = (
        Chamber(h.ra_c, h.atrium_ab, 0.0, "atrium"),
        Chamber(h.la_c, h.atrium_ab, h.lv_axis, "atrium"),
        Chamber(h.rv_c, h.rv_ab, rv_axis, "ventricle"),
    )
    apex = (h.rv_c[0] - math.sin(rv_axis) * h.rv_ab[1] * 0.75, h.rv_c[1] - math.cos(rv_axis) * h.rv_ab[1] * 0.75)
    lead = ((h.ra_c[0] - 0.03, h.ra_c[1] + 0.06), (h.rv_c[0] + 0.05, h.rv_c[1] + 0.12), apex)
    stent = (((h.la_c[0] + h.ra_c[0]) / 2 + 0.02, h.la_c[1] - 0.02), 0.06, 0.065, 0.0)
    return Scene("a4c", h, chambers, (((0.0, 0.55), (0.44, 0.47), 0.0, 0.045),), lead=lead, stent=stent, clips=True)


def _a2c(rng, scale: float) -> Scene:
    a, b = 0.115 * scale, 0.215 * scale
    c = (0.03 + rng.uniform(-0.015, 0.015), 0.125 + b + rng.uniform(-0.01, 0.01))
    axis = math.atan2(c[0], c[1])
    la_ab = (0.11, 0.09)
    la = Chamber(_along(c, axis, b + 0.05 + 0.02 + la_ab[1]), la_ab, axis, "atrium")
    return Scene("a2c", _lv(c, axis, a, b), (la,), (((0.03, 0.55), (0.36, 0.47), axis, 0.045),), clips=True)


def _plax(rng, scale: float) -> Scene:
    a, b = 0.105 * scale, 0.20 * scale
    axis = math.pi / 2 - 0.45 + rng.uniform(-0.04, 0.04)  # base to the right and deeper, apex to the left
    c = (-0.05 + rng.uniform(-0.015, 0.015), 0.58 + rng.uniform(-0.01, 0.01))
    la_ab = (0.09, 0.09)
    la = Chamber(_along(c, axis, 0.20 + 0.05 + 0.02 + la_ab[1]), la_ab, axis, "atrium")
    ao_axis = math.pi / 2 + 0.30  # the aortic root: right and up, anterior to the LA
    aorta = Chamber((0.22, 0.50), (0.055, 0.17), ao_axis, "static")
    rv = Chamber((-0.02, 0.30), (0.06, 0.20), axis, "ventricle")
    stent = (_along((0.22, 0.50), ao_axis, -0.06), 0.05, 0.06, ao_axis)
    return Scene(
        "plax", _lv(c, axis, a, b), (rv, aorta, la), (((0.0, 0.60), (0.30, 0.42), axis, 0.03),), stent=stent, clips=True
    )


def _psax(rng, scale: float) -> Scene:
    r = 0.14 * scale
    c = (rng.uniform(-0.015, 0.015), 0.52 + rng.uniform(-0.01, 0.01))
    rv = Chamber((-0.12, 0.30), (0.22, 0.075), -0.5, "ventricle")
    lead = ((-0.155, 0.29), (-0.13, 0.30), (-0.105, 0.31))  # a lead crossing the plane obliquely
    return Scene(
        "psax", _lv(c, 0.0, r, r), (rv,), (((c[0], c[1]), (0.33, 0.33), 0.0, 0.03),), lead=lead, lead_points=12
    )


def _subcostal(rng, scale: float) -> Scene:
    a, b = 0.105 * scale, 0.20 * scale
    axis = -(math.pi / 2 - 0.40) + rng.uniform(-0.04, 0.04)  # base to the left and deeper, apex right
    c = (0.06 + rng.uniform(-0.015, 0.015), 0.68 + rng.uniform(-0.01, 0.01))
    rv_axis = -(math.pi / 2 - 0.35)
    rv = Chamber((0.05, 0.40), (0.065, 0.20), rv_axis, "ventricle")  # just under the liver and diaphragm
    atrium_ab = (0.10, 0.085)
    la = Chamber(_along(c, axis, 0.20 + 0.05 + 0.02 + atrium_ab[1]), atrium_ab, axis, "atrium")
    ra = Chamber((-0.21, 0.52), atrium_ab, rv_axis, "atrium")
    lead = ((-0.25, 0.53), (-0.05, 0.42), _along(rv.c, rv_axis, -0.6 * rv.ab[1]))  # RA to the RV apex
    rims = (((0.0, 0.0), (0.36, 0.30), 0.0, 0.02), ((0.04, 0.64), (0.44, 0.32), axis, 0.03))  # diaphragm, pericardium
    return Scene("subcostal", _lv(c, axis, a, b), (ra, rv, la), rims, liver=True, lead=lead)


_MAKERS = {"a4c": _a4c, "a2c": _a2c, "plax": _plax, "psax": _psax, "subcostal": _subcostal}


def make_scene(rng: np.random.Generator, view: str, lv_scale: float) -> Scene:
    """The scene of one video: its view's chambers, with the LV dilated by `lv_scale` (cohort.lv_scale)."""
    return _MAKERS[view](rng, lv_scale)
