"""Class entries and catalogs: every class the model can segment, as data.

A class is a :class:`ClassEntry` (name, kind, prompt, parent organs, left/right partner,
aliases, and optionally the surface tolerance its evaluation uses and a short description in
plain words that naming a class in plain words is matched against). A :class:`ClassCatalog` is
an ordered, validated collection of entries with case-insensitive look-up by name or alias. The built-in catalog lives in ``builtin.yaml``;
plugins add entries through the ``clipseg3d.classes`` entry-point group (see
:mod:`clipseg3d.catalog.plugins`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import resources
from numbers import Real
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import yaml

KINDS = ("organ", "tumour", "other")
SIDES = ("left", "right")
DEFAULT_PROMPT_TEMPLATE = "A computerized tomography of a {text}"


class CatalogError(ValueError):
    """An invalid class entry or catalog, or an unknown class name."""


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@dataclass(frozen=True)
class ClassEntry:
    """One segmentable class: an organ, a tumour, or another structure."""

    name: str
    kind: str = "organ"
    prompt: str = ""
    parents: tuple[str, ...] = ()
    side: str | None = None
    partner: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = "built-in"
    nsd_tolerance_mm: float | None = None  # normalised surface Dice tolerance; None: the evaluation default
    description: str = field(default="", compare=False)  # what the class is, in plain words (for matching)

    @classmethod
    def from_dict(cls, data: Mapping, template: str = DEFAULT_PROMPT_TEMPLATE, source: str = "built-in") -> "ClassEntry":
        """Build an entry from a mapping as written in a catalog YAML or by a plugin."""
        data = dict(data)
        unknown = set(data) - {"name", "kind", "text", "prompt", "parents", "parent", "side", "partner", "aliases",
                               "nsd_tolerance_mm", "description"}
        if unknown:
            raise CatalogError(f"class {data.get('name')!r} ({source}): unknown field(s) {sorted(unknown)}")
        if not data.get("name"):
            raise CatalogError(f"a class entry from {source} has no name: {data}")
        name = str(data["name"])
        kind = {"tumor": "tumour"}.get(data.get("kind", "organ"), data.get("kind", "organ"))
        parents = data.get("parents", data.get("parent", ()))
        if isinstance(parents, str):
            parents = (parents,)
        aliases = data.get("aliases", ())
        if isinstance(aliases, str):
            aliases = (aliases,)
        text = data.get("text") or name.replace("_", " ")
        prompt = data.get("prompt") or template.format(text=text, name=name)
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise CatalogError(f"class {name!r} ({source}): description must be text, got {description!r}")
        tolerance = data.get("nsd_tolerance_mm")
        if isinstance(tolerance, Real) and not isinstance(tolerance, bool):
            tolerance = float(tolerance)
        return cls(name=name, kind=kind, prompt=prompt, parents=tuple(parents), side=data.get("side"),
                   partner=data.get("partner"), aliases=tuple(aliases), source=source, nsd_tolerance_mm=tolerance,
                   description=" ".join(description.split()))

    def check(self) -> None:
        """Raise :class:`CatalogError` if this entry is malformed on its own."""
        where = f"class {self.name!r} ({self.source})"
        if self.kind not in KINDS:
            raise CatalogError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if self.side is not None and self.side not in SIDES:
            raise CatalogError(f"{where}: side {self.side!r} is not one of {SIDES}")
        if self.kind == "tumour" and not self.parents:
            raise CatalogError(f"{where}: a tumour needs at least one parent organ")
        if not self.prompt.strip():
            raise CatalogError(f"{where}: empty prompt")
        tolerance = self.nsd_tolerance_mm
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, Real)
                                      or not math.isfinite(tolerance) or tolerance <= 0):
            raise CatalogError(f"{where}: nsd_tolerance_mm {tolerance!r} is not a positive number of mm")


@dataclass
class ClassCatalog:
    """An ordered collection of class entries with look-up by name or alias."""

    entries: list[ClassEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entries = list(self.entries)
        self.validate()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, source: str | None = None) -> "ClassCatalog":
        """Read a catalog YAML (``prompt_template`` and a ``classes`` list)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise CatalogError(f"{path}: cannot read class catalog ({err})") from err
        return cls.from_mapping(data, source=source or str(path))

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "built-in") -> "ClassCatalog":
        if not isinstance(data, Mapping) or not isinstance(data.get("classes"), list):
            raise CatalogError(f"{source}: a class catalog needs a 'classes' list")
        template = data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
        return cls([ClassEntry.from_dict(item, template, source) for item in data["classes"]])

    @classmethod
    def builtin(cls) -> "ClassCatalog":
        """The 32 built-in classes in their usual order."""
        text = resources.files("clipseg3d.catalog").joinpath("builtin.yaml").read_text()
        return cls.from_mapping(yaml.safe_load(text), source="built-in")

    def extend(self, entries: Iterable[ClassEntry]) -> "ClassCatalog":
        """A new catalog with ``entries`` appended (validated together)."""
        return ClassCatalog(self.entries + list(entries))

    def subset(self, names: Sequence[str]) -> "ClassCatalog":
        """A catalog of the named classes, in the order given (parents need not be included)."""
        return ClassCatalog._unchecked([self[name] for name in names])

    @classmethod
    def _unchecked(cls, entries: list[ClassEntry]) -> "ClassCatalog":
        catalog = cls.__new__(cls)
        catalog.entries = entries
        catalog._index()
        return catalog

    # -- validation and look-up -------------------------------------------------------------
    def validate(self) -> None:
        """Check every entry, unique names and aliases, and that parents and partners exist."""
        for entry in self.entries:
            entry.check()
        self._index()
        for entry in self.entries:
            for parent in entry.parents:
                if _key(parent) not in self._lookup:
                    raise CatalogError(f"class {entry.name!r} ({entry.source}): unknown parent {parent!r}")
            if entry.partner and _key(entry.partner) not in self._lookup:
                raise CatalogError(f"class {entry.name!r} ({entry.source}): unknown partner {entry.partner!r}")

    def _index(self) -> None:
        self._lookup: dict[str, ClassEntry] = {}
        for entry in self.entries:
            key = _key(entry.name)
            if key in self._lookup:
                other = self._lookup[key]
                raise CatalogError(
                    f"class {entry.name!r} ({entry.source}) clashes with {other.name!r} ({other.source})")
            self._lookup[key] = entry
        for entry in self.entries:
            for alias in entry.aliases:
                key = _key(alias)
                other = self._lookup.setdefault(key, entry)
                if other is not entry:
                    raise CatalogError(
                        f"alias {alias!r} of class {entry.name!r} ({entry.source}) clashes with {other.name!r}")

    def get(self, name: str) -> ClassEntry | None:
        return self._lookup.get(_key(name))

    def __getitem__(self, name: str) -> ClassEntry:
        entry = self.get(name)
        if entry is None:
            raise CatalogError(f"unknown class {name!r}; known classes: {', '.join(self.names)}")
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._lookup

    def __iter__(self) -> Iterator[ClassEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def index(self, name: str) -> int:
        """Position of a class (by name or alias) in this catalog."""
        return self.names.index(self[name].name)

    def resolve(self, names: Sequence[str]) -> list[str]:
        """Canonical names for ``names`` (which may be aliases, any case)."""
        return [self[name].name for name in names]

    def tumours_of(self, organ: str) -> list[ClassEntry]:
        """Tumour classes whose parents include ``organ``."""
        organ = self[organ].name
        return [entry for entry in self.entries if organ in entry.parents]

    def with_source(self, source: str) -> "ClassCatalog":
        return ClassCatalog._unchecked([replace(entry, source=source) for entry in self.entries])
