"""The record format, defined once: `tf.train.Example` protos in TFRecord shards, plus an offset index,
on local disk or in a bucket (gs://, through echoclip_jax.runtime.storage).

TFRecord has no random access, so every shard gets a `.index` file with the byte offset and length of each
record; the training loader (grain) reads records by number through it. Neither the writer here nor the
reader in `echoclip_jax` needs TensorFlow: Examples are (de)serialised by protobuf from TensorFlow's
Example message descriptors (data_prep.example_codec, re-exported here), the framing's CRC32C is
google_crc32c's, yet the shards are standard TFRecords (length, masked CRC32C of the length, payload, masked
CRC32C of the payload) that `tf.data.TFRecordDataset` reads too.

Index file layout (little endian): magic b"ECLIPIDX", uint32 version (1), uint64 record count N, then N
pairs (uint64 offset, uint64 payload length), then uint32 CRC32C of everything before it. A flipped byte
anywhere in it fails the CRC, and the index must agree with the shard's size.

What readers rely on, on either storage: a shard is published last, after its index (a rename on local
disk, an upload on a bucket, which becomes visible only when complete), so every shard that `list_shards`
finds is whole and has its index. An index without its shard (a crash between the two) is never listed and
is rewritten by the rerun. On local disk a record is one `pread`; on a bucket one ranged GET, and
`read_records` keeps a batch's GETs in flight together.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import struct
import tempfile
from typing import Iterator, Sequence

import google_crc32c
import numpy as np

from data_prep.example_codec import BYTES, FLOAT, INT64, SCHEMA, decode_example, encode_example
from echoclip_jax.runtime import storage

__all__ = [
    "BYTES",
    "FLOAT",
    "INT64",
    "SCHEMA",
    "SPLITS",
    "CorruptRecordError",
    "ShardReader",
    "TFRecordWriter",
    "decode_example",
    "decode_index",
    "encode_example",
    "encode_index",
    "index_path",
    "iter_tfrecord",
    "list_shards",
    "masked_crc32c",
    "open_shards",
    "read_records",
    "rebuild_index",
    "shard_name",
]

SPLITS = ("train", "val", "test")
INDEX_READERS = 32  # indexes fetched at once when a bucket's split is opened (thousands of shards)

_INDEX_MAGIC = b"ECLIPIDX"
_INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<8sIQ")
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")


class CorruptRecordError(IOError):
    """A shard or its index fails an integrity check; the message names the file and byte offset."""

    def __init__(self, path: str, offset: int, problem: str):
        self.path, self.offset, self.problem = path, offset, problem
        super().__init__(f"{path}: corrupt at byte offset {offset}: {problem}")


# ----------------------------------------------------------------------------------------- CRC32C


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 and add a constant (so CRCs of CRCs stay useful)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------- the index


def encode_index(entries: list[tuple[int, int]]) -> bytes:
    """(offset, payload length) per record -> index file bytes (magic, version, count, pairs, CRC32C)."""
    body = _INDEX_HEADER.pack(_INDEX_MAGIC, _INDEX_VERSION, len(entries))
    body += np.asarray(entries, dtype="<u8").reshape(-1, 2).tobytes()
    return body + struct.pack("<I", google_crc32c.value(body))


def decode_index(data: bytes, path: str = "<index>") -> np.ndarray:
    """Index file bytes -> uint64 array [N, 2] of (offset, length); CorruptRecordError if it fails a check."""
    if len(data) < _INDEX_HEADER.size + 4:
        raise CorruptRecordError(path, 0, f"index too short ({len(data)} bytes)")
    magic, version, count = _INDEX_HEADER.unpack_from(data, 0)
    if magic != _INDEX_MAGIC:
        raise CorruptRecordError(path, 0, f"bad index magic {magic!r}")
    (stored,) = struct.unpack_from("<I", data, len(data) - 4)
    actual = google_crc32c.value(data[:-4])
    if stored != actual:
        raise CorruptRecordError(path, len(data) - 4, "index CRC32C mismatch (the index file is damaged)")
    if version != _INDEX_VERSION:
        raise CorruptRecordError(path, 8, f"unsupported index version {version}")
    expected = _INDEX_HEADER.size + 16 * count + 4
    if len(data) != expected:
        raise CorruptRecordError(path, 0, f"index holds {len(data)} bytes, {count} records need {expected}")
    return np.frombuffer(data, dtype="<u8", count=2 * count, offset=_INDEX_HEADER.size).reshape(count, 2)


def index_path(shard_path: str) -> str:
    return shard_path + ".index"


# --------------------------------------------------------------------------------------- the writer


class TFRecordWriter:
    """Writes one shard and, on a clean close, its index; the shard is published last (module docstring).

    Local disk: the shard is written to `path + ".tmp"`, fsync'd, the index renamed into place, then the
    shard. A bucket: the shard is written to a local temporary file; the index object is uploaded, then the
    shard (storage.local_output). Leaving the `with` block by an exception discards the partial shard.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.remote = storage.is_remote(self.path)
        if self.remote:
            fd, self._tmp = tempfile.mkstemp(prefix="echoclip-shard-", suffix=".tfrecord")
            self._file = os.fdopen(fd, "wb")
        else:
            self._tmp = self.path + ".tmp"
            self._file = open(self._tmp, "wb")
        self._entries: list[tuple[int, int]] = []
        self._offset = 0

    def write(self, record: bytes) -> None:
        record = bytes(record)
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(record + struct.pack("<I", masked_crc32c(record)))
        self._entries.append((self._offset, len(record)))
        self._offset += 16 + len(record)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Finish the shard: its index first, then the shard under its final name."""
        if self._file.closed:
            return
        self._file.flush()
        if self.remote:
            self._file.close()
            storage.write_bytes(index_path(self.path), encode_index(self._entries))
            with storage.local_output(self.path) as local:
                shutil.move(self._tmp, local)
            return
        os.fsync(self._file.fileno())
        self._file.close()
        idx_tmp = index_path(self.path) + ".tmp"
        with open(idx_tmp, "wb") as f:
            f.write(encode_index(self._entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(idx_tmp, index_path(self.path))
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discard the partial shard."""
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------- the readers


