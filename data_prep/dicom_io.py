"""Reading ultrasound DICOM: the header fields the conversion needs, and only the frames that are kept.

Every common encoding is handled through pydicom 3 (+ pylibjpeg): native RGB / MONOCHROME1/2 / PALETTE
COLOR / YBR_FULL(_422) in either endianness, JPEG Baseline, JPEG 2000 and RLE, single- or multi-frame.
`pydicom.pixels.iter_pixels(path, indices=...)` decodes only the requested frames (for encapsulated
data only those frames' fragments), so subsampling K of N frames costs K decodes, not N. YBR JPEG Baseline,
ultrasound's usual encoding, skips pydicom's decode machinery: Pillow decodes each kept frame's own bytes
(the same pixels, at a fraction of the cost; BENCHMARKS.md), optionally at a reduced DCT scale
(read_frames_scaled); other encodings are box-reduced by the same scale right after decoding, and
monochrome ones may stay one channel.

Every input is bounded: non-regular files are refused unopened, Rows x Columns above `max_pixels` is
refused from the header, and `time_limit` bounds the work on one video.

Identifying header values (patient id, UIDs, accession, date, and the names and ids its study's report
must not carry) are returned in `HeaderKeys` only so the caller can derive salted hashes and day offsets
and scrub the report; nothing here writes them anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import signal
import stat
import threading
import time
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, iter_pixels

from data_prep import report_identifiers

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
MAX_PIXELS = 2048 * 2048  # default cap on Rows x Columns: a 65535 x 65535 header must not allocate 12 GB


class SkipVideo(Exception):
    """This input cannot be converted; the message is the (PHI-free) reason for the manifest."""


class TimeLimitExceeded(SkipVideo):
    """Raised inside a conversion that ran past its time limit (time_limit)."""


_deadline = threading.local()


def _check_deadline() -> None:
    limit = getattr(_deadline, "at", None)
    if limit is not None and time.monotonic() > limit[0]:
        raise TimeLimitExceeded(f"took longer than the time limit ({limit[1]:g} s)")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Bound the enclosed work to `seconds`: SIGALRM interrupts it in the main thread (also inside one long
    decode), and read_frames checks the deadline between frames in any thread (e.g. a Beam worker)."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = (time.monotonic() + seconds, seconds)
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if use_alarm:

        def _on_alarm(signum, frame):
            raise TimeLimitExceeded(f"took longer than the time limit ({seconds:g} s)")

        old_handler = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        _deadline.at = previous


@dataclasses.dataclass(frozen=True)
class HeaderKeys:
    """Identifying values, used only to derive hashes and study days; never stored."""

    patient_id: str
    study_uid: str
    accession: str
    sop_uid: str
    study_date: datetime.date | None
    identifiers: tuple[tuple[str, str], ...] = ()  # (category, value): names, ids, institution, to scrub reports


@dataclasses.dataclass(frozen=True)
class Header:
    keys: HeaderKeys
    num_frames: int
    rows: int
    cols: int
    fps: float  # 0.0 when unknown
    spacing_mm: tuple[float, float] | None  # (row, column) pixel spacing
    regions: tuple[tuple[int, int, int, int], ...]  # 2D tissue regions (x0, y0, x1, y1), inclusive


def _parse_date(value) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _float(ds, keyword: str) -> float:
    try:
        value = float(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0.0
    return value if np.isfinite(value) and value > 0 else 0.0


def frame_rate(ds) -> float:
    """Frames per second from FrameTime (ms), else FrameTimeVector, CineRate, RecommendedDisplayFrameRate."""
    frame_time = _float(ds, "FrameTime")
    if frame_time:
        return 1000.0 / frame_time
    vector = ds.get("FrameTimeVector")
    if vector:
        try:
            steps = [float(v) for v in list(vector)[1:] if float(v) > 0]
        except (TypeError, ValueError):
            steps = []
        if steps:
            return 1000.0 / float(np.mean(steps))
    return _float(ds, "CineRate") or _float(ds, "RecommendedDisplayFrameRate")


def _tissue_regions(ds) -> tuple[tuple[tuple[int, int, int, int], ...], tuple[float, float] | None]:
    """2D tissue regions of SequenceOfUltrasoundRegions and their spacing in mm (units code 3 = cm)."""
    regions, spacing = [], None
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        if int(item.get("RegionSpatialFormat", 0) or 0) != 1:  # 1 = 2D (B-mode); skip M-mode, Doppler, ECG
            continue
        try:
            box = tuple(
                int(item[k].value)
                for k in ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
            )
        except (KeyError, TypeError, ValueError):
            continue
        regions.append(box)
        if spacing is None and int(item.get("PhysicalUnitsXDirection", 0) or 0) == 3:
            dx, dy = float(item.get("PhysicalDeltaX", 0) or 0), float(item.get("PhysicalDeltaY", 0) or 0)
            if dx > 0 and dy > 0:
                spacing = (abs(dy) * 10.0, abs(dx) * 10.0)
    return tuple(regions), spacing


def _open_regular(path: str) -> None:
    """Refuse what is not a regular file (FIFO, device, dangling or looping symlink) before opening it:
    opening a FIFO would block forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SkipVideo(f"cannot stat the file ({os.strerror(e.errno) if e.errno else type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        raise SkipVideo("not a regular file")
    if os.path.getsize(path) == 0:
        raise SkipVideo("empty file")


def read_header(path: str, max_pixels: int = MAX_PIXELS) -> Header:
    """Header fields only (pixel data not read). Raises SkipVideo with a reason for unusable files,
    including frames of more than `max_pixels` pixels (so a huge Rows x Columns is never allocated)."""
    _open_regular(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise SkipVideo("not a DICOM file") from None
    except SkipVideo:
        raise
    except Exception as e:  # truncated or malformed headers raise many types
        raise SkipVideo(f"unreadable DICOM header ({type(e).__name__})") from None
    try:  # values are parsed lazily: a damaged one raises on first access, with many exception types
        return _header_from(ds, max_pixels)
    except SkipVideo:
        raise
    except Exception as e:
        raise SkipVideo(f"malformed DICOM header value ({type(e).__name__})") from None


def _header_from(ds, max_pixels: int) -> Header:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise SkipVideo("no image: Rows/Columns missing") from None
    try:
        value = ds.get("NumberOfFrames")
        num_frames = 1 if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise SkipVideo("invalid NumberOfFrames") from None
    if num_frames < 1:
        raise SkipVideo("zero frames")
    if rows < 16 or cols < 16:
        raise SkipVideo(f"image too small ({rows}x{cols})")
    if rows * cols > max_pixels:
        raise SkipVideo(f"image too large ({rows}x{cols} > {max_pixels} pixels, see --max_pixels)")
    regions, spacing = _tissue_regions(ds)
    if spacing is None and "PixelSpacing" in ds:
        try:
            spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        except (TypeError, ValueError, IndexError):
            spacing = None
    keys = HeaderKeys(
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_date=_parse_date(ds.get("StudyDate", "") or ds.get("AcquisitionDate", "") or ""),
        identifiers=report_identifiers.identifiers_from_dataset(ds),
    )
    return Header(keys, num_frames, rows, cols, frame_rate(ds), spacing, regions)


def kept_indices(num_frames: int, max_frames: int) -> list[int]:
    """All frames up to max_frames, else max_frames evenly spaced over the whole video (0 = no cap)."""
    if max_frames <= 0 or num_frames <= max_frames:
        return list(range(num_frames))
    return [int(round(x)) for x in np.linspace(0, num_frames - 1, max_frames)]


def _to_rgb8(arr: np.ndarray, ds, lut_shift: int, keep_grey: bool = False) -> np.ndarray:
    """One decoded frame -> uint8 [H, W, 3] RGB, whatever the photometric interpretation and bit depth
    ([H, W, 1] for monochrome with keep_grey: a third of the memory and work until the pipeline's end)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = np.right_shift(apply_color_lut(arr, ds), lut_shift).astype(np.uint8)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if photometric.startswith("MONOCHROME") and bits > 8:  # window to the frame's own range
            lo, hi = float(arr.min()), float(arr.max())
            arr, top = arr - lo, max(hi - lo, 1.0)
        else:
            top = float(2**bits - 1)
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    if arr.ndim == 2:
        arr = arr[..., None] if keep_grey else np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in ((1, 3) if keep_grey else (3,)):
        raise SkipVideo(f"unsupported pixel layout {arr.shape} ({photometric})")
    return arr


def _palette_shift(ds) -> int:
    """Palette LUT entries are 16-bit (scale down by 8 bits) or, in some files, already 8-bit."""
    if str(ds.get("PhotometricInterpretation", "")).upper() != "PALETTE COLOR":
        return 0
    try:
        top = int(apply_color_lut(np.arange(256, dtype=np.uint8), ds).max())
    except Exception as e:
        raise SkipVideo(f"invalid palette colour lookup table ({type(e).__name__})") from None
    return 8 if top > 255 else 0


def read_frames(path: str, indices: list[int], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode only frames `indices` of the file -> uint8 [K, H, W, 3] RGB. Raises SkipVideo on failure."""
    return read_frames_scaled(path, indices, max_pixels)[0]


def draft_scale(rows: int, cols: int, min_side: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4, 8) that keeps the shorter side >= min_side pixels."""
    scale = 1
    while scale < 8 and min(rows, cols) // (scale * 2) >= min_side:
        scale *= 2
    return scale


def box_reduce(frame: np.ndarray, scale: int) -> np.ndarray:
    """Box average over scale x scale blocks (Pillow's reduce; a last partial block averages what it has,
    so the size rounds up as JPEG's DCT scaling does)."""
    if scale == 1:
        return frame
    grey = frame.shape[-1] == 1
    small = np.asarray(Image.fromarray(frame[..., 0] if grey else frame).reduce(scale))
    return small[..., None] if grey else small


def read_frames_scaled(
    path: str, indices: list[int], max_pixels: int = MAX_PIXELS, min_side: int = 0, keep_grey: bool = False
) -> tuple[np.ndarray, int]:
    """Like read_frames, but at 1/scale size (scale from draft_scale, so the shorter side stays >= min_side;
    1 for min_side=0). JPEG Baseline frames are decoded at that size (libjpeg scales in the DCT domain,
    several times cheaper than a full decode and as good as decoding and then shrinking); other encodings
    are box-reduced as each frame is decoded, so nothing downstream touches full-resolution pixels.
    With keep_grey, monochrome videos come back [K, H, W, 1]. Returns (frames, scale)."""
    _open_regular(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except SkipVideo:
        raise
    except Exception as e:
        raise SkipVideo(f"unreadable DICOM header ({type(e).__name__})") from None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise SkipVideo("no image: Rows/Columns missing or malformed") from None
    if not 0 < rows * cols <= max_pixels:
        raise SkipVideo(f"image size {rows}x{cols} outside 1..{max_pixels} pixels")
    frames, scale = [], draft_scale(rows, cols, min_side) if min_side else 1
    try:
        if _pillow_decodes(ds):
            source = _jpeg_frames(path, ds, indices, rows, cols, scale)
        else:
            lut_shift = _palette_shift(ds)
            source = (
                box_reduce(_to_rgb8(arr, ds, lut_shift, keep_grey), scale) for arr in iter_pixels(path, indices=indices)
            )
        for frame in source:
            _check_deadline()
            frames.append(frame)
    except SkipVideo:
        raise
    except NotImplementedError:
        raise SkipVideo(f"unsupported transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}") from None
    except AttributeError as e:
        if "PixelData" in str(e) or "Pixel Data" in str(e):
            raise SkipVideo("no PixelData") from None
        raise SkipVideo(f"cannot decode pixels (AttributeError: {_short(e)})") from None
    except Exception as e:
        raise SkipVideo(f"cannot decode pixels ({type(e).__name__}: {_short(e)})") from None
    if len(frames) != len(indices):
        raise SkipVideo(f"decoded {len(frames)} of {len(indices)} frames")
    return np.stack(frames), scale


def _pillow_decodes(ds) -> bool:
    """8-bit YBR_FULL(_422) JPEG Baseline, ultrasound's usual encoding: Pillow's libjpeg decodes each
    frame's bytes straight to RGB, the pixels pydicom returns, at about a third of pydicom's cost."""
    return (
        str(ds.file_meta.get("TransferSyntaxUID", "")) == JPEG_BASELINE
        and str(ds.get("PhotometricInterpretation", "")).upper() in ("YBR_FULL_422", "YBR_FULL")
        and int(ds.get("SamplesPerPixel", 0) or 0) == 3
        and int(ds.get("BitsAllocated", 0) or 0) == 8
    )


def _jpeg_frames(path: str, header, indices: list[int], rows: int, cols: int, scale: int):
    """Yield RGB frames `indices` from their own JPEG bytes; a frame whose JPEG size disagrees with
    Rows/Columns is refused before it is decoded (it could claim any size)."""
    with warnings.catch_warnings(record=True) as caught:  # pydicom drops a truncated PixelData, warning
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)  # the encapsulated (compressed) bytes only; frames are decoded below
    if "PixelData" not in ds:
        if any("End of file" in str(w.message) for w in caught):
            raise SkipVideo("cannot decode pixels (the file ends inside PixelData: truncated)")
        raise SkipVideo("no PixelData")
    value = header.get("NumberOfFrames")
    n = 1 if value in (None, "") else int(value)
    for i in indices:
        if not 0 <= i < n:
            raise SkipVideo(f"frame {i} outside NumberOfFrames {n}")
        image = Image.open(io.BytesIO(get_frame(ds.PixelData, i, number_of_frames=n)), formats=["JPEG"])
        if image.size != (cols, rows) or image.mode != "RGB":
            raise SkipVideo(
                f"JPEG frame {i} is {image.size[0]}x{image.size[1]} {image.mode}, the header says {cols}x{rows} RGB"
            )
        if scale > 1:
            image.draft("RGB", (cols // scale, rows // scale))
        yield np.asarray(image)


def _short(e: Exception) -> str:
    """An exception message cut short, without paths (a path may carry PHI)."""
    text = str(e).split("\n")[0]
    for sep in (os.sep, "'/"):
        if sep in text:
            text = text.split(sep)[0].rstrip(" '\"") + " ..."
            break
    return text[:120]
