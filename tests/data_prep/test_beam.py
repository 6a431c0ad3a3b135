"""The Beam pipeline (DirectRunner) writes byte-identical shards to the local runner's, and resumes."""

import glob
import json
import os

import pytest

beam = pytest.importorskip("apache_beam")

from data_prep import beam as beam_main  # noqa: E402
from data_prep import convert, synthetic  # noqa: E402

SALT = "beam-test-salt-91c2"


def _args(cohort, out):
    return [
        "--dicom_dir",
        str(cohort / "dicom"),
        "--reports",
        str(cohort / "reports.csv"),
        "--out",
        str(out),
        "--salt",
        SALT,
        "--shard_size",
        "3",
        "--frames",
        "4",
        "--image_size",
        "32",
    ]


def _files(out):
    return {os.path.basename(p): open(p, "rb").read() for p in glob.glob(str(out / "*.tfrecord*"))}


def test_direct_runner_matches_the_local_runner_and_resumes(tmp_path):
    cohort = tmp_path / "cohort"
    synthetic.generate(cohort, patients=2, seed=5, small=True)
    assert convert.main(_args(cohort, tmp_path / "local")) == 0
    out = tmp_path / "beam"
    assert beam_main.main([*_args(cohort, out), "--runner", "DirectRunner"]) == 0
    local, got = _files(tmp_path / "local"), _files(out)
    assert len(got) >= 4 and got == local  # same shards, same indexes, byte for byte
    manifest = lambda o: sorted(open(o / "manifest.jsonl").read().splitlines())  # noqa: E731
    assert manifest(out) == manifest(tmp_path / "local")
    info = json.load(open(out / "dataset_info.json"))
    assert info["num_converted"] == len(synthetic.read_truth(cohort))

    victim = sorted(p for p in glob.glob(str(out / "*.tfrecord")))[0]
    os.remove(victim)  # as if a worker died before renaming this shard
    kept = {p: os.path.getmtime(p) for p in glob.glob(str(out / "*.tfrecord")) if p != victim}
    assert beam_main.main([*_args(cohort, out), "--runner", "DirectRunner"]) == 0
    assert _files(out) == local
    assert all(os.path.getmtime(p) == t for p, t in kept.items())  # only the missing shard was redone