def _check_record(path: str, buf: bytes, offset: int, length: int | None, start: int = 0) -> bytes:
    """Validate the framed record at buf[start:] (file offset `offset`); return its payload."""
    if len(buf) - start < 12:
        raise CorruptRecordError(path, offset, "truncated record header")
    (n,) = struct.unpack_from("<Q", buf, start)
    (len_crc,) = struct.unpack_from("<I", buf, start + 8)
    if len_crc != masked_crc32c(buf[start : start + 8]):
        raise CorruptRecordError(path, offset, "length CRC mismatch")
    if length is not None and n != length:
        raise CorruptRecordError(path, offset, f"record length {n} disagrees with the index ({length})")
    if len(buf) - start < 16 + n:
        raise CorruptRecordError(path, offset, f"truncated record (needs {16 + n} bytes)")
    payload = buf[start + 12 : start + 12 + n]
    (data_crc,) = struct.unpack_from("<I", buf, start + 12 + n)
    if data_crc != masked_crc32c(payload):
        raise CorruptRecordError(path, offset, "data CRC mismatch")
    return payload


def iter_tfrecord(path: str) -> Iterator[tuple[int, bytes]]:
    """Sequentially read any TFRecord file (no index needed), CRC-checked: yields (offset, payload)."""
    data = storage.read_bytes(path)
    pos = 0
    while pos < len(data):
        payload = _check_record(path, data, pos, None, start=pos)
        yield pos, payload
        pos += 16 + len(payload)


def rebuild_index(path: str) -> int:
    """Write `path.index` for a TFRecord file written by another tool; returns the record count."""
    entries = [(off, len(p)) for off, p in iter_tfrecord(path)]
    storage.write_bytes(index_path(path), encode_index(entries))
    return len(entries)


