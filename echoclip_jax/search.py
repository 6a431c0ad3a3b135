"""Semantic search over an archive of echo videos: embed every video and study once, then query by text,
by a video file or study directory, or by the study of an indexed video.

  python -m echoclip_jax.search build --checkpoint KIND:PATH --config C --data_dir O [--split train,val,test]
      --out INDEX [--kind auto|exact|ivf] [--approximate_above N] [--reports]
  python -m echoclip_jax.search add INDEX --data_dir NEW_EXPORT [--split ...]
  python -m echoclip_jax.search query INDEX (--text "..." | --video x.dcm | --study_of VIDEO_ID) [--k 10]
      [--level both|video|study] [--exclude_same_patient] [--out results.json]

The vector search is faiss (faiss-cpu): one library gives exact flat inner-product search for small
archives and IVF for large ones under the same 64-bit keys, with add and remove after training (a month's
export joins the trained cells; a study whose mean changes is replaced), and prebuilt CPU wheels for Linux
and macOS. ScaNN has no macOS or Windows wheels and rebuilds its index to add data; HNSW (usearch's engine,
also in faiss) built 100k vectors of width 512 18x slower than IVF here (100 s vs 5.6 s on 2 cores,
BENCHMARKS.md) and cannot remove entries in faiss.

What an index holds (`echoclip_jax.retrieval.archive`): the records' salted video, study and patient ids,
the split, the embeddings, the faiss indexes and non-identifying settings (the model's checkpoint spec
and config). No report text, unless `build --reports` asks for a report bank for `echoclip_jax.report`,
and then only the de-identified text the records already hold.

INDEX, --data_dir, --video and --out are each a local path or a gs:// URL (`echoclip_jax.runtime.storage`; an
index on a bucket is written and swapped in as `echoclip_jax.retrieval.archive` describes).

The work is done in `echoclip_jax.retrieval.ops`; this file parses the command line.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax.config.validation import validate
from echoclip_jax.retrieval import archive as archive_lib
from echoclip_jax.retrieval import ops
from echoclip_jax.runtime import cli, storage

COMMANDS = ("build", "add", "query")
log = logging.getLogger("echoclip_jax.search")

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "checkpoint",
    None,
    "KIND:PATH[@STEP] (see echoclip_jax.weights.loader); build: required; add/query: default the index's own",
    flag_values=FLAGS,
)
config_flags.DEFINE_config_file(
    "config", None, "configs/*.py (with --checkpoint)", lock_config=False, flag_values=FLAGS
)
flags.DEFINE_string(
    "data_dir", None, "records from data_prep.convert (build, add): local path or gs:// URL", flag_values=FLAGS
)
flags.DEFINE_list("split", None, "splits to index (default: every split with shards)", flag_values=FLAGS)
flags.DEFINE_string(
    "out",
    None,
    "build: the INDEX directory; query: write the results as JSON here (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "kind",
    "auto",
    ["auto", "exact", "ivf"],
    "auto: exact up to --approximate_above vectors, IVF above",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "approximate_above",
    archive_lib.APPROXIMATE_ABOVE,
    "auto: vectors above which a level is indexed approximately",
    flag_values=FLAGS,
)
flags.DEFINE_integer("nlist", None, "IVF cells (default about sqrt(N))", flag_values=FLAGS)
flags.DEFINE_integer(
    "nprobe", None, "IVF cells scanned per query (build: stored default; query: override)", flag_values=FLAGS
)
flags.DEFINE_boolean(
    "reports",
    False,
    "build: also keep a report bank (the records' de-identified report text and "
    "its text embedding, per study) for echoclip_jax.report",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "frames",
    None,
    "at most this many evenly spaced frames per video (default: all the records "
    "hold; DICOM queries: as many as data_prep kept)",
    flag_values=FLAGS,
)
flags.DEFINE_integer("batch_size", 128, "frames (or texts) per device batch", flag_values=FLAGS)
flags.DEFINE_string("text", None, "query: a report-style text", flag_values=FLAGS)
flags.DEFINE_string(
    "video",
    None,
    "query: a .dcm/.avi/.npy video or a study directory of such files (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "study_of", None, "query: the salted video_id of an indexed video: its study's neighbours", flag_values=FLAGS
)
flags.DEFINE_integer("k", 10, "query: neighbours per level", flag_values=FLAGS)
flags.DEFINE_enum("level", "both", ["both", "video", "study"], "query: which neighbours", flag_values=FLAGS)
flags.DEFINE_boolean(
    "exclude_same_patient", False, "query --study_of: leave out the patient's other studies", flag_values=FLAGS
)


def _summary(index: archive_lib.Archive) -> None:
    levels = ", ".join(
        f"{len(index.rows[lv])} {archive_lib.FILES[lv]} ({index.meta['levels'].get(lv, {}).get('kind')})"
        for lv in archive_lib.LEVELS
    )
    bank = f", {len(index.reports)} reports in the report bank" if index.reports is not None else ""
    log.info("wrote %s: %s%s", index.path, levels, bank)


def _print(result: dict) -> None:
    q = result["query"]
    what = (
        f"text {q['text']!r}"
        if "text" in q
        else f"video {q['video']} ({q['files']} file(s))"
        if "video" in q
        else f"the study of video {q['study_of']}"
    )
    for level, rows in result["results"].items():
        info = result["index"].get(level) or {}
        print(
            f"{level} neighbours of {what} ({info.get('kind')} search over {info.get('vectors', 0)} "
            f"{archive_lib.FILES[level]}):"
        )
        id_col = "video_id" if level == "video" else "study_id"
        print(f"  {'rank':>4s}  {'score':>7s}  {'split':5s}  {id_col}")
        for r in rows:
            print(f"  {r['rank']:4d}  {r['score']:7.4f}  {r['split']:5s}  {r[id_col]}")


def _query(f, path: str) -> None:
    index = archive_lib.Archive.open(path)
    if f.nprobe:
        for lv in archive_lib.LEVELS:
            if index.indexes[lv] is not None:
                index.indexes[lv].set_nprobe(f.nprobe)
    embedder = None
    if f.checkpoint and f.study_of is None:
        model = ops.model_of(index, f.checkpoint, f.config)
        embedder = ops.embedder_for(model, index.meta["model"].get("fingerprint"), path, f.batch_size)
    result = ops.query(
        index,
        text=f.text,
        video=f.video,
        study_of=f.study_of,
        k=f.k,
        levels=archive_lib.LEVELS if f.level == "both" else (f.level,),
        exclude_same_patient=f.exclude_same_patient,
        embedder=embedder,
        frames=f.frames,
    )
    _print(result)
    if f.out:
        storage.write_text(f.out, json.dumps(result, indent=1))
        log.info("wrote %s", f.out)


def _search(f, args: list[str]) -> None:
    if not args or args[0] not in COMMANDS:
        raise cli.UsageError(f"the first argument is one of {', '.join(COMMANDS)}")
    command, rest = args[0], args[1:]
    if command == "build" and (rest or not (f.out and f.checkpoint and f.config and f.data_dir)):
        raise cli.UsageError(
            "build takes no positional argument and needs --checkpoint KIND:PATH, --config C, "
            "--data_dir O and --out INDEX"
        )
    if command != "build" and len(rest) != 1:
        raise cli.UsageError(f"{command} takes one positional argument, the INDEX directory")
    if command != "build":
        try:  # the positional INDEX is a path as the flags are: checked before anything is loaded
            storage.check(rest[0], "INDEX")
        except storage.StorageError as e:
            raise cli.UsageError(str(e)) from None
    if command == "add" and not f.data_dir:
        raise cli.UsageError("add needs --data_dir NEW_EXPORT")
    if f.config is not None:
        validate(f.config, training=False)
    if command == "build":
        _summary(
            ops.build(
                f.out,
                checkpoint=f.checkpoint,
                config=f.config,
                data_dir=f.data_dir,
                splits=f.split,
                kind=f.kind,
                approximate_above=f.approximate_above,
                nlist=f.nlist,
                nprobe=f.nprobe,
                report_bank=f.reports,
                frames=f.frames,
                batch_size=f.batch_size,
            )
        )
    elif command == "add":
        ops.add(
            rest[0],
            data_dir=f.data_dir,
            splits=f.split,
            checkpoint=f.checkpoint,
            config=f.config,
            batch_size=f.batch_size,
        )
        _summary(archive_lib.Archive.open(rest[0]))
    else:
        _query(f, rest[0])


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _search,
        FLAGS,
        argv,
        name="search",
        doc=__doc__,
        positional=True,
        paths=("data_dir", "out", "video"),
        specs=("checkpoint",),
    )


if __name__ == "__main__":
    sys.exit(main())
