"""Cohort version 2's devices as exact shapes in image pixels, frame by frame: what the renderer draws and
what the truth keeps, so a device's pixel mask can be redrawn from the truth alone.

A shape is a JSON-ready dict in the written DICOM frame's pixel coordinates (x = column, y = row, pixel
centres at integers), with numbers rounded to 1/1000 pixel BEFORE drawing, so redrawing the stored
numbers gives the very mask the renderer used:
  {"device": "pacemaker", "kind": "lead", "p0": [x, y], "p1": [x, y], "p2": [x, y], "n": N, "r": R}
      a quadratic Bezier sampled at N points, every pixel within R of a sample
  {"device": "tavr", "kind": "stent", "c": [x, y], "half_len": L, "half_wid": W, "angle": A,
   "strut": S, "period": P, "lattice": K}
      a rectangle about c, its length along angle A (radians from the +y, i.e. depth, direction, positive
      towards +x): the frame (struts S wide) and a diamond lattice (lines K wide every P)
  {"device": "mitraclip", "kind": "ellipse", "c": [x, y], "a": A, "b": B, "angle": T}
      semi-axis A across and B along the direction T
The truth file `device_geometry.jsonl` holds one line per video: {"path", "rows", "cols", "frames":
[[shape, ...] per frame]}; `device_mask(out_dir, path)` turns it back into a boolean mask [T, rows, cols].
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from data_prep.synthetic.cohort import DEVICE_VIEWS
from data_prep.synthetic.geometry import Geometry
from data_prep.synthetic.views import Scene

LEAD_RADIUS = 0.024  # sector units, as version 1's lead
CLIP_AB = (0.042, 0.06)
STENT_STRUT, STENT_PERIOD, STENT_LATTICE = 0.028, 0.05, 0.018


def visible_devices(devices, view: str) -> tuple[str, ...]:
    """The study's devices that this view shows."""
    return tuple(d for d in devices if view in DEVICE_VIEWS[d])


def _px(geo: Geometry, p) -> list[float]:
    return [round(geo.apex_x + p[0] * geo.radius, 3), round(geo.apex_y + p[1] * geo.radius, 3)]


def frame_shapes(scene: Scene, geo: Geometry, devices, n_clips: int, phase: float, base_dist: float) -> list[dict]:
    """The shapes of the devices this view shows, at cardiac `phase` (0..1), the LV base `base_dist`
    (sector units from the LV centre along its axis) for the clips that ride on the annulus."""
    shown, px, k = visible_devices(devices, scene.view), (lambda p: _px(geo, p)), geo.radius
    shapes = []
    if "pacemaker" in shown and scene.lead:
        sway = 0.012 * math.sin(2 * math.pi * phase) * (1.0 if scene.lead_points > 20 else 0.4)
        (s0, s1), (c0, c1), (e0, e1) = scene.lead
        shapes.append(
            dict(
                device="pacemaker",
                kind="lead",
                p0=px((s0, s1)),
                p1=px((c0 - sway, c1)),
                p2=px((e0 + sway, e1)),
                n=scene.lead_points,
                r=round(LEAD_RADIUS * k, 3),
            )
        )
    if "tavr" in shown and scene.stent:
        c, half_len, half_wid, angle = scene.stent
        shapes.append(
            dict(
                device="tavr",
                kind="stent",
                c=px(c),
                half_len=round(half_len * k, 3),
                half_wid=round(half_wid * k, 3),
                angle=round(angle, 6),
                strut=round(STENT_STRUT * k, 3),
                period=round(STENT_PERIOD * k, 3),
                lattice=round(STENT_LATTICE * k, 3),
            )
        )
    if "mitraclip" in shown and scene.clips and n_clips:
        h = scene.heart
        s, co = math.sin(h.lv_axis), math.cos(h.lv_axis)
        d = base_dist + 0.02
        cu, cv = h.lv_c[0] + s * d, h.lv_c[1] + co * d
        for off in (0.0,) if n_clips == 1 else (-0.05, 0.05):
            shapes.append(
                dict(
                    device="mitraclip",
                    kind="ellipse",
                    c=px((cu + co * off, cv - s * off)),
                    a=round(CLIP_AB[0] * k, 3),
                    b=round(CLIP_AB[1] * k, 3),
                    angle=round(h.lv_axis, 6),
                )
            )
    return shapes


