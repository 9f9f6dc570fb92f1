"""Find a dataset's (image, label) pairs and write them as a JSON-lines manifest.

The label map's ``layout`` says where the files are, relative to the dataset's root folder:

- ``msd``: ``images`` (default ``imagesTr``) and ``labels`` (default ``labelsTr``) folders, or
  lists of folders paired by position; an image and its label have the same file name.
- ``nnunet``: as ``msd``, but the image is ``<case><channel>.nii.gz`` (``channel``, default
  ``_0000``) and the label ``<case>.nii.gz``.
- ``pairs``: ``images`` and ``labels`` glob patterns (one or a list; ``**`` recurses) and
  ``image_match`` / ``label_match`` regular expressions whose first group is the case id,
  searched in the path relative to the root; files they do not match are left out.
- ``kits``: one folder per case (``cases``, default ``case_*``) holding ``image`` (default
  ``imaging.nii.gz``) and ``label`` (default ``segmentation.nii.gz``).
- ``totalseg``: one folder per case (``cases``, default ``s*``) holding ``image`` (default
  ``ct.nii.gz``) and either ``label`` (default ``labels.nii.gz``, used when present) or a
  ``segmentations`` folder of per-structure masks.
- ``cases``: one folder per case (``cases``, a glob; its name is the case id) holding one
  ``image`` (a glob: a NIfTI file or a DICOM series folder) and one ``label`` (a glob) of the form
  ``label_form``: ``label`` (an id-keyed NIfTI file), ``segmentations`` (a folder of per-structure
  masks, picked by ``masks``) or ``slices`` (a folder of per-slice PNG masks, grey values mapped
  by ``slice_values``); see :mod:`clipseg3d.data.label_readers`.

An image may be a DICOM series folder (``pairs`` and ``cases`` globs may match folders); the
index checks that it holds DICOM files. Each manifest line: ``{"image", <label form>, "dataset",
"case"}`` with absolute paths, the label form one of :data:`LABEL_FORMS`; ``dataset`` is the
built-in map's name or the label-map YAML's absolute path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from clipseg3d.data.labelmap import LabelMap, available_label_maps
from clipseg3d.data.scans import ScanError, find_scans
from clipseg3d.files import write_text_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: The manifest keys a label may come under, one per form the loaders read.
LABEL_FORMS = ("label", "segmentations", "slices")


class LayoutError(ValueError):
    """A dataset folder that does not look like its label map's layout says."""


