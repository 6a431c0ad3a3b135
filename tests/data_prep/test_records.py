"""The record format: Example encoding, TFRecord framing, the index, corruption detection, shard naming.

Independent references: bytes written by the hand-written wire-format codec that records.py used before it
moved to protobuf (every shard converted until then), and tensorboardX's TFRecord writer (its own masked
CRC32C).
"""

import math
import os
import pickle
import struct

import pytest
from tensorboardX.record_writer import RecordWriter
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

from data_prep import records
from echoclip_jax.runtime import storage


def _video_example(i=0):
    return {
        "video_id": f"{i:064x}",
        "patient_id": b"ab" * 32,
        "study_id": b"cd" * 32,
        "study_day": 412,
        "frames": [b"\xff\xd8jpeg-%d" % k for k in range(3)],
        "num_frames": 3,
        "image_size": 224,
        "fps": 29.97,
        "report": "NORMAL LEFT VENTRICULAR SIZE. ",
        "ef": float("nan"),
        "source": b"dicom",
    }


def test_roundtrip_types_and_values():
    ex = _video_example()
    ex["neg"] = [-5, 2**40]
    out = records.decode_example(records.encode_example(ex))
    assert out["video_id"] == [b"0" * 64]
    assert out["frames"] == ex["frames"]
    assert out["study_day"] == [412] and out["num_frames"] == [3] and out["neg"] == [-5, 2**40]
    assert out["fps"][0] == pytest.approx(29.97, rel=1e-6)
    assert math.isnan(out["ef"][0])
    assert out["report"] == [b"NORMAL LEFT VENTRICULAR SIZE. "]
    assert out["source"] == [b"dicom"]


def test_encoding_is_a_real_tf_example():
    """protobuf's own parser reads our bytes, and we read protobuf's bytes (packed and unpacked)."""
    ex = _video_example()
    parsed = example_pb2.Example.FromString(records.encode_example(ex))
    feat = parsed.features.feature
    assert list(feat["frames"].bytes_list.value) == ex["frames"]
    assert list(feat["study_day"].int64_list.value) == [412]
    assert feat["fps"].float_list.value[0] == pytest.approx(29.97, rel=1e-6)

    ref = example_pb2.Example()
    ref.features.feature["a"].int64_list.value.extend([1, -2, 300])
    ref.features.feature["b"].float_list.value.extend([0.5, -1.25])
    ref.features.feature["c"].bytes_list.value.extend([b"x", b""])
    assert records.decode_example(ref.SerializeToString()) == {"a": [1, -2, 300], "b": [0.5, -1.25], "c": [b"x", b""]}


# An Example written by the previous, hand-written encoder (a varint/wire-type serialiser) from _OLD_INPUT.
_OLD_INPUT = {
    "video_id": "ab12",
    "patient_id": b"p",
    "study_id": b"s",
    "study_day": 412,
    "frames": [b"\xff\xd8a", b"\xff\xd8bc"],
    "num_frames": 2,
    "image_size": 224,
    "fps": 29.97,
    "report": "LV EJECTION FRACTION IS 55%. ",
    "ef": float("nan"),
    "source": b"dicom",
    "neg": [-5, 2**40],
    "weights": [0.5, -1.25],
}
_OLD_BYTES = bytes.fromhex(
    "0ab0020a0e0a026566120812060a040000c07f0a0f0a03667073120812060a048fc2ef410a170a066672616d6573120d0a0b0a03ffd8"
    "610a04ffd862630a140a0a696d6167655f73697a6512061a040a02e0010a1b0a036e656712141a120a10fbffffffffffffffff018080"
    "808080200a130a0a6e756d5f6672616d657312051a030a01020a130a0a70617469656e745f696412050a030a01700a2b0a067265706f"
    "727412210a1f0a1d4c5620454a454354494f4e204652414354494f4e204953203535252e200a130a06736f7572636512090a070a0564"
    "69636f6d0a130a0973747564795f64617912061a040a029c030a110a0873747564795f696412050a030a01730a140a08766964656f5f"
    "696412080a060a04616231320a170a0777656967687473120c120a0a080000003f0000a0bf"
)


def test_records_of_the_previous_codec_decode_field_for_field_and_encode_to_the_same_bytes():
    got = records.decode_example(_OLD_BYTES)
    assert list(got) == sorted(_OLD_INPUT)
    for name, value in _OLD_INPUT.items():
        expected = value if isinstance(value, list) else [value]
        expected = [v.encode() if isinstance(v, str) else v for v in expected]
        if name in ("fps", "weights"):  # float32 on the wire
            assert got[name] == pytest.approx(expected, rel=1e-7), name
        elif name == "ef":
            assert len(got[name]) == 1 and math.isnan(got[name][0])
        else:
            assert got[name] == expected and [type(v) for v in got[name]] == [type(v) for v in expected], name
    assert records.encode_example(_OLD_INPUT) == _OLD_BYTES  # records written before and after are alike


