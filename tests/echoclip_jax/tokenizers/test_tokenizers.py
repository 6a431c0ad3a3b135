"""Tokenizers: id parity with what the published weights were trained with, layout properties, bad files."""

import csv
import functools
import gzip
import json
import os
import random

import numpy as np
import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import records, synthetic
from data_prep.reports import clean_text
from echoclip_jax import train_sentencepiece
from echoclip_jax.config.defaults import get_base_config
from echoclip_jax.runtime import storage
from echoclip_jax.tokenizers import SentencePieceTokenizer, from_config, get_tokenizer
from echoclip_jax.tokenizers import spm_train as tsp
from echoclip_jax.tokenizers.clip_bpe import clean as clip_clean

# --- Facts of the released tokenizers (the README of the reference data, CLIP's vocabulary) -------------
TEMPLATE_BOS, TEMPLATE_EOS, TEMPLATE_VOCAB_SIZE = 907, 908, 909
VARIABLE_OFFSET = 775  # 5 specials + 770 phrases
SEP = 106  # "‡" in the variable vocabulary (5 specials + "0".."100")
MILD, SEVERE = 107, 109
DOT = {f".{i}": 112 + i for i in range(10)}
ZERO = {f"0{i}": 122 + i for i in range(10)}
CLIP_SOT, CLIP_EOT = 49406, 49407


def num(n):  # variable-vocabulary id of the number token "n" (0..100)
    return VARIABLE_OFFSET + 5 + n


@pytest.fixture(scope="module")
def vocab_path(reference_dir):
    return str(reference_dir / "template_vocab.txt")


@pytest.fixture(scope="module")
def phrases(vocab_path):
    with open(vocab_path, encoding="utf-8") as fh:
        return fh.read().split("\n")


@pytest.fixture(scope="module")
def template(vocab_path):
    return get_tokenizer("template", path=vocab_path)


@pytest.fixture(scope="module")
def clip():
    return get_tokenizer("clip_bpe")


def pid(phrases, phrase):
    return 5 + phrases.index(phrase)


def _pad(ids, length=77):
    return ids + [0] * (length - len(ids))


# --- template ------------------------------------------------------------------------------------------


def test_template_reference_examples(template, reference_dir):
    with open(reference_dir / "template_tokenizer_examples.json") as fh:
        examples = json.load(fh)
    assert len(examples) == 5
    assert template.vocab_size == TEMPLATE_VOCAB_SIZE
    assert (template.bos_id, template.eos_id) == (TEMPLATE_BOS, TEMPLATE_EOS)
    got = template.encode([ex["report"] for ex in examples])
    assert got.dtype == np.int32 and got.shape == (5, 77)
    for row, ex in zip(got, examples):
        assert row.tolist() == ex["template_ids"]
    # What the loader sees: reports stored already cleaned by data_prep.
    cleaned = template.encode([ex["clean_text"] for ex in examples])
    assert cleaned.tolist() == [ex["template_ids"] for ex in examples]


def test_template_every_phrase_has_its_id(template, phrases):
    """Phrase i alone is id 5+i, followed by its variables' ids ("‡" between variables). Each `<#>` is
    filled with 7.5 ("7" ".5"), or with 7 right after a letter ("CM<#>" is cm2: a letter + decimal would be
    an ICD code, and a bare integer before a period, "IS 7.", is read as the number "7.", as released)."""
    texts, want = [], []
    for i, phrase in enumerate(phrases):
        parts = phrase.split("<#>")
        text, variables = parts[0], []
        for before, after in zip(parts[:-1], parts[1:]):
            after_letter = before[-1:].isalpha()
            text += ("7" if after_letter else "7.5") + after
            variables += [VARIABLE_OFFSET + SEP] if variables else []
            variables += [num(7)] if after_letter else [num(7), VARIABLE_OFFSET + DOT[".5"]]
        texts.append(text)
        want.append(_pad([TEMPLATE_BOS, 5 + i, *variables, TEMPLATE_EOS]))
    got = template.encode(texts)
    mismatched = [phrases[i] for i in range(len(phrases)) if got[i].tolist() != want[i]]
    assert not mismatched, mismatched[:3]


