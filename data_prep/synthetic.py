"""A synthetic echocardiography cohort written as real DICOM, with known answers.

Every later stage (DICOM conversion, de-identification, training, zero-shot evaluation) needs data
whose truth is known. Each video is an apical-4-chamber-like phantom: a fan-shaped sector with speckle,
four chambers, and a left ventricle whose cavity AREA follows a cardiac cycle, so its ejection fraction
(EF = (EDA - ESA) / EDA of the LV cavity area in the image plane) is a known integer in [10, 80] %.
Devices are bright structures: a pacemaker lead in the right heart, a prosthetic (stent) aortic valve
at the crux, one or two mitral clips at the mitral annulus. Outside the sector, as on real scanners:
an ECG trace, a probe label, depth ticks and burned-in text with the fake patient's name, id and date.
Headers carry fake PHI (and one private tag repeating the name), so de-identification can be tested.

Writes, under ``--out``:
  dicom/Pnnnnn/Snn/IMnnnn.dcm  Ultrasound Multi-frame Image Storage; JPEG Baseline YBR_FULL_422 for most,
                               explicit-VR uncompressed RGB or MONOCHROME2 for some; most carry a
                               SequenceOfUltrasoundRegions (tissue sector + ECG), some do not.
  reports.csv                  StudyInstanceUID, AccessionNumber, report (one EchoCLIP-style report per study,
                               with the patient's and staff's identifiers in a header line and sign-off)
  reports_clinical.csv         StudyInstanceUID, report: the same reports' clinical text alone (never read by
                               the pipeline; what a de-identified report must still say)
  truth.csv                    per video: the true EF, devices, LV size, heart rate, geometry (never read
                               by the pipeline; for tests and evaluation only)
  phi.json                     every fake PHI string written anywhere, for privacy tests to grep for
                               (`strings`; `by_field.report_numbers` are bare numbers, to look for in text)
  cohort.json                  the arguments and counts

Pure numpy + Pillow + pydicom: no JAX, so it runs wherever data_prep runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import datetime
import io
import json
import math
import pathlib
import sys

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from data_prep.synthetic_reports import REPORT_GRADE_PROB, clinical_report, systolic_function, write_report  # noqa: F401

EF_DEFINITION = "(EDA-ESA)/EDA of the LV cavity area in the image plane, percent"
DEVICES = ("pacemaker", "tavr", "mitraclip")
LV_SIZES = ("normal", "mild", "moderate", "severe")
LV_SCALE = {"normal": 1.0, "mild": 1.1, "moderate": 1.2, "severe": 1.3}  # ED cavity axes multiplier
# Reduced EF goes with a dilated LV, as in dilated cardiomyopathy: the lower bound of EF for each size.
# This makes EF partly visible in a single frame, as it is in real echo (the paper trains on one frame).
LV_SIZE_EF_FLOOR = {"normal": 50, "mild": 40, "moderate": 28, "severe": 0}
ENCODINGS = ("jpeg_ybr_full_422", "rgb", "monochrome2")

# Invented names (no real person): distinctive, so a privacy test can grep every output byte for them.
_LAST = ("QUILLAMORE", "VANTERBUSH", "ZEPHYRANT", "MARLOWICK", "OSTRAVEN", "BRINDLEFOX", "KESTRANE",
         "THORNVALE", "WYNDERLY", "CALDERIX", "PEMBERWICK", "ROOKSBANE", "FAIRWEXLEY", "DUNMARROW",
         "GLASSENBY", "HOLLOWAYNE", "IVORSTEAD", "JASPERLEY", "LOXWORTH", "MIREBROOK")
_FIRST = ("ALBINA", "BRISCO", "CORVINA", "DELPHA", "EVANDER", "FIORELLA", "GASTON", "HESPERA",
          "ISIDRO", "JOVANKA", "LEOCADIA", "MAXENTIO", "NERISSA", "ORLANDO", "PERPETUA", "QUENTIN",
          "ROSALBA", "SEVERIN", "TEODORA", "VALERIO")
_INSTITUTIONS = ("SAINT ELSEWHERE HEART CENTER", "MERIDIAN VALLEY CARDIAC INSTITUTE",
                 "NORTHGATE UNIVERSITY HOSPITAL", "LAKESHORE MEMORIAL MEDICAL CENTER")
_ADDRESSES = ("1200 HARBOR BLVD, PORT ELSEWHERE", "77 MERIDIAN WAY, VALLEYTOWN",
              "4 NORTHGATE PLAZA, UNIVERSITYVILLE", "900 SHORE DRIVE, LAKESIDE")


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


SMALL = Layout(rows=160, cols=208, header=26, ecg=16, font_px=10, frames=(16, 24),
               videos_per_study=(2, 3), speckle_blur=(1, 3))
FULL = Layout(rows=600, cols=800, header=56, ecg=44, font_px=18, frames=(30, 100),
              videos_per_study=(2, 4), speckle_blur=(3, 7))


# ----------------------------------------------------------------------------------------------
# The cohort plan: patients, studies, videos (cheap, sequential, from one seeded generator).
# ----------------------------------------------------------------------------------------------

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


def _lv_scale(ef: int) -> float:
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


def plan_cohort(patients: int, seed: int, small: bool) -> tuple[list[VideoSpec], list[dict], dict]:
    """Returns (videos, studies, phi) for the cohort; deterministic for (patients, seed, small)."""
    if patients < 1:
        raise ValueError(f"--patients must be >= 1, got {patients}")
    layout = SMALL if small else FULL
    rng = np.random.default_rng(seed)
    names = _patient_names(rng, patients)
    videos: list[VideoSpec] = []
    studies: list[dict] = []
    phi: dict[str, set] = {k: set() for k in (
        "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
        "InstitutionAddress", "StudyDate", "ReferringPhysicianName", "OperatorsName",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "burned_in")}
    counter = 0
    for p in range(patients):
        last, first = names[p]
        pid = f"MRN{rng.integers(10**6, 10**7)}"
        n_studies = int(rng.integers(1, 4))
        first_day = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 3300)))
        days = np.concatenate([[0], np.cumsum(rng.integers(30, 720, n_studies - 1))]).astype(int)
        dob = first_day - datetime.timedelta(days=int(rng.integers(25 * 365, 90 * 365)))
        sex = str(rng.choice(["F", "M"]))
        ef0 = _baseline_ef(rng)
        onset = {d: (int(rng.integers(0, n_studies)) if rng.random() < prob else None)
                 for d, prob in zip(DEVICES, (0.25, 0.2, 0.2))}
        n_clips = int(rng.integers(1, 3))
        referrer = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}^^DR"
        for s in range(n_studies):
            study_date = first_day + datetime.timedelta(days=int(days[s]))
            ef = int(np.clip(round(ef0 + (rng.normal(0, 7) if s else 0)), 10, 80))
            size = _lv_size(ef)
            devices = tuple(d for d in DEVICES if onset[d] is not None and s >= onset[d])
            hr0 = float(rng.uniform(50, 110))
            inst = int(rng.integers(len(_INSTITUTIONS)))
            study_uid = _uid(seed, "study", p, s)
            accession = f"ACC{rng.integers(10**8, 10**9)}"
            operator = f"{_LAST[int(rng.integers(len(_LAST)))]}^{_FIRST[int(rng.integers(len(_FIRST)))]}"
            study_time = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
            burned_date = study_date.strftime("%m/%d/%Y")
            study_phi = dict(
                PatientName=f"{last}^{first}", PatientID=pid, PatientBirthDate=_fmt_date(dob),
                PatientSex=sex, PatientAge=f"{(study_date - dob).days // 365:03d}Y",
                AccessionNumber=accession, InstitutionName=_INSTITUTIONS[inst],
                InstitutionAddress=_ADDRESSES[inst], StudyDate=_fmt_date(study_date), StudyTime=study_time,
                ReferringPhysicianName=referrer, OperatorsName=operator, StudyInstanceUID=study_uid,
                StudyID=f"{int(rng.integers(1000, 10000))}",
                burned_name=f"{last}, {first}", burned_id=f"ID: {pid}",
                burned_date=f"{burned_date} {study_time[:2]}:{study_time[2:4]}")
            for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "InstitutionAddress", "StudyDate", "ReferringPhysicianName", "OperatorsName",
                        "StudyInstanceUID"):
                phi[key].add(study_phi[key])
            phi["burned_in"].update([study_phi["burned_name"], pid, burned_date])
            n_videos = int(rng.integers(layout.videos_per_study[0], layout.videos_per_study[1] + 1))
            for v in range(n_videos):
                hr = float(np.clip(hr0 + rng.normal(0, 3), 45, 115))
                frames, fps = _frames_and_rate(rng, layout, hr, small)
                frame_time = round(1000.0 / fps, 3)
                encoding = ENCODINGS[1] if counter % 8 == 3 else ENCODINGS[2] if counter % 8 == 6 else ENCODINGS[0]
                has_regions = counter % 6 != 5
                counter += 1
                videos.append(VideoSpec(
                    path=f"dicom/P{p + 1:05d}/S{s + 1:02d}/IM{v + 1:04d}.dcm", seed=(seed, p, s, v),
                    patient=f"P{p + 1:05d}", study_index=s, video_index=v, study_day=int(days[s]), ef=ef,
                    devices=devices, n_mitraclips=n_clips if "mitraclip" in devices else 0, lv_size=size,
                    heart_rate=round(hr, 1), fps=1000.0 / frame_time, frame_time_ms=frame_time,
                    frames=frames, encoding=encoding, has_regions=has_regions, small=small,
                    phi=dict(study_phi, SeriesInstanceUID=_uid(seed, "series", p, s, v),
                             SOPInstanceUID=_uid(seed, "sop", p, s, v), SeriesNumber=v + 1)))
                phi["SeriesInstanceUID"].add(videos[-1].phi["SeriesInstanceUID"])
                phi["SOPInstanceUID"].add(videos[-1].phi["SOPInstanceUID"])
            studies.append(dict(StudyInstanceUID=study_uid, AccessionNumber=accession, patient=f"P{p + 1:05d}",
                                ef=ef, devices=devices, n_mitraclips=n_clips if "mitraclip" in devices else 0,
                                lv_size=size, heart_rate=hr0, report_seed=(seed, p, s), phi=study_phi))
    return videos, studies, {k: sorted(v) for k, v in phi.items()}


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


# ----------------------------------------------------------------------------------------------
# The phantom: echogenicity maps in sector units (depth 1 = the sector radius), speckle, overlays.
# ----------------------------------------------------------------------------------------------

def _volume_fraction(phase: np.ndarray, ef: float) -> np.ndarray:
    """LV cavity area / end-diastolic area over the cycle (phase 0 = R wave = end-diastole):
    contraction, an end-systolic plateau, rapid filling, diastasis."""
    phase = np.mod(phase, 1.0)
    contract = 1 - ef * (1 - np.cos(np.pi * phase / 0.30)) / 2
    fill = 1 - ef * (1 + np.cos(np.pi * (phase - 0.40) / 0.25)) / 2
    return np.select([phase < 0.30, phase < 0.40, phase < 0.65], [contract, 1 - ef, fill], 1.0)


def _ellipse(u, v, cu, cv, a, b, axis_angle):
    """Normalised radius^2 of a rotated ellipse: a across, b along the axis at `axis_angle` (radians
    from the depth direction, positive towards +u)."""
    du, dv = u - cu, v - cv
    s, c = math.sin(axis_angle), math.cos(axis_angle)
    along = du * s + dv * c
    across = du * c - dv * s
    return (across / a) ** 2 + (along / b) ** 2


@dataclasses.dataclass
class Heart:
    """Chamber geometry in sector units for one video."""

    lv_c: tuple[float, float]
    lv_axis: float  # LV long-axis angle, radians
    lv_a: float  # ED cavity semi-axis across
    lv_b: float  # ED cavity semi-axis along the long axis
    wall: float  # ED myocardial thickness
    rv_c: tuple[float, float]
    rv_ab: tuple[float, float]
    la_c: tuple[float, float]
    ra_c: tuple[float, float]
    atrium_ab: tuple[float, float]


def _make_heart(rng: np.random.Generator, lv_scale: float) -> Heart:
    lv_a, lv_b = 0.115 * lv_scale, 0.215 * lv_scale
    lv_c = (0.10 + rng.uniform(-0.015, 0.015), 0.125 + lv_b + rng.uniform(-0.01, 0.01))
    axis = math.atan2(lv_c[0], lv_c[1])
    wall = 0.05
    direction = (math.sin(axis), math.cos(axis))
    atrium_ab = (0.10, 0.085)
    la_dist = lv_b + wall + 0.02 + atrium_ab[1]
    la_c = (lv_c[0] + direction[0] * la_dist, lv_c[1] + direction[1] * la_dist)
    ra_c = (la_c[0] - 0.24, la_c[1] - 0.01)
    rv_ab = (0.075, 0.19 * min(lv_scale, 1.15))
    rv_c = (lv_c[0] - lv_a - 2 * wall - rv_ab[0] + 0.01, 0.15 + rv_ab[1])
    return Heart(lv_c, axis, lv_a, lv_b, wall, rv_c, rv_ab, la_c, ra_c, atrium_ab)


def _myocardial_thickness(a, b, heart: Heart):
    """Wall thickness that keeps the myocardial area constant as the cavity shrinks (it thickens)."""
    a0, b0, t0 = heart.lv_a, heart.lv_b, heart.wall
    m = (a0 + t0) * (b0 + t0) - a0 * b0
    return (-(a + b) + np.sqrt((a + b) ** 2 + 4 * m)) / 2


def _echogenicity(u, v, heart: Heart, f: float, phase: float, spec: VideoSpec):
    """(mean echo brightness 0 blood .. 1 bright, device mask) at sector coordinates (u, v) for the
    LV cavity at `f` times its end-diastolic area."""
    e = 0.30 + 0.12 * np.exp(-v / 0.06) + 0.05 * np.sin(7 * u + 3 * v)  # tissue + near-field clutter
    # Pericardium: a bright rim around the heart.
    r_peri = _ellipse(u, v, 0.0, 0.55, 0.44, 0.47, 0.0)
    e = np.where(np.abs(np.sqrt(r_peri) - 1) < 0.045, 0.6, e)
    atrial = math.sqrt(1 + 0.25 * (1 - f))  # atria fill while the ventricles empty
    aa, ab = heart.atrium_ab[0] * atrial, heart.atrium_ab[1] * atrial
    rv = math.sqrt(1 - 0.6 * (1 - f))
    for (cu, cv), (a, b), ang in (
            (heart.ra_c, (aa, ab), 0.0), (heart.la_c, (aa, ab), heart.lv_axis),
            (heart.rv_c, (heart.rv_ab[0] * rv, heart.rv_ab[1] * rv), math.atan2(heart.rv_c[0], heart.rv_c[1]))):
        e = np.where(_ellipse(u, v, cu, cv, a + 0.03, b + 0.03, ang) <= 1, 0.6, e)
        e = np.where(_ellipse(u, v, cu, cv, a, b, ang) <= 1, 0.05, e)
    # LV territory: tissue out to its ED epicardium, so no other chamber shows where the LV shrank.
    cu, cv = heart.lv_c
    ed_out = (heart.lv_a + heart.wall, heart.lv_b + heart.wall)
    e = np.where(_ellipse(u, v, cu, cv, ed_out[0] * 1.04, ed_out[1] * 1.04, heart.lv_axis) <= 1, 0.40, e)
    k = math.sqrt(f)
    a, b = heart.lv_a * k, heart.lv_b * k
    t = float(_myocardial_thickness(a, b, heart))
    e = np.where(_ellipse(u, v, cu, cv, a + t, b + t, heart.lv_axis) <= 1, 0.65, e)
    e = np.where(_ellipse(u, v, cu, cv, a, b, heart.lv_axis) <= 1, 0.045, e)
    return e, _device_mask(u, v, heart, b + t, phase, spec)


def _device_mask(u, v, heart: Heart, base_dist: float, phase: float, spec: VideoSpec) -> np.ndarray:
    """Where the devices are: drawn after speckle as near-saturated metal, brighter than any tissue."""
    mask = np.zeros(u.shape, bool)
    s, c = math.sin(heart.lv_axis), math.cos(heart.lv_axis)
    if "pacemaker" in spec.devices:
        # A lead from the right atrium through the tricuspid valve to the RV apex; it sways a little.
        sway = 0.012 * math.sin(2 * math.pi * phase)
        rv_axis = math.atan2(heart.rv_c[0], heart.rv_c[1])
        apex = (heart.rv_c[0] - math.sin(rv_axis) * heart.rv_ab[1] * 0.75 + sway,
                heart.rv_c[1] - math.cos(rv_axis) * heart.rv_ab[1] * 0.75)
        start = (heart.ra_c[0] - 0.03, heart.ra_c[1] + 0.06)
        ctrl = (heart.rv_c[0] + 0.05 - sway, heart.rv_c[1] + 0.12)
        tt = np.linspace(0, 1, 40)[:, None, None]
        pu = (1 - tt) ** 2 * start[0] + 2 * (1 - tt) * tt * ctrl[0] + tt ** 2 * apex[0]
        pv = (1 - tt) ** 2 * start[1] + 2 * (1 - tt) * tt * ctrl[1] + tt ** 2 * apex[1]
        d2 = np.min((u[None] - pu) ** 2 + (v[None] - pv) ** 2, axis=0)
        mask |= d2 < 0.024 ** 2
    if "tavr" in spec.devices:
        # A stent frame with its diamond lattice at the crux, between the atria below the LV base.
        cu = (heart.la_c[0] + heart.ra_c[0]) / 2 + 0.02
        cv = heart.la_c[1] - 0.02
        hw, hh, th = 0.065, 0.06, 0.028
        du, dv = np.abs(u - cu), np.abs(v - cv)
        inside = (du <= hw) & (dv <= hh)
        frame = inside & ((du > hw - th) | (dv > hh - th))
        period = 0.05
        lattice = inside & ((np.mod(u - cu + v - cv, period) < 0.018) | (np.mod(u - cu - v + cv, period) < 0.018))
        mask |= frame | lattice
    if spec.n_mitraclips:
        # Clips on the mitral leaflets at the LV base; they ride with the annulus.
        d = base_dist + 0.02
        cu, cv = heart.lv_c[0] + s * d, heart.lv_c[1] + c * d
        offsets = (0.0,) if spec.n_mitraclips == 1 else (-0.05, 0.05)
        for off in offsets:
            mask |= _ellipse(u, v, cu + c * off, cv - s * off, 0.042, 0.06, heart.lv_axis) <= 1
    return mask


def _box_blur(x: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """Separable mean filter with edge padding (cumulative sums: cheap at any kernel size)."""
    for axis, k in ((0, ky), (1, kx)):
        if k <= 1:
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (k // 2 + 1, k - 1 - k // 2)
        cs = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
        hi = np.take(cs, np.arange(k, cs.shape[axis]), axis=axis)
        lo = np.take(cs, np.arange(0, cs.shape[axis] - k), axis=axis)
        x = (hi - lo) / k
    return x


@dataclasses.dataclass
class Geometry:
    """The scan sector in pixels: apex (x, y), radius, half-angle, bounding box."""

    apex_x: float
    apex_y: float
    radius: float
    half_angle: float  # radians
    depth_cm: float

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive (x0, y0, x1, y1) of the sector."""
        half = self.radius * math.sin(self.half_angle)
        return (int(math.floor(self.apex_x - half)), int(math.floor(self.apex_y)),
                int(math.ceil(self.apex_x + half)), int(math.ceil(self.apex_y + self.radius)))


