"""Classes named in plain words: a name that is not a class or alias is matched to the nearest class.

Texts compared. A class is described by its plain name ("liver tumor"), its aliases and its prompt.
The query is compared twice: bare, against the bare names and aliases, and inside the prompt
template, against the prompt and the templated aliases. In the templated view the embedding of
the template's own words ("A computerized tomography of a") is subtracted from both sides first,
so the words every prompt shares do not make every pair look alike. A class's score is the mean of
its best bare and its best templated cosine similarity.

Acceptance rule. The best class is accepted when its score is at least ``MIN_SCORE`` and beats the
runner-up by at least ``MIN_MARGIN``; otherwise :class:`ClassMatchError` lists the three nearest
classes. Left and right: a query that names one side never matches a class of the other side
(so a class's partner is no runner-up), and a query that names no side cannot pick one class of
a left/right pair. The thresholds are calibrated on the built-in sentence encoder and the
built-in catalog: the 30 plain names of the tests score 0.67 or more with margins of 0.08 or
more, unrelated words at most 0.37, and "heart" (no such class; nearest: aorta) 0.57. Another
encoder (a checkpoint's CLIP) is held to the same thresholds, which were not calibrated on it.

Embeddings go through :func:`~clipseg3d.models.text_encoder.embed_prompts` and its on-disk cache;
exact class names and aliases never reach an encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F

from clipseg3d.catalog import DEFAULT_PROMPT_TEMPLATE, SIDES, CatalogError, ClassCatalog, ClassEntry
from clipseg3d.models.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    EmbeddingCache,
    TextEncoder,
    TextEncoderError,
    embed_prompts,
)

MIN_SCORE = 0.62
MIN_MARGIN = 0.05


@dataclass(frozen=True)
class Match:
    """One class and how similar it is to a query."""

    name: str
    kind: str
    score: float

    def __str__(self) -> str:
        return f"{self.name} {self.score:.2f}"


class ClassMatchError(CatalogError):
    """A name that matches no class well enough, or two classes nearly equally."""

    def __init__(self, query: str, reason: str, ranking: Sequence[Match]):
        self.query, self.reason, self.ranking = query, reason, list(ranking)
        nearest = ", ".join(str(match) for match in self.ranking[:3])
        super().__init__(f"no class matches {query!r}: {reason}; nearest: {nearest}")


def _plain(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


def _without_stem(embeddings: torch.Tensor, stem: torch.Tensor) -> torch.Tensor:
    """Templated embeddings less the template's own words, renormalised."""
    return F.normalize(embeddings - stem, dim=-1)


def _sides(query: str) -> set[str]:
    return set(re.findall(r"[a-z]+", query.lower())) & set(SIDES)


