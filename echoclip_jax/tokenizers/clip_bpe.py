"""CLIP's byte-level BPE, id-for-id what `open_clip.tokenize` produces (EchoCLIP's text tower needs it).

Text is repaired (ftfy), HTML-unescaped twice, whitespace-collapsed and lower-cased; split into words,
single digits and punctuation runs; each word's UTF-8 bytes are mapped to printable characters and merged
by the ranks of the shipped merges file (OpenAI's, MIT). Ids: 256 byte symbols, the same 256 ending a word
(`</w>`), one id per merge, then <start_of_text> 49406 and <end_of_text> 49407.
"""

import gzip
import html
import os
import zlib

import ftfy
import numpy as np
import regex

from echoclip_jax.runtime import storage
from echoclip_jax.tokenizers.base import as_text_list, check_context_length, pack_rows

DEFAULT_MERGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file: 49408 ids in all
START, END = "<start_of_text>", "<end_of_text>"
_WORD_END = "</w>"
# Special tokens first, then English contractions, letter runs, single digits, other non-space runs.
_PATTERN = regex.compile(
    rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)
_CACHE_LIMIT = 1 << 18  # words; cleared when full so pathological input cannot grow memory without bound


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte value 0..255: printable Latin-1 bytes stand for themselves,
    the rest take code points from 256 upwards in byte order (so BPE never sees whitespace/control)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _byte_order_symbols() -> list[str]:
    # The vocabulary lists the kept bytes first (in byte order), then the remapped ones.
    sym = byte_symbols()
    kept = [s for b, s in enumerate(sym) if ord(s) == b]
    return kept + [s for b, s in enumerate(sym) if ord(s) != b]


def read_merges(path: str) -> list[tuple[str, str]]:
    """The first NUM_MERGES merge pairs of a gzipped CLIP merges file (local path or gs:// URL); errors name
    the file."""
    try:
        raw = gzip.decompress(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file of BPE merges ({e})") from None
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: BPE merges are not UTF-8 text (byte {e.start})") from None
    body = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(body) < NUM_MERGES:
        raise ValueError(f"{path}: {len(body)} merge lines, CLIP's vocabulary needs {NUM_MERGES}")
    merges = []
    for n, line in enumerate(body, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}: line {n} is {line[:80]!r}, expected two symbols separated by a space")
        merges.append((pair[0], pair[1]))
    return merges


def clean(text: str) -> str:
    """open_clip's default ('lower') cleaning."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipBpeTokenizer:
    """CLIP BPE with start/end ids, truncation that keeps the end id, and zero padding."""

    def __init__(self, path: str | None = None, context_length: int = 77):
        self.path = os.fspath(path) if path else DEFAULT_MERGES
        self.context_length = check_context_length(context_length)
        merges = read_merges(self.path)
        symbols = _byte_order_symbols()
        vocab = symbols + [s + _WORD_END for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.byte_to_symbol = byte_symbols()
        self.symbol_to_byte = {s: b for b, s in enumerate(self.byte_to_symbol)}
        self.bos_id, self.eos_id, self.pad_id = self.encoder[START], self.encoder[END], 0
        self.vocab_size = len(vocab)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _merge(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (already in byte symbols): repeatedly merge the best-ranked adjacent pair,
        every non-overlapping occurrence left to right, until no pair has a rank."""
        parts = list(word[:-1]) + [word[-1] + _WORD_END]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            if word == START or word == END:
                ids = (self.encoder[word],)
            else:
                ids = self._merge("".join(self.byte_to_symbol[b] for b in word.encode("utf-8")))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode_one(self, text: str) -> list[int]:
        """One string -> unpadded ids: start, BPE ids, end."""
        ids = [self.bos_id]
        for word in _PATTERN.findall(clean(text)):
            ids.extend(self._word_ids(word))
        ids.append(self.eos_id)
        return ids

    def encode(self, texts) -> np.ndarray:
        """list[str] -> int32 [batch, context_length]."""
        rows = [self.encode_one(t) for t in as_text_list(texts)]
        return pack_rows(rows, self.context_length, eos_id=self.eos_id, pad_id=self.pad_id)

    def decode(self, ids) -> str:
        """Ids -> text, words separated by spaces; stops at the end id, skips the start id (debugging)."""
        symbols = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i != self.bos_id and 0 <= i < self.vocab_size:
                symbols.append(self.decoder[i])
        text = "".join(symbols)
        data = bytearray()
        for ch in text.replace(_WORD_END, " "):
            data.extend(ch.encode("utf-8") if ch == " " else bytes([self.symbol_to_byte[ch]]))
        return data.decode("utf-8", errors="replace").strip()
