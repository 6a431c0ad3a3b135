"""Report de-identification: identifiers are removed from report text before it is written anywhere.

Three layers, applied to the raw report of one study (before `clean_text`):
1. The study's own header identifiers (`data_prep.report_identifiers`): patient name and its parts, patient
   ids, accession, institution name and address, every physician and operator name field. Matched case-
   and punctuation-insensitively; a name part that is also an echo or common English word ("WALL",
   "YOUNG") is removed only where it stands as a name (beside another part of that name, or after a title).
2. Patterns (`report_patterns`): dates, times, phone and fax numbers (Google's libphonenumber, through
   `phonenumbers`), e-mail addresses, URLs, record- and accession-like numbers, DICOM UIDs, ages over 89,
   street addresses and postcodes, and signature clauses ("ELECTRONICALLY SIGNED BY ...", "READING
   PHYSICIAN: ...", "DR. ...", "..., MD") with the name that follows or precedes.
3. Detectors a hospital adds (`data_prep.report_detectors`): `wordlist:PATH` (its staff names, one per line),
   `presidio` (Microsoft Presidio's analyzer, when it and its spaCy model are installed), or
   `python:MODULE:NAME` (any callable `text -> [(start, end, category)]`).

Every span found is deleted (replaced by a space, which `clean_text` folds). Measurements, percentages,
grades and the template phrases survive: no pattern matches a number with a unit, a ratio such as "2/6"
or "120/80", or a year alone. A report in which nothing is found comes back unchanged, so `clean_text`
behaves exactly as EchoCLIP's did on reports without PHI. Only counts per category ever leave this module.

Not guaranteed: a free-text name that no header, cue word or title reveals ("seen with Anna today") is
found only by a word list or an NER detector (`presidio`).
"""

from __future__ import annotations

import collections
import re
from typing import Sequence

import phonenumbers

from data_prep.report_detectors import Span, build_detectors
from data_prep.report_identifiers import COMMON_WORDS, CREDENTIALS, MONTH_WORDS, MONTHS, TITLES, header_patterns

__all__ = ["Deidentifier", "report_patterns", "CATEGORIES"]


CATEGORIES = ("name", "signature", "id", "institution", "address", "date", "time", "phone", "email", "url", "age")


# ------------------------------------------------------------------------------------------- patterns

