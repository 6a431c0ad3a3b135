"""Report detectors a hospital adds to the de-identification (`data_prep.report_deid`), and the matching rules
every identifier pattern shares.

`build_detectors` reads `--report_detector` values: `wordlist:PATH` (its staff names, one per line, matched
as `loose` whole words), `presidio` (Microsoft Presidio's analyzer, when it and its spaCy model are installed;
nothing is downloaded at run time) or `python:MODULE:NAME` (any callable `text -> [(start, end, category)]`).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Iterable, Sequence

from echoclip_jax.runtime import storage

Span = tuple[int, int, str]
Detector = Callable[[str], Iterable[Span]]


def loose(value: str) -> str:
    """A regex for `value` that ignores case, punctuation and spacing between its letter and digit runs."""
    runs = re.findall(r"[A-Za-z]+|\d+", value)
    return r"[\W_]*".join(re.escape(r) for r in runs)


def word(pattern: str) -> str:
    """`pattern` as a whole word: no letter or digit right before or after it."""
    return rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])"


def _wordlist(path: str) -> Detector:
    try:
        lines = storage.read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: cannot read the word list for --report_detector ({getattr(e, 'strerror', None) or e})"
        ) from None
    words = sorted({w.strip() for w in lines if w.strip() and not w.startswith("#")}, key=len, reverse=True)
    if not words:
        raise ValueError(f"{path}: the word list for --report_detector is empty")
    pattern = re.compile("|".join(word(loose(w)) for w in words if re.search(r"\w", w)), re.IGNORECASE)
    return lambda text: [(m.start(), m.end(), "wordlist") for m in pattern.finditer(text)]


def _presidio() -> Detector:
    """Microsoft Presidio's AnalyzerEngine (spaCy NER + its recognisers), if installed with a spaCy model."""
    try:
        import spacy  # noqa: PLC0415 (optional: the presidio detector)
        from presidio_analyzer import AnalyzerEngine  # noqa: PLC0415 (optional: the presidio detector)
    except ImportError:
        raise ValueError(
            "--report_detector presidio needs `pip install presidio-analyzer` and a spaCy English "
            "model (e.g. en_core_web_lg) installed"
        ) from None
    model = "en_core_web_lg"
    if not spacy.util.is_package(model):
        raise ValueError(
            f"--report_detector presidio: the spaCy model {model} is not installed "
            "(install it as a package; nothing is downloaded at run time)"
        )
    engine = AnalyzerEngine()
    entities = ["PERSON", "LOCATION", "PHONE_NUMBER", "EMAIL_ADDRESS", "DATE_TIME", "URL", "US_SSN", "NRP"]
    return lambda text: [
        (r.start, r.end, "presidio:" + r.entity_type.lower())
        for r in engine.analyze(text=text, language="en", entities=entities)
    ]


def _python(spec: str) -> Detector:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--report_detector python:{spec}: cannot load {name!r} from {module!r} ({e})") from None
    return fn


def build_detectors(specs: Sequence[str]) -> list[Detector]:
    """Detectors from `--report_detector` values: wordlist:PATH, presidio, python:MODULE:NAME."""
    out = []
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "wordlist" and arg:
            out.append(_wordlist(arg))  # local (~ expanded) or gs://
        elif kind == "presidio" and not arg:
            out.append(_presidio())
        elif kind == "python" and ":" in arg:
            out.append(_python(arg))
        else:
            raise ValueError(f"--report_detector {spec!r}: expected wordlist:PATH, presidio or python:MODULE:NAME")
    return out
