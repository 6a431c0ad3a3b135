"""Report de-identification: every category of identifier goes, the clinical text stays, detectors plug in."""

import json
import os
import pickle
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset

from data_prep import report_deid, report_detectors
from data_prep.report_deid import Deidentifier
from data_prep.report_identifiers import identifiers_from_dataset
from data_prep.reports import clean_text

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "echoclip_reference")
DEID = Deidentifier()
HEADER = (
    ("name", "QUILLAMORE^ALBINA^JANE"),
    ("name", "WALL^BRISCO^^DR"),
    ("id", "MRN1234567"),
    ("id", "ACC553309281"),
    ("institution", "SAINT ELSEWHERE HEART CENTER"),
    ("address", "1200 HARBOR BLVD, PORT ELSEWHERE"),
    ("phone", "617-555-0100"),
)

# (report text, identifying substrings that must go, clinical substrings that must stay, category counted)
CASES = [
    (
        "LV EJECTION FRACTION IS 55%. ELECTRONICALLY SIGNED BY KESTRANE THORNVALE, MD.",
        ["KESTRANE", "THORNVALE"],
        ["LV EJECTION FRACTION IS 55%."],
        "signature",
    ),
    ("Dictated by: Dr. Loxworth. NORMAL LV SIZE.", ["Loxworth"], ["NORMAL LV SIZE."], "signature"),
    ("READING PHYSICIAN: MIREBROOK, EVANDER MD FACC. MILD MR.", ["MIREBROOK", "EVANDER"], ["MILD MR."], "signature"),
    ("Interpreted by Anselmo Cransholt, M.D. TRACE TR.", ["Anselmo", "Cransholt"], ["TRACE TR."], "signature"),
    (
        "SONOGRAPHER: GASTON ZEPHYRANT, RDCS. THE IVC DIAMETER IS 24MM.",
        ["GASTON", "ZEPHYRANT"],
        ["THE IVC DIAMETER IS 24MM."],
        "signature",
    ),
    ("CASE DISCUSSED WITH DR. HAVERSTOCK. EF 40%.", ["HAVERSTOCK"], ["EF 40%."], "name"),
    ("STUDY DATE: 03/12/2019. EF 60%.", ["03/12/2019"], ["EF 60%."], "date"),
    ("Exam on 2019-03-12 and 12.03.2019 and 3/12/19.", ["2019-03-12", "12.03.2019", "3/12/19"], [], "date"),
    (
        "SEEN MARCH 12, 2019 AND 5 JANUARY 2021 AND JUNE 2018. ESTIMATED PA PRESSURE IS 40.0MMHG.",
        ["MARCH 12, 2019", "5 JANUARY 2021", "JUNE 2018"],
        ["ESTIMATED PA PRESSURE IS 40.0MMHG."],
        "date",
    ),
    ("ACQUIRED 20190312 AT 14:32:05 AND 2 PM.", ["20190312", "14:32", "2 PM"], [], "date"),
    (
        "CALL (617) 555-0147 OR FAX 617.555.0199 OR +44 20 7946 0958.",
        ["555-0147", "555.0199", "7946 0958"],
        [],
        "phone",
    ),
    (
        "QUESTIONS: brunhilda.haverstock@meridianvalley.org. NORMAL RV.",
        ["brunhilda", "meridianvalley"],
        ["NORMAL RV."],
        "email",
    ),
    (
        "IMAGES AT https://portal.elsewhere.org/echo/acc1 AND www.echo-lab.com/x.",
        ["portal.elsewhere", "echo-lab"],
        [],
        "url",
    ),
    (
        "MRN: 7003271. ACC# 257868774. MR# 1361963. PATIENT ID AB-99231.",
        ["7003271", "257868774", "1361963", "AB-99231"],
        [],
        "id",
    ),
    ("STUDY UID 1.2.840.113619.2.55.3.2831.", ["113619"], [], "id"),
    ("A 93 YEAR OLD WOMAN, AGE 97. A 67 YEAR OLD MAN.", ["93 YEAR", "AGE 97"], ["67 YEAR OLD MAN"], "age"),
    (
        "LIVES AT 14 QUINCEWOOD LANE, FENWICK FALLS. ZIP: 01867. CA 94115. LONDON SW1A 1AA.",
        ["QUINCEWOOD", "01867", "94115", "SW1A 1AA"],
        [],
        "address",
    ),
    (
        "PATIENT ADDRESS: 9 TAMBERLY COURT, OLDCASTLE. NORMAL PERICARDIUM.",
        ["TAMBERLY", "OLDCASTLE"],
        ["NORMAL PERICARDIUM."],
        "address",
    ),
]


