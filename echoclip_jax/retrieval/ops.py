"""What the search commands do, as functions: build an index, add an export to it, query it.

The command line (`python -m echoclip_jax.search`) is a thin layer over these; tests and other modules
(echoclip_jax.report) call them directly. An INDEX, like every path here, is a local path or a gs:// URL
(`echoclip_jax.runtime.storage`).
"""

from __future__ import annotations

import logging

from data_prep import records
from echoclip_jax.retrieval import archive as archive_lib
from echoclip_jax.retrieval import embedding as emb
from echoclip_jax.retrieval.vectors import APPROXIMATE_ABOVE
from echoclip_jax.runtime import storage

log = logging.getLogger(__name__)


def splits_of(data_dir: str, requested=None) -> list[str]:
    """The requested splits (each must have shards), or every split that has shards."""
    if requested:
        missing = [s for s in requested if not records.list_shards(data_dir, s)]
        if missing:
            raise FileNotFoundError(
                f"{data_dir}: no {missing[0]}-NNNNN-of-MMMMM.tfrecord shards (--split "
                f"{','.join(requested)}); the splits here: {splits_of(data_dir)}"
            )
        return list(requested)
    found = [s for s in records.SPLITS if records.list_shards(data_dir, s)]
    if not found:
        raise FileNotFoundError(
            f"{data_dir}: no TFRecord shards of any split ({', '.join(records.SPLITS)}); "
            f"point --data_dir at the output of data_prep.convert"
        )
    return found


def embedder_for(model: dict, stored_fingerprint=None, source: str = "", batch_size: int = 128):
    """The Embedder of an index's model; with `stored_fingerprint`, it must make the index's embeddings."""
    embedder = emb.load_embedder(model, batch_size=batch_size)
    if stored_fingerprint is not None and not emb.same_model(embedder.fingerprint, stored_fingerprint):
        raise ValueError(
            f"{source}: field model.fingerprint: the index was built with other weights than "
            f"{model['checkpoint']}; embeddings of two models are not comparable: use the index's "
            f"checkpoint, or build a new index with this one"
        )
    return embedder


def model_of(index: archive_lib.Archive, checkpoint: str | None = None, config=None) -> dict:
    """The index's model, or `checkpoint` with `config` when given (checked against the fingerprint)."""
    model = dict(index.meta["model"])
    if checkpoint:
        if config is None:
            raise ValueError("--checkpoint needs --config")
        model.update(emb.describe_model(checkpoint, config, frames=model.get("frames")))
    return model


def add_export(index: archive_lib.Archive, embedder, data_dir: str, splits: list[str]) -> dict:
    """Embeds the videos of `splits` of an export that the index lacks and adds them; returns counts."""
    model = index.meta["model"]
    totals = {"added": 0, "skipped": 0, "new_studies": 0, "updated_studies": 0, "reports": 0}
    for split in splits:
        skipped: list = []
        items = emb.record_videos(
            data_dir,
            split,
            skip=set(index.video_key),
            skipped=skipped,
            frames=model["frames"],
            image_size=model["image_size"],
        )
        metas, vectors = emb.embed_stream(embedder, items, label=split)
        reports = report_vectors = None
        if index.reports is not None:
            reports = {}
            for m in metas:
                reports.setdefault(m["study_id"], m["report"])
            ids = [s for s, t in reports.items() if t.strip()]
            report_vectors = dict(zip(ids, embedder.texts([reports[s] for s in ids]))) if ids else {}
        counts = index.add(metas, vectors, reports, report_vectors)
        counts["skipped"] += len(skipped)
        log.info(
            f"{data_dir} [{split}]: added {counts['added']} videos ({counts['new_studies']} new studies, "
            f"{counts['updated_studies']} updated), skipped {counts['skipped']} already in the index"
        )
        for key in totals:
            totals[key] += counts[key]
    index.record_export(data_dir, splits, totals)
    return totals


