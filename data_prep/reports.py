"""EchoCLIP's report normalisation: the one home of `clean_text`, used by data_prep and the tokenizers.

EchoCLIP-R's template tokenizer only recognises a phrase when the report was normalised exactly the way
the released model saw it, so every rule here reproduces the released behaviour, quirks included (e.g.
`NORMALLY` becomes `NORMAL` inside any word; an ICD-like code such as `I50.9` is removed whole). The rules
are listed in shared/echoclip_reference/README.md and checked against its examples. Pure Python: data_prep
imports this without JAX.
"""
import re

__all__ = ["clean_text", "PERIOD_PHRASES"]

_NUMBER = r"\d+\.?\d*"

# Phrases the released model always saw followed by a period; `<#>` stands for a number.
PERIOD_PHRASES = (
    "THE PEAK TRANSAORTIC GRADIENT IS <#>MMHG",
    "THE MEAN TRANSAORTIC GRADIENT IS <#>MMHG",
    "LV EJECTION FRACTION IS <#>%",
    "ESTIMATED PA PRESSURE IS <#>MMHG",
    "RESTING SEGMENTAL WALL MOTION ANALYSIS",
    "THE IVC DIAMETER IS <#>MM",
    "EST RV/RA PRESSURE GRADIENT IS <#>MMHG",
    "ESTIMATED PEAK RVSP IS <#>MMHG",
    "HEART FAILURE, UNSPECIFIED",
    "CHEST PAIN, UNSPECIFIED",
    "SINUS OF VALSALVA: <#>CM",
    "THE PEAK TRANSMITRAL GRADIENT IS <#>MMHG",
    "THE MEAN TRANSMITRAL GRADIENT IS <#>MMHG",
    "ASCENDING AORTA <#>CM",
    "ESTIMATED PA SYSTOLIC PRESSURE IS <#>MMHG",
    "ICD_CODE SHORTNESS BREATH",
    "ICD_CODE ABNORMAL ELECTROCARDIOGRAM ECG EKG",
    "SHORTNESS BREATH",
    "ABNORMAL ELECTROCARDIOGRAM ECG EKG",
    "THE LEFT ATRIAL APPENDAGE IS NORMAL IN APPEARANCE WITH NO EVIDENCE OF THROMBUS",
)


def _phrase_pattern(phrase: str) -> str:
    # Alternatives are tried in list order at each position (Python `re`), as the released model did.
    return "(?:" + re.escape(phrase).replace(re.escape("<#>"), _NUMBER) + r")(?!\.)"


_SENTENCE_PERIOD = re.compile(r"(?<=\D)\.|\.(?=\D)")  # a period beside a non-digit ends a sentence
_WAS = re.compile(r"\bWAS\b")
_WERE = re.compile(r"\bWERE\b")
_AND_OR = re.compile(r"\bAND/OR\b")
_SLASH_DATE = re.compile(r"\d{2}/\d{2}/\d{4}")  # dates: identifying, and never part of a phrase
_DOT_DATE = re.compile(r"\d{2}\.\d{2}\.\d{4}")
_ICD_CODE = re.compile(r"[A-Z]\d+\.\d*\b")  # e.g. I50.9
_SPACE_UNIT = re.compile(r"\s+(MMHG|MM|CM|%)")
_SPACE_PERIOD = re.compile(r"\s\.")
_SPACE_PLUS_SPACE = re.compile(r"\s\+\s")
_ADD_PERIOD = re.compile("(" + "|".join(_phrase_pattern(p) for p in PERIOD_PHRASES) + ")")
_PERIOD_RUNS = re.compile(r"\.+")
# Literal rewrites; str.replace scans left to right without overlap, as re.sub does.
_WORD_FORMS = (("NORMALLY", "NORMAL"), ("MILDLY", "MILD"), ("MODERATELY", "MODERATE"), ("SEVERELY", "SEVERE"),
               ("PULMONARY ARTERY", "PA"))


def _squash_whitespace(text: str) -> str:
    """re.sub(r"\s+", " ", text) without the regex (str.split uses the same whitespace class as `\s`)."""
    core = " ".join(text.split())
    if not core:
        return " " if text else ""
    return (" " if text[0].isspace() else "") + core + (" " if text[-1].isspace() else "")


def clean_text(text: str) -> str:
    """Normalise one report the way EchoCLIP's training data was (upper case, fixed vocabulary, one space
    between sentences, one trailing space). Strings of length <= 1 come back unchanged, as in the release."""
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects str, got {type(text).__name__}")
    if len(text) <= 1:
        return text
    text = text.upper().strip().replace("`", "'")
    # "CRLF" first: removing "^" or "‡" must not form a new "CRLF" that then disappears.
    text = text.replace("CRLF", "").replace("^", "").replace("‡", "")
    text = _SENTENCE_PERIOD.sub(". ", text)
    text = text.replace("[", "").replace("]", "")
    # Cheap substring guards skip whole-text regex passes that cannot match.
    if "WAS" in text:
        text = _WAS.sub("IS", text)
    if "WERE" in text:
        text = _WERE.sub("ARE", text)
    if "AND/OR" in text:
        text = _AND_OR.sub("AND", text)
    for old, new in _WORD_FORMS:
        text = text.replace(old, new)
    if "/" in text:
        text = _SLASH_DATE.sub("", text)
    text = _DOT_DATE.sub("", text)
    text = _ICD_CODE.sub("", text)
    text = _SPACE_UNIT.sub(r"\1", text)
    text = _SPACE_PERIOD.sub(".", text)
    text = _squash_whitespace(text)
    if "+" in text:
        text = _SPACE_PLUS_SPACE.sub("+", text).replace("+CVPMMHG", "MMHG")
    text = text.strip() + " "
    text = _ADD_PERIOD.sub(r"\1.", text)
    return _PERIOD_RUNS.sub(".", text)