def test_empty_lists_keep_their_kind():
    """Feature's `kind` is set even for an empty list; protobuf omits the empty packed numbers (the old
    codec wrote a zero-length packed field): the same Example either way."""
    for name, kind in (("frames", "bytes_list"), ("study_day", "int64_list"), ("fps", "float_list")):
        parsed = example_pb2.Example.FromString(records.encode_example({name: []}))
        assert parsed.features.feature[name].WhichOneof("kind") == kind
        assert records.decode_example(parsed.SerializeToString()) == {name: []}


def test_schema_kind_is_enforced():
    with pytest.raises(TypeError, match="study_day"):
        records.encode_example({"study_day": "yesterday"})
    with pytest.raises(TypeError, match="'frames': expected bytes or str, got int"):
        records.encode_example({"frames": [1]})
    with pytest.raises(TypeError, match="'big'"):
        records.encode_example({"big": [2**64]})
    with pytest.raises(ValueError, match="not a valid tf.train.Example"):
        records.decode_example(b"\x0a\xff\xff")


def test_masked_crc32c_matches_the_spec():
    # CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720 B.4); the mask is TFRecord's.
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert records.masked_crc32c(b"123456789") == expected


def test_writer_output_is_byte_identical_to_an_independent_tfrecord_writer(tmp_path):
    payloads = [records.encode_example(_video_example(i)) for i in range(5)] + [b""]
    ours = tmp_path / "train-00000-of-00001.tfrecord"
    with records.TFRecordWriter(str(ours)) as w:
        for p in payloads:
            w.write(p)
    theirs = tmp_path / "ref.tfrecord"
    rw = RecordWriter(str(theirs))
    for p in payloads:
        rw.write(p)
    rw.close()
    assert ours.read_bytes() == theirs.read_bytes()
    # and the hand-parsed framing: uint64 length, masked crc of length, data, masked crc of data
    raw = ours.read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    assert n == len(payloads[0]) and raw[12 : 12 + n] == payloads[0]
    reader = records.ShardReader(str(ours))
    assert len(reader) == 6 and [reader[i] for i in range(6)] == payloads and reader[-1] == b""
    assert [p for _, p in records.iter_tfrecord(str(theirs))] == payloads


def test_writer_only_publishes_complete_shards(tmp_path):
    path = str(tmp_path / "val-00000-of-00001.tfrecord")
    with pytest.raises(RuntimeError):
        with records.TFRecordWriter(path) as w:
            w.write(b"x")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    w = records.TFRecordWriter(path)
    w.write(b"x")
    assert not os.path.exists(path) and records.list_shards(str(tmp_path), "val") == []
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["val-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord.index"]


def _write_shard(tmp_path, n=4):
    path = str(tmp_path / "train-00000-of-00001.tfrecord")
    with records.TFRecordWriter(path) as w:
        for i in range(n):
            w.write(records.encode_example(_video_example(i)))
    return path


def test_flipped_byte_in_shard_names_path_and_offset(tmp_path):
    path = _write_shard(tmp_path)
    offsets = [off for off, _ in records.iter_tfrecord(path)]
    raw = bytearray(open(path, "rb").read())
    raw[offsets[2] + 40] ^= 0x01  # inside record 2's payload
    open(path, "wb").write(bytes(raw))
    reader = records.ShardReader(path)
    assert records.decode_example(reader[1])["num_frames"] == [3]
    with pytest.raises(records.CorruptRecordError) as e:
        reader[2]
    assert path in str(e.value) and f"offset {offsets[2]}" in str(e.value)
    assert e.value.offset == offsets[2]
    with pytest.raises(records.CorruptRecordError, match=f"offset {offsets[2]}"):
        list(records.iter_tfrecord(path))


def test_flipped_length_byte_is_detected(tmp_path):
    path = _write_shard(tmp_path)
    raw = bytearray(open(path, "rb").read())
    raw[3] ^= 0x10  # record 0's length field
    open(path, "wb").write(bytes(raw))
    with pytest.raises(records.CorruptRecordError, match="offset 0: length CRC"):
        records.ShardReader(path)[0]


