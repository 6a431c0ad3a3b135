"""The synthetic cohort: real, decodable DICOM carrying fake PHI, and truths that the pixels bear out.

EF is measured from the decoded pixels (dark cavity inside the LV's known region, max/min area over the
frames), never taken from the generator's variables.
"""

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from data_prep import synthetic

PATIENTS, SEED = 6, 11


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = synthetic.generate(out, PATIENTS, seed=SEED, small=True)
    return out, summary


@pytest.fixture(scope="module")
def truth(cohort):
    return synthetic.read_truth(cohort[0])


def decode_cohort(out, truth) -> list[tuple]:
    """(truth row, DICOM dataset, pixel array, frames as float gray (T, H, W)) of every video of a cohort."""
    result = []
    for row in truth:
        ds = pydicom.dcmread(out / row["path"])
        pixels = ds.pixel_array
        gray = pixels.astype(np.float32).mean(-1) if pixels.ndim == 4 else pixels.astype(np.float32)
        result.append((row, ds, pixels, gray))
    return result


@pytest.fixture(scope="module")
def decoded(cohort, truth):
    return decode_cohort(cohort[0], truth)


def _fan(row, shape, pad=1):
    """The scan sector from the truth's geometry (apex, radius, half-angle), `pad` pixels wider."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    dx, dy = xx - float(row["sector_apex_x"]), yy - float(row["sector_apex_y"])
    r = np.hypot(dx, dy)
    return (r <= float(row["sector_radius"]) + pad) & (
        np.abs(np.arctan2(dx, dy)) <= math.radians(float(row["sector_half_angle_deg"])) + pad / np.maximum(r, 1)
    )


def _lv_region(row, shape, margin=1.1):
    """The LV's end-diastolic cavity ellipse, enlarged by `margin`: the region the cavity beats in."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    du, dv = xx - float(row["lv_center_x"]), yy - float(row["lv_center_y"])
    ang = math.radians(float(row["lv_axis_deg"]))
    along = du * math.sin(ang) + dv * math.cos(ang)
    across = du * math.cos(ang) - dv * math.sin(ang)
    return (
        (across / (margin * float(row["lv_ed_semi_across_px"]))) ** 2
        + (along / (margin * float(row["lv_ed_semi_along_px"]))) ** 2
    ) <= 1


def test_cohort_layout_and_counts(cohort, truth):
    out, summary = cohort
    assert summary["videos"] == len(truth) == len(list((out / "dicom").rglob("*.dcm")))
    assert summary["encodings"]["jpeg_ybr_full_422"] > len(truth) / 2  # most files are JPEG
    assert all(summary["encodings"][e] >= 1 for e in synthetic.ENCODINGS)
    assert 1 <= summary["without_us_regions"] < len(truth) / 3
    studies = {(r["patient"], r["StudyInstanceUID"]) for r in truth}
    assert len({p for p, _ in studies}) == PATIENTS
    assert len(studies) > PATIENTS  # several studies for some patients
    assert max(sum(r["StudyInstanceUID"] == s for r in truth) for _, s in studies) >= 2
    efs = [int(r["ef"]) for r in truth]
    assert all(10 <= e <= 80 for e in efs)
    assert all(r["ef_definition"] == synthetic.EF_DEFINITION for r in truth)
    for r in truth:  # paths carry no PHI
        assert pathlib.PurePosixPath(r["path"]).parts[0] == "dicom"


def test_dicoms_open_and_decode_for_every_encoding(decoded):
    syntax = {
        "jpeg_ybr_full_422": pydicom.uid.JPEGBaseline8Bit,
        "rgb": pydicom.uid.ExplicitVRLittleEndian,
        "monochrome2": pydicom.uid.ExplicitVRLittleEndian,
    }
    photometric = {"jpeg_ybr_full_422": "YBR_FULL_422", "rgb": "RGB", "monochrome2": "MONOCHROME2"}
    for row, ds, pixels, _ in decoded:
        assert ds.SOPClassUID == pydicom.uid.UltrasoundMultiFrameImageStorage
        assert ds.file_meta.TransferSyntaxUID == syntax[row["encoding"]]
        assert ds.PhotometricInterpretation == photometric[row["encoding"]]
        assert ds.Modality == "US"
        frames, rows, cols = int(row["frames"]), int(row["rows"]), int(row["cols"])
        assert 16 <= frames <= 24 and (rows, cols) == (160, 208)
        expected = (frames, rows, cols) + ((3,) if row["encoding"] != "monochrome2" else ())
        assert pixels.shape == expected and pixels.dtype == np.uint8
        assert float(ds.FrameTime) == pytest.approx(1000.0 / float(row["fps"]), abs=1e-3)
        assert int(ds.CineRate) == round(float(row["fps"]))
        assert ds.FrameIncrementPointer == pydicom.tag.Tag(0x0018, 0x1063)
        # Every video spans more than one cardiac cycle, so both end-diastole and end-systole are in it.
        assert frames / float(row["fps"]) >= 60.0 / float(row["heart_rate"])


