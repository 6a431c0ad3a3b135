"""What a conversion is given: `Settings` (what each video's conversion depends on) and `Options` (one whole
conversion), each default written once here and used by both the dataclasses and the command line.

Library callers build `Options(...)` directly; `python -m data_prep.convert` and `data_prep.beam` parse
argv into the same `Options` with `build_parser` and `from_args`. A bad value is refused by
`Options.__post_init__` with the option to fix, before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import phonenumbers

from data_prep import dicom_io, report_detectors
from echoclip_jax.runtime import storage

PATH_MAP_SUFFIX = ".paths.jsonl"  # default path map: beside the salt file, named after it


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the records of one video depend on (part of the plan's fingerprint; pickled to every worker)."""

    frames: int = 32  # kept per video, evenly spaced (0 = all)
    image_size: int = 224
    jpeg_quality: int = 90
    shard_size: int = 256
    max_pixels: int = dicom_io.MAX_PIXELS  # per frame (Rows x Columns): bounds a video's memory
    time_limit_s: float = 120.0  # per video: a file that takes longer is skipped, never hangs the run


@dataclasses.dataclass(frozen=True)
class Options:
    """One conversion: where its inputs are, where it writes, its secret, and how it treats reports.

    Exactly one of `dicom_dir` (with `reports`) and `echonet_dir`; exactly one of `salt` and `salt_file`.
    `path_map`: the private file mapping each manifest hash to its input path; None = beside `salt_file`
    (`<salt_file>.paths.jsonl`), "none" = no map. It is never allowed inside `out`."""

    out: str
    dicom_dir: str | None = None
    reports: str | None = None
    echonet_dir: str | None = None
    salt: str | None = None
    salt_file: str | None = None
    workers: int = 1
    settings: Settings = Settings()
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    study_column: str = "StudyInstanceUID"
    study_key: str | None = None  # the DICOM attribute matching study_column; None = inferred from its name
    report_column: str = "report"
    max_skipped_fraction: float = 0.1
    report_deid: str = "on"
    report_detectors: tuple[str, ...] = ()
    phone_region: str = "US"
    manifest_paths: str = "hash"
    path_map: str | None = None
    progress: str = "auto"  # progress bars on stderr: auto (only on a terminal), on, off

    def __post_init__(self):
        s = self.settings
        problems = []
        if (self.dicom_dir is None) == (self.echonet_dir is None):
            problems.append("give one of --dicom_dir (with --reports) or --echonet_dir")
        if self.dicom_dir is not None and not self.reports:
            problems.append("--reports is required with --dicom_dir")
        if (self.salt is None) == (self.salt_file is None):
            problems.append("give one of --salt or --salt_file")
        if not (
            1 <= s.jpeg_quality <= 100
            and s.image_size >= 16
            and s.shard_size >= 1
            and s.frames >= 0
            and s.max_pixels >= 256
            and s.time_limit_s > 0
        ):
            problems.append(
                "--jpeg_quality 1..100, --image_size >= 16, --shard_size >= 1, --frames >= 0, "
                "--max_pixels >= 256, --time_limit > 0"
            )
        for name, value, choices in (
            ("--report_deid", self.report_deid, ("on", "off")),
            ("--manifest_paths", self.manifest_paths, ("hash", "relative")),
            ("--progress", self.progress, ("auto", "on", "off")),
        ):
            if value not in choices:
                problems.append(f"{name} {value!r}: one of {', '.join(choices)}")
        map_file = self.path_map_file
        if map_file is not None and _inside(map_file, self.out):
            problems.append(
                f"--path_map {map_file} is inside --out {self.out}: the map names every input "
                "file and --out is what you share; keep it where you keep the salt"
            )
        if self.dicom_dir is not None:
            region = self.phone_region
            if region.lower() != "none" and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
                problems.append(f"--phone_region {region!r}: not a region code (e.g. US, GB, DE) or none")
            try:
                report_detectors.build_detectors(self.report_detectors)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def path_map_file(self) -> str | None:
        """Where the hash -> input path map goes, or None when none is written (paths in the manifest, no
        salt file to sit beside, or "none")."""
        if self.manifest_paths == "relative" or self.path_map == "none":
            return None
        if self.path_map:
            return self.path_map
        return self.salt_file + PATH_MAP_SUFFIX if self.salt_file else None


def _inside(path: str, directory: str) -> bool:
    if storage.is_remote(path) or storage.is_remote(directory):
        path, directory = os.fspath(path).rstrip("/"), os.fspath(directory).rstrip("/")
        return path == directory or path.startswith(directory + "/")
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def read_salt(options: Options) -> bytes:
    """The secret the ids are hashed with, from --salt_file or --salt (at least 8 bytes)."""
    return load_salt(options.salt, options.salt_file)


def load_salt(salt: str | bytes | None = None, salt_file: str | None = None) -> bytes:
    """The salt as convert reads it: `salt_file`'s content (stripped) or `salt`'s UTF-8 bytes, at least
    8 bytes. Every command that must reproduce the records' salted ids reads it through here."""
    if salt_file:
        try:
            value = storage.read_bytes(salt_file).strip()
        except (OSError, storage.StorageError) as e:
            raise ValueError(f"{salt_file}: cannot read the salt ({getattr(e, 'strerror', None) or e})") from None
    else:
        value = salt.encode("utf-8") if isinstance(salt, str) else (salt or b"")
    if len(value) < 8:
        raise ValueError(
            "the salt must be at least 8 bytes (--salt or --salt_file); keep it secret and reuse it "
            "for every conversion whose ids must match"
        )
    return value


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split_fractions {text!r}: expected three numbers") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split_fractions {text!r}: need three non-negative numbers summing to 1")
    return values


