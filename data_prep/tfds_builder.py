"""Make a conversion's output loadable with tensorflow_datasets, for tf.data users.

    python -m data_prep.tfds_builder --data_dir O [--name echoclip_videos] [--version 1.0.0]

TFDS keeps its own `dataset_info.json` and `features.json` in the dataset's directory, which would clash
with ours, so they go to `O/tfds/<name>/<version>/`, beside relative symlinks to the shards (the records
are not copied). The shard names already follow TFDS's `{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}` template, and
split sizes come from our `.index` files, so no TensorFlow is needed to write the metadata. With TensorFlow
installed (extra `tf`):
    ds = tfds.builder_from_directory("O/tfds/echoclip_videos/1.0.0").as_dataset(split="train")

gives dicts with `frames` uint8 [K, S, S, 3] (decoded JPEG), ids and report as tf.string, and the scalars.
A conversion in a bucket: a bucket holds no symlinks and copying every shard would double it, so run this on
a gcsfuse mount of the bucket (gcsfuse keeps symlinks; --data_dir is then a local path).
TFDS decodes JPEG with libjpeg's fast integer DCT (up to ~4 grey levels from Pillow's); pass
`decoders=tfds_builder.decoders()` to get the pixels echoclip_jax's loader (Pillow) sees, exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_prep import options, records
from echoclip_jax.runtime import storage

TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"


def features(image_size: int):
    """The TFDS feature spec of data_prep.records.SCHEMA (scalars are one-element lists in the Example)."""

    f = tfds.features
    text = {name: f.Text() for name in ("video_id", "patient_id", "study_id", "report", "source")}
    ints = {name: f.Tensor(shape=(), dtype=np.int64) for name in ("study_day", "num_frames", "image_size")}
    floats = {name: f.Tensor(shape=(), dtype=np.float32) for name in ("fps", "ef")}
    frames = f.Sequence(f.Image(shape=(image_size, image_size, 3), encoding_format="jpeg"))
    spec = {**text, **ints, **floats, "frames": frames}
    missing = set(records.SCHEMA) ^ set(spec)
    if missing:  # the record schema changed: this spec must follow it
        raise AssertionError(f"TFDS features and records.SCHEMA disagree on {sorted(missing)}")
    return f.FeaturesDict(spec)


def decoders() -> dict:
    """`as_dataset(decoders=...)` that decodes frames with the accurate integer DCT, as Pillow does, so tf.data
    and echoclip_jax.data see identical pixels."""
    import tensorflow as tf  # noqa: PLC0415 (optional: the tf extra)

    @tfds.decode.make_decoder(output_dtype=tf.uint8)
    def accurate_jpeg(serialized, feature):
        return tf.io.decode_jpeg(serialized, channels=3, dct_method="INTEGER_ACCURATE")

    return {"frames": accurate_jpeg()}


def write_metadata(data_dir: str, name: str = "echoclip_videos", version: str = "1.0.0") -> str:
    """Write TFDS metadata for the finished conversion in `data_dir`; returns the TFDS dataset directory."""

    info_path = os.path.join(data_dir, "dataset_info.json")
    try:
        with open(info_path) as f:
            info = json.load(f)
        image_size = int(info["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: not a finished data_prep conversion ({type(e).__name__}: {e})") from None
    target = os.path.join(data_dir, "tfds", name, version)
    os.makedirs(target, exist_ok=True)
    split_infos = []
    for split in records.SPLITS:
        shards = records.list_shards(data_dir, split)
        if not shards:
            continue
        for shard in shards:
            link = os.path.join(target, os.path.basename(shard))
            if not os.path.lexists(link):
                os.symlink(os.path.relpath(shard, target), link)
        split_infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(records.ShardReader(s)) for s in shards],
                num_bytes=sum(os.path.getsize(s) for s in shards),
                filename_template=tfds.core.ShardedFileTemplate(
                    data_dir=epath.Path(target),
                    template=TEMPLATE,
                    dataset_name=name,
                    split=split,
                    filetype_suffix="tfrecord",
                ),
            )
        )
    if not split_infos:
        raise ValueError(f"{data_dir}: no shards to describe")
    tfds.folder_dataset.write_metadata(
        data_dir=target,
        features=features(image_size),
        split_infos=split_infos,
        version=version,
        filename_template=TEMPLATE,
        check_data=False,
        description="EchoCLIP-style echocardiography videos and reports written by data_prep.convert "
        "(one tf.train.Example per video; see data_prep/records.py).",
    )
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.tfds_builder", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data_dir", required=True, help="output directory of data_prep.convert (local; a bucket through gcsfuse)"
    )
    p.add_argument("--name", default="echoclip_videos")
    p.add_argument("--version", default="1.0.0")
    args = p.parse_args(argv)
    try:
        storage.check(args.data_dir, "--data_dir")
    except storage.StorageError as e:
        p.error(str(e))
    if storage.is_remote(args.data_dir):
        p.error(
            f"--data_dir={args.data_dir}: TFDS metadata sits beside symlinks to the shards, which a bucket cannot "
            "hold; mount the bucket with gcsfuse (docs/data_prep.md) and give the mounted folder"
        )
    try:
        print(write_metadata(args.data_dir, args.name, args.version))
    except (ValueError, OSError) as e:
        return options.failed("data_prep.tfds_builder", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
