"""Labels CSVs for the probes from a synthetic cohort's truth, keyed by the records' salted ids.

The records never carry the truth (only salted ids), so a probe of the synthetic cohort joins the two here:
video_id is the salted hash data_prep.convert gives the video (`data_prep.synthetic.truth_by_video_id`),
study_id the salted hash of the StudyInstanceUID (`data_prep.plan.salted_hash(salt, "study", uid)`). The CSV
holds salted ids: keep it beside the records, not with the probe's outputs.

Columns: video key: video_id, view (cohort version 2 only), ef, pacemaker, tavr, mitraclip, lv_size; study
key: study_id, ef, pacemaker, tavr, mitraclip, lv_size (study-level truths: every video of a study has the
same; view is per video and left out).
"""

from __future__ import annotations

import csv

from data_prep.options import load_salt
from data_prep.plan import salted_hash
from data_prep.synthetic import truth_by_video_id

VIDEO_COLUMNS = ("view", "ef", "pacemaker", "tavr", "mitraclip", "lv_size")
STUDY_COLUMNS = ("ef", "pacemaker", "tavr", "mitraclip", "lv_size")


def synthetic_label_rows(cohort_dir: str, salt: bytes, key: str = "video_id") -> tuple[list[str], list[dict]]:
    """(columns, rows) of the labels CSV for `key` ("video_id" or "study_id")."""

    truth = truth_by_video_id(cohort_dir, salt)
    first = next(iter(truth.values()), {})
    if key == "video_id":
        columns = [c for c in VIDEO_COLUMNS if c in first]
        return ["video_id", *columns], [{"video_id": vid, **{c: row[c] for c in columns}} for vid, row in truth.items()]
    if key != "study_id":
        raise ValueError(f"key {key!r}: expected video_id or study_id")
    columns = [c for c in STUDY_COLUMNS if c in first]
    studies: dict[str, dict] = {}
    for row in truth.values():
        sid = salted_hash(salt, "study", row["StudyInstanceUID"])
        values = {c: row[c] for c in columns}
        if studies.setdefault(sid, values) != values:
            raise ValueError(f"{cohort_dir}: a study's videos disagree on {sorted(values)}")
    return ["study_id", *columns], [{"study_id": sid, **values} for sid, values in studies.items()]


def write_synthetic_labels(cohort_dir: str, salt: str | bytes, out_csv: str, key: str = "video_id") -> int:
    """Writes the labels CSV for `key`; returns its number of rows."""
    columns, rows = synthetic_label_rows(cohort_dir, load_salt(salt), key)
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)
