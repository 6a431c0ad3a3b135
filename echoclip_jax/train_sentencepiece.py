"""Train a SentencePiece tokenizer on the cleaned, de-identified report corpus.

    python -m echoclip_jax.train_sentencepiece --reports R --vocab_size V --out M.model
        [--template_vocab template_vocab.txt] [--model_type unigram|bpe] [--column report]

R is a data_prep output directory (its train split's reports, already de-identified with each study's
header identifiers: the better source), a CSV with a report column, or a text file with one report per line
(de-identified here by pattern). With --template_vocab, each template phrase's fixed wording becomes one
piece. `echoclip_jax.tokenizers.spm_train` says how; use the model with `--config.tokenizer.name=sentencepiece
--config.tokenizer.path=M.model`. --reports, --template_vocab and --out are each a local path or a gs:// URL.
"""

from __future__ import annotations

import sys

import sentencepiece
from absl import flags

from echoclip_jax.runtime import cli, storage
from echoclip_jax.tokenizers.spm_train import read_reports, template_pieces, train

FLAGS = cli.flag_values()
flags.DEFINE_string(
    "reports",
    None,
    "reports CSV, one-report-per-line text, or data_prep output dir (local path or gs:// URL)",
    flag_values=FLAGS,
)
flags.DEFINE_integer("vocab_size", None, "pieces in the model", flag_values=FLAGS)
flags.DEFINE_string("out", None, "model file to write (e.g. reports.model): local path or gs:// URL", flag_values=FLAGS)
flags.DEFINE_string(
    "template_vocab",
    "",
    "template phrase file (local path or gs:// URL): its fixed wording becomes pieces",
    flag_values=FLAGS,
)
flags.DEFINE_string("column", "report", "report column of a CSV", flag_values=FLAGS)
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece's model type", flag_values=FLAGS)
flags.DEFINE_boolean("byte_fallback", False, "unseen characters become byte pieces, not unk", flag_values=FLAGS)
flags.mark_flags_as_required(["reports", "vocab_size", "out"], flag_values=FLAGS)


def _train(f) -> None:
    pieces = template_pieces(f.template_vocab) if f.template_vocab else []
    model = train(
        read_reports(f.reports, f.column),
        f.vocab_size,
        user_pieces=pieces,
        model_type=f.model_type,
        byte_fallback=f.byte_fallback,
        source=f.reports,
    )
    storage.write_bytes(f.out, model)  # whole or not at all, its folder created
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    print(f"wrote {f.out}: {sp.get_piece_size()} pieces ({len(pieces)} from the template)")


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        _train, FLAGS, argv, name="train_sentencepiece", doc=__doc__, paths=("reports", "template_vocab", "out")
    )


if __name__ == "__main__":
    sys.exit(main())