@pytest.mark.parametrize("where", [0, 9, 20, 30, -2])
def test_flipped_byte_in_index_is_detected(tmp_path, where):
    path = _write_shard(tmp_path)
    ipath = path + ".index"
    raw = bytearray(open(ipath, "rb").read())
    raw[where] ^= 0x04
    open(ipath, "wb").write(bytes(raw))
    with pytest.raises(records.CorruptRecordError) as e:
        len(records.ShardReader(path))
    assert ipath in str(e.value) and "offset" in str(e.value)


def test_index_disagreeing_with_shard_size_is_detected(tmp_path):
    path = _write_shard(tmp_path)
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(records.CorruptRecordError, match="index describes"):
        len(records.ShardReader(path))


def test_missing_index_is_a_clear_error_and_can_be_rebuilt(tmp_path):
    path = _write_shard(tmp_path)
    original = open(path + ".index", "rb").read()
    os.remove(path + ".index")
    with pytest.raises(FileNotFoundError, match="index missing"):
        len(records.ShardReader(path))
    assert records.rebuild_index(path) == 4
    assert open(path + ".index", "rb").read() == original


def test_reader_pickles_before_and_after_use(tmp_path):
    path = _write_shard(tmp_path)
    reader = records.ShardReader(path)
    first = reader[0]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone[0] == first and len(clone) == 4 and list(clone)[3] == reader[3]
    with pytest.raises(IndexError):
        reader[4]


def test_list_shards_sorted_and_complete(tmp_path):
    for i in (1, 0, 2):
        (tmp_path / records.shard_name("train", i, 3)).write_bytes(b"")
    (tmp_path / "train-00000-of-00003.tfrecord.tmp").write_bytes(b"")
    (tmp_path / "val-00000-of-00001.tfrecord").write_bytes(b"")
    (tmp_path / "trainx-00000-of-00001.tfrecord").write_bytes(b"")
    got = records.list_shards(str(tmp_path), "train")
    assert [os.path.basename(p) for p in got] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert records.list_shards(str(tmp_path), "test") == []
    os.remove(tmp_path / "train-00001-of-00003.tfrecord")
    with pytest.raises(ValueError, match=r"incomplete: shard\(s\) \[1\] of 3"):
        records.list_shards(str(tmp_path), "train")


def test_shards_in_a_bucket_are_written_read_and_checked_as_on_disk(tmp_path, bucket):
    payloads = [records.encode_example(_video_example(i)) for i in range(4)]
    local, remote = str(tmp_path / "train-00000-of-00001.tfrecord"), f"{bucket}/d/train-00000-of-00001.tfrecord"
    with pytest.raises(RuntimeError):
        with records.TFRecordWriter(remote) as w:
            w.write(payloads[0])
            raise RuntimeError("crash")
    assert storage.listdir(f"{bucket}/d") == []  # nothing published by a failed writer
    for path in (local, remote):
        with records.TFRecordWriter(path) as w:
            for p in payloads:
                w.write(p)
    for suffix in ("", ".index"):  # the same shard and index, byte for byte
        assert storage.read_bytes(remote + suffix) == storage.read_bytes(local + suffix)
    assert records.list_shards(f"{bucket}/d", "train") == [remote]
    reader = records.ShardReader(remote)
    assert [reader[i] for i in range(len(reader))] == payloads
    assert records.read_records([(reader, 3), (records.ShardReader(local), 1), (reader, 0)]) == [
        payloads[3],
        payloads[1],
        payloads[0],
    ]
    assert pickle.loads(pickle.dumps(reader))[2] == payloads[2]

    offsets = [off for off, _ in records.iter_tfrecord(remote)]
    raw = bytearray(storage.read_bytes(remote))
    raw[offsets[2] + 40] ^= 0x01
    storage.write_bytes(remote, bytes(raw))
    damaged = records.ShardReader(remote)
    with pytest.raises(records.CorruptRecordError, match=f"{remote}: corrupt at byte offset {offsets[2]}"):
        damaged[2]
    got = records.read_records([(damaged, 1), (damaged, 2)])
    assert got[0] == payloads[1] and isinstance(got[1], records.CorruptRecordError)  # a caller may skip it

    raw[offsets[2] + 40] ^= 0x01
    storage.write_bytes(remote, bytes(raw))  # repaired; now its index is lost
    storage.remove(remote + ".index")
    with pytest.raises(FileNotFoundError, match="index missing"):
        len(records.ShardReader(remote))
    assert records.rebuild_index(remote) == 4
    assert storage.read_bytes(remote + ".index") == storage.read_bytes(local + ".index")
