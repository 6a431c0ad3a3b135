"""Embeddings for search and reports: the model an index was built with, records and DICOM files streamed
through `echoclip_jax.inference.embedder.Embedder`, and study embeddings.

A video's embedding is the model's temporal pool of its frames (EchoCLIP: the mean of the L2-normalised
frame embeddings); a study's is the mean of its videos' L2-normalised embeddings, re-normalised. Records
are read with the project's record reader and only videos not already indexed are decoded; a DICOM file is
read with data_prep's own decode and sector masking, as its records were made (`read_video`). A query video
or study directory may be a local path or a gs:// URL (a bucket's file is read from a temporary local copy:
the DICOM and video readers read only local files).
"""

from __future__ import annotations

import hashlib
import logging
import os

import ml_collections
import numpy as np

from data_prep import dicom_io, records, sector
from echoclip_jax import tokenizers
from echoclip_jax.data import loader as data
from echoclip_jax.inference.embedder import Embedder
from echoclip_jax.interpret import load_video
from echoclip_jax.retrieval.archive import normalize
from echoclip_jax.runtime import storage
from echoclip_jax.weights import loader as weights

log = logging.getLogger(__name__)

CHUNK_BATCHES = 16  # frames gathered (in device batches) before an embedding call


def describe_model(checkpoint: str, config, *, frames: int | None) -> dict:
    """What index.json stores so later queries and additions use the same model and inputs."""
    return {
        "checkpoint": checkpoint,
        "model_config": config.model.to_dict(),
        "tokenizer": config.tokenizer.to_dict(),
        "image_size": int(config.model.vision.image_size),
        "frames": frames,
    }


def load_embedder(model: dict, *, batch_size: int = 128, with_tokenizer: bool = True):
    """An Embedder for the model an index describes (`describe_model`); loaded through weights.load."""

    mc = ml_collections.ConfigDict(model["model_config"])
    net = weights.load_model(model["checkpoint"], mc)
    tok = tokenizers.from_config(ml_collections.ConfigDict(model["tokenizer"])) if with_tokenizer else None
    embedder = Embedder(net, tok, batch_size=batch_size)
    embedder.fingerprint = fingerprint(embedder, mc)
    return embedder


def fingerprint(embedder, model_config) -> list[float]:
    """The first values of the embedding of a fixed image: two checkpoints with different weights (a
    retrained model under the same path) give different fingerprints, and their embeddings must not mix."""
    size = int(model_config.vision.image_size)
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return [round(float(v), 4) for v in embedder.images(image)[0, :8]]


def same_model(a: list, b: list) -> bool:
    return a is not None and b is not None and len(a) == len(b) and np.allclose(a, b, atol=2e-3)


def max_frames_of(data_dir: str) -> int | None:
    """The frames per video data_prep kept (dataset_info.json's max_frames), to read a DICOM query alike."""
    try:
        return int(storage.load_json(storage.join(data_dir, "dataset_info.json")).get("max_frames") or 0) or None
    except (OSError, ValueError):
        return None


def _text(feats: dict, key: str) -> str:
    return feats[key][0].decode("utf-8") if feats.get(key) else ""


def record_videos(
    data_dir: str,
    split: str,
    *,
    skip=frozenset(),
    skipped: list | None = None,
    frames: int | None,
    image_size: int | None,
):
    """(metadata, uint8 frames [K, S, S, 3]) of every video of a split whose video_id is not in `skip`, in
    shard order; only those videos' frames are decoded. Metadata: video_id, study_id, patient_id, split,
    report (the de-identified text the record holds). `frames` K keeps K evenly spaced frames; the ids
    skipped are appended to `skipped`."""

    source = data.ShardedRecords(data_dir, split)
    for i in range(len(source)):
        feats = records.decode_example(source[i])
        video_id = _text(feats, "video_id")
        if video_id in skip:
            if skipped is not None:
                skipped.append(video_id)
            continue
        jpegs = data.decode_frames(feats, f"{data_dir} {split} record {i}")
        keep = data.pick_frames(len(jpegs), min(frames, len(jpegs)), None) if frames else range(len(jpegs))
        meta = {
            "video_id": video_id,
            "study_id": _text(feats, "study_id"),
            "patient_id": _text(feats, "patient_id"),
            "split": split,
            "report": _text(feats, "report"),
        }
        size = int(image_size or feats["image_size"][0])  # None: the size the records hold
        yield meta, np.stack([data.decode_jpeg(jpegs[j], size) for j in keep])


