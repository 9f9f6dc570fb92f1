"""Class plugins: discovery, `clipseg3d classes list/check`, broken plugins, the musculoskeletal plugin."""

import configparser
import shutil
import subprocess
import sys
import warnings
import zipfile

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.catalog import load_catalog
from clipseg3d.catalog.plugins import check, discover
from clipseg3d.cli.classes import main as classes_main
from clipseg3d.data.labelmap import LabelMap

from conftest import shared_data
from plugins import MUSCULOSKELETAL, SPLEEN_LESION, install_packaged, install_plugin

MUSCULOSKELETAL_IDS = {30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11",
                       79: "spinal_cord", 86: "left_autochthon", 87: "right_autochthon", 88: "left_iliopsoas",
                       89: "right_iliopsoas", 117: "costal_cartilages",
                       **{92 + i: "left_ribs" for i in range(12)}, **{104 + i: "right_ribs" for i in range(12)}}


@pytest.fixture
def spleen_lesion(tmp_path, monkeypatch):
    """The tests' spleen-lesion plugin, installed the way pip would leave it."""
    site = install_packaged(tmp_path / "site-good", SPLEEN_LESION)
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def musculoskeletal(tmp_path, monkeypatch):
    site = install_packaged(tmp_path / "site-msk", MUSCULOSKELETAL)
    monkeypatch.syspath_prepend(str(site))
    return site


def run_classes(capsys, *args: str) -> tuple[int, str, str]:
    code = classes_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, list[str]]:
    """``classes list`` rows by class name: [kind, relations, source]."""
    lines = out.splitlines()
    starts = [lines[0].index(column) for column in ("kind", "relations", "source")]
    rows = {}
    for line in lines[1:]:
        cells = [line[:starts[0]], line[starts[0]:starts[1]], line[starts[1]:starts[2]], line[starts[2]:]]
        rows[cells[0].strip()] = [cell.strip() for cell in cells[1:]]
    return rows


def test_without_plugins_list_shows_the_builtin_catalog_and_check_passes(capsys):
    code, out, err = run_classes(capsys, "list")
    rows = table(out)
    assert code == 0 and len(rows) == 32
    assert rows["liver_tumor"] == ["tumour", "in liver", "built-in"]
    assert rows["left_kidney"][1] == "left of pair with right_kidney"
    code, out, err = run_classes(capsys, "check")
    assert code == 0 and "32 classes: 32 built-in, 0 from 0 plugins; no problems" in out


def test_good_plugin_is_discovered_listed_with_its_version_and_checks_clean(spleen_lesion, capsys):
    plugins, errors = discover()
    assert errors == [] and [(p.name, p.version) for p in plugins] == [("spleen-lesion", "0.1.0")]
    entry = load_catalog()["splenic lesion"]  # by alias
    assert (entry.name, entry.kind, entry.parents) == ("spleen_lesion", "tumour", ("spleen",))
    assert entry.source == "plugin spleen-lesion 0.1.0"
    code, out, _ = run_classes(capsys, "list")
    rows = table(out)
    assert code == 0 and len(rows) == 33
    assert rows["spleen_lesion"] == ["tumour", "in spleen", "plugin spleen-lesion 0.1.0"]
    assert rows["spleen"][2] == "built-in"
    code, out, _ = run_classes(capsys, "list", "--source", "spleen-lesion", "--prompts")
    assert list(table(out)) == ["spleen_lesion"] and "A computerized tomography of a spleen lesion" in out
    code, out, err = run_classes(capsys, "check")
    assert code == 0 and err == ""
    assert "plugin spleen-lesion 0.1.0: 1 class, 0 label maps" in out
    assert "33 classes: 32 built-in, 1 from 1 plugin; no problems" in out


