"""The synthetic cohort's reports: clinical text consistent with the truth, wrapped in fake identifiers.

A study's report is `clinical_report(study)` (EchoCLIP-style template sentences: EF, systolic grade, LV
size, rhythm, devices, filler) with a header line and a sign-off around it, as hospital reports have:
the patient's name, record number, birth date and accession (the values its DICOM headers carry), the
referring physician and sonographer of the headers, a reading cardiologist and a transcriptionist who are
in no header, study dates and times in several formats, the lab's phone, fax, e-mail and address, the
patient's home address, a portal URL, and now and then an age over 89. `report_phi` returns every such
string so the privacy tests can look for it in every output; the clinical text is drawn from its own
random stream, so the identifiers never change what the report says about the heart.
"""

from __future__ import annotations

import datetime

import numpy as np

from data_prep.synthetic.reports_v2 import clinical_report_v2

REPORT_GRADE_PROB = 0.5  # chance that a report states the LV size (and, separately, the systolic grade)

_FILLER = (
    "NORMAL PERICARDIUM WITH NO PERICARDIAL EFFUSION.",
    "NORMAL APPEARANCE OF THE TRICUSPID VALVE.",
    "NORMAL LEFT ATRIAL SIZE AND MORPHOLOGY.",
    "NORMAL RIGHT ATRIAL SIZE AND MORPHOLOGY.",
    "NORMAL RIGHT VENTRICULAR SYSTOLIC FUNCTION.",
    "NORMAL LEFT VENTRICULAR WALL THICKNESS.",
)
# Invented staff (no real person, in no DICOM header): only the report reveals them.
_STAFF_LAST = (
    "ABERCRANTZ",
    "BELLWETHAM",
    "CRANSHOLT",
    "DORVENTINE",
    "EMBERLIGHT",
    "FROSTHAVEN",
    "GRIMSWALD",
    "HAVERSTOCK",
)
_STAFF_FIRST = ("ANSELMO", "BRUNHILDA", "CASSIAN", "DORINDA", "EULALIA", "FABRIZIO", "GWENDOLYN", "HORATIO")
_STREETS = (
    ("14", "QUINCEWOOD LANE"),
    ("382", "ORCHARDVALE ROAD"),
    ("9", "TAMBERLY COURT"),
    ("1507", "WILLOWMERE AVENUE"),
)
_TOWNS = (("FENWICK FALLS", "MA", "01867"), ("BRIARSTONE", "CA", "94115"), ("OLDCASTLE", "NY", "10023"))
_DOMAINS = ("elsewhereheart.org", "meridianvalley.org", "northgate-hospital.org", "lakeshorememorial.org")
_MONTH_NAMES = (
    "JANUARY",
    "FEBRUARY",
    "MARCH",
    "APRIL",
    "MAY",
    "JUNE",
    "JULY",
    "AUGUST",
    "SEPTEMBER",
    "OCTOBER",
    "NOVEMBER",
    "DECEMBER",
)


def systolic_function(ef: int) -> str:
    """The report's grade of LV systolic function for an EF (percent)."""
    if ef >= 70:
        return "THERE IS HYPERDYNAMIC LEFT VENTRICULAR SYSTOLIC FUNCTION."
    if ef >= 55:
        return "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION."
    grade = "MILD" if ef >= 45 else "MODERATE" if ef >= 30 else "SEVERE"
    return f"{grade} DEPRESSED LEFT VENTRICULAR SYSTOLIC FUNCTION."


def clinical_report(study: dict) -> str:
    """The report's clinical text (upper case, template phrases), consistent with the study's truth.
    Version-2 studies get data_prep.synthetic.reports_v2's wording instead."""
    if study.get("version", 1) == 2:
        return clinical_report_v2(study)[0]
    rng = np.random.default_rng(list(study["report_seed"]) + [7])
    parts = []
    if "tavr" in study["devices"]:
        parts.append("A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION.")
    hr = study["heart_rate"]
    rhythm = "SINUS BRADYCARDIA" if hr < 60 else "SINUS TACHYCARDIA" if hr > 100 else "NORMAL SINUS RHYTHM"
    parts.append(f"THE PATIENT IS IN {rhythm} DURING THE STUDY.")
    # Like real reports, many give the EF number without the size or systolic grade: the number alone must
    # carry what the pixels show, so a model learns what the digits mean (zero-shot EF prompts hold only them).
    size = study["lv_size"]
    if rng.random() < REPORT_GRADE_PROB:
        parts.append("NORMAL LEFT VENTRICULAR SIZE." if size == "normal" else f"{size.upper()} DILATED LEFT VENTRICLE.")
    if rng.random() < REPORT_GRADE_PROB:
        parts.append(systolic_function(study["ef"]))
    ef = study["ef"]
    parts.append(
        f"LV EJECTION FRACTION IS {ef}%."
        if rng.random() < 0.6
        else f"THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE {ef}%."
    )
    if study["n_mitraclips"] == 1:
        parts.append("ONE MITRACLIP IS SEEN ON THE ANTERIOR AND POSTERIOR LEAFLETS OF THE MITRAL VALVE.")
    elif study["n_mitraclips"] == 2:
        parts.append("TWO MITRACLIPS ARE SEEN ON THE ANTERIOR AND POSTERIOR LEAFLETS OF THE MITRAL VALVE.")
    parts.append("NORMAL RIGHT VENTRICULAR SIZE.")
    if "pacemaker" in study["devices"]:
        parts.append("ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.")
    parts += [p for p in _FILLER if rng.random() < 0.5]
    if not {"tavr", "mitraclip"} & set(study["devices"]) and rng.random() < 0.5:
        parts.append("THERE IS NO SIGNIFICANT VALVULAR HEART DISEASE.")
    parts.append("THE STUDY IMAGES ARE OF TECHNICALLY ADEQUATE QUALITY.")
    return " ".join(parts)


