"""Scans as scanners and archives export them: DICOM found by content, missing slices, bad voxels, non-CT."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from clipseg3d.data.scans import ScanError, ScanWarning, find_scans, read_scan

from conftest import shared_data

ROWS, COLUMNS = 6, 5


def slice_hu(k: int) -> np.ndarray:
    """The HU values written into slice ``k`` (rows x columns, air to soft tissue)."""
    return (-1000 + 10 * k + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)).astype(np.int16)


def write_series(folder: Path, count: int, name=lambda k: f"{k + 1:03d}.dcm", *, step: float = 2.0,
                 thickness: float | None = 2.0, first_number: int = 1, skip=(), preamble: bool = True,
                 series_number: int = 3) -> Path:
    """Write ``count`` CT slices (minus those in ``skip``) of one series, ``step`` mm apart, as DICOM files."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(count):
        if k in skip:
            continue
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, series_number
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Phantom^Test", "P1"
        ds.InstanceNumber = first_number + k
        ds.ImagePositionPatient = [-10.0, -20.0, -50.0 + step * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.7]
        if thickness is not None:
            ds.SliceThickness = thickness
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (slice_hu(k) + 1024).astype(np.int16).tobytes()
        path = folder / name(k)
        if preamble:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=True)
        else:
            ds.save_as(path, implicit_vr=True, little_endian=True)
    return folder


NAMES = {
    "uid": lambda k: f"CT.1.3.12.2.1107.5.1.4.73421.30000024011512{k:05d}",
    "dcm": lambda k: f"IM{k}.dcm",
    "DCM": lambda k: f"IM{k}.DCM",
    "ima": lambda k: f"PHANTOM.CT.ABDOMEN.3.{k + 1}.2024.01.15.ima",
    "bare-name": lambda k: f"IM{k:04d}",
}


def assert_is_the_series(scan, count: int, skip=()) -> None:
    kept = [k for k in range(count) if k not in skip]
    assert scan.kind == "dicom" and scan.shape == (COLUMNS, ROWS, len(kept))
    for index, k in enumerate(kept):   # slices in position order, HU with the rescale applied
        assert np.array_equal(scan.array[:, :, index], slice_hu(k).T)
    assert scan.spacing == pytest.approx((0.7, 0.8, 2.0))


@pytest.mark.parametrize("style", NAMES)
def test_dicom_is_found_and_read_whatever_the_file_names(tmp_path, style):
    series = write_series(tmp_path / "study" / "patient" / "series", 20, NAMES[style])
    (tmp_path / "study" / "notes.txt").write_text("exported from the archive")
    first = sorted(series.iterdir())[0]
    assert find_scans([tmp_path / "study"]) == [series]
    assert find_scans([series]) == [series] and find_scans([first]) == [series]
    assert_is_the_series(read_scan(series), 20)
    assert_is_the_series(read_scan(first), 20)


def test_dicom_without_preamble_is_recognised_by_its_header(tmp_path):
    series = write_series(tmp_path / "archive" / "s1", 4, NAMES["uid"], preamble=False)
    first = sorted(series.iterdir())[0]
    assert first.read_bytes()[128:132] != b"DICM" and pydicom.dcmread(first, force=True).Modality == "CT"
    assert find_scans([tmp_path / "archive"]) == [series] and find_scans([first]) == [series]
    assert_is_the_series(read_scan(series), 4)
    assert_is_the_series(read_scan(first), 4)


def test_nifti_dicomdir_and_other_files_are_never_taken_for_dicom(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    nifti = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), -1000, np.int16), np.eye(4)), nifti)
    index = Dataset()
    index.SOPClassUID = "1.2.840.10008.1.3.10"   # Media Storage Directory Storage
    index.save_as(folder / "DICOMDIR", implicit_vr=True, little_endian=True)
    shutil.copy(folder / "DICOMDIR", folder / "INDEX")   # a directory index under another name
    (folder / "README.1.2").write_bytes(b"\x08\x00 looks like a DICOM start, is not" * 10)
    assert find_scans([folder]) == [nifti]
    with pytest.raises(ScanError, match="not a NIfTI .* or DICOM file"):
        find_scans([folder / "README.1.2"])
    # beside a series, the index and a report without image position are passed over
    series = write_series(tmp_path / "series", 3, NAMES["uid"])
    shutil.copy(folder / "DICOMDIR", series / "DICOMDIR")
    shutil.copy(folder / "DICOMDIR", series / "INDEX.1.2")
    report = pydicom.dcmread(sorted(series.iterdir())[0])
    del report.ImagePositionPatient
    report.SOPInstanceUID = generate_uid()
    report.save_as(series / "SR.1.2.3")
    assert_is_the_series(read_scan(series), 3)


