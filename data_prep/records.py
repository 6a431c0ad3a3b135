"""The record format, defined once: `tf.train.Example` protos in TFRecord shards, plus an offset index.

TFRecord has no random access, so every shard gets a `.index` file with the byte offset and length of each
record; the training loader (grain) reads records by number through it. Neither the writer here nor the
reader in `echoclip_jax` needs TensorFlow: Examples are (de)serialised by protobuf from TensorFlow's
Example message descriptors, the framing's CRC32C is google_crc32c's, yet the shards are standard TFRecords
(length, masked CRC32C of the length, payload, masked CRC32C of the payload) that `tf.data.TFRecordDataset`
reads too.

Index file layout (little endian): magic b"ECLIPIDX", uint32 version (1), uint64 record count N, then N
pairs (uint64 offset, uint64 payload length), then uint32 CRC32C of everything before it. A flipped byte
anywhere in it fails the CRC, and the index must agree with the shard's size.
"""

from __future__ import annotations

import glob
import os
import re
import struct
from typing import Iterator

import google_crc32c
import numpy as np
from google.protobuf.message import DecodeError

from data_prep.example_proto import Example  # TensorFlow's message, without TensorFlow

# Feature kind of every field of the video record (the format every reader and writer shares);
# encode_example checks these keys.
BYTES, FLOAT, INT64 = "bytes", "float", "int64"
SCHEMA = {
    "video_id": BYTES,  # salted hash hex
    "patient_id": BYTES,  # salted hash hex
    "study_id": BYTES,  # salted hash hex
    "study_day": INT64,  # days since the patient's first study
    "frames": BYTES,  # K JPEG-encoded RGB frames, image_size x image_size
    "num_frames": INT64,
    "image_size": INT64,
    "fps": FLOAT,  # 0 if unknown
    "report": BYTES,  # UTF-8, clean_text-normalised; empty for EchoNet
    "ef": FLOAT,  # NaN when unknown
    "source": BYTES,  # b"dicom" or b"echonet"
}
SPLITS = ("train", "val", "test")

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


# ------------------------------------------------------------------------------------- the Example


_LIST_FIELD = {BYTES: "bytes_list", FLOAT: "float_list", INT64: "int64_list"}  # Feature's `kind` oneof


def _as_list(name: str, value) -> list:
    if isinstance(value, (bytes, str, int, float, np.generic)):
        return [value]
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"feature {name!r}: unsupported value type {type(value).__name__}")


def _infer_kind(name: str, values: list) -> str:
    if not values:
        raise TypeError(f"feature {name!r}: cannot infer the kind of an empty list; add it to SCHEMA")
    v = values[0]
    if isinstance(v, (bytes, str)):
        return BYTES
    if isinstance(v, (bool, int, np.integer)):
        return INT64
    if isinstance(v, (float, np.floating)):
        return FLOAT
    raise TypeError(f"feature {name!r}: unsupported element type {type(v).__name__}")


def _as_bytes(name: str, value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"feature {name!r}: expected bytes or str, got {type(value).__name__}")


def encode_example(features: dict) -> bytes:
    """Serialise a dict to a `tf.train.Example`. Known fields (SCHEMA) get their declared kind; others are
    inferred from the Python type (bytes/str -> bytes_list, int -> int64_list, float -> float_list).

    Deterministic (protobuf orders the map entries): identical input gives identical bytes, so a resumed
    conversion writes the shards a clean one would."""
    example = Example()
    example.features.SetInParent()  # an Example without features still carries the (empty) Features message
    feature_map = example.features.feature
    for name, value in features.items():
        values = _as_list(name, value)
        kind = SCHEMA.get(name) or _infer_kind(name, values)
        if kind == BYTES:
            values = [_as_bytes(name, v) for v in values]
        target = getattr(feature_map[name], _LIST_FIELD[kind])
        target.SetInParent()  # an empty list still says which kind it is
        try:
            target.value.extend(values)
        except (TypeError, ValueError) as e:
            raise TypeError(f"feature {name!r}: expected {kind} values ({e})") from None
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list]:
    """Parse a serialised `tf.train.Example` into {name: list of bytes | float | int}, names sorted."""

    try:
        example = Example.FromString(bytes(data))
    except DecodeError as e:
        raise ValueError(f"not a valid tf.train.Example ({len(data)} bytes): {e}") from None
    result: dict[str, list] = {}
    feature_map = example.features.feature
    for name in sorted(feature_map):
        feature = feature_map[name]
        kind = feature.WhichOneof("kind")
        result[name] = list(getattr(feature, kind).value) if kind else []
    return result


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
    """Writes a shard to `path + ".tmp"`; on a clean close writes the index and renames both into place.

    The final name therefore only ever holds a complete shard (the index is renamed first, so a shard that
    exists always has its index). Leaving the `with` block by an exception discards the partial file.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
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
        """Finish the shard: flush, fsync, write the index, rename both to their final names."""
        if self._file.closed:
            return
        self._file.flush()
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
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        payload = _check_record(path, data, pos, None, start=pos)
        yield pos, payload
        pos += 16 + len(payload)


def rebuild_index(path: str) -> int:
    """Write `path.index` for a TFRecord file written by another tool; returns the record count."""
    entries = [(off, len(p)) for off, p in iter_tfrecord(path)]
    tmp = index_path(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(encode_index(entries))
    os.replace(tmp, index_path(path))
    return len(entries)


class ShardReader:
    """Random access to the records of one shard through its index.

    The file is opened lazily (and reopened after a fork), so the reader pickles into grain worker
    processes. With verify=True every record's length and data CRCs are checked on read.
    """

    def __init__(self, path: str, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = verify
        self._index: np.ndarray | None = None
        self._fd: int | None = None
        self._pid: int | None = None

    def _load_index(self) -> np.ndarray:
        if self._index is None:
            ipath = index_path(self.path)
            try:
                with open(ipath, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{ipath}: index missing for shard {self.path} (data_prep.records.rebuild_index writes one)"
                ) from None
            index = decode_index(data, ipath)
            size = os.path.getsize(self.path)
            end = int(index[-1, 0] + index[-1, 1] + 16) if len(index) else 0
            if end != size:
                raise CorruptRecordError(
                    self.path, min(end, size), f"shard holds {size} bytes but its index describes {end}"
                )
            self._index = index
        return self._index

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __len__(self) -> int:
        return len(self._load_index())

    def __getitem__(self, i: int) -> bytes:
        index = self._load_index()
        n = len(index)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: record {i} out of range ({n} records)")
        offset, length = (int(x) for x in index[i])
        buf = os.pread(self._descriptor(), length + 16, offset)
        if not self.verify:
            if len(buf) < length + 16:
                raise CorruptRecordError(self.path, offset, "truncated record")
            return buf[12 : 12 + length]
        return _check_record(self.path, buf, offset, length)

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


# ------------------------------------------------------------------------------------------- naming


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


def list_shards(data_dir: str, split: str) -> list[str]:
    """Sorted paths of `{split}-NNNNN-of-MMMMM.tfrecord` in data_dir; raises if the set is incomplete."""
    paths = sorted(glob.glob(os.path.join(glob.escape(os.fspath(data_dir)), f"{split}-*-of-*.tfrecord")))
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
