"""TFDS metadata for a conversion: loadable with tfds.builder_from_directory, no clash with ours."""
import hashlib
import io
import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import convert, records, synthetic, tfds_builder  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    synthetic.generate(root / "cohort", patients=2, seed=5, small=True)
    out = root / "out"
    assert convert.main(["--dicom_dir", str(root / "cohort" / "dicom"), "--reports", str(root / "cohort" / "reports.csv"),
                         "--out", str(out), "--salt", "tfds-test-salt", "--shard_size", "3", "--frames", "4",
                         "--image_size", "32"]) == 0
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


def test_not_a_conversion_is_a_clear_error(tmp_path, capsys):
    assert tfds_builder.main(["--data_dir", str(tmp_path)]) == 2
    assert "dataset_info.json" in capsys.readouterr().err


def test_tensorflow_reads_the_same_records(converted):
    pytest.importorskip("tensorflow")
    from PIL import Image

    builder = tfds.builder_from_directory(tfds_builder.write_metadata(str(converted)))
    split = next(iter(builder.info.splits))
    expected = {}
    for shard in records.list_shards(str(converted), split):
        for raw in records.ShardReader(shard):
            ex = records.decode_example(raw)
            expected[ex["video_id"][0]] = ex
    for got in tfds.as_numpy(builder.as_dataset(split=split)):
        ex = expected.pop(got["video_id"])
        assert got["report"] == ex["report"][0] and got["study_day"] == ex["study_day"][0]
        frames = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in ex["frames"]])
        np.testing.assert_array_equal(got["frames"], frames)
    assert not expected