def _abs(path: Path) -> str:
    return os.path.abspath(path)


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _nifti_stem(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


class _Finder:
    """Finds the cases of one layout kind under a root."""

    defaults: dict = {}
    summary = ""

    def __init__(self, layout: dict, root: Path, where: str) -> None:
        unknown = set(layout) - set(self.defaults) - {"kind"}
        if unknown:
            raise LayoutError(f"{where}: layout {layout['kind']!r} has unknown key(s) {sorted(unknown)}; "
                              f"known: {sorted(self.defaults)}")
        self.options = {**self.defaults, **{k: v for k, v in layout.items() if k != "kind"}}
        self.root, self.where = root, where

    def expected(self) -> str:
        return f"expected layout {self.summary.format(**self.options)} under {self.root}"

    def fail(self, problem: str) -> LayoutError:
        return LayoutError(f"{self.where}: {problem}; {self.expected()}")

    def folder(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise self.fail(f"folder {path} does not exist")
        return path

    def find(self) -> list[dict]:
        raise NotImplementedError


class _Msd(_Finder):
    defaults = {"images": "imagesTr", "labels": "labelsTr"}
    summary = "'msd' ({images}/<case>.nii.gz with the same file name in {labels}/)"

    def label_name(self, image: Path) -> str | None:
        return image.name if _nifti_stem(image) else None

    def case_of(self, label_name: str) -> str:
        return _nifti_stem(Path(label_name)) or label_name

    def find(self) -> list[dict]:
        images, labels = _as_list(self.options["images"]), _as_list(self.options["labels"])
        if len(images) != len(labels):
            raise self.fail("'images' and 'labels' must list the same number of folders")
        cases = []
        for image_dir, label_dir in zip(images, labels):
            image_dir, label_dir = self.folder(image_dir), self.folder(label_dir)
            for image in sorted(filter(_visible, image_dir.iterdir())):
                name = self.label_name(image)
                if name is not None:
                    label = label_dir / name
                    cases.append({"image": image, "label": label if label.is_file() else None,
                                  "expected": label, "case": self.case_of(name)})
        return cases


class _NnUnet(_Msd):
    defaults = {"images": "imagesTr", "labels": "labelsTr", "channel": "_0000"}
    summary = "'nnunet' ({images}/<case>{channel}.nii.gz with {labels}/<case>.nii.gz)"

    def label_name(self, image: Path) -> str | None:
        stem, channel = _nifti_stem(image), self.options["channel"]
        if stem is None or not stem.endswith(channel):
            return None
        return stem[: -len(channel)] + image.name[len(stem):]


class _Pairs(_Finder):
    defaults = {"images": None, "labels": None, "image_match": None, "label_match": None}
    summary = "'pairs' (images {images} matching {image_match!r}, labels {labels} matching {label_match!r})"

    def files(self, patterns: str | Sequence[str], regex: str) -> dict[str, Path]:
        try:
            pattern = re.compile(regex)
        except re.error as err:
            raise LayoutError(f"{self.where}: layout 'pairs': bad regular expression {regex!r} ({err})") from err
        if pattern.groups < 1:
            raise LayoutError(f"{self.where}: layout 'pairs': {regex!r} needs a group for the case id")
        found: dict[str, Path] = {}
        for glob in _as_list(patterns):
            for path in sorted(self.root.glob(glob)):
                match = pattern.search(path.relative_to(self.root).as_posix())
                if not match or not _visible(path):
                    continue
                case = match.group(1)
                if case in found and found[case] != path:
                    raise self.fail(f"case {case!r} matches both {found[case]} and {path}")
                found[case] = path
        return found

    def find(self) -> list[dict]:
        missing = [key for key, value in self.options.items() if not value]
        if missing:
            raise LayoutError(f"{self.where}: layout 'pairs' needs {missing}")
        if not self.root.is_dir():
            raise self.fail(f"folder {self.root} does not exist")
        images = self.files(self.options["images"], self.options["image_match"])
        labels = self.files(self.options["labels"], self.options["label_match"])
        return [{"image": image, "label": labels.get(case), "case": case,
                 "expected": f"a label matching {self.options['label_match']!r} with case id {case}"}
                for case, image in sorted(images.items())]


class _Kits(_Finder):
    defaults = {"cases": "case_*", "image": "imaging.nii.gz", "label": "segmentation.nii.gz"}
    summary = "'kits' ({cases}/{image} with {cases}/{label})"

    def case_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise self.fail(f"folder {self.root} does not exist")
        return sorted(p for p in self.root.glob(self.options["cases"]) if p.is_dir() and _visible(p))

    def find(self) -> list[dict]:
        cases = []
        for folder in self.case_dirs():
            image, label = folder / self.options["image"], folder / self.options["label"]
            if image.is_file():
                cases.append({"image": image, "label": label if label.is_file() else None,
                              "expected": label, "case": folder.name})
        return cases


class _TotalSeg(_Kits):
    defaults = {"cases": "s*", "image": "ct.nii.gz", "label": "labels.nii.gz", "segmentations": "segmentations"}
    summary = "'totalseg' ({cases}/{image} with {cases}/{label} or {cases}/{segmentations}/<name>.nii.gz)"

    def find(self) -> list[dict]:
        cases = []
        for folder in self.case_dirs():
            image, label = folder / self.options["image"], folder / self.options["label"]
            masks = folder / self.options["segmentations"]
            if not image.is_file():
                continue
            case = {"image": image, "case": folder.name, "expected": f"{label} or {masks}/", "label": None}
            if label.is_file():
                case["label"] = label
            elif masks.is_dir() and any(_nifti_stem(p) for p in masks.iterdir()):
                case.update(label=masks, form="segmentations")
            cases.append(case)
        return cases


class _Cases(_Kits):
    defaults = {"cases": None, "image": None, "label": None, "label_form": "label", "masks": None,
                "slice_values": None}
    summary = "'cases' ({cases}/{image} with {cases}/{label} as {label_form!r})"

    def one(self, folder: Path, key: str) -> Path | None:
        found = sorted(p for p in folder.glob(self.options[key]) if _visible(p))
        if len(found) > 1:
            raise self.fail(f"{key} {self.options[key]!r} matches {len(found)} paths in {folder}, expected one")
        return found[0] if found else None

    def find(self) -> list[dict]:
        missing = [key for key in ("cases", "image", "label") if not self.options[key]]
        if missing:
            raise LayoutError(f"{self.where}: layout 'cases' needs {missing}")
        if self.options["label_form"] not in LABEL_FORMS:
            raise LayoutError(f"{self.where}: layout 'cases': label_form {self.options['label_form']!r} is not "
                              f"one of {list(LABEL_FORMS)}")
        cases = []
        for folder in self.case_dirs():
            image = self.one(folder, "image")
            if image is not None:
                cases.append({"image": image, "label": self.one(folder, "label"), "form": self.options["label_form"],
                              "expected": folder / self.options["label"], "case": folder.name})
        return cases


LAYOUTS: dict[str, Callable[..., _Finder]] = {
    "msd": _Msd, "nnunet": _NnUnet, "pairs": _Pairs, "kits": _Kits, "totalseg": _TotalSeg, "cases": _Cases,
}


def _check_image(path: Path, finder: _Finder) -> None:
    """Refuse an image folder that is not a DICOM series (cost: about one file read)."""
    if path.is_dir():
        try:
            series = find_scans([path])
        except ScanError:
            series = []
        if series != [Path(_abs(path))]:
            raise finder.fail(f"image folder {_abs(path)} holds no DICOM series files")


def find_cases(dataset: str | Path, root: Path, label_map: LabelMap | None,
                skip_unlabelled: bool) -> tuple[list[dict], list[str]]:
    """Manifest records and the images skipped for having no label."""
    label_map = label_map if label_map is not None else LabelMap.load(dataset)
    where = f"{dataset}"
    kind = label_map.layout.get("kind")
    if kind not in LAYOUTS:
        raise LayoutError(f"{where}: layout kind {kind!r} is not one of {sorted(LAYOUTS)}")
    finder = LAYOUTS[kind](label_map.layout, Path(root), where)
    found = finder.find()
    if not found:
        raise finder.fail("no image found")
    builtin = isinstance(dataset, str) and dataset in available_label_maps()
    name = dataset if builtin else _abs(Path(dataset))
    records, skipped, seen = [], [], set()
    for case in found:
        if case["label"] is None:
            if not skip_unlabelled:
                raise finder.fail(f"image {_abs(case['image'])} has no label (looked for {case['expected']}; "
                                  "--skip-unlabelled leaves such images out)")
            skipped.append(_abs(case["image"]))
            continue
        if case["case"] in seen:
            raise finder.fail(f"case id {case['case']!r} occurs twice")
        seen.add(case["case"])
        _check_image(case["image"], finder)
        records.append({"image": _abs(case["image"]), case.get("form", "label"): _abs(case["label"]),
                        "dataset": name, "case": case["case"]})
    if not records:
        raise finder.fail("every image lacks a label")
    return records, skipped


def index_dataset(dataset: str | Path, root: Path, label_map: LabelMap | None = None,
                  skip_unlabelled: bool = False) -> list[dict]:
    """Manifest records for the dataset under ``root``.

    ``dataset``: a built-in label-map name or a label-map YAML path (used as each record's
    ``dataset``); ``label_map``: the already loaded map, if any. An image without a label is an
    error unless ``skip_unlabelled``.
    """
    return find_cases(dataset, Path(root), label_map, skip_unlabelled)[0]


def write_manifest(records: Sequence[dict], path: Path, overwrite: bool = False) -> None:
    """Write one JSON object per line, atomically (temporary file + rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))
