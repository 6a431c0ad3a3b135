"""DICOM reading on pydicom's bundled ultrasound files: every encoding, only the kept frames, headers.

Lossless encodings of the same image must decode to the same pixels: that is the reference, not our code.
"""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders import base

from data_prep import dicom_io


def _file(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom-data lacks {name}")
    return path


def _all(name):
    path = _file(name)
    return dicom_io.read_frames(path, list(range(dicom_io.read_header(path).num_frames)))


@pytest.mark.parametrize(
    "a,b",
    [
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # RGB native vs JPEG 2000 lossless (YBR_RCT)
        ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),  # palette colour, little vs big endian
        ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),  # palette colour, native vs RLE
        ("OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm"),
        ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm"),
        ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
    ],
)
def test_lossless_encodings_decode_identically(a, b):
    x, y = _all(a), _all(b)
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
    np.testing.assert_array_equal(x, y)


def test_palette_is_expanded_to_colour():
    frames = _all("OBXXXX1A.dcm")
    assert frames.shape == (1, 600, 800, 3)
    assert (frames[..., 0] != frames[..., 2]).any()  # a colour LUT, not a grey repeat


def test_sixteen_bit_rgb_scales_to_eight_bit():
    x8, x16 = _all("SC_rgb.dcm"), _all("SC_rgb_rle_16bit.dcm")
    assert np.abs(x8.astype(int) - x16.astype(int)).max() <= 1


def test_lossy_encodings_decode_close_to_the_original():
    ref = _all("US1_UNCI.dcm").astype(int)
    j2k = _all("US1_J2KI.dcm").astype(int)
    assert np.abs(ref - j2k).mean() < 3


def test_multiframe_jpeg_baseline_decodes_only_kept_frames(monkeypatch):
    path = _file("color3d_jpeg_baseline.dcm")
    header = dicom_io.read_header(path)
    assert header.num_frames == 120 and header.fps == pytest.approx(1000 / 33.333)
    keep = dicom_io.kept_indices(header.num_frames, 4)
    assert keep == [0, 40, 79, 119]
    calls = []
    original_open, original_decode = dicom_io.Image.open, base.DecodeRunner.decode
    monkeypatch.setattr(dicom_io.Image, "open", lambda *a, **k: calls.append(1) or original_open(*a, **k))
    monkeypatch.setattr(
        base.DecodeRunner, "decode", lambda self, *a, **k: calls.append(1) or original_decode(self, *a, **k)
    )
    frames = dicom_io.read_frames(path, keep)
    assert len(calls) == 4  # one decode per kept frame, not 120
    monkeypatch.undo()
    full = pydicom.dcmread(path).pixel_array  # reference: pydicom's whole-video decode, YBR -> RGB
    np.testing.assert_array_equal(frames, full[keep])