@pytest.mark.parametrize("text,gone,kept,category", CASES)
def test_each_category_of_identifier_is_removed_and_counted(text, gone, kept, category):
    out, counts = DEID(text)
    for s in gone:
        assert s.lower() not in out.lower(), (s, out)
    for s in kept:
        assert s in out, (s, out)
    assert counts.get(category, 0) >= 1, counts


def test_header_identifiers_go_case_and_punctuation_insensitively():
    text = (
        "Patient: Quillamore, Albina J. (mrn 1234567), acc-553309281. Seen at Saint Elsewhere Heart Center, "
        "1200 Harbor Blvd., Port Elsewhere; call 617 555 0100. ALBINA JANE QUILLAMORE. "
        "THERE IS AKINESIS OF THE ENTIRE INFEROLATERAL WALL. Discussed with Dr. Wall and Brisco Wall."
    )
    out, counts = DEID(text, HEADER)
    for s in ("quillamore", "albina", "1234567", "553309281", "elsewhere", "harbor", "617", "brisco"):
        assert s not in out.lower(), (s, out)
    # a name part that is an echo word goes only where it stands as a name
    assert "INFEROLATERAL WALL." in out and "Wall" not in out.replace("WALL", "")
    assert {"name", "id", "institution", "address", "phone"} <= set(counts)


def test_reports_without_identifiers_come_back_unchanged_so_clean_text_parity_holds():
    with open(os.path.join(REFERENCE, "template_tokenizer_examples.json")) as f:
        examples = json.load(f)
    for ex in examples:  # the released clean_text output is reproduced on the de-identified report
        assert clean_text(DEID(ex["report"])[0]) == ex["clean_text"]
    with open(os.path.join(REFERENCE, "example_report.txt")) as f:
        report = f.read()
    assert DEID(report) == (report, {})


def test_template_phrases_prompts_and_measurements_survive():
    with open(os.path.join(REFERENCE, "template_vocab.txt")) as f:
        phrases = [line.rstrip("\n") for line in f if line.strip()]
    with open(os.path.join(REFERENCE, "prompts_used.json")) as f:
        tasks = json.load(f)
    prompts = [p for t in tasks.values() for p in t.get("label_sources", []) + t.get("testers", [])]
    measurements = [
        "LVEF 55-60%.",
        "BP 120/80 MMHG.",
        "2/6 SYSTOLIC MURMUR.",
        "E/A RATIO 1.2, E/E' 15.",
        "GRADE II DIASTOLIC DYSFUNCTION.",
        "MODERATE (2+) MITRAL REGURGITATION.",
        "HEART RATE 72 BPM.",
        "AORTIC ROOT 3.4 CM, LVIDD 5.2 CM, LV MASS 182 G.",
        "SEVERE MS SECONDARY TO RHEUMATIC DISEASE.",
        "MILD MR. MR JET IS CENTRAL.",
        "2 CLIPS IN PLACE.",
        "SEPT 12 MM.",
        "DEC 20%.",
        "1 MM ST DEPRESSION.",
        "2:1 AV BLOCK.",
        "STUDY COMPARED WITH PRIOR FROM 2019.",
        "WE DO NOT SEE A THROMBUS.",
        "DR. OFFICE STAFF NOTIFIED.",
    ]
    for template in phrases + prompts:
        for value in ("0", "3.4", "55", "100", "120"):
            text = template.replace("<#>", value)
            assert DEID(text) == (text, {}), text
    for text in measurements:
        assert DEID(text) == (text, {}), text


