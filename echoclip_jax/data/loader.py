"""Input pipeline: grain random access over the indexed TFRecord shards of data_prep.

Training stream: global sample g (0, 1, 2, ...) is record `perm_epoch[g % n]` of epoch `g // n`, with
a fresh permutation per epoch from (seed, epoch). Global batch b is samples [b*B, (b+1)*B); process p
reads only its contiguous slice of each batch, so the assembled global batch is the same for any
process count. The frame (or frames) of a video and the augmentation are drawn from (seed, epoch,
record), so a new frame is seen each epoch and a resumed run sees exactly the samples it would have
seen: the grain iterator state (one integer per process) is saved with each checkpoint.

`config.data_dir` is a local folder or a gs:// URL (data_prep.records reads either). Each batch's records
are fetched together (`ShardedRecords.read_many`: on a bucket one ranged GET per record, all in flight at
once; locally a pread each), then decoded; grain computes READ_THREADS batches at once in each process
(ReadOptions), so a process keeps up to READ_THREADS x its batch slice of GETs in flight (gcsfs's connection
pool, 100 per process, bounds it), and `data.num_workers` processes multiply that. Read-ahead is bounded in
batches (READ_AHEAD), not grain's default of 500 elements, which would be 500 batches here.
"""

from __future__ import annotations

import io
import logging
import math

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from data_prep import records
from echoclip_jax import tokenizers
from echoclip_jax.runtime import sharding

log = logging.getLogger(__name__)

# grain's threads per process, each computing one batch (its reads in flight together, then its decoding);
# with worker processes each worker gets WORKER_READ_THREADS. Read-ahead: batches ready or in flight.
READ_THREADS, WORKER_READ_THREADS = 16, 4
READ_AHEAD = 2  # x the threads
VIDEO_CHUNK = 32  # records fetched together by iterate_videos


class ShardedRecords(grain.sources.RandomAccessDataSource):
    """All records of one split, numbered across its shards in shard order (through the .index files)."""

    def __init__(self, data_dir: str, split: str, verify: bool = True):
        self.paths = records.list_shards(data_dir, split)
        if not self.paths:
            raise FileNotFoundError(f"{data_dir}: no {split}-NNNNN-of-MMMMM.tfrecord shards")
        self._readers = records.open_shards(self.paths, verify=verify)  # a bucket's indexes fetched together
        self._starts = np.cumsum([0] + [len(r) for r in self._readers])
        if self._starts[-1] == 0:
            raise ValueError(f"{data_dir}: the {split} shards hold no records")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[records.ShardReader, int]:
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._readers[s], int(i - self._starts[s])

    def __getitem__(self, i: int) -> bytes:
        reader, j = self._locate(i)
        return reader[j]

    def read_many(self, indices) -> list:
        """Records `indices` at once (on a bucket their GETs in flight together): each its bytes, or the
        records.CorruptRecordError it failed with."""
        return records.read_records([self._locate(int(i)) for i in indices])


def decode_frames(feats: dict, where: str) -> list[bytes]:
    frames = feats.get("frames") or []
    if not frames:
        raise ValueError(f"{where}: record has no frames")
    return frames


