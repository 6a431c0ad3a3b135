"""Labels CSVs for `echoclip_jax.probe` from a synthetic cohort's truth, keyed by the records' salted ids.

  python -m echoclip_jax.probe_labels --cohort COHORT --salt_file SALT --out labels_video.csv
  python -m echoclip_jax.probe_labels --cohort COHORT --salt SALT --key study_id --out labels_study.csv

The records never carry the truth (only salted ids), so a probe of the synthetic cohort joins the two here:
video_id is the salted hash data_prep.convert gives the video (`data_prep.synthetic.truth_by_video_id`),
study_id the salted hash of the StudyInstanceUID (`data_prep.plan.salted_hash(salt, "study", uid)`). Use the
salt the records were converted with (--salt, or the content of --salt_file, stripped as convert reads it).
The CSV holds salted ids: keep it beside the records, not with the probe's outputs.

Columns: video key: video_id, view (cohort version 2 only), ef, pacemaker, tavr, mitraclip, lv_size; study
key: study_id, ef, pacemaker, tavr, mitraclip, lv_size (study-level truths: every video of a study has the
same; view is per video and left out).
"""
from __future__ import annotations

import argparse
import sys

from data_prep.options import load_salt as read_salt  # noqa: F401 (this module's API)
from echoclip_jax.demo.labels import write_synthetic_labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echoclip_jax.probe_labels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True, help="a data_prep.synthetic output directory")
    salt = parser.add_mutually_exclusive_group(required=True)
    salt.add_argument("--salt", help="the salt the records were converted with")
    salt.add_argument("--salt_file", help="a file holding it")
    parser.add_argument("--key", choices=("video_id", "study_id"), default="video_id")
    parser.add_argument("--out", required=True, help="the labels CSV to write")
    args = parser.parse_args(argv)
    try:
        n = write_synthetic_labels(args.cohort, read_salt(args.salt, args.salt_file), args.out, args.key)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"probe_labels: {e}", file=sys.stderr)
        return 2
    print(f"probe_labels: {n} {args.key.split('_')[0]} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
