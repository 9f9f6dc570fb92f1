"""``clipseg3d classes``: list the class catalog with each class's source, check the plugins, and
find the class a plain-words name means.

``list`` prints every class (built-in and from plugins that load and fit), one line each, with
its kind, relations and source; problems go to stderr. ``check`` validates what is installed
(plugin imports, class names, parents and partners, plugin label maps) and exits 1 with one line
per problem. ``find`` ranks the classes by text similarity to a name (see
:mod:`clipseg3d.models.class_matching`) and exits 1 when none is accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import yaml
from jsonargparse.typing import PositiveInt

from clipseg3d.catalog import KINDS, CatalogError, ClassCatalog, ClassEntry
from clipseg3d.catalog.plugins import Plugin, check
from clipseg3d.cli.parsing import CommandParser, command_parser
from clipseg3d.data.labelmap import LabelMap, LabelMapError, available_label_maps
from clipseg3d.models.class_matching import ClassMatcher, ClassMatchError
from clipseg3d.models.text_encoder import DEFAULT_TEXT_ENCODER


def _relations(entry: ClassEntry) -> str:
    parts = []
    if entry.parents:
        parts.append(f"in {', '.join(entry.parents)}")
    if entry.partner:
        parts.append(f"{entry.side} of pair with {entry.partner}")
    elif entry.side:
        parts.append(entry.side)
    return "; ".join(parts)


def format_table(entries: Sequence[ClassEntry], prompts: bool = False) -> str:
    """A plain-text table: name, kind, relations, source (and prompt)."""
    header = ["name", "kind", "relations", "source"] + (["prompt"] if prompts else [])
    rows = [[entry.name, entry.kind, _relations(entry) or "-", entry.source] + ([entry.prompt] if prompts else [])
            for entry in entries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


def label_map_errors(catalog: ClassCatalog, plugins: list[Plugin]) -> list[str]:
    """One line per plugin label-map file that cannot be read, names no built-in map, or does not
    apply (unknown class, a raw value given twice, or one another plugin already maps)."""
    errors: list[str] = []
    extended: dict[str, LabelMap] = {}
    for plugin in plugins:
        for path in plugin.label_maps:
            try:
                data = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as err:
                errors.append(f"{plugin.source}: label map {path}: cannot be read ({err})")
                continue
            base = data.get("extends") if isinstance(data, dict) else None
            if base not in available_label_maps():
                errors.append(f"{plugin.source}: label map {path}: 'extends' must name a built-in dataset label map, "
                              f"got {base!r}")
                continue
            try:
                current = extended.get(base) or LabelMap.load(base, catalog=catalog)
                extended[base] = current.extend(Path(path), catalog=catalog)
            except (LabelMapError, CatalogError) as err:
                errors.append(f"{plugin.source}: {err}")
    return errors


def report() -> tuple[ClassCatalog, list[Plugin], list[str]]:
    """The full catalog, the plugins that fit, and one line per problem (classes and label maps)."""
    catalog, plugins, errors = check()
    return catalog, plugins, errors + label_map_errors(catalog, plugins)


def build_parser() -> CommandParser:
    parser = command_parser("classes", "List the class catalog with each class's source, and check the plugins.",
                            config_file=False)
    commands = parser.add_subcommands(dest="command", required=True)
    listing = command_parser("classes list", "Every class with its kind, relations and source.",
                             config_file=False)
    listing.add_argument("--kind", choices=KINDS, help="only classes of this kind")
    listing.add_argument("--source", help="only classes whose source contains this text (e.g. built-in, a plugin)")
    listing.add_argument("--prompts", action="store_true", help="show each class's text prompt")
    commands.add_subcommand("list", listing, help="every class with its kind, relations and source")
    checking = command_parser("classes check", "Validate the installed class plugins (exit 1 on any problem).",
                              config_file=False)
    commands.add_subcommand("check", checking, help="validate the installed class plugins (exit 1 on any problem)")
    finding = command_parser("classes find", "Rank the classes by text similarity to a name in plain words "
                             "(exit 1 when no class is accepted).", config_file=False)
    finding.add_argument("query", help="the name, e.g. 'kidney cancer'")
    finding.add_argument("--top", type=PositiveInt, default=5, help="how many classes to show")
    finding.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER,
                         help="text encoder id or local folder (default: the built-in sentence encoder)")
    commands.add_subcommand("find", finding, help="rank the classes by similarity to a name in plain words")
    return parser


def find(catalog: ClassCatalog, query: str, top: int = 5, text_encoder: str = DEFAULT_TEXT_ENCODER) -> int:
    """Print the ``top`` nearest classes to ``query`` and the verdict; 0 when a class is accepted."""
    matcher = ClassMatcher(catalog, text_encoder)
    try:
        best, ranking = matcher.match(query)
        verdict, status = f"{query!r} -> {best.name} (similarity {best.score:.2f})", 0
    except ClassMatchError as err:
        ranking, verdict, status = err.ranking, f"no class matched {query!r}: {err.reason}", 1
    width = max(len(match.name) for match in ranking[:top])
    print(f"{'class'.ljust(width)}  score  kind")
    for match in ranking[:top]:
        print(f"{match.name.ljust(width)}  {match.score:5.2f}  {match.kind}")
    if matcher.fallback:
        print(f"note: {matcher.fallback}", file=sys.stderr)
    print(verdict)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipseg3d classes``; 0 when fine, 1 when ``check`` finds problems."""
    args = build_parser().parse_args(argv)
    catalog, plugins, errors = report()
    if args.command == "find":
        return find(catalog, args.find.query, args.find.top, args.find.text_encoder)
    if args.command == "list":
        options = args.list
        entries = [entry for entry in catalog
                   if (options.kind is None or entry.kind == options.kind)
                   and (options.source is None or options.source.lower() in entry.source.lower())]
        sys.stdout.write(format_table(entries, options.prompts))
        for line in errors:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    for plugin in plugins:
        maps = len(plugin.label_maps)
        print(f"{plugin.source}: {len(plugin.classes)} class{'es' * (len(plugin.classes) != 1)}, "
              f"{maps} label map{'s' * (maps != 1)}")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    builtin = sum(entry.source == "built-in" for entry in catalog)
    summary = (f"{len(catalog)} classes: {builtin} built-in, {len(catalog) - builtin} from {len(plugins)} "
               f"plugin{'s' * (len(plugins) != 1)}")
    if errors:
        print(f"{summary}; {len(errors)} problem{'s' * (len(errors) != 1)}", file=sys.stderr)
        return 1
    print(f"{summary}; no problems")
    return 0

