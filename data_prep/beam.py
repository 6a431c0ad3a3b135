"""The conversion's write pass as an Apache Beam pipeline, for when one machine is not enough.

    python -m data_prep.beam --dicom_dir D --reports R.csv --out O --salt_file F --runner DirectRunner \
        [every data_prep.convert option] [Beam pipeline options, e.g. --direct_num_workers 4]

Pass 1 (read every header, pair reports, hash ids, split, assign shards, resume check) runs here in the
launcher with `--workers` processes; it reads headers only. Pass 2, the expensive part, is one Beam
element per unfinished shard running `data_prep.shards.write_shard`, the same unit the local runner
uses, so records, manifest lines and resume behave identically. The launcher then writes manifest.jsonl
and dataset_info.json from the per-shard manifest parts. `--out` and the inputs must be paths every
worker can open: a gs:// URL (Dataflow's workers write each shard, its index and its manifest part to the
bucket themselves) or a shared filesystem (NFS, Filestore, a GCS FUSE mount).
"""

from __future__ import annotations

import sys

from data_prep import convert, options, shards
from echoclip_jax.runtime import storage


def _write(task: shards.ShardTask) -> tuple[str, int]:
    """One shard: (shard name, converted count); counters make progress visible in the runner's UI."""
    from apache_beam.metrics import Metrics  # noqa: PLC0415 (optional: the beam extra)

    name, lines = shards.write_shard(task)
    converted = sum(line["status"] == "converted" for line in lines)
    Metrics.counter("data_prep", "videos_converted").inc(converted)
    Metrics.counter("data_prep", "videos_skipped").inc(len(lines) - converted)
    return name, converted


def build_parser():
    p = options.build_parser("python -m data_prep.beam", __doc__.split("\n\n")[0])
    p.add_argument(
        "--runner",
        default="DirectRunner",
        help="Beam runner: DirectRunner (here), DataflowRunner, FlinkRunner, SparkRunner, ...",
    )
    return p


def main(argv=None) -> int:
    import apache_beam as beam  # noqa: PLC0415 (optional: the beam extra)
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415 (optional: the beam extra)

    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    opts = options.from_args(parser, args)
    try:
        prepared = convert.prepare(opts)
    except (ValueError, OSError) as e:
        return options.failed("data_prep.beam", e)
    done = dict(prepared.done)
    if prepared.todo:
        with beam.Pipeline(options=PipelineOptions(beam_args, runner=args.runner)) as pipeline:
            (
                pipeline
                | "shards" >> beam.Create(prepared.todo)
                | "spread" >> beam.Reshuffle()
                | "write" >> beam.Map(_write)
            )
    written = shards.finished_shards(opts.out, [task.name for task in prepared.todo])
    for task in prepared.todo:
        if task.name not in written:
            print(
                f"error: shard {storage.join(opts.out, task.name)} was not completed by the pipeline; rerun to resume",
                file=sys.stderr,
            )
            return 4
        done[task.name] = written[task.name]
    return convert.finish(opts, done, prepared.skipped)


if __name__ == "__main__":
    sys.exit(main())