def _date(value: str) -> datetime.date:
    return datetime.datetime.strptime(value, "%Y%m%d").date()


def _date_formats(d: datetime.date) -> tuple[str, ...]:
    return (
        d.strftime("%m/%d/%Y"),
        d.strftime("%Y-%m-%d"),
        f"{_MONTH_NAMES[d.month - 1]} {d.day}, {d.year}",
        d.strftime("%d.%m.%Y"),
        f"{d.month}/{d.day}/{d.strftime('%y')}",
        f"{d.day} {_MONTH_NAMES[d.month - 1]} {d.year}",
    )


def _person(name: str) -> tuple[str, str]:
    """DICOM PN `LAST^FIRST[^...]` -> (last, first)."""
    parts = name.split("^") + [""]
    return parts[0], parts[1]


def report_phi(study: dict) -> tuple[str, str, dict[str, list[str]]]:
    """(header line, sign-off, {kind: identifying strings written}) for one study; deterministic."""
    rng = np.random.default_rng(list(study["report_seed"]) + [11])
    phi = study["phi"]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    last, first = _person(phi["PatientName"])
    ref_last, ref_first = _person(phi["ReferringPhysicianName"])
    op_last, op_first = _person(phi["OperatorsName"])
    reader = (pick(_STAFF_FIRST), pick(_STAFF_LAST))
    typist = (pick(_STAFF_FIRST), pick(_STAFF_LAST))
    study_date, dob = _date(phi["StudyDate"]), _date(phi["PatientBirthDate"])
    when, born = pick(_date_formats(study_date)), pick(_date_formats(dob))
    time = f"{phi['StudyTime'][:2]}:{phi['StudyTime'][2:4]}"
    pid, acc = phi["PatientID"], phi["AccessionNumber"]
    domain = pick(_DOMAINS)
    phone = f"({int(rng.integers(201, 990))}) 555-{int(rng.integers(100, 200)):04d}"
    fax = f"{int(rng.integers(201, 990))}.555.{int(rng.integers(100, 200)):04d}"
    email = f"{reader[0].lower()}.{reader[1].lower()}@{domain}"
    number, street = pick(_STREETS)
    town, state, zipcode = pick(_TOWNS)
    home = f"{number} {street}, {town}, {state} {zipcode}"
    url = f"https://portal.{domain}/echo/{acc.lower()}"
    age = (study_date - dob).days // 365
    head = pick(
        (
            f"PATIENT: {last}, {first}   MRN: {pid}   DOB: {born}   ACCESSION: {acc}   STUDY DATE: {when} {time}",
            f"Name: {first.title()} {last.title()} ({pid}). Exam date {when}, {time}. Acc# {acc}.",
            f"{first} {last}, DOB {born}, MR# {pid.replace('MRN', '')}. REFERRING PHYSICIAN: DR. {ref_last}.",
            f"ECHO REPORT {acc} FOR {last}, {first} ON {when}. Referred by Dr. {ref_first.title()} {ref_last.title()}.",
        )
    )
    if age > 89:
        head += f" {age} YEAR OLD PATIENT."
    tail = [
        pick(
            (
                f"ELECTRONICALLY SIGNED BY {reader[0]} {reader[1]}, MD ON {when} AT {time}.",
                f"Dictated by: Dr. {reader[1].title()}. Transcribed by {typist[0].title()} {typist[1].title()} {when}.",
                f"READING PHYSICIAN: {reader[1]}, {reader[0]} MD FACC. SONOGRAPHER: {op_first} {op_last}, RDCS.",
                f"Interpreted by {reader[0].title()} {reader[1].title()}, M.D. Performed by {op_first} {op_last}.",
            )
        )
    ]
    if rng.random() < 0.5:
        tail.append(f"QUESTIONS: CALL THE ECHO LAB AT {phone} OR FAX {fax}, E-MAIL {email}.")
    if rng.random() < 0.5:
        tail.append(f"{phi['InstitutionName']}, {phi['InstitutionAddress']}.")
    if rng.random() < 0.3:
        tail.append(f"PATIENT ADDRESS: {home}.")
    if rng.random() < 0.3:
        tail.append(f"Images available at {url}")
    written = {
        "report_header_values": [pid, acc, f"{last}, {first}", f"{first} {last}", last, first, ref_last, op_last],
        "report_staff": [*reader, *typist],
        "report_dates": [when, born],
        "report_contact": [phone, fax, email, home, url, number + " " + street, town],
        # bare numbers: looked for in report text only (as digits they could occur by chance in a log's floats)
        "report_numbers": [pid[3:], time, zipcode],
        "report_age": [f"{age} YEAR"] if age > 89 else [],
    }
    used = " ".join([head, *tail]).upper()
    written = {k: sorted({v for v in vs if v.upper() in used}) for k, vs in written.items()}
    return head, " ".join(tail), written


def write_report(study: dict) -> tuple[str, dict[str, list[str]]]:
    """(the report as the hospital's CSV holds it, {kind: identifying strings in it})."""
    head, tail, written = report_phi(study)
    return f"{head} {clinical_report(study)} {tail}", written
