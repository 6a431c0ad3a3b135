"""Report banks for echoclip_jax.report: the reports a preliminary report is retrieved from.

Three sources, one `Bank`: a search index built with `--reports` (its studies' de-identified report text and
text embeddings, and their study embeddings), a records directory (one report per study of the chosen
splits, embedded now), or a user's own CSV of reports (text only; scrubbed by data_prep's report
de-identification patterns and normalised as the records are). Each is a local path or a gs:// URL.
Retrieval is exact (faiss brute force): a bank is at most one report per study.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from data_prep import records
from data_prep.report_deid import Deidentifier
from data_prep.reports import clean_text
from echoclip_jax.retrieval import embedding as emb
from echoclip_jax.retrieval.archive import Archive
from echoclip_jax.retrieval.embedding import same_model
from echoclip_jax.retrieval.vectors import exact_search
from echoclip_jax.runtime import storage


class Bank:
    """Reports to retrieve from: ids (salted study ids, or a CSV's ids), texts, the vectors matched against
    (text embeddings, or study embeddings for --match image), patient ids where known."""

    def __init__(
        self, source: str, ids: list, texts: list[str], vectors: np.ndarray, match: str, patients: list | None = None
    ):
        if not ids:
            raise ValueError(f"{source}: the report bank is empty (no study with a report)")
        self.source, self.ids, self.texts, self.match = source, list(ids), list(texts), match
        self.vectors = np.asarray(vectors, np.float32)
        self.patients = patients
        self.findings = None  # echoclip_jax.retrieval.report.findings_of fills it

    def retrieve(self, query: np.ndarray, k: int, exclude_ids=()) -> tuple[np.ndarray, np.ndarray]:
        """(rows, similarities) of the k nearest bank reports to one query vector (exact search)."""

        extra = len(exclude_ids)
        sims, rows = exact_search(self.vectors, query[None], k + extra)
        keep = [(r, s) for r, s in zip(rows[0], sims[0]) if self.ids[r] not in exclude_ids][:k]
        return np.asarray([r for r, _ in keep], np.int64), np.asarray([s for _, s in keep], np.float32)


RECORDS_AT_ONCE = 64


def _record_studies(data_dir: str, split: str) -> list[dict]:
    """One {study_id, patient_id, report} per study of a split of records (no frames decoded)."""

    studies = {}
    wanted = [
        (reader, i) for reader in records.open_shards(records.list_shards(data_dir, split)) for i in range(len(reader))
    ]
    for start in range(0, len(wanted), RECORDS_AT_ONCE):  # on a bucket, each chunk's GETs in flight together
        for raw in records.read_records(wanted[start : start + RECORDS_AT_ONCE]):
            if isinstance(raw, records.CorruptRecordError):
                raise raw
            ex = records.decode_example(raw)
            text = lambda key: ex[key][0].decode("utf-8") if ex.get(key) else ""
            studies.setdefault(
                text("study_id"),
                {"study_id": text("study_id"), "patient_id": text("patient_id"), "report": text("report")},
            )
    return [s for s in studies.values() if s["report"].strip()]


def bank_from_records(data_dir: str, splits, embedder, match: str, *, frames=None, image_size=None) -> Bank:
    """The de-identified reports of `splits` of a records directory, one per study."""
    studies = [s for split in splits for s in _record_studies(data_dir, split)]
    if not studies:
        raise ValueError(
            f"{data_dir}: no reports in split(s) {','.join(splits)} (--bank_split); a report bank "
            f"needs the records of studies with reports"
        )
    ids, texts = [s["study_id"] for s in studies], [s["report"] for s in studies]
    if match == "text":
        vectors = embedder.texts(texts)
    else:
        wanted = set(ids)
        items = (
            it
            for split in splits
            for it in emb.record_videos(data_dir, split, frames=frames, image_size=image_size)
            if it[0]["study_id"] in wanted
        )
        metas, video_vectors = emb.embed_stream(embedder, items)
        order, study_vectors = emb.study_means([m["study_id"] for m in metas], video_vectors)
        row = dict(zip(order, study_vectors))
        vectors = np.stack([row[i] for i in ids])
    return Bank(f"{data_dir} [{','.join(splits)}]", ids, texts, vectors, match, [s["patient_id"] for s in studies])


def bank_from_index(path: str, splits, match: str, fingerprint=None) -> Bank:
    """The report bank of a search index (`search build --reports`), its studies of `splits` only."""

    index = Archive.open(path)
    where = storage.join(path, "index.json")
    if index.reports is None:
        raise ValueError(
            f"{where}: field report_bank is false: this index has no report bank; rebuild it with "
            f"`python -m echoclip_jax.search build ... --reports`, or pass a records --bank"
        )
    if fingerprint is not None and not same_model(fingerprint, index.meta["model"].get("fingerprint")):
        raise ValueError(
            f"{where}: field model.fingerprint: the index was embedded by other weights than "
            f"--checkpoint; use {index.meta['model']['checkpoint']} or rebuild the index"
        )
    keys = [k for k in index.reports if index.rows["study"][k]["split"] in set(splits)]
    if not keys:
        raise ValueError(f"{where}: the report bank has no study in split(s) {','.join(splits)} (--bank_split)")
    position = {k: i for i, k in enumerate(index.reports)}
    rows = [index.rows["study"][k] for k in keys]
    vectors = index.report_vectors[[position[k] for k in keys]] if match == "text" else index.vectors["study"][keys]
    return Bank(
        f"{path} [{','.join(splits)}]",
        [r["study_id"] for r in rows],
        [index.reports[k] for k in keys],
        vectors,
        match,
        [r["patient_id"] for r in rows],
    )


def bank_from_csv(path: str, embedder, match: str) -> Bank:
    """A user's own reports: a CSV with a `report` column (and optional `id`), scrubbed by data_prep's
    report de-identification patterns and normalised as the records are."""

    if match != "text":
        raise ValueError(f"{path}: a CSV bank holds only text: use --match text (image needs an index or records)")
    reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
    if "report" not in (reader.fieldnames or ()):
        raise ValueError(
            f"{path}: no 'report' column (columns: {reader.fieldnames}); a report bank CSV has a "
            f"'report' column and optionally an 'id' column"
        )
    rows = [r for r in reader if (r.get("report") or "").strip()]
    scrub = Deidentifier()
    texts = [clean_text(scrub(r["report"])[0]) for r in rows]
    ids = [r.get("id") or f"row{i + 1}" for i, r in enumerate(rows)]
    return Bank(path, ids, texts, embedder.texts(texts) if texts else np.zeros((0, 1)), match)


def load_bank(spec: str, embedder, *, match: str, splits=("train",), frames=None, image_size=None) -> Bank:
    """The bank at `spec` (local path or gs:// URL): a search index, a CSV of reports or a records directory."""
    if storage.exists(storage.join(spec, "index.json")):
        return bank_from_index(spec, splits, match, getattr(embedder, "fingerprint", None))
    if spec.lower().endswith(".csv") and storage.exists(spec) and not storage.isdir(spec):
        return bank_from_csv(spec, embedder, match)
    if storage.isdir(spec):
        return bank_from_records(spec, splits, embedder, match, frames=frames, image_size=image_size)
    raise FileNotFoundError(f"--bank {spec}: not a search index (no index.json), a records directory or a .csv file")
