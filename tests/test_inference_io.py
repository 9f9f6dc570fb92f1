"""Scan reading (NIfTI, DICOM series), scan discovery and output writers."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.data.scans import ScanError, find_scans, read_scan
from clipseg3d.inference.outputs import fortran_order, write_dicom_seg, write_nifti_atomic

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CT = DATA / "totalseg-case" / "ct.nii.gz"
DICOM = DATA / "dicom-liver-3slice"
needs_ct = pytest.mark.skipif(not CT.exists(), reason=f"test data {CT} absent")
needs_dicom = pytest.mark.skipif(not DICOM.exists(), reason=f"test data {DICOM} absent")


def _nrrd_liver_and_ras_affine():
    import SimpleITK as sitk

    image = sitk.ReadImage(str(DICOM / "liver_seg.nrrd"))
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    mask = sitk.GetArrayFromImage(image).transpose(2, 1, 0) == 1   # [column, row, slice]
    return mask, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@needs_ct
def test_read_nifti():
    scan = read_scan(CT)
    assert scan.kind == "nifti" and scan.name == "ct"
    assert scan.shape == (122, 101, 30) and scan.array.dtype == np.float32
    assert np.allclose(scan.affine, nib.load(CT).affine)
    assert scan.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert scan.array.min() == -1100 and scan.array.max() == 1207


@needs_dicom
def test_read_dicom_series_matches_nrrd_geometry_in_ras():
    import pydicom

    scan = read_scan(DICOM)
    assert scan.kind == "dicom" and scan.shape == (512, 512, 3)
    liver, nrrd_affine = _nrrd_liver_and_ras_affine()
    assert liver.shape == scan.shape
    assert np.allclose(scan.affine, nrrd_affine, atol=1e-3)
    # DICOM's LPS (-235.2, -226.8, -128.69) of the first voxel is RAS (235.2, 226.8, -128.69)
    assert np.allclose(scan.affine[:3, 3], [235.2, 226.8, -128.69], atol=1e-3)
    assert scan.spacing == pytest.approx((0.810547, 0.810547, 1.0), abs=1e-5)
    # HU with rescale applied, slice k of the array = the file whose position is at that height
    for k, dataset in enumerate(scan.dicom_datasets):
        full = pydicom.dcmread(dataset.filename)
        assert float(full.ImagePositionPatient[2]) == pytest.approx(scan.affine[2, 3] + k, abs=1e-3)
        expected = full.pixel_array * float(full.RescaleSlope) + float(full.RescaleIntercept)
        assert np.array_equal(scan.array[:, :, k], expected.T)
    assert scan.array.min() == -3024
    # the liver mask on the same grid lands on soft tissue, the rest of the field holds air and padding
    assert 20 < np.median(scan.array[liver]) < 200
    assert np.median(scan.array[~liver]) < -500


@needs_dicom
def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    import pydicom

    for index, name in enumerate(["01.dcm", "02.dcm", "03.dcm"]):
        dataset = pydicom.dcmread(DICOM / name)
        if index == 0:
            dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 2.0
        dataset.save_as(tmp_path / name)
    with pytest.raises(ScanError, match="not evenly spaced") as error:
        read_scan(tmp_path)
    assert str(tmp_path) in str(error.value)


def _write(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def test_read_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    flat = _write(tmp_path / "flat.nii", np.zeros((4, 5), np.int16))
    rgb = _write(tmp_path / "rgb.nii", np.zeros((4, 5, 6, 3), np.int16))
    for path, message in [(corrupt, "cannot read NIfTI"), (flat, "expected a 3D volume"),
                          (rgb, "expected a 3D volume"), (tmp_path / "none.nii.gz", "no such file"),
                          (tmp_path, "not a DICOM series folder")]:
        with pytest.raises(ScanError, match=message) as error:
            read_scan(path)
        assert str(path) in str(error.value)
    trailing = read_scan(_write(tmp_path / "t.nii", np.ones((4, 5, 6, 1), np.int16)))
    assert trailing.shape == (4, 5, 6)


@needs_ct
def test_truncated_nifti_is_a_clear_error(tmp_path):
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(CT.read_bytes()[:40000])
    with pytest.raises(ScanError, match="cut.nii.gz: cannot read NIfTI voxels"):
        read_scan(truncated)


@needs_dicom
def test_find_scans(tmp_path):
    a = _write(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.int16))
    b = _write(tmp_path / "b.nii", np.zeros((2, 2, 2), np.int16))
    (tmp_path / "notes.txt").write_text("x")
    series = tmp_path / "patient" / "series1"
    series.mkdir(parents=True)
    for name in ["01.dcm", "02.dcm"]:
        (series / name).symlink_to(DICOM / name)
    assert find_scans([tmp_path]) == [a, b, series]
    assert find_scans([series / "01.dcm", a, tmp_path / "." / "a.nii.gz"]) == [series, a]
    assert find_scans([DICOM]) == [Path(os.path.abspath(DICOM))]  # absolute, symlinks kept
    with pytest.raises(ScanError, match="no such file"):
        find_scans([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanError, match="empty: folder holds no NIfTI"):
        find_scans([empty])
    with pytest.raises(ScanError, match="notes.txt: not a NIfTI"):
        find_scans([tmp_path / "notes.txt"])


@needs_ct
def test_write_nifti_atomic_shares_the_input_grid(tmp_path):
    scan = read_scan(CT)
    mask = (scan.array > 200).astype(np.uint8)
    out = write_nifti_atomic(mask, scan.affine, tmp_path / "out" / "ct_bone.nii.gz", np.uint8, header=scan.header)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct_bone.nii.gz"]   # no temp file left
    image = nib.load(out)
    assert image.shape == scan.shape and image.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, scan.affine)
    assert np.array_equal(np.asarray(image.dataobj), mask)
    probs = write_nifti_atomic(np.full((*scan.shape, 2), 0.25), scan.affine, tmp_path / "p.nii", np.float32)
    assert nib.load(probs).get_data_dtype() == np.float32 and nib.load(probs).shape == (*scan.shape, 2)
    with pytest.raises(ScanError, match="p16.nii: NIfTI cannot store float16"):
        write_nifti_atomic(mask, scan.affine, tmp_path / "p16.nii", np.float16)
    with pytest.raises(ScanError, match="must end in .nii"):
        write_nifti_atomic(mask, scan.affine, tmp_path / "x.png", np.uint8)


@needs_dicom
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_write_dicom_seg_is_readable(tmp_path):
    import highdicom as hd

    scan = read_scan(DICOM)
    liver, _ = _nrrd_liver_and_ras_affine()
    lesion = np.zeros_like(liver)
    lesion[250:260, 250:260, 1] = True
    masks = {"liver": liver, "spleen": np.zeros_like(liver), "liver_tumor": lesion}
    out = write_dicom_seg(masks, scan, tmp_path / "seg.dcm", kinds={"liver": "organ", "liver_tumor": "tumour"})
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 2
    labels = [seg.get_segment_description(n).segment_label for n in (1, 2)]
    assert labels == ["liver", "liver_tumor"]
    assert seg.get_segment_description(2).segmented_property_type.meaning == "Neoplasm"
    uids = [dataset.SOPInstanceUID for dataset in scan.dicom_datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    assert np.array_equal(pixels[..., 0].transpose(2, 1, 0).astype(bool), liver)
    assert np.array_equal(pixels[..., 1].transpose(2, 1, 0).astype(bool), lesion)
    assert write_dicom_seg({"liver": np.zeros_like(liver)}, scan, tmp_path / "none.dcm") is None
    assert not (tmp_path / "none.dcm").exists()


@needs_ct
def test_dicom_seg_needs_a_dicom_scan(tmp_path):
    scan = read_scan(CT)
    with pytest.raises(ScanError, match="needs a DICOM input"):
        write_dicom_seg({"x": np.ones(scan.shape, bool)}, scan, tmp_path / "seg.dcm")


def test_arrays_go_to_fortran_order_by_their_nonzero_box_and_read_back_equal(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 30, 20), bool)
    mask[5:17, 3:9, 11:19] = rng.random((12, 6, 8)) > 0.3
    labels = (mask * rng.integers(1, 9, mask.shape)).astype(np.int16)
    for array, dtype in ((mask, np.uint8), (labels, np.int16), (labels, np.uint8), (np.zeros_like(mask), np.uint8)):
        ordered = fortran_order(array, dtype)
        assert ordered.flags.f_contiguous and ordered.dtype == dtype
        np.testing.assert_array_equal(ordered, array.astype(dtype))
        path = write_nifti_atomic(array, np.eye(4), tmp_path / "out.nii.gz", dtype=dtype)
        np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), array.astype(dtype))
    already = np.asfortranarray(labels)
    assert fortran_order(already, np.int16) is already
