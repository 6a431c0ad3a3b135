"""Videos as the model sees them, from any source: a DICOM, AVI or .npy file read the way data_prep.convert
reads it, or a video of the records; and the scan sector in the model's pixels.

A video file may be a local path or a gs:// URL (read through a local temporary copy). A DICOM is read
through data_prep's own functions (`dicom_io.kept_indices`, `read_frames`, `sector.sector_mask`,
`sector.crop_resize`), so its frames are what a record of it would hold: scan sector only, burned-in text
outside it never reaches a caller. A DICOM's name is a hash of its path, never its file name or a header value;
a record's is its salted video id. AVI and .npy files (blank outside the sector, like EchoNet) are resized only.

`sector_from_frames` is the sector when only the frames are known (records, AVI, .npy): data_prep blanks
everything outside the sector, so it is where any frame is brighter than JPEG's ringing on black.
`to_output` carries masks found on a file's pixels through the same crop and resize as its frames.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
from scipy import ndimage

from data_prep import dicom_io, echonet, sector
from data_prep.dicom_io import SkipVideo
from echoclip_jax.data import loader as data
from echoclip_jax.runtime import storage

HALF = 128  # a resized 0/255 mask pixel at least half covered belongs to the mask
DARK = 12  # grey levels: above JPEG ringing on the black outside the fan (records: <= 6), below speckle


@dataclasses.dataclass
class Video:
    name: str  # output directory name: never a DICOM file name or header value
    source: str  # dicom | avi | npy | record
    frames: np.ndarray  # uint8 [K, S, S, 3]
    frame_indices: list[int] | None  # which frames of the file (records: of the record) were kept
    video_id: str = ""  # records: the salted hash
    sector: np.ndarray | None = None  # boolean [S, S] scan sector; None: sector_from_frames(frames)


def load_video(path: str, *, image_size: int, frames: int = 0) -> Video:
    """A .dcm, .avi or .npy video (a local path or a gs:// URL) as uint8 [K, image_size, image_size, 3],
    K = `frames` evenly spaced frames (0 = all). DICOM: scan sector masked and cropped as data_prep does;
    AVI and .npy (already masked, like EchoNet): resized only."""

    if not storage.exists(path) or storage.isdir(path):
        raise FileNotFoundError(f"{path}: no such video file")
    with storage.local_copy(path) as local:  # pydicom and PyAV read local files
        return _load_local(local, path, image_size, frames)


def _load_local(path: str, given: str, image_size: int, frames: int) -> Video:
    """load_video of the local file `path`, named after the path or URL the caller `given`."""
    ext = os.path.splitext(given)[1].lower()
    try:
        if ext == ".dcm":
            header = dicom_io.read_header(path)
            indices = dicom_io.kept_indices(header.num_frames, frames)
            raw = dicom_io.read_frames(path, indices)
            found = sector.sector_mask(raw, header.regions)
            out = sector.crop_resize(raw, found, image_size)
            name = "dicom-" + hashlib.sha256(os.fspath(storage.path(given)).encode()).hexdigest()[:12]
            return Video(name, "dicom", out, indices, sector=to_output(found, found, image_size))
        if ext == ".avi":
            raw = echonet.read_frames(path, None)
            indices = dicom_io.kept_indices(len(raw), frames)
            out = sector.crop_resize(raw[indices], np.ones(raw.shape[1:3], bool), image_size)
            return Video(_safe_name(given), "avi", out, indices)
        if ext == ".npy":
            raw = _read_npy(path, given)
            indices = dicom_io.kept_indices(len(raw), frames)
            out = sector.crop_resize(raw[indices], np.ones(raw.shape[1:3], bool), image_size)
            return Video(_safe_name(given), "npy", out, indices)
    except SkipVideo as e:
        raise ValueError(f"{given}: cannot read video ({e})") from None
    raise ValueError(f"{given}: unsupported video type {ext!r}; expected .dcm, .avi or .npy")


def _read_npy(path: str, given: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{given}: not a readable .npy array ({e})") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"{given}: expected uint8 RGB frames [T, H, W, 3] or [H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def _safe_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "video"


def record_videos(data_dir: str, split: str, *, image_size: int, frames: int = 0, limit: int = 0):
    """Videos of a split of records (data_prep.convert output), named by their salted video_id; `frames`
    of the record's frames picked as evaluation does (data.pick_frames), their positions in frame_indices."""
    for i, item in enumerate(data.iterate_videos(data_dir, split, frames=frames or None, image_size=image_size)):
        if limit and i >= limit:
            return
        video_id = str(item["video_id"])
        yield Video(_safe_name(video_id), "record", np.asarray(item["frames"], np.uint8), item["positions"], video_id)


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
    found = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return sector.fill_rows(found)  # a fan is convex along every row (data_prep's rule)


def to_output(masks: np.ndarray, sector_mask: np.ndarray, image_size: int) -> np.ndarray:
    """Masks [K, H, W] (or one [H, W]; boolean, or uint8 coverage 0..255) in the frame that `sector_mask`
    was found on -> boolean [K, S, S] (or [S, S]) in the output frame: through `sector.crop_resize` as a
    grey video, then at least half covered."""
    one = masks.ndim == 2
    grey = np.asarray(masks)[None] if one else np.asarray(masks)
    grey = grey.astype(np.uint8) * 255 if grey.dtype == bool else grey.astype(np.uint8)
    out = sector.crop_resize(grey[..., None], sector_mask, image_size)[..., 0] >= HALF
    return out[0] if one else out