def test_template_numbers_and_severities(template, phrases):
    lvef = pid(phrases, "LV EJECTION FRACTION IS <#>%. ")
    gradient = pid(phrases, "THE PEAK TRANSAORTIC GRADIENT IS <#>MMHG. ")
    cases = {
        "LV EJECTION FRACTION IS 105%.": [lvef, num(10), num(5)],  # leftmost-longest: "10" "5"
        "LV EJECTION FRACTION IS 100%.": [lvef, num(100)],
        "LV EJECTION FRACTION IS 2.29%.": [lvef, num(2), VARIABLE_OFFSET + DOT[".2"], num(9)],
        "LV EJECTION FRACTION IS 007%.": [lvef, VARIABLE_OFFSET + ZERO["00"], num(7)],
        "THE PEAK TRANSAORTIC GRADIENT IS 20.0MMHG.": [gradient, num(20), VARIABLE_OFFSET + DOT[".0"]],
        # lower case, "was", a space before the unit, and no final period are normalised away
        "the peak transaortic gradient was 20.0 mmHg": [gradient, num(20), VARIABLE_OFFSET + DOT[".0"]],
    }
    got = template.encode(list(cases))
    for row, ids in zip(got, cases.values()):
        assert row.tolist() == _pad([TEMPLATE_BOS, *ids, TEMPLATE_EOS])
    severity = [p for p in phrases if p.startswith("<#> DIASTOLIC DYSFUNCTION. ")][0]
    for word, ids in {"MILD": [MILD], "SEVERE": [SEVERE], "VERY SEVERE": [0, SEVERE]}.items():
        row = template.encode([severity.replace("<#>", word)])[0].tolist()
        assert row == _pad([TEMPLATE_BOS, pid(phrases, severity), *[VARIABLE_OFFSET + i for i in ids], TEMPLATE_EOS])


def test_template_messy_text(template, phrases):
    lvef = pid(phrases, "LV EJECTION FRACTION IS <#>%. ")
    atrium = pid(phrases, "<#> DILATED LEFT ATRIUM. ")  # severity words are variables
    # An unknown sentence is dropped with its number (45); dates and ICD codes vanish.
    text = "Patient is 45 years old. lv ejection fraction was 55 %. 03/02/2019 I50.9 Mildly dilated left atrium."
    want = [TEMPLATE_BOS, lvef, num(55), atrium, VARIABLE_OFFSET + MILD, TEMPLATE_EOS]
    assert template.encode([text])[0].tolist() == _pad(want)
    empty = _pad([TEMPLATE_BOS, TEMPLATE_EOS])
    for junk in ["", "x", "   ", "日本語のテキスト 123", "<#> <#> 5", "‡‡‡", "[UNK] [PAD]", "\x00\x01"]:
        assert template.encode([junk])[0].tolist() == empty, junk


def test_template_overlong_report_is_cut_keeping_eos(template, reference_dir):
    report = (reference_dir / "example_report.txt").read_text()
    full = template.encode_one(report * 3)
    assert len(full) > 77
    row = template.encode([report * 3])[0]
    assert row[0] == TEMPLATE_BOS and row[-1] == TEMPLATE_EOS
    assert row[:-1].tolist() == full[:76]