def embed_stream(embedder, items, *, label: str = "", every: int = 500):
    """(metadata list, video embeddings [N, D]) of an iterator of (metadata, frames), embedded in chunks
    of about CHUNK_BATCHES device batches of frames, so memory stays bounded however many videos; every
    `every` videos a log line (`label`: what is embedded)."""
    metas, out, pending, n_frames, done = [], [], [], 0, 0
    limit = embedder.batch_size * CHUNK_BATCHES

    def flush():
        nonlocal pending, n_frames, done
        if pending:
            out.append(embedder.videos([f for _, f in pending]).videos)
            metas.extend(m for m, _ in pending)
            done += len(pending)
            if (done // every) != ((done - len(pending)) // every):
                log.info("%sembedded %d videos", f"{label}: " if label else "", done)
        pending, n_frames = [], 0

    for meta, frames in items:
        pending.append((meta, frames))
        n_frames += len(frames)
        if n_frames >= limit:
            flush()
    flush()
    dim = embedder.embed_dim
    return metas, (np.concatenate(out) if out else np.zeros((0, dim), np.float32))


def study_means(study_ids: list, video_vectors: np.ndarray) -> tuple[list, np.ndarray]:
    """(study ids in first-seen order, [S, D] study embeddings: the re-normalised mean of each study's
    L2-normalised video embeddings)."""
    order = list(dict.fromkeys(study_ids))
    row = {s: i for i, s in enumerate(order)}
    sums = np.zeros((len(order), video_vectors.shape[1]), np.float64)
    np.add.at(sums, np.asarray([row[s] for s in study_ids], np.int64), normalize(video_vectors))
    return order, normalize(sums)


def dicom_name(path: str) -> str:
    """A file's name in outputs: a hash of its path (file names and headers may carry PHI)."""
    return "dicom-" + hashlib.sha256(os.fspath(storage.path(path)).encode()).hexdigest()[:12]


VIDEO_EXTENSIONS = (".dcm", ".avi", ".npy")


def video_files(path: str) -> list[str]:
    """A video file, or the video files (.dcm, .avi, .npy) under a study directory, sorted, for a query
    (local paths or gs:// URLs)."""
    if storage.isdir(path):
        found = [storage.join(path, r) for r in storage.files_under(path) if r.lower().endswith(VIDEO_EXTENSIONS)]
        if not found:
            raise FileNotFoundError(
                f"{path}: no .dcm, .avi or .npy files under this directory (a study directory "
                f"of videos, or one video file, is expected)"
            )
        return found
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such video file or study directory")
    return [path]


def read_video(path: str, *, image_size: int, frames: int | None) -> np.ndarray:
    """uint8 [K, S, S, 3] frames of a video file as data_prep.convert would store them. DICOM: data_prep's
    own calls (its kept frames, decoded at the reduced scale it uses, the header's regions scaled alike, the
    sector masked and cropped by data_prep.sector). The sector mask is found from motion, so it depends on
    the decode scale: `interpret.load_video`'s full-resolution decode differs from the records by 17-32 grey
    levels (mean absolute, 32-64 px), this read by JPEG noise (1.4). AVI and .npy: interpret.load_video."""

    if not path.lower().endswith(".dcm"):
        return load_video(path, image_size=image_size, frames=frames or 0).frames
    try:
        header = dicom_io.read_header(path)
        indices = dicom_io.kept_indices(header.num_frames, frames or 0)
        raw, scale = dicom_io.read_frames_scaled(path, indices, min_side=image_size * 5 // 4, keep_grey=True)
    except dicom_io.SkipVideo as e:
        raise ValueError(f"{path}: cannot read this DICOM video ({e})") from None
    regions = tuple(tuple(v // scale for v in box) for box in header.regions)
    return sector.prepare(raw, regions, image_size)


def embed_files(embedder, paths: list[str], *, image_size: int, frames: int | None) -> np.ndarray:
    """Video embeddings [N, D] of DICOM, AVI or .npy files (local or gs://), read as `read_video` does."""
    videos = []
    for p in paths:
        with storage.local_copy(p) as local:
            try:
                videos.append(read_video(local, image_size=image_size, frames=frames))
            except ValueError as e:  # name the user's file, not a bucket file's temporary copy
                raise ValueError(str(e).replace(local, os.fspath(p))) from None
    return embedder.videos(videos).videos
