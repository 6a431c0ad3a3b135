"""EchoCLIP-R's template tokenizer: whole report phrases as tokens, numbers and severities after them.

Id layout (the released tokenizer's, which its weights depend on): 0..4 [UNK] [CLS] [SEP] [PAD] [MASK];
phrase i of the user's vocabulary file is 5 + i; then the variable vocabulary offset by 5 + #phrases
(its own 0..4 specials, "0".."100", "‡", severities, ".0"..".9", "00".."09"); then BOS and EOS. A report is
`clean_text`-normalised, its variables are replaced by `<#>`, and phrases are matched leftmost-longest;
text between phrases (and the variables in it) is dropped.
"""

import functools
import os
import re

import numpy as np

from data_prep.reports import clean_text
from echoclip_jax.runtime import storage
from echoclip_jax.tokenizers.base import as_text_list, check_context_length, pack_rows

SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
PLACEHOLDER = "<#>"
VARIABLE_SEPARATOR = "‡"
SEVERITIES = ("MILD", "MODERATE", "SEVERE", "MILD/MODERATE", "MODERATE/SEVERE")
VARIABLE_VOCAB = (
    SPECIALS
    + tuple(str(i) for i in range(101))
    + (VARIABLE_SEPARATOR,)
    + SEVERITIES
    + tuple(f".{i}" for i in range(10))
    + tuple(f"0{i}" for i in range(10))
)

# A number, or a severity word not glued to a preceding letter; the first alternative wins at a position.
_VARIABLE = re.compile(r"(\d+\.?\d*)|((?<![A-Za-z])(?:MODERATE/SEVERE|MILD/MODERATE|MILD|MODERATE|SEVERE|VERY SEVERE))")
# Applied after variables are replaced, before phrase matching.
_REWRITES = (
    (
        "THE INFERIOR VENA CAVA IS NORMAL IN SIZE AND SHOWS A NORMAL RESPIRATORY COLLAPSE, CONSISTENT WITH "
        "NORMAL RIGHT ATRIAL PRESSURE (<#>MMHG).",
        "THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH NORMAL RIGHT ATRIAL "
        "PRESSURE (<#>MMHG).",
    ),
    ("RESTING SEGMENTAL WALL MOTION ANALYSIS.:", "RESTING SEGMENTAL WALL MOTION ANALYSIS."),
)


class LongestMatcher:
    """Leftmost-longest, non-overlapping matching of a fixed set of strings (Aho-Corasick semantics).

    The strings become one regex shaped like their trie: sibling branches start with distinct characters,
    so the engine follows a single path per start position and greedy optional groups make it stop at the
    longest string on that path. This is C-speed (no per-character Python loop)."""

    def __init__(self, strings):
        trie: dict = {}
        for s in strings:
            node = trie
            for ch in s:
                node = node.setdefault(ch, {})
            node[None] = True  # terminal
        self._ids = {s: i for i, s in enumerate(strings)}
        self._re = re.compile(self._emit(trie), re.DOTALL)

    @staticmethod
    def _emit(node: dict) -> str:
        # Single-child chains become literal runs, so nesting grows with branch points, not length.
        out = []
        while True:
            children = [(ch, child) for ch, child in node.items() if ch is not None]
            terminal = None in node
            if len(children) == 1 and not terminal:
                ch, node = children[0]
                out.append(re.escape(ch))
                continue
            break
        if children:
            alts = [re.escape(ch) + LongestMatcher._emit(child) for ch, child in sorted(children)]
            body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
            out.append(f"(?:{body})?" if terminal else body)
        return "".join(out)

    def split(self, text: str):
        """Yields (piece, id) in order: id of the matched string, or None for a stretch between matches."""
        pos = 0
        for m in self._re.finditer(text):
            start, end = m.span()
            if start > pos:
                yield text[pos:start], None
            yield m.group(), self._ids[m.group()]
            pos = end
        if pos < len(text):
            yield text[pos:], None


