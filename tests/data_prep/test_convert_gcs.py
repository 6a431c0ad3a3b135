"""data_prep.convert and its Beam runner with a bucket (a real GCS server on 127.0.0.1): inputs, salt and
output in gs:// give, byte for byte, the shards, indexes, manifest (with its skipped inputs and their
reasons), plan and dataset info of the same conversion on local disk; a rerun resumes in the bucket; a path
flag that cannot be used is refused at start-up, naming the flag."""

import pytest

from data_prep import convert, options, synthetic
from echoclip_jax.runtime import storage

SALT = "gcs-test-salt-5e1d"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    synthetic.generate(root, patients=2, seed=5, small=True)
    (root / "dicom" / "notes.txt").write_text("not dicom")  # an input the manifest reports as skipped
    (root / "secret").mkdir()
    (root / "secret" / "salt").write_text(SALT)
    return root


def _args(dicom, reports, salt_file, out, *extra):
    return [
        *("--dicom_dir", dicom, "--reports", reports, "--salt_file", salt_file, "--out", out),
        *("--shard_size", "3", "--frames", "4", "--image_size", "32", "--max_skipped_fraction", "0.5", *extra),
    ]


def _files(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file a conversion wrote (shards, indexes, parts, plan, manifest, info)."""
    return {rel: storage.read_bytes(storage.join(root, rel)) for rel in storage.files_under(root)}


@pytest.fixture(scope="module")
def local(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    args = _args(str(cohort / "dicom"), str(cohort / "reports.csv"), str(cohort / "secret" / "salt"), str(out))
    assert convert.main(args) == 0
    return _files(out)


def _upload_inputs(cohort, bucket) -> tuple[str, str, str]:
    storage.copytree(cohort / "dicom", f"{bucket}/export/dicom")
    storage.copy(cohort / "reports.csv", f"{bucket}/export/reports.csv")
    storage.copy(cohort / "secret" / "salt", f"{bucket}/secret/salt")
    return f"{bucket}/export/dicom", f"{bucket}/export/reports.csv", f"{bucket}/secret/salt"


def test_a_conversion_in_a_bucket_equals_the_local_one_and_resumes(cohort, local, bucket, capsys):
    dicom, reports, salt = _upload_inputs(cohort, bucket)
    out = f"{bucket}/records"
    args = _args(dicom, reports, salt, out)
    assert convert.main([*args, "--workers", "2"]) == 0  # worker processes read and write the bucket
    got = _files(out)
    assert sum(name.endswith(".tfrecord") for name in got) >= 3 and got == local
    manifest = storage.read_json_lines(f"{out}/manifest.jsonl")
    assert {m["reason"] for m in manifest if m["status"] == "skipped"} == {"not a DICOM file"}
    # the private path map sits beside the salt, in the bucket, naming every input as the local one does
    local_map = storage.read_text(cohort / "secret" / ("salt" + options.PATH_MAP_SUFFIX))
    assert storage.read_text(salt + options.PATH_MAP_SUFFIX) == local_map

    shards = sorted(name for name in got if name.endswith(".tfrecord"))
    storage.remove(f"{out}/{shards[0]}")  # a worker died after uploading the index, before its shard
    capsys.readouterr()
    assert convert.main(args) == 0
    assert f"({len(shards) - 1} already done)" in capsys.readouterr().err  # only the missing shard is redone
    assert _files(out) == local
    assert storage.read_text(salt + options.PATH_MAP_SUFFIX) == local_map  # a rerun adds nothing to the map


def test_the_beam_direct_runner_writes_the_same_records_to_a_bucket(cohort, local, bucket):
    pytest.importorskip("apache_beam")
    from data_prep import beam  # noqa: PLC0415 (the beam extra)

    out = f"{bucket}/beam"
    args = _args(str(cohort / "dicom"), str(cohort / "reports.csv"), str(cohort / "secret" / "salt"), out)
    assert beam.main([*args, "--runner", "DirectRunner"]) == 0
    assert _files(out) == local


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--out", "gs://no-such-bucket-3a9f/records"),
        ("--out", "s3://bucket/records"),
        ("--salt_file", "gs://no-such-bucket-3a9f/salt"),
        ("--salt_file", "s3://bucket/salt"),
        ("--reports", "gs://no-such-bucket-3a9f/reports.csv"),
        ("--dicom_dir", "gs://no-such-bucket-3a9f/dicom"),
    ],
)
def test_a_path_flag_that_cannot_be_used_is_refused_at_start_up(gcs_server, cohort, tmp_path, capsys, flag, value):
    paths = {
        "--dicom_dir": str(cohort / "dicom"),
        "--reports": str(cohort / "reports.csv"),
        "--salt_file": str(cohort / "secret" / "salt"),
        "--out": str(tmp_path / "out"),
    }
    paths[flag] = value
    with pytest.raises(SystemExit) as e:
        convert.main(_args(paths["--dicom_dir"], paths["--reports"], paths["--salt_file"], paths["--out"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}={value}" in err and "usage:" in err
    assert not (tmp_path / "out").exists()  # refused before any work
