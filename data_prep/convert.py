"""DICOM export + reports (or EchoNet-Dynamic) -> sharded, indexed, de-identified TFRecords.

    python -m data_prep.convert --dicom_dir D --reports R.csv --out O --salt_file F [--workers N]
    python -m data_prep.convert --echonet_dir E --out O --salt S

Two passes. (1) Plan (data_prep.plan): read every header, pair videos with reports, hash the ids, split by
patient and assign every video to a shard. (2) Write (data_prep.shards): each shard is converted by one
worker into a temporary file and published when complete, with its manifest part, so a rerun after a
crash or Ctrl-C skips finished shards and redoes the rest. Then manifest.jsonl (every input, converted or
skipped and why) and dataset_info.json are written from the parts. `prepare` and `finish` are shared with
the Apache Beam runner (data_prep.beam).

Every path option (--out, --dicom_dir, --reports, --echonet_dir, --salt_file, --path_map) is a local path or
a gs:// URL (echoclip_jax.runtime.storage), checked at start-up. An output in a bucket is written object by
object, each whole, the shard after its index and manifest part, so a rerun resumes there as on disk; an
input in a bucket is read through a local temporary copy of each file.

Privacy: only the fields of data_prep.records.SCHEMA leave the conversion. The salt is never written.
Report text is de-identified (data_prep.report_deid) with its study's own header identifiers, patterns and
any `--report_detector` before it is normalised and written; only counts per category are reported.
Manifest lines name each input by a salted hash of its relative path (`--manifest_paths relative` writes
the path itself, for exports whose file names are known to carry no PHI); the map from hash to path is
written only outside --out, beside the salt file or at `--path_map` (Options).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import sys

from data_prep import options as options_lib
from data_prep import records, report_deid
from data_prep.options import Options
from data_prep.plan import (
    Plan,
    assign_shards,
    fingerprint,
    plan_dicom,
    plan_echonet,
    progress_bar,
)
from data_prep.shards import PARTS, ShardTask, finished_shards, write_shard
from echoclip_jax.runtime import storage

_PLAN = ".plan.json"  # fingerprint of the plan, so a rerun never mixes two different conversions
TOO_MANY_SKIPPED = 3  # exit status: the records are written, but more inputs were skipped than allowed


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Pass 1 and the resume check done: what is left to write, and what the manifest already holds."""

    todo: list[ShardTask]  # shards still to write
    done: dict[str, list[dict]]  # finished shard -> its manifest lines
    skipped: list[dict]  # manifest lines of the inputs skipped at scan


def make_deidentifier(options: Options):
    """The report de-identifier of the options, or None with `--report_deid off`."""
    if options.report_deid == "off":
        return None
    region = options.phone_region
    return report_deid.Deidentifier(options.report_detectors, None if region.lower() == "none" else region.upper())


def write_path_map(path: str, inputs: dict[str, str]) -> int:
    """Add the inputs not yet in the map at `path`, one JSON line {"input": manifest hash, "path": relative
    path} each, to a file only its owner can read (on a bucket: the object rewritten whole, with the
    bucket's own access control); returns how many inputs the map names.

    The map only grows: a hash always stands for the same relative path (it is computed from it), so one
    map beside the salt serves every conversion made with that salt."""
    known = set()
    try:
        text = storage.read_text(path) if storage.exists(path) else ""
        for number, line in enumerate(text.splitlines(), 1):
            try:
                known.add(json.loads(line)["input"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'{path}: line {number} is not a path map line ({{"input": ..., '
                    '"path": ...}); give another --path_map'
                ) from None
        new = [json.dumps({"input": ref, "path": rel}) + "\n" for ref, rel in inputs.items() if ref not in known]
        if new and storage.is_remote(path):
            storage.write_text(path, text + ("" if not text or text.endswith("\n") else "\n") + "".join(new))
        elif new:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "w", encoding="utf-8") as f:
                f.write("".join(new))
    except OSError as e:
        raise ValueError(
            f"{path}: cannot write the path map ({e.strerror or e}); give a writable --path_map, or --path_map none"
        ) from None
    return len(known | set(inputs))


def _path_map_line(options: Options, plan: Plan) -> str | None:
    """Write the path map; the stderr line that says where it is (or how to get one)."""
    if options.manifest_paths == "relative" or options.path_map == "none":
        return None
    target = options.path_map_file
    if target is None:
        return (
            "manifest inputs are named by salted hashes and no path map is kept: pass --salt_file or "
            "--path_map FILE to keep one (hash -> input path) where the salt is"
        )
    n = write_path_map(target, plan.inputs)
    return f"path map (manifest hash -> input path; private, keep it with the salt): {target} ({n} inputs)"


