"""Classes named in plain words: a name that is not a class or alias is matched to the nearest class.

Texts compared. A class is described by its plain name ("liver tumor"), its aliases, its prompt and,
when its catalog entry has one, its ``description`` (what the class is, in plain anatomical words).
The query is compared in three ways, and a class's score is the best of them:

* as given: bare, against the bare names and aliases, and inside the prompt template, against the
  prompt and the templated aliases (the mean of the best bare and the best templated cosine
  similarity). In the templated view the embedding of the template's own words ("A computerized
  tomography of a") is subtracted from both sides first, so the words every prompt shares do not
  make every pair look alike;
* in medical words made plain (:data:`MEDICAL_WORDS`: "hepatic" -> liver, "renal" -> kidney,
  "lesion" -> tumor, ...), scored the same way less ``REWORDED_DISCOUNT``, as the reworded name is
  only close to what was asked ("hepatic veins" are not the liver's tissue);
* as given, against the description (cosine similarity).

Acceptance rule. The best class is accepted when its score is at least ``MIN_SCORE`` and beats the
runner-up by at least ``MIN_MARGIN``; otherwise :class:`ClassMatchError` lists the three nearest
classes. Left and right: a query that names one side never matches a class of the other side
(so a class's partner is no runner-up), and a query that names no side cannot pick one class of
a left/right pair. The thresholds are calibrated on the built-in sentence encoder and the
built-in catalog: the 33 plain names of the tests score 0.71 or more with margins of 0.058 or
more ("cystic kidney lesion" over kidney_tumor), unrelated words at most 0.37, and "heart" (no
such class; nearest: aorta) 0.57. Names and prompts alone tie "hepatic lesion" and "renal mass"
(margins 0.01 and 0.02) and score "the big artery" 0.56. Another encoder (a
checkpoint's CLIP) is held to the same thresholds, which were not calibrated on it. The
discount keeps "tumor in the hepatic vessels" and "hepatic veins" from being taken for the
liver's classes (margins 0.04 without it, 0.09 and 0.08 with it).

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
REWORDED_DISCOUNT = 0.05
#: Medical words and the plain words a query is reworded with: organ adjectives and words for a lesion.
MEDICAL_WORDS = {
    "hepatic": "liver", "renal": "kidney", "nephric": "kidney", "pancreatic": "pancreas", "pulmonary": "lung",
    "splenic": "spleen", "gastric": "stomach", "duodenal": "duodenum", "esophageal": "esophagus",
    "oesophageal": "esophagus", "colonic": "colon", "rectal": "rectum", "vesical": "bladder", "cystic": "cyst",
    "prostatic": "prostate", "aortic": "aorta", "femoral": "femur", "suprarenal": "adrenal", "intestinal": "intestine",
    "enteric": "intestine", "lesion": "tumor", "lesions": "tumors", "mass": "tumor", "masses": "tumors",
    "neoplasm": "tumor", "neoplasms": "tumors",
}


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


def reworded(text: str) -> str:
    """``text`` with the medical words of :data:`MEDICAL_WORDS` replaced by plain ones."""
    return re.sub(r"[a-z]+", lambda word: MEDICAL_WORDS.get(word.group(), word.group()), text.lower())


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
        self._classes: dict[str, torch.Tensor] | None = None

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

    def _class_embeddings(self) -> dict[str, torch.Tensor]:
        """Bare, templated and description embeddings with the class row of each, and the template
        stem's embedding."""
        if self._classes is None:
            texts: dict[str, list[str]] = {"bare": [], "templated": [], "description": []}
            rows: dict[str, list[int]] = {view: [] for view in texts}
            for row, entry in enumerate(self.catalog):
                names, prompts = self._texts(entry)
                for view, items in (("bare", names), ("templated", prompts),
                                    ("description", [entry.description] if entry.description else [])):
                    texts[view] += items
                    rows[view] += [row] * len(items)
            stem = self.template.format(text="").strip()
            embeddings = self._embed([*texts["bare"], *texts["templated"], *texts["description"], stem])
            self._classes = {"stem": embeddings[-1]}
            for view, part in zip(texts, embeddings[:-1].split([len(items) for items in texts.values()])):
                self._classes[view] = _without_stem(part, embeddings[-1]) if view == "templated" else part
                self._classes[f"{view}_rows"] = torch.tensor(rows[view], dtype=torch.long)
        return self._classes

    def _best(self, view: str, query: torch.Tensor) -> torch.Tensor:
        """Each class's best cosine similarity to ``query`` over its texts of ``view`` (-1: none)."""
        classes = self._class_embeddings()
        return torch.full((len(self.catalog),), -1.0).scatter_reduce(
            0, classes[f"{view}_rows"], classes[view] @ query, "amax")

    def _name_scores(self, bare: torch.Tensor, templated: torch.Tensor) -> torch.Tensor:
        """The mean of the best bare and the best templated similarity, per class."""
        stem = self._class_embeddings()["stem"]
        return (self._best("bare", bare) + self._best("templated", _without_stem(templated, stem))) / 2

    def rank(self, query: str) -> list[Match]:
        """Every class, most similar first."""
        plain = _plain(query)
        texts = [plain, self.template.format(text=plain)]
        plainer = reworded(plain)
        if plainer != plain.lower():
            texts += [plainer, self.template.format(text=plainer)]
        asked = self._embed(texts)
        scores = torch.maximum(self._name_scores(asked[0], asked[1]), self._best("description", asked[0]))
        if len(texts) > 2:
            scores = torch.maximum(scores, self._name_scores(asked[2], asked[3]) - REWORDED_DISCOUNT)
        matches = [Match(entry.name, entry.kind, score) for entry, score in zip(self.catalog, scores.tolist())]
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
