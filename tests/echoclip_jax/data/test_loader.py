"""The grain input pipeline over real data_prep shards: shapes, determinism, per-process slicing,
exact resume from the iterator state, new frames each epoch, corrupt records, iterate_videos, and the same
batches from a bucket (a real GCS server on 127.0.0.1) as from local disk."""

import shutil

import ml_collections
import numpy as np
import pytest

from data_prep import records
from echoclip_jax.data import loader as data
from echoclip_jax.runtime import sharding, storage


def _mesh():
    return sharding.build_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def _local(loader, n):
    return [{k: np.asarray(v) for k, v in next(loader).items()} for _ in range(n)]


def test_batches_are_global_sharded_arrays(tiny_config):
    loader = data.train_loader(tiny_config, _mesh())
    batch = next(loader)
    assert batch["images"].shape == (16, 32, 32, 3) and batch["images"].dtype == np.uint8
    assert batch["tokens"].shape == (16, 32) and batch["tokens"].dtype == np.int32
    assert batch["images"].sharding.spec[0] == sharding.BATCH_AXES
    assert len(batch["images"].addressable_shards) == 8
    # reports are tokenised: every row holds more than padding
    assert (np.asarray(batch["tokens"]) != 0).sum(axis=1).min() > 2


def test_stream_is_deterministic_and_reshuffled_per_epoch(tiny_config):
    a = data.train_loader(tiny_config, _mesh())
    b = data.train_loader(tiny_config, _mesh())
    for x, y in zip(_local(a, 3), _local(b, 3)):
        np.testing.assert_array_equal(x["images"], y["images"])
    sample = data._Sample(data.ShardedRecords(tiny_config.data_dir, "train"), tiny_config, train=True)
    n = len(sample.source)
    epoch0 = [sample.record_of(g)[1] for g in range(n)]
    epoch1 = [sample.record_of(g)[1] for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))  # each epoch is a permutation of all
    assert epoch0 != epoch1
    # the same record gets a new random frame in another epoch (checked over all records)
    g1 = {r: g for g, r in enumerate(epoch1, start=n)}
    differ = [not np.array_equal(sample(g)["images"], sample(g1[r])["images"]) for g, r in enumerate(epoch0)]
    assert sum(differ) > n // 2


def test_resume_from_iterator_state_is_exact(tiny_config):
    a = data.train_loader(tiny_config, _mesh())
    _local(a, 2)
    state = a.get_state()
    rest = _local(a, 3)
    b = data.train_loader(tiny_config, _mesh())
    b.set_state(state)
    for x, y in zip(rest, _local(b, 3)):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_process_slices_reassemble_the_global_batch(tiny_config):
    whole = data.Loader(
        tiny_config, _mesh(), split="train", train=True, num_batches=2, process_index=0, process_count=1
    )
    want = next(whole._it)
    parts = []
    for p in range(2):
        loader = data.Loader(
            tiny_config, _mesh(), split="train", train=True, num_batches=2, process_index=p, process_count=2
        )
        parts.append(next(loader._it))
    np.testing.assert_array_equal(np.concatenate([p["images"] for p in parts]), want["images"])


def test_augmentation_keeps_shape_and_range():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    aug = ml_collections.ConfigDict(dict(random_resized_crop=(0.5, 0.6), brightness=0.2, contrast=0.2))
    out = data.augment(frames, np.random.default_rng(1), aug)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert not np.array_equal(out, frames)
    none = ml_collections.ConfigDict(dict(random_resized_crop=(1.0, 1.0), brightness=0.0, contrast=0.0))
    np.testing.assert_array_equal(data.augment(frames, np.random.default_rng(1), none), frames)


def test_iterate_videos_yields_every_record_in_order(records_dir):
    videos = list(data.iterate_videos(records_dir, "val", frames=2, image_size=48))
    n = sum(len(records.ShardReader(p)) for p in records.list_shards(records_dir, "val"))
    assert len(videos) == n > 0
    v = videos[0]
    assert v["frames"].shape == (2, 48, 48, 3) and v["frames"].dtype == np.uint8
    assert len(v["video_id"]) >= 16 and v["report"]
    again = [x["video_id"] for x in data.iterate_videos(records_dir, "val")]
    assert again == [x["video_id"] for x in videos]


def test_corrupt_record_raises_naming_the_shard_or_is_skipped(tiny_config, tmp_path):
    for p in records.list_shards(tiny_config.data_dir, "train"):
        shutil.copy(p, tmp_path)
        shutil.copy(records.index_path(p), tmp_path)
    first = records.list_shards(str(tmp_path), "train")[0]
    raw = bytearray(open(first, "rb").read())
    raw[40] ^= 0xFF
    open(first, "wb").write(bytes(raw))
    tiny_config.data_dir = str(tmp_path)
    source = data.ShardedRecords(str(tmp_path), "train")
    sample = data._Sample(source, tiny_config, train=False)
    with pytest.raises(records.CorruptRecordError, match="train-00000"):
        sample(0)
    tiny_config.data.on_corrupt_record = "skip"
    out = data._Sample(source, tiny_config, train=False)(0)
    assert out["images"].shape == (32, 32, 3)


def test_missing_shards_error_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.ShardedRecords(str(tmp_path), "train")


def test_multi_frame_samples(tiny_config):
    tiny_config.data.frames_per_sample = 2
    batch = next(data.train_loader(tiny_config, _mesh()))
    assert batch["images"].shape == (16, 2, 32, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_worker_processes_give_the_same_stream_and_resume(tiny_config, where, request):
    want = _local(data.train_loader(tiny_config, _mesh()), 4)
    if where == "gs":  # worker processes read the bucket themselves
        remote = request.getfixturevalue("bucket") + "/records"
        storage.copytree(tiny_config.data_dir, remote)
        tiny_config.data_dir = remote
    tiny_config.data.num_workers = 2
    loader = data.train_loader(tiny_config, _mesh())
    got = _local(loader, 2)
    state = loader.get_state()
    resumed = data.train_loader(tiny_config, _mesh())
    resumed.set_state(state)
    got += _local(resumed, 2)
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x["images"], y["images"])


def test_loaders_give_the_same_batches_from_a_bucket_as_from_local_disk(tiny_config, bucket):
    local = tiny_config.data_dir
    want_train = _local(data.train_loader(tiny_config, _mesh()), 3)
    want_eval = _local(data.eval_loader(tiny_config, _mesh()), 1)
    want_videos = list(data.iterate_videos(local, "val", frames=2))
    storage.copytree(local, f"{bucket}/records")
    tiny_config.data_dir = f"{bucket}/records"
    train = data.train_loader(tiny_config, _mesh())
    got_train = _local(train, 2)
    state = train.get_state()
    resumed = data.train_loader(tiny_config, _mesh())
    resumed.set_state(state)  # a run resumed from a checkpoint reads on from the bucket
    got_train += _local(resumed, 1)
    got_eval = _local(data.eval_loader(tiny_config, _mesh()), 1)
    for want, got in zip(want_train + want_eval, got_train + got_eval, strict=True):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    got_videos = list(data.iterate_videos(tiny_config.data_dir, "val", frames=2))
    assert [v["video_id"] for v in got_videos] == [v["video_id"] for v in want_videos]
    for want, got in zip(want_videos, got_videos):
        np.testing.assert_array_equal(got["frames"], want["frames"])