def test_jpeg_decodes_to_the_rendered_frames(cohort, decoded):
    videos, _, _ = synthetic.plan_cohort(PATIENTS, SEED, small=True)
    by_path = {v.path: v for v in videos}
    checked = set()
    for row, _, pixels, _ in decoded:
        if row["encoding"] in checked:
            continue
        rendered, _ = synthetic.render_video(by_path[row["path"]])
        if row["encoding"] == "rgb":
            np.testing.assert_array_equal(pixels, rendered)
        elif row["encoding"] == "monochrome2":
            luma = rendered.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
            np.testing.assert_allclose(pixels, luma, atol=1)
        else:  # lossy, but close
            assert np.abs(pixels.astype(np.float32) - rendered).mean() < 4.0
        checked.add(row["encoding"])
    assert checked == set(synthetic.ENCODINGS)


def test_headers_carry_fake_phi_and_regions(cohort, decoded):
    phi = set(synthetic.read_phi(cohort[0]))
    for row, ds, pixels, _ in decoded:
        for keyword in (
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "InstitutionName",
            "StudyDate",
            "StudyInstanceUID",
            "SOPInstanceUID",
        ):
            value = str(ds.data_element(keyword).value)
            assert value and value in phi, keyword
        assert str(ds.PatientName) in phi
        private = ds.private_block(0x0009, "SYNTHECHO PRIVATE")
        assert str(private[0x01].value) == str(ds.PatientName)
        assert ds.BurnedInAnnotation == "YES"
        has = "SequenceOfUltrasoundRegions" in ds
        assert has == bool(int(row["has_us_regions"]))
        if has:
            tissue = [r for r in ds.SequenceOfUltrasoundRegions if r.RegionDataType == 1]
            assert len(tissue) == 1
            t = tissue[0]
            assert (t.RegionLocationMinX0, t.RegionLocationMinY0, t.RegionLocationMaxX1, t.RegionLocationMaxY1) == (
                int(row["sector_x0"]),
                int(row["sector_y0"]),
                int(row["sector_x1"]),
                int(row["sector_y1"]),
            )
            assert t.PhysicalUnitsXDirection == 3 and 0.05 < float(t.PhysicalDeltaX) < 0.3
            assert float(t.PhysicalDeltaX) == pytest.approx(float(t.PhysicalDeltaY))
    assert any(not int(r["has_us_regions"]) for r, *_ in decoded)


def test_burned_in_text_is_outside_the_sector_and_patient_specific(decoded):
    headers = {}
    for row, ds, _, gray in decoded:
        fan = _fan(row, gray.shape[1:])
        text = gray[:, : int(row["sector_y0"])] > 128
        assert text[0].sum() > 150, "no burned-in header text"
        assert (text == text[0]).mean() > 0.99, "burned-in text should be static"
        # Beside the fan inside the sector's box (labels, depth ticks): static too; the fan itself moves.
        box = np.zeros_like(fan)
        box[int(row["sector_y0"]) : int(row["sector_y1"]) + 1, int(row["sector_x0"]) : int(row["sector_x1"]) + 1] = True
        beside = box & ~_fan(row, gray.shape[1:], pad=2)
        assert gray[:, beside].max() > 128 and np.abs(gray[:, beside] - gray[0, beside]).max() < 40
        assert np.abs(gray[:, fan] - gray[0, fan]).mean() > 5
        # The ECG trace in the bottom band beats: a bright trace in every column of it.
        ecg = gray[0, -16:] > 60
        assert ecg.any(0).mean() > 0.95
        left = text[0][:, :100]  # name and id
        headers.setdefault(row["patient"], []).append(left)
    patients = sorted(headers)
    for p in patients:  # same patient: same name/id text (up to JPEG edge noise)
        assert all((h != headers[p][0]).mean() < 0.02 for h in headers[p])
    for p, q in zip(patients, patients[1:]):  # different patients: different text
        assert (headers[p][0] != headers[q][0]).mean() > 0.05


def test_ef_measured_from_pixels_matches_truth(decoded):
    errors = []
    for row, _, _, gray in decoded:
        region = _lv_region(row, gray.shape[1:])
        dark = ndimage.uniform_filter(gray, size=(1, 3, 3)) < 60
        areas = (dark & region).sum((1, 2))
        assert areas.min() > 0
        measured = 100.0 * (areas.max() - areas.min()) / areas.max()
        errors.append(measured - float(row["ef"]))
    errors = np.abs(errors)
    assert errors.max() <= 5.0, errors
    assert errors.mean() <= 2.5, errors


