"""The conversion's first pass: which videos become which records in which shard, from headers alone.

Read every header (no pixels), pair videos with their study's report, de-identify the reports with the
study's own header identifiers, hash the ids with the user's salt, turn dates into days since each
patient's first study, split by hashed patient id, and assign every video to a shard. The plan depends
only on the inputs, the salt and the settings; `fingerprint` condenses it, so a rerun can tell whether an
output directory holds this very conversion.

Identifying header values stay in memory: only salted hashes, day offsets, scrubbed reports and counts
reach the plan.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import math
import os
import sys

from tqdm import tqdm

from data_prep import dicom_io, echonet, records
from data_prep.dicom_io import SkipVideo
from data_prep.input_files import local_input
from data_prep.options import Options, Settings
from data_prep.reports import clean_text, read_reports
from echoclip_jax.runtime import storage

_DICOM_NAME = {"study_uid": "StudyInstanceUID", "accession": "AccessionNumber"}
_STUDY_KEYS = {
    "studyinstanceuid": "study_uid",
    "studyuid": "study_uid",
    "accessionnumber": "accession",
    "accession": "accession",
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One video to convert (pickled to a worker). `path` is absolute; `ref` is the manifest name."""

    path: str
    ref: str
    source: str  # "dicom" | "echonet"
    video_id: str
    patient_id: str
    study_id: str
    study_day: int
    report: str
    ef: float
    fps: float
    num_frames: int
    regions: tuple = ()
    report_removed: tuple = ()  # (category, count) of identifiers removed from the report (no values)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What pass 1 found: the videos to convert, the inputs already skipped, and how to account for both."""

    jobs: list[Job]
    skipped: list[dict]  # manifest lines of the inputs skipped at scan
    splits: dict[str, str]  # video_id -> split
    report_deid: dict  # counts per category (deid_summary), never values
    inputs: dict[str, str]  # manifest name -> the relative path (or FileList name) it was made from


