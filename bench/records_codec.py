"""Records per second of the tf.train.Example codec: protobuf (upb backend; what data_prep.records uses)
against the hand-written wire-format codec it replaced, on real records, timed in one process.

    python bench/records_codec.py [--patients 2] [--rounds 7] [--repeat 20] [--hand_codec_rev 40002c0] [--no_append]

Records: a full-size synthetic cohort (600x800 videos) converted with 32 frames kept at 224x224 (JPEG quality
90), the records the training loader decodes. The hand-written codec is data_prep/records.py at
--hand_codec_rev (`git show`), loaded as a second module. Before timing, every record is checked both ways:
each codec decodes the other's bytes field for field, and both encode the decoded dict to the same bytes.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/data_prep.py shadows data_prep

from bench import common  # noqa: E402
from data_prep import convert, records, synthetic  # noqa: E402
from data_prep.options import Options, Settings  # noqa: E402


def load_hand_codec(rev: str, tmp: str):
    """data_prep/records.py as it was at `rev`, imported as the module `hand_records`."""
    source = subprocess.run(
        ["git", "-C", REPO, "show", f"{rev}:data_prep/records.py"], capture_output=True, text=True, check=True
    ).stdout
    if "_read_varint" not in source:
        raise SystemExit(f"data_prep/records.py at {rev} has no hand-written codec; pass --hand_codec_rev")
    path = os.path.join(tmp, "hand_records.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("hand_records", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a: dict, b: dict) -> bool:
    nan = lambda x: isinstance(x, float) and math.isnan(x)  # noqa: E731
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(type(x) is type(y) and (x == y or nan(x) and nan(y)) for x, y in zip(a[k], b[k]))
        for k in a
    )


def _each(fn, items) -> None:
    """fn over items, one result alive at a time (as in the loader, which decodes a record and moves on)."""
    for x in items:
        fn(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=20, help="passes over the records per timed call")
    ap.add_argument("--hand_codec_rev", default="40002c0", help="a commit whose data_prep/records.py is hand-written")
    ap.add_argument("--no_append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    machine = common.machine()
    with tempfile.TemporaryDirectory() as tmp:
        hand = load_hand_codec(args.hand_codec_rev, tmp)
        synthetic.generate(os.path.join(tmp, "cohort"), patients=args.patients, seed=0, small=False)
        out = os.path.join(tmp, "out")
        status = convert.run(
            Options(
                out=out,
                dicom_dir=os.path.join(tmp, "cohort", "dicom"),
                reports=os.path.join(tmp, "cohort", "reports.csv"),
                salt="bench-salt-1234",
                settings=Settings(frames=32, image_size=224),
                progress="off",
            )
        )
        assert status == 0, status
        raws = [bytes(r) for p in sorted(glob.glob(os.path.join(out, "*.tfrecord"))) for r in records.ShardReader(p)]
    dicts = [records.decode_example(r) for r in raws]
    for raw, d in zip(raws, dicts):
        assert _same(d, hand.decode_example(raw)), "the codecs decode a record differently"
        assert records.encode_example(d) == hand.encode_example(d) == raw, "the codecs encode a record differently"
    many_dicts, many_raws = dicts * args.repeat, raws * args.repeat
    fns = {
        "encode protobuf": lambda: _each(records.encode_example, many_dicts),
        "encode hand-written": lambda: _each(hand.encode_example, many_dicts),
        "decode protobuf": lambda: _each(records.decode_example, many_raws),
        "decode hand-written": lambda: _each(hand.decode_example, many_raws),
    }
    times = common.alternate(fns, rounds=args.rounds, warmup=1)
    rate = {name: len(many_raws) / common.median(t) for name, t in times.items()}
    frames = sum(len(d["frames"]) for d in dicts) / len(dicts)
    size = sum(map(len, raws)) / len(raws) / 1024
    body = (
        f"Machine: {machine}. {len(raws)} records of a converted full-size synthetic cohort ({frames:.0f} "
        f"JPEG frames of 224x224 each, {size:.0f} KiB a record); the hand-written codec is data_prep/records.py "
        f"at {args.hand_codec_rev}. Each codec decodes the other's bytes field for field and both encode every "
        f"record to the same bytes. {args.rounds} alternating rounds of {args.repeat} passes over all records "
        "after a warm-up, median.\n\n"
    )
    body += common.table(
        ["codec", "encode records/s", "decode records/s"],
        [
            [kind, common.fmt_rate(rate[f"encode {kind}"]), common.fmt_rate(rate[f"decode {kind}"])]
            for kind in ("protobuf", "hand-written")
        ],
    )
    body += (
        f"\n\nprotobuf / hand-written: encode {rate['encode protobuf'] / rate['encode hand-written']:.1f}x, "
        f"decode {rate['decode protobuf'] / rate['decode hand-written']:.1f}x."
    )
    print(body)
    if not args.no_append:
        common.append_section("data_prep: records codec, protobuf (upb) vs the hand-written one", body)


if __name__ == "__main__":
    main()
