"""The scan sector: find it, blank everything outside it, crop to a square around it, resize.

EchoCLIP's inputs show only the ultrasound fan: burned-in text (names, ids, dates), the ECG trace and
scanner graphics are removed. The sector is found from SequenceOfUltrasoundRegions when the header has
it (limiting the search to the 2D tissue rectangles), and from the video itself: pixels that change over
time, the largest connected region of them, filled row by row (a fan is convex along every row). Static
graphics, even inside the region rectangle, stay outside the mask; a thin moving ECG cursor is removed
by a morphological opening.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

_MOTION_THRESHOLD = 6  # grey levels of temporal range: above JPEG noise on static text, below speckle (12 finds
# only 52-80% of 600x800 synthetic fans, whose speckle is smoother; 6 finds 95%)
_MIN_SECTOR_FRACTION = 0.02  # a moving region smaller than this share of the search area is not a sector
_MOTION_FRAMES = 12  # frames (evenly spaced) whose range finds the moving region: enough, and cheap
_MASK_RESOLUTION = 300  # the mask is searched on every f-th pixel, f = shorter side // this (>= 1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_rows(mask: np.ndarray) -> np.ndarray:
    """Fill each row between its first and last set pixel."""
    any_row = mask.any(axis=1)
    first = np.argmax(mask, axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    cols = np.arange(mask.shape[1])
    return any_row[:, None] & (cols[None] >= first[:, None]) & (cols[None] <= last[:, None])


def region_mask(shape: tuple[int, int], regions) -> np.ndarray:
    """Union of the (x0, y0, x1, y1) inclusive rectangles, clipped to the image."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in regions:
        mask[max(y0, 0) : min(y1, h - 1) + 1, max(x0, 0) : min(x1, w - 1) + 1] = True
    return mask


def _grey(frame: np.ndarray) -> np.ndarray:
    """Brightest channel; chained np.maximum (numpy's reduction over a size-3 last axis is far slower)."""
    if frame.shape[-1] == 1:
        return frame[..., 0]
    return np.maximum(np.maximum(frame[..., 0], frame[..., 1]), frame[..., 2])


def _upsample_inside(mask: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Full-resolution mask from one found on every f-th pixel, kept strictly inside it.

    A coarse pixel covers an f x f block; eroding by one coarse pixel first means every kept block lies
    within the convex hull of sampled pixels that are in the sector, so the fan's edge is never crossed.
    """
    if f == 1:
        return mask
    mask = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    full = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)
    h, w = shape
    out = np.zeros((h, w), bool)
    out[: min(h, full.shape[0]), : min(w, full.shape[1])] = full[:h, :w]
    return out


def sector_mask(frames: np.ndarray, regions=()) -> np.ndarray:
    """Boolean [H, W] mask of the scan sector of uint8 frames [K, H, W, C] (C = 3, or 1 for grey).

    Searched on every f-th pixel (f from _MASK_RESOLUTION; 600x800 -> f=2), 1/f^2 of the pixels, and, with
    the erosion in _upsample_inside, never wider than the full-resolution search.
    """
    k, h, w, _ = frames.shape
    f = max(1, min(h, w) // _MASK_RESOLUTION)
    area = region_mask((h, w), regions) if regions else np.ones((h, w), bool)
    small_area = area[::f, ::f]
    if k >= 2:
        lo = hi = None
        for i in np.unique(np.linspace(0, k - 1, min(k, _MOTION_FRAMES)).round().astype(int)):
            g = _grey(frames[i, ::f, ::f])
            lo, hi = (g, g) if lo is None else (np.minimum(lo, g), np.maximum(hi, g))
        moving = (hi.astype(np.int16) - lo) > _MOTION_THRESHOLD
        moving = ndimage.binary_opening(moving & small_area, structure=np.ones((3, 3), bool))
        sector = _largest_component(moving)
        if sector.sum() >= _MIN_SECTOR_FRACTION * small_area.sum():
            return _upsample_inside(fill_rows(sector) & small_area, f, (h, w)) & area
    if regions:
        return area  # a still image (or a frozen loop): trust the header's rectangle
    brightest = _grey(frames[0, ::f, ::f])
    for i in range(1, k):
        np.maximum(brightest, _grey(frames[i, ::f, ::f]), out=brightest)
    bright = ndimage.binary_opening(brightest > 8, structure=np.ones((3, 3), bool))
    sector = _largest_component(bright)
    if not sector.any():
        return area
    return _upsample_inside(fill_rows(sector), f, (h, w))


def square_box(mask: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the square centred on the mask's bounding box (may extend past the image)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        h, w = mask.shape
        rows, cols = np.array([0, h - 1]), np.array([0, w - 1])
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = int(max(y1 - y0, x1 - x0))
    top = int((y0 + y1 - side) // 2)
    left = int((x0 + x1 - side) // 2)
    return top, left, side


def crop_resize(frames: np.ndarray, mask: np.ndarray, image_size: int) -> np.ndarray:
    """Zero pixels outside `mask`, crop the square around it (zero padded), resize -> [K, S, S, 3].

    Only the crop is masked, as [K, rows, cols * C] against a mask repeated per channel, so numpy runs one
    contiguous multiply per row, not a broadcast over a size-3 axis (far slower). The resize is a
    box reduce by an integer factor, then bilinear (Pillow's reducing_gap=1). Grey frames (C = 1) are
    resized as one channel (Pillow stores RGB as 4 bytes a pixel) and made RGB only at the output size.
    """
    k, h, w, c = frames.shape
    top, left, side = square_box(mask)
    y0, y1, x0, x1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    canvas = np.zeros((k, side, side * c), np.uint8)
    keep = np.repeat(mask[y0:y1, x0:x1].view(np.uint8), c, axis=1)
    np.multiply(
        frames[:, y0:y1, x0:x1].reshape(k, y1 - y0, -1),
        keep,  # a view: each row's pixels are contiguous
        out=canvas[:, y0 - top : y1 - top, c * (x0 - left) : c * (x1 - left)],
    )
    canvas = canvas.reshape(k, side, side, c) if c == 3 else canvas
    if side == image_size:
        out = canvas
    else:
        out = np.empty((k, image_size, image_size) + canvas.shape[3:], np.uint8)
        for i in range(k):
            out[i] = np.asarray(
                Image.fromarray(canvas[i]).resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=1.0)
            )
    return out if c == 3 else np.repeat(out[..., None], 3, axis=-1)


def prepare(frames: np.ndarray, regions=(), image_size: int = 224) -> np.ndarray:
    """The whole image step: sector mask, blank outside, square crop, resize."""
    return crop_resize(frames, sector_mask(frames, regions), image_size)
