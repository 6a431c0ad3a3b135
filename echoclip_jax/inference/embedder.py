"""Embeddings on the devices: images, texts, and videos of any lengths, in fixed-shape sharded batches.

One `Embedder` serves evaluate (zero-shot tasks, retrieval, patient identification; `embed_split` reads a
split of records), the embed CLI, search and report. Its programs run through
`echoclip_jax.inference.ShardedModel` (parameters replicated on every local device, batches split), and
every call has one of a few fixed shapes, so no length of video triggers a compilation.

Videos of different lengths (every real export): their frames are laid end to end and cut into batches of
`batch_size` frames, so the image tower runs one compiled shape and computes only real frames (the last
batch of a whole run is the only one padded; its padding is dropped). A video's embedding is pooled from
its own frame embeddings: EchoCLIP's mean (model.temporal_pool "mean": the mean of the L2-normalised
frame embeddings, re-normalised) on the host, or the learned attention pool on the devices, over groups
of videos padded with a mask to a bucket length (a power of two, at least 8), so the pool compiles once
per bucket, not once per length. The frame embeddings and per-video `lengths` are kept for the
frame-wise zero-shot rules (`echoclip_jax.evaluation.zero_shot`'s ragged layout).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import numpy as np

from data_prep import records
from data_prep.plan import progress_bar
from echoclip_jax import models
from echoclip_jax.data import loader as data
from echoclip_jax.inference.sharded import ShardedModel
from echoclip_jax.models import CLIP
from echoclip_jax.runtime import storage

CHUNK_BATCHES = 4  # frames gathered on the host before a device call, in batches
POOL_GROUP = 64  # videos per call of the attention pool
MIN_BUCKET = 8


@dataclasses.dataclass
class VideoEmbeddings:
    frames: np.ndarray  # [M, D]: every video's L2-normalised frame embeddings, end to end
    lengths: np.ndarray  # [N] int64: video i owns the next lengths[i] rows of `frames`
    videos: np.ndarray  # [N, D]: L2-normalised video embeddings (the model's temporal pool)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def bucket(length: int) -> int:
    """The padded length of a group of videos whose longest has `length` frames."""
    return max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())


class Embedder:
    """Jitted, batched, device-sharded embedding with one set of weights (`model`, a models.CLIP)."""

    def __init__(self, model, tokenizer=None, *, batch_size: int = 128):
        self.sharded = sm = ShardedModel(model, batch_size=batch_size)
        self.batch_size = sm.batch_size
        self._pool_group = -(-POOL_GROUP // sm.num_devices) * sm.num_devices
        self.tokenizer = tokenizer
        self.embed_dim = int(model.embed_dim)
        self.temporal_pool = "mean" if model.temporal_pool is None else "attention"

        def images(state, x):
            return sm.module(state).encode_image(models.preprocess_images(x), normalize=True)

        def texts(state, tokens):
            return sm.module(state).encode_text(tokens, normalize=True)

        def pool(state, frames, mask):
            return sm.module(state).pool_frames(frames, mask)

        self._images, self._texts, self._pool = jax.jit(images), jax.jit(texts), jax.jit(pool)

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        out = self.sharded.map_batches(fn, x)
        return np.zeros((0, self.embed_dim), np.float32) if out is None else np.asarray(out, np.float32)

    def images(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [M, H, W, 3] -> L2-normalised [M, D] float32."""
        return self._batched(self._images, np.asarray(frames))

    def texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> L2-normalised [N, D] float32 (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this Embedder has no tokenizer: pass one to embed texts")
        tokens = np.asarray(self.tokenizer.encode(list(texts)), dtype=np.int32)
        return self._batched(self._texts, tokens)

    def frame_embeddings(self, videos: Iterable[np.ndarray], lengths: list | None = None) -> np.ndarray:
        """Frame embeddings [M, D] of videos uint8 [T_i, H, W, 3] (any T_i >= 1, one H, W), end to end,
        streamed: frames are sent to the devices in whole batches as they arrive, the remainder of a chunk
        waits for the next video. Appends each video's T_i to `lengths` when given."""
        lengths = [] if lengths is None else lengths
        chunk = self.batch_size * CHUNK_BATCHES
        pending, n_pending, out, shape = [], 0, [], None
        for i, video in enumerate(videos):
            video = np.asarray(video)
            if video.ndim != 4 or video.dtype != np.uint8 or video.shape[-1] != 3 or len(video) == 0:
                raise ValueError(f"video {i}: expected uint8 frames [T >= 1, H, W, 3], got {video.dtype} {video.shape}")
            if shape is not None and video.shape[1:] != shape:
                raise ValueError(
                    f"video {i}: frames of {video.shape[1:]}, earlier videos {shape}; resize to one image size first"
                )
            shape = video.shape[1:]
            lengths.append(len(video))
            pending.append(video)
            n_pending += len(video)
            if n_pending >= chunk:
                flat = np.concatenate(pending)
                full = len(flat) // self.batch_size * self.batch_size
                out.append(self.images(flat[:full]))
                pending, n_pending = [flat[full:]], len(flat) - full
        if n_pending:
            out.append(self.images(np.concatenate(pending)))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def pool(self, frames: np.ndarray, lengths) -> np.ndarray:
        """Video embeddings [N, D] from frame embeddings [M, D] laid end to end with `lengths[N]`, by the
        model's temporal pool (each video from its own frames only)."""
        lengths = np.asarray(lengths, np.int64)
        if len(lengths) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if self.temporal_pool == "mean":
            sums = np.add.reduceat(np.asarray(frames, np.float64), starts, axis=0)
            return _normalize(sums / lengths[:, None])
        out = []
        g = self._pool_group
        for first in range(0, len(lengths), g):
            idx = np.arange(first, min(first + g, len(lengths)))
            t = bucket(int(lengths[idx].max()))
            padded = np.zeros((g, t, frames.shape[1]), np.float32)
            mask = np.zeros((g, t), bool)
            mask[:, 0] = True  # padding videos pool one zero frame (dropped), never an empty softmax
            for row, v in enumerate(idx):
                padded[row, : lengths[v]] = frames[starts[v] : starts[v] + lengths[v]]
                mask[row, : lengths[v]] = True
            pooled = self._pool(self.sharded.state, self.sharded.put(padded), self.sharded.put(mask))
            out.append(np.asarray(pooled, np.float32)[: len(idx)])
        return np.concatenate(out)

    def videos(self, videos: Iterable[np.ndarray]) -> VideoEmbeddings:
        """Frame and video embeddings of videos uint8 [T_i, H, W, 3] of any lengths (see the module doc)."""
        lengths: list = []
        frames = self.frame_embeddings(videos, lengths)
        lengths = np.asarray(lengths, np.int64)
        return VideoEmbeddings(frames=frames, lengths=lengths, videos=self.pool(frames, lengths))


@dataclasses.dataclass
class SplitEmbeddings:
    """A split's embeddings and what evaluation needs beside them (no identifier is ever written out)."""

    frames: np.ndarray  # [M, D] L2-normalised, videos end to end; or dense [N, T, D], laid flat on creation
    videos: np.ndarray  # [N, D]
    patient_id: list
    study_id: list
    study_day: np.ndarray
    report: list[str]
    ef: np.ndarray
    lengths: np.ndarray | None = None  # [N] frames per video; None: `frames` is dense [N, T, D]
    video_id: list | None = None  # [N] the records' salted video ids (to join labels kept elsewhere)

    def __post_init__(self):
        if self.lengths is None:
            dense = np.asarray(self.frames)
            if dense.ndim != 3:
                raise ValueError(f"frames {dense.shape}: dense frames are [N, T, D]; give lengths with [M, D]")
            self.lengths = np.full(len(dense), dense.shape[1], np.int64)
            self.frames = dense.reshape(-1, dense.shape[-1])
        self.lengths = np.asarray(self.lengths, np.int64)
        if int(self.lengths.sum()) != len(self.frames) or len(self.lengths) != len(self.videos):
            raise ValueError(
                f"{len(self.lengths)} lengths summing to {int(self.lengths.sum())} for "
                f"{len(self.frames)} frames of {len(self.videos)} videos"
            )


def embed_split(
    embedder: Embedder, data_dir: str, split: str, *, frames: int | None, image_size: int, progress: str = "auto"
) -> SplitEmbeddings:
    """Every video of a split of records through the image tower, streamed (videos of any lengths;
    `frames` K keeps at most K evenly spaced frames of each, and only those are decoded). `progress`: a bar
    with counts and rate on stderr, "auto" (on a terminal), "on" or "off"."""

    meta = {k: [] for k in ("video_id", "patient_id", "study_id", "study_day", "report", "ef")}
    total = sum(len(r) for r in records.open_shards(records.list_shards(data_dir, split)))  # indexes at once

    def clips(bar):
        for video in data.iterate_videos(data_dir, split, frames=frames, image_size=image_size):
            for k in meta:
                v = video[k]
                meta[k].append(v.decode() if isinstance(v, bytes) else v)
            bar.update()
            yield video["frames"]

    with progress_bar(progress, total, f"embed {split}", "video") as bar:  # counts and rate, on a terminal
        out = embedder.videos(clips(bar))
    if not len(out.lengths):
        raise ValueError(f"{data_dir}: split {split!r} has no videos")
    return SplitEmbeddings(
        frames=out.frames,
        videos=out.videos,
        lengths=out.lengths,
        patient_id=meta["patient_id"],
        study_id=meta["study_id"],
        study_day=np.asarray(meta["study_day"], np.float64),
        report=meta["report"],
        ef=np.asarray(meta["ef"], np.float64),
        video_id=meta["video_id"],
    )


def _check(video, source: str, what: str) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
        raise ValueError(f"{source}: {what}: expected uint8 frames (T >= 1, H, W, 3), got {video.dtype} {video.shape}")
    return video


def embed_images(model: CLIP, images: np.ndarray, batch_size: int = 32, source: str = "images") -> np.ndarray:
    """uint8 (N, H, W, 3) images or (N, T, H, W, 3) videos -> float32 (N, embed_dim), L2-normalised."""
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(
            f"{source}: expected uint8 (N, H, W, 3) images or (N, T, H, W, 3) videos, got {images.dtype} {images.shape}"
        )
    if images.ndim == 5:
        return embed_videos(model, list(images), batch_size, source)
    return Embedder(model, batch_size=batch_size).images(images)


def embed_videos(model: CLIP, videos, batch_size: int = 32, source: str = "videos") -> np.ndarray:
    """Videos uint8 (T_i, H, W, 3) of any lengths -> float32 (N, embed_dim), L2-normalised."""
    videos = [_check(v, source, f"video {i}") for i, v in enumerate(videos)]
    return Embedder(model, batch_size=batch_size).videos(videos).videos


def embed_texts(model: CLIP, tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """list of N strings -> float32 (N, embed_dim), L2-normalised."""
    return Embedder(model, tokenizer, batch_size=batch_size).texts(texts)


def read_images(path: str):
    """A .npy array, or the arrays of a .npz in archive order (one video each); local or gs://."""
    try:
        with storage.local_copy(path) as local:
            if path.endswith(".npz"):
                with np.load(local, allow_pickle=False) as archive:
                    names = list(archive.files)
                    if not names:
                        raise ValueError(f"{path}: the archive holds no arrays (one per video expected)")
                    return [_check(archive[n], path, f"array {n!r}") for n in names]
            return np.load(local, allow_pickle=False)
    except (OSError, ValueError) as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable .npy/.npz array ({e})") from e
