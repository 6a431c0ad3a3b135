"""What every tokenizer shares: the batch layout (start, ids, end, pad; truncation keeps the end id)."""

from typing import Iterable, Sequence

import numpy as np


def as_text_list(texts) -> list[str]:
    """A str or an iterable of str -> list[str]; anything else is a TypeError saying what was found."""
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"tokenizer input {i} is {type(t).__name__}, expected str")
    return texts


def pack_rows(rows: Iterable[Sequence[int]], context_length: int, *, eos_id: int, pad_id: int = 0) -> np.ndarray:
    """Full id sequences (start ... end) -> int32 [batch, context_length]: cut to length with the end id
    kept as the last id, or padded with `pad_id`."""
    rows = list(rows)
    out = np.full((len(rows), context_length), pad_id, dtype=np.int32)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            out[i] = ids[:context_length]
            out[i, -1] = eos_id
        else:
            out[i, : len(ids)] = ids
    return out


def check_context_length(context_length) -> int:
    if not isinstance(context_length, (int, np.integer)) or isinstance(context_length, bool) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for the start and end ids), got {context_length!r}")
    return int(context_length)
