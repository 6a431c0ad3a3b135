"""The synthetic cohort's plan: patients, studies and videos, with their fake PHI and their true findings.

Cheap and sequential, drawn from one seeded generator, so the same (patients, seed, small, version) always
plans the same cohort; the pixels of each video come later from its own seed (data_prep.synthetic.render,
or render_views for version 2, whose studies hold several standard views each).
"""

from __future__ import annotations

import dataclasses
import datetime
import math

import numpy as np
from pydicom.uid import generate_uid

EF_DEFINITION = "(EDA-ESA)/EDA of the LV cavity area in the image plane, percent"
DEVICES = ("pacemaker", "tavr", "mitraclip")
# version 2: the standard views drawn, and the views each device shows in
VIEWS = ("a4c", "a2c", "plax", "psax", "subcostal")
DEVICE_VIEWS = {"pacemaker": ("a4c", "psax", "subcostal"), "tavr": ("a4c", "plax"), "mitraclip": ("a4c", "a2c", "plax")}
LV_SIZES = ("normal", "mild", "moderate", "severe")
LV_SCALE = {"normal": 1.0, "mild": 1.1, "moderate": 1.2, "severe": 1.3}  # ED cavity axes multiplier
# Reduced EF goes with a dilated LV, as in dilated cardiomyopathy: the lower bound of EF for each size.
# This makes EF partly visible in a single frame, as it is in real echo (the paper trains on one frame).
LV_SIZE_EF_FLOOR = {"normal": 50, "mild": 40, "moderate": 28, "severe": 0}
ENCODINGS = ("jpeg_ybr_full_422", "rgb", "monochrome2")
COHORT_VERSIONS = (1, 2)
# Version 2: more videos per study, each a different standard view (a study shows more than any one video).
VIDEOS_PER_STUDY_V2 = {True: (3, 4), False: (4, 5)}  # keyed by `small`