_SEVERITIES = ["MILD", "MODERATE", "SEVERE", "MILD/MODERATE", "MODERATE/SEVERE"]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_template_decode_round_trip(template, phrases, data):
    """A phrase with its variables filled in comes back from decode(encode(.)) unchanged."""
    parts = phrases[data.draw(st.integers(0, len(phrases) - 1))].split("<#>")
    text = parts[0]
    for before, after in zip(parts[:-1], parts[1:]):
        if before[-1:].isalpha():  # cm<#> (cm2): integers only (see test_template_every_phrase_has_its_id)
            value = st.integers(0, 100).map(str)
        else:
            value = st.builds("{}.{}".format, st.integers(0, 100), st.integers(0, 9))
            if before[-1:] in ("", " ") and after[:1] in ("", " "):  # a severity is a variable as a word only
                value = st.one_of(value, st.sampled_from(_SEVERITIES))
        text += data.draw(value) + after
    assert clean_text(text) == text
    assert template.decode(template.encode([text])[0]) == text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"PHRASE ONE. \n\nPHRASE TWO. \n", "line 2 is empty"),
        (b"PHRASE ONE. \nPHRASE ONE. \n", "line 2 repeats line 1"),
        (b"\x1f\x8b\x08\x00\xff\xfe", "not UTF-8"),
    ],
)
def test_template_bad_vocab_file(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        get_tokenizer("template", path=str(path))
    assert str(path) in str(e.value)


def test_template_missing_vocab_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        get_tokenizer("template", path=str(path))
    with pytest.raises(ValueError, match="path="):
        get_tokenizer("template")


# --- layout properties shared by all tokenizers --------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _with_length(cls, path, length):
    return cls(path, context_length=length)


def _check_layout(tok, texts, rows):
    assert rows.shape == (len(texts), tok.context_length) and rows.dtype == np.int32
    for row in rows.tolist():
        assert row[0] == tok.bos_id
        end = row.index(tok.eos_id, 1)  # the first EOS closes the text; only padding follows
        assert all(i == tok.pad_id for i in row[end + 1 :])
        assert all(0 <= i < tok.vocab_size for i in row)
        assert max(row) == tok.eos_id  # the text tower's argmax pooling finds the end of the text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=400), max_size=4), length=st.integers(2, 80))
def test_padding_and_truncation_properties(template, clip, texts, length):
    for tok in (template, clip):
        full = [tok.encode_one(t) for t in texts]
        assert all(max(ids) == ids[-1] == tok.eos_id for ids in full)  # argmax pooling finds the end
        short = _with_length(type(tok), tok.path, length)
        rows = short.encode(texts)
        _check_layout(short, texts, rows)
        for ids, row in zip(full, rows.tolist()):
            if len(ids) <= length:
                assert row[: len(ids)] == ids
            else:  # cut to length, the end id kept last
                assert row[:-1] == ids[: length - 1] and row[-1] == tok.eos_id


# --- CLIP BPE ------------------------------------------------------------------------------------------


def test_clip_known_ids(clip):
    assert (clip.vocab_size, clip.bos_id, clip.eos_id, clip.context_length) == (49408, CLIP_SOT, CLIP_EOT, 77)
    rows = clip.encode(["a photo of a cat", "A  PHOTO of a dog!!", ""])
    assert rows[0].tolist() == _pad([CLIP_SOT, 320, 1125, 539, 320, 2368, CLIP_EOT])
    assert rows[1, :6].tolist() == [CLIP_SOT, 320, 1125, 539, 320, 1929]
    assert rows[2].tolist() == _pad([CLIP_SOT, CLIP_EOT])
    long = clip.encode(["word " * 200])[0]
    assert long[-1] == CLIP_EOT and long[-2] != CLIP_EOT


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60).filter(lambda t: "<" not in t and "&" not in t))  # no special-token spelling
def test_clip_decode_round_trip(clip, text):
    """Byte-level BPE loses nothing but spacing: decode(encode(t)) is the cleaned text."""
    ids = clip.encode_one(text)
    if len(ids) > clip.context_length:
        return
    assert "".join(clip.decode(ids).split()) == "".join(clip_clean(text).split())


def _varied_strings(reference_dir, n=3000, seed=0):
    rng = random.Random(seed)
    words = (
        "the left ventricle EJECTION fraction is 55% mmHg 2.29 don't it'S we'll naïve café 日本語 😀 Ⅻ ﬁ ١٢٣ "
        "— İ ß Ã© &amp; &lt;b&gt; <start_of_text> <END_OF_TEXT> \x1b[31m"
    ).split(" ") + ["\u00a0", "\t", "\n", "\x0b", "\u200b", "\x00"]
    prompts = json.loads((reference_dir / "prompts_used.json").read_text())
    texts = [s for s in json.dumps(prompts).split('"') if len(s) > 3][:300]
    texts += [(reference_dir / "example_report.txt").read_text(), "", " ", "a" * 5000]
    while len(texts) < n:
        r = rng.random()
        if r < 0.3:
            texts.append("".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 40))))
        elif r < 0.35:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(100, 400))))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
    return texts


