"""Turning a released Universal Model or SuPreM weight file into a clipseg3d checkpoint.

The result has the structure the training task writes (``state_dict`` with ``model.`` keys and
the ``clipseg3d`` metadata), so :func:`~clipseg3d.models.checkpoint.load_model` and
``clipseg3d segment`` read it. The model runs the released head computation
(:class:`~clipseg3d.models.original_head.OriginalHead`) on the released backbone; the metadata
records the preprocessing the weights expect and where the weights came from (file name and
sha256). The rows of the class embedding table are the classes in the original order, which is
the built-in catalog's; another class count needs the class names. :func:`open_model` reads either
a clipseg3d checkpoint or a released file, which it imports in memory (``clipseg3d segment``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.files import UnsafeFileError, load_torch_data
from clipseg3d.models.backbones import build_backbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY, restore_model
from clipseg3d.models.model import UniversalModel
from clipseg3d.models.released import ARCHITECTURES, EMBEDDING_KEY, check_fits, map_released, state_dict_of
from clipseg3d.models.text_encoder import CLIP_VIT_B32

PREPROCESSING = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "hu_window": [-175.0, 250.0],
                 "roi_size": [96, 96, 96], "sw_overlap": 0.5}
IMPORT_KEY = "import"
LICENCE_NOTE = ("weights imported from a released CLIP-driven Universal Model / SuPreM file: the licence of "
                "that release applies to them, not this package's")


class WeightImportError(ValueError):
    """A weight file (or its companions) that cannot be imported; the message is one line."""


class ClassCountError(WeightImportError):
    """A file whose class count is not the original one, imported without class names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_torch_file(path: Path) -> Any:
    """A torch file's content, read as data only; a damaged or truncated file is one
    :class:`WeightImportError` (a file that would run code stays an ``UnsafeFileError``)."""
    try:
        return load_torch_data(path)
    except UnsafeFileError:
        raise
    except FileNotFoundError as err:
        raise WeightImportError(f"{path}: file not found") from err
    except Exception as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightImportError(f"{path}: not a readable torch file, damaged or truncated ({detail})") from err


def read_embeddings(path: Path) -> torch.Tensor:
    """A [K, D] text embedding table saved on its own (``txt_encoding.pth``), as float32."""
    table = read_torch_file(path)
    if isinstance(table, dict) and list(table) == [EMBEDDING_KEY]:
        table = table[EMBEDDING_KEY]
    if not torch.is_tensor(table) or table.ndim != 2:
        raise WeightImportError(f"{path}: expected a [classes, features] tensor of text embeddings")
    return table.float()


def import_classes(count: int, class_names: Sequence[str] | None) -> list:
    """Catalog entries for the table's rows: the built-in order for 32 rows, else ``class_names``."""
    if class_names is None:
        builtin = ClassCatalog.builtin()
        if count != len(builtin):
            raise ClassCountError(f"the file has {count} classes, not the original {len(builtin)}: "
                                    "name them with --class-names (a YAML or JSON list of catalog names)")
        return list(builtin)
    catalog = load_catalog()
    names = catalog.resolve(list(class_names))
    if len(names) != count or len(set(names)) != count:
        raise WeightImportError(f"--class-names gives {len(set(names))} distinct names for {count} embedding rows")
    return [catalog[name] for name in names]


def _embeddings(weights_table: torch.Tensor | None, text_embeddings: Path | None) -> tuple[torch.Tensor, dict]:
    """The class embedding table (a separate file wins over the weight file's) and where it came from."""
    if text_embeddings is not None:
        return read_embeddings(text_embeddings), {"file": text_embeddings.name,
                                                  "sha256": sha256_of(text_embeddings)}
    if weights_table is None:
        raise WeightImportError(f"the file has no {EMBEDDING_KEY} table: pass --text-embeddings txt_encoding.pth")
    return weights_table.float(), {"file": "the weight file's organ_embedding"}


def build_model(content: Any, arch: str = "auto", text_embeddings: Path | None = None,
                class_names: Sequence[str] | None = None) -> tuple[UniversalModel, dict[str, Any]]:
    """The model holding a released file's weights, and what to record of the import (architecture,
    layout, embedding origin, licence note). The embeddings' feature count must fit ``text_to_vision``."""
    weights = map_released(state_dict_of(content), arch)
    embeddings, origin = _embeddings(weights.embeddings, text_embeddings)
    classes = import_classes(embeddings.shape[0], class_names)
    backbone = build_backbone(ARCHITECTURES[weights.arch], pooled_global=False)
    model = UniversalModel(backbone, classes, embeddings, CLIP_VIT_B32, head_kind="original")
    expected = {name: value for name, value in model.state_dict().items() if name != "class_embeddings"}
    check_fits(weights, expected)
    model.load_state_dict({**weights.state, "class_embeddings": embeddings}, strict=True)
    record = {"arch": weights.arch, "layout": weights.layout, "text_embeddings": origin, "licence": LICENCE_NOTE}
    return model.eval(), record


def _imported(content: Any, path: Path, arch: str, text_embeddings: Path | None,
              class_names: Sequence[str] | None) -> tuple[UniversalModel, dict[str, Any]]:
    """The model of a released file's content and the metadata its checkpoint records."""
    model, record = build_model(content, arch, text_embeddings, class_names)
    meta = model.metadata()
    meta["preprocessing"] = dict(PREPROCESSING)
    meta[IMPORT_KEY] = {"source_file": path.name, "sha256": sha256_of(path), **record}
    return model, meta


def import_weights(path: Path, arch: str = "auto", text_embeddings: Path | None = None,
                   class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The clipseg3d checkpoint dict of a released weight file (read as data only)."""
    model, meta = _imported(read_torch_file(path), path, arch, text_embeddings, class_names)
    state = {f"model.{name}": value for name, value in model.state_dict().items()}
    return {"state_dict": state, CHECKPOINT_KEY: meta}


def open_model(path: Path, text_embeddings: Path | None = None,
               map_location: str | torch.device = "cpu") -> tuple[UniversalModel, dict[str, Any], bool]:
    """The model and metadata of a clipseg3d checkpoint, or of a released weight file imported in
    memory exactly as :func:`import_weights` imports it (architecture found from the keys); the flag
    says which. The file is read once, as data only. ``text_embeddings`` applies to released files only.
    """
    content = read_torch_file(path)
    if isinstance(content, dict) and CHECKPOINT_KEY in content:
        if text_embeddings is not None:
            raise WeightImportError(f"{path} is a clipseg3d checkpoint, which holds its own class embeddings: "
                                    "--text-embeddings applies to released weight files only")
        return restore_model(content, path).to(map_location).eval(), content[CHECKPOINT_KEY], False
    try:
        model, meta = _imported(content, path, "auto", text_embeddings, None)
    except ClassCountError as err:
        raise WeightImportError(f"{path}: {str(err).split(':')[0]}; import it once with clipseg3d import-weights "
                                "--class-names NAMES.yaml and segment with that checkpoint") from err
    return model.to(map_location).eval(), meta, True