def _read_index(path: str) -> np.ndarray:
    """The index of shard `path`, checked against the shard's size."""
    ipath = index_path(path)
    try:
        data = storage.read_bytes(ipath) if storage.is_remote(path) else _read_local(ipath)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{ipath}: index missing for shard {path} (data_prep.records.rebuild_index writes one)"
        ) from None
    index = decode_index(data, ipath)
    size = storage.size(path) if storage.is_remote(path) else os.path.getsize(path)
    end = int(index[-1, 0] + index[-1, 1] + 16) if len(index) else 0
    if end != size:
        raise CorruptRecordError(path, min(end, size), f"shard holds {size} bytes but its index describes {end}")
    return index


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ShardReader:
    """Random access to the records of one shard (local or gs://) through its index.

    A local file is opened lazily (and reopened after a fork), so the reader pickles into grain worker
    processes with its index; a bucket's records are ranged GETs. With verify=True every record's length
    and data CRCs are checked on read.
    """

    def __init__(self, path: str, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = verify
        self.remote = storage.is_remote(self.path)
        self._index: np.ndarray | None = None
        self._fd: int | None = None
        self._pid: int | None = None

    def _load_index(self) -> np.ndarray:
        if self._index is None:
            self._index = _read_index(self.path)
        return self._index

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __len__(self) -> int:
        return len(self._load_index())

    def span(self, i: int) -> tuple[int, int]:
        """(byte offset, payload length) of record i."""
        index = self._load_index()
        n = len(index)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: record {i} out of range ({n} records)")
        offset, length = index[i]
        return int(offset), int(length)

    def payload(self, buf: bytes, offset: int, length: int) -> bytes:
        """The payload of the framed record `buf` read at `offset` (checked when verify)."""
        if not self.verify:
            if len(buf) < length + 16:
                raise CorruptRecordError(self.path, offset, "truncated record")
            return buf[12 : 12 + length]
        return _check_record(self.path, buf, offset, length)

    def read_at(self, offset: int, n: int) -> bytes:
        """`n` bytes of the shard from `offset`: one pread, or one ranged GET on a bucket."""
        if self.remote:
            return storage.read_range(self.path, offset, n)
        return os.pread(self._descriptor(), n, offset)

    def __getitem__(self, i: int) -> bytes:
        offset, length = self.span(i)
        return self.payload(self.read_at(offset, length + 16), offset, length)

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_shards(paths: Sequence[str], verify: bool = True) -> list[ShardReader]:
    """Readers of `paths` with their indexes loaded, a bucket's (two GETs a shard) INDEX_READERS at a time."""
    readers = [ShardReader(p, verify=verify) for p in paths]
    remote = [r for r in readers if r.remote]
    if len(remote) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(INDEX_READERS, len(remote))) as pool:
            for r, index in zip(remote, pool.map(_read_index, [r.path for r in remote])):
                r._index = index
    for r in readers:
        len(r)
    return readers


def read_records(wanted: Sequence[tuple[ShardReader, int]]) -> list:
    """Record i of each (reader, i), in order: its payload, or the CorruptRecordError it failed with (so
    a caller can skip it). A bucket's records are read by ranged GETs all in flight together; local ones
    by pread."""
    spans = [reader.span(i) for reader, i in wanted]
    remote = [k for k, (reader, _) in enumerate(wanted) if reader.remote]
    paths = [wanted[k][0].path for k in remote]
    got = (
        storage.read_ranges(paths, [spans[k][0] for k in remote], [spans[k][1] + 16 for k in remote]) if remote else []
    )
    fetched = dict(zip(remote, got))
    out = []
    for k, ((reader, _), (offset, length)) in enumerate(zip(wanted, spans)):
        try:
            buf = fetched[k] if reader.remote else reader.read_at(offset, length + 16)
            out.append(reader.payload(buf, offset, length))
        except CorruptRecordError as e:
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------- naming


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


def list_shards(data_dir: str, split: str) -> list[str]:
    """Sorted paths of `{split}-NNNNN-of-MMMMM.tfrecord` in data_dir (local or gs://); raises if the set is
    incomplete."""
    pattern = f"{split}-*-of-*.tfrecord"
    if storage.is_remote(data_dir):
        paths = storage.glob(data_dir, pattern)
    else:
        paths = sorted(glob.glob(os.path.join(glob.escape(os.fspath(data_dir)), pattern)))
    found = []
    for p in paths:
        m = _SHARD_RE.match(os.path.basename(p))
        if m and m["split"] == split:
            found.append((int(m["i"]), int(m["n"]), p))
    if found:
        totals = {n for _, n, _ in found}
        if len(totals) != 1:
            raise ValueError(f"{data_dir}: split {split!r} mixes shard counts {sorted(totals)}")
        total = totals.pop()
        missing = sorted(set(range(total)) - {i for i, _, _ in found})
        if missing:
            raise ValueError(
                f"{data_dir}: split {split!r} is incomplete: shard(s) {missing[:5]} of {total} missing "
                "(conversion unfinished? rerun data_prep.convert)"
            )
    return [p for _, _, p in found]