def test_real_series_renamed_by_uid_without_suffix_reads_the_same(tmp_path):
    real = shared_data("dicom-liver-3slice")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for path in sorted(real.glob("*.dcm")):
        shutil.copy(path, renamed / pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    original, copy = read_scan(real), read_scan(renamed)
    assert copy.shape == original.shape == (512, 512, 3)
    assert np.array_equal(copy.array, original.array) and np.allclose(copy.affine, original.affine)
    assert find_scans([tmp_path]) == [renamed]


def refusal(path: Path) -> str:
    with pytest.raises(ScanError) as error:
        read_scan(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    names = NAMES["uid"]
    message = refusal(write_series(tmp_path / "middle", 20, names, skip={9}))
    assert "1 slice(s) missing" in message and "InstanceNumber 10 absent from 1..20" in message
    message = refusal(write_series(tmp_path / "many", 20, names, skip={3, 4, 12}))
    assert "3 slice(s) missing" in message and "InstanceNumber 4..5, 13 absent" in message
    # numbered without the gap: the positions show it, naming the files on either side
    renumbered = write_series(tmp_path / "renumbered", 20, names, skip={9})
    for number, path in enumerate(sorted(renumbered.iterdir()), start=1):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = number
        dataset.save_as(path)
    message = refusal(renumbered)
    assert "not evenly spaced (4 mm between" in message and f"{names(8)} and {names(10)}" in message


def test_a_three_slice_series_missing_its_middle_slice_is_refused(tmp_path):
    assert "InstanceNumber 2 absent from 1..3" in refusal(write_series(tmp_path / "numbered", 3, skip={1}))
    renumbered = write_series(tmp_path / "renumbered", 3, skip={1}, first_number=0)
    last = sorted(renumbered.iterdir())[-1]
    dataset = pydicom.dcmread(last)
    dataset.InstanceNumber = 1
    dataset.save_as(last)
    message = refusal(renumbered)
    assert "slices missing (4 mm between 001.dcm and 003.dcm, over 1.5x the 2 mm slice thickness)" in message


def test_regular_series_are_accepted(tmp_path):
    assert_is_the_series(read_scan(write_series(tmp_path / "late", 5, first_number=101)), 5)
    assert_is_the_series(read_scan(write_series(tmp_path / "overlap", 5, thickness=2.5)), 5)
    assert_is_the_series(read_scan(write_series(tmp_path / "unknown", 2, thickness=None)), 2)
    assert_is_the_series(read_scan(write_series(tmp_path / "one", 1)), 1)
    assert read_scan(shared_data("dicom-liver-3slice")).shape == (512, 512, 3)


def test_duplicate_slices_and_mixed_series_are_refused(tmp_path):
    twice = write_series(tmp_path / "twice", 3)
    shutil.copy(twice / "002.dcm", twice / "002 (copy).dcm")
    assert "002 (copy).dcm and 002.dcm lie at the same position (duplicate slices)" in refusal(twice)
    mixed = write_series(tmp_path / "mixed", 3)
    write_series(mixed, 2, lambda k: f"other{k}.dcm", series_number=4)
    assert "holds 2 DICOM series (3 slices of series 3, 2 slices of series 4); put each" in refusal(mixed)


def write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def ct_volume(shape=(32, 32, 96)) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1000, 400, shape).astype(np.float32)


def test_nonfinite_voxels_are_refused_with_their_count(tmp_path):
    array = ct_volume()
    array.reshape(-1)[::200] = np.nan   # 0.5% of the voxels
    array[0, 0, 1], array[0, 0, 2] = np.inf, -np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", array)
    message = refusal(path)
    assert message.startswith(f"{path}: 494 of 98,304 voxels are NaN or infinite; ")
    assert "nonfinite='clean'" in message
    with pytest.warns(ScanWarning, match=r"nan.nii.gz: 494 of 98,304 voxels are NaN or infinite; replaced") as caught:
        scan = read_scan(path, nonfinite="clean")
    assert len(caught) == 1
    finite = np.isfinite(array)
    assert np.isfinite(scan.array).all() and np.all(scan.array[~finite] == array[finite].min())
    assert np.array_equal(scan.array[finite], array[finite])
    empty = write_nifti(tmp_path / "empty.nii", np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(ScanError, match="empty.nii: 64 of 64 voxels are NaN or infinite; the scan holds no values"):
        read_scan(empty, nonfinite="clean")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        read_scan(path, nonfinite="drop")


def test_a_scan_without_negative_values_is_read_with_one_warning(tmp_path):
    mr = write_nifti(tmp_path / "t1.nii.gz", np.linspace(0, 4000, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    with pytest.warns(ScanWarning, match="t1.nii.gz: values run 0..4000 with none negative, so this does not "
                                         "look like CT") as caught:
        scan = read_scan(mr)
    assert len(caught) == 1 and scan.array.max() == 4000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_scan(write_nifti(tmp_path / "ct.nii.gz", ct_volume((4, 5, 6))))
        read_scan(write_series(tmp_path / "series", 3))


def test_every_refusal_is_one_line_naming_the_path_and_what_to_do(tmp_path):
    series = write_series(tmp_path / "series", 3)
    corrupt = series / "002.dcm"
    corrupt.write_bytes(corrupt.read_bytes()[:154])   # cut inside the file meta header
    with pytest.raises(ScanError) as error:
        read_scan(series)
    assert str(error.value).startswith(f"{corrupt}: cannot read DICOM header (error: unpack requires")
    empty = tmp_path / "nothing"
    empty.mkdir()
    (tmp_path / "scan.mhd").write_text("ObjectType = Image")
    tilted = write_series(tmp_path / "tilted", 3)
    localizer = pydicom.dcmread(tilted / "001.dcm")
    localizer.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    localizer.save_as(tilted / "001.dcm")
    assert "the slices have different orientations" in refusal(tilted)
    for path in [tmp_path / "absent.nii.gz", empty, tmp_path / "scan.mhd"]:
        message = refusal(path)
        assert "; " in message   # the problem, then what to do
    with pytest.raises(ScanError) as error:
        find_scans([empty])
    assert str(error.value).startswith(f"{empty}: folder holds no NIfTI files and no DICOM series; give ")