def decode_jpeg(data: bytes, size: int) -> np.ndarray:
    """uint8 [size, size, 3], resized (bilinear) when the stored frame differs."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def augment(frames: np.ndarray, rng: np.random.Generator, aug) -> np.ndarray:
    """Light augmentation, the same for every frame of a sample: random resized crop (square, area
    fraction in aug.random_resized_crop), brightness and contrast jitter (multiplicative, +-amount)."""
    k, h, w, _ = frames.shape
    lo, hi = aug.random_resized_crop
    out = frames
    if (lo, hi) != (1.0, 1.0):
        side = math.sqrt(rng.uniform(lo, hi))
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out = np.stack(
            [np.asarray(Image.fromarray(f[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)) for f in out]
        )
    b = 1.0 + rng.uniform(-aug.brightness, aug.brightness) if aug.brightness else 1.0
    c = 1.0 + rng.uniform(-aug.contrast, aug.contrast) if aug.contrast else 1.0
    if b != 1.0 or c != 1.0:
        x = out.astype(np.float32)
        mean = x.mean()
        x = (x - mean) * c + mean * b
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def pick_frames(num: int, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """k frame numbers of a num-frame video: a random one (k=1) or k evenly spaced from a random start;
    without an rng the middle frame / evenly spaced from the start (evaluation)."""
    if k == 1:
        return np.array([rng.integers(num) if rng is not None else num // 2])
    stride = max(num // k, 1)
    start = rng.integers(max(num - stride * (k - 1), 1)) if rng is not None else 0
    return np.minimum(start + stride * np.arange(k), num - 1)


class _Sample:
    """Global sample number -> dict(images uint8 [H,W,3] or [K,H,W,3], tokens int32 [L]).

    Picklable (grain worker processes); the tokenizer is built lazily in each process.
    """

    def __init__(self, source: ShardedRecords, config, *, train: bool):
        self.source, self.train = source, train
        self.seed = int(config.seed)
        self.size = int(config.model.vision.image_size)
        self.k = int(config.data.frames_per_sample)
        self.aug = config.data.augment
        self.tok_config = config.tokenizer
        self.on_corrupt = config.data.on_corrupt_record
        if self.on_corrupt not in ("raise", "skip"):
            raise ValueError(f"data.on_corrupt_record {self.on_corrupt!r}: expected 'raise' or 'skip'")
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def record_of(self, g: int) -> tuple[int, int]:
        n = len(self.source)
        epoch = g // n
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        return epoch, int(perm[g % n])

    def __call__(self, g: int) -> dict:
        epoch, r = self.record_of(int(g))
        return self.make(epoch, r, None)

    def batch(self, gs: np.ndarray) -> dict:
        """The samples of global numbers `gs`, stacked: their records read together, then decoded."""
        located = [self.record_of(int(g)) for g in gs]
        raws = self.source.read_many([r for _, r in located])
        items = [self.make(epoch, r, raw) for (epoch, r), raw in zip(located, raws)]
        return {k: np.stack([item[k] for item in items]) for k in items[0]}

    def make(self, epoch: int, r: int, first) -> dict:
        """The sample of record r in `epoch`; `first` is its record already read (bytes, or the
        CorruptRecordError reading it raised), None to read it here."""
        raw, skipped = None, 0
        for attempt in range(len(self.source)):
            try:
                got = first if attempt == 0 and first is not None else self.source[(r + attempt) % len(self.source)]
                if isinstance(got, records.CorruptRecordError):
                    raise got
                raw = got
                break
            except records.CorruptRecordError as e:
                if self.on_corrupt == "raise":
                    raise
                skipped += 1
                log.warning("skipping corrupt record (%s); using the next one", e)
        if raw is None:
            raise records.CorruptRecordError(self.source.paths[0], 0, "every record is corrupt")
        feats = records.decode_example(raw)
        frames = decode_frames(feats, f"record {r}")
        rng = np.random.default_rng([self.seed, epoch, r]) if self.train else None
        idx = pick_frames(len(frames), self.k, rng)
        video = np.stack([decode_jpeg(frames[i], self.size) for i in idx])
        if rng is not None:
            video = augment(video, rng, self.aug)
        if self._tok is None:
            self._tok = tokenizers.from_config(self.tok_config)
        report = feats["report"][0].decode("utf-8") if feats.get("report") else ""
        tokens = self._tok.encode([report])[0].astype(np.int32)
        # the count rides with the sample so it survives grain worker processes; the Loader sums it up
        return {"images": video[0] if self.k == 1 else video, "tokens": tokens, "corrupt_skipped": np.int32(skipped)}


class _Indices(grain.sources.RandomAccessDataSource):
    """This process's global sample numbers, batch after batch: its slice of each global batch."""

    def __init__(self, num_batches: int, global_batch: int, process_index: int, process_count: int):
        self.local = global_batch // process_count
        self.global_batch, self.offset = global_batch, process_index * self.local
        self.n = num_batches * self.local

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> int:
        return (j // self.local) * self.global_batch + self.offset + j % self.local


class Loader:
    """Iterator of global batches {images, tokens} as jax.Arrays sharded over the mesh's batch axes,
    with `get_state()` / `set_state()` for the checkpoint (per process). `corrupt_skipped` counts the
    corrupt records this process skipped (data.on_corrupt_record="skip") since it started."""

    def __init__(
        self,
        config,
        mesh,
        *,
        split: str,
        train: bool,
        num_batches: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        self.global_batch = int(config.batch_size)
        if self.global_batch % pc:
            raise ValueError(f"batch_size {self.global_batch} is not divisible by {pc} processes")
        source = ShardedRecords(config.data_dir, split)
        self.num_records = len(source)
        sample = _Sample(source, config, train=train)
        ds = grain.MapDataset.source(_Indices(num_batches, self.global_batch, pi, pc))
        ds = ds.batch(self.global_batch // pc, drop_remainder=True).map(sample.batch)
        threads = WORKER_READ_THREADS if int(config.data.num_workers) > 0 else READ_THREADS
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=READ_AHEAD * threads))
        if int(config.data.num_workers) > 0:
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=int(config.data.num_workers), per_worker_buffer_size=int(config.data.prefetch_buffer)
                )
            )
        self.dataset = ds
        self._it = iter(ds)
        self.mesh = mesh
        self.corrupt_skipped = 0

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)

    @property
    def iterator(self):
        """The grain iterator (what grain's Orbax checkpoint handler saves)."""
        return self._it

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        local = next(self._it)
        self.corrupt_skipped += int(local.pop("corrupt_skipped").sum())
        return {
            k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
            for k, v in local.items()
        }


