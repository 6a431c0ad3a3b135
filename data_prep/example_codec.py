"""Videos as `tf.train.Example` protos: the fields every record holds (`SCHEMA`) and their (de)serialisation
by protobuf from TensorFlow's Example message descriptors (data_prep.example_proto), without TensorFlow.

data_prep.records (the record format: framing, index, shards) re-exports these; callers use `records.*`.
"""

from __future__ import annotations

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