def test_identifiers_from_a_dicom_header(tmp_path):
    ds = Dataset()
    ds.PatientName = "QUILLAMORE^ALBINA"
    ds.PatientID = "MRN1234567"
    ds.OtherPatientIDs = ["X99887766", "Y11223344"]
    ds.AccessionNumber = "ACC553309281"
    ds.ReferringPhysicianName = "ZEPHYRANT^BRISCO^^DR"
    ds.NameOfPhysiciansReadingStudy = ["KESTRANE^EVANDER", "LOXWORTH^DELPHA"]
    ds.OperatorsName = "MIREBROOK^NERISSA"
    ds.InstitutionName = "SAINT ELSEWHERE HEART CENTER"
    ds.InstitutionAddress = "1200 HARBOR BLVD"
    ds.PatientTelephoneNumbers = "617-555-0100"
    found = set(identifiers_from_dataset(ds))
    assert {
        ("name", "QUILLAMORE^ALBINA"),
        ("id", "X99887766"),
        ("id", "Y11223344"),
        ("id", "ACC553309281"),
        ("name", "KESTRANE^EVANDER"),
        ("name", "LOXWORTH^DELPHA"),
        ("name", "ZEPHYRANT^BRISCO^^DR"),
        ("name", "MIREBROOK^NERISSA"),
        ("institution", "SAINT ELSEWHERE HEART CENTER"),
        ("address", "1200 HARBOR BLVD"),
        ("phone", "617-555-0100"),
    } <= found
    path = tmp_path / "h.dcm"  # and through a file read the way the converter reads headers
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=False)
    assert set(identifiers_from_dataset(pydicom.dcmread(path, force=True))) == found


def test_detectors_plug_in(tmp_path, monkeypatch):
    words = tmp_path / "staff.txt"
    words.write_text("# reading cardiologists\nAnna Belltower\nTEMPLETON\n")
    module = tmp_path / "hospital_ner.py"
    module.write_text(
        "import re\n"
        "def find(text):\n"
        "    return [(m.start(), m.end(), 'ward') for m in re.finditer(r'WARD \\d+[A-Z]', text)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    deid = Deidentifier([f"wordlist:{words}", "python:hospital_ner:find"])
    text = "SEEN WITH ANNA BELLTOWER ON WARD 7B. TEMPLETON AGREES. NORMAL LV."
    out, counts = deid(text)
    assert "BELLTOWER" not in out and "TEMPLETON" not in out and "WARD 7B" not in out and "NORMAL LV." in out
    assert counts["wordlist"] == 2 and counts["ward"] == 1
    # without a detector, a name that nothing reveals stays (the documented limit)
    assert "BELLTOWER" in DEID(text)[0]


def test_bad_detector_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="expected wordlist:PATH"):
        report_detectors.build_detectors(["spacy"])
    with pytest.raises(ValueError, match="missing.txt"):
        report_detectors.build_detectors([f"wordlist:{tmp_path / 'missing.txt'}"])
    with pytest.raises(ValueError, match="no_such_module"):
        report_detectors.build_detectors(["python:no_such_module:find"])
    try:
        import presidio_analyzer  # noqa: F401, PLC0415 (optional: the presidio detector)
    except ImportError:
        with pytest.raises(ValueError, match="presidio-analyzer"):
            report_detectors.build_detectors(["presidio"])


def test_the_deidentifier_pickles_to_worker_processes(tmp_path):
    words = tmp_path / "staff.txt"
    words.write_text("TEMPLETON\n")
    deid = pickle.loads(pickle.dumps(Deidentifier([f"wordlist:{words}"], region="GB")))
    out, counts = deid("TEMPLETON CALLED 020 7946 0958.")
    assert "TEMPLETON" not in out and "7946" not in out and counts == {"wordlist": 1, "phone": 1}
    assert sys.modules["data_prep.report_deid"] is report_deid
