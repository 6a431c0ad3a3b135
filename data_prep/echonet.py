"""EchoNet-Dynamic layout (`Videos/*.avi` + `FileList.csv` with EF and Split): EchoCLIP's external test set.

The videos are already cropped and masked (112x112 in EchoNet-Dynamic, 224x224 in EchoCLIP's example), so
they are only resized; the EF label from FileList.csv is kept. AVI is read with PyAV (BSD; FFmpeg is
dynamically linked LGPL), decoding sequentially and converting to RGB only the frames that are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math

import av
import numpy as np

from data_prep.dicom_io import SkipVideo
from echoclip_jax.runtime import storage

_SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}
MISSING = "video file missing"  # the manifest's reason for a FileList row without its video


@dataclasses.dataclass(frozen=True)
class EchoNetEntry:
    name: str  # FileName without extension (EchoNet names are hashes, not PHI)
    path: str  # Videos/<name>.avi, absolute (or a gs:// URL)
    ef: float  # NaN when missing
    split: str | None  # train/val/test, or None when FileList has no usable Split
    fps: float  # from FileList.csv, 0 when absent (the container's rate is used then)


def read_filelist(echonet_dir: str) -> tuple[list[EchoNetEntry], list[tuple[str, str]]]:
    """Rows of FileList.csv -> (entries, [(name, reason)] of rows that cannot be used)."""
    path = storage.join(echonet_dir, "FileList.csv")
    try:
        rows = list(csv.DictReader(io.StringIO(storage.read_text(path), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read FileList.csv ({type(e).__name__}: {e})") from None
    if not rows or "FileName" not in rows[0]:
        raise ValueError(f"{path}: no FileName column (columns: {list(rows[0]) if rows else 'none'})")
    entries, bad = [], []
    for row in rows:
        name = (row.get("FileName") or "").strip()
        if not name:
            bad.append(("<empty FileName>", "FileList row without FileName"))
            continue
        name = name[:-4] if name.lower().endswith(".avi") else name
        try:
            ef = float(row.get("EF") or "nan")
        except ValueError:
            ef = math.nan
        split_value = (row.get("Split") or "").strip().upper()
        split = _SPLITS.get(split_value)
        if split_value and split is None:
            bad.append((name, f"unknown Split value {split_value!r}"))
            continue
        try:
            fps = float(row.get("FPS") or 0)
        except ValueError:
            fps = 0.0
        entries.append(EchoNetEntry(name, storage.join(echonet_dir, "Videos", name + ".avi"), ef, split, fps))
    return entries, bad


def probe(path: str) -> tuple[int, float]:
    """(frame count, fps) from the container header, without decoding; count 0 if the header lacks it."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            return int(stream.frames or 0), rate
    except FileNotFoundError:
        raise SkipVideo(MISSING) from None
    except (av.FFmpegError, IndexError) as e:
        raise SkipVideo(f"unreadable video ({type(e).__name__})") from None


def read_frames(path: str, indices: list[int] | None) -> np.ndarray:
    """Frames `indices` (all when None) -> uint8 [K, H, W, 3] RGB; only kept frames are converted."""
    wanted = None if indices is None else set(indices)
    frames: dict[int, np.ndarray] = {}
    last = None if indices is None else max(indices)
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if last is not None and i >= last:
                    break
    except FileNotFoundError:
        raise SkipVideo(MISSING) from None
    except (av.FFmpegError, IndexError) as e:
        raise SkipVideo(f"unreadable video ({type(e).__name__})") from None
    order = sorted(frames) if indices is None else indices
    missing = [i for i in order if i not in frames]
    if not order or missing:
        raise SkipVideo(f"video has {len(frames)} decodable frames, {len(order)} needed")
    return np.stack([frames[i] for i in order])
