"""A SentencePiece model trained on the reports (see train_sentencepiece), wrapped to the shared layout:
BOS, pieces, EOS, padding, truncation that keeps EOS. Text is `clean_text`-normalised first, as the
training corpus was, so prompts and reports are tokenised the same way."""

import os

import numpy as np
import sentencepiece

from data_prep.reports import clean_text
from echoclip_jax.runtime import storage
from echoclip_jax.tokenizers.base import as_text_list, check_context_length, pack_rows


def load_model(path: str) -> sentencepiece.SentencePieceProcessor:
    """A SentencePiece model file (local path or gs:// URL) -> processor; a missing or malformed file is an
    error naming it. The model is read as bytes and loaded from them (sentencepiece opens only local files)."""
    if not storage.exists(path):
        raise FileNotFoundError(f"sentencepiece model file not found: {path}")
    if storage.isdir(path):
        raise IsADirectoryError(f"sentencepiece model path is not a file: {path}")
    proto = storage.read_bytes(path)
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, TypeError) as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    if sp.get_piece_size() == 0:
        raise ValueError(f"{path}: not a sentencepiece model (no pieces)")
    return sp


class SentencePieceTokenizer:
    def __init__(self, path: str, context_length: int = 77, clean: bool = True):
        self.path = os.fspath(path)
        self.context_length = check_context_length(context_length)
        self.clean = clean
        self.sp = load_model(self.path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"{self.path}: the model has no BOS/EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id}); "
                "train it with python -m echoclip_jax.train_sentencepiece"
            )
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts) -> np.ndarray:
        """list[str] -> int32 [batch, context_length]."""
        texts = as_text_list(texts)
        if self.clean:
            texts = [clean_text(t) for t in texts]
        pieces = self.sp.encode(texts, out_type=int) if texts else []
        rows = ([self.bos_id, *p, self.eos_id] for p in pieces)
        return pack_rows(rows, self.context_length, eos_id=self.eos_id, pad_id=self.pad_id)

    def decode(self, ids) -> str:
        """Ids -> text, from after BOS up to EOS (debugging)."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id) and 0 <= i < self.vocab_size:
                out.append(i)
        return self.sp.decode(out)
