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

Findings, extracted from each bank report with the zero-shot tasks' label rules (`task_table.extract_label`
over echoclip_jax/config/zero_shot_tasks.json: ejection_fraction, pacemaker, tavr, mitraclip; LV size with the table's
LV-size phrases cut to their common "... DILATED LEFT VENTRICLE", its other readers' wordings, and the
normal-size wordings: `lv_size_task`): EF (median of the
k reports' numbers; support = reports within +-5), EF band, each device present/absent, LV size (votes
among the reports that state it). Each finding carries its support (how many of k agree), how many of k
state it, and the agreeing reports' mean similarity. Outputs: R/report.json + R/report.txt (--video), or
R/study_reports.jsonl, R/video_reports.jsonl, R/reports.txt and R/summary.json (--data_dir; salted ids).

--video, --data_dir, --bank and --out are each a local path or a gs:// URL.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from echoclip_jax import tokenizers
from echoclip_jax.config.validation import validate
from echoclip_jax.inference.embedder import Embedder
from echoclip_jax.retrieval.bank import load_bank
from echoclip_jax.retrieval.embedding import fingerprint, max_frames_of
from echoclip_jax.retrieval.report import DISCLAIMER, query_frames, render, report_files, report_records
from echoclip_jax.runtime import cli, storage
from echoclip_jax.weights import loader as weights

FLAGS = cli.flag_values()
flags.DEFINE_string("checkpoint", None, "KIND:PATH[@STEP] (see echoclip_jax.weights.loader)", flag_values=FLAGS)
config_flags.DEFINE_config_file("config", None, "configs/*.py", lock_config=False, flag_values=FLAGS)
flags.DEFINE_string(
    "video",
    None,
    "one study: a .dcm/.avi/.npy video or a directory of its .dcm files (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "data_dir",
    None,
    "records (data_prep.convert): a report for every study of --split (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_string("split", "test", "with --data_dir: the split to report on", flag_values=FLAGS)
flags.DEFINE_string(
    "bank",
    None,
    "search index (build --reports), records directory or CSV of reports, a local path or gs:// URL "
    "(default with --data_dir: that directory's --bank_split)",
    flag_values=FLAGS,
)
flags.DEFINE_list("bank_split", ["train"], "the bank's splits (index or records bank)", flag_values=FLAGS)
flags.DEFINE_enum(
    "match",
    "text",
    ["text", "image"],
    "query study embedding vs the bank's report text embeddings (text) or its studies' embeddings (image)",
    flag_values=FLAGS,
)
flags.DEFINE_integer("k", 10, "reports retrieved and voted over", flag_values=FLAGS)
flags.DEFINE_enum(
    "level", "study", ["study", "video", "both"], "with --data_dir: report per study, video or both", flag_values=FLAGS
)
flags.DEFINE_string("out", None, "output directory R (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_integer("frames", None, "at most this many evenly spaced frames per video", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "frames (or texts) per device batch", flag_values=FLAGS)
flags.DEFINE_boolean(
    "baseline",
    False,
    "with --data_dir: also vote over k random bank reports per query "
    "(random_findings), the chance level an evaluation compares with",
    flag_values=FLAGS,
)
flags.DEFINE_integer("seed", 0, "random baseline seed", flag_values=FLAGS)
flags.mark_flags_as_required(["checkpoint", "config", "out"], flag_values=FLAGS)


def _report(f) -> None:
    if (f.video is None) == (f.data_dir is None):
        raise cli.UsageError("give exactly one of --video (a file or study directory) or --data_dir")
    bank_spec = f.bank or f.data_dir
    if bank_spec is None:
        raise cli.UsageError("--video needs --bank (a search index with --reports, a records directory or a CSV)")
    levels = ("study", "video") if f.level == "both" else (f.level,)
    config = f.config
    image_size = int(config.model.vision.image_size)
    validate(config, training=False)
    embedder = Embedder(
        weights.load_model(f.checkpoint, config.model),
        tokenizers.from_config(config.tokenizer),
        batch_size=f.batch_size,
    )
    embedder.fingerprint = fingerprint(embedder, config.model)
    bank = load_bank(bank_spec, embedder, match=f.match, splits=f.bank_split, frames=f.frames, image_size=image_size)
    print(f"report: bank {bank.source}: {len(bank.ids)} reports, {f.match} match, k={f.k}")
    if f.video is not None:
        frames = f.frames or query_frames(f.bank, max_frames_of)
        report = report_files(embedder, bank, f.video, out=f.out, k=f.k, image_size=image_size, frames=frames)
        print(render(report, f"Study {report['query']} ({report['files']} video file(s))"))
        print(f"report: wrote {storage.join(f.out, 'report.json')} and report.txt")
    else:
        summary = report_records(
            embedder,
            bank,
            f.data_dir,
            f.split,
            out=f.out,
            k=f.k,
            levels=levels,
            frames=f.frames,
            image_size=image_size,
            baseline=f.baseline,
            seed=f.seed,
        )
        counts = ", ".join(f"{n} {lv} reports" for lv, n in summary["levels"].items())
        print(f"report: {DISCLAIMER}\nreport: wrote {counts} under {f.out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _report,
        FLAGS,
        argv,
        name="report",
        doc=__doc__,
        paths=("video", "data_dir", "bank", "out"),
        specs=("checkpoint",),
    )


if __name__ == "__main__":
    sys.exit(main())
