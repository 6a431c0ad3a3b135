"""The main job: from nothing to a trained, evaluated, explained model on the synthetic cohort.

  python -m echoclip_jax.demo --out demo_out          (what `make demo` runs)

Every stage is the project's own command-line entry point, run as a user would run it, so the demo is also
the proof that the parts fit: synthetic DICOM cohort (version 2: several views per study, reports in
readers' own words) -> data_prep.convert -> train configs/tiny.py -> convert the final checkpoint to
safetensors -> evaluate on held-out patients, per video and per study (views pooled alike, and weighted by
their zero-shot relevance) -> probes on the frozen embeddings
(view, EF, devices) -> saliency maps, and the maps of the device prompts scored against the devices' true
masks -> preliminary reports by retrieval for the held-out studies (echoclip_jax.report), scored against the
cohort's truth beside k random reports. A stage whose output already exists is not redone, so an
interrupted demo resumes. The results table prints every figure beside the baseline it has to beat
(echoclip_jax.demo.results_table); `OUT/results.json` holds them. Only the demo joins the cohort's truth to the
records (the label CSVs it writes for the probes hold salted ids and stay under OUT/secrets).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from echoclip_jax.demo import results_table
from echoclip_jax.demo.pipeline import StageFailed, run
from echoclip_jax.runtime import cli, storage

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "out",
    "demo_out",
    "everything is written under this local directory (the synthetic cohort's DICOMs and every stage's files; "
    "the commands it runs each take gs:// paths, the demo itself works on local disk)",
    flag_values=FLAGS,
)
flags.DEFINE_integer("patients", 500, "synthetic patients (several studies each)", flag_values=FLAGS)
flags.DEFINE_integer(
    "seed", 0, "the cohort's seed (and its salt's: the same command draws the same split)", flag_values=FLAGS
)
flags.DEFINE_integer("train_steps", 1200, "steps of configs/tiny.py", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "global training batch", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 64, "frames' side in the records and the model", flag_values=FLAGS)
flags.DEFINE_integer("frames", 16, "frames kept per video by data_prep", flag_values=FLAGS)
flags.DEFINE_integer("workers", 2, "data_prep processes", flag_values=FLAGS)
flags.DEFINE_enum(
    "cohort_version",
    "2",
    ["1", "2"],
    "synthetic cohort: 2 (several views per study, reports in "
    "readers' own words, device masks: the explanation scores need them) or 1 (one view, reports in "
    "the zero-shot prompts' own sentences: earlier releases' figures)",
    flag_values=FLAGS,
)


def _demo(f) -> None:
    if storage.is_remote(f.out):
        raise cli.UsageError(
            f"--out={f.out}: the demo writes its synthetic cohort and stages to local disk; give a local folder"
        )
    results = run(
        f.out,
        patients=f.patients,
        seed=f.seed,
        train_steps=f.train_steps,
        batch_size=f.batch_size,
        image_size=f.image_size,
        frames=f.frames,
        workers=f.workers,
        cohort_version=int(f.cohort_version),
    )
    rows, out = results["figures"], os.path.abspath(f.out)
    losses = results["train"]
    print(f"\n=== results on held-out patients (test split; cohort version {results['cohort_version']}) ===")
    print(results_table.format_table(rows))
    if losses["first_loss"] is not None:
        print(f"train loss {losses['first_loss']:.3f} -> {losses['last_loss']:.3f} over {f.train_steps} steps")
    print("\nwritten:")
    for k, v in results["paths"].items():
        print(f"  {k:25s} {v}")
    print(f"  {'results':25s} {os.path.join(out, 'results.json')}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(_demo, FLAGS, argv, name="demo", doc=__doc__, failures=(*cli.FAILURES, StageFailed))


if __name__ == "__main__":
    sys.exit(main())
