"""The conversion's second pass: one shard's videos -> records, written so that a crash never leaves a
half shard under its final name.

Each video's kept frames are decoded, blanked outside the scan sector, cropped, resized and JPEG-encoded
into one `tf.train.Example` (data_prep.records). A shard is written to a temporary file by one worker and
published when complete (renamed on local disk, uploaded to a bucket), after its manifest part and its
index, so a rerun skips finished shards (`finished_shards`) and redoes the rest. `ShardTask` is the unit of
work of both runners, local processes and Apache Beam. `--out` and the inputs may be local or gs:// (an
input in a bucket is copied to a local temporary file while it is read).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json

import numpy as np
from PIL import Image

from data_prep import dicom_io, echonet, records, sector
from data_prep.dicom_io import SkipVideo
from data_prep.input_files import local_input
from data_prep.options import Settings
from data_prep.plan import Job, manifest_line
from echoclip_jax.runtime import storage

PARTS = ".parts"  # per-shard manifest parts: a shard is done when it and its part exist
CHECKERS = 16  # finished shards checked at once on resume (each is a few reads: GETs on a bucket)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write (pickled to a worker process or a Beam element)."""

    out_dir: str
    name: str  # the shard's file name, e.g. train-00003-of-00012.tfrecord
    jobs: tuple[Job, ...]
    settings: Settings


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def convert_video(job: Job, settings: Settings) -> bytes:
    """Decode the kept frames, blank outside the sector, crop, resize, JPEG-encode -> serialised Example.

    Bounded: at most settings.max_pixels per frame and settings.time_limit_s per video, else SkipVideo.
    """
    with dicom_io.time_limit(settings.time_limit_s):
        return _convert_video(job, settings)


def _convert_video(job: Job, settings: Settings) -> bytes:
    if job.source == "dicom":
        indices = dicom_io.kept_indices(job.num_frames, settings.frames)
        # Frames come at the smallest scale that keeps 1.25x the output size (600x800 -> 300x400 for 224; JPEG
        # in the DCT domain, others box-reduced), grey ones as one channel: the sector and crop are found on
        # those pixels, the header's regions scaled to match.
        with local_input(job.path) as path:
            raw, scale = dicom_io.read_frames_scaled(
                path, indices, settings.max_pixels, min_side=settings.image_size * 5 // 4, keep_grey=True
            )
        regions = tuple(tuple(v // scale for v in box) for box in job.regions)
        frames = sector.prepare(raw, regions, settings.image_size)
    else:  # EchoNet videos are already masked and cropped: resize only
        indices = dicom_io.kept_indices(job.num_frames, settings.frames) if job.num_frames else None
        with local_input(job.path, echonet.MISSING) as path:
            raw = echonet.read_frames(path, indices)
        if indices is None and settings.frames and len(raw) > settings.frames:
            raw = raw[dicom_io.kept_indices(len(raw), settings.frames)]
        frames = sector.crop_resize(raw, np.ones(raw.shape[1:3], bool), settings.image_size)
    return records.encode_example(
        {
            "video_id": job.video_id,
            "patient_id": job.patient_id,
            "study_id": job.study_id,
            "study_day": job.study_day,
            "frames": [encode_jpeg(f, settings.jpeg_quality) for f in frames],
            "num_frames": len(frames),
            "image_size": settings.image_size,
            "fps": float(job.fps),
            "report": job.report.encode("utf-8"),
            "ef": float(job.ef),
            "source": job.source.encode(),
        }
    )


def _part_path(out_dir: str, name: str) -> str:
    return storage.join(out_dir, PARTS, name + ".jsonl")


def write_shard(task: ShardTask) -> tuple[str, list[dict]]:
    """Convert one shard's videos; the part file is written whole before the shard is published, so a
    shard that exists always has its manifest part. Returns (shard name, manifest lines)."""
    lines = []
    with records.TFRecordWriter(storage.join(task.out_dir, task.name)) as writer:
        for job in task.jobs:
            try:
                writer.write(convert_video(job, task.settings))
                lines.append(manifest_line(job.ref, "converted", "", job.video_id, task.name, job.report_removed))
            except SkipVideo as e:
                lines.append(manifest_line(job.ref, "skipped", str(e), job.video_id))
        storage.write_text(_part_path(task.out_dir, task.name), "".join(json.dumps(line) + "\n" for line in lines))
    return task.name, lines


def shard_done(out_dir: str, name: str) -> list[dict] | None:
    """The manifest lines of a finished shard, or None if it must be (re)done."""
    path, part = storage.join(out_dir, name), _part_path(out_dir, name)
    try:
        lines = storage.read_json_lines(part)
        if len(records.ShardReader(path, verify=False)) != sum(line["status"] == "converted" for line in lines):
            return None
    except (OSError, ValueError, KeyError):  # missing, partial or damaged: redo it
        return None
    return lines


def finished_shards(out_dir: str, names: list[str]) -> dict[str, list[dict]]:
    """{name: manifest lines} of the shards among `names` that are finished. One listing of --out and of
    its parts says which may be; those are checked CHECKERS at a time (a bucket's thousands of shards)."""
    present, parts = set(storage.listdir(out_dir)), set(storage.listdir(storage.join(out_dir, PARTS)))
    candidates = [n for n in names if n in present and n + ".jsonl" in parts]
    if not candidates:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(CHECKERS, len(candidates))) as pool:
        found = dict(zip(candidates, pool.map(lambda n: shard_done(out_dir, n), candidates)))
    return {n: lines for n, lines in found.items() if lines is not None}
