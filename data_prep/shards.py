"""The conversion's second pass: one shard's videos -> records, written so that a crash never leaves a
half shard under its final name.

Each video's kept frames are decoded, blanked outside the scan sector, cropped, resized and JPEG-encoded
into one `tf.train.Example` (data_prep.records). A shard is written to a temporary file by one worker and
renamed when complete, after its manifest part, so a rerun skips finished shards (`shard_done`) and redoes
the rest. `ShardTask` is the unit of work of both runners, local processes and Apache Beam.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image

from data_prep import dicom_io, echonet, records, sector
from data_prep.dicom_io import SkipVideo
from data_prep.options import Settings
from data_prep.plan import Job, manifest_line

PARTS = ".parts"  # per-shard manifest parts: a shard is done when it and its part exist


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
        raw, scale = dicom_io.read_frames_scaled(
            job.path, indices, settings.max_pixels, min_side=settings.image_size * 5 // 4, keep_grey=True
        )
        regions = tuple(tuple(v // scale for v in box) for box in job.regions)
        frames = sector.prepare(raw, regions, settings.image_size)
    else:  # EchoNet videos are already masked and cropped: resize only
        indices = dicom_io.kept_indices(job.num_frames, settings.frames) if job.num_frames else None
        raw = echonet.read_frames(job.path, indices)
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
    return os.path.join(out_dir, PARTS, name + ".jsonl")


def write_shard(task: ShardTask) -> tuple[str, list[dict]]:
    """Convert one shard's videos; the part file is renamed before the shard, so a shard that exists
    always has its manifest part. Returns (shard name, manifest lines)."""
    lines = []
    with records.TFRecordWriter(os.path.join(task.out_dir, task.name)) as writer:
        for job in task.jobs:
            try:
                writer.write(convert_video(job, task.settings))
                lines.append(manifest_line(job.ref, "converted", "", job.video_id, task.name, job.report_removed))
            except SkipVideo as e:
                lines.append(manifest_line(job.ref, "skipped", str(e), job.video_id))
        part = _part_path(task.out_dir, task.name)
        with open(part + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(part + ".tmp", part)
    return task.name, lines


def shard_done(out_dir: str, name: str) -> list[dict] | None:
    """The manifest lines of a finished shard, or None if it must be (re)done."""
    path, part = os.path.join(out_dir, name), _part_path(out_dir, name)
    if not (os.path.exists(path) and os.path.exists(part)):
        return None
    with open(part) as f:
        lines = [json.loads(line) for line in f]
    try:
        if len(records.ShardReader(path, verify=False)) != sum(line["status"] == "converted" for line in lines):
            return None
    except (OSError, records.CorruptRecordError):
        return None
    return lines