def _box(shape: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) that holds the shape."""
    if shape["kind"] == "lead":
        xs, ys = zip(shape["p0"], shape["p1"], shape["p2"])
        return min(xs) - shape["r"], min(ys) - shape["r"], max(xs) + shape["r"], max(ys) + shape["r"]
    if shape["kind"] == "stent":
        reach = math.hypot(shape["half_len"], shape["half_wid"])
    else:
        reach = max(shape["a"], shape["b"])
    return shape["c"][0] - reach, shape["c"][1] - reach, shape["c"][0] + reach, shape["c"][1] + reach


def _inside(shape: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    kind = shape["kind"]
    if kind == "lead":
        t = np.linspace(0.0, 1.0, shape["n"])[:, None, None]
        (x0, y0), (x1, y1), (x2, y2) = shape["p0"], shape["p1"], shape["p2"]
        px = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t**2 * x2
        py = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t**2 * y2
        return np.min((x[None] - px) ** 2 + (y[None] - py) ** 2, axis=0) < shape["r"] ** 2
    s, c = math.sin(shape["angle"]), math.cos(shape["angle"])
    dx, dy = x - shape["c"][0], y - shape["c"][1]
    along, across = dx * s + dy * c, dx * c - dy * s
    if kind == "ellipse":
        return (across / shape["a"]) ** 2 + (along / shape["b"]) ** 2 <= 1
    if kind != "stent":
        raise ValueError(f"unknown device shape kind {kind!r}")
    hl, hw, th = shape["half_len"], shape["half_wid"], shape["strut"]
    a_al, a_ac = np.abs(along), np.abs(across)
    inside = (a_ac <= hw) & (a_al <= hl)
    frame = inside & ((a_ac > hw - th) | (a_al > hl - th))
    period, width = shape["period"], shape["lattice"]
    lattice = inside & ((np.mod(across + along, period) < width) | (np.mod(across - along, period) < width))
    return frame | lattice


def rasterize(shapes: list[dict], rows: int, cols: int) -> np.ndarray:
    """Boolean [rows, cols]: the pixels (centres) inside any of the shapes."""
    mask = np.zeros((rows, cols), bool)
    for shape in shapes:
        x0, y0, x1, y1 = _box(shape)
        c0, r0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        c1, r1 = min(int(math.ceil(x1)) + 1, cols - 1), min(int(math.ceil(y1)) + 1, rows - 1)
        if c1 < c0 or r1 < r0:
            continue
        yy, xx = np.mgrid[r0 : r1 + 1, c0 : c1 + 1].astype(np.float64)
        mask[r0 : r1 + 1, c0 : c1 + 1] |= _inside(shape, xx, yy)
    return mask


def read_device_geometry(out_dir) -> dict[str, dict]:
    """{video path: its line of device_geometry.jsonl} of a version-2 cohort."""
    path = pathlib.Path(out_dir) / "device_geometry.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no device_geometry.jsonl; is {out_dir} a version-2 synthetic cohort?")
    with open(path) as fh:
        return {entry["path"]: entry for entry in map(json.loads, fh)}


def device_mask(out_dir, path: str, device: str | None = None) -> np.ndarray:
    """Boolean [frames, rows, cols] of a video's device pixels (`device`: only that one; None: all), from the
    truth of the cohort in `out_dir` (`path` as in truth.csv, e.g. "dicom/P00001/S01/IM0001.dcm")."""
    entries = read_device_geometry(out_dir)
    if path not in entries:
        raise KeyError(f"{path}: not a video of the cohort in {out_dir}")
    entry = entries[path]
    return np.stack(
        [
            rasterize([s for s in shapes if device is None or s["device"] == device], entry["rows"], entry["cols"])
            for shapes in entry["frames"]
        ]
    )