# Invented names (no real person): distinctive, so a privacy test can grep every output byte for them.
_LAST = (
    "QUILLAMORE",
    "VANTERBUSH",
    "ZEPHYRANT",
    "MARLOWICK",
    "OSTRAVEN",
    "BRINDLEFOX",
    "KESTRANE",
    "THORNVALE",
    "WYNDERLY",
    "CALDERIX",
    "PEMBERWICK",
    "ROOKSBANE",
    "FAIRWEXLEY",
    "DUNMARROW",
    "GLASSENBY",
    "HOLLOWAYNE",
    "IVORSTEAD",
    "JASPERLEY",
    "LOXWORTH",
    "MIREBROOK",
)
_FIRST = (
    "ALBINA",
    "BRISCO",
    "CORVINA",
    "DELPHA",
    "EVANDER",
    "FIORELLA",
    "GASTON",
    "HESPERA",
    "ISIDRO",
    "JOVANKA",
    "LEOCADIA",
    "MAXENTIO",
    "NERISSA",
    "ORLANDO",
    "PERPETUA",
    "QUENTIN",
    "ROSALBA",
    "SEVERIN",
    "TEODORA",
    "VALERIO",
)
_INSTITUTIONS = (
    "SAINT ELSEWHERE HEART CENTER",
    "MERIDIAN VALLEY CARDIAC INSTITUTE",
    "NORTHGATE UNIVERSITY HOSPITAL",
    "LAKESHORE MEMORIAL MEDICAL CENTER",
)
_ADDRESSES = (
    "1200 HARBOR BLVD, PORT ELSEWHERE",
    "77 MERIDIAN WAY, VALLEYTOWN",
    "4 NORTHGATE PLAZA, UNIVERSITYVILLE",
    "900 SHORE DRIVE, LAKESIDE",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Image size, and the bands outside the sector for burned-in text (top) and the ECG (bottom)."""

    rows: int
    cols: int
    header: int  # rows above the sector apex holding the burned-in text
    ecg: int  # rows at the bottom holding the ECG trace
    font_px: int
    frames: tuple[int, int]  # inclusive range of frames per video
    videos_per_study: tuple[int, int]
    speckle_blur: tuple[int, int]  # box blur (rows, cols): speckle grain grows with resolution


SMALL = Layout(
    rows=160, cols=208, header=26, ecg=16, font_px=10, frames=(16, 24), videos_per_study=(2, 3), speckle_blur=(1, 3)
)
FULL = Layout(
    rows=600, cols=800, header=56, ecg=44, font_px=18, frames=(30, 100), videos_per_study=(2, 4), speckle_blur=(3, 7)
)


@dataclasses.dataclass
class VideoSpec:
    """Everything needed to render and write one video (picklable for worker processes)."""

    path: str  # relative to the output dir
    seed: tuple[int, ...]
    patient: str
    study_index: int
    video_index: int
    study_day: int
    ef: int
    devices: tuple[str, ...]
    n_mitraclips: int
    lv_size: str
    heart_rate: float
    fps: float
    frame_time_ms: float
    frames: int
    encoding: str
    has_regions: bool
    small: bool
    phi: dict  # header + burned-in values for this study
    version: int = 1  # cohort version (1: one A4C-like phantom per video; 2: standard views)
    view: str = "a4c"  # the standard view drawn (version 2: one of VIEWS)


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=["echoclip-jax synthetic", str(seed), *map(str, parts)])


def _fmt_date(d: datetime.date) -> str:
    return d.strftime("%Y%m%d")


def _patient_names(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    pairs = [(last, first) for last in _LAST for first in _FIRST]
    if n <= len(pairs):
        return [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    return [pairs[i] for i in rng.integers(0, len(pairs), n)]


def _baseline_ef(rng: np.random.Generator) -> float:
    """Mostly normal hearts, with a broad tail of reduced (and a few hyperdynamic) ones."""
    if rng.random() < 0.5:
        return float(rng.normal(60, 6))
    return float(rng.uniform(10, 80))


def lv_scale(ef: int) -> float:
    """ED cavity axes multiplier, continuous in EF over the whole range so that one frame shows it: the cavity
    grows as EF falls below 55% (the severe size's scale at 20%, so the size report category and the pixels
    agree) and shrinks a little above it (0.9 at 80%, hyperdynamic hearts stay normal-sized)."""
    if ef >= 55:
        return LV_SCALE["normal"] - 0.1 * min((ef - 55) / 25, 1.0)
    t = min((55 - ef) / 35, 1.0)
    return LV_SCALE["normal"] + t * (LV_SCALE["severe"] - LV_SCALE["normal"])


def _lv_size(ef: int) -> str:
    """The LV size that goes with an EF (LV_SIZE_EF_FLOOR)."""
    return next(size for size in LV_SIZES if ef >= LV_SIZE_EF_FLOOR[size])


def plan_cohort(patients: int, seed: int, small: bool, version: int = 1) -> tuple[list[VideoSpec], list[dict], dict]:
    """Returns (videos, studies, phi) for the cohort; deterministic for (patients, seed, small, version).
    Version 1 draws exactly the stream it always drew (its cohorts stay byte-identical); version 2 plans
    each study's videos as distinct standard views (`_views_v2`) from the same stream."""
    if patients < 1:
        raise ValueError(f"--patients must be >= 1, got {patients}")
    if version not in COHORT_VERSIONS:
        raise ValueError(f"--cohort_version must be one of {COHORT_VERSIONS}, got {version}")
    layout = SMALL if small else FULL
    rng = np.random.default_rng(seed)
    names = _patient_names(rng, patients)
    videos: list[VideoSpec] = []
    studies: list[dict] = []
    phi: dict[str, set] = {
        k: set()
        for k in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "InstitutionName",
            "InstitutionAddress",
            "StudyDate",
            "ReferringPhysicianName",
            "OperatorsName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "burned_in",
        )
    }
    counter = 0
    uid_tag = () if version == 1 else ("v2",)  # v2 cohorts never share a UID with v1 ones of the same seed
    for p in range(patients):
        last, first = names[p]
        pid = f"MRN{rng.integers(10**6, 10**7)}"
        n_studies = int(rng.integers(1, 4))
        first_day = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3300)))
        days = np.concatenate([[0], np.cumsum(rng.integers(30, 720, n_studies - 1))]).astype(int)
        dob = first_day - datetime.timedelta(days=int(rng.integers(25 * 365, 90 * 365)))
        sex = str(rng.choice(["F", "M"]))
        ef0 = _baseline_ef(rng)
        onset = {
            d: (int(rng.integers(0, n_studies)) if rng.random() < prob else None)
            for d, prob in zip(DEVICES, (0.25, 0.2, 0.2))
        }
        n_clips = int(rng.integers(1, 3))
        referrer = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}^^DR"
        for s in range(n_studies):
            study_date = first_day + datetime.timedelta(days=int(days[s]))
            ef = int(np.clip(round(ef0 + (rng.normal(0, 7) if s else 0)), 10, 80))
            size = _lv_size(ef)
            devices = tuple(d for d in DEVICES if onset[d] is not None and s >= onset[d])
            hr0 = float(rng.uniform(50, 110))
            inst = int(rng.integers(len(_INSTITUTIONS)))
            study_uid = _uid(seed, *uid_tag, "study", p, s)
            accession = f"ACC{rng.integers(10**8, 10**9)}"
            operator = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}"
            study_time = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
            burned_date = study_date.strftime("%m/%d/%Y")
            study_phi = dict(
                PatientName=f"{last}^{first}",
                PatientID=pid,
                PatientBirthDate=_fmt_date(dob),
                PatientSex=sex,
                PatientAge=f"{(study_date - dob).days // 365:03d}Y",
                AccessionNumber=accession,
                InstitutionName=_INSTITUTIONS[inst],
                InstitutionAddress=_ADDRESSES[inst],
                StudyDate=_fmt_date(study_date),
                StudyTime=study_time,
                ReferringPhysicianName=referrer,
                OperatorsName=operator,
                StudyInstanceUID=study_uid,
                StudyID=f"{int(rng.integers(1000, 10000))}",
                burned_name=f"{last}, {first}",
                burned_id=f"ID: {pid}",
                burned_date=f"{burned_date} {study_time[:2]}:{study_time[2:4]}",
            )
            for key in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "AccessionNumber",
                "InstitutionName",
                "InstitutionAddress",
                "StudyDate",
                "ReferringPhysicianName",
                "OperatorsName",
                "StudyInstanceUID",
            ):
                phi[key].add(study_phi[key])
            phi["burned_in"].update([study_phi["burned_name"], pid, burned_date])
            lo, hi = layout.videos_per_study if version == 1 else VIDEOS_PER_STUDY_V2[small]
            n_videos = int(rng.integers(lo, hi + 1))
            views = ("a4c",) * n_videos if version == 1 else _views_v2(rng, n_videos, devices)
            for v in range(n_videos):
                hr = float(np.clip(hr0 + rng.normal(0, 3), 45, 115))
                frames, fps = _frames_and_rate(rng, layout, hr, small)
                frame_time = round(1000.0 / fps, 3)
                encoding = ENCODINGS[1] if counter % 8 == 3 else ENCODINGS[2] if counter % 8 == 6 else ENCODINGS[0]
                has_regions = counter % 6 != 5
                counter += 1
                videos.append(
                    VideoSpec(
                        path=f"dicom/P{p + 1:05d}/S{s + 1:02d}/IM{v + 1:04d}.dcm",
                        seed=(seed, p, s, v),
                        patient=f"P{p + 1:05d}",
                        study_index=s,
                        video_index=v,
                        study_day=int(days[s]),
                        ef=ef,
                        devices=devices,
                        n_mitraclips=n_clips if "mitraclip" in devices else 0,
                        lv_size=size,
                        heart_rate=round(hr, 1),
                        fps=1000.0 / frame_time,
                        frame_time_ms=frame_time,
                        frames=frames,
                        encoding=encoding,
                        has_regions=has_regions,
                        small=small,
                        phi=dict(
                            study_phi,
                            SeriesInstanceUID=_uid(seed, *uid_tag, "series", p, s, v),
                            SOPInstanceUID=_uid(seed, *uid_tag, "sop", p, s, v),
                            SeriesNumber=v + 1,
                        ),
                        version=version,
                        view=views[v],
                    )
                )
                phi["SeriesInstanceUID"].add(videos[-1].phi["SeriesInstanceUID"])
                phi["SOPInstanceUID"].add(videos[-1].phi["SOPInstanceUID"])
            studies.append(
                dict(
                    StudyInstanceUID=study_uid,
                    AccessionNumber=accession,
                    patient=f"P{p + 1:05d}",
                    ef=ef,
                    devices=devices,
                    n_mitraclips=n_clips if "mitraclip" in devices else 0,
                    lv_size=size,
                    heart_rate=hr0,
                    report_seed=(seed, p, s),
                    phi=study_phi,
                    version=version,
                )
            )
    return videos, studies, {k: sorted(v) for k, v in phi.items()}


