"""Hostile inputs: a corpus of broken and unusual files built here, the conversion must list every one.

Every input ends in the manifest as converted or skipped with a reason; nothing crashes or hangs; every
record written is whole. Plus a fuzz test of the DICOM reader and the per-video time and size limits.
"""

import csv
import glob
import io
import json
import os
import random
import shutil
import tempfile
import threading
import time

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from data_prep import convert, dicom_io, options, plan, records, shards, synthetic

SALT = "hostile-salt-0d9e"
JPEG, NATIVE = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_cohort")
    synthetic.generate(out, patients=3, seed=21, small=True)
    return out


def _source(cohort, syntax):
    for path in sorted(glob.glob(str(cohort / "dicom" / "**" / "*.dcm"), recursive=True)):
        if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax:
            return path
    raise AssertionError(f"the cohort has no {syntax} file")


def _variant(src, dst, edit, seed):
    """A copy of src with a fresh SOPInstanceUID (so it is not a duplicate) and `edit(ds)` applied."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(dst), str(seed)])
    edit(ds)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    ds.save_as(dst, enforce_file_format=False)


def _mutate_bytes(path, fn):
    data = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(fn(data)))


def _pixel_offset(path):
    data = open(path, "rb").read()
    return data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data tag


def _flip(data, lo, hi, n, rng):
    for _ in range(n):
        i = rng.randrange(lo, hi)
        data[i] ^= 1 << rng.randrange(8)
    return data


def _build_corpus(cohort, root):
    """-> (export dir, reports csv, {relative path: expected reason substring or None = any outcome})."""
    rng = random.Random(0)
    export = root / "export"
    shutil.copytree(cohort / "dicom", export)
    good = sorted(os.path.relpath(p, export) for p in glob.glob(str(export / "**" / "*.dcm"), recursive=True))
    studies = {p: str(pydicom.dcmread(export / p, stop_before_pixels=True).StudyInstanceUID) for p in good}
    jpeg, native = _source(cohort, JPEG), _source(cohort, NATIVE)
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in (jpeg, native)}
    missing_study, latin1_study, broken_study = sorted(set(studies.values()) - sources)[-3:]
    expect = {p: None for p in good}
    for p, study in studies.items():
        expect[p] = {missing_study: "no report", latin1_study: "UTF-8", broken_study: "quoting"}.get(study)
    h = export / "hostile"

    def add(name, reason, src, edit=lambda ds: None, raw=None):
        _variant(src, h / name, edit, len(expect))
        if raw:
            _mutate_bytes(h / name, raw)
        expect[f"hostile/{name}"] = reason

    def drop_pixels(ds):
        del ds.PixelData

    def half_frames(ds):
        n = int(ds.NumberOfFrames)
        ds.PixelData = encapsulate(list(generate_frames(ds.PixelData, number_of_frames=n))[: n // 2])

    def setter(**kw):
        return lambda ds: [setattr(ds, k, v) for k, v in kw.items()]

    for i in range(3):  # truncated at random byte offsets: in the header, and in the pixel data
        add(f"trunc_header_{i}.dcm", "", jpeg, raw=lambda d: d[: rng.randrange(132, _pixel_offset(jpeg) - 200)])
        add(f"trunc_pixels_{i}.dcm", "", jpeg, raw=lambda d: d[: rng.randrange(len(d) // 3, len(d) - 10)])
        add(f"trunc_native_{i}.dcm", "", native, raw=lambda d: d[: rng.randrange(len(d) // 3, len(d) - 10)])
    for i in range(3):  # bit flips: anything may happen, but the file must end in the manifest
        add(f"flip_pixels_{i}.dcm", None, jpeg, raw=lambda d: _flip(d, len(d) - 20000, len(d), 40, rng))
        add(f"flip_header_{i}.dcm", None, jpeg, raw=lambda d: _flip(d, 132, 1500, 6, rng))
    add("no_pixeldata.dcm", "no PixelData", native, drop_pixels)
    add("frames_more_than_data.dcm", "", native, lambda ds: setattr(ds, "NumberOfFrames", int(ds.NumberOfFrames) * 3))
    add("frames_fewer_than_data.dcm", None, native, lambda ds: setattr(ds, "NumberOfFrames", 2))
    add("zero_frames.dcm", "zero frames", native, setter(NumberOfFrames=0))
    add("zero_rows.dcm", "too small", native, setter(Rows=0))
    add("absurd_size.dcm", "too large", native, setter(Rows=65535, Columns=65535))
    add("absurd_size_jpeg.dcm", "too large", jpeg, setter(Rows=65535, Columns=65535))
    add(
        "mpeg2_syntax.dcm",
        "unsupported transfer syntax",
        jpeg,
        lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2.4.100"),
    )
    add("encapsulated_missing_frames.dcm", "", jpeg, half_frames)
    add("bits_16_on_8_bit_data.dcm", "", native, setter(BitsAllocated=16, BitsStored=16, HighBit=15))
    add("unknown_photometric.dcm", "", native, setter(PhotometricInterpretation="XYZ"))
    add("no_patient_id.dcm", "no PatientID", jpeg, lambda ds: delattr(ds, "PatientID"))
    add("no_study_uid.dcm", "no StudyInstanceUID", jpeg, lambda ds: delattr(ds, "StudyInstanceUID"))
    shutil.copy(export / good[0], h / "duplicate_copy.dcm")
    expect["hostile/duplicate_copy.dcm"] = "duplicate SOPInstanceUID"
    (h / "notes.dcm").write_text("this is a text file with a .dcm name\n")
    expect["hostile/notes.dcm"] = "not a DICOM file"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    (h / "picture.dcm").write_bytes(buf.getvalue())
    expect["hostile/picture.dcm"] = "not a DICOM file"
    (h / "preamble_then_noise.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.randbytes(4000))
    expect["hostile/preamble_then_noise.dcm"] = ""
    (h / "empty.dcm").write_bytes(b"")
    expect["hostile/empty.dcm"] = "empty file"
    os.mkdir(h / "a_directory.dcm")  # not an input: must not crash the walk
    os.symlink("loop.dcm", h / "loop.dcm")
    expect["hostile/loop.dcm"] = "cannot stat"
    os.symlink("does_not_exist.dcm", h / "dangling.dcm")
    expect["hostile/dangling.dcm"] = "cannot stat"
    os.mkfifo(h / "fifo.dcm")  # opening it would block forever
    expect["hostile/fifo.dcm"] = "not a regular file"

    rows = list(csv.DictReader(open(cohort / "reports.csv", newline="")))
    reports = root / "reports.csv"
    with open(reports, "wb") as f:
        out = io.StringIO(newline="")
        w = csv.writer(out)
        w.writerow(list(rows[0]))
        for r in rows:
            if r["StudyInstanceUID"] in (missing_study, latin1_study, broken_study):
                continue
            w.writerow(list(r.values()))
        f.write(out.getvalue().encode())
        latin1 = next(r for r in rows if r["StudyInstanceUID"] == latin1_study)
        f.write(
            f'{latin1_study},{latin1["AccessionNumber"]},"'.encode()
            + "SÉVÈRE REGURGITATION".encode("latin-1")
            + b'"\r\n'
        )
        f.write(f'{broken_study},X,"UNCLOSED QUOTE SWALLOWS WHAT FOLLOWS\r\n'.encode())
        f.write(b'1.2.3.4.5,Y,"A LATER ROW"\r\n')
    return export, reports, expect


def test_every_hostile_input_is_listed_and_every_record_is_whole(cohort, tmp_path):
    export, reports, expect = _build_corpus(cohort, tmp_path)
    assert (
        len({k for k in expect if k.startswith("hostile/")}) == 36
    )  # 26 kinds of file; plus a directory named .dcm and 3 kinds of bad report row
    out = tmp_path / "out"
    start = time.monotonic()
    status = convert.main(
        [
            "--dicom_dir",
            str(export),
            "--reports",
            str(reports),
            "--out",
            str(out),
            "--salt",
            SALT,
            "--frames",
            "4",
            "--image_size",
            "32",
            "--shard_size",
            "8",
            "--manifest_paths",
            "relative",
            "--max_skipped_fraction",
            "1.0",
            "--time_limit",
            "20",
        ]
    )
    assert status == 0 and time.monotonic() - start < 120
    manifest = [json.loads(line) for line in open(out / "manifest.jsonl")]
    by_input = {m["input"]: m for m in manifest}
    assert len(by_input) == len(manifest) == len(expect)  # exactly one line per input, nothing extra
    assert set(by_input) == set(expect)
    for name, reason in expect.items():
        line = by_input[name]
        assert line["status"] in ("converted", "skipped"), line
        if line["status"] == "skipped":
            assert line["reason"], name
        if reason is not None:
            assert line["status"] == "skipped", f"{name} converted, expected skipped ({reason})"
            assert reason in line["reason"], f"{name}: {line['reason']!r} lacks {reason!r}"
    good = [n for n, r in expect.items() if r is None and not n.startswith("hostile/")]
    assert all(by_input[n]["status"] == "converted" for n in good)
    converted = {m["video_id"] for m in manifest if m["status"] == "converted"}
    seen = []
    for split in records.SPLITS:
        for shard in records.list_shards(str(out), split):
            for raw in records.ShardReader(shard):  # CRC-checked
                ex = records.decode_example(raw)
                assert ex["num_frames"] == [len(ex["frames"])] and 1 <= len(ex["frames"]) <= 4
                for jpeg in ex["frames"]:
                    assert np.asarray(Image.open(io.BytesIO(jpeg))).shape == (32, 32, 3)
                seen.append(ex["video_id"][0].decode())
    assert sorted(seen) == sorted(converted)  # no partial, missing or extra record
    assert not glob.glob(str(out / "*.tmp")) and not glob.glob(str(out / ".parts" / "*.tmp"))
    info = json.load(open(out / "dataset_info.json"))
    assert info["num_inputs"] == len(expect) and info["num_skipped"] == len(expect) - len(converted)
    phi = [s.encode() for s in synthetic.read_phi(cohort)]  # error messages must not carry header values
    for path in glob.glob(str(out / "**"), recursive=True) + glob.glob(str(out / ".*" / "*")):
        if os.path.isfile(path):
            data = open(path, "rb").read()
            assert not [s for s in phi if s in data], path


# ------------------------------------------------------------------------------------ limits


def test_time_limit_interrupts_a_slow_step(cohort, monkeypatch):
    path = _source(cohort, JPEG)
    h = dicom_io.read_header(path)
    job = plan.Job(
        path=path,
        ref="x",
        source="dicom",
        video_id="v",
        patient_id="p",
        study_id="s",
        study_day=0,
        report="R",
        ef=float("nan"),
        fps=h.fps,
        num_frames=h.num_frames,
    )
    monkeypatch.setattr(shards.sector, "prepare", lambda *a, **k: time.sleep(30))  # a hang after decoding
    start = time.monotonic()
    with pytest.raises(dicom_io.SkipVideo, match="time limit"):
        shards.convert_video(job, options.Settings(frames=4, image_size=32, time_limit_s=0.5))
    assert time.monotonic() - start < 5


def test_time_limit_outside_the_main_thread_checks_between_frames(cohort, monkeypatch):
    path = _source(cohort, NATIVE)  # decoded through pydicom's iter_pixels
    original = dicom_io.iter_pixels

    def slow(*a, **k):
        for frame in original(*a, **k):
            time.sleep(0.3)
            yield frame

    monkeypatch.setattr(dicom_io, "iter_pixels", slow)
    errors = []

    def work():
        try:
            with dicom_io.time_limit(0.5):
                dicom_io.read_frames(path, list(range(10)))
        except dicom_io.SkipVideo as e:
            errors.append(str(e))

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    assert errors and "time limit" in errors[0]


def test_pixel_limit_is_configurable(cohort):
    path = _source(cohort, NATIVE)
    h = dicom_io.read_header(path)
    with pytest.raises(dicom_io.SkipVideo, match="too large"):
        dicom_io.read_header(path, max_pixels=h.rows * h.cols - 1)
    with pytest.raises(dicom_io.SkipVideo, match="outside"):
        dicom_io.read_frames(path, [0], max_pixels=h.rows * h.cols - 1)
    assert dicom_io.read_frames(path, [0], max_pixels=h.rows * h.cols).shape == (1, h.rows, h.cols, 3)


# -------------------------------------------------------------------------------------- fuzz


def _fuzz_sources(cohort):
    return [open(_source(cohort, s), "rb").read() for s in (JPEG, NATIVE)]


def _read_mutant(data: bytes) -> None:
    """The reader's contract: a clean result or SkipVideo, nothing else, quickly."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.dcm")
        with open(path, "wb") as f:
            f.write(data)
        start = time.monotonic()
        try:
            h = dicom_io.read_header(path)
            frames = dicom_io.read_frames(path, dicom_io.kept_indices(h.num_frames, 3))
        except dicom_io.SkipVideo as e:
            assert str(e)
        else:
            assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
            assert frames.shape[1:3] == (h.rows, h.cols)
        assert time.monotonic() - start < 10


_mutation = st.tuples(
    st.integers(0, 1),  # which source file
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    st.one_of(st.none(), st.floats(0, 1)),  # truncate at this fraction
    st.booleans(),  # aim the byte replacements at the header (first 2 kB) instead of anywhere
)


def _apply(sources, mutation):
    which, edits, cut, header = mutation
    data = bytearray(sources[which])
    span = min(len(data), 2048) if header else len(data)
    for where, value in edits:
        data[int(where * span)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    return bytes(data)


@pytest.mark.parametrize("examples", [pytest.param(60, id="60"), pytest.param(1500, id="1500", marks=pytest.mark.slow)])
def test_fuzzed_dicom_gives_a_result_or_a_named_skip(cohort, examples):
    sources = _fuzz_sources(cohort)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_mutation)
    def check(mutation):
        _read_mutant(_apply(sources, mutation))

    check()