@pytest.mark.interop
def test_clip_parity_with_open_clip(clip, reference_dir):
    open_clip = pytest.importorskip("open_clip")
    texts = _varied_strings(reference_dir)
    want = open_clip.tokenize(texts).numpy()
    got = clip.encode(texts)
    bad = [texts[i][:80] for i in np.nonzero((want != got).any(axis=1))[0]]
    assert not bad, bad[:5]


@pytest.mark.interop
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_clip_parity_with_open_clip_any_text(clip, text):
    open_clip = pytest.importorskip("open_clip")
    assert clip.encode([text]).tolist() == open_clip.tokenize([text]).tolist()


def test_clip_bad_merges_file(tmp_path):
    missing = tmp_path / "missing.txt.gz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_tokenizer("clip_bpe", path=str(missing))
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="gzip") as e:
        get_tokenizer("clip_bpe", path=str(not_gzip))
    assert str(not_gzip) in str(e.value)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="merge lines") as e:
        get_tokenizer("clip_bpe", path=str(short))
    assert str(short) in str(e.value)


# --- sentencepiece -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_corpus(phrases):
    rng = random.Random(0)
    return [
        " ".join(rng.choice(phrases).replace("<#>", str(rng.randint(0, 100))) for _ in range(8)) for _ in range(400)
    ]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, report_corpus, vocab_path):
    d = tmp_path_factory.mktemp("spm")
    with open(d / "reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["StudyInstanceUID", "report"])
        w.writerows([f"1.2.{i}", r] for i, r in enumerate(report_corpus))
    out = d / "reports.model"
    argv = [
        "train_sentencepiece",
        "--reports",
        str(d / "reports.csv"),
        "--vocab_size",
        "1000",
        "--out",
        str(out),
        "--template_vocab",
        vocab_path,
    ]
    assert train_sentencepiece.main(argv) == 0
    return str(out)


def test_sentencepiece_trained_model(spm_model, report_corpus, phrases):
    tok = get_tokenizer("sentencepiece", path=spm_model, context_length=77)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 999, 1000)
    rows = tok.encode(report_corpus[:20])
    _check_layout(tok, report_corpus[:20], rows)
    # A template phrase with no variables is one piece.
    phrase = "THE INTERATRIAL SEPTUM IS THIN AND HYPERMOBILE. "
    assert phrase in phrases
    row = tok.encode([phrase])[0].tolist()
    assert row[:3] == [2, tok.sp.piece_to_id("▁THE▁INTERATRIAL▁SEPTUM▁IS▁THIN▁AND▁HYPERMOBILE."), 999]
    assert tok.sp.piece_to_id("▁THE▁INTERATRIAL▁SEPTUM▁IS▁THIN▁AND▁HYPERMOBILE.") != tok.sp.unk_id()
    # Round trip of (cleaned) reports that fit.
    short = [r for r in report_corpus if len(tok.sp.encode(clean_text(r))) <= 75][:10]
    assert short
    for r in short:
        assert tok.decode(tok.encode([r])[0]) == clean_text(r).strip()
    long = tok.encode([" ".join(report_corpus)])[0]
    assert long[0] == 2 and long[-1] == 999 and 0 not in long.tolist()


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(max_size=300), max_size=4), length=st.integers(2, 80))
def test_sentencepiece_padding_and_truncation(spm_model, texts, length):
    tok = _with_length(SentencePieceTokenizer, spm_model, length)
    rows = tok.encode(texts)
    _check_layout(tok, texts, rows)
    for text, row in zip(texts, rows.tolist()):
        ids = [2, *tok.sp.encode(clean_text(text)), 999]
        assert row[: min(len(ids), length) - 1] == ids[: min(len(ids), length) - 1]


def test_sentencepiece_corpus_sources(tmp_path, report_corpus):
    txt = tmp_path / "reports.txt"
    txt.write_text("\n".join(report_corpus[:50] + report_corpus[:50] + [""]))
    assert len(tsp.corpus(tsp.read_reports(str(txt)))) == 50  # cleaned, de-duplicated, empties dropped

    shard = tmp_path / "train-00000-of-00001.tfrecord"
    with records.TFRecordWriter(str(shard)) as w:
        for r in report_corpus[:30]:
            w.write(records.encode_example({"report": clean_text(r).encode()}))
    assert tsp.read_reports(str(tmp_path)) == [clean_text(r) for r in report_corpus[:30]]