def _views_v2(rng, n_videos: int, devices: tuple[str, ...]) -> tuple[str, ...]:
    """A study's views (version 2): n distinct standard views, the apical 4-chamber mostly among them, as a
    complete transthoracic study has it, and every device of the study shown by at least one of them (a
    view that shows none is swapped for one that does); the order of acquisition varies."""
    others = [VIEWS[i] for i in rng.permutation(np.arange(1, len(VIEWS)))]
    chosen = (["a4c"] + others[: n_videos - 1]) if rng.random() < 0.8 else others[:n_videos]
    for d in devices:
        if any(v in DEVICE_VIEWS[d] for v in chosen):
            continue
        # A slot whose view no other device of the study needs as its only view.
        sole = {
            v
            for e in devices
            for v in chosen
            if v in DEVICE_VIEWS[e] and sum(w in DEVICE_VIEWS[e] for w in chosen) == 1
        }
        slot = next(i for i in rng.permutation(n_videos) if chosen[i] not in sole)
        options = [v for v in DEVICE_VIEWS[d] if v not in chosen]
        chosen[slot] = options[int(rng.integers(len(options)))]
    return tuple(chosen[i] for i in rng.permutation(n_videos))


def _frames_and_rate(rng, layout: Layout, hr: float, small: bool) -> tuple[int, float]:
    """Frame count and rate such that every video holds >= 1.15 cardiac cycles and a frame falls
    within each 0.1-cycle plateau at end-diastole and end-systole (so max/min area are sampled)."""
    cycles_per_s = hr / 60.0
    lo_fps = 12.5 * cycles_per_s  # frame step <= 0.08 cycle
    if small:
        frames = int(rng.integers(layout.frames[0], layout.frames[1] + 1))
        hi_fps = frames * cycles_per_s / 1.15
        return frames, float(rng.uniform(lo_fps, hi_fps))
    fps = float(rng.uniform(max(30.0, lo_fps), 60.0))
    need = math.ceil(1.15 * fps / cycles_per_s)
    return int(rng.integers(max(layout.frames[0], need), max(layout.frames[1], need) + 1)), fps
