"""TODO cmd"""
import argparse
import os
import sys

import sentencepiece

from echoclip_jax.tokenizers.spm_train import read_reports, template_pieces, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", required=True, help="reports CSV, one-report-per-line text, or data_prep output dir")
    p.add_argument("--vocab_size", required=True, type=int)
    p.add_argument("--out", required=True, help="model file to write (e.g. reports.model)")
    p.add_argument("--template_vocab", default="", help="template phrase file: its fixed wording becomes pieces")
    p.add_argument("--column", default="report", help="report column of a CSV")
    p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--byte_fallback", action="store_true", help="unseen characters become byte pieces, not unk")
    args = p.parse_args(argv)
    try:
        pieces = template_pieces(args.template_vocab) if args.template_vocab else []
        model = train(read_reports(args.reports, args.column), args.vocab_size, user_pieces=pieces,
                      model_type=args.model_type, byte_fallback=args.byte_fallback, source=args.reports)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(model)
    os.replace(tmp, args.out)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    print(f"wrote {args.out}: {sp.get_piece_size()} pieces ({len(pieces)} from the template)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