def prepare(options: Options, ctx=None) -> Prepared:
    """Pass 1, the resume check and the path map, shared by the local runner and data_prep.beam."""
    salt = options_lib.read_salt(options)
    ctx = ctx or multiprocessing.get_context("spawn")
    storage.makedirs(storage.join(options.out, PARTS))
    if options.echonet_dir:
        plan = plan_echonet(options, salt)
    else:
        plan = plan_dicom(options, salt, make_deidentifier(options), ctx)
    settings = options.settings
    shards = assign_shards(plan.jobs, plan.splits, settings.shard_size)
    digest = fingerprint(shards, settings, plan.skipped)
    plan_path = storage.join(options.out, _PLAN)
    if storage.exists(plan_path) and storage.load_json(plan_path).get("fingerprint") != digest:
        raise ValueError(
            f"{options.out} holds a different conversion (other inputs, salt or settings); use an empty --out"
        )
    storage.dump_json(plan_path, {"fingerprint": digest, "report_deid": plan.report_deid})
    done = finished_shards(options.out, list(shards))
    todo = [ShardTask(options.out, name, tuple(m), settings) for name, m in shards.items() if name not in done]
    print(
        f"{len(plan.jobs)} videos planned in {len(shards)} shards ({len(done)} already done); "
        f"{len(plan.skipped)} inputs skipped at scan",
        file=sys.stderr,
    )
    print(_deid_line(plan.report_deid), file=sys.stderr)
    map_line = _path_map_line(options, plan)
    if map_line:
        print(map_line, file=sys.stderr)
    return Prepared(todo, done, plan.skipped)


def run(options: Options) -> int:
    """The whole conversion on this machine (`options.workers` processes); returns the exit status."""
    ctx = multiprocessing.get_context("spawn")
    prepared = prepare(options, ctx)
    todo, done = prepared.todo, dict(prepared.done)
    parallel = options.workers > 1 and len(todo) > 1
    with progress_bar(options.progress, sum(len(t.jobs) for t in todo), "convert", "video") as bar:
        pool = ctx.Pool(min(options.workers, len(todo))) if parallel else None
        for name, lines in pool.imap_unordered(write_shard, todo) if pool else map(write_shard, todo):
            done[name] = lines
            bar.update(len(lines))
        if pool:
            pool.close()
            pool.join()
    return finish(options, done, prepared.skipped)


def _deid_line(deid: dict) -> str:
    if deid.get("mode") == "off":
        return (
            "report de-identification is OFF (--report_deid off): report text is written as given; use this "
            "only for reports that are already de-identified"
        )
    if deid.get("mode") != "on":
        return f"report de-identification: {deid.get('mode')}"
    removed = ", ".join(f"{k} {v}" for k, v in deid["removed"].items()) or "nothing found"
    return (
        f"report de-identification: {sum(deid['removed'].values())} identifiers removed from "
        f"{deid['reports_with_removals']} of {deid['reports']} reports ({removed})"
    )


def _plan_deid(out: str) -> dict:
    return storage.load_json(storage.join(out, _PLAN)).get("report_deid", {})


def finish(options: Options, done: dict[str, list[dict]], skipped: list[dict]) -> int:
    """Write manifest.jsonl and dataset_info.json from every shard's lines; print the summary; exit status."""
    out, settings = options.out, options.settings
    manifest = list(skipped) + [line for name in sorted(done) for line in done[name]]
    storage.write_text(storage.join(out, "manifest.jsonl"), "".join(json.dumps(line) + "\n" for line in manifest))
    counts = {s: 0 for s in records.SPLITS}
    num_shards = {s: 0 for s in records.SPLITS}
    for name, lines in done.items():
        split = name.split("-")[0]
        counts[split] += sum(line["status"] == "converted" for line in lines)
        num_shards[split] += 1
    converted = sum(counts.values())
    reasons = collections.Counter(line["reason"] for line in manifest if line["status"] == "skipped")
    info = {
        "format": "tf.train.Example in TFRecord shards {split}-NNNNN-of-MMMMM.tfrecord, one .index each "
        "(data_prep.records)",
        "source": "echonet" if options.echonet_dir else "dicom",
        "splits": {s: {"num_videos": counts[s], "num_shards": num_shards[s]} for s in records.SPLITS},
        "features": records.SCHEMA,
        "max_frames": settings.frames,
        "image_size": settings.image_size,
        "jpeg_quality": settings.jpeg_quality,
        "text_field": "report",
        "report_normalisation": "data_prep.reports.clean_text",
        "report_deid": _plan_deid(out),
        "num_inputs": len(manifest),
        "num_converted": converted,
        "num_skipped": len(manifest) - converted,
        "skipped_reasons": dict(reasons),
    }
    storage.dump_json(storage.join(out, "dataset_info.json"), info, indent=1)
    n_skipped = len(manifest) - converted
    print(
        f"converted {converted} of {len(manifest)} inputs "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}); skipped {n_skipped}"
    )
    for reason, n in reasons.most_common():
        print(f"  skipped {n}: {reason}")
    fraction = n_skipped / max(len(manifest), 1)
    if fraction > options.max_skipped_fraction:
        print(
            f"data_prep.convert: {fraction:.1%} of inputs skipped, above --max_skipped_fraction "
            f"{options.max_skipped_fraction:.1%} (see {storage.join(out, 'manifest.jsonl')})",
            file=sys.stderr,
        )
        return TOO_MANY_SKIPPED
    return 0


def build_parser():
    return options_lib.build_parser("python -m data_prep.convert", __doc__.split("\n\n")[0])


def main(argv=None) -> int:
    parser = build_parser()
    options = options_lib.from_args(parser, parser.parse_args(argv))
    try:
        return run(options)
    except (ValueError, OSError) as e:
        return options_lib.failed("data_prep.convert", e)


if __name__ == "__main__":
    sys.exit(main())
