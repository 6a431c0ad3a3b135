"""Reports: EchoCLIP's normalisation (`clean_text`, used by data_prep and the tokenizers) and reading the
hospital's reports CSV (`read_reports`, for the conversion's plan).

EchoCLIP-R's template tokenizer only recognises a phrase when the report was normalised exactly the way
the released model saw it, so every rule here reproduces the released behaviour, quirks included (e.g.
`NORMALLY` becomes `NORMAL` inside any word; an ICD-like code such as `I50.9` is removed whole); the tests
check them against the released model's own normalised examples. Pure Python: data_prep imports this
without JAX.
"""

import collections
import csv
import io
import logging
import re

from echoclip_jax.runtime import storage

log = logging.getLogger(__name__)

__all__ = ["clean_text", "PERIOD_PHRASES", "read_reports"]

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
_WORD_FORMS = (
    ("NORMALLY", "NORMAL"),
    ("MILDLY", "MILD"),
    ("MODERATELY", "MODERATE"),
    ("SEVERELY", "SEVERE"),
    ("PULMONARY ARTERY", "PA"),
)


def _squash_whitespace(text: str) -> str:
    r"""re.sub(r"\s+", " ", text) without the regex (str.split uses the same whitespace class as `\s`)."""
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


# ------------------------------------------------------------------------------------- the reports CSV


def _parse_reports_csv(path: str, text: str) -> tuple[list[dict], dict[int, str]]:
    """CSV text -> (rows, {row number: problem}). A file with broken quoting (an unclosed quote would
    swallow the following rows into one report) is re-read line by line, and the lines with unbalanced
    quotes are marked bad instead of silently merging several studies' reports."""
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), strict=True)), {}
    except csv.Error as e:
        log.warning("%s: broken CSV quoting (%s); reading it line by line", path, e)
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

    The raw text still carries identifiers: data_prep.plan.deidentify_reports scrubs and normalises it
    before use.

    Several rows for one study (e.g. addenda) are joined in file order. Rows that are not valid UTF-8, have
    broken quoting or the wrong number of fields make that study's videos skip with the reason; a file
    without the named columns is an error.
    """
    try:
        text = storage.read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    except OSError as e:
        raise ValueError(f"{path}: cannot read reports ({type(e).__name__}: {e.strerror or e})") from None
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