DUPLICATE_RAW_VALUE = """\
extends: msd_task09_spleen
labels:
  2: spleen_cyst
  2: spleen_cyst
"""
BROKEN = {
    "import-error": {"module": "import clipseg3d_no_such_dependency\nCLASSES = {'classes': []}\n",
                     "expect": "cannot load 'broken_import_error:CLASSES': ModuleNotFoundError"},
    "duplicate-name": {"module": "CLASSES = {'classes': [{'name': 'Liver'}]}\n",
                       "expect": "class 'Liver' (plugin duplicate-name 1.2) clashes with 'liver' (built-in)"},
    "duplicate-alias": {"module": "CLASSES = {'classes': [{'name': 'hepar', 'aliases': ['Spleen']}]}\n",
                        "expect": "alias 'Spleen' of class 'hepar' (plugin duplicate-alias 1.2) clashes with 'spleen'"},
    "unknown-parent": {"module": "CLASSES = {'classes': [{'name': 'gizzard_tumor', 'kind': 'tumour', "
                                 "'parents': ['gizzard']}]}\n",
                       "expect": "unknown parent 'gizzard'"},
    "raw-value-twice": {"module": "from pathlib import Path\nCLASSES = {'classes': [{'name': 'spleen_cyst', "
                                  "'kind': 'tumour', 'parents': ['spleen']}], "
                                  "'label_maps': [str(Path(__file__).with_name('spleen_cyst.yaml'))]}\n",
                        "expect": "spleen_cyst.yaml: raw value 2 is given twice (line 4)"},
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_plugin_gets_one_error_naming_it_and_the_rest_keeps_working(kind, spleen_lesion, tmp_path,
                                                                           monkeypatch, capsys):
    module = f"broken_{kind.replace('-', '_')}"
    site = install_plugin(tmp_path / "site-broken", kind, "1.2", {kind: f"{module}:CLASSES"},
                          {module: BROKEN[kind]["module"]})
    (site / "spleen_cyst.yaml").write_text(DUPLICATE_RAW_VALUE)
    monkeypatch.syspath_prepend(str(site))

    code, out, err = run_classes(capsys, "check")
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(problems) == 1, err
    assert problems[0].startswith(f"error: plugin {kind} 1.2: ") and BROKEN[kind]["expect"] in problems[0]
    assert "plugin spleen-lesion 0.1.0: 1 class" in out

    code, out, err = run_classes(capsys, "list")
    assert code == 0 and table(out)["spleen_lesion"][2] == "plugin spleen-lesion 0.1.0"
    assert f"warning: plugin {kind} 1.2" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        catalog = load_catalog()
    assert "spleen_lesion" in catalog and catalog["liver"].source == "built-in"
    if kind in ("import-error", "raw-value-twice"):  # the plugin's classes are fine or never loaded
        return
    assert [str(w.message) for w in caught if kind in str(w.message)], "no warning names the plugin"


def test_plugin_label_map_with_a_raw_value_twice_is_skipped_with_a_warning(tmp_path, monkeypatch):
    module = "clipseg3d_spleen_cyst"
    source = BROKEN["raw-value-twice"]["module"]
    site = install_plugin(tmp_path / "site", "spleen-cyst", "0.3", {"spleen-cyst": f"{module}:CLASSES"},
                          {module: source})
    (site / "spleen_cyst.yaml").write_text(DUPLICATE_RAW_VALUE)
    monkeypatch.syspath_prepend(str(site))
    base = LabelMap.load("msd_task09_spleen")
    with pytest.warns(UserWarning, match="plugin spleen-cyst: .*raw value 2 is given twice"):
        extended = base.with_plugins()
    assert extended.labels == base.labels


def test_two_plugins_that_map_the_same_raw_value_report_the_second(tmp_path, monkeypatch, capsys):
    for name in ("first", "second"):
        module = f"clipseg3d_{name}"
        source = (f"from pathlib import Path\nCLASSES = {{'classes': [{{'name': '{name}_structure', 'kind': 'other'}}], "
                  f"'label_maps': [str(Path(__file__).with_name('{name}.yaml'))]}}\n")
        site = install_plugin(tmp_path / name, name, "1.0", {name: f"{module}:CLASSES"}, {module: source})
        (site / f"{name}.yaml").write_text(f"extends: totalsegmentator_v2\nlabels:\n  16: {name}_structure\n")
        monkeypatch.syspath_prepend(str(site))
    code, out, err = run_classes(capsys, "check")
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: plugin second 1.0: {tmp_path / 'second' / 'second.yaml'}: raw value 16 (trachea) of "
        "'totalsegmentator_v2' already maps to first_structure; it cannot be re-mapped"]


