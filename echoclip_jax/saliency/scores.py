"""Saliency maps scored against the truth: do they point at what the prompt names?

A case is one video's frames (the model's input pixels), a prompt, and per frame the mask of what the prompt
names there (a device, a structure) with the scan sector. Every map is restricted to the sector and scored
per frame against the mask:
- pointing game: the map's maximum lies on the mask dilated by TOLERANCE_PX (a disk, in the map's pixels =
  the model's input pixels). Ties at the maximum count as the share of the tied pixels that hit (the
  expected hit of breaking the tie at random); a map that is zero on the whole sector misses.
- mass share: the share of the map's (non-negative) mass on the (undilated) mask.
Frames whose mask is empty (the target outside the crop, or under half a pixel) are skipped.
Two baselines get the same scores on the same frames: `uniform` (constant on the sector: its pointing
game is |dilated mask & sector| / |sector|, the hit rate of a uniformly random sector pixel, and its mass
share |mask & sector| / |sector|) and `centre` (a Gaussian at the sector's centre of mass, sigma =
CENTRE_SIGMA x the square root of the sector's area).

Outputs in OUT: `scores.json` (per method and target, and over all targets: pointing game, mass share,
videos, frames, and both baselines on the same frames; no video or patient id) and `score_frames.png`
(a few frames: each method's map over the frame, the mask's outline, the map's maximum). The synthetic
cohort's device masks are one source of cases (`echoclip_jax.demo.device_masks`). OUT is a local folder
or a gs:// URL (`echoclip_jax.runtime.storage`).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from echoclip_jax.runtime import storage
from echoclip_jax.saliency.maps import DEFAULT_SCORE_METHODS

TOLERANCE_PX = 3
CENTRE_SIGMA = 0.25
PLOT_EXAMPLES = 2  # frames per device in score_frames.png


def disk(radius: int) -> np.ndarray:
    """Boolean (2r+1)^2 disk: the pixels within `radius` of the centre."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def dilate(mask: np.ndarray, radius: int = TOLERANCE_PX) -> np.ndarray:
    """[.., S, S] boolean mask grown by `radius` pixels (a disk), frame by frame."""
    if radius <= 0:
        return mask.astype(bool)
    st = disk(radius)
    if mask.ndim == 3:
        st = st[None]
    return ndimage.binary_dilation(mask, structure=st)


def pointing(heat: np.ndarray, target: np.ndarray, sector: np.ndarray) -> float:
    """1 if the map's maximum over the sector lies on `target` (already dilated), else 0; ties at the
    maximum: the share of the tied pixels on target; no positive value in the sector: 0."""
    inside = np.where(sector, heat, -np.inf)
    top = inside.max()
    if not np.isfinite(top) or top <= 0:
        return 0.0
    tied = inside == top
    return float((tied & target).sum() / tied.sum())


def mass_share(heat: np.ndarray, mask: np.ndarray, sector: np.ndarray) -> float:
    """The share of the map's mass on the sector that lies on `mask` (0 for a map without mass)."""
    heat = np.where(sector, np.maximum(heat, 0.0), 0.0)
    total = heat.sum()
    return float(heat[mask].sum() / total) if total > 0 else 0.0


def uniform_map(sector: np.ndarray) -> np.ndarray:
    return sector.astype(np.float32)


def centre_map(sector: np.ndarray) -> np.ndarray:
    """A Gaussian at the sector's centre of mass, sigma = CENTRE_SIGMA * sqrt(sector area), zero outside."""
    cy, cx = ndimage.center_of_mass(sector)
    sigma = CENTRE_SIGMA * np.sqrt(sector.sum())
    yy, xx = np.mgrid[: sector.shape[0], : sector.shape[1]]
    return (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)) * sector).astype(np.float32)


def score_frames(
    maps: np.ndarray, masks: np.ndarray, sector: np.ndarray, tolerance: int = TOLERANCE_PX
) -> tuple[list[float], list[float]]:
    """Per-frame (pointing game, mass share) of maps [K, S, S] against masks [K, S, S] in one sector
    [S, S]; frames with an empty mask are left out."""
    targets = dilate(masks, tolerance)
    hits, shares = [], []
    for heat, mask, target in zip(maps, masks, targets):
        if mask.any():
            hits.append(pointing(heat, target, sector))
            shares.append(mass_share(heat, mask, sector))
    return hits, shares


def parse_methods(spec) -> list[tuple[str, str, dict]]:
    """'promptcam:last,promptcam:1,gradient,smoothgrad:8' -> [(label, method, SaliencyMapper.maps kwargs)]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip() for i in items if i.strip()):
        name, _, arg = item.partition(":")
        if name == "promptcam":
            out.append((item if arg else "promptcam:last", "promptcam", {"cam_stage": arg or "last"}))
        elif name == "gradient" and not arg:
            out.append((item, "gradient", {"smoothgrad_samples": 0}))
        elif name == "smoothgrad" and arg.isdigit() and int(arg) > 0:
            out.append((item, "gradient", {"smoothgrad_samples": int(arg)}))
        else:
            raise ValueError(f"score method {item!r}: expected promptcam[:last|0..3], gradient or smoothgrad:N")
    if not out:
        raise ValueError("no score methods given")
    return out


def _summary(hits, shares, videos) -> dict:
    return {
        "pointing_game": float(np.mean(hits)) if hits else None,
        "mass_share": float(np.mean(shares)) if shares else None,
        "videos": videos,
        "frames": len(hits),
    }


@dataclasses.dataclass(frozen=True)
class Case:
    """One video's frames to score, with the truth of what a prompt names in them."""

    target: str  # what the prompt names (e.g. a device); scores are reported per target and over all
    prompt: str
    video: str  # which video (two cases of one video count it once in the totals)
    frames: np.ndarray  # uint8 [k, S, S, 3], the model's input pixels
    masks: np.ndarray  # boolean [k, S, S]: where the target is, per frame
    sector: np.ndarray  # boolean [S, S]: the scan sector


