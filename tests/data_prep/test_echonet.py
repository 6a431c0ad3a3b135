"""EchoNet-Dynamic layout on EchoCLIP's real example AVI (through a path, never copied into the project)."""

import io
import json
import os

import av
import numpy as np
from PIL import Image

from data_prep import convert, echonet, records
from echoclip_jax.runtime import storage


def test_read_kept_frames_matches_full_decode(reference_dir):
    path = str(reference_dir / "example_video.avi")
    assert echonet.probe(path) == (113, 30.0)
    with av.open(path) as c:  # reference: PyAV's own full decode
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
    assert full.shape == (113, 224, 224, 3)
    np.testing.assert_array_equal(echonet.read_frames(path, [0, 56, 112]), full[[0, 56, 112]])


def _layout(root, reference_dir):
    """An EchoNet-Dynamic folder: two good videos, a broken one, a missing one, an unknown split."""
    (root / "Videos").mkdir(parents=True)
    os.symlink(reference_dir / "example_video.avi", root / "Videos" / "0X1A.avi")
    os.symlink(reference_dir / "example_video.avi", root / "Videos" / "0X2B.avi")
    (root / "Videos" / "0X3C.avi").write_bytes(b"RIFF broken")
    (root / "FileList.csv").write_text(
        "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split\n"
        "0X1A,55.5,1,2,224,224,30,113,TRAIN\n0X2B,31.25,1,2,224,224,30,113,TEST\n"
        "0X3C,40,1,2,224,224,30,113,VAL\n0X4D,40,1,2,224,224,30,113,VAL\n0X5E,40,1,2,224,224,30,113,OTHER\n"
    )
    return root


def _convert(root, out, path_map):
    args = ["--echonet_dir", str(root), "--out", str(out), "--salt", "echonet-salt-1", "--frames", "16"]
    return convert.main([*args, "--image_size", "112", "--max_skipped_fraction", "0.7", "--path_map", str(path_map)])


def test_echonet_layout_converts_with_ef_and_split(reference_dir, tmp_path):
    root = _layout(tmp_path / "EchoNet-Dynamic", reference_dir)
    out = tmp_path / "out"
    assert _convert(root, out, tmp_path / "paths.jsonl") == 0
    [train] = [records.decode_example(r) for r in records.ShardReader(records.list_shards(str(out), "train")[0])]
    [test] = [records.decode_example(r) for r in records.ShardReader(records.list_shards(str(out), "test")[0])]
    assert records.list_shards(str(out), "val") == []
    assert train["ef"][0] == 55.5 and test["ef"][0] == 31.25
    assert train["source"] == [b"echonet"] and train["report"] == [b""] and train["num_frames"] == [16]
    assert train["fps"] == [30.0] and train["study_day"] == [0]
    frame = np.asarray(Image.open(io.BytesIO(train["frames"][0])))
    assert frame.shape == (112, 112, 3)
    manifest = [json.loads(line) for line in open(out / "manifest.jsonl")]
    reasons = sorted(m["reason"] for m in manifest if m["status"] == "skipped")
    assert len(manifest) == 5 and len(reasons) == 3
    assert "video file missing" in reasons and "unknown Split value 'OTHER'" in reasons
    paths = {e["input"]: e["path"] for e in map(json.loads, open(tmp_path / "paths.jsonl"))}
    skipped = {paths[m["input"]]: m["reason"] for m in manifest if m["status"] == "skipped"}
    assert skipped["Videos/0X4D.avi"] == "video file missing" and skipped["0X5E"] == "unknown Split value 'OTHER'"
    assert "Videos/0X3C.avi" in skipped and {paths[m["input"]] for m in manifest} == {
        "Videos/0X1A.avi",
        "Videos/0X2B.avi",
        "Videos/0X3C.avi",
        "Videos/0X4D.avi",
        "0X5E",
    }


def test_an_echonet_layout_in_a_bucket_converts_as_on_disk(reference_dir, tmp_path, bucket):
    root = _layout(tmp_path / "EchoNet-Dynamic", reference_dir)
    assert _convert(root, tmp_path / "out", tmp_path / "paths.jsonl") == 0
    storage.copytree(root, f"{bucket}/EchoNet-Dynamic")
    assert _convert(f"{bucket}/EchoNet-Dynamic", f"{bucket}/out", f"{bucket}/private/paths.jsonl") == 0
    written = storage.files_under(tmp_path / "out")
    assert storage.files_under(f"{bucket}/out") == written and len(written) >= 6
    for rel in written:  # records, indexes, manifest with the skipped videos and why, dataset info
        assert storage.read_bytes(f"{bucket}/out/{rel}") == storage.read_bytes(tmp_path / "out" / rel), rel
    assert storage.read_text(f"{bucket}/private/paths.jsonl") == storage.read_text(tmp_path / "paths.jsonl")