def train_loader(config, mesh, **kw) -> Loader:
    return Loader(config, mesh, split=config.data.train_split, train=True, num_batches=int(config.total_steps), **kw)


def eval_loader(config, mesh, **kw) -> Loader:
    """The first config.eval_batches global batches of the eval split (wrapping round a small split);
    middle frame, no augmentation: the same samples at every evaluation."""
    return Loader(config, mesh, split=config.data.eval_split, train=False, num_batches=int(config.eval_batches), **kw)


def iterate_videos(data_dir: str, split: str, *, frames: int | None = None, image_size: int | None = None):
    """Every video of a split in shard order, for evaluation: dicts {video_id, patient_id, study_id,
    study_day, report, ef, frames: uint8 [K,H,W,3], positions: which of the record's num_frames frames they
    are}; `frames` evenly subsamples (only those frames are decoded), `image_size` resizes."""
    source = ShardedRecords(data_dir, split)
    for i in range(len(source)):
        if i % VIDEO_CHUNK == 0:  # the next chunk's records at once (GETs in flight together on a bucket)
            chunk = source.read_many(range(i, min(i + VIDEO_CHUNK, len(source))))
        raw = chunk[i % VIDEO_CHUNK]
        if isinstance(raw, records.CorruptRecordError):
            raise raw
        feats = records.decode_example(raw)
        where = f"{data_dir} {split} record {i}"
        jpegs = decode_frames(feats, where)
        size = int(image_size or feats["image_size"][0])
        keep = (
            [int(j) for j in pick_frames(len(jpegs), min(frames, len(jpegs)), None)]
            if frames
            else list(range(len(jpegs)))
        )
        text = lambda key: feats[key][0].decode("utf-8") if feats.get(key) else ""
        yield {
            "video_id": text("video_id"),
            "patient_id": text("patient_id"),
            "study_id": text("study_id"),
            "study_day": int(feats["study_day"][0]) if feats.get("study_day") else 0,
            "report": text("report"),
            "ef": float(feats["ef"][0]) if feats.get("ef") else math.nan,
            "frames": np.stack([decode_jpeg(jpegs[j], size) for j in keep]),
            "positions": keep,
            "num_frames": len(jpegs),
        }