def score_cases(
    mapper, cases: list[Case], *, targets, out_dir: str, methods=DEFAULT_SCORE_METHODS, meta: dict | None = None
) -> dict:
    """Every method's maps of every case scored per frame (see the module docstring), with both baselines
    on the same frames; writes OUT/scores.json (`meta` first) and OUT/score_frames.png, returns the scores."""
    specs = parse_methods(methods)
    flat = sorted({c.prompt for c in cases})
    text = mapper.text_embeddings(flat)
    labels = [label for label, _, _ in specs] + ["uniform", "centre"]
    acc = {(lab, t): ([], []) for lab in labels for t in targets}
    videos = {t: 0 for t in targets}
    distinct = set()  # videos scored (one video may show two targets)
    examples = []
    computed = {}
    for label, method, kwargs in specs:  # all cases' frames at once: full batches
        computed[label] = mapper.maps_of_videos(method, [c.frames for c in cases], text, **kwargs)
    for i, case in enumerate(cases):
        p = flat.index(case.prompt)
        maps = {label: computed[label][i][0][p] * case.sector for label, _, _ in specs}
        maps["uniform"] = np.broadcast_to(uniform_map(case.sector), case.masks.shape)
        maps["centre"] = np.broadcast_to(centre_map(case.sector), case.masks.shape)
        if not case.masks.any():
            continue
        videos[case.target] += 1
        distinct.add(case.video)
        for label in labels:
            hits, shares = score_frames(maps[label], case.masks, case.sector)
            acc[label, case.target][0].extend(hits)
            acc[label, case.target][1].extend(shares)
        if sum(e[0] == case.target for e in examples) < PLOT_EXAMPLES:
            k = int(np.argmax(case.masks.reshape(len(case.masks), -1).sum(1)))
            examples.append(
                (case.target, case.frames[k], case.masks[k], case.sector, {lab: maps[lab][k] for lab in labels})
            )
    result = {
        **(meta or {}),
        "tolerance_px": TOLERANCE_PX,
        "image_size": mapper.image_size,
        "centre_sigma": CENTRE_SIGMA,
        "cam_grid": {label: mapper.cam_grid_size(kw["cam_stage"]) for label, m, kw in specs if m == "promptcam"},
        "methods": {},
    }
    for label in labels:
        per = {t: _summary(*acc[label, t], videos[t]) for t in targets if videos[t]}
        pooled = [sum((acc[label, t][j] for t in targets), []) for j in (0, 1)]
        per["all"] = _summary(*pooled, len(distinct))
        result["methods"][label] = per
    ranked = [lab for lab, _, _ in specs if result["methods"][lab]["all"]["pointing_game"] is not None]
    result["best"] = max(ranked, key=lambda lab: result["methods"][lab]["all"]["pointing_game"]) if ranked else None
    storage.write_text(storage.join(out_dir, "scores.json"), json.dumps(result, indent=1))
    plot_examples(examples, [lab for lab, _, _ in specs] + ["centre"], storage.join(out_dir, "score_frames.png"))
    return result


def format_scores(result: dict) -> str:
    """scores.json as a table: one line per method, pointing game and mass share over all devices."""
    num = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"
    lines = [f"{'method':<16} {'pointing':>8} {'mass':>6} {'frames':>6}   per device (pointing)"]
    for label, per in result["methods"].items():
        pooled = per["all"]
        devices = " ".join(
            f"{d}={v['pointing_game']:.2f}" for d, v in per.items() if d != "all" and v["pointing_game"] is not None
        )
        lines.append(
            f"{label:<16} {num(pooled['pointing_game'], 8)} {num(pooled['mass_share'], 6)} "
            f"{pooled['frames']:>6}   {devices}"
        )
    return "\n".join(lines)


def plot_examples(examples, labels, path: str) -> None:
    """One row per example frame, one column per map: the map (scaled to its maximum) over the frame, the
    mask's outline (white), the map's maximum (a cyan cross), the frame's hit or miss."""
    rows = max(len(examples), 1)
    fig = Figure(figsize=(2.2 * len(labels), 2.3 * rows))
    axes = fig.subplots(rows, len(labels), squeeze=False)
    for r, (device, frame, mask, sector, maps) in enumerate(examples):
        target = dilate(mask)
        for c, label in enumerate(labels):
            ax, heat = axes[r, c], maps[label]
            ax.imshow(frame.max(-1), cmap="gray", vmin=0, vmax=255)
            top = heat.max()
            ax.imshow(heat / top if top > 0 else heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
            y, x = np.unravel_index(int(np.argmax(np.where(sector, heat, -np.inf))), heat.shape)
            ax.plot([x], [y], "c+", markersize=9, markeredgewidth=1.5)
            hit = pointing(heat, target, sector)
            ax.set_title(f"{label}\n{device}: {'hit' if hit >= 0.5 else 'miss'}", fontsize=7)
            ax.axis("off")
    if not examples:
        axes[0, 0].text(0.5, 0.5, "no device frames", ha="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    storage.write_bytes(path, buffer.getvalue())
