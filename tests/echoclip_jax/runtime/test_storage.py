"""The storage layer on local disk and on a real GCS server (fake-gcs-server on 127.0.0.1)."""

import os

import pytest

from echoclip_jax.runtime import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_files_round_trip_and_list(root):
    storage.write_text(storage.join(root, "a", "x.json"), '{"k": 1}')
    storage.write_bytes(storage.join(root, "a", "y.bin"), bytes(range(256)))
    assert storage.load_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.listdir(storage.join(root, "a")) == ["x.json", "y.bin"]
    assert storage.isdir(storage.join(root, "a")) and not storage.exists(storage.join(root, "b"))
    assert storage.listdir(storage.join(root, "b")) == []
    f = storage.join(root, "a", "y.bin")
    assert storage.size(f) == 256
    assert storage.read_range(f, 10, 5) == bytes(range(10, 15))
    assert storage.read_ranges(f, [0, 200, 7], [3, 2, 1]) == [b"\x00\x01\x02", b"\xc8\xc9", b"\x07"]
    storage.copytree(storage.join(root, "a"), storage.join(root, "c"))
    assert storage.read_bytes(storage.join(root, "c", "y.bin")) == bytes(range(256))
    storage.rmtree(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.json"))


def test_local_output_replaces_only_on_success(root):
    target = storage.join(root, "index.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.local_output(target) as local:
            with open(local, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed midway")
    assert storage.read_bytes(target) == b"old"
    with storage.local_output(target) as local:
        with open(local, "wb") as f:
            f.write(b"new")
    with storage.local_copy(target) as local:
        assert os.path.isfile(local) and open(local, "rb").read() == b"new"


def test_json_lines_grow_and_survive_a_restart(root):
    p = storage.join(root, "metrics.jsonl")
    log = storage.JsonLines(p, flush_every_s=0)
    log.write({"step": 1})
    log.write({"step": 2})
    assert storage.read_json_lines(p) == [{"step": 1}, {"step": 2}]
    log.close()
    again = storage.JsonLines(p, flush_every_s=3600)  # a resumed run keeps what the first one wrote
    again.write({"step": 3})
    again.close()
    assert [r["step"] for r in storage.read_json_lines(p)] == [1, 2, 3]


def test_a_bucket_object_is_never_appended_to(bucket):
    with pytest.raises(storage.StorageError, match="cannot be appended"):
        storage.open(bucket + "/m.jsonl", "a")


def test_check_names_the_flag_and_the_fix(gcs_server, bucket):
    with pytest.raises(storage.StorageError, match=r"--workdir=s3://b/run: the scheme s3:// is not supported"):
        storage.check("s3://b/run", "--workdir")
    with pytest.raises(storage.StorageError, match=r"--out=gs://no-such-bucket-x/o: bucket .* does not exist.*create"):
        storage.check("gs://no-such-bucket-x/o", "--out")
    with pytest.raises(storage.StorageError, match="not found"):
        storage.check(bucket + "/missing", "--src", must_exist=True)
    storage.check(bucket + "/new/run", "--workdir")  # a folder not yet written is fine
    storage.check("relative/local", "--workdir")
