"""TFDS metadata for a conversion: loadable with tfds.builder_from_directory, no clash with ours."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import convert, records, synthetic, tfds_builder  # noqa: E402  (after the skip: it imports TFDS)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    synthetic.generate(root / "cohort", patients=2, seed=5, small=True)
    out = root / "out"
    assert (
        convert.main(
            [
                "--dicom_dir",
                str(root / "cohort" / "dicom"),
                "--reports",
                str(root / "cohort" / "reports.csv"),
                "--out",
                str(out),
                "--salt",
                "tfds-test-salt",
                "--shard_size",
                "3",
                "--frames",
                "4",
                "--image_size",
                "32",
            ]
        )
        == 0
    )
    return out


def test_metadata_describes_our_shards_without_touching_our_files(converted):
    ours = hashlib.sha256((converted / "dataset_info.json").read_bytes()).hexdigest()
    target = tfds_builder.write_metadata(str(converted))
    assert hashlib.sha256((converted / "dataset_info.json").read_bytes()).hexdigest() == ours
    assert os.path.commonpath([target, str(converted / "tfds")]) == str(converted / "tfds")
    info = json.load(open(converted / "dataset_info.json"))
    builder = tfds.builder_from_directory(target)
    assert set(builder.info.features.keys()) == set(records.SCHEMA)
    assert builder.info.features["frames"].shape == (None, 32, 32, 3)
    described = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
    assert described == {s: v["num_videos"] for s, v in info["splits"].items() if v["num_videos"]}
    for split in described:
        paths = [os.path.realpath(p) for p in builder.info.splits[split].filepaths]
        assert paths == [os.path.realpath(p) for p in records.list_shards(str(converted), split)]
    assert tfds_builder.write_metadata(str(converted)) == target  # idempotent


def test_a_bucket_is_refused_naming_the_flag_and_the_mount_to_use(bucket, capsys):
    for data_dir, fix in ((f"{bucket}/records", "gcsfuse"), ("s3://bucket/records", "gs://bucket/path")):
        with pytest.raises(SystemExit) as e:
            tfds_builder.main(["--data_dir", data_dir])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--data_dir={data_dir}" in err and fix in err


def test_not_a_conversion_is_a_clear_error(tmp_path, capsys):
    assert tfds_builder.main(["--data_dir", str(tmp_path)]) == 1
    assert "data_prep.tfds_builder: error: " in (err := capsys.readouterr().err) and "dataset_info.json" in err


def test_tensorflow_reads_the_same_records(converted):
    pytest.importorskip("tensorflow")

    builder = tfds.builder_from_directory(tfds_builder.write_metadata(str(converted)))
    split = next(iter(builder.info.splits))
    expected = {}
    for shard in records.list_shards(str(converted), split):
        for raw in records.ShardReader(shard):
            ex = records.decode_example(raw)
            expected[ex["video_id"][0]] = ex
    pillow = {k: np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in ex["frames"]]) for k, ex in expected.items()}
    raw = tfds.as_numpy(builder.as_dataset(split=split, decoders={"frames": tfds.decode.SkipDecoding()}))
    exact = tfds.as_numpy(builder.as_dataset(split=split, decoders=tfds_builder.decoders()))
    default = tfds.as_numpy(builder.as_dataset(split=split))
    seen = set()
    for got_raw, got_exact, got_default in zip(raw, exact, default, strict=True):
        key = got_raw["video_id"]
        assert got_exact["video_id"] == got_default["video_id"] == key and key not in seen
        seen.add(key)
        ex = expected[key]
        assert got_raw["report"] == ex["report"][0] and got_raw["study_day"] == ex["study_day"][0]
        assert list(got_raw["frames"]) == list(ex["frames"])  # the stored JPEG bytes, untouched
        np.testing.assert_array_equal(got_exact["frames"], pillow[key])  # what echoclip_jax.data decodes
        # TFDS's own decode (fast integer DCT) differs from Pillow's only by JPEG rounding
        diff = np.abs(got_default["frames"].astype(int) - pillow[key])
        assert got_default["frames"].shape == pillow[key].shape and diff.max() <= 6 and diff.mean() < 1.5
    assert seen == set(expected)
