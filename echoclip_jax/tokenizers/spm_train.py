"""Training a SentencePiece tokenizer on the cleaned report corpus (`python -m echoclip_jax.train_sentencepiece`).

Reports come from a data_prep output directory (the `report` of every record of the train split, already
de-identified with each study's header identifiers), a CSV with a report column, or a text file with one
report per line. Raw reports from a CSV or text file are de-identified by data_prep.report_deid's patterns
(no headers are at hand, so prefer the output directory), because a tokenizer's pieces can memorise a name.
Reports are `clean_text`-normalised and de-duplicated (a study's report is stored once per video). With a
template vocabulary, the fixed wording of each template phrase (the text between its `<#>` variables, at
least two words) becomes a user-defined piece, so a whole echo concept is one token. Ids: pad 0, unk 1,
BOS 2, EOS V-1: the highest id, as in CLIP BPE and the template tokenizer, so the text tower's argmax
pooling finds the end of the text.
"""

from __future__ import annotations

import csv
import io
import logging
import os

import sentencepiece

from data_prep import records
from data_prep.report_deid import Deidentifier
from data_prep.reports import clean_text
from echoclip_jax.runtime import storage
from echoclip_jax.tokenizers.template import PLACEHOLDER, read_vocab

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID = 0, 1, 2  # EOS is vocab_size - 1
_WORD = "▁"  # SentencePiece's whitespace symbol


def read_reports(path: str, column: str = "report") -> list[str]:
    """Report texts from a data_prep output directory, or de-identified ones from a CSV or text file (each a
    local path or gs:// URL); errors name the path."""
    if storage.isdir(path):
        shards = records.list_shards(path, "train")
        if not shards:
            raise ValueError(f"{path}: no train-*.tfrecord shards (expected a data_prep.convert output)")
        texts = []
        for shard in shards:
            for _, data in records.iter_tfrecord(shard):
                texts.extend(r.decode("utf-8") for r in records.decode_example(data).get("report", []))
        return texts
    if not storage.exists(path):
        raise FileNotFoundError(f"reports file not found: {path}")
    try:
        text = storage.read_text(path)
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if not reader.fieldnames or column not in reader.fieldnames:
                raise ValueError(f"{path}: no {column!r} column (columns: {reader.fieldnames}); use --column")
            texts = [row[column] or "" for row in reader]
        else:
            texts = text.splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed CSV ({e})") from None

    deid = Deidentifier()
    texts = [deid(t)[0] for t in texts]
    log.warning(
        "%s: raw reports, de-identified by pattern only (no DICOM headers); a data_prep output directory "
        "is scrubbed with each study's own identifiers too",
        path,
    )
    return texts


def corpus(texts) -> list[str]:
    """Cleaned, non-empty, de-duplicated reports in first-seen order."""
    seen = {}
    for t in texts:
        c = clean_text(t).strip()
        if c:
            seen.setdefault(c, None)
    return list(seen)


def template_pieces(vocab_path: str) -> list[str]:
    """User-defined pieces from the fixed wording of template phrases (spaces as ▁, one leading ▁)."""
    pieces = {}
    for phrase in read_vocab(vocab_path):
        for i, fragment in enumerate(phrase.split(PLACEHOLDER)):
            # A fragment glued to a number ("<#>MMHG") does not start a word; pieces must.
            starts_word = i == 0 or fragment[:1].isspace()
            words = fragment.split()
            if starts_word and len(words) >= 2:
                pieces.setdefault(_WORD + _WORD.join(words), None)
    return list(pieces)


def train(
    texts,
    vocab_size: int,
    *,
    user_pieces=(),
    model_type: str = "unigram",
    byte_fallback: bool = False,
    source: str = "reports",
) -> bytes:
    """Train on cleaned report texts -> serialized model. clean_text is the only normaliser (identity rule)."""
    sentences = corpus(texts)
    if not sentences:
        raise ValueError(f"{source}: no non-empty reports to train on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=list(user_pieces),
            normalization_rule_name="identity",
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            max_sentence_length=1 << 16,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=vocab_size - 1,
            minloglevel=2,
            num_threads=os.cpu_count() or 1,
        )
    except RuntimeError as e:
        raise ValueError(
            f"{source}: sentencepiece training failed for vocab_size={vocab_size} on {len(sentences)} distinct "
            f"reports with {len(user_pieces)} user-defined pieces (vocab_size must cover the characters and "
            f"user pieces, and not exceed what the corpus supports): {e}"
        ) from None
    return model.getvalue()
