"""DICOM export + reports (or EchoNet-Dynamic) -> sharded, indexed, de-identified TFRecords.

    python -m data_prep.convert --dicom_dir D --reports R.csv --out O --salt_file F [--workers N]
    python -m data_prep.convert --echonet_dir E --out O --salt S

Two passes. (1) Scan: read every header (no pixels), pair videos with reports, hash the ids with the
user's salt, turn dates into days since each patient's first study, split by hashed patient id and assign
every video to a shard; the plan depends only on the inputs, the salt and the settings. (2) Write: each
shard is converted by one worker into a temporary file and renamed when complete, with its manifest part,
so a rerun after a crash or Ctrl-C skips finished shards and redoes the rest.

Privacy: only the fields of data_prep.records.SCHEMA leave the conversion. The salt is never written.
Report text is de-identified (data_prep.report_deid) with its study's own header identifiers, patterns and
any `--report_detector` before it is normalised and written; only counts per category are reported.
Manifest lines name each input by a salted hash of its relative path (`--manifest_paths relative` writes
the path itself, for exports whose file names are known to carry no PHI).
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import hmac
import io
import json
import math
import multiprocessing
import os
import sys

import numpy as np
from PIL import Image

from data_prep import dicom_io, echonet, records, report_deid, sector
from data_prep.dicom_io import SkipVideo

_PARTS = ".parts"  # per-shard manifest parts: a shard is done when it and its part exist
_PLAN = ".plan.json"  # fingerprint of the plan, so a rerun never mixes two different conversions
_DICOM_NAME = {"study_uid": "StudyInstanceUID", "accession": "AccessionNumber"}
_STUDY_KEYS = {"studyinstanceuid": "study_uid", "studyuid": "study_uid", "accessionnumber": "accession",
               "accession": "accession"}


@dataclasses.dataclass(frozen=True)
class Settings:
    frames: int = 32
    image_size: int = 224
    jpeg_quality: int = 90
    shard_size: int = 256
    max_pixels: int = dicom_io.MAX_PIXELS  # per frame (Rows x Columns): bounds a video's memory
    time_limit_s: float = 120.0  # per video: a file that takes longer is skipped, never hangs the run


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


# ------------------------------------------------------------------------------------------ reports


def _parse_reports_csv(path: str, text: str) -> tuple[list[dict], dict[int, str]]:
    """CSV text -> (rows, {row number: problem}). A file with broken quoting (an unclosed quote would
    swallow the following rows into one report) is re-read line by line, and the lines with unbalanced
    quotes are marked bad instead of silently merging several studies' reports."""
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), strict=True)), {}
    except csv.Error as e:
        print(f"warning: {path}: broken CSV quoting ({e}); reading it line by line", file=sys.stderr)
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), [])
    rows, bad = [], {}
    for number, line in enumerate(lines[1:], start=2):
        values = next(csv.reader([line]), [])
        rows.append(dict(zip(header, values)))
        if line.count('"') % 2:
            bad[len(rows) - 1] = f"broken CSV quoting in the reports file (line {number})"
    return rows, bad