def _make_geometry(rng, layout: Layout) -> Geometry:
    r_max = layout.rows - layout.header - layout.ecg - 2
    return Geometry(apex_x=layout.cols / 2 + rng.uniform(-3, 3), apex_y=layout.header + 1.0,
                    radius=r_max * rng.uniform(0.94, 1.0), half_angle=math.radians(rng.uniform(38, 44)),
                    depth_cm=float(rng.uniform(14, 18)))


def _ecg_value(phase: np.ndarray) -> np.ndarray:
    """A PQRST complex per cycle with the R wave at phase 0 (end-diastole)."""
    d = np.mod(phase + 0.5, 1.0) - 0.5
    g = lambda mu, sd: np.exp(-0.5 * ((d - mu) / sd) ** 2)  # noqa: E731
    return g(0, 0.012) - 0.2 * g(0.03, 0.01) - 0.1 * g(-0.025, 0.008) + 0.3 * g(0.3, 0.045) + 0.15 * g(-0.15, 0.03)


def _overlay(spec: VideoSpec, layout: Layout, geo: Geometry, fan: np.ndarray, phase0: float):
    """Static burned-in graphics outside the sector, as (mask, RGB colour) images, and the ECG sweep."""
    img = Image.new("RGB", (layout.cols, layout.rows))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=layout.font_px)
    line = layout.font_px + 2
    white = (230, 230, 230)
    draw.text((3, 1), spec.phi["burned_name"], fill=white, font=font)
    draw.text((3, 1 + line), spec.phi["burned_id"], fill=white, font=font)
    for i, text in enumerate((f"HR {spec.heart_rate:.0f} {spec.fps:.0f}Hz", spec.phi["burned_date"])):
        draw.text((layout.cols - 3 - draw.textlength(text, font=font), 1 + i * line), text, fill=white, font=font)
    # A label in the bounding box's corner, beside the fan: cropping alone does not remove it.
    x0, y0, x1, y1 = geo.bbox
    draw.text((x0 + 1, y0 + 2), "A4C", fill=(200, 200, 120), font=font)
    px_per_cm = geo.radius / geo.depth_cm
    for cm in range(0, int(geo.depth_cm) + 1):  # depth ticks beside the fan (kept only outside it)
        y = geo.apex_y + cm * px_per_cm
        draw.line([(x1 - max(2, layout.font_px // 3), y), (x1, y)], fill=white)
    pixels = np.asarray(img).copy()
    pixels[fan] = 0
    # ECG: a static sweep of ~2.5 cycles across the band; the cursor moves frame by frame.
    band_top = layout.rows - layout.ecg
    xs = np.arange(layout.cols)
    sweep_s = 2.5 * 60.0 / spec.heart_rate
    amp = (layout.ecg - 4) * 0.7
    ys = band_top + layout.ecg * 0.72 - amp * _ecg_value(phase0 + xs / layout.cols * 2.5)
    ys = np.clip(np.round(ys).astype(int), band_top, layout.rows - 1)
    lo = np.minimum(ys, np.concatenate([ys[:1], ys[:-1]]))
    hi = np.maximum(ys, np.concatenate([ys[:1], ys[:-1]]))
    rows = np.arange(layout.rows)[:, None]
    trace = (rows >= lo[None] - (layout.font_px > 12)) & (rows <= hi[None])
    pixels[trace] = (70, 220, 70)
    return pixels, sweep_s


def render_video(spec: VideoSpec) -> tuple[np.ndarray, dict]:
    """Frames (T, H, W, 3) uint8 RGB and the per-video truth (geometry in pixels)."""
    layout = SMALL if spec.small else FULL
    rng = np.random.default_rng(list(spec.seed))
    geo = _make_geometry(rng, layout)
    heart = _make_heart(rng, _lv_scale(spec.ef))
    gain = float(rng.uniform(0.85, 1.15))
    phase0 = float(rng.uniform(0, 1))
    x0, y0, x1, y1 = geo.bbox
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    u, v = (xx - geo.apex_x) / geo.radius, (yy - geo.apex_y) / geo.radius
    r, ang = np.hypot(u, v), np.arctan2(u, v)
    fan_box = (r <= 1.0) & (np.abs(ang) <= geo.half_angle)
    fan = np.zeros((layout.rows, layout.cols), bool)
    fan[y0:y1 + 1, x0:x1 + 1] = fan_box
    overlay, sweep_s = _overlay(spec, layout, geo, fan, phase0)
    overlay_mask = overlay.any(-1)
    ecg_cursor_rows = slice(layout.rows - layout.ecg, layout.rows)
    depth_gain = (1.0 - 0.25 * v) * gain  # attenuation, partly compensated
    frames = np.zeros((spec.frames, layout.rows, layout.cols, 3), np.uint8)
    for i in range(spec.frames):
        t = i * spec.frame_time_ms / 1000.0
        phase = phase0 + t * spec.heart_rate / 60.0
        f = float(_volume_fraction(np.array(phase), spec.ef / 100.0))
        e, device = _echogenicity(u, v, heart, f, float(np.mod(phase, 1.0)), spec)
        speckle = 0.45 + 0.55 * rng.rayleigh(math.sqrt(2 / math.pi), size=e.shape)
        img = _box_blur(e * speckle * depth_gain * 255.0, *layout.speckle_blur)
        img += rng.normal(0, 2.0, size=img.shape)
        img[device] = 250.0 + rng.normal(0, 3.0, size=int(device.sum()))
        gray = np.where(fan_box, np.clip(img, 0, 255), 0).astype(np.uint8)
        frame = frames[i]
        frame[y0:y1 + 1, x0:x1 + 1] = gray[..., None]
        frame[overlay_mask] = overlay[overlay_mask]
        cursor = int((t % sweep_s) / sweep_s * layout.cols)
        frame[ecg_cursor_rows, cursor] = (255, 255, 255)
    truth = dict(
        sector_apex_x=round(geo.apex_x, 2), sector_apex_y=round(geo.apex_y, 2),
        sector_radius=round(geo.radius, 2), sector_half_angle_deg=round(math.degrees(geo.half_angle), 2),
        sector_x0=x0, sector_y0=y0, sector_x1=x1, sector_y1=y1, depth_cm=round(geo.depth_cm, 3),
        lv_center_x=round(geo.apex_x + heart.lv_c[0] * geo.radius, 2),
        lv_center_y=round(geo.apex_y + heart.lv_c[1] * geo.radius, 2),
        lv_ed_semi_across_px=round(heart.lv_a * geo.radius, 2),
        lv_ed_semi_along_px=round(heart.lv_b * geo.radius, 2),
        lv_axis_deg=round(math.degrees(heart.lv_axis), 3))
    return frames, truth


# ----------------------------------------------------------------------------------------------
# DICOM writing.
# ----------------------------------------------------------------------------------------------

def _regions(geo_truth: dict, layout: Layout, spec: VideoSpec) -> Sequence:
    tissue = Dataset()
    tissue.RegionSpatialFormat = 1  # 2D
    tissue.RegionDataType = 1  # tissue
    tissue.RegionFlags = 0
    tissue.RegionLocationMinX0 = geo_truth["sector_x0"]
    tissue.RegionLocationMinY0 = geo_truth["sector_y0"]
    tissue.RegionLocationMaxX1 = geo_truth["sector_x1"]
    tissue.RegionLocationMaxY1 = geo_truth["sector_y1"]
    tissue.ReferencePixelX0 = int(round(geo_truth["sector_apex_x"])) - geo_truth["sector_x0"]
    tissue.ReferencePixelY0 = 0
    tissue.PhysicalUnitsXDirection = 3  # cm
    tissue.PhysicalUnitsYDirection = 3
    delta = geo_truth["depth_cm"] / geo_truth["sector_radius"]
    tissue.PhysicalDeltaX = round(delta, 6)
    tissue.PhysicalDeltaY = round(delta, 6)
    ecg = Dataset()
    ecg.RegionSpatialFormat = 4  # waveform
    ecg.RegionDataType = 10  # ECG trace
    ecg.RegionFlags = 0
    ecg.RegionLocationMinX0 = 0
    ecg.RegionLocationMinY0 = layout.rows - layout.ecg
    ecg.RegionLocationMaxX1 = layout.cols - 1
    ecg.RegionLocationMaxY1 = layout.rows - 1
    ecg.PhysicalUnitsXDirection = 4  # seconds
    ecg.PhysicalUnitsYDirection = 0
    ecg.PhysicalDeltaX = round(2.5 * 60.0 / spec.heart_rate / layout.cols, 6)
    ecg.PhysicalDeltaY = 1.0
    return Sequence([tissue, ecg])


def _to_gray(frames: np.ndarray) -> np.ndarray:
    return np.round(frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=1)  # 4:2:2 = YBR_FULL_422
    return buf.getvalue()


def write_dicom(path: pathlib.Path, frames: np.ndarray, spec: VideoSpec, geo_truth: dict) -> None:
    layout = SMALL if spec.small else FULL
    phi = spec.phi
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = phi["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if spec.encoding == ENCODINGS[0] else ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "CARDIAC"]
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = phi["SOPInstanceUID"]
    ds.StudyInstanceUID = phi["StudyInstanceUID"]
    ds.SeriesInstanceUID = phi["SeriesInstanceUID"]
    for key in ("StudyDate", "SeriesDate", "ContentDate"):
        setattr(ds, key, phi["StudyDate"])
    for key in ("StudyTime", "SeriesTime", "ContentTime"):
        setattr(ds, key, phi["StudyTime"])
    ds.AcquisitionDateTime = phi["StudyDate"] + phi["StudyTime"]
    ds.AccessionNumber = phi["AccessionNumber"]
    ds.Modality = "US"
    ds.Manufacturer = "SYNTHECHO"
    ds.ManufacturerModelName = "PHANTOM A4C"
    ds.InstitutionName = phi["InstitutionName"]
    ds.InstitutionAddress = phi["InstitutionAddress"]
    ds.StationName = "ECHOLAB3"
    ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
    ds.OperatorsName = phi["OperatorsName"]
    ds.StudyDescription = "TTE COMPLETE"
    ds.SeriesDescription = "A4C"
    ds.PatientName = phi["PatientName"]
    ds.PatientID = phi["PatientID"]
    ds.PatientBirthDate = phi["PatientBirthDate"]
    ds.PatientSex = phi["PatientSex"]
    ds.PatientAge = phi["PatientAge"]
    ds.BodyPartExamined = "HEART"
    ds.HeartRate = int(round(spec.heart_rate))
    ds.FrameTime = f"{spec.frame_time_ms:.3f}"
    ds.CineRate = int(round(spec.fps))
    ds.RecommendedDisplayFrameRate = int(round(spec.fps))
    ds.EffectiveDuration = round(spec.frames * spec.frame_time_ms / 1000.0, 4)
    ds.StudyID = phi["StudyID"]
    ds.SeriesNumber = phi["SeriesNumber"]
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.NumberOfFrames = spec.frames
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # FrameTime
    ds.Rows, ds.Columns = layout.rows, layout.cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if spec.has_regions:
        ds.SequenceOfUltrasoundRegions = _regions(geo_truth, layout, spec)
    # A vendor private tag that repeats the patient's name, as some scanners do.
    ds.private_block(0x0009, "SYNTHECHO PRIVATE", create=True).add_new(0x01, "LO", phi["PatientName"])
    if spec.encoding == "monochrome2":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = _to_gray(frames).tobytes()
    else:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        if spec.encoding == "rgb":
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = frames.tobytes()
        else:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            ds.PixelData = encapsulate([_jpeg(f, 90) for f in frames])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _make_one(args: tuple[VideoSpec, str]) -> dict:
    spec, out_dir = args
    frames, geo_truth = render_video(spec)
    write_dicom(pathlib.Path(out_dir) / spec.path, frames, spec, geo_truth)
    return dict(
        path=spec.path, StudyInstanceUID=spec.phi["StudyInstanceUID"], patient=spec.patient,
        study_index=spec.study_index, study_day=spec.study_day, video_index=spec.video_index,
        ef=spec.ef, ef_definition=EF_DEFINITION, devices=";".join(spec.devices),
        pacemaker=int("pacemaker" in spec.devices), tavr=int("tavr" in spec.devices), mitraclip=int("mitraclip" in spec.devices),
        n_mitraclips=spec.n_mitraclips, lv_size=spec.lv_size, heart_rate=spec.heart_rate,
        fps=round(spec.fps, 4), frame_time_ms=spec.frame_time_ms, frames=spec.frames, rows=frames.shape[1],
        cols=frames.shape[2], encoding=spec.encoding, has_us_regions=int(spec.has_regions), **geo_truth)


# ----------------------------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# The cohort.
# ----------------------------------------------------------------------------------------------

_OUTPUTS = ("reports.csv", "reports_clinical.csv", "truth.csv", "phi.json", "cohort.json")


def generate(out_dir, patients: int, seed: int = 0, small: bool = False, workers: int = 1) -> dict:
    """Writes the cohort under `out_dir` (which must not already hold one); returns cohort.json's content."""
    out = pathlib.Path(out_dir)
    existing = [name for name in ("dicom", *_OUTPUTS) if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds a cohort ({', '.join(existing)}); choose an empty --out")
    videos, studies, phi = plan_cohort(patients, seed, small)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(out)) for spec in videos]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            truth = list(pool.map(_make_one, jobs, chunksize=4))
    else:
        truth = [_make_one(job) for job in jobs]
    with open(out / "truth.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(truth[0]))
        writer.writeheader()
        writer.writerows(truth)
    with open(out / "reports.csv", "w", newline="") as fh, open(out / "reports_clinical.csv", "w", newline="") as ch:
        writer, clinical = csv.writer(fh), csv.writer(ch)
        writer.writerow(["StudyInstanceUID", "AccessionNumber", "report"])
        clinical.writerow(["StudyInstanceUID", "report"])
        for study in studies:
            text, written = write_report(study)
            writer.writerow([study["StudyInstanceUID"], study["AccessionNumber"], text])
            clinical.writerow([study["StudyInstanceUID"], clinical_report(study)])
            for kind, values in written.items():
                phi.setdefault(kind, []).extend(values)
    phi = {k: sorted(set(v)) for k, v in phi.items()}
    all_phi = sorted({s for kind, values in phi.items() if kind != "report_numbers" for s in values})
    (out / "phi.json").write_text(json.dumps({"strings": all_phi, "by_field": phi}, indent=1) + "\n")
    summary = dict(patients=patients, seed=seed, small=small, studies=len(studies), videos=len(videos),
                   ef_definition=EF_DEFINITION, encodings={e: sum(v.encoding == e for v in videos) for e in ENCODINGS},
                   without_us_regions=sum(not v.has_regions for v in videos))
    (out / "cohort.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_phi(out_dir) -> list[str]:
    """Every fake PHI string of a cohort (names, ids, dates, UIDs, burned-in text) for privacy checks."""
    path = pathlib.Path(out_dir) / "phi.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no phi.json; is {out_dir} a cohort written by data_prep.synthetic?")
    return json.loads(path.read_text())["strings"]


def read_truth(out_dir) -> list[dict]:
    """truth.csv rows as dicts of strings."""
    path = pathlib.Path(out_dir) / "truth.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no truth.csv; is {out_dir} a cohort written by data_prep.synthetic?")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created; must not hold a cohort)")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="160x208 frames, 16-24 per video (fast tests)")
    parser.add_argument("--workers", type=int, default=1, help="processes (the output is the same for any)")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, args.patients, args.seed, args.small, args.workers)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