def test_sentencepiece_bad_inputs(tmp_path, report_corpus):
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model") as e:
        get_tokenizer("sentencepiece", path=str(bad_model))
    assert str(bad_model) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        get_tokenizer("sentencepiece", path=str(tmp_path / "nope.model"))
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("id,text\n1,LV IS NORMAL\n")
    with pytest.raises(ValueError, match="no 'report' column"):
        tsp.read_reports(str(csv_path))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        tsp.read_reports(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="vocab_size=100000"):
        tsp.train(report_corpus[:20], 100000)
    with pytest.raises(ValueError, match="no non-empty reports"):
        tsp.train(["", "  "], 100)
    # The command line reports the problem in one line and exits non-zero, writing nothing.
    out = tmp_path / "m.model"
    argv = ["train_sentencepiece", "--reports", str(csv_path), "--vocab_size", "50", "--out", str(out)]
    assert train_sentencepiece.main(argv) == 1
    assert not out.exists()


def test_sentencepiece_trained_from_and_into_a_bucket(spm_model, vocab_path, report_corpus, bucket, capsys):
    """train_sentencepiece reads its reports and template vocabulary from a bucket and writes its model there;
    the tokenizers load their files from a bucket and encode as from local disk."""
    storage.copy(os.path.join(os.path.dirname(spm_model), "reports.csv"), f"{bucket}/reports.csv")
    storage.copy(vocab_path, f"{bucket}/template_vocab.txt")
    argv = ["train_sentencepiece", "--reports", f"{bucket}/reports.csv", "--vocab_size", "1000"]
    argv += ["--out", f"{bucket}/m/reports.model", "--template_vocab", f"{bucket}/template_vocab.txt"]
    assert train_sentencepiece.main(argv) == 0
    texts = report_corpus[:20]
    local = get_tokenizer("sentencepiece", path=spm_model).encode(texts)
    np.testing.assert_array_equal(get_tokenizer("sentencepiece", path=f"{bucket}/m/reports.model").encode(texts), local)
    template = get_tokenizer("template", path=f"{bucket}/template_vocab.txt")
    np.testing.assert_array_equal(template.encode(texts), get_tokenizer("template", path=vocab_path).encode(texts))
    assert train_sentencepiece.main([*argv[:-4], "--out", "s3://b/m.model"]) == 2
    assert "--out=s3://b/m.model: the scheme s3:// is not supported" in capsys.readouterr().err


# --- construction by name and from the config --------------------------------------------------------


def test_get_tokenizer_and_from_config(vocab_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")
    cfg = get_base_config()
    assert from_config(cfg.tokenizer).encode(["a cat"])[0, :4].tolist() == [CLIP_SOT, 320, 2368, CLIP_EOT]
    cfg.tokenizer.name, cfg.tokenizer.path, cfg.tokenizer.context_length = "template", vocab_path, 16
    assert from_config(cfg.tokenizer).encode(["x"]).shape == (1, 16)
    with pytest.raises(ValueError, match="context_length"):
        get_tokenizer("clip_bpe", context_length=1)
    with pytest.raises(TypeError, match="input 1 is bytes"):
        get_tokenizer("clip_bpe").encode(["ok", b"bytes"])


def test_sentencepiece_from_raw_reports_learns_no_identifier(tmp_path):
    """A tokenizer trained on a hospital's raw reports CSV must not hold a piece of a name or number."""

    synthetic.generate(tmp_path / "syn", patients=12, seed=2, small=True)
    texts = tsp.read_reports(str(tmp_path / "syn" / "reports.csv"))
    model = tsp.train(texts, 120, source="reports.csv")

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    pieces = " ".join(sp.id_to_piece(i) for i in range(sp.get_piece_size())).replace("▁", " ").upper()
    corpus_text = " ".join(tsp.corpus(texts))
    by_field = json.loads((tmp_path / "syn" / "phi.json").read_text())["by_field"]
    staff = by_field["report_staff"]
    assert staff and not [s for s in staff if s in corpus_text or s in pieces]
    assert not [s for s in by_field["report_contact"] + by_field["report_dates"] if s.upper() in corpus_text]
    assert "EJECTION FRACTION" in corpus_text