def test_reduced_ef_hearts_are_dilated_in_every_frame(decoded):
    """EF must be partly visible in one frame (training sees one frame): low-EF cavities are larger."""
    mean_area, ef_area = {}, []
    for row, _, _, gray in decoded:
        region = _lv_region(row, gray.shape[1:])
        dark = ndimage.uniform_filter(gray, size=(1, 3, 3)) < 60
        area = (dark & region).sum((1, 2)).mean() / region.sum()
        mean_area.setdefault(float(row["ef"]) < 40, []).append(area)
        ef_area.append((float(row["ef"]), area))
    assert mean_area[True] and mean_area[False]
    assert np.median(mean_area[True]) > 1.1 * np.median(mean_area[False])
    # Over the whole range, not only for dilated hearts: the cavity in any frame shrinks as EF rises.
    ef, area = np.array(ef_area).T
    rank = lambda x: np.argsort(np.argsort(x))
    assert np.corrcoef(rank(ef), rank(area))[0, 1] < -0.6


def test_devices_are_bright_and_sizeable(decoded):
    for row, _, _, gray in decoded:
        fan = _fan(row, gray.shape[1:])
        bright = ((ndimage.uniform_filter(gray, size=(1, 3, 3)) >= 235) & fan).sum((1, 2)).mean()
        if row["devices"]:
            assert bright >= 25, (row["devices"], bright)
        else:
            assert bright <= 5, bright


def test_reports_are_consistent_with_truth(cohort, truth, decoded):
    with open(cohort[0] / "reports.csv", newline="") as fh:
        reports = list(csv.DictReader(fh))
    assert set(reports[0]) == {"StudyInstanceUID", "AccessionNumber", "report"}
    by_study = {r["StudyInstanceUID"]: r for r in reports}
    assert set(by_study) == {r["StudyInstanceUID"] for r in truth}
    accession = {ds.StudyInstanceUID: ds.AccessionNumber for _, ds, _, _ in decoded}
    stated = {"size": 0, "grade": 0}
    with open(cohort[0] / "reports_clinical.csv", newline="") as fh:
        clinical = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(fh)}
    for uid, videos in _group(truth, "StudyInstanceUID").items():
        report = clinical[uid]  # the clinical text; reports.csv wraps it in identifiers
        assert report in by_study[uid]["report"]
        assert by_study[uid]["AccessionNumber"] == accession[uid]
        assert report == report.upper()
        assert len({v["ef"] for v in videos}) == 1 and len({v["devices"] for v in videos}) == 1
        v = videos[0]
        ef_numbers = [int(x) for x in _numbers_after(report, ("LV EJECTION FRACTION IS ", "ESTIMATED TO BE "))]
        assert ef_numbers == [int(v["ef"])]
        assert ("PACER LEAD" in report) == bool(int(v["pacemaker"]))
        assert ("STENT-VALVE IS PRESENT IN THE AORTIC POSITION" in report) == bool(int(v["tavr"]))
        assert ("TWO MITRACLIPS" in report) == (v["n_mitraclips"] == "2")
        assert ("ONE MITRACLIP " in report) == (v["n_mitraclips"] == "1")
        # The size and systolic grade, when stated, agree with the truth; no other grade is ever stated.
        size = v["lv_size"].upper()
        size_phrase = "NORMAL LEFT VENTRICULAR SIZE." if size == "NORMAL" else f"{size} DILATED LEFT VENTRICLE."
        others = {"NORMAL LEFT VENTRICULAR SIZE."} | {
            f"{s.upper()} DILATED LEFT VENTRICLE." for s in synthetic.LV_SIZES
        }
        assert not [p for p in others - {size_phrase} if p in report]
        grades = {synthetic.systolic_function(ef) for ef in (80, 60, 50, 40, 20)}
        assert [g for g in grades if g in report] in ([], [synthetic.systolic_function(int(v["ef"]))])
        stated["size"] += size_phrase in report
        stated["grade"] += synthetic.systolic_function(int(v["ef"])) in report
        assert "NO SIGNIFICANT VALVULAR HEART DISEASE" not in report or not (int(v["tavr"]) or int(v["mitraclip"]))
    # Some reports give only the EF number for LV function: its digits must carry the meaning themselves.
    n = len(_group(truth, "StudyInstanceUID"))
    assert 0 < stated["size"] < n and 0 < stated["grade"] < n, (stated, n)


