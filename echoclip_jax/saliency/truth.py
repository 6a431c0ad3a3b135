"""Where a saliency map may and should point, in the pixels the model saw: the scan sector, and the
synthetic cohort's device masks mapped into a record's frames.

A record holds the scan sector cropped and resized (data_prep.shards.convert_video): K evenly spaced frames
(`dicom_io.kept_indices`) read at a reduced scale (`dicom_io.read_frames_scaled`, min side 1.25 x the
image size), the sector found on those pixels (`sector.sector_mask`, the header's regions scaled), then
blanked outside it, square-cropped and resized (`sector.crop_resize`). `record_truth` pushes the cohort's
device mask through those very functions, as a 0/255 grey video (box-reduced by the same scale, cropped
and resized by the same call), and keeps the pixels at least half covered (>= 128): the mask and the
record's frames cannot disagree about the geometry, because one code path made both.

`sector_from_frames` is the sector when only the frames are known (records, AVI, .npy): data_prep blanks
everything outside the sector, so it is where any frame is brighter than JPEG's ringing on black.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

DEVICES = ("pacemaker", "tavr", "mitraclip")
HALF = 128  # a resized 0/255 mask pixel at least half covered belongs to the mask
DARK = 12  # grey levels: above JPEG ringing on the black outside the fan (records: <= 6), below speckle


def sector_from_frames(frames: np.ndarray) -> np.ndarray:
    """Boolean [S, S] scan sector of uint8 frames [K, S, S, 3] that are black outside it: pixels brighter
    than DARK in any frame, the largest connected region, its holes (dark blood pools) filled.
    A frame with no black surround gives the whole frame."""
    brightest = frames.max(axis=(0, 3)) if frames.ndim == 4 else frames.max(axis=0)
    bright = ndimage.binary_opening(brightest > DARK, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(bright)
    if n == 0:
        return np.ones(brightest.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    sector = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return _fill_rows(sector)


def _fill_rows(mask: np.ndarray) -> np.ndarray:
    from data_prep.sector import _fill_rows as fill  # a fan is convex along every row (data_prep's rule)

    return fill(mask)


def to_output(masks: np.ndarray, sector_mask: np.ndarray, image_size: int) -> np.ndarray:
    """Masks [K, H, W] (or one [H, W]; boolean, or uint8 coverage 0..255) in the frame that `sector_mask`
    was found on -> boolean [K, S, S] (or [S, S]) in the output frame: through `sector.crop_resize` as a
    grey video, then at least half covered."""
    from data_prep import sector

    one = masks.ndim == 2
    grey = np.asarray(masks)[None] if one else np.asarray(masks)
    grey = grey.astype(np.uint8) * 255 if grey.dtype == bool else grey.astype(np.uint8)
    out = sector.crop_resize(grey[..., None], sector_mask, image_size)[..., 0] >= HALF
    return out[0] if one else out


def record_truth(cohort_dir: str, rel_path: str, device: str, *, image_size: int, record_frames: int,
                 positions) -> tuple[np.ndarray, np.ndarray]:
    """The device mask [k, S, S] of record frames `positions` (of the record's `record_frames`) and the
    record's scan sector [S, S], for the DICOM `rel_path` of a version-2 synthetic cohort, converted by
    data_prep.convert at `image_size` (frame selection, scale, sector, crop and resize as it does them)."""
    from data_prep import dicom_io, sector
    from data_prep.synthetic import device_mask

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    path = os.path.join(cohort_dir, rel_path)
    header = dicom_io.read_header(path, max_pixels=1 << 40)
    indices = dicom_io.kept_indices(header.num_frames, record_frames)
    if len(indices) != record_frames:
        raise ValueError(f"the record has {record_frames} frames, its DICOM {header.num_frames}: "
                         f"not this cohort's conversion")
    raw, scale = dicom_io.read_frames_scaled(path, indices, header.rows * header.cols,
                                             min_side=image_size * 5 // 4, keep_grey=True)
    regions = tuple(tuple(v // scale for v in box) for box in header.regions)
    found = sector.sector_mask(raw, regions)
    dicom_frames = [indices[p] for p in positions]
    truth = device_mask(cohort_dir, rel_path, device)[dicom_frames]
    if truth.shape[1:] != (header.rows, header.cols):
        raise ValueError(f"{rel_path}: device mask {truth.shape[1:]} but the DICOM is {header.rows}x{header.cols}")
    reduced = np.stack([dicom_io._reduce(m.astype(np.uint8)[..., None] * 255, scale)[..., 0] for m in truth])
    if reduced.shape[1:] != found.shape:
        raise ValueError(f"{rel_path}: reduced mask {reduced.shape[1:]} does not match the frames {found.shape}")
    return to_output(reduced, found, image_size), to_output(found, found, image_size)


def visible_devices(row: dict) -> list[str]:
    """The devices a truth row's video shows (cohort version 2's `<device>_visible` columns)."""
    if "pacemaker_visible" not in row:
        raise ValueError("truth has no <device>_visible columns: scoring needs a cohort_version 2 cohort")
    return [d for d in DEVICES if row.get(f"{d}_visible") == "1"]
