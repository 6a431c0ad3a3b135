"""Reports per second for the three tokenizers, on one core, against open_clip's tokenizer as the baseline.

    python bench/tokenizers.py [--reference_dir ../shared/echoclip_reference] [--reports 2000] [--no_append]

The corpus is EchoCLIP-style: reports of 20 template phrases with numbers filled in (about the length of
the reference report) and 2-phrase prompts. clip_bpe is timed cold (empty per-word cache) and warm. The
loader needs about batch_size / step_time reports/s per host: 1024 / 0.5 s = 2,048 for the paper's recipe.
"""

import argparse
import datetime
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from echoclip_jax.tokenizers import get_tokenizer, spm_train  # noqa: E402


def corpus(phrases, n, per_report, seed):
    rng = random.Random(seed)

    def fill(p):
        return "".join(
            part + (str(rng.randint(0, 100)) if i < p.count("<#>") else "") for i, part in enumerate(p.split("<#>"))
        )

    return [" ".join(fill(rng.choice(phrases)) for _ in range(per_report)) for _ in range(n)]


def rate(fn, texts, batch=256):
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference_dir", default=os.path.join(os.path.dirname(REPO), "shared", "echoclip_reference"))
    p.add_argument("--reports", type=int, default=2000)
    p.add_argument("--no_append", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    vocab = os.path.join(args.reference_dir, "template_vocab.txt")
    with open(vocab, encoding="utf-8") as fh:
        phrases = fh.read().split("\n")
    reports = corpus(phrases, args.reports, 20, seed=0)
    prompts = corpus(phrases, args.reports, 2, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "reports.model")
        with open(model, "wb") as fh:
            fh.write(spm_train.train(corpus(phrases, 2000, 20, seed=2), 1000))
        toks = {
            "clip_bpe (cold cache)": get_tokenizer("clip_bpe"),
            "template": get_tokenizer("template", path=vocab),
            "sentencepiece (1k pieces, trained here)": get_tokenizer("sentencepiece", path=model),
        }
        rows = []
        try:
            import open_clip  # noqa: PLC0415 (optional: the interop extra)

            base = {"reports": rate(open_clip.tokenize, reports), "prompts": rate(open_clip.tokenize, prompts)}
            rows.append(("baseline: open_clip.tokenize", base))
        except ImportError:
            base = None
        for name, tok in toks.items():
            rows.append((name, {"reports": rate(tok.encode, reports), "prompts": rate(tok.encode, prompts)}))
            if name.startswith("clip_bpe"):
                rows.append(
                    (
                        "clip_bpe (warm cache)",
                        {"reports": rate(tok.encode, reports), "prompts": rate(tok.encode, prompts)},
                    )
                )

    mean_chars = sum(map(len, reports)) / len(reports)
    lines = [
        f"## tokenizers: reports/s on one core ({datetime.date.today().isoformat()})",
        "",
        f"{len(reports)} reports of 20 template phrases ({mean_chars:.0f} characters on average) and "
        f"{len(prompts)} 2-phrase prompts; batches of 256; context 77.",
        "",
        "| tokenizer | reports/s | prompts/s | reports vs open_clip |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in rows:
        ratio = f"{r['reports'] / base['reports']:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {r['reports']:,.0f} | {r['prompts']:,.0f} | {ratio} |")
    lines += ["", "A loader needs about 2,048 reports/s per host for the paper's recipe (1024 per 0.5 s step).", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(os.path.join(REPO, "BENCHMARKS.md"), "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
