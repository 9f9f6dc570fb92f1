"""Phantom datasets on disk: MSD layout, ``dataset.json``, a label-map YAML and a marker file.

A folder is written only if it is empty, new, or an earlier phantom dataset (recognised by its
:data:`MARKER`, which lists the files to replace); every file lands atomically.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import yaml

from clipseg3d.files import replace_atomically, write_json_atomic, write_text_atomic
from clipseg3d.phantom.classes import drawable_classes
from clipseg3d.phantom.datasets import MULTI_DATASETS, Site, get_site
from clipseg3d.phantom.generate import generate_case
from clipseg3d.phantom.lesions import check_lesion_contrast

MARKER = ".clipseg3d-phantom"
GENERATOR = "clipseg3d.phantom.generate"


def case_seed(seed: int, stream: int, index: int) -> int:
    """The seed of case ``index`` of seed stream ``stream`` (one stream per dataset)."""
    return int(np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(1)[0])


def _raw_labels(classes: Sequence[str | Mapping] | None, drawable: Mapping[int, str], name: str
                ) -> tuple[dict[int, Any], dict[str, int]]:
    """(YAML labels, class -> raw value) for a dataset that labels ``classes`` (None: all drawable)."""
    if classes is None:
        return dict(drawable), {cls: value for value, cls in drawable.items()}
    known = set(drawable.values())
    labels: dict[int, Any] = {}
    values: dict[str, int] = {}
    for value, spec in enumerate(classes, start=1):
        members = [spec] if isinstance(spec, str) else list(spec.get("classes", ()))
        for cls in members:
            if cls not in known:
                raise ValueError(f"phantom dataset {name!r}: class {cls!r} is not drawn by the phantom "
                                 f"(drawable: {', '.join(sorted(known))})")
            if cls in values:
                raise ValueError(f"phantom dataset {name!r}: class {cls!r} is listed twice")
            values[cls] = value
        labels[value] = spec if isinstance(spec, str) else dict(spec)
    return labels, values


def _check_target(out: Path) -> dict | None:
    """The previous marker of a phantom dataset in ``out``; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"{out}: folder is not empty and is not a phantom dataset (no readable {MARKER}); "
                              "choose an empty or new folder") from None


