"""Writing one video as Ultrasound Multi-frame Image Storage: JPEG Baseline YBR_FULL_422, uncompressed RGB
or MONOCHROME2, with the study's fake PHI in the header, a private tag repeating the name, and (for most
files) a SequenceOfUltrasoundRegions describing the sector and the ECG band."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, UltrasoundMultiFrameImageStorage

from data_prep.synthetic.cohort import ENCODINGS, FULL, SMALL, Layout, VideoSpec


def ultrasound_regions(geo_truth: dict, layout: Layout, spec: VideoSpec) -> Sequence:
    """SequenceOfUltrasoundRegions: the tissue sector (its bounding box, cm per pixel) and the ECG band."""
    tissue = Dataset()
    tissue.RegionSpatialFormat = 1  # 2D
    tissue.RegionDataType = 1  # tissue
    tissue.RegionFlags = 0
    tissue.RegionLocationMinX0 = geo_truth["sector_x0"]
    tissue.RegionLocationMinY0 = geo_truth["sector_y0"]
    tissue.RegionLocationMaxX1 = geo_truth["sector_x1"]
    tissue.RegionLocationMaxY1 = geo_truth["sector_y1"]
    tissue.ReferencePixelX0 = int(round(geo_truth["sector_apex_x"])) - geo_truth["sector_x0"]
    tissue.ReferencePixelY0 = 0
    tissue.PhysicalUnitsXDirection = 3  # cm
    tissue.PhysicalUnitsYDirection = 3
    delta = geo_truth["depth_cm"] / geo_truth["sector_radius"]
    tissue.PhysicalDeltaX = round(delta, 6)
    tissue.PhysicalDeltaY = round(delta, 6)
    ecg = Dataset()
    ecg.RegionSpatialFormat = 4  # waveform
    ecg.RegionDataType = 10  # ECG trace
    ecg.RegionFlags = 0
    ecg.RegionLocationMinX0 = 0
    ecg.RegionLocationMinY0 = layout.rows - layout.ecg
    ecg.RegionLocationMaxX1 = layout.cols - 1
    ecg.RegionLocationMaxY1 = layout.rows - 1
    ecg.PhysicalUnitsXDirection = 4  # seconds
    ecg.PhysicalUnitsYDirection = 0
    ecg.PhysicalDeltaX = round(2.5 * 60.0 / spec.heart_rate / layout.cols, 6)
    ecg.PhysicalDeltaY = 1.0
    return Sequence([tissue, ecg])


def to_gray(frames: np.ndarray) -> np.ndarray:
    return np.round(frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=1)  # 4:2:2 = YBR_FULL_422
    return buf.getvalue()


def write_dicom(path: pathlib.Path, frames: np.ndarray, spec: VideoSpec, geo_truth: dict) -> None:
    layout = SMALL if spec.small else FULL
    phi = spec.phi
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = phi["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if spec.encoding == ENCODINGS[0] else ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "CARDIAC"]
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = phi["SOPInstanceUID"]
    ds.StudyInstanceUID = phi["StudyInstanceUID"]
    ds.SeriesInstanceUID = phi["SeriesInstanceUID"]
    for key in ("StudyDate", "SeriesDate", "ContentDate"):
        setattr(ds, key, phi["StudyDate"])
    for key in ("StudyTime", "SeriesTime", "ContentTime"):
        setattr(ds, key, phi["StudyTime"])
    ds.AcquisitionDateTime = phi["StudyDate"] + phi["StudyTime"]
    ds.AccessionNumber = phi["AccessionNumber"]
    ds.Modality = "US"
    ds.Manufacturer = "SYNTHECHO"
    ds.ManufacturerModelName = "PHANTOM A4C" if spec.version == 1 else "PHANTOM"  # v2: no header names the view
    ds.InstitutionName = phi["InstitutionName"]
    ds.InstitutionAddress = phi["InstitutionAddress"]
    ds.StationName = "ECHOLAB3"
    ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
    ds.OperatorsName = phi["OperatorsName"]
    ds.StudyDescription = "TTE COMPLETE"
    ds.SeriesDescription = "A4C" if spec.version == 1 else "2D CINE"
    ds.PatientName = phi["PatientName"]
    ds.PatientID = phi["PatientID"]
    ds.PatientBirthDate = phi["PatientBirthDate"]
    ds.PatientSex = phi["PatientSex"]
    ds.PatientAge = phi["PatientAge"]
    ds.BodyPartExamined = "HEART"
    ds.HeartRate = int(round(spec.heart_rate))
    ds.FrameTime = f"{spec.frame_time_ms:.3f}"
    ds.CineRate = int(round(spec.fps))
    ds.RecommendedDisplayFrameRate = int(round(spec.fps))
    ds.EffectiveDuration = round(spec.frames * spec.frame_time_ms / 1000.0, 4)
    ds.StudyID = phi["StudyID"]
    ds.SeriesNumber = phi["SeriesNumber"]
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.NumberOfFrames = spec.frames
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # FrameTime
    ds.Rows, ds.Columns = layout.rows, layout.cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if spec.has_regions:
        ds.SequenceOfUltrasoundRegions = ultrasound_regions(geo_truth, layout, spec)
    # A vendor private tag that repeats the patient's name, as some scanners do.
    ds.private_block(0x0009, "SYNTHECHO PRIVATE", create=True).add_new(0x01, "LO", phi["PatientName"])
    if spec.encoding == "monochrome2":
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = to_gray(frames).tobytes()
    else:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        if spec.encoding == "rgb":
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = frames.tobytes()
        else:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            ds.PixelData = encapsulate([_jpeg(f, 90) for f in frames])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