class ClassMatcher:
    """Ranks a catalog's classes by their similarity to a name given in plain words.

    ``text_encoder`` is a model id or a :class:`TextEncoder` (default: the built-in sentence
    encoder); one whose weights cannot be loaded is replaced by the built-in one, which
    :attr:`fallback` then says.
    """

    def __init__(self, catalog: ClassCatalog, text_encoder: str | TextEncoder | None = None,
                 cache: EmbeddingCache | None = None, template: str = DEFAULT_PROMPT_TEMPLATE):
        self.catalog = catalog
        self.encoder = text_encoder if isinstance(text_encoder, TextEncoder) else None
        self.model_id = self.encoder.model_id if self.encoder else (text_encoder or DEFAULT_TEXT_ENCODER)
        self.cache = cache or EmbeddingCache()
        self.template = template
        self.fallback: str | None = None
        self._classes: tuple[torch.Tensor, ...] | None = None

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self.encoder is None and self.model_id != DEFAULT_TEXT_ENCODER:
            try:  # decided before any embedding, so query and classes share one encoder
                self.encoder = TextEncoder(self.model_id)
                self.encoder.kind  # loads the weights
            except TextEncoderError as err:
                self.fallback = (f"text encoder {self.model_id!r} unavailable ({err.__class__.__name__}); "
                                 "matched with the built-in sentence encoder")
                self.model_id, self.encoder = DEFAULT_TEXT_ENCODER, None
        return embed_prompts(texts, self.model_id, self.cache, self.encoder)

    def _texts(self, entry: ClassEntry) -> tuple[list[str], list[str]]:
        bare = list(dict.fromkeys(_plain(text) for text in (entry.name, *entry.aliases)))
        templated = list(dict.fromkeys([entry.prompt, *(self.template.format(text=text) for text in bare)]))
        return bare, templated

    def _class_embeddings(self) -> tuple[torch.Tensor, ...]:
        """Bare and templated text embeddings, the class row of each, and the template stem's embedding."""
        if self._classes is None:
            bare, templated, bare_rows, templated_rows = [], [], [], []
            for row, entry in enumerate(self.catalog):
                names, prompts = self._texts(entry)
                bare += names
                templated += prompts
                bare_rows += [row] * len(names)
                templated_rows += [row] * len(prompts)
            stem = self.template.format(text="").strip()
            embeddings = self._embed(bare + templated + [stem])
            stem_embedding = embeddings[-1]
            self._classes = (embeddings[:len(bare)], torch.tensor(bare_rows),
                             _without_stem(embeddings[len(bare):-1], stem_embedding), torch.tensor(templated_rows),
                             stem_embedding)
        return self._classes

    def rank(self, query: str) -> list[Match]:
        """Every class, most similar first."""
        bare, bare_rows, templated, templated_rows, stem = self._class_embeddings()
        plain = _plain(query)
        asked = self._embed([plain, self.template.format(text=plain)])
        best = torch.full((len(self.catalog),), -1.0)
        by_bare = best.scatter_reduce(0, bare_rows, bare @ asked[0], "amax")
        by_template = best.scatter_reduce(0, templated_rows, templated @ _without_stem(asked[1], stem), "amax")
        scores = ((by_bare + by_template) / 2).tolist()
        matches = [Match(entry.name, entry.kind, score) for entry, score in zip(self.catalog, scores)]
        return sorted(matches, key=lambda match: -match.score)

    def match(self, query: str) -> tuple[Match, list[Match]]:
        """The accepted class for ``query`` and the ranking of the classes it may name (none of the side
        it does not name); :class:`ClassMatchError` when no class is accepted."""
        ranking = self.rank(query)
        sides = _sides(query)
        eligible = [match for match in ranking if not sides or self.catalog[match.name].side in (None, *sides)]
        best = eligible[0]
        runner_up = eligible[1].score if len(eligible) > 1 else -1.0
        if best.score < MIN_SCORE:
            raise ClassMatchError(query, f"best similarity {best.score:.2f} < {MIN_SCORE:.2f}", eligible)
        partner = self.catalog[best.name].partner
        if partner and partner in self.catalog and len(sides) != 1:
            raise ClassMatchError(query, f"{best.name} is one of a left/right pair and the name gives no side",
                                  eligible)
        if best.score - runner_up < MIN_MARGIN:
            raise ClassMatchError(query, f"ambiguous (margin {best.score - runner_up:.2f} < {MIN_MARGIN:.2f})",
                                  eligible)
        return best, eligible


def resolve_class_names(names: Sequence[str], catalog: ClassCatalog,
                        text_encoder: str | TextEncoder | None = None,
                        cache: EmbeddingCache | None = None) -> tuple[list[str], list[str]]:
    """Canonical class names for ``names`` and one note per name matched by similarity.

    Class names and aliases (any case) pass through without an encoder; any other name is matched
    by :class:`ClassMatcher` (``text_encoder``: the checkpoint's encoder id, or None for the
    built-in one) and raises :class:`ClassMatchError` when no class is accepted.
    """
    resolved, notes = [], []
    matcher: ClassMatcher | None = None
    for name in names:
        entry = catalog.get(name)
        if entry is not None:
            resolved.append(entry.name)
            continue
        matcher = matcher or ClassMatcher(catalog, text_encoder, cache)
        best, _ = matcher.match(name)
        resolved.append(best.name)
        notes.append(f"{name!r} -> {best.name} (similarity {best.score:.2f})")
    if matcher is not None and matcher.fallback:
        notes.append(matcher.fallback)
    return resolved, notes