def failed(prog: str, error: Exception) -> int:
    """Reports a failed run of a data_prep command (`<prog>: error: <message>` on stderr) and returns its exit
    status, 1. A wrong command line exits 2 through argparse (`parser.error`)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return 1


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line of a conversion; every default is the dataclasses'."""
    s, o = Settings, Options
    p = argparse.ArgumentParser(prog=prog, description=description)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicom_dir", help="root of the DICOM export (searched recursively); local path or gs:// URL")
    src.add_argument(
        "--echonet_dir", help="EchoNet-Dynamic root: Videos/*.avi and FileList.csv; local path or gs:// URL"
    )
    p.add_argument("--reports", help="CSV of reports (required with --dicom_dir); local path or gs:// URL")
    p.add_argument(
        "--out",
        required=True,
        help="output directory, local path or gs:// URL (rerun with the same arguments to resume)",
    )
    p.add_argument("--workers", type=int, default=o.workers, help="processes (spawn); the output is the same for any")
    p.add_argument("--frames", type=int, default=s.frames, help="frames kept per video, evenly spaced (0 = all)")
    p.add_argument("--image_size", type=int, default=s.image_size)
    p.add_argument("--shard_size", type=int, default=s.shard_size, help="videos per shard")
    p.add_argument("--jpeg_quality", type=int, default=s.jpeg_quality)
    salt = p.add_mutually_exclusive_group(required=True)
    salt.add_argument("--salt", help="secret for the id hashes (prefer --salt_file: argv is visible to others)")
    salt.add_argument("--salt_file", help="file holding the secret for the id hashes; local path or gs:// URL")
    p.add_argument("--split_fractions", type=_fractions, default=o.split_fractions, help="train,val,test")
    p.add_argument("--study_column", default=o.study_column, help="reports column pairing a report to videos")
    p.add_argument(
        "--study_key",
        choices=("StudyInstanceUID", "AccessionNumber"),
        default=o.study_key,
        help="DICOM attribute matching --study_column (inferred from its name by default)",
    )
    p.add_argument("--report_column", default=o.report_column)
    p.add_argument(
        "--max_skipped_fraction",
        type=float,
        default=o.max_skipped_fraction,
        help="exit with status 3 when more than this fraction of inputs is skipped",
    )
    p.add_argument(
        "--max_pixels",
        type=int,
        default=s.max_pixels,
        help="skip videos whose frames have more pixels (Rows x Columns) than this: bounds memory",
    )
    p.add_argument(
        "--time_limit",
        type=float,
        default=s.time_limit_s,
        help="seconds per video; a video taking longer is skipped with that reason",
    )
    p.add_argument(
        "--report_deid",
        choices=("on", "off"),
        default=o.report_deid,
        help="remove identifiers from report text (default); off only for already de-identified reports",
    )
    p.add_argument(
        "--report_detector",
        action="append",
        default=list(o.report_detectors),
        metavar="SPEC",
        help="extra report identifier detector (repeatable): wordlist:PATH (e.g. staff names, one per "
        "line), presidio (needs presidio-analyzer and a spaCy model), python:MODULE:NAME",
    )
    p.add_argument(
        "--phone_region",
        default=o.phone_region,
        help="region for phone numbers without a country code (ISO code, e.g. GB), or none",
    )
    p.add_argument(
        "--manifest_paths",
        choices=("hash", "relative"),
        default=o.manifest_paths,
        help="name inputs in manifest.jsonl by a salted hash of the relative path (default) or the path",
    )
    p.add_argument(
        "--path_map",
        default=o.path_map,
        metavar="FILE",
        help="private JSON-lines map from each manifest hash to its input's relative path (local path or gs:// "
        f"URL), added to on every run (default: beside --salt_file, as SALT_FILE{PATH_MAP_SUFFIX}; none: no map); "
        "never inside --out",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default=o.progress,
        help="progress bars with counts and rates on stderr (auto: only on a terminal)",
    )
    return p


PATH_FLAGS = ("out", "dicom_dir", "reports", "echonet_dir", "salt_file", "path_map")


def check_paths(args: argparse.Namespace) -> None:
    """The start-up check of every path flag (and a `wordlist:PATH` detector), before any work: a local path
    or a gs:// URL whose bucket exists (storage.check); raises storage.StorageError naming the flag."""
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if value and not (flag == "path_map" and value == "none"):
            storage.check(value, f"--{flag}")
    for spec in getattr(args, "report_detector", None) or ():
        kind, _, arg = spec.partition(":")
        if kind == "wordlist" and arg:
            storage.check(arg, "--report_detector")


def from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    """The Options of parsed arguments; a bad value, or a path whose scheme or bucket cannot be used, exits
    with status 2 and the reason (parser.error)."""
    try:
        check_paths(args)
        return Options(
            out=args.out,
            dicom_dir=args.dicom_dir,
            reports=args.reports,
            echonet_dir=args.echonet_dir,
            salt=args.salt,
            salt_file=args.salt_file,
            workers=args.workers,
            settings=Settings(
                args.frames, args.image_size, args.jpeg_quality, args.shard_size, args.max_pixels, args.time_limit
            ),
            split_fractions=args.split_fractions,
            study_column=args.study_column,
            study_key=args.study_key,
            report_column=args.report_column,
            max_skipped_fraction=args.max_skipped_fraction,
            report_deid=args.report_deid,
            report_detectors=tuple(args.report_detector),
            phone_region=args.phone_region,
            manifest_paths=args.manifest_paths,
            path_map=args.path_map,
            progress=args.progress,
        )
    except ValueError as e:
        parser.error(str(e))