def test_plan_covers_findings_and_clinical_change():
    videos, studies, _ = synthetic.plan_cohort(200, 0, small=True)
    efs = np.array([s["ef"] for s in studies])
    assert efs.min() < 25 and efs.max() > 70 and ((efs >= 50) & (efs <= 70)).mean() > 0.4
    assert {s["lv_size"] for s in studies} == set(synthetic.LV_SIZES)
    for device in synthetic.DEVICES:
        with_device = sum(device in s["devices"] for s in studies)
        assert 0.05 * len(studies) < with_device < 0.5 * len(studies), device
    # Some patients gain a device in a later study (clinical change); a device never disappears.
    gained = 0
    for patient, rows in _group(studies, "patient").items():
        sets = [set(s["devices"]) for s in rows]
        assert all(a <= b for a, b in zip(sets, sets[1:])), patient
        gained += sets[0] != sets[-1]
    assert gained >= 5
    days = [v.study_day for v in videos if v.study_index == 1]
    assert days and min(days) >= 30


def _group(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _numbers_after(text, prefixes):
    found = []
    for prefix in prefixes:
        start = 0
        while (i := text.find(prefix, start)) >= 0:
            j = i + len(prefix)
            digits = ""
            while j < len(text) and text[j].isdigit():
                digits += text[j]
                j += 1
            found.append(digits)
            start = j
    return found


def test_phi_json_lists_what_was_written(cohort, decoded):
    phi = json.loads((cohort[0] / "phi.json").read_text())
    fields = phi["by_field"]
    assert {str(ds.PatientName) for _, ds, _, _ in decoded} == set(fields["PatientName"])
    burned = set(fields["burned_in"])
    for _, ds, _, _ in decoded:
        last, first = str(ds.PatientName).split("^")
        assert f"{last}, {first}" in burned and ds.PatientID in burned
    # Truth and the clinical reports are PHI-free apart from the study keys the pipeline joins on.
    names = set(fields["PatientName"]) | set(fields["PatientID"]) | set(fields["PatientBirthDate"])
    in_reports = {s for k, v in fields.items() if k.startswith("report_") for s in v}
    for name in ("reports_clinical.csv", "truth.csv"):
        text = (cohort[0] / name).read_text().upper()
        assert not any(s.upper() in text for s in names | in_reports)
        assert not any(s.split("^")[0] in text for s in fields["PatientName"])
    # The hospital's reports carry identifiers of every kind around that clinical text, as real ones do.
    reports = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(open(cohort[0] / "reports.csv"))}
    clinical = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(open(cohort[0] / "reports_clinical.csv"))}
    assert reports.keys() == clinical.keys() and all(clinical[k] in reports[k] for k in reports)
    text = " ".join(reports.values()).upper()
    for kind in ("report_header_values", "report_staff", "report_dates", "report_contact", "report_numbers"):
        assert fields[kind] and all(s.upper() in text for s in fields[kind]), kind
    assert set(fields["report_numbers"]).isdisjoint(phi["strings"])  # bare numbers: looked for in text only
    header_names = {
        w
        for s in fields["PatientName"] + fields["ReferringPhysicianName"] + fields["OperatorsName"]
        for w in s.split("^")
        if w
    }
    assert set(fields["report_staff"]).isdisjoint(header_names)  # names that no header reveals


def test_same_seed_same_bytes_any_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.generate(a, 2, seed=5, small=True)
    synthetic.generate(b, 2, seed=5, small=True, workers=2)
    synthetic.generate(c, 2, seed=6, small=True)
    for name in ("truth.csv", "reports.csv", "phi.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    files = sorted(p.relative_to(a) for p in a.rglob("*.dcm"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.dcm"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--patients", "1", "--seed", "2", "--small"]) == 0
    assert json.loads(capsys.readouterr().out)["patients"] == 1
    assert synthetic.main(["--out", str(out), "--patients", "1", "--small"]) == 1  # a failed run: exit 1
    err = capsys.readouterr().err
    assert err.startswith("data_prep.synthetic: error: ") and str(out) in err
    with pytest.raises(ValueError, match="--patients"):
        synthetic.plan_cohort(0, 0, True)
    with pytest.raises(FileNotFoundError, match="phi.json"):
        synthetic.read_phi(tmp_path)


def test_imports_without_jax():
    code = "import sys, data_prep.synthetic; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_full_size_video(tmp_path):
    synthetic.generate(tmp_path, 1, seed=0, small=False)
    row = synthetic.read_truth(tmp_path)[0]
    ds = pydicom.dcmread(tmp_path / row["path"])
    assert (ds.Rows, ds.Columns) == (600, 800) and 30 <= int(ds.NumberOfFrames) <= 100
    assert ds.pixel_array.shape[:3] == (int(ds.NumberOfFrames), 600, 800)
