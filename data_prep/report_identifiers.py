"""A study's own identifiers, read from its DICOM header, as patterns to remove from its report.

`identifiers_from_dataset` takes the patient name and its parts, patient ids, accession, institution name and
address, and every physician and operator name field; `header_patterns` turns them into regexes matched case-
and punctuation-insensitively (`report_detectors.loose`). A name part that is also an echo or common English
word ("WALL", "YOUNG": COMMON_WORDS) is removed only where it stands as a name (beside another part of that
name, or after a title). The word sets here serve `data_prep.report_deid`'s patterns too.
"""

from __future__ import annotations

import re
from typing import Sequence

from data_prep.report_detectors import loose, word

_NAME_FIELDS = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "ConsultingPhysicianName",
    "ResponsiblePerson",
)
_ID_FIELDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator")
_TEXT_FIELDS = (
    ("InstitutionName", "institution"),
    ("InstitutionalDepartmentName", "institution"),
    ("InstitutionAddress", "address"),
    ("PatientAddress", "address"),
    ("PatientTelephoneNumbers", "phone"),
)


def _values(ds, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def identifiers_from_dataset(ds) -> tuple[tuple[str, str], ...]:
    """(category, value) pairs of a DICOM header's identifying fields, for de-identifying its study's report.

    Person names keep DICOM's `^`-separated components so their parts can be matched one by one."""
    found = []
    for keyword in _NAME_FIELDS:
        found += [("name", v) for v in _values(ds, keyword)]
    for keyword in _ID_FIELDS:
        found += [("id", v) for v in _values(ds, keyword)]
    for item in ds.get("OtherPatientIDsSequence") or []:
        found += [("id", v) for v in _values(item, "PatientID")]
    for keyword, category in _TEXT_FIELDS:
        found += [(category, v) for v in _values(ds, keyword)]
    return tuple(dict.fromkeys(found))


# Words that are never removed on their own as a header name part (they are echo or everyday words), and at
# which a name taken after a cue stops. Upper case.
COMMON_WORDS = frozenset(
    """
A ABNORMAL ABOVE ABSENT ACROSS ADEQUATE AFTER AKINESIS AKINETIC ALL ALSO AN ANALYSIS AND ANEURYSM ANTERIOR
AORTA AORTIC APEX APICAL APPEARANCE APPEARS ARE AREA ARREST ARTERY AS ASD AT ATRIAL ATRIUM BASAL BE BEAT
BELOW BICUSPID BIOPROSTHETIC BLOOD BODY BORDERLINE BUT BY CALCIFICATION CALCIFIED CAP CARDIAC CARDIOMYOPATHY
CATHETER CAVA CAVITY CHAMBER CHEST CLIP CLOSE COLLAPSE COLOR COMPARED CONCENTRIC CONSISTENT CONTRAST CORONARY
DATE DENSE DENSITY DEPRESSED DIAMETER DIASTOLIC DILATED DIMENSION DISEASE DOPPLER DUE DURING DYSFUNCTION
EARLY ECHO EFFUSION EJECTION ELEVATED END ENLARGED ENTIRE ESTIMATED EVIDENCE EXAM FAIR FALSE FILLING FINAL
FINDINGS FLOW FOR FRACTION FREE FROM FUNCTION GLOBAL GOOD GRADE GRADIENT GREAT HEART HIGH HOLLOW
HYPERDYNAMIC HYPERTENSION HYPERTROPHY HYPOKINESIS IMAGE IMAGES IMPELLA IMPRESSION IN INFERIOR INFEROLATERAL
INLET INTERATRIAL IS IT ITS IVC JUNIOR KING LAB LARGE LATE LATERAL LEAD LEAFLET LEAFLETS LEFT LESS LIMITED
LONG LOW MASS MAY MEAN MEDIAL MID MILD MITRAL MITRACLIP MODERATE MORE MORPHOLOGY MOTION MUSCLE NEAR NO
NORMAL NOT NOTE OF ON OR OTHER OUTFLOW PA PACER PACEMAKER PAPILLARY PATIENT PATTERN PEAK PERICARDIAL
PERICARDIUM PHYSICIAN PLEURAL POOR POSITION POSTERIOR PRESENT PRESSURE PRIOR PROCEDURE PROSTHESIS
PROSTHETIC PULMONARY PULMONIC QUALITY RATE RATIO READ REGURGITATION REPAIR REPLACEMENT REPORT REST RESTING
RIGHT RING ROOT RV RHYTHM SAME SCORE SEEN SEGMENT SEGMENTS SEPTAL SEPTUM SEVERE SHORT SHUNT SIGNIFICANT SINUS
SIZE SMALL STENOSIS STENT STRAIN STRESS STUDY SUGGESTIVE SYSTOLIC TAVR THAN THE THERE THICKNESS THIS
THROMBUS TO TOTAL TRACE TRANSMITRAL TRANSAORTIC TRICUSPID TRIVIAL UNCHANGED UPPER VALVE VALVULAR VEIN VENA
VENTRICLE VENTRICULAR VIEW VIEWS WALL WALLS WAS WELL WHITE WITH WITHIN WITHOUT YOUNG
ANSWERING AWARE CALLED CARE CLINICAL COMMUNICATED CONTACTED DISCUSSED FOLLOW HISTORY INFORMED LEFT MADE
NOTIFIED OFFICE PAGED PHONE RESULTS SERVICE STAFF TEAM TEST TESTING TEE TTE MRI CMR CT ECG EKG CATH TELEPHONE
ULTRASOUND IMAGING ANGIOGRAPHY INDICATION INDICATIONS COMMENTS CONCLUSION CONCLUSIONS SUMMARY RECOMMEND
RECOMMENDED CONSIDER REPEAT RECOMMENDATION DOBUTAMINE EXERCISE PROTOCOL SECONDARY RHEUMATIC JET SEVERITY
EF LV RV LA RA TR MR AR PR AS MS PS TS IVC LVEF LVOT RVOT TAPSE RVSP PASP VTI AV MV TV PV ICD CRT LAA ASD VSD
PFO TAVI SAVR AVR MVR BPM MMHG CM MM ML
""".split()
)
MONTHS = (
    "JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|APR(?:IL)?|MAY|JUNE?|JULY?|AUG(?:UST)?|SEPT?(?:EMBER)?|"
    "OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?"
)
MONTH_WORDS = frozenset(re.findall(r"[A-Z]+", MONTHS.replace("(?:", "")))
TITLES = frozenset({"DR", "DOCTOR", "MR", "MRS", "MS", "MISS", "PROF", "PROFESSOR"})
CREDENTIALS = frozenset(
    {
        "MD",
        "DO",
        "PHD",
        "RDCS",
        "RCS",
        "RVT",
        "RDMS",
        "FACC",
        "FASE",
        "FRCP",
        "MBBS",
        "RN",
        "NP",
        "PA-C",
        "MSC",
        "JR",
        "SR",
        "II",
        "III",
    }
)
_INSTITUTION_WORDS = frozenset(
    {
        "SAINT",
        "ST",
        "HOSPITAL",
        "MEDICAL",
        "CENTER",
        "CENTRE",
        "HEART",
        "CARDIAC",
        "INSTITUTE",
        "UNIVERSITY",
        "MEMORIAL",
        "GENERAL",
        "CLINIC",
        "HEALTH",
        "REGIONAL",
        "COMMUNITY",
        "CHILDREN",
        "CHILDRENS",
        "VALLEY",
        "COUNTY",
        "OF",
        "THE",
        "AND",
    }
)


def header_patterns(identifiers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(regex, category) for one study's header identifiers, longest forms first."""
    out = []
    for category, value in identifiers:
        if category == "name":
            parts = [p for p in (re.findall(r"[A-Za-z][A-Za-z'\-]*", c) for c in value.split("^")[:3]) if p]
            words = [w for p in parts for w in p]
            if len(parts) >= 2:  # family^given[^middle]: both orders, with or without the middle name
                family, given = " ".join(parts[0]), " ".join(parts[1])
                forms = {f"{given} {family}", f"{family} {given}"}
                if len(parts) > 2:
                    forms |= {f"{given} {' '.join(parts[2])} {family}", f"{family} {given} {' '.join(parts[2])}"}
                out += [(word(loose(f)), "name") for f in sorted(forms, key=len, reverse=True)]
            titles = "DR|DOCTOR|MRS|MISS|PROF|PROFESSOR"
            for w in words:
                if len(w) < 2 or w.upper() in TITLES or w.upper() in CREDENTIALS:
                    continue
                if w.upper() in COMMON_WORDS or w.upper() in MONTH_WORDS:  # only as a name: after a title
                    out.append((word(rf"(?:{titles})\.?\s+{loose(w)}"), "name"))
                else:
                    out.append((word(loose(w)), "name"))
        elif category == "id":
            alnum = re.sub(r"[\W_]", "", value)
            if len(alnum) >= 5:
                out.append((word(loose(value)), "id"))
                out += [(rf"(?<!\d){d}(?!\d)", "id") for d in re.findall(r"\d{5,}", value)]
        elif category in ("institution", "address"):
            if len(value) >= 4:
                out.append((word(loose(value)), category))
                for part in re.split(r"\s*,\s*", value):  # "1200 HARBOR BLVD, PORT ELSEWHERE": each part too
                    if part != value and len(part) >= 4 and part.upper() not in COMMON_WORDS:
                        out.append((word(loose(part)), category))
                if category == "institution":  # its distinctive words ("ELSEWHERE" of "SAINT ELSEWHERE ...")
                    for w in re.findall(r"[A-Za-z]{4,}", value):
                        if w.upper() not in COMMON_WORDS and w.upper() not in _INSTITUTION_WORDS:
                            out.append((word(re.escape(w)), category))
        elif category == "phone":
            digits = re.sub(r"\D", "", value)
            if len(digits) >= 7:
                out.append((r"[\W_]*".join(digits), "phone"))
    return out