def test_jpeg_baseline_decodes_at_a_reduced_scale_when_asked():
    path = _file("color3d_jpeg_baseline.dcm")
    h = dicom_io.read_header(path)
    full = dicom_io.read_frames(path, [0, 60])
    frames, scale = dicom_io.read_frames_scaled(path, [0, 60], min_side=h.rows // 2)
    assert scale == 2 and frames.shape == (2, -(-h.rows // 2), -(-h.cols // 2), 3)
    box = full[:, : h.rows // 2 * 2, : h.cols // 2 * 2].reshape(2, h.rows // 2, 2, h.cols // 2, 2, 3).mean((2, 4))
    assert np.abs(frames[:, : h.rows // 2, : h.cols // 2] - box).mean() < 4  # a 2x2 average, in the DCT domain
    assert dicom_io.read_frames_scaled(path, [0], min_side=h.rows)[1] == 1
    assert [dicom_io.draft_scale(600, 800, m) for m in (600, 300, 280, 150, 10)] == [1, 2, 2, 4, 8]


def _box(frames, f):
    k, h, w, c = frames.shape
    return frames[:, : h // f * f, : w // f * f].reshape(k, h // f, f, w // f, f, c).mean((2, 4))


def test_other_encodings_are_box_reduced_to_the_same_scale():
    path = _file("US1_UNCR.dcm")  # native RGB, 480x640
    full = dicom_io.read_frames(path, [0])
    frames, scale = dicom_io.read_frames_scaled(path, [0], min_side=120)
    assert scale == 4 and frames.shape == (1, 120, 160, 3) and frames.dtype == np.uint8
    assert np.abs(frames - _box(full, 4)).max() <= 0.5  # the 4x4 mean, rounded
    assert np.array_equal(dicom_io.read_frames_scaled(path, [0], min_side=480)[0], full)  # scale 1: untouched


def test_grey_videos_can_stay_one_channel():
    path = _file("emri_small.dcm")  # MONOCHROME2, 12-bit, 10 frames of 64x64
    rgb = dicom_io.read_frames(path, [1, 7])
    grey, scale = dicom_io.read_frames_scaled(path, [1, 7], keep_grey=True)
    assert scale == 1 and grey.shape == (2, 64, 64, 1)
    np.testing.assert_array_equal(np.repeat(grey, 3, axis=-1), rgb)
    half, scale = dicom_io.read_frames_scaled(path, [1, 7], min_side=32, keep_grey=True)
    assert scale == 2 and half.shape == (2, 32, 32, 1)
    assert np.abs(half - _box(grey, 2)).max() <= 0.5
    assert dicom_io.read_frames_scaled(_file("US1_UNCR.dcm"), [0], keep_grey=True)[0].shape[-1] == 3  # colour stays


def test_jpeg_frame_disagreeing_with_the_header_is_refused_undecoded(tmp_path):
    ds = pydicom.dcmread(_file("color3d_jpeg_baseline.dcm"))
    ds.Rows, ds.Columns = 64, 64
    ds.save_as(tmp_path / "small_header.dcm")
    with pytest.raises(dicom_io.SkipVideo, match="the header says 64x64"):
        dicom_io.read_frames(str(tmp_path / "small_header.dcm"), [0])


def test_header_regions_and_spacing():
    h = dicom_io.read_header(_file("OBXXXX1A.dcm"))
    ds = pydicom.dcmread(_file("OBXXXX1A.dcm"), stop_before_pixels=True)
    twod = [r for r in ds.SequenceOfUltrasoundRegions if r.RegionSpatialFormat == 1]
    assert len(h.regions) == len(twod) >= 1
    r = twod[0]
    assert h.regions[0] == (r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1)
    if r.PhysicalUnitsXDirection == 3:
        assert h.spacing_mm == pytest.approx((abs(r.PhysicalDeltaY) * 10, abs(r.PhysicalDeltaX) * 10))


def test_kept_indices():
    assert dicom_io.kept_indices(5, 32) == [0, 1, 2, 3, 4]
    assert dicom_io.kept_indices(100, 0) == list(range(100))
    k = dicom_io.kept_indices(113, 32)
    assert len(k) == 32 and k[0] == 0 and k[-1] == 112 and k == sorted(set(k))


def test_bad_inputs_give_reasons(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(dicom_io.SkipVideo, match="not a DICOM file"):
        dicom_io.read_header(str(tmp_path / "notes.txt"))

    good = _file("OBXXXX1A_2frame.dcm")
    raw = open(good, "rb").read()
    (tmp_path / "truncated.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(dicom_io.SkipVideo, match="cannot decode pixels"):
        dicom_io.read_frames(str(tmp_path / "truncated.dcm"), [0, 1])

    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(dicom_io.SkipVideo, match="PixelData"):
        dicom_io.read_frames(str(tmp_path / "nopixels.dcm"), [0])

    ds = pydicom.dcmread(good)
    ds.NumberOfFrames = 0
    ds.save_as(tmp_path / "zero.dcm")
    with pytest.raises(dicom_io.SkipVideo, match="zero frames"):
        dicom_io.read_header(str(tmp_path / "zero.dcm"))

    ds = pydicom.dcmread(_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: no decoder installed
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=False)
    with pytest.raises(dicom_io.SkipVideo):
        dicom_io.read_frames(str(tmp_path / "mpeg.dcm"), [0])
