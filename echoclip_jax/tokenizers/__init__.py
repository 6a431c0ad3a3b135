"""Tokenizers by name: `clip_bpe` (EchoCLIP), `template` (EchoCLIP-R), `sentencepiece` (trained on reports).

Each has `.encode(list[str]) -> np.ndarray int32 [batch, context_length]`, `.decode(ids) -> str`,
`.context_length`, `.vocab_size`, and `.bos_id`, `.eos_id`, `.pad_id` (the text tower pools at EOS).
"""

from echoclip_jax.tokenizers.clip_bpe import ClipBpeTokenizer
from echoclip_jax.tokenizers.spm import SentencePieceTokenizer
from echoclip_jax.tokenizers.template import TemplateTokenizer

__all__ = ["get_tokenizer", "from_config", "ClipBpeTokenizer", "TemplateTokenizer", "SentencePieceTokenizer"]

_BY_NAME = {"clip_bpe": ClipBpeTokenizer, "template": TemplateTokenizer, "sentencepiece": SentencePieceTokenizer}


def get_tokenizer(name: str, **kw):
    """`clip_bpe` ([path=merges.gz], context_length), `template` (path=phrase file, context_length),
    `sentencepiece` (path=model file, context_length, clean)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(_BY_NAME)}")
    if name != "clip_bpe" and not kw.get("path"):
        raise ValueError(f"tokenizer {name!r} needs path= (its {'vocabulary' if name == 'template' else 'model'} file)")
    return _BY_NAME[name](**kw)


def from_config(tokenizer_config):
    """From the `config.tokenizer` block (name, path, context_length) of echoclip_jax/config/defaults.py."""
    kw = {"context_length": int(tokenizer_config.context_length)}
    if tokenizer_config.get("path"):
        kw["path"] = tokenizer_config.path
    return get_tokenizer(tokenizer_config.name, **kw)