def _remove_previous(out: Path, previous: Mapping | None) -> None:
    """Delete the files an earlier phantom dataset in ``out`` listed (only those inside ``out``)."""
    for old in (previous or {}).get("files", []):
        target = (out / old).resolve()
        if target.parent.is_relative_to(out.resolve()) and target.is_file():
            target.unlink()


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` as NIfTI with ``affine`` as both qform and sform, in millimetres."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.to_filename(path)


def _write_case(job: tuple) -> dict:
    """Generate and write one case; its label lands only with its image, and neither alone."""
    out, stem, seed, kwargs, values = job
    case = generate_case(seed, **kwargs)
    image_path, label_path = out / "imagesTr" / f"{stem}.nii.gz", out / "labelsTr" / f"{stem}.nii.gz"

    def write_image_then_label(temp: Path) -> None:
        _save_nifti(case.image, case.affine, temp)
        replace_atomically(label_path, lambda label_temp: _save_nifti(case.label_map(values), case.affine, label_temp))

    replace_atomically(image_path, write_image_then_label)
    return {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz", "seed": seed,
            "shape": list(case.image.shape), "lesions": case.lesions}


def _metadata(name: str, seed: int, stream: int, site: Site, labels: Mapping[int, Any],
              records: Sequence[dict]) -> tuple[dict, dict]:
    """(``dataset.json``, label-map YAML) of a written dataset."""
    dataset = {
        "name": name, "description": f"clipseg3d synthetic CT phantom (seed {seed}, site {site.name})",
        "reference": GENERATOR, "licence": "CC0-1.0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background",
                   **{str(v): spec if isinstance(spec, str) else spec["name"] for v, spec in labels.items()}},
        "numTraining": len(records), "numTest": 0,
        "training": [{"image": r["image"], "label": r["label"]} for r in records], "test": [],
    }
    label_map = {"name": name, "title": f"Synthetic CT phantom dataset {name!r} (clipseg3d)",
                 "source": f"{GENERATOR} (seed {seed}, stream {stream}, site {site.name})",
                 "label_count": len(labels), "layout": {"kind": "msd"}, "labels": labels}
    return dataset, label_map


def write_dataset(out: Path, cases: int, seed: int, site: Site | str = "default",
                  spacing: Sequence[float] | None = None, classes: Sequence[str | Mapping] | None = None,
                  name: str = "phantom", extra_classes: Sequence[str] = (), min_tumour_mm: float = 5.0,
                  tumours: bool = True, *, require_tumours: Sequence[str] = (), stream: int = 0,
                  lesion_contrast: Mapping[str, Sequence[float]] | None = None, workers: int = 1) -> Path:
    """Write ``cases`` phantom cases in MSD layout with ``dataset.json`` and ``<name>.yaml``.

    ``classes`` limits the labelled classes (others are background in the label files but still
    in the images; an unlabelled lesion keeps its labelled parent's value); an entry may be a
    merged raw label ``{name, classes, split}``. Raw values are 1..K in ``classes`` order, or the
    phantom's own values when ``classes`` is None. ``out`` must be empty, new, or an earlier
    phantom dataset (which is replaced). ``lesion_contrast`` is :func:`generate_case`'s.
    ``workers`` > 1 generates cases in parallel processes.
    """
    out = Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"phantom dataset name {name!r}: use letters, digits, '_', '-' and '.' only")
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"phantom dataset {out}: cases must be a positive integer, got {cases!r}")
    site = get_site(site)
    contrast = check_lesion_contrast(lesion_contrast or {})
    labels, values = _raw_labels(classes, drawable_classes(extra_classes), name)
    previous = _check_target(out)
    if previous is not None and previous.get("kind") == "multi":
        raise FileExistsError(f"{out}: holds several phantom datasets; write a single one elsewhere")
    stems = [f"{name}_{i:03d}" for i in range(cases)]
    _remove_previous(out, previous)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    settings = {"generator": GENERATOR, "name": name, "seed": seed, "stream": stream,
                "site": site.name, "spacing": None if spacing is None else [float(s) for s in spacing],
                "extra_classes": list(extra_classes), "min_tumour_mm": min_tumour_mm, "tumours": tumours,
                "require_tumours": list(require_tumours),
                "lesion_contrast": {name: list(bounds) for name, bounds in contrast.items()},
                "files": ([f"imagesTr/{s}.nii.gz" for s in stems] + [f"labelsTr/{s}.nii.gz" for s in stems]
                          + ["dataset.json", f"{name}.yaml"])}
    write_json_atomic(out / MARKER, {**settings, "complete": False})
    kwargs = {"site": site, "spacing": spacing, "tumours": tumours, "extra_classes": tuple(extra_classes),
              "min_tumour_mm": min_tumour_mm, "require_tumours": tuple(require_tumours), "lesion_contrast": contrast}
    jobs = [(out, stem, case_seed(seed, stream, i), kwargs, values) for i, stem in enumerate(stems)]
    if workers > 1 and cases > 1:
        with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
            records = list(pool.map(_write_case, jobs))
    else:
        records = [_write_case(job) for job in jobs]
    dataset, label_map = _metadata(name, seed, stream, site, labels, records)
    write_json_atomic(out / "dataset.json", dataset)
    write_text_atomic(out / f"{name}.yaml", yaml.safe_dump(label_map, sort_keys=False))
    write_json_atomic(out / MARKER, {**settings, "complete": True, "cases": records})
    return out


def write_multi_dataset(out: Path, cases_per_dataset: int, seed: int, site: Site | str | None = None,
                        spacing: Sequence[float] | None = None, extra_classes: Sequence[str] = (),
                        min_tumour_mm: float = 5.0, datasets: Sequence[str] | None = None,
                        lesion_contrast: Mapping[str, Sequence[float]] | None = None,
                        workers: int = 1) -> list[Path]:
    """Write the partially labelled datasets of :data:`MULTI_DATASETS`, one subfolder each.

    ``site`` None uses each dataset's own site; ``datasets`` picks a subset by name.
    """
    out = Path(out)
    names = list(MULTI_DATASETS) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in MULTI_DATASETS]
    if unknown:
        raise ValueError(f"unknown phantom dataset(s) {unknown}; known: {', '.join(MULTI_DATASETS)}")
    previous = _check_target(out)
    if previous is not None and previous.get("kind") != "multi":
        raise FileExistsError(f"{out}: holds a single phantom dataset, not a multi-dataset folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"generator": GENERATOR, "kind": "multi", "seed": seed, "datasets": names,
                                     "files": []})
    written = []
    for name in names:
        spec = MULTI_DATASETS[name]
        classes = list(spec["classes"]) + [c for c in extra_classes if c not in spec["classes"]]
        written.append(write_dataset(out / name, cases_per_dataset, seed, site or spec["site"], spacing,
                                     classes, name, extra_classes, min_tumour_mm,
                                     require_tumours=spec["require"], stream=spec["stream"],
                                     lesion_contrast=lesion_contrast, workers=workers))
    return written