def read_reports(path: str, study_column: str, report_column: str) -> tuple[dict[str, str], dict[str, str]]:
    """reports CSV -> ({study key: raw report}, {study key: reason it is unusable}).

    The raw text still carries identifiers: `deidentify_reports` scrubs and normalises it before use.

    Several rows for one study (e.g. addenda) are joined in file order. Rows that are not valid UTF-8, have
    broken quoting or the wrong number of fields make that study's videos skip with the reason; a file
    without the named columns is an error.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise ValueError(f"{path}: cannot read reports ({type(e).__name__}: {e.strerror})") from None
    rows, bad_rows = _parse_reports_csv(path, text)
    columns = list(rows[0]) if rows else []
    for col in (study_column, report_column):
        if col not in columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {columns}); see --study_column/--report_column")
    texts: dict[str, list[str]] = collections.defaultdict(list)
    bad: dict[str, str] = {}
    for i, row in enumerate(rows):
        key = (row.get(study_column) or "").strip()
        raw = row.get(report_column) or ""
        if not key:
            continue
        if i in bad_rows:
            bad[key] = bad_rows[i]
            continue
        if None in row or None in row.values():  # DictReader's marks of too many / too few fields
            bad[key] = "malformed reports CSV row (wrong number of fields)"
            continue
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            bad[key] = "report is not valid UTF-8"
            continue
        if raw.strip():
            texts[key].append(raw)
    reports = {key: " ".join(parts) for key, parts in texts.items() if key not in bad}
    return reports, bad


def _deid_one(task) -> tuple[str, dict]:
    from data_prep.reports import clean_text  # one home for normalisation, shared with the tokenizers

    deid, raw, identifiers = task
    text, removed = deid(raw, identifiers) if deid is not None else (raw, {})
    return clean_text(text), removed


def deidentify_reports(reports: dict[str, str], identifiers: dict[str, set], deid, workers: int, ctx):
    """{key: raw report} -> {key: (de-identified, clean_text-normalised report, {category: removed})}.

    `identifiers[key]` are the header identifiers of every video of that study; `deid` None keeps the text."""
    keys = sorted(reports)
    tasks = [(deid, reports[k], tuple(sorted(identifiers.get(k, ())))) for k in keys]
    return dict(zip(keys, _map(_deid_one, tasks, workers, ctx)))


def deid_summary(results: dict, deid) -> dict:
    """What dataset_info and the log say about report de-identification: counts only, never values."""
    removed = collections.Counter()
    for _, counts in results.values():
        removed.update(counts)
    return {"mode": "on" if deid is not None else "off", "detectors": list(deid.specs) if deid else [],
            "reports": len(results), "reports_with_removals": sum(bool(c) for _, c in results.values()),
            "removed": dict(sorted(removed.items()))}


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
    excluded; FIFOs and broken or looping symlinks are kept, so the scan lists them as skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f != "DICOMDIR")
    return sorted(out)


def _scan_one(task: tuple[str, int, float]):
    path, max_pixels, seconds = task
    try:
        with dicom_io.time_limit(seconds):
            return dicom_io.read_header(path, max_pixels)
    except SkipVideo as e:
        return str(e)


def _map(fn, items, workers: int, ctx):
    if workers <= 1:
        return [fn(x) for x in items]
    with ctx.Pool(workers) as pool:
        return pool.map(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers) or 1)))


def make_deidentifier(args):
    """The report de-identifier of the settings, or None with `--report_deid off`."""
    if getattr(args, "report_deid", "on") == "off":
        return None
    region = getattr(args, "phone_region", "US")
    return report_deid.Deidentifier(getattr(args, "report_detector", None) or (),
                                    None if region.lower() == "none" else region.upper())


def plan_dicom(args, salt: bytes, ctx) -> tuple[list[Job], list[dict], dict, dict]:
    """Pass 1 for a DICOM export: (jobs, manifest lines of skipped inputs, per-video split, de-id summary)."""
    fractions = args.split_fractions
    attr = study_key_attr(args.study_column, args.study_key)
    reports, bad_reports = read_reports(args.reports, args.study_column, args.report_column)
    paths = list_inputs(args.dicom_dir)
    if not paths:
        raise ValueError(f"{args.dicom_dir}: no input files")
    headers = _map(_scan_one, [(p, args.max_pixels, args.time_limit) for p in paths], args.workers, ctx)
    refs = [_ref(salt, os.path.relpath(p, args.dicom_dir), args.manifest_paths) for p in paths]
    skipped, ok = [], []
    for path, ref, h in zip(paths, refs, headers):
        if isinstance(h, str):
            skipped.append(_line(ref, "skipped", h))
        elif not h.keys.patient_id:
            skipped.append(_line(ref, "skipped", "no PatientID (cannot split by patient)"))
        else:
            ok.append((path, ref, h))
    study_ids = collections.defaultdict(set)
    for _, _, h in ok:
        study_ids[getattr(h.keys, attr)].update(h.keys.identifiers)
    deid = make_deidentifier(args)
    scrubbed = deidentify_reports({k: v for k, v in reports.items() if k in study_ids}, study_ids, deid,
                                  args.workers, ctx)
    first_day = {}
    for _, _, h in ok:
        if h.keys.study_date is not None:
            pid = h.keys.patient_id
            first_day[pid] = min(first_day.get(pid, h.keys.study_date), h.keys.study_date)
    jobs, seen = [], set()
    for path, ref, h in ok:
        k = h.keys
        key = getattr(k, attr)
        video_id = salted_hash(salt, "video", k.sop_uid or os.path.relpath(path, args.dicom_dir))
        if video_id in seen:
            skipped.append(_line(ref, "skipped", "duplicate SOPInstanceUID", video_id))
            continue
        seen.add(video_id)
        if not key:
            skipped.append(_line(ref, "skipped", f"no {_DICOM_NAME[attr]} in the header to pair a report", video_id))
            continue
        if key in bad_reports:
            skipped.append(_line(ref, "skipped", bad_reports[key], video_id))
            continue
        if key not in scrubbed:
            skipped.append(_line(ref, "skipped", "no report for this study", video_id))
            continue
        report, removed = scrubbed[key]
        day = (k.study_date - first_day[k.patient_id]).days if k.study_date and k.patient_id in first_day else -1
        jobs.append(Job(
            path=path, ref=ref, source="dicom", video_id=video_id,
            patient_id=salted_hash(salt, "patient", k.patient_id),
            study_id=salted_hash(salt, "study", k.study_uid or k.accession), study_day=day,
            report=report, ef=math.nan, fps=h.fps, num_frames=h.num_frames, regions=h.regions,
            report_removed=tuple(sorted(removed.items()))))
    splits = {j.video_id: split_of(j.patient_id, fractions) for j in jobs}
    paired = {getattr(h.keys, attr) for _, _, h in ok} & set(scrubbed)
    return jobs, skipped, splits, deid_summary({k: scrubbed[k] for k in paired}, deid)


def plan_echonet(args, salt: bytes) -> tuple[list[Job], list[dict], dict]:
    """Pass 1 for EchoNet-Dynamic: FileList.csv rows; its Split column is kept, else split by hash."""
    entries, bad = echonet.read_filelist(args.echonet_dir)
    skipped = [_line(_ref(salt, name, args.manifest_paths), "skipped", reason) for name, reason in bad]
    jobs, splits = [], {}
    for e in entries:
        ref = _ref(salt, os.path.join("Videos", e.name + ".avi"), args.manifest_paths)
        try:
            n, rate = echonet.probe(e.path)
        except SkipVideo as err:
            skipped.append(_line(ref, "skipped", str(err)))
            continue
        pid = salted_hash(salt, "patient", "echonet:" + e.name)
        job = Job(path=e.path, ref=ref, source="echonet", video_id=salted_hash(salt, "video", "echonet:" + e.name),
                  patient_id=pid, study_id=salted_hash(salt, "study", "echonet:" + e.name), study_day=0,
                  report="", ef=e.ef, fps=e.fps or rate, num_frames=n)
        jobs.append(job)
        splits[job.video_id] = e.split or split_of(pid, args.split_fractions)
    return jobs, skipped, splits


def _ref(salt: bytes, rel: str, mode: str) -> str:
    return rel if mode == "relative" else "sha256:" + salted_hash(salt, "path", rel)[:32]


def _line(ref: str, status: str, reason: str = "", video_id: str = "", shard: str = "", removed=()) -> dict:
    line = {"input": ref, "status": status, "reason": reason, "video_id": video_id, "shard": shard}
    if removed:
        line["report_removed"] = dict(removed)
    return line


def assign_shards(jobs: list[Job], splits: dict, shard_size: int) -> dict[str, list[Job]]:
    """{shard file name: jobs in video_id order}: deterministic from the inputs and the salt."""
    shards = {}
    for split in records.SPLITS:
        members = sorted((j for j in jobs if splits[j.video_id] == split), key=lambda j: j.video_id)
        n = math.ceil(len(members) / shard_size)
        for i in range(n):
            shards[records.shard_name(split, i, n)] = members[i * shard_size : (i + 1) * shard_size]
    return shards


# -------------------------------------------------------------------------------------------- write


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def convert_video(job: Job, settings: Settings) -> bytes:
    """Decode the kept frames, blank outside the sector, crop, resize, JPEG-encode -> serialised Example.

    Bounded: at most settings.max_pixels per frame and settings.time_limit_s per video, else SkipVideo.
    """
    with dicom_io.time_limit(settings.time_limit_s):
        return _convert_video(job, settings)


def _convert_video(job: Job, settings: Settings) -> bytes:
    if job.source == "dicom":
        indices = dicom_io.kept_indices(job.num_frames, settings.frames)
        # Frames come at the smallest scale that keeps 1.25x the output size (600x800 -> 300x400 for 224; JPEG
        # in the DCT domain, others box-reduced), grey ones as one channel: the sector and crop are found on
        # those pixels, the header's regions scaled to match.
        raw, scale = dicom_io.read_frames_scaled(job.path, indices, settings.max_pixels,
                                                 min_side=settings.image_size * 5 // 4, keep_grey=True)
        regions = tuple(tuple(v // scale for v in box) for box in job.regions)
        frames = sector.prepare(raw, regions, settings.image_size)
    else:  # EchoNet videos are already masked and cropped: resize only
        indices = dicom_io.kept_indices(job.num_frames, settings.frames) if job.num_frames else None
        raw = echonet.read_frames(job.path, indices)
        if indices is None and settings.frames and len(raw) > settings.frames:
            raw = raw[dicom_io.kept_indices(len(raw), settings.frames)]
        frames = sector.crop_resize(raw, np.ones(raw.shape[1:3], bool), settings.image_size)
    return records.encode_example({
        "video_id": job.video_id, "patient_id": job.patient_id, "study_id": job.study_id,
        "study_day": job.study_day, "frames": [encode_jpeg(f, settings.jpeg_quality) for f in frames],
        "num_frames": len(frames), "image_size": settings.image_size, "fps": float(job.fps),
        "report": job.report.encode("utf-8"), "ef": float(job.ef), "source": job.source.encode(),
    })


def write_shard(task: tuple[str, str, list[Job], Settings]) -> tuple[str, list[dict]]:
    """Convert one shard's videos; the part file is renamed before the shard, so a shard that exists
    always has its manifest part. Returns (shard name, manifest lines)."""
    out_dir, name, jobs, settings = task
    lines = []
    with records.TFRecordWriter(os.path.join(out_dir, name)) as writer:
        for job in jobs:
            try:
                writer.write(convert_video(job, settings))
                lines.append(_line(job.ref, "converted", "", job.video_id, name, job.report_removed))
            except SkipVideo as e:
                lines.append(_line(job.ref, "skipped", str(e), job.video_id))
        part = os.path.join(out_dir, _PARTS, name + ".jsonl")
        with open(part + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(part + ".tmp", part)
    return name, lines


def shard_done(out_dir: str, name: str) -> list[dict] | None:
    """The manifest lines of a finished shard, or None if it must be (re)done."""
    path, part = os.path.join(out_dir, name), os.path.join(out_dir, _PARTS, name + ".jsonl")
    if not (os.path.exists(path) and os.path.exists(part)):
        return None
    with open(part) as f:
        lines = [json.loads(line) for line in f]
    try:
        if len(records.ShardReader(path, verify=False)) != sum(line["status"] == "converted" for line in lines):
            return None
    except (OSError, records.CorruptRecordError):
        return None
    return lines


def _fingerprint(shards: dict[str, list[Job]], settings: Settings, skipped: list[dict]) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for name in sorted(shards):
        h.update(name.encode())
        for j in shards[name]:
            h.update(f"{j.video_id}|{j.study_day}|{j.ref}".encode())
            h.update(hashlib.sha256(j.report.encode()).digest())
    for line in skipped:
        h.update(line["input"].encode())
    return h.hexdigest()


def prepare(args, ctx=None) -> tuple[Settings, list[tuple], dict[str, list[dict]], list[dict], int]:
    """Pass 1 and the resume check, shared by the local runner and data_prep.beam.

    Returns (settings, write_shard tasks still to do, {finished shard: manifest lines}, manifest lines of
    inputs skipped at scan, number of videos planned).
    """
    salt = _read_salt(args)
    settings = Settings(args.frames, args.image_size, args.jpeg_quality, args.shard_size, args.max_pixels,
                        args.time_limit)
    ctx = ctx or multiprocessing.get_context("spawn")
    os.makedirs(os.path.join(args.out, _PARTS), exist_ok=True)
    if args.echonet_dir:
        jobs, skipped, splits = plan_echonet(args, salt)
        deid = {"mode": "no reports (EchoNet-Dynamic)"}
    else:
        jobs, skipped, splits, deid = plan_dicom(args, salt, ctx)
    shards = assign_shards(jobs, splits, settings.shard_size)
    fingerprint = _fingerprint(shards, settings, skipped)
    plan_path = os.path.join(args.out, _PLAN)
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            if json.load(f).get("fingerprint") != fingerprint:
                raise ValueError(f"{args.out} holds a different conversion (other inputs, salt or settings); "
                                 "use an empty --out")
    with open(plan_path, "w") as f:
        json.dump({"fingerprint": fingerprint, "report_deid": deid}, f)
    done, todo = {}, []
    for name, members in shards.items():
        lines = shard_done(args.out, name)
        if lines is None:
            todo.append((args.out, name, members, settings))
        else:
            done[name] = lines
    print(f"{len(jobs)} videos planned in {len(shards)} shards ({len(done)} already done); "
          f"{len(skipped)} inputs skipped at scan", file=sys.stderr)
    print(_deid_line(deid), file=sys.stderr)
    return settings, todo, done, skipped, len(jobs)


def run(args) -> int:
    ctx = multiprocessing.get_context("spawn")
    settings, todo, done, skipped, _ = prepare(args, ctx)
    from tqdm import tqdm

    total = sum(len(t[2]) for t in todo)
    with tqdm(total=total, unit="video", mininterval=2.0, file=sys.stderr, disable=None) as bar:
        if args.workers <= 1 or len(todo) <= 1:
            results = map(write_shard, todo)
        else:
            pool = ctx.Pool(min(args.workers, len(todo)))
            results = pool.imap_unordered(write_shard, todo)
        for name, lines in results:
            done[name] = lines
            bar.update(len(lines))
        if args.workers > 1 and len(todo) > 1:
            pool.close()
            pool.join()
    return finish(args, settings, done, skipped)


def _deid_line(deid: dict) -> str:
    if deid.get("mode") == "off":
        return ("report de-identification is OFF (--report_deid off): report text is written as given; use this "
                "only for reports that are already de-identified")
    if deid.get("mode") != "on":
        return f"report de-identification: {deid.get('mode')}"
    removed = ", ".join(f"{k} {v}" for k, v in deid["removed"].items()) or "nothing found"
    return (f"report de-identification: {sum(deid['removed'].values())} identifiers removed from "
            f"{deid['reports_with_removals']} of {deid['reports']} reports ({removed})")


def _plan_deid(out: str) -> dict:
    with open(os.path.join(out, _PLAN)) as f:
        return json.load(f).get("report_deid", {})


def finish(args, settings: Settings, done, skipped) -> int:
    """Write manifest.jsonl and dataset_info.json from every shard's lines; print the summary; exit status."""
    manifest = list(skipped) + [line for name in sorted(done) for line in done[name]]
    with open(os.path.join(args.out, "manifest.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in manifest)
    os.replace(os.path.join(args.out, "manifest.jsonl.tmp"), os.path.join(args.out, "manifest.jsonl"))
    counts = {s: 0 for s in records.SPLITS}
    num_shards = {s: 0 for s in records.SPLITS}
    for name, lines in done.items():
        split = name.split("-")[0]
        counts[split] += sum(line["status"] == "converted" for line in lines)
        num_shards[split] += 1
    converted = sum(counts.values())
    reasons = collections.Counter(line["reason"] for line in manifest if line["status"] == "skipped")
    info = {
        "format": "tf.train.Example in TFRecord shards {split}-NNNNN-of-MMMMM.tfrecord, one .index each "
                  "(data_prep.records)",
        "source": "echonet" if args.echonet_dir else "dicom",
        "splits": {s: {"num_videos": counts[s], "num_shards": num_shards[s]} for s in records.SPLITS},
        "features": records.SCHEMA,
        "max_frames": settings.frames, "image_size": settings.image_size, "jpeg_quality": settings.jpeg_quality,
        "text_field": "report", "report_normalisation": "data_prep.reports.clean_text",
        "report_deid": _plan_deid(args.out),
        "num_inputs": len(manifest), "num_converted": converted, "num_skipped": len(manifest) - converted,
        "skipped_reasons": dict(reasons),
    }
    with open(os.path.join(args.out, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    n_skipped = len(manifest) - converted
    print(f"converted {converted} of {len(manifest)} inputs "
          f"(train {counts['train']}, val {counts['val']}, test {counts['test']}); skipped {n_skipped}")
    for reason, n in reasons.most_common():
        print(f"  skipped {n}: {reason}")
    fraction = n_skipped / max(len(manifest), 1)
    if fraction > args.max_skipped_fraction:
        print(f"error: {fraction:.1%} of inputs skipped, above --max_skipped_fraction "
              f"{args.max_skipped_fraction:.1%} (see {os.path.join(args.out, 'manifest.jsonl')})", file=sys.stderr)
        return 3
    return 0


def _read_salt(args) -> bytes:
    if args.salt_file:
        try:
            with open(args.salt_file, "rb") as f:
                salt = f.read().strip()
        except OSError as e:
            raise ValueError(f"{args.salt_file}: cannot read the salt ({e.strerror})") from None
    else:
        salt = (args.salt or "").encode("utf-8")
    if len(salt) < 8:
        raise ValueError("the salt must be at least 8 bytes (--salt or --salt_file); keep it secret and reuse it "
                         "for every conversion whose ids must match")
    return salt


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split_fractions {text!r}: expected three numbers") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split_fractions {text!r}: need three non-negative numbers summing to 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.convert", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicom_dir", help="root of the DICOM export (searched recursively)")
    src.add_argument("--echonet_dir", help="EchoNet-Dynamic root: Videos/*.avi and FileList.csv")
    p.add_argument("--reports", help="CSV of reports (required with --dicom_dir)")
    p.add_argument("--out", required=True, help="output directory (rerun with the same arguments to resume)")
    p.add_argument("--workers", type=int, default=1, help="processes (spawn); the output is the same for any")
    p.add_argument("--frames", type=int, default=32, help="frames kept per video, evenly spaced (0 = all)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--shard_size", type=int, default=256, help="videos per shard")
    p.add_argument("--jpeg_quality", type=int, default=90)
    salt = p.add_mutually_exclusive_group()
    salt.add_argument("--salt", help="secret for the id hashes (prefer --salt_file: argv is visible to others)")
    salt.add_argument("--salt_file", help="file holding the secret for the id hashes")
    p.add_argument("--split_fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test")
    p.add_argument("--study_column", default="StudyInstanceUID", help="reports column pairing a report to videos")
    p.add_argument("--study_key", choices=("StudyInstanceUID", "AccessionNumber"),
                   help="DICOM attribute matching --study_column (inferred from its name by default)")
    p.add_argument("--report_column", default="report")
    p.add_argument("--max_skipped_fraction", type=float, default=0.1,
                   help="exit with status 3 when more than this fraction of inputs is skipped")
    p.add_argument("--max_pixels", type=int, default=dicom_io.MAX_PIXELS,
                   help="skip videos whose frames have more pixels (Rows x Columns) than this: bounds memory")
    p.add_argument("--time_limit", type=float, default=120.0,
                   help="seconds per video; a video taking longer is skipped with that reason")
    p.add_argument("--report_deid", choices=("on", "off"), default="on",
                   help="remove identifiers from report text (default); off only for already de-identified reports")
    p.add_argument("--report_detector", action="append", default=[], metavar="SPEC",
                   help="extra report identifier detector (repeatable): wordlist:PATH (e.g. staff names, one per "
                        "line), presidio (needs presidio-analyzer and a spaCy model), python:MODULE:NAME")
    p.add_argument("--phone_region", default="US",
                   help="region for phone numbers without a country code (ISO code, e.g. GB), or none")
    p.add_argument("--manifest_paths", choices=("hash", "relative"), default="hash",
                   help="name inputs in manifest.jsonl by a salted hash of the relative path (default) or the path")
    return p


def check(parser: argparse.ArgumentParser, args) -> None:
    """Argument checks shared with data_prep.beam (parser.error exits with status 2)."""
    if args.dicom_dir and not args.reports:
        parser.error("--reports is required with --dicom_dir")
    if not (args.salt or args.salt_file):
        parser.error("one of --salt or --salt_file is required")
    if not (1 <= args.jpeg_quality <= 100 and args.image_size >= 16 and args.shard_size >= 1 and args.frames >= 0
            and args.max_pixels >= 256 and args.time_limit > 0):
        parser.error("--jpeg_quality 1..100, --image_size >= 16, --shard_size >= 1, --frames >= 0, "
                     "--max_pixels >= 256, --time_limit > 0")
    if getattr(args, "echonet_dir", None) is None:
        import phonenumbers

        if args.phone_region.lower() != "none" and args.phone_region.upper() not in phonenumbers.SUPPORTED_REGIONS:
            parser.error(f"--phone_region {args.phone_region!r}: not a region code (e.g. US, GB, DE) or none")
        try:
            report_deid.build_detectors(args.report_detector)
        except ValueError as e:
            parser.error(str(e))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
