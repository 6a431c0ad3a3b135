"""clean_text: identical to the released EchoCLIP normalisation (reference examples + each rule by hand)."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.reports import clean_text


def _examples(reference_dir):
    with open(reference_dir / "template_tokenizer_examples.json") as fh:
        return json.load(fh)


def test_reference_examples(reference_dir):
    examples = _examples(reference_dir)
    assert len(examples) == 5
    for ex in examples:
        assert clean_text(ex["report"]) == ex["clean_text"]


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("", ""),  # length <= 1: unchanged, as released
        ("x", "x"),
        ("lv is normal", "LV IS NORMAL "),  # upper case, one trailing space
        ("  THE VALVE  \t\n IS  THIN  ", "THE VALVE IS THIN "),
        ("IT WAS SEEN. THEY WERE SEEN. WASH AND/OR RINSE", "IT IS SEEN. THEY ARE SEEN. WASH AND RINSE "),
        ("NORMALLY, ABNORMALLY, MILDLY, MODERATELY, SEVERELY", "NORMAL, ABNORMAL, MILD, MODERATE, SEVERE "),
        ("PULMONARY ARTERY PRESSURE", "PA PRESSURE "),
        ("SEEN 01/02/2020 AND 03.04.2021 TODAY", "SEEN AND TODAY "),
        ("I50.9 HEART FAILURE, UNSPECIFIED", "HEART FAILURE, UNSPECIFIED. "),  # ICD code goes; period added
        ("IVC 2.1 CM, GRADIENT 20 MMHG, EF 55 %, WALL 9 MM", "IVC 2.1CM, GRADIENT 20MMHG, EF 55%, WALL 9MM "),
        ("LEFT ATRIUM.RIGHT ATRIUM", "LEFT ATRIUM. RIGHT ATRIUM "),  # a period beside a letter ends a sentence
        ("SCORE IS 2.29", "SCORE IS 2.29 "),  # a period between digits is a decimal point
        ("DONE... OK", "DONE. OK "),
        ("DONE .", "DONE. "),
        ("A^B‡C CRLF D [E] `F`", "ABC D E 'F' "),
        ("CR^LF", "CRLF "),  # removals happen in one pass: no second pass over what they join
        ("RA 3 + CVPMMHG", "RA 3MMHG "),
        ("ESTIMATED PA PRESSURE IS 40MMHG", "ESTIMATED PA PRESSURE IS 40MMHG. "),
        ("LV EJECTION FRACTION IS 55%. ", "LV EJECTION FRACTION IS 55%. "),  # no second period
        ("RESTING SEGMENTAL WALL MOTION ANALYSIS", "RESTING SEGMENTAL WALL MOTION ANALYSIS. "),
        ("shortness of breath", "SHORTNESS OF BREATH "),  # the listed phrase is "SHORTNESS BREATH"
    ],
)
def test_rules(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        clean_text(None)
    with pytest.raises(TypeError, match="bytes"):
        clean_text(b"LV IS NORMAL")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_normalised(text):
    out = clean_text(text)
    assert isinstance(out, str)
    if len(text) <= 1:
        assert out == text
    else:
        assert out.endswith(" ") and not out.endswith("  ")
        assert ".." not in out
        assert "  " not in out[:-1]
        assert out == out.upper()


def test_does_not_import_jax():
    code = "import sys, data_prep.reports; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