def test_plugins_may_name_each_others_classes_in_any_order(tmp_path, monkeypatch):
    sources = {"a-tumours": "CLASSES = {'classes': [{'name': 'gizzard_tumor', 'kind': 'tumour', "
                            "'parents': ['gizzard']}]}\n",
               "b-organs": "CLASSES = {'classes': [{'name': 'gizzard'}]}\n"}
    for name, source in sources.items():
        module = f"clipseg3d_{name.replace('-', '_')}"
        monkeypatch.syspath_prepend(str(install_plugin(tmp_path / name, name, "1.0", {name: f"{module}:CLASSES"},
                                                       {module: source})))
    catalog, plugins, errors = check()
    assert errors == [] and [p.name for p in plugins] == ["b-organs", "a-tumours"]
    assert catalog.tumours_of("gizzard")[0].name == "gizzard_tumor"


# -- the musculoskeletal plugin ------------------------------------------------------------------
def test_musculoskeletal_plugin_registers_its_classes_and_checks_clean(musculoskeletal, capsys):
    code, out, err = run_classes(capsys, "check")
    assert code == 0, err
    assert "plugin musculoskeletal 0.1.0: 12 classes, 1 label map" in out
    catalog = load_catalog()
    assert catalog["autochthon_left"].name == "left_autochthon"
    assert catalog["left_autochthon"].partner == "right_autochthon" and catalog["right_ribs"].side == "right"
    assert catalog["spinal_cord"].kind == "organ" and catalog["vertebrae_L1"].kind == "other"
    rows = table(run_classes(capsys, "list", "--source", "musculoskeletal")[1])
    assert len(rows) == 12 and rows["left_iliopsoas"][1] == "left of pair with right_iliopsoas"


def test_musculoskeletal_plugin_maps_totalsegmentator_ids(musculoskeletal):
    plain = LabelMap.load("totalsegmentator_v2")
    extended = plain.with_plugins()
    for value, name in MUSCULOSKELETAL_IDS.items():
        assert plain.labels[value].classes == ()
        assert extended.labels[value].classes == (name,), value
    assert extended.labels[92].name == "rib_left_1"  # raw names stay TotalSegmentator's
    assert extended.labels[5].classes == ("liver",)
    assert len(extended.unmapped) == len(plain.unmapped) - len(MUSCULOSKELETAL_IDS)


def test_musculoskeletal_targets_on_the_real_case(musculoskeletal):
    case = shared_data("totalseg-case")
    label = nib.load(case / "labels.nii.gz")
    raw = np.asarray(label.dataobj)
    label_map = LabelMap.load("totalsegmentator_v2").with_plugins()
    names = ["spinal_cord", "vertebrae_T11", "vertebrae_L2", "right_ribs", "left_autochthon", "liver"]
    targets, labelled, report = label_map.to_targets(raw, label.affine, names)
    assert labelled.all()
    expected = {"spinal_cord": [79], "vertebrae_T11": [33], "vertebrae_L2": [30], "right_ribs": range(104, 116),
                "left_autochthon": [86], "liver": [5]}
    for k, name in enumerate(names):
        assert targets[k].sum() == np.isin(raw, list(expected[name])).sum() > 0, name
    assert report["unmapped_present"] == []  # every structure in this scan now has a class


def test_musculoskeletal_setup_declares_the_entry_point_and_packs_its_yaml(tmp_path):
    config = configparser.ConfigParser()
    config.read(MUSCULOSKELETAL / "setup.cfg")
    assert config["options.entry_points"]["clipseg3d.classes"].strip() == "musculoskeletal = clipseg3d_musculoskeletal:plugin"
    project = shutil.copytree(MUSCULOSKELETAL, tmp_path / "project")  # the build writes beside the sources
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(tmp_path), str(project)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("clipseg3d_musculoskeletal-0.1.0-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"clipseg3d_musculoskeletal/classes.yaml", "clipseg3d_musculoskeletal/totalsegmentator_v2.yaml"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read("clipseg3d_musculoskeletal-0.1.0.dist-info/entry_points.txt").decode()
    assert "[clipseg3d.classes]" in entry_points and "clipseg3d_musculoskeletal:plugin" in entry_points
