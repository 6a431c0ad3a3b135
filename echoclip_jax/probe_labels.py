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

--cohort, --salt_file and --out are each a local path or a gs:// URL (a cohort on a bucket is copied to a
temporary local folder first: its truth is joined to its DICOM headers, read by pydicom from local files).
"""

from __future__ import annotations

import sys
import tempfile

from absl import flags

from data_prep.options import load_salt
from echoclip_jax.demo.labels import write_synthetic_labels
from echoclip_jax.runtime import cli, storage

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "cohort", None, "a data_prep.synthetic output directory (local path or gs:// URL)", flag_values=FLAGS
)
flags.DEFINE_string("salt", None, "the salt the records were converted with", flag_values=FLAGS)
flags.DEFINE_string("salt_file", None, "a file holding it (local path or gs:// URL)", flag_values=FLAGS)
flags.DEFINE_enum("key", "video_id", ["video_id", "study_id"], "what a row describes", flag_values=FLAGS)
flags.DEFINE_string("out", None, "the labels CSV to write (local path or gs:// URL)", flag_values=FLAGS)
flags.mark_flags_as_required(["cohort", "out"], flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["salt", "salt_file"], required=True, flag_values=FLAGS)


def _salt(f) -> bytes:
    """The salt as convert reads it (data_prep.options.load_salt), --salt_file from local disk or a bucket."""
    if not f.salt_file:
        return load_salt(f.salt)
    if not storage.exists(f.salt_file):
        raise ValueError(f"{f.salt_file}: cannot read the salt (no such file; --salt_file)")
    with storage.local_copy(f.salt_file) as local:
        return load_salt(salt_file=local)


def _write(cohort: str, salt: bytes, out: str, key: str) -> int:
    """The labels CSV written whole to `out` (local or gs://) from a local cohort; returns its rows."""
    with storage.local_output(out) as local:
        return write_synthetic_labels(cohort, salt, local, key)


def _labels(f) -> None:
    salt = _salt(f)
    if storage.is_remote(f.cohort):
        with tempfile.TemporaryDirectory(prefix="echoclip_jax-cohort-") as local:
            storage.copytree(f.cohort, local)
            n = _write(local, salt, f.out, f.key)
    else:
        n = _write(f.cohort, salt, f.out, f.key)
    print(f"probe_labels: {n} {f.key.split('_')[0]} rows -> {f.out}")


def main(argv: list[str] | None = None) -> int:
    return cli.run(_labels, FLAGS, argv, name="probe_labels", doc=__doc__, paths=("cohort", "salt_file", "out"))


if __name__ == "__main__":
    sys.exit(main())
