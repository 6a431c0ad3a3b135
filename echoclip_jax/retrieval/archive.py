"""The stored search index of an archive: salted ids, embeddings and a faiss index per level.

INDEX is a local directory or a gs:// folder (every file goes through `echoclip_jax.runtime.storage`).
Layout of an INDEX directory (nothing else is written; no report text unless a report bank is asked for):
  index.json     format, the model that made the embeddings (checkpoint spec, model and tokenizer config,
                 image size, frames, a fingerprint of its outputs), per-level faiss settings, the exports
                 added (their directory, splits and counts)
  videos.csv     key, video_id, study_id, patient_id, split: key = row = the faiss id; ids are the records'
                 salted hashes
  studies.csv    key, study_id, patient_id, split, videos
  videos.npy / studies.npy     float32 [N, D] L2-normalised embeddings, row = key (what a rebuild of the
                 faiss index or a study's new mean is computed from: nothing is embedded twice)
  videos.faiss / studies.faiss the faiss indexes (echoclip_jax.retrieval.vectors)
  reports.csv + reports.npy    only with a report bank: key (the study's), the de-identified report text
                 the records hold, and its text embedding

A study's embedding is the mean of its videos' L2-normalised embeddings, re-normalised; when a later export
brings more videos of a study already present, its mean is recomputed from the stored video embeddings and
the study is removed from and re-added to its faiss index.

An update writes a complete new directory beside INDEX (INDEX.new, index.json last) and swaps it in, so an
interrupted `add` leaves the old index whole. On local disk the swap is two renames. A bucket has no rename
(a copy and a delete, object by object), so there the files of INDEX.new are copied over INDEX's, index.json
last, and INDEX.new deleted after: an `add` stopped during that copy leaves INDEX mixed but INDEX.new whole,
and `open` sees INDEX.new's index.json differ from INDEX's and says how to finish the swap.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np

from echoclip_jax.retrieval.vectors import APPROXIMATE_ABOVE, RETRAIN_GROWTH, VectorIndex, choose_kind
from echoclip_jax.runtime import storage

FORMAT = 1
META = "index.json"
COLUMNS = {
    "video": ("key", "video_id", "study_id", "patient_id", "split"),
    "study": ("key", "study_id", "patient_id", "split", "videos"),
}
FILES = {"video": "videos", "study": "studies"}
LEVELS = ("video", "study")


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _read_csv(path: str, columns) -> list[dict]:
    reader = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
    if tuple(reader.fieldnames or ()) != tuple(columns):
        raise ValueError(
            f"{path}: columns {reader.fieldnames}, expected {list(columns)}; the index is damaged "
            f"or from another version: rebuild it with `python -m echoclip_jax.search build`"
        )
    return list(reader)


def _write_csv(path: str, columns, rows) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(path, text.getvalue())


def _load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)


def _save_npy(path: str, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32))
    storage.write_bytes(path, buf.getvalue())


class Archive:
    """An INDEX directory in memory: `rows[level]`, `vectors[level]`, `indexes[level]`, `meta`, and the
    optional report bank (`reports`: {study key: text}, `report_vectors`: {study key: row of text embeddings})."""

    def __init__(
        self,
        path: str,
        meta: dict,
        rows: dict,
        vectors: dict,
        indexes: dict,
        reports: dict | None = None,
        report_vectors: np.ndarray | None = None,
    ):
        # a local path made absolute, a gs:// URL as given (no trailing "/": INDEX.new must sit beside INDEX)
        self.path = os.fspath(storage.path(path))
        self.meta, self.rows, self.vectors, self.indexes = meta, rows, vectors, indexes
        self.reports = reports  # {study key: report text}, or None without a report bank
        self.report_vectors = report_vectors  # [len(reports), D], in the order of self.reports
        self._refresh_lookups()

    def _refresh_lookups(self):
        self.video_key = {r["video_id"]: int(r["key"]) for r in self.rows["video"]}
        self.study_key = {r["study_id"]: int(r["key"]) for r in self.rows["study"]}
        self.videos_of_study: dict[int, list[int]] = {}
        for r in self.rows["video"]:
            self.videos_of_study.setdefault(self.study_key[r["study_id"]], []).append(int(r["key"]))

    # ----------------------------------------------------------------------------------- creation

    @classmethod
    def new(
        cls,
        path: str,
        *,
        model: dict,
        dim: int,
        kind: str = "auto",
        approximate_above: int = APPROXIMATE_ABOVE,
        nlist: int | None = None,
        nprobe: int | None = None,
        report_bank: bool = False,
    ) -> "Archive":
        """An empty archive (written by `save`); `model` describes the embedding model (see index.json)."""
        meta = {
            "format": FORMAT,
            "model": model,
            "dim": int(dim),
            "report_bank": bool(report_bank),
            "settings": {"kind": kind, "approximate_above": int(approximate_above), "nlist": nlist, "nprobe": nprobe},
            "levels": {},
            "exports": [],
        }
        empty = np.zeros((0, dim), np.float32)
        return cls(
            path,
            meta,
            {lv: [] for lv in LEVELS},
            {lv: empty for lv in LEVELS},
            {lv: None for lv in LEVELS},
            {} if report_bank else None,
            empty if report_bank else None,
        )

    @classmethod
    def open(cls, path: str) -> "Archive":
        path = os.fspath(storage.path(path))
        meta_path = storage.join(path, META)
        if not storage.exists(meta_path):
            hint = (
                f"; {path}.old exists: an update was interrupted, rename it back to {path}"
                if storage.isdir(path + ".old")
                else ""
            )
            raise FileNotFoundError(
                f"{meta_path}: no search index here (build one with `python -m "
                f"echoclip_jax.search build ... --out {path}`){hint}"
            )
        text = storage.read_text(meta_path)
        if storage.is_remote(path):
            _check_swap(path, text)
        meta = json.loads(text)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{meta_path}: field 'format' is {meta.get('format')!r}, this version reads {FORMAT}; "
                f"rebuild the index with `python -m echoclip_jax.search build`"
            )
        rows, vectors, indexes = {}, {}, {}
        for level in LEVELS:
            base = storage.join(path, FILES[level])
            rows[level] = [
                {**r, "key": int(r["key"]), **({"videos": int(r["videos"])} if "videos" in r else {})}
                for r in _read_csv(base + ".csv", COLUMNS[level])
            ]
            vectors[level] = _load_npy(base + ".npy")
            if len(vectors[level]) != len(rows[level]):
                raise ValueError(
                    f"{base}.npy: {len(vectors[level])} embeddings for {len(rows[level])} rows of "
                    f"{base}.csv; the index is damaged: rebuild it"
                )
            lv = meta["levels"].get(level)
            indexes[level] = (
                VectorIndex.load(base + ".faiss", lv["kind"], lv.get("trained_on", 0))
                if lv and storage.exists(base + ".faiss")
                else None
            )
        reports = report_vectors = None
        if meta.get("report_bank"):
            table = _read_csv(storage.join(path, "reports.csv"), ("key", "report"))
            reports = {int(r["key"]): r["report"] for r in table}
            report_vectors = _load_npy(storage.join(path, "reports.npy"))
        return cls(path, meta, rows, vectors, indexes, reports, report_vectors)

    # ------------------------------------------------------------------------------------- updates

    def add(
        self, videos: list[dict], vectors: np.ndarray, reports: dict | None = None, report_vectors: dict | None = None
    ) -> dict:
        """Adds videos (dicts with video_id, study_id, patient_id, split) with their L2-normalised
        embeddings; ids already present are skipped. `reports` {study_id: text} and `report_vectors`
        {study_id: text embedding} feed the report bank for studies new to it. Returns counts."""
        vectors = np.asarray(vectors, np.float32)
        fresh, seen = [], set(self.video_key)
        for i, v in enumerate(videos):  # ids already in the index, or twice in this batch: the first kept
            if v["video_id"] not in seen:
                seen.add(v["video_id"])
                fresh.append(i)
        n0 = len(self.rows["video"])
        new_rows = [{"key": n0 + j, **{c: videos[i][c] for c in COLUMNS["video"][1:]}} for j, i in enumerate(fresh)]
        self.rows["video"] += new_rows
        self.vectors["video"] = np.concatenate([self.vectors["video"], vectors[fresh]])
        changed: set[int] = set()
        new_studies = 0
        for r in new_rows:
            if r["study_id"] not in self.study_key:
                key = len(self.rows["study"])
                self.rows["study"].append(
                    {
                        "key": key,
                        "study_id": r["study_id"],
                        "patient_id": r["patient_id"],
                        "split": r["split"],
                        "videos": 0,
                    }
                )
                self.study_key[r["study_id"]] = key
                new_studies += 1
            changed.add(self.study_key[r["study_id"]])
        self._refresh_lookups()
        study_vectors = np.zeros((len(self.rows["study"]), self.meta["dim"]), np.float32)
        study_vectors[: len(self.vectors["study"])] = self.vectors["study"]
        for key in changed:
            members = self.videos_of_study[key]
            study_vectors[key] = normalize(self.vectors["video"][members].mean(axis=0))
            self.rows["study"][key]["videos"] = len(members)
        self.vectors["study"] = study_vectors
        self._update_index("video", np.arange(n0, n0 + len(new_rows)), set())
        n_studies_before = len(self.rows["study"]) - new_studies
        self._update_index(
            "study", np.arange(n_studies_before, len(self.rows["study"])), {k for k in changed if k < n_studies_before}
        )
        added_reports = 0
        if self.reports is not None and reports:
            order = []
            for study_id, text in reports.items():
                key = self.study_key.get(study_id)
                if key is not None and key not in self.reports and text.strip():
                    self.reports[key] = text
                    order.append(report_vectors[study_id])
            if order:
                self.report_vectors = np.concatenate([self.report_vectors, np.asarray(order, np.float32)])
                added_reports = len(order)
        return {
            "added": len(new_rows),
            "skipped": len(videos) - len(new_rows),
            "new_studies": new_studies,
            "updated_studies": len([k for k in changed if k < n_studies_before]),
            "reports": added_reports,
        }

    def _update_index(self, level: str, new_keys: np.ndarray, changed_keys: set) -> None:
        """Adds new keys, and replaces changed ones, in the level's faiss index; (re)builds it from the
        stored embeddings when there is none yet or the size calls for another kind (auto)."""
        s = self.meta["settings"]
        n = len(self.rows[level])
        index = self.indexes[level]
        want = choose_kind(n, s["kind"], s["approximate_above"])
        stale = (
            index is None
            or index.kind != want
            or (s["kind"] == "auto" and index.kind == "ivf" and n > RETRAIN_GROWTH * max(index.trained_on, 1))
        )
        if n == 0:
            return
        if stale:
            self.indexes[level] = VectorIndex.build(
                self.vectors[level],
                np.arange(n),
                kind=want,
                approximate_above=s["approximate_above"],
                nlist=s["nlist"],
                nprobe=s["nprobe"],
            )
        else:
            changed = np.asarray(sorted(changed_keys), np.int64)
            index.remove(changed)
            keys = np.concatenate([changed, np.asarray(new_keys, np.int64)])
            index.add(self.vectors[level][keys], keys)
        self.meta["levels"][level] = self.indexes[level].describe()

    def record_export(self, data_dir: str, splits: list[str], counts: dict) -> None:
        self.meta["exports"].append({"data_dir": os.fspath(storage.path(data_dir)), "splits": list(splits), **counts})

    def save(self) -> None:
        """Writes the whole directory beside `path` (INDEX.new, index.json last) and swaps it in (see the
        module doc for what a bucket changes)."""
        tmp = self.path + ".new"
        storage.rmtree(tmp)
        for level in LEVELS:
            base = storage.join(tmp, FILES[level])
            _write_csv(base + ".csv", COLUMNS[level], self.rows[level])
            _save_npy(base + ".npy", self.vectors[level])
            if self.indexes[level] is not None:
                self.indexes[level].save(base + ".faiss")
        if self.reports is not None:
            _write_csv(
                storage.join(tmp, "reports.csv"),
                ("key", "report"),
                [{"key": k, "report": v} for k, v in self.reports.items()],
            )
            _save_npy(storage.join(tmp, "reports.npy"), self.report_vectors)
        self.meta["counts"] = {
            "videos": len(self.rows["video"]),
            "studies": len(self.rows["study"]),
            **({"reports": len(self.reports)} if self.reports is not None else {}),
        }
        storage.write_text(storage.join(tmp, META), json.dumps(self.meta, indent=1))
        if storage.is_remote(self.path):
            _swap_remote(tmp, self.path)
        else:
            _swap_local(tmp, self.path)

    # ------------------------------------------------------------------------------------- queries

    def search(self, level: str, query: np.ndarray, k: int, exclude: set | None = None) -> list[dict]:
        """The k nearest rows of `level` to one L2-normalised query vector, best first, as the table's
        rows plus `rank` and `score`; keys in `exclude` are left out (and k more are looked for)."""
        index = self.indexes[level]
        if index is None:
            return []
        exclude = exclude or set()
        scores, keys = index.search(np.asarray(query, np.float32)[None], int(k) + len(exclude))
        out = []
        for score, key in zip(scores[0], keys[0]):
            if key < 0 or int(key) in exclude:
                continue
            out.append({"rank": len(out) + 1, **self.rows[level][int(key)], "score": float(score)})
            if len(out) == k:
                break
        return out

    def keys_of_patient(self, level: str, patient_id: str) -> set:
        return {int(r["key"]) for r in self.rows[level] if r["patient_id"] == patient_id}


def _swap_local(new: str, path: str) -> None:
    """INDEX.new becomes INDEX by two renames (INDEX -> INDEX.old, INDEX.new -> INDEX): local disk only."""
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _swap_remote(new: str, path: str) -> None:
    """INDEX.new's files copied over INDEX's, index.json last, then INDEX's files the new index lacks and
    INDEX.new deleted: until index.json is copied, INDEX.new is whole and `open` points at it."""
    names = storage.listdir(new)
    for name in sorted(names, key=lambda n: n == META):
        storage.copy(storage.join(new, name), storage.join(path, name))
    for name in set(storage.listdir(path)) - set(names):
        storage.remove(storage.join(path, name))
    storage.rmtree(new)


def _check_swap(path: str, meta_text: str) -> None:
    """A bucket index whose swap (`_swap_remote`) was stopped midway: INDEX.new holds a complete index whose
    index.json is not yet INDEX's."""
    new_meta = storage.join(path + ".new", META)
    if storage.exists(new_meta) and storage.read_text(new_meta) != meta_text:
        raise ValueError(
            f"{path}: an update of this index is being swapped in or was stopped midway, and {path}.new holds "
            f"the complete new index; if no `search add` is running, finish it with `gcloud storage rsync "
            f"--recursive --delete-unmatched-destination-objects {path}.new {path}` and then `gcloud storage "
            f"rm --recursive {path}.new`"
        )