def salted_hash(salt: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of `kind:value` under the user's salt: stable ids that cannot be reversed without it."""
    return hmac.new(salt, f"{kind}:{value}".encode("utf-8"), hashlib.sha256).hexdigest()


def split_of(patient_hash: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from the hashed patient id, so a patient is never in two splits."""
    u = int(patient_hash[:16], 16) / 2.0**64
    edge = 0.0
    for name, frac in zip(records.SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return records.SPLITS[-1]


def input_ref(salt: bytes, rel: str, mode: str) -> str:
    """How the manifest names an input: a salted hash of its relative path, or (`relative`) the path."""
    return rel if mode == "relative" else "sha256:" + salted_hash(salt, "path", rel)[:32]


def manifest_line(ref: str, status: str, reason: str = "", video_id: str = "", shard: str = "", removed=()) -> dict:
    """One manifest.jsonl line: the input's name, converted or skipped and why, its ids, its shard, and how
    many identifiers of each category its report lost (counts only)."""
    line = {"input": ref, "status": status, "reason": reason, "video_id": video_id, "shard": shard}
    if removed:
        line["report_removed"] = dict(removed)
    return line


# -------------------------------------------------------------------------------------- progress


def progress_bar(mode: str, total: int, desc: str, unit: str):
    """A tqdm bar on stderr with counts and rate: `auto` shows it only on a terminal, `on` always."""

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        mininterval=2.0,
        file=sys.stderr,
        disable={"auto": None, "on": False, "off": True}[mode],
    )


def _counted(bar, result):
    bar.update()
    return result


def parallel_map(fn, items: list, workers: int, ctx, bar) -> list:
    """[fn(x) for x in items], in order, over `workers` processes of `ctx` (here when <= 1); each result
    advances `bar`."""
    if workers <= 1:
        return [_counted(bar, fn(x)) for x in items]
    with ctx.Pool(workers) as pool:
        chunk = max(1, min(64, len(items) // (4 * workers) or 1))
        return [_counted(bar, r) for r in pool.imap(fn, items, chunksize=chunk)]


# ------------------------------------------------------------------------------------------ reports


def _deid_one(task) -> tuple[str, dict]:
    deid, raw, identifiers = task
    text, removed = deid(raw, identifiers) if deid is not None else (raw, {})
    return clean_text(text), removed


def deidentify_reports(
    reports: dict[str, str], identifiers: dict[str, set], deid, workers: int, ctx, progress: str = "off"
) -> dict[str, tuple[str, dict]]:
    """{key: raw report} -> {key: (de-identified, clean_text-normalised report, {category: removed})}.

    `identifiers[key]` are the header identifiers of every video of that study; `deid` None keeps the text."""
    keys = sorted(reports)
    tasks = [(deid, reports[k], tuple(sorted(identifiers.get(k, ())))) for k in keys]
    with progress_bar(progress, len(tasks), "de-identify reports", "report") as bar:
        return dict(zip(keys, parallel_map(_deid_one, tasks, workers, ctx, bar)))


def deid_summary(results: dict, deid) -> dict:
    """What dataset_info and the log say about report de-identification: counts only, never values."""
    removed = collections.Counter()
    for _, counts in results.values():
        removed.update(counts)
    return {
        "mode": "on" if deid is not None else "off",
        "detectors": list(deid.specs) if deid else [],
        "reports": len(results),
        "reports_with_removals": sum(bool(c) for _, c in results.values()),
        "removed": dict(sorted(removed.items())),
    }


def study_key_attr(study_column: str, override: str | None) -> str:
    name = (override or study_column).replace("_", "").replace(" ", "").lower()
    if name not in _STUDY_KEYS:
        raise ValueError(
            f"cannot tell which DICOM attribute column {study_column!r} holds; "
            "pass --study_key StudyInstanceUID or --study_key AccessionNumber"
        )
    return _STUDY_KEYS[name]


# --------------------------------------------------------------------------------------------- scan


def list_inputs(root: str) -> list[str]:
    """Every non-directory entry under root (PACS exports often lack extensions), sorted, hidden ones
    excluded; FIFOs and broken or looping symlinks are kept, so the scan lists them as skipped. A gs:// root
    lists its objects (URLs)."""
    if storage.is_remote(root):  # one listing of every object below root
        base = root.rstrip("/")
        rels = [r for r in storage.files_under(base) if not any(c.startswith(".") for c in r.split("/"))]
        return sorted(f"{base}/{r}" for r in rels if r.rsplit("/", 1)[-1] != "DICOMDIR")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f != "DICOMDIR")
    return sorted(out)


def relative(path: str, root: str) -> str:
    """`path` relative to the export's root, '/'-separated (a URL under a gs:// root too)."""
    if storage.is_remote(root):
        return path[len(root.rstrip("/")) + 1 :]
    return os.path.relpath(path, root)


def _scan_one(task: tuple[str, int, float]):
    path, max_pixels, seconds = task
    try:
        with dicom_io.time_limit(seconds), local_input(path) as local:
            return dicom_io.read_header(local, max_pixels)
    except SkipVideo as e:
        return str(e)


def _scan(options: Options, salt: bytes, ctx):
    """Every input's header: ({manifest name: relative path}, skipped lines, [(path, ref, header)] usable)."""
    paths = list_inputs(options.dicom_dir)
    if not paths:
        raise ValueError(f"{options.dicom_dir}: no input files")
    s = options.settings
    with progress_bar(options.progress, len(paths), "scan headers", "file") as bar:
        headers = parallel_map(_scan_one, [(p, s.max_pixels, s.time_limit_s) for p in paths], options.workers, ctx, bar)
    rels = [relative(p, options.dicom_dir) for p in paths]
    refs = [input_ref(salt, rel, options.manifest_paths) for rel in rels]
    skipped, ok = [], []
    for path, ref, h in zip(paths, refs, headers):
        if isinstance(h, str):
            skipped.append(manifest_line(ref, "skipped", h))
        elif not h.keys.patient_id:
            skipped.append(manifest_line(ref, "skipped", "no PatientID (cannot split by patient)"))
        else:
            ok.append((path, ref, h))
    return dict(zip(refs, rels)), skipped, ok


def plan_dicom(options: Options, salt: bytes, deid, ctx) -> Plan:
    """Pass 1 for a DICOM export; `deid` is the report_deid.Deidentifier (None: reports kept as given)."""
    attr = study_key_attr(options.study_column, options.study_key)
    reports, bad_reports = read_reports(options.reports, options.study_column, options.report_column)
    inputs, skipped, ok = _scan(options, salt, ctx)
    study_ids = collections.defaultdict(set)
    for _, _, h in ok:
        study_ids[getattr(h.keys, attr)].update(h.keys.identifiers)
    scrubbed = deidentify_reports(
        {k: v for k, v in reports.items() if k in study_ids}, study_ids, deid, options.workers, ctx, options.progress
    )
    first_day = {}
    for _, _, h in ok:
        if h.keys.study_date is not None:
            pid = h.keys.patient_id
            first_day[pid] = min(first_day.get(pid, h.keys.study_date), h.keys.study_date)
    jobs, seen = [], set()
    for path, ref, h in ok:
        k = h.keys
        key = getattr(k, attr)
        video_id = salted_hash(salt, "video", k.sop_uid or relative(path, options.dicom_dir))
        if video_id in seen:
            skipped.append(manifest_line(ref, "skipped", "duplicate SOPInstanceUID", video_id))
            continue
        seen.add(video_id)
        if not key:
            reason = f"no {_DICOM_NAME[attr]} in the header to pair a report"
            skipped.append(manifest_line(ref, "skipped", reason, video_id))
            continue
        if key in bad_reports:
            skipped.append(manifest_line(ref, "skipped", bad_reports[key], video_id))
            continue
        if key not in scrubbed:
            skipped.append(manifest_line(ref, "skipped", "no report for this study", video_id))
            continue
        report, removed = scrubbed[key]
        day = (k.study_date - first_day[k.patient_id]).days if k.study_date and k.patient_id in first_day else -1
        jobs.append(
            Job(
                path=path,
                ref=ref,
                source="dicom",
                video_id=video_id,
                patient_id=salted_hash(salt, "patient", k.patient_id),
                study_id=salted_hash(salt, "study", k.study_uid or k.accession),
                study_day=day,
                report=report,
                ef=math.nan,
                fps=h.fps,
                num_frames=h.num_frames,
                regions=h.regions,
                report_removed=tuple(sorted(removed.items())),
            )
        )
    splits = {j.video_id: split_of(j.patient_id, options.split_fractions) for j in jobs}
    paired = {getattr(h.keys, attr) for _, _, h in ok} & set(scrubbed)
    return Plan(jobs, skipped, splits, deid_summary({k: scrubbed[k] for k in paired}, deid), inputs)


def plan_echonet(options: Options, salt: bytes) -> Plan:
    """Pass 1 for EchoNet-Dynamic: FileList.csv rows; its Split column is kept, else split by hash."""
    entries, bad = echonet.read_filelist(options.echonet_dir)
    refs = [input_ref(salt, name, options.manifest_paths) for name, _ in bad]
    skipped = [manifest_line(ref, "skipped", reason) for ref, (_, reason) in zip(refs, bad)]
    inputs = {ref: name for ref, (name, _) in zip(refs, bad)}
    jobs, splits = [], {}
    with progress_bar(options.progress, len(entries), "probe videos", "file") as bar:
        for e in entries:
            rel = os.path.join("Videos", e.name + ".avi")
            ref = input_ref(salt, rel, options.manifest_paths)
            inputs[ref] = rel
            bar.update()
            try:
                with local_input(e.path, echonet.MISSING) as local:
                    n, rate = echonet.probe(local)
            except SkipVideo as err:
                skipped.append(manifest_line(ref, "skipped", str(err)))
                continue
            pid = salted_hash(salt, "patient", "echonet:" + e.name)
            job = Job(
                path=e.path,
                ref=ref,
                source="echonet",
                video_id=salted_hash(salt, "video", "echonet:" + e.name),
                patient_id=pid,
                study_id=salted_hash(salt, "study", "echonet:" + e.name),
                study_day=0,
                report="",
                ef=e.ef,
                fps=e.fps or rate,
                num_frames=n,
            )
            jobs.append(job)
            splits[job.video_id] = e.split or split_of(pid, options.split_fractions)
    return Plan(jobs, skipped, splits, {"mode": "no reports (EchoNet-Dynamic)"}, inputs)


# ------------------------------------------------------------------------------------------- shards


def assign_shards(jobs: list[Job], splits: dict, shard_size: int) -> dict[str, list[Job]]:
    """{shard file name: jobs in video_id order}: deterministic from the inputs and the salt."""
    shards = {}
    for split in records.SPLITS:
        members = sorted((j for j in jobs if splits[j.video_id] == split), key=lambda j: j.video_id)
        n = math.ceil(len(members) / shard_size)
        for i in range(n):
            shards[records.shard_name(split, i, n)] = members[i * shard_size : (i + 1) * shard_size]
    return shards


def fingerprint(shards: dict[str, list[Job]], settings: Settings, skipped: list[dict]) -> str:
    """SHA-256 over the settings and every planned record and skipped input: equal iff the plan is."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for name in sorted(shards):
        h.update(name.encode())
        for j in shards[name]:
            h.update(f"{j.video_id}|{j.study_day}|{j.ref}".encode())
            h.update(hashlib.sha256(j.report.encode()).digest())
    for line in skipped:
        h.update(line["input"].encode())
    return h.hexdigest()