_D = r"(?:0?[1-9]|[12]\d|3[01])"
_M = r"(?:0?[1-9]|1[0-2])"
_Y = r"(?:19|20)\d{2}"
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\b[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+\b", "email"),
    (r"\b(?:https?://|www\.)[^\s<>\"]+", "url"),
    (r"\b[\w\-]+(?:\.[\w\-]+)*\.(?:com|org|net|edu|gov|io|health|nhs\.uk)\b(?:/[^\s<>\"]*)?", "url"),
    (rf"(?<![\d/.]){_M}[/\-.]{_D}[/\-.]{_Y}(?![\d/]|\.\d)", "date"),
    (rf"(?<![\d/.]){_M}([/\-]){_D}\1\d{{2}}(?![\d/]|\.\d)", "date"),
    (rf"(?<![\d/.]){_D}[/\-.]{_M}[/\-.]{_Y}(?![\d/]|\.\d)", "date"),
    (rf"(?<![\d/.]){_Y}[/\-.]{_M}[/\-.]{_D}(?![\d/]|\.\d)", "date"),
    (rf"(?<!\d){_Y}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)", "date"),  # DICOM's YYYYMMDD
    (rf"\b(?:{MONTHS})\.?\s+{_D}(?:ST|ND|RD|TH)?,?\s+{_Y}\b", "date"),
    (rf"\b{_D}(?:ST|ND|RD|TH)?\s+(?:OF\s+)?(?:{MONTHS})\.?,?\s+{_Y}\b", "date"),
    (rf"\b(?:{MONTHS})\.?,?\s+{_Y}\b", "date"),
    # month and day without a year: not MAY, MAR(ch), SEPT (septal) or DEC(reased) abbreviated
    (
        r"\b(?:JAN(?:UARY)?|FEB(?:RUARY)?|MARCH|APR(?:IL)?|JUNE|JULY|AUG(?:UST)?|SEPTEMBER|OCT(?:OBER)?|"
        rf"NOV(?:EMBER)?|DECEMBER)\.?\s+{_D}(?:ST|ND|RD|TH)?(?![\w%.]|\s*(?:MM|CM|ML|CC|M/S)\b)",
        "date",
    ),
    (r"\b(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?:\s*(?:AM|PM|A\.M\.|P\.M\.))?(?![\w:])", "time"),
    (r"\b(?:1[0-2]|0?[1-9])\s*(?:AM|PM|A\.M\.|P\.M\.)(?!\w)", "time"),
    (
        r"\b(?:MRN|MR(?=\s*(?:#|NO\b))|MED(?:ICAL)?\s+REC(?:ORD)?|PATIENT\s+ID|PT\s+ID|ACC(?:ESSION)?|CSN|FIN|ENCOUNTER|VISIT|"
        r"ORDER|RECORD|CASE|SSN|NHS|ID)(?:\s*(?:#|NO\.?|NUMBER|NUM|:))*\s*#?\s*[A-Z]*-?\d[A-Z0-9\-]{2,}\b",
        "id",
    ),
    (r"\b[A-Z]{0,4}\d{6,}[A-Z0-9]*\b", "id"),  # six digits in a row are never a measurement
    (r"\b\d{3}-\d{2}-\d{4}\b", "id"),
    (r"\b\d+(?:\.\d+){4,}\b", "id"),  # DICOM UIDs
    (r"\b(?:9\d|1[0-4]\d)(?:\s*-?\s*)(?:YEARS?|YRS?|YO|Y/O|Y\.O\.)(?:\s*-?\s*OLD)?\b", "age"),
    (r"\bAGE[D:\s]+(?:9\d|1[0-4]\d)\b", "age"),
    (r"\b[A-Z]{2}\s+\d{5}(?:-\d{4})?\b", "address"),  # state + ZIP
    (r"\b(?:ZIP|POSTCODE|POSTAL\s+CODE)[:\s]*[A-Z0-9\- ]{3,10}\b", "address"),
    (r"\b[A-Z]{1,2}\d{1,2}[A-Z]?\s+\d[ABD-HJLNP-UW-Z]{2}\b", "address"),  # UK postcode
    (r"\bADDRESS\s*:[^.\n;]*", "address"),
)
# Cues after which a person's name follows.
_NAME_CUE = re.compile(
    r"\b(?:(?:ELECTRONICALLY\s+)?(?:SIGNED|DICTATED|READ|REVIEWED|CONFIRMED|INTERPRETED|VERIFIED|APPROVED|"
    r"TRANSCRIBED|PERFORMED|REFERRED|ORDERED|ATTESTED|AUTHENTICATED|REPORTED)(?:\s+AND\s+\w+)?\s+BY|"
    r"(?:READING|REFERRING|ORDERING|ATTENDING|INTERPRETING|PERFORMING|REQUESTING|PRIMARY|CONSULTING)\s+"
    r"(?:PHYSICIAN|CARDIOLOGIST|DOCTOR|MD|CLINICIAN|PROVIDER)|"
    r"(?:SONOGRAPHER|TECHNOLOGIST|READER|CC|(?:PATIENT\s+)?NAME|PATIENT|ATTENDING|CARDIOLOGIST)(?=\s*:))"
    r"\s*[:\-]?\s*",
    re.IGNORECASE,
)
# Not MR or MS: in echo reports they are mitral regurgitation and stenosis.
_TITLE_CUE = re.compile(r"\b(?:DR|DOCTOR|MRS|MISS|PROF|PROFESSOR)\b\.?\s+", re.IGNORECASE)
_CREDENTIAL = re.compile(
    r"(?:,\s*(?:M\.?D|D\.?O)\b\.?|,?\s*\b(?:M\.D\.|MD|PHD|RDCS|RCS|RDMS|FACC|FASE|MBBS|FRCP)\b\.?)", re.IGNORECASE
)
_DOB = re.compile(r"\b(?:DOB\b|D\.O\.B\.|DATE\s+OF\s+BIRTH|BIRTH\s*DATE)\s*[:\-]?\s*", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Z](?:[A-Z'\-]*[A-Z])?\.?", re.IGNORECASE)


def _is_name_token(token: str) -> bool:
    word = token.rstrip(".").upper()
    if word in COMMON_WORDS or word in MONTH_WORDS:
        return False
    return len(word) >= 2 or token.endswith(".")  # an initial needs its period


def _take_name(text: str, pos: int, limit: int = 4) -> int:
    """End of the name that starts at `pos` (up to `limit` name words, titles and credentials), or `pos`."""
    end, taken = pos, 0
    while taken < limit:
        gap = re.match(r"[\s,]*", text[end:]).end()
        m = _TOKEN.match(text, end + gap)
        if not m:
            break
        word = m.group().rstrip(".").upper()
        if word in TITLES or word in CREDENTIALS:
            end = m.end()
            continue
        if not _is_name_token(m.group()):
            break
        end, taken = m.end(), taken + 1
        if m.group().endswith(".") and len(word) > 1:  # a word and its period end the sentence
            break
    return end if taken else pos


def _take_name_back(text: str, pos: int, limit: int = 3) -> int:
    """Start of the name that ends just before `pos` (a credential like ", MD" follows it), or `pos`."""
    start, taken = pos, 0
    for m in reversed(list(_TOKEN.finditer(text, max(0, pos - 80), pos))):
        if taken >= limit or text[m.end() : start].strip(" ,") or not _is_name_token(m.group()):
            break
        start, taken = m.start(), taken + 1
    return start


def report_patterns(text: str, region: str | None = "US") -> list[Span]:
    """Spans of identifiers found by the built-in patterns (no header values needed)."""
    spans = [(m.start(), m.end(), cat) for pattern, cat in _COMPILED for m in pattern.finditer(text)]
    for m in _STREET.finditer(text):  # "1200 HARBOR BLVD", but not "2 CLIPS IN ... WAY"
        if not any(w.upper() in COMMON_WORDS for w in m.group("words").split()):
            spans.append((m.start(), m.end(), "address"))
    for m in _NAME_CUE.finditer(text):
        end = _take_name(text, m.end())
        if end > m.end():
            spans.append((m.start(), end, "signature"))
    for m in _TITLE_CUE.finditer(text):
        end = _take_name(text, m.end(), limit=3)
        if end > m.end():
            spans.append((m.start(), end, "name"))
    for m in _CREDENTIAL.finditer(text):
        start = _take_name_back(text, m.start())
        if start < m.start():
            spans.append((start, m.end(), "signature"))
    for m in _DOB.finditer(text):
        spans.append((m.start(), m.end(), "date"))  # the label; the date itself is a date pattern
    if region is not None:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            spans.append((match.start, match.end, "phone"))
    return spans


_COMPILED = tuple((re.compile(p, re.IGNORECASE), c) for p, c in _PATTERNS)
_STREET = re.compile(
    r"\b\d{1,6}\s+(?P<words>(?:[A-Z][A-Z0-9'.\-]*\s+){1,4})(?:STREET|ST(?=[.,])|AVENUE|AVE|ROAD|RD|BOULEVARD|"
    r"BLVD|DRIVE|LANE|LN|WAY|COURT|CT|PLAZA|TERRACE|PARKWAY|PKWY|HIGHWAY|HWY|CIRCLE|SQUARE)\b\.?"
    r"(?:,?\s*(?:APT|SUITE|STE|UNIT|#)\.?\s*\w+)?",
    re.IGNORECASE,
)


class Deidentifier:
    """`deid(text, identifiers) -> (text, {category: spans removed})` for one study's report."""

    def __init__(self, detectors: Sequence[str] = (), region: str | None = "US"):
        self.specs = tuple(detectors)
        self.region = region
        self._detectors = build_detectors(self.specs)

    def __getstate__(self):  # worker processes rebuild the detectors from their specs
        return {"specs": self.specs, "region": self.region}

    def __setstate__(self, state):
        self.__init__(state["specs"], state["region"])

    def find(self, text: str, identifiers: Sequence[tuple[str, str]] = ()) -> list[Span]:
        spans = [
            (m.start(), m.end(), cat)
            for pattern, cat in header_patterns(identifiers)
            for m in re.finditer(pattern, text, re.IGNORECASE)
        ]
        spans += report_patterns(text, self.region)
        for detector in self._detectors:
            spans += [(int(s), int(e), str(c)) for s, e, c in detector(text) if 0 <= s < e <= len(text)]
        return spans

    def __call__(self, text: str, identifiers: Sequence[tuple[str, str]] = ()) -> tuple[str, dict[str, int]]:
        spans = sorted(self.find(text, identifiers), key=lambda s: (s[0], -s[1]))
        if not spans:
            return text, {}
        merged: list[list] = []
        for start, end, cat in spans:  # overlapping spans become one, counted under the first one's category
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end, cat])
        return _join_around(text, merged), dict(collections.Counter(cat for _, _, cat in merged))


_EDGE = " \t\r\n,;:#()-/&"


def _join_around(text: str, spans: Sequence) -> str:
    """`text` without `spans`. Only the text beside a removed span is tidied: the separators and brackets
    that belonged to it go, and a sentence left empty ("DOB: ." or "( ).") goes with them."""
    bounds = [0] + [x for start, end, _ in spans for x in (start, end)] + [len(text)]
    kept: list[str] = []
    for i in range(0, len(bounds), 2):
        segment = text[bounds[i] : bounds[i + 1]]
        if i > 0:  # a removed span precedes: drop its separators, and a period that would end nothing
            segment = segment.lstrip(_EDGE)
            if segment.startswith(".") and (not kept or kept[-1].endswith(".")):
                segment = segment.lstrip(". \t\r\n" + _EDGE)
        if i + 2 < len(bounds):
            segment = segment.rstrip(_EDGE)
        if segment:
            kept.append(segment)
    return " ".join(kept)