def build(
    out: str,
    *,
    checkpoint: str,
    config,
    data_dir: str,
    splits=None,
    kind: str = "auto",
    approximate_above: int = APPROXIMATE_ABOVE,
    nlist=None,
    nprobe=None,
    report_bank: bool = False,
    frames: int | None = None,
    batch_size: int = 128,
) -> archive_lib.Archive:
    """A new index at `out` of every video (and study) of `splits` of `data_dir`."""
    if storage.exists(storage.join(out, archive_lib.META)):
        raise FileExistsError(
            f"{out}: already holds a search index; add exports with `python -m "
            f"echoclip_jax.search add {out} --data_dir NEW`, or choose another --out"
        )
    splits = splits_of(data_dir, splits)
    model = emb.describe_model(checkpoint, config, frames=frames)
    model["query_frames"] = frames or emb.max_frames_of(data_dir)
    embedder = embedder_for(model, batch_size=batch_size)
    model["fingerprint"] = embedder.fingerprint
    index = archive_lib.Archive.new(
        out,
        model=model,
        dim=embedder.embed_dim,
        kind=kind,
        approximate_above=approximate_above,
        nlist=nlist,
        nprobe=nprobe,
        report_bank=report_bank,
    )
    add_export(index, embedder, data_dir, splits)
    index.save()
    return index


def add(path: str, *, data_dir: str, splits=None, checkpoint=None, config=None, batch_size: int = 128) -> dict:
    """Adds an export's new videos to the index at `path` (ids already present are skipped)."""
    index = archive_lib.Archive.open(path)
    embedder = embedder_for(
        model_of(index, checkpoint, config),
        index.meta["model"].get("fingerprint"),
        storage.join(path, archive_lib.META),
        batch_size,
    )
    counts = add_export(index, embedder, data_dir, splits_of(data_dir, splits))
    index.save()
    return counts


def query(
    index: archive_lib.Archive,
    *,
    text=None,
    video=None,
    study_of=None,
    k: int = 10,
    levels=archive_lib.LEVELS,
    exclude_same_patient: bool = False,
    embedder=None,
    frames: int | None = None,
) -> dict:
    """The k nearest videos and studies of a text, a video file or study directory, or the study of an
    indexed video; JSON-able (salted ids and scores; a file is named by a hash of its path)."""
    if sum(x is not None for x in (text, video, study_of)) != 1:
        raise ValueError("give exactly one of --text, --video or --study_of")
    exclude = {lv: set() for lv in archive_lib.LEVELS}
    if study_of is not None:
        if study_of not in index.video_key:
            raise ValueError(
                f"{storage.join(index.path, 'videos.csv')}: --study_of {study_of!r}: no video with this "
                f"video_id (ids are the records' salted video ids, as query results print them)"
            )
        row = index.rows["video"][index.video_key[study_of]]
        skey = index.study_key[row["study_id"]]
        vector = index.vectors["study"][skey]
        exclude = {"study": {skey}, "video": set(index.videos_of_study[skey])}
        if exclude_same_patient:
            exclude = {lv: index.keys_of_patient(lv, row["patient_id"]) for lv in archive_lib.LEVELS}
        described = {"study_of": study_of, "study_id": row["study_id"]}
    else:
        model = index.meta["model"]
        embedder = embedder or embedder_for(model, model.get("fingerprint"), storage.join(index.path, archive_lib.META))
        if text is not None:
            vector = embedder.texts([text])[0]
            described = {"text": text}
        else:
            paths = emb.video_files(video)
            vectors = emb.embed_files(
                embedder, paths, image_size=model["image_size"], frames=frames or model.get("query_frames")
            )
            vector = emb.study_means(["query"] * len(vectors), vectors)[1][0]
            described = {"video": emb.dicom_name(video), "files": len(paths)}
    results = {lv: index.search(lv, vector, k, exclude[lv]) for lv in levels}
    return {
        "query": described,
        "k": k,
        "index": {lv: index.meta["levels"].get(lv) for lv in levels},
        "results": results,
    }
