"""The synthetic CT phantom: anatomy, HU, lesions, sites, dataset writers and the command."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog
from clipseg3d.cli.phantom import main
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.phantom import (
    ANATOMY,
    EXTRA_CLASSES,
    HU_JITTER,
    LESIONS,
    MARKER,
    MULTI_DATASETS,
    SITES,
    TISSUES,
    anatomy,
    case_seed,
    generate_case,
    write,
    write_dataset,
    write_multi_dataset,
)
from clipseg3d.phantom.geometry import local, rotation

COARSE = (6.0, 6.0, 6.0)
SEED = 11
# Target HU of homogeneous structures (class or tissue name), as a radiologist would expect them.
EXPECTED_HU = {
    "liver": 55, "spleen": 45, "right_kidney": 30, "left_kidney": 30, "pancreas": 40, "gallbladder": 10,
    "aorta": 40, "postcava": 40, "portal_and_splenic_vein": 40, "esophagus": 40, "right_lung": -850,
    "left_lung": -850, "bladder": 10, "right_adrenal_gland": 25, "left_adrenal_gland": 25,
    "subcutaneous_fat": -100, "visceral_fat": -100, "muscle": 50,
}
BONE = ("cancellous_bone", "vertebral_arch", "rib", "pelvic_bone")


@pytest.fixture(scope="module")
def clean():
    return generate_case(SEED, noise=False)


@pytest.fixture(scope="module")
def noisy():
    return generate_case(SEED)


@pytest.fixture(scope="module")
def with_lesions():
    """Cases that must show every lesion class, each lesion at least 15 mm wide, spleen lesions labelled."""
    return [generate_case(seed, noise=False, min_tumour_mm=15.0, require_tumours=tuple(LESIONS),
                          extra_classes=("spleen_lesion",)) for seed in (2, 7)]


def values(case) -> dict[str, int]:
    return {name: value for value, name in case.label_names.items()}


def world_x(case, mask) -> float:
    return float((case.affine[0, 0] * np.argwhere(mask)[:, 0] + case.affine[0, 3]).mean())


def body_mask(image) -> np.ndarray:
    """Everything inside the skin outline, slice by slice (lungs and bowel gas included)."""
    return np.stack([ndimage.binary_fill_holes(image[:, :, k] > -500) for k in range(image.shape[2])], axis=2)


# -- anatomy data and geometry primitives ----------------------------------------------------------
EPS = np.finfo(np.float64).eps      # the rotation matrices are float64 with entries of magnitude <= 1


def test_rotation_turns_yaw_about_z_then_pitch_about_x_then_roll_about_y():
    assert np.allclose(rotation(90, 0, 0)[:, 0], [0, 1, 0], rtol=0, atol=4 * EPS)   # local x turned onto +y
    assert np.allclose(rotation(0, 90, 0)[:, 1], [0, 0, 1], rtol=0, atol=4 * EPS)   # local y onto +z
    assert np.allclose(rotation(0, 0, 90)[:, 2], [1, 0, 0], rtol=0, atol=4 * EPS)   # local z onto +x
    y, p, r = np.radians([30.0, -50.0, 110.0])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    assert np.allclose(rotation(30, -50, 110), rz @ rx @ ry, rtol=0, atol=8 * EPS)
    centre, rot = (10.0, -20.0, 30.0), rotation(30, -50, 110)
    point = np.array(centre) + 5 * rot[:, 0] - 2 * rot[:, 2]
    coords = local(tuple(np.float32([v]) for v in point), centre, rot)
    tol = 4 * np.finfo(np.float32).eps * 30                                       # float32 at |coordinate| ~ 30
    assert np.allclose(np.concatenate(coords), [5, 0, -2], rtol=0, atol=tol)


def test_left_structures_mirror_the_right_ones():
    def drawing(tissue):
        return [s for s in ANATOMY if s["tissue"] == tissue]

    for right in {s["tissue"] for s in ANATOMY if s["tissue"].startswith("right_")}:
        assert len(drawing(right)) == len(drawing(right.replace("right_", "left_"))) > 0, right
    (kidney,), (twin,) = drawing("right_kidney"), drawing("left_kidney")
    assert tuple(twin["centre"]) == (-66, -38, -12) and tuple(twin["rot"]) == (25, 15, 12)
    assert twin["group"] == "left_kidney~left" != kidney["group"]
    right_lung, left_lung = drawing("right_lung")[0], drawing("left_lung")[0]
    assert tuple(left_lung["apex"]) == (-50.0, 0.0, 98.0) and right_lung["apex"][2] - left_lung["apex"][2] == 10
    with pytest.raises(ValueError, match="side 'up'"):
        anatomy._expand({"shape": "ellipsoid", "tissue": "liver", "centre": (0, 0, 0), "semi": (1, 1, 1),
                         "side": "up"})


def test_vertebrae_and_ribs_are_built_from_their_tables():
    bodies = [s for s in ANATOMY if s["tissue"] == "cortical_bone"]
    assert [s["centre"][2] for s in bodies] == list(range(208, -113, -32))
    assert all(s["core"] == "cancellous_bone" and "disc" in s["within"] for s in bodies)
    transverse = [s for s in ANATOMY if s["tissue"] == "vertebral_arch" and s["centre"][0] != 0]
    assert len(transverse) == 22 and [s["centre"][0] for s in transverse[:2]] == [24.0, -24.0]
    ribs, cartilage = ([s for s in ANATOMY if s["tissue"] == name and s["shape"] == "tube"]
                       for name in ("rib", "cartilage"))
    assert len(ribs) == 12 and len(cartilage) == 8
    ax, ay = anatomy.CAVITY[0] + 4, anatomy.CAVITY[1] + 4           # ribs run 4 mm outside the cavity
    for rib in ribs:
        x, y = np.array(rib["nodes"])[1:, :2].T
        assert np.allclose((x / ax) ** 2 + (y / ay) ** 2, 1, rtol=0, atol=16 * EPS)
    assert [rib["nodes"][0][2] - rib["nodes"][-1][2] for rib in ribs[::2]] == pytest.approx(
        [112, 118, 120, 115, 95, 55], rel=16 * EPS)


def test_extra_classes_are_catalog_entries():
    entry = EXTRA_CLASSES["spleen_lesion"]
    assert (entry.kind, entry.parents, entry.source) == ("tumour", ("spleen",), "phantom")
    assert entry.prompt == "A computerized tomography of a spleen lesion"


# -- determinism and geometry -----------------------------------------------------------------------
def test_same_seed_same_case_and_other_seed_differs(noisy):
    again = generate_case(SEED)
    assert np.array_equal(again.image, noisy.image) and np.array_equal(again.label, noisy.label)
    assert np.array_equal(again.affine, noisy.affine) and again.lesions == noisy.lesions
    other = generate_case(SEED + 1)
    assert (other.label != noisy.label).mean() > 0.05
    assert np.abs(other.image.astype(int) - noisy.image).mean() > 20


def test_default_grid_affine_and_dtypes(noisy):
    assert noisy.image.shape == noisy.label.shape == (128, 128, 96)
    assert noisy.image.dtype == np.int16 and noisy.label.dtype == np.uint8
    assert nib.aff2axcodes(noisy.affine) == ("R", "A", "S")
    assert np.allclose(np.diag(noisy.affine)[:3], 3.0) and np.abs(noisy.affine[:3, 3]).min() > 1
    corners = noisy.image[[0, -1]][:, [0, -1]]
    assert (corners < -900).all()


def test_at_least_14_catalog_organs_inside_the_body(clean):
    catalog = ClassCatalog.builtin()
    present = [name for value, name in clean.label_names.items() if (clean.label == value).any()]
    organs = [name for name in present if catalog[name].kind == "organ"]
    assert len(organs) >= 14, organs
    inside = body_mask(clean.image)
    assert not (clean.label > 0)[~inside].any()
    assert inside.mean() > 0.3 and (clean.image[~ndimage.binary_dilation(inside, iterations=2)] < -900).all()


def test_laterality_in_ras(clean):
    v = values(clean)
    midline = world_x(clean, clean.image > -500)
    assert world_x(clean, clean.label == v["liver"]) > midline + 30
    assert world_x(clean, clean.label == v["spleen"]) < midline - 60
    for right, left in (("right_kidney", "left_kidney"), ("right_lung", "left_lung"),
                        ("right_adrenal_gland", "left_adrenal_gland")):
        assert world_x(clean, clean.label == v[right]) > midline > world_x(clean, clean.label == v[left])


def test_mean_hu_of_every_structure_before_noise(clean):
    v = values(clean)
    measured = {}
    for name, target in EXPECTED_HU.items():
        if name in v:
            mask = clean.label == v[name]
        else:
            mask = np.isin(clean.tissue, [k for k, t in enumerate(clean.tissues) if t.name == name])
        core = ndimage.binary_erosion(mask)
        if core.sum() >= 10:
            measured[name] = float(clean.image[core].mean())
            assert abs(measured[name] - target) <= 15, (name, measured[name], target)
    assert {"liver", "spleen", "right_kidney", "pancreas", "aorta", "right_lung", "muscle"} <= set(measured)
    for name in BONE:
        mask = np.isin(clean.tissue, [k for k, t in enumerate(clean.tissues) if t.name == name])
        core = ndimage.binary_erosion(mask) if ndimage.binary_erosion(mask).sum() >= 10 else mask
        assert 385 <= clean.image[core].mean() <= 715, name


def test_hollow_organs_hold_gas_and_fluid(clean):
    v = values(clean)
    colon = clean.image[clean.label == v["colon"]]
    stomach = clean.image[clean.label == v["stomach"]]
    assert (colon < -600).sum() > 20
    assert ((stomach > 0) & (stomach < 30)).sum() > 50


def test_noise_follows_the_site(clean, noisy):
    v = values(clean)
    liver = ndimage.binary_erosion(clean.label == v["liver"])
    residual = noisy.image[liver].astype(float) - clean.image[liver]
    assert abs(residual.mean()) < 2 and 9 < residual.std() < 15
    quiet = generate_case(3, spacing=COARSE, noise=False)
    loud = generate_case(3, "noisy", spacing=COARSE)
    body = ndimage.binary_erosion(quiet.label == values(quiet)["liver"])
    # the noisy site also shifts HU by -8
    assert 28 < (loud.image[body].astype(float) - quiet.image[body]).std() < 42
    assert -14 < (loud.image[body].astype(float) - quiet.image[body]).mean() < -2


def test_sites_and_spacing_override():
    thick = generate_case(0, "thick_slice", tumours=False)
    assert thick.image.shape == (128, 128, 58) and np.allclose(np.diag(thick.affine)[:3], (3, 3, 5))
    coarse = generate_case(0, spacing=COARSE, tumours=False)
    assert coarse.image.shape == (64, 64, 48) and np.allclose(np.diag(coarse.affine)[:3], 6)
    assert set(SITES) >= {"default", "fine", "thick_slice", "noisy"}


def test_tumours_off_and_bad_arguments():
    case = generate_case(2, spacing=COARSE, tumours=False)
    tumour_values = [v for v, n in case.label_names.items() if n in LESIONS]
    assert case.lesions == [] and not np.isin(case.label, tumour_values).any()
    for kwargs, words in (({"site": "moon"}, "unknown phantom site"), ({"extra_classes": ("tail",)}, "extra"),
                          ({"min_tumour_mm": 50}, "min_tumour_mm"), ({"spacing": (1, 2)}, "spacing")):
        with pytest.raises(ValueError, match=words):
            generate_case(0, **kwargs)
    with pytest.raises(ValueError, match="seed"):
        generate_case(-1)


# -- lesions --------------------------------------------------------------------------------------
def test_lesions_lie_inside_their_parents_with_the_minimum_size(with_lesions):
    catalog = ClassCatalog.builtin().extend(EXTRA_CLASSES.values())
    seen = set()
    for case in with_lesions:
        v = values(case)
        voxel = float(np.prod(np.diag(case.affine)[:3]))
        covered = np.zeros(case.label.shape, bool)
        for lesion in case.lesions:
            seen.add(lesion["class"])
            assert lesion["parent"] in catalog[lesion["class"]].parents
            assert lesion["diameter_mm"] >= 15.0
            centre = np.rint(np.linalg.solve(case.affine, [*lesion["centre_mm"], 1])[:3]).astype(int)
            assert case.label[tuple(centre)] == v[lesion["class"]]
            parts, _ = ndimage.label(case.label == v[lesion["class"]])
            blob = parts == parts[tuple(centre)]
            covered |= blob
            assert blob.sum() * voxel >= 0.5 * np.pi / 6 * 15.0 ** 3
            extent = (np.ptp(np.argwhere(blob), axis=0) + 1) * np.diag(case.affine)[:3]
            assert (extent >= 15.0 - 3.0).all(), (lesion, extent)
            shell = ndimage.binary_dilation(blob) & ~blob
            assert (case.label[shell] == v[lesion["parent"]]).all(), lesion
            if lesion["diameter_mm"] < 25:
                core = ndimage.binary_erosion(blob)
                assert abs(case.image[core].mean() - lesion["hu"]) < 15
        lesion_values = [v[name] for name in LESIONS]
        assert np.array_equal(covered, np.isin(case.label, lesion_values))
    assert {"liver_tumor", "kidney_tumor", "kidney_cyst", "lung_tumor", "colon_tumor", "spleen_lesion"} <= seen


def test_lesion_contrast_is_realistic(with_lesions):
    for case in with_lesions:
        for lesion in case.lesions:
            if lesion["class"] == "kidney_cyst":
                assert 0 <= lesion["hu"] <= 10 + 5
            parent = [t.hu for t in case.tissues if t.cls == lesion["parent"] and t.parent is None][0]
            if lesion["class"] in ("liver_tumor", "pancreas_tumor", "spleen_lesion"):
                assert 10 <= abs(lesion["hu"] - parent) <= 40


def test_lesion_contrast_option_sets_only_the_lesions_hu(tmp_path):
    kwargs = {"noise": False, "require_tumours": ("spleen_lesion",), "extra_classes": ("spleen_lesion",)}
    plain = generate_case(2, **kwargs)
    dark = generate_case(2, lesion_contrast={"spleen_lesion": (-60, -30)}, **kwargs)
    spleen = [t.hu for t in dark.tissues if t.cls == "spleen" and t.parent is None][0]
    shifted = [lesion for lesion in dark.lesions if lesion["class"] == "spleen_lesion"]
    assert shifted and all(-60 <= lesion["hu"] - spleen <= -30 for lesion in shifted)
    assert [{k: v for k, v in lesion.items() if k != "hu"} for lesion in dark.lesions] == \
        [{k: v for k, v in lesion.items() if k != "hu"} for lesion in plain.lesions]
    assert np.array_equal(dark.label, plain.label)
    lesion = dark.label == values(dark)["spleen_lesion"]
    assert dark.image[lesion].mean() < plain.image[lesion].mean() - 15
    away = ~ndimage.binary_dilation(lesion, iterations=3)
    assert np.array_equal(dark.image[away], plain.image[away])
    with pytest.raises(ValueError, match="'spleen' is not a lesion class"):
        generate_case(2, lesion_contrast={"spleen": (-60, -30)})
    assert main(["--out", str(tmp_path / "d"), "--cases", "2", "--seed", "2", "--spacing", *map(str, COARSE),
                 "--extra-classes", "spleen_lesion", "--lesion-contrast", "spleen_lesion=-60,-30"]) == 0
    marker = json.loads((tmp_path / "d" / MARKER).read_text())
    assert marker["lesion_contrast"] == {"spleen_lesion": [-60.0, -30.0]}
    drawn = [lesion["hu"] for case in marker["cases"] for lesion in case["lesions"]
             if lesion["class"] == "spleen_lesion"]
    nominal = TISSUES["spleen"][0]
    assert drawn and all(nominal - 60 - HU_JITTER <= hu <= nominal - 30 + HU_JITTER for hu in drawn)


def test_spleen_lesion_labelled_only_when_asked():
    plain = generate_case(2, noise=False, require_tumours=("spleen_lesion",))
    asked = generate_case(2, noise=False, require_tumours=("spleen_lesion",), extra_classes=("spleen_lesion",))
    assert "spleen_lesion" not in plain.label_names.values()
    assert [l for l in plain.lesions if l["class"] == "spleen_lesion" and not l["labelled"]]
    value = values(asked)["spleen_lesion"]
    assert value == len(ClassCatalog.builtin()) + 1
    assert np.array_equal(plain.image, asked.image)
    lesion = asked.label == value
    assert lesion.sum() > 0 and not (plain.label == value).any()
    assert (plain.label[lesion] == values(plain)["spleen"]).all()
    assert np.array_equal(plain.label[~lesion], asked.label[~lesion])
    spleen = ndimage.binary_erosion(plain.label == values(plain)["spleen"]) & ~ndimage.binary_dilation(lesion)
    assert asked.image[ndimage.binary_erosion(lesion)].mean() < asked.image[spleen].mean() - 8


# -- dataset writers ------------------------------------------------------------------------------
def test_write_dataset_msd_layout(tmp_path):
    out = write_dataset(tmp_path / "ds", 2, seed=5, spacing=COARSE, name="toy")
    meta = json.loads((out / "dataset.json").read_text())
    label_map = yaml.safe_load((out / "toy.yaml").read_text())
    assert meta["numTraining"] == 2 and len(meta["training"]) == 2 and meta["labels"]["0"] == "background"
    assert label_map["label_count"] == len(label_map["labels"]) == len(meta["labels"]) - 1 == 32
    assert label_map["layout"] == {"kind": "msd"} and label_map["name"] == "toy"
    assert LabelMap.from_mapping(label_map, source="toy.yaml").labelled_classes[:2] == ["spleen", "right_kidney"]
    for i, pair in enumerate(meta["training"]):
        image, label = nib.load(out / pair["image"]), nib.load(out / pair["label"])
        case = generate_case(case_seed(5, 0, i), spacing=COARSE)
        assert np.allclose(image.affine, case.affine) and np.allclose(label.affine, case.affine)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(image.dataobj), case.image)
        raw = np.asarray(label.dataobj)
        assert np.array_equal(raw, case.label)
        assert set(np.unique(raw).tolist()) <= {0} | set(label_map["labels"])
    assert not list(out.rglob(".*tmp*"))


def test_write_dataset_labels_only_the_chosen_classes(tmp_path):
    out = write_dataset(tmp_path / "liver", 1, seed=9, spacing=COARSE, classes=["liver", "liver_tumor"],
                        name="liv")
    label_map = yaml.safe_load((out / "liv.yaml").read_text())
    assert label_map["labels"] == {1: "liver", 2: "liver_tumor"} and label_map["label_count"] == 2
    raw = np.asarray(nib.load(out / "labelsTr" / "liv_000.nii.gz").dataobj)
    case = generate_case(case_seed(9, 0, 0), spacing=COARSE)
    v = values(case)
    liver_like = np.isin(case.label, [v["liver"], v["hepatic_vessel_tumor"]])  # unlabelled tumour -> its organ
    assert np.array_equal(raw == 1, liver_like)
    assert np.array_equal(raw == 2, case.label == v["liver_tumor"])
    assert set(np.unique(raw).tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="not drawn"):
        write_dataset(tmp_path / "bad", 1, seed=0, spacing=COARSE, classes=["heart"])
    with pytest.raises(ValueError, match="name"):
        write_dataset(tmp_path / "bad", 1, seed=0, spacing=COARSE, name="../up")


def test_write_dataset_refuses_foreign_folders_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a phantom dataset"):
        write_dataset(foreign, 1, seed=0, spacing=COARSE)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    own = write_dataset(tmp_path / "own", 3, seed=0, spacing=COARSE, tumours=False)
    write_dataset(own, 1, seed=1, spacing=COARSE, tumours=False)
    assert sorted(p.name for p in (own / "imagesTr").iterdir()) == ["phantom_000.nii.gz"]
    assert json.loads((own / MARKER).read_text())["complete"] is True


def test_a_failed_case_leaves_nothing_half_written(tmp_path, monkeypatch):
    save = write._save_nifti

    def fail_on_labels(array, affine, path):
        if path.parent.name == "labelsTr":
            raise OSError("disk full")
        save(array, affine, path)

    monkeypatch.setattr(write, "_save_nifti", fail_on_labels)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "ds", 2, seed=0, spacing=COARSE)
    assert [p for p in (tmp_path / "ds").rglob("*") if p.is_file()] == [tmp_path / "ds" / MARKER]
    monkeypatch.setattr(write, "_save_nifti", save)
    write_dataset(tmp_path / "ds", 1, seed=0, spacing=COARSE)       # the unfinished dataset may be redone
    assert json.loads((tmp_path / "ds" / MARKER).read_text())["complete"] is True


def test_parallel_workers_write_the_same_cases(tmp_path):
    serial = write_dataset(tmp_path / "serial", 2, seed=8, spacing=COARSE)
    parallel = write_dataset(tmp_path / "parallel", 2, seed=8, spacing=COARSE, workers=2)
    for path in sorted(serial.rglob("*.nii.gz")):
        other = parallel / path.relative_to(serial)
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(other).dataobj))


def test_write_multi_dataset(tmp_path):
    folders = write_multi_dataset(tmp_path / "multi", 1, seed=4, spacing=(4.0, 4.0, 4.0))
    assert [f.name for f in folders] == list(MULTI_DATASETS)
    for folder in folders:
        spec = MULTI_DATASETS[folder.name]
        label_map = yaml.safe_load((folder / f"{folder.name}.yaml").read_text())
        assert label_map["label_count"] == len(spec["classes"]) == len(label_map["labels"])
        LabelMap.from_mapping(label_map, source=folder.name)
        raw = np.asarray(nib.load(next((folder / "labelsTr").iterdir())).dataobj)
        assert set(np.unique(raw).tolist()) <= set(range(len(spec["classes"]) + 1))
        for tumour in spec["require"]:
            value = next(v for v, s in label_map["labels"].items() if s == tumour)
            assert (raw == value).any(), (folder.name, tumour)
    kits = yaml.safe_load((tmp_path / "multi" / "kits_like" / "kits_like.yaml").read_text())
    assert kits["labels"][1] == {"name": "kidney", "classes": ["right_kidney", "left_kidney"], "split": "side"}
    seeds = [json.loads((f / MARKER).read_text())["cases"][0]["seed"] for f in folders]
    assert len(set(seeds)) == len(seeds)


def test_command_round_trip(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--cases", "2", "--seed", "3", "--spacing", *map(str, COARSE),
                 "--extra-classes", "spleen_lesion", "--min-tumour-mm", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{out}: 2 cases, 33 labels, site default, 64x64x48 voxels")
    label_map = yaml.safe_load((out / "phantom.yaml").read_text())
    assert label_map["labels"][33] == "spleen_lesion" and label_map["label_count"] == 33
    lesions = [l for c in json.loads((out / MARKER).read_text())["cases"] for l in c["lesions"]]
    assert all(l["diameter_mm"] >= 10 for l in lesions)
    assert main(["--out", str(tmp_path / "multi"), "--cases", "1", "--seed", "3", "--multi", "--spacing", "8", "8",
                 "8"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(MULTI_DATASETS) + 1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert main(["--out", str(tmp_path / "junk"), "--cases", "1", "--seed", "0"]) == 1
    assert "not a phantom dataset" in capsys.readouterr().err