def read_vocab(path: str) -> list[str]:
    """The phrase file (local path or gs:// URL), one phrase per line in id order; errors name the file and
    the line."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"template vocabulary file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"template vocabulary path is a directory, not a file: {path}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: template vocabulary is not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final newline ends the last line; it is not an empty phrase
    phrases = [line.rstrip("\r") for line in lines]
    if not phrases:
        raise ValueError(f"{path}: template vocabulary is empty")
    seen = {}
    for n, phrase in enumerate(phrases, start=1):
        if not phrase.strip():
            raise ValueError(f"{path}: line {n} is empty; every line must be one phrase (ids follow line order)")
        if phrase in seen:
            raise ValueError(f"{path}: line {n} repeats line {seen[phrase]}; phrases must be unique")
        seen[phrase] = n
    return phrases


class TemplateTokenizer:
    """EchoCLIP-R's tokenizer over a user-supplied phrase file (EchoCLIP's own `template_vocab.txt`)."""

    def __init__(self, path: str, context_length: int = 77):
        self.path = os.fspath(path)
        self.context_length = check_context_length(context_length)
        self.phrases = read_vocab(self.path)
        self.phrase_offset = len(SPECIALS)
        self.variable_offset = self.phrase_offset + len(self.phrases)
        self.bos_id = self.variable_offset + len(VARIABLE_VOCAB)
        self.eos_id = self.bos_id + 1
        self.pad_id = 0
        self.vocab_size = self.eos_id + 1
        self._phrase_vars = [p.count(PLACEHOLDER) for p in self.phrases]
        self._phrases = LongestMatcher(self.phrases)
        self._variables = LongestMatcher(VARIABLE_VOCAB)
        self._variable_ids = functools.lru_cache(maxsize=4096)(self._uncached_variable_ids)

    def _uncached_variable_ids(self, joined: str) -> tuple[int, ...]:
        # A stretch no variable token covers is one [UNK] (id 0), like the released WordPiece fallback.
        return tuple(self.variable_offset + (0 if i is None else i) for _, i in self._variables.split(joined))

    def encode_one(self, report: str) -> list[int]:
        """One report -> unpadded ids: BOS, (phrase id, its variable ids)*, EOS."""
        text = clean_text(report)
        # One pass: split() interleaves the text between variables with the two capture groups.
        parts = _VARIABLE.split(text)
        variables = [num or sev for num, sev in zip(parts[1::3], parts[2::3])]
        text = PLACEHOLDER.join(parts[::3])
        for old, new in _REWRITES:
            text = text.replace(old, new)
        pieces = list(self._phrases.split(text))
        # Placeholders are counted per piece, in order; those inside dropped stretches lose their variable.
        keep = []
        for piece, i in pieces:
            keep.extend([i is not None] * piece.count(PLACEHOLDER))
        kept = iter([v for v, k in zip(variables, keep) if k])
        ids = [self.bos_id]
        for _, i in pieces:
            if i is None:
                continue
            ids.append(self.phrase_offset + i)
            values = [v for _, v in zip(range(self._phrase_vars[i]), kept)]
            if values:
                ids.extend(self._variable_ids(VARIABLE_SEPARATOR.join(values)))
        ids.append(self.eos_id)
        return ids

    def encode(self, texts) -> np.ndarray:
        """list[str] -> int32 [batch, context_length]."""
        rows = [self.encode_one(t) for t in as_text_list(texts)]
        return pack_rows(rows, self.context_length, eos_id=self.eos_id, pad_id=self.pad_id)

    def decode(self, ids) -> str:
        """Ids -> report text with the variables written back into their phrases' `<#>` (for debugging)."""
        out: list[str] = []
        phrase, values = None, []

        def flush():
            if phrase is not None:
                parts = phrase.split(PLACEHOLDER)
                vals = "".join(values).split(VARIABLE_SEPARATOR) if values else []
                vals += [PLACEHOLDER] * (len(parts) - 1 - len(vals))
                out.append(parts[0] + "".join(v + p for v, p in zip(vals, parts[1:])))

        for i in np.asarray(ids).reshape(-1).tolist():
            if self.phrase_offset <= i < self.variable_offset:
                flush()
                phrase, values = self.phrases[i - self.phrase_offset], []
            elif self.variable_offset <= i < self.bos_id:
                token = VARIABLE_VOCAB[i - self.variable_offset]
                values.append("?" if token in SPECIALS else token)
            elif i == self.eos_id:
                break
        flush()
        return "".join(out)
