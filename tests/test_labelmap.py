"""Dataset label maps, and the K-channel targets built through them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.catalog import ClassCatalog, ClassEntry
from clipseg3d.data.index import LAYOUTS
from clipseg3d.data.labelmap import LabelMap, LabelMapError, available_label_maps
from clipseg3d.data.targets import build_targets, label_volume_from_masks

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOTALSEG_CASE = DATA / "totalseg-case"

EXPECTED_LABEL_COUNTS = {
    "btcv": 13, "amos22": 15, "word": 16, "abdomenct1k": 4, "flare22": 13, "kits19": 2, "kits21": 3,
    "kits23": 3, "lits": 2, "msd_task03_liver": 2, "msd_task06_lung": 1, "msd_task07_pancreas": 2,
    "msd_task08_hepaticvessel": 2, "msd_task09_spleen": 1, "msd_task10_colon": 1, "chaos_ct": 1,
    "ct_org": 6, "nih_pancreas": 1, "ircadb": 2, "totalsegmentator_v2": 117,
}


@pytest.fixture(scope="module")
def catalog() -> ClassCatalog:
    return ClassCatalog.builtin()


def counts(targets: np.ndarray, names: list[str]) -> dict[str, int]:
    return dict(zip(names, targets.reshape(len(names), -1).sum(axis=1).tolist()))


# -- the real TotalSegmentator case ------------------------------------------------------------
def test_totalseg_case_targets(catalog):
    if not (TOTALSEG_CASE / "labels.nii.gz").is_file():
        pytest.skip(f"real test data not found at {TOTALSEG_CASE}")
    label = nib.load(TOTALSEG_CASE / "labels.nii.gz")
    image = np.asanyarray(nib.load(TOTALSEG_CASE / "ct.nii.gz").dataobj)
    label_map = LabelMap.load("totalsegmentator_v2", catalog=catalog)
    names = catalog.names
    targets, labelled, report = label_map.to_targets(np.asanyarray(label.dataobj), label.affine, names, image=image)
    assert targets.dtype == np.uint8 and targets.shape == (32, 122, 101, 30)
    found = counts(targets, names)
    assert found["liver"] == 38634
    assert found["spleen"] == 9452
    assert found["left_lung"] == 1571  # upper 259 + lower 1312
    assert found["right_lung"] == 2736  # middle 1 + lower 2735; upper lobe absent
    assert found["right_kidney"] == 3947 and found["left_kidney"] == 3676
    assert found["intestine"] == 1020 and found["postcava"] == 1368
    labelled_names = {n for n, flag in zip(names, labelled) if flag}
    assert {"liver", "bladder", "prostate", "kidney_cyst"} <= labelled_names
    assert not labelled_names & {"left_head_of_femur", "right_head_of_femur", "rectum", "liver_tumor"}
    unmapped = {entry["name"]: entry["voxels"] for entry in report["unmapped_present"]}
    assert {"vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "spinal_cord", "autochthon_left",
            "autochthon_right", "iliopsoas_left", "iliopsoas_right", "costal_cartilages"} <= set(unmapped)
    assert sum(1 for name in unmapped if name.startswith("rib_")) == 12
    assert unmapped["autochthon_left"] == 7050 and unmapped["costal_cartilages"] == 2100
    assert report["unknown_values"] == []


# -- the built-in maps -------------------------------------------------------------------------
def test_builtin_maps_are_the_table():
    assert sorted(EXPECTED_LABEL_COUNTS) == available_label_maps()


@pytest.mark.parametrize("name", sorted(EXPECTED_LABEL_COUNTS))
def test_builtin_map(name, catalog):
    label_map = LabelMap.load(name, catalog=catalog)
    assert label_map.name == name == label_map.path.stem
    assert label_map.label_count == EXPECTED_LABEL_COUNTS[name]
    assert len(label_map.labels) == label_map.label_count
    assert "http" in label_map.source and label_map.title
    assert label_map.layout["kind"] in LAYOUTS
    assert all(cls in catalog for cls in label_map.labelled_classes)
    assert label_map.labelled_classes


def test_builtin_maps_list_the_official_values(catalog):
    btcv = LabelMap.load("btcv", catalog=catalog)
    assert [btcv.labels[v].classes for v in (1, 2, 3, 9, 10, 13)] == [
        ("spleen",), ("right_kidney",), ("left_kidney",), ("postcava",), ("portal_and_splenic_vein",),
        ("left_adrenal_gland",)]
    flare = LabelMap.load("flare22", catalog=catalog)
    assert flare.labels[2].classes == ("right_kidney",) and flare.labels[13].classes == ("left_kidney",)
    word = LabelMap.load("word", catalog=catalog)
    assert word.labels[3].classes == ("left_kidney",) and word.labels[12].split == "side"
    assert word.labels[15].classes == ("left_head_of_femur",)
    ct_org = LabelMap.load("ct_org", catalog=catalog)
    assert ct_org.unmapped == [(5, "bones"), (6, "brain")]
    assert ct_org.labels[3].classes == ("right_lung", "left_lung")


def test_totalseg_map_matches_the_official_ids(catalog):
    label_map = LabelMap.load("totalsegmentator_v2", catalog=catalog)
    names_file = TOTALSEG_CASE / "label_names.json"
    if names_file.is_file():
        official = {int(k): v for k, v in json.loads(names_file.read_text()).items()}
        assert {v: raw.name for v, raw in label_map.labels.items()} == official
    femurs = [label_map.value_of(name) for name in ("femur_left", "femur_right")]
    assert all(not label_map.labels[v].classes for v in femurs)
    assert len(label_map.unmapped) == 117 - 25
    assert label_map.labels[13].classes == ("right_lung",)


# -- validation --------------------------------------------------------------------------------
def write_map(folder: Path, name: str, labels: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource: test\nlabel_count: 3\nlayout: {{kind: msd}}\nlabels:\n{labels}")
    return path


@pytest.mark.parametrize("labels", ["  1: liver\n  3: spleen\n  3: pancreas\n",
                                    "  1: liver\n  3: spleen\n  '3': pancreas\n"])
def test_raw_value_mapped_twice(tmp_path, catalog, labels):
    path = write_map(tmp_path, "twice", labels)
    with pytest.raises(LabelMapError, match=r"twice\.yaml.*raw value 3 .*twice"):
        LabelMap.load(path, catalog=catalog)


def test_unknown_class(tmp_path, catalog):
    path = write_map(tmp_path, "unknown", "  1: liver\n  2: {name: x, class: kidney_stone}\n")
    with pytest.raises(LabelMapError, match=r"unknown\.yaml.*unknown class 'kidney_stone'"):
        LabelMap.load(path, catalog=catalog)


@pytest.mark.parametrize("bad, message", [
    ("label_count: 0", "label_count must be a positive integer"),
    ("label_count: three", "label_count must be a positive integer"),
    ("colour: red", r"unknown field\(s\) \['colour'\]"),
])
def test_bad_header(tmp_path, catalog, bad, message):
    path = tmp_path / "bad.yaml"
    header = {"label_count": "label_count: 1"}
    key = bad.split(":")[0]
    header[key] = bad
    path.write_text("name: bad\n" + "\n".join(header.values()) + "\nlabels:\n  1: liver\n")
    with pytest.raises(LabelMapError, match=rf"bad\.yaml.*{message}"):
        LabelMap.load(path, catalog=catalog)


def test_label_count_may_exceed_listed_labels(tmp_path, catalog):
    path = write_map(tmp_path, "few", "  2: liver\n")
    assert LabelMap.load(path, catalog=catalog).label_count == 3


def test_split_needs_a_left_and_a_right_class(tmp_path, catalog):
    path = write_map(tmp_path, "split", "  1: {name: x, classes: [liver, spleen], split: side}\n")
    with pytest.raises(LabelMapError, match="one left and one right"):
        LabelMap.load(path, catalog=catalog)


def test_unknown_map_name(catalog):
    with pytest.raises(LabelMapError, match="unknown label map 'nonesuch'.*btcv"):
        LabelMap.load("nonesuch", catalog=catalog)


# -- extensions --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spine_catalog(catalog) -> ClassCatalog:
    return catalog.extend([ClassEntry(name="vertebrae", kind="other", prompt="A CT of vertebrae", source="test")])


def test_extension_gives_unmapped_labels_a_class(spine_catalog, tmp_path):
    base = LabelMap.load("totalsegmentator_v2", catalog=spine_catalog)
    path = tmp_path / "spine.yaml"
    path.write_text("extends: totalsegmentator_v2\nlabels:\n  33: vertebrae\n  32: {name: vertebrae_T12, class: vertebrae}\n"
                    "  200: {name: extra_vertebra, class: vertebrae}\n")
    extended = base.extend(path)
    assert extended.labels[33].name == "vertebrae_T11" and extended.labels[33].classes == ("vertebrae",)
    assert extended.labels[200].classes == ("vertebrae",)
    assert "vertebrae" in extended.labelled_classes and "vertebrae" not in base.labelled_classes
    assert (33, "vertebrae_T11") in base.unmapped and (33, "vertebrae_T11") not in extended.unmapped
    assert extended.extended_by == (str(path),)


@pytest.mark.parametrize("extension, message", [
    ({"labels": {1: "vertebrae"}}, r"raw value 1 \(spleen\).*already maps to spleen"),
    ({"labels": {33: {"name": "vertebrae_T9", "class": "vertebrae"}}}, "is 'vertebrae_T11'"),
    ({"extends": "btcv", "labels": {33: "vertebrae"}}, "extends 'btcv'"),
    ({"source": "spine plugin", "labels": {33: "discs"}}, "spine plugin.*unknown class 'discs'"),
])
def test_extension_errors(spine_catalog, extension, message):
    base = LabelMap.load("totalsegmentator_v2", catalog=spine_catalog)
    with pytest.raises(LabelMapError, match=message):
        base.extend(extension)


# -- targets on constructed volumes ------------------------------------------------------------
def kidney_volume() -> np.ndarray:
    """Merged kidney label (1): 3 slabs at low i, 2 slabs at high i; tumour (2) on both sides."""
    label = np.zeros((20, 4, 4), dtype=np.uint8)
    label[2:5] = 1
    label[15:17] = 1
    label[16, 0, 0] = 2  # high-i tumour voxel
    label[2, 0, :2] = 2  # two low-i tumour voxels
    return label


KIDNEY_CLASSES = ["liver", "right_kidney", "kidney_tumor", "left_kidney", "kidney_cyst"]


@pytest.mark.parametrize("flip", [False, True])
def test_merged_kidney_splits_by_side(catalog, flip):
    affine = np.diag([-1.5 if flip else 1.5, 1.0, 1.0, 1.0])
    affine[:3, 3] = [7.0, -3.0, 2.0]
    label_map = LabelMap.load("kits19", catalog=catalog)
    targets, labelled, report = build_targets(label_map, kidney_volume(), affine, KIDNEY_CLASSES)
    found = counts(targets, KIDNEY_CLASSES)
    high_i, low_i = 2 * 16, 3 * 16  # voxels per block, tumour included
    right, left = (low_i, high_i) if flip else (high_i, low_i)
    assert found == {"liver": 0, "right_kidney": right, "kidney_tumor": 3, "left_kidney": left, "kidney_cyst": 0}
    right_channel = targets[1]
    assert right_channel[16 if not flip else 3].all() and not right_channel[3 if not flip else 16].any()
    # tumour voxels count for the kidney on their own side only
    assert targets[1 if not flip else 3][16, 0, 0] == 1 and targets[3 if not flip else 1][16, 0, 0] == 0
    assert labelled.tolist() == [False, True, True, True, False]
    assert report["midline_from"] == "labels"
    by_method = label_map.to_targets(kidney_volume(), affine, KIDNEY_CLASSES)
    assert np.array_equal(by_method[0], targets) and np.array_equal(by_method[1], labelled)
    assert by_method[2] == report


def test_image_gives_the_body_midline(catalog):
    label = np.zeros((12, 2, 2), dtype=np.uint8)
    label[6], label[8] = 1, 1  # label centroid i = 7
    image = np.full(label.shape, -1000, dtype=np.int16)
    image[:10] = 40  # body centroid i = 4.5
    label_map = LabelMap.load("kits19", catalog=catalog)
    names = ["right_kidney", "left_kidney"]
    by_labels, _, report = build_targets(label_map, label, np.eye(4), names)
    assert report["midline_x"] == pytest.approx(7.0)
    assert by_labels[0, 8].all() and by_labels[1, 6].all()
    by_body, _, report = build_targets(label_map, label, np.eye(4), names, image=image)
    assert report["midline_from"] == "image" and report["midline_x"] == pytest.approx(4.5)
    assert counts(by_body, names) == {"right_kidney": 8, "left_kidney": 0}
    scaled = (image + 1000) / 1040.0  # not HU any more: fall back to the labels
    _, _, report = build_targets(label_map, label, np.eye(4), names, image=scaled)
    assert report["midline_from"] == "labels"


def test_tumours_count_for_their_parent(catalog):
    label = np.zeros((6, 6, 6), dtype=np.uint8)
    label[1:5, 1:5, 1:5] = 1
    label[2:4, 2:4, 2:4] = 2
    names = ["liver", "liver_tumor", "hepatic_vessel", "hepatic_vessel_tumor"]
    targets, labelled, _ = build_targets(LabelMap.load("lits", catalog=catalog), label, np.eye(4), names)
    assert counts(targets, names) == {"liver": 64, "liver_tumor": 8, "hepatic_vessel": 0, "hepatic_vessel_tumor": 0}
    assert labelled.tolist() == [True, True, False, False]
    targets, labelled, _ = build_targets(
        LabelMap.load("msd_task08_hepaticvessel", catalog=catalog), label, np.eye(4), names)
    assert counts(targets, names) == {"liver": 8, "liver_tumor": 0, "hepatic_vessel": 56, "hepatic_vessel_tumor": 8}
    assert labelled.tolist() == [False, False, True, True]


def test_unmapped_and_unknown_values_are_reported(catalog):
    label = np.zeros((4, 4, 4), dtype=np.float32)  # float labels, as MONAI loads them
    label[0] = 1
    label[1, :2] = 5
    label[2, 0, 0] = 9
    targets, labelled, report = build_targets(
        LabelMap.load("ct_org", catalog=catalog), label, np.eye(4), ["liver", "bladder"])
    assert counts(targets, ["liver", "bladder"]) == {"liver": 16, "bladder": 0}
    assert labelled.tolist() == [True, True]
    assert report["unmapped_present"] == [{"value": 5, "name": "bones", "voxels": 8}]
    assert report["unknown_values"] == [{"value": 9, "voxels": 1}]
    assert report["midline_x"] is None


def test_bad_label_volumes(catalog):
    label_map = LabelMap.load("ct_org", catalog=catalog)
    with pytest.raises(LabelMapError, match="whole numbers"):
        build_targets(label_map, np.full((2, 2, 2), 0.5), np.eye(4), ["liver"])
    with pytest.raises(LabelMapError, match="non-negative"):
        build_targets(label_map, np.full((2, 2, 2), -1, dtype=np.int16), np.eye(4), ["liver"])
    with pytest.raises(LabelMapError, match="image shape"):
        build_targets(label_map, np.zeros((2, 2, 2), np.uint8), np.eye(4), ["liver"], image=np.zeros((2, 2, 3)))


# -- per-structure masks and MONAI transforms --------------------------------------------------
def write_masks(folder: Path, affine: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    spleen = np.zeros((8, 3, 3), dtype=np.uint8)
    spleen[:2] = 1
    kidney = np.zeros_like(spleen)
    kidney[6:] = 1
    nib.save(nib.Nifti1Image(spleen, affine), folder / "spleen.nii.gz")
    nib.save(nib.Nifti1Image(kidney, affine), folder / "kidney_right.nii.gz")
    return folder


def test_label_volume_from_masks(tmp_path, catalog):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    folder = write_masks(tmp_path / "segmentations", affine)
    label_map = LabelMap.load("totalsegmentator_v2", catalog=catalog)
    label, found_affine = label_volume_from_masks(label_map, folder)
    assert np.array_equal(found_affine, affine)
    assert label.dtype == np.uint8 and (label[:2] == 1).all() and (label[6:] == 2).all() and (label[2:6] == 0).all()
    nib.save(nib.Nifti1Image(np.zeros((8, 3, 3), np.uint8), affine), folder / "kidney_stone.nii.gz")
    with pytest.raises(LabelMapError, match=r"kidney_stone\.nii\.gz"):
        label_volume_from_masks(label_map, folder)


def test_overlapping_masks_keep_the_larger_raw_value(tmp_path, catalog):
    affine = np.eye(4)
    folder = write_masks(tmp_path / "segmentations", affine)
    overlap = np.zeros((8, 3, 3), dtype=np.uint8)
    overlap[1:7] = 1  # over both the spleen (raw value 1) and the right kidney (raw value 2)
    nib.save(nib.Nifti1Image(overlap, affine), folder / "liver.nii.gz")
    label_map = LabelMap.load("totalsegmentator_v2", catalog=catalog)
    label, _ = label_volume_from_masks(label_map, folder)
    liver = label_map.value_of("liver")
    assert liver > 2 and (label[0] == 1).all() and (label[1:7] == liver).all() and (label[7] == 2).all()


def test_monai_transforms(tmp_path, catalog):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from clipseg3d.data.transforms import LabelMapToTargetsd, LoadSegmentationsd

    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(kidney_volume(), las), tmp_path / "label.nii.gz")
    image = np.full((20, 4, 4), -1000, dtype=np.int16)
    image[1:19] = 30
    nib.save(nib.Nifti1Image(image, las), tmp_path / "image.nii.gz")
    to_targets = LabelMapToTargetsd(label_map=None, class_names=KIDNEY_CLASSES, catalog=catalog)
    to_targets = pickle.loads(pickle.dumps(to_targets))  # DataLoader workers may pickle it
    pipeline = Compose([LoadImaged(keys=("image", "label")), EnsureChannelFirstd(keys=("image", "label")),
                        to_targets])
    out = pipeline({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz"),
                    "dataset": "kits19"})
    assert tuple(out["label"].shape) == (5, 20, 4, 4) and str(out["label"].dtype) == "torch.uint8"
    assert np.allclose(out["label"].affine.numpy(), las)
    assert out["labelled"].tolist() == [False, True, True, True, False]
    # LAS: low i is the patient's right (three slabs, tumour included)
    assert out["label"][1].sum().item() == 48 and out["label"][3].sum().item() == 32

    load = LoadSegmentationsd(label_map="totalsegmentator_v2", catalog=catalog)
    masks = write_masks(tmp_path / "s0000" / "segmentations", np.eye(4))
    sample = load({"segmentations": str(masks)})
    assert tuple(sample["label"].shape) == (1, 8, 3, 3) and "segmentations" not in sample
    sample = LabelMapToTargetsd(label_map="totalsegmentator_v2", class_names=["spleen", "right_kidney"],
                                image_key=None, catalog=catalog, target_key="target")(sample)
    assert sample["target"].sum(dim=(1, 2, 3)).tolist() == [18, 18] and "label" not in sample
