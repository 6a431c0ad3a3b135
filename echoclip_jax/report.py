"""A preliminary report by retrieval: the k reports of a report bank nearest to a study, and a vote over them.

  python -m echoclip_jax.report --checkpoint KIND:PATH --config C --video study_dir_or.dcm --bank BANK --out R
  python -m echoclip_jax.report --checkpoint KIND:PATH --config C --data_dir O --split test [--bank BANK]
      [--k 10] [--level study|video|both] [--match text|image] --out R

It is a retrieval, not a diagnosis, and every output says so: what is reported is what the reports of the
most similar studies in the bank said.

Bank (`--bank`): a search index built with `python -m echoclip_jax.search build --reports` (its train
studies), a records directory (its train split's de-identified reports, one per study; the default with
--data_dir is that directory), or a user's own CSV of reports (a `report` column, optional `id`; scrubbed by
data_prep.report_deid's patterns and normalised with data_prep.reports.clean_text, but de-identify it first:
the text is copied into R). With --data_dir, reports of the query's own patient are left out.

Matching (`--match`): the query study's embedding (the mean of its videos' L2-normalised embeddings,
re-normalised) against the bank reports' text embeddings, "text", the default: the cross-modal similarity
CLIP training optimises, it needs only the bank's text (any CSV of reports works), and on the demo's held-out
studies it agreed with the truth as often as "image" (the bank studies' own video embeddings, then their
reports: EF within +-5 0.971 both, devices 0.987 both, EF band 0.883 vs 0.893, LV size 0.981 vs 0.961), in
half the time (the bank's videos need not be embedded).

Findings, extracted from each bank report with the zero-shot tasks' label rules (`zero_shot.extract_label`
over echoclip_jax/config/zero_shot_tasks.json: ejection_fraction, pacemaker, tavr, mitraclip; LV size with the table's
LV-size phrases cut to their common "... DILATED LEFT VENTRICLE", its other readers' wordings, and the
normal-size wordings: `lv_size_task`): EF (median of the
k reports' numbers; support = reports within +-5), EF band, each device present/absent, LV size (votes
among the reports that state it). Each finding carries its support (how many of k agree), how many of k
state it, and the agreeing reports' mean similarity. Outputs: R/report.json + R/report.txt (--video), or
R/study_reports.jsonl, R/video_reports.jsonl, R/reports.txt and R/summary.json (--data_dir; salted ids).
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax import tokenizers
from echoclip_jax.config.validation import validate
from echoclip_jax.inference.embedder import Embedder
from echoclip_jax.retrieval.bank import Bank, load_bank  # noqa: F401 (this module's API)
from echoclip_jax.retrieval.embedding import fingerprint, max_frames_of
from echoclip_jax.retrieval.report import DISCLAIMER, query_frames, render, report_files, report_records
from echoclip_jax.runtime import logs
from echoclip_jax.weights import loader as weights

# ------------------------------------------------------------------------------------ evaluation


# ----------------------------------------------------------------------------------------- driver


def main(argv) -> int:



    logs.setup()
    FLAGS = flags.FLAGS
    del argv
    config = FLAGS.config
    if (FLAGS.video is None) == (FLAGS.data_dir is None):
        print("report: error: give exactly one of --video (a file or study directory) or --data_dir", file=sys.stderr)
        return 2
    bank_spec = FLAGS.bank or FLAGS.data_dir
    if bank_spec is None:
        print("report: error: --video needs --bank (a search index with --reports, a records directory or a CSV)",
              file=sys.stderr)
        return 2
    levels = ("study", "video") if FLAGS.level == "both" else (FLAGS.level,)
    image_size = int(config.model.vision.image_size)
    try:
        validate(config, training=False)
        embedder = Embedder(weights.load_model(FLAGS.checkpoint, config.model), tokenizers.from_config(config.tokenizer),
                            batch_size=FLAGS.batch_size)
        embedder.fingerprint = fingerprint(embedder, config.model)
        bank = load_bank(bank_spec, embedder, match=FLAGS.match, splits=FLAGS.bank_split, frames=FLAGS.frames,
                         image_size=image_size)
        print(f"report: bank {bank.source}: {len(bank.ids)} reports, {FLAGS.match} match, k={FLAGS.k}")
        if FLAGS.video is not None:
            frames = FLAGS.frames or query_frames(FLAGS.bank, max_frames_of)
            report = report_files(embedder, bank, FLAGS.video, out=FLAGS.out, k=FLAGS.k, image_size=image_size,
                                  frames=frames)
            print(render(report, f"Study {report['query']} ({report['files']} video file(s))"))
            print(f"report: wrote {os.path.join(FLAGS.out, 'report.json')} and report.txt")
        else:
            summary = report_records(embedder, bank, FLAGS.data_dir, FLAGS.split, out=FLAGS.out, k=FLAGS.k,
                                     levels=levels, frames=FLAGS.frames, image_size=image_size,
                                     baseline=FLAGS.baseline, seed=FLAGS.seed,
                                     log=lambda m: print(f"report: {m}", flush=True))
            counts = ", ".join(f"{n} {lv} reports" for lv, n in summary["levels"].items())
            print(f"report: {DISCLAIMER}\nreport: wrote {counts} under {FLAGS.out}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    return 0


def _define_flags():

    flags.DEFINE_string("checkpoint", None, "KIND:PATH[@STEP] (see echoclip_jax.weights)", required=True)
    config_flags.DEFINE_config_file("config", None, "configs/*.py", lock_config=False)
    flags.DEFINE_string("video", None, "one study: a .dcm/.avi/.npy video or a directory of its .dcm files")
    flags.DEFINE_string("data_dir", None, "records (data_prep.convert): a report for every study of --split")
    flags.DEFINE_string("split", "test", "with --data_dir: the split to report on")
    flags.DEFINE_string("bank", None, "search index (build --reports), records directory or CSV of reports "
                                      "(default with --data_dir: that directory's --bank_split)")
    flags.DEFINE_list("bank_split", ["train"], "the bank's splits (index or records bank)")
    flags.DEFINE_enum("match", "text", ["text", "image"], "query study embedding vs the bank's report text "
                                                          "embeddings (text) or its studies' embeddings (image)")
    flags.DEFINE_integer("k", 10, "reports retrieved and voted over")
    flags.DEFINE_enum("level", "study", ["study", "video", "both"], "with --data_dir: report per study, video or both")
    flags.DEFINE_string("out", None, "output directory R", required=True)
    flags.DEFINE_integer("frames", None, "at most this many evenly spaced frames per video")
    flags.DEFINE_integer("batch_size", 128, "frames (or texts) per device batch")
    flags.DEFINE_boolean("baseline", False, "with --data_dir: also vote over k random bank reports per query "
                                            "(random_findings), the chance level an evaluation compares with")
    flags.DEFINE_integer("seed", 0, "random baseline seed")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
