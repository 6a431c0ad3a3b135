"""Where things are: the heart's chambers in sector units (depth 1 = the sector radius), how the LV cavity's
area follows the cardiac cycle, and the scan sector in pixels."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_prep.synthetic.cohort import Layout


def volume_fraction(phase: np.ndarray, ef: float) -> np.ndarray:
    """LV cavity area / end-diastolic area over the cycle (phase 0 = R wave = end-diastole):
    contraction, an end-systolic plateau, rapid filling, diastasis."""
    phase = np.mod(phase, 1.0)
    contract = 1 - ef * (1 - np.cos(np.pi * phase / 0.30)) / 2
    fill = 1 - ef * (1 + np.cos(np.pi * (phase - 0.40) / 0.25)) / 2
    return np.select([phase < 0.30, phase < 0.40, phase < 0.65], [contract, 1 - ef, fill], 1.0)


def ellipse(u, v, cu, cv, a, b, axis_angle):
    """Normalised radius^2 of a rotated ellipse: a across, b along the axis at `axis_angle` (radians
    from the depth direction, positive towards +u)."""
    du, dv = u - cu, v - cv
    s, c = math.sin(axis_angle), math.cos(axis_angle)
    along = du * s + dv * c
    across = du * c - dv * s
    return (across / a) ** 2 + (along / b) ** 2


@dataclasses.dataclass
class Heart:
    """Chamber geometry in sector units for one video."""

    lv_c: tuple[float, float]
    lv_axis: float  # LV long-axis angle, radians
    lv_a: float  # ED cavity semi-axis across
    lv_b: float  # ED cavity semi-axis along the long axis
    wall: float  # ED myocardial thickness
    rv_c: tuple[float, float]
    rv_ab: tuple[float, float]
    la_c: tuple[float, float]
    ra_c: tuple[float, float]
    atrium_ab: tuple[float, float]


def make_heart(rng: np.random.Generator, lv_scale: float) -> Heart:
    lv_a, lv_b = 0.115 * lv_scale, 0.215 * lv_scale
    lv_c = (0.10 + rng.uniform(-0.015, 0.015), 0.125 + lv_b + rng.uniform(-0.01, 0.01))
    axis = math.atan2(lv_c[0], lv_c[1])
    wall = 0.05
    direction = (math.sin(axis), math.cos(axis))
    atrium_ab = (0.10, 0.085)
    la_dist = lv_b + wall + 0.02 + atrium_ab[1]
    la_c = (lv_c[0] + direction[0] * la_dist, lv_c[1] + direction[1] * la_dist)
    ra_c = (la_c[0] - 0.24, la_c[1] - 0.01)
    rv_ab = (0.075, 0.19 * min(lv_scale, 1.15))
    rv_c = (lv_c[0] - lv_a - 2 * wall - rv_ab[0] + 0.01, 0.15 + rv_ab[1])
    return Heart(lv_c, axis, lv_a, lv_b, wall, rv_c, rv_ab, la_c, ra_c, atrium_ab)


def myocardial_thickness(a, b, heart: Heart):
    """Wall thickness that keeps the myocardial area constant as the cavity shrinks (it thickens)."""
    a0, b0, t0 = heart.lv_a, heart.lv_b, heart.wall
    m = (a0 + t0) * (b0 + t0) - a0 * b0
    return (-(a + b) + np.sqrt((a + b) ** 2 + 4 * m)) / 2


@dataclasses.dataclass
class Geometry:
    """The scan sector in pixels: apex (x, y), radius, half-angle, bounding box."""

    apex_x: float
    apex_y: float
    radius: float
    half_angle: float  # radians
    depth_cm: float

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive (x0, y0, x1, y1) of the sector."""
        half = self.radius * math.sin(self.half_angle)
        return (
            int(math.floor(self.apex_x - half)),
            int(math.floor(self.apex_y)),
            int(math.ceil(self.apex_x + half)),
            int(math.ceil(self.apex_y + self.radius)),
        )


def make_geometry(rng, layout: Layout) -> Geometry:
    r_max = layout.rows - layout.header - layout.ecg - 2
    return Geometry(
        apex_x=layout.cols / 2 + rng.uniform(-3, 3),
        apex_y=layout.header + 1.0,
        radius=r_max * rng.uniform(0.94, 1.0),
        half_angle=math.radians(rng.uniform(38, 44)),
        depth_cm=float(rng.uniform(14, 18)),
    )
