"""Classes named in plain words: matched by text similarity with the built-in sentence encoder."""

from dataclasses import replace

import pytest

from clipseg3d.catalog import CatalogError, ClassCatalog, ClassEntry
from clipseg3d.cli import classes
from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.main import main
from clipseg3d.models import class_matching, text_encoder
from clipseg3d.models.class_matching import (
    MIN_MARGIN,
    MIN_SCORE,
    REWORDED_DISCOUNT,
    ClassMatcher,
    ClassMatchError,
    resolve_class_names,
    reworded,
)
from clipseg3d.models.text_encoder import embed_prompts

from conftest import REPO

CATALOG = ClassCatalog.builtin()

PLAIN_NAMES = [
    ("kidney cancer", "kidney_tumor"),
    ("renal cell carcinoma", "kidney_tumor"),
    ("cancer of the pancreas", "pancreas_tumor"),
    ("pancreatic adenocarcinoma", "pancreas_tumor"),
    ("liver cancer", "liver_tumor"),
    ("liver metastasis", "liver_tumor"),
    ("tumor in the hepatic vessels", "hepatic_vessel_tumor"),
    ("pulmonary nodule", "lung_tumor"),
    ("bowel cancer", "colon_tumor"),
    ("colorectal carcinoma", "colon_tumor"),
    ("cystic kidney lesion", "kidney_cyst"),
    ("urinary bladder wall", "bladder"),
    ("gall bladder wall", "gallbladder"),
    ("small intestine", "intestine"),
    ("sigmoid colon", "colon"),
    ("vena cava", "postcava"),
    ("portal vein", "portal_and_splenic_vein"),
    ("abdominal aorta", "aorta"),
    ("celiac artery", "celiac_trunk"),
    ("hepatic veins", "hepatic_vessel"),
    ("prostate gland", "prostate"),
    ("splenic tissue", "spleen"),
    ("gastric wall", "stomach"),
    ("duodenal bulb", "duodenum"),
    ("anus and rectum", "rectum"),
    ("esophageal tube", "esophagus"),
    ("left suprarenal gland", "left_adrenal_gland"),
    ("right femoral head", "right_head_of_femur"),
    ("kidney on the left", "left_kidney"),
    ("the right lung", "right_lung"),
    ("hepatic lesion", "liver_tumor"),
    ("renal mass", "kidney_tumor"),
    ("the big artery", "aorta"),
]
NONSENSE = ["banana", "quarterly tax report", "the weather tomorrow", "football match", "computer keyboard",
            "purple elephant"]


@pytest.fixture(scope="module")
def matcher():
    return ClassMatcher(CATALOG)


def test_the_plain_names_are_neither_classes_nor_aliases():
    assert len(PLAIN_NAMES) >= 20
    for name, _ in PLAIN_NAMES:
        assert name not in CATALOG
    assert all(name not in CATALOG for name in NONSENSE)


@pytest.mark.parametrize("name, expected", PLAIN_NAMES)
def test_a_plain_name_resolves_to_its_class_with_a_one_line_note(name, expected):
    resolved, notes = resolve_class_names(["spleen", name], CATALOG)
    assert resolved == ["spleen", expected]
    assert len(notes) == 1 and notes[0].startswith(f"{name!r} -> {expected} (similarity 0.")
    assert "\n" not in notes[0]


@pytest.mark.parametrize("name", NONSENSE)
def test_nonsense_is_rejected_with_the_three_nearest_classes(name, matcher):
    with pytest.raises(ClassMatchError) as err:
        resolve_class_names([name], CATALOG)
    assert isinstance(err.value, CatalogError)
    assert f"< {MIN_SCORE:.2f}" in err.value.reason
    nearest = str(err.value).split("nearest: ")[1].split(", ")
    assert [item.split()[0] for item in nearest] == [match.name for match in matcher.rank(name)[:3]]


def test_accepted_and_rejected_scores_keep_clear_of_the_threshold(matcher):
    matches = [matcher.match(name) for name, _ in PLAIN_NAMES]
    accepted = [best.score for best, _ in matches]
    rejected = [matcher.rank(name)[0].score for name in NONSENSE]
    assert min(accepted) >= MIN_SCORE + 0.04
    assert min(best.score - ranking[1].score for best, ranking in matches) >= MIN_MARGIN + 0.005
    assert max(rejected) <= MIN_SCORE - 0.2


@pytest.mark.parametrize("name, reason", [
    ("kidney", "left/right pair"),  # names no side
    ("tumor", "ambiguous"),  # several tumour classes nearly tie
    ("heart", f"< {MIN_SCORE:.2f}"),  # near the aorta, but no class
])
def test_a_weak_or_ambiguous_match_is_an_error(name, reason, matcher):
    with pytest.raises(ClassMatchError) as err:
        matcher.match(name)
    assert reason in err.value.reason
    if reason == "ambiguous":
        best, second = err.value.ranking[:2]
        assert best.score - second.score < MIN_MARGIN


def test_a_named_side_excludes_the_other_side(matcher):
    ranking = matcher.rank("right femoral head")
    assert {ranking[0].name, ranking[1].name} == {"right_head_of_femur", "left_head_of_femur"}
    best, _ = matcher.match("right femoral head")
    assert best.name == "right_head_of_femur"


def test_exact_names_and_aliases_need_no_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was used")

    monkeypatch.setattr(class_matching, "embed_prompts", refuse)
    monkeypatch.setattr(text_encoder.TextEncoder, "encode", refuse)
    assert resolve_class_names(["Renal Cyst", "IVC", "liver_tumour", "spleen"], CATALOG, "no/such-encoder") == (
        ["kidney_cyst", "postcava", "liver_tumor", "spleen"], [])


def test_an_unavailable_encoder_falls_back_to_the_built_in_one_and_says_so(tmp_path):
    resolved, notes = resolve_class_names(["kidney cancer"], CATALOG, str(tmp_path / "missing-encoder"))
    assert resolved == ["kidney_tumor"]
    assert "unavailable" in notes[-1] and "built-in sentence encoder" in notes[-1]


def test_embeddings_are_cached_so_a_second_matcher_needs_no_encoder(matcher, monkeypatch):
    matcher.match("kidney cancer")

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was used")

    monkeypatch.setattr(text_encoder.TextEncoder, "encode", refuse)
    best, _ = ClassMatcher(CATALOG).match("kidney cancer")
    assert best.name == "kidney_tumor"


def test_classes_find_prints_the_ranking_and_the_match(capsys):
    assert classes.main(["find", "kidney cancer", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["class", "score", "kind"]
    assert [line.split()[0] for line in lines[1:4]] == ["kidney_tumor", "left_kidney", "kidney_cyst"]
    assert lines[1].split()[2] == "tumour" and float(lines[1].split()[1]) >= MIN_SCORE
    assert lines[4].startswith("'kidney cancer' -> kidney_tumor (similarity 0.")
    assert len(lines) == 5


def test_classes_find_without_a_match_still_ranks_and_exits_1(capsys):
    assert classes.main(["find", "banana"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 5 + 1
    assert lines[-1].startswith("no class matched 'banana': best similarity")


# -- what a class is matched against ------------------------------------------------------------------
def test_the_medical_words_are_reworded_as_whole_words():
    assert reworded("Hepatic lesion, renal masses") == "liver tumor, kidney tumors"
    assert reworded("massive hepatocyte") == "massive hepatocyte"


def test_a_reworded_query_scores_its_exact_class_less_the_discount(matcher):
    best, _ = matcher.match("hepatic lesion")  # reworded: "liver tumor", the class's own name
    assert best.name == "liver_tumor"
    assert best.score == pytest.approx(1.0 - REWORDED_DISCOUNT, abs=1e-5)


def test_a_description_is_matched_when_the_names_say_less():
    query = "the big artery"
    aorta = CATALOG["aorta"]
    assert aorta.description
    asked, described = embed_prompts([query, aorta.description])
    best, _ = ClassMatcher(CATALOG).match(query)
    assert best.name == "aorta" and best.score == pytest.approx(float(asked @ described), abs=1e-5)
    without = ClassCatalog([replace(entry, description="") for entry in CATALOG])
    with pytest.raises(ClassMatchError, match=f"< {MIN_SCORE:.2f}"):
        ClassMatcher(without).match(query)


def test_the_catalog_reads_descriptions_and_keeps_old_entries_valid():
    assert all(entry.description for entry in CATALOG)
    entry = ClassEntry.from_dict({"name": "tendon", "description": "  a cord that joins\n muscle to bone "},
                                 source="plugin p 1.0")
    assert entry.description == "a cord that joins muscle to bone"
    assert ClassEntry.from_dict({"name": "tendon"}).description == ""
    old = {key: value for key, value in vars(CATALOG["liver"]).items() if key != "description"}
    assert ClassEntry(**old) == CATALOG["liver"]  # an entry from an older checkpoint is the same class
    with pytest.raises(CatalogError, match=r"class 'tendon' \(plugin p 1.0\): description must be text"):
        ClassEntry.from_dict({"name": "tendon", "description": ["a", "cord"]}, source="plugin p 1.0")


# -- configs --------------------------------------------------------------------------------------------
TINY = str(REPO / "experiments" / "tiny.yaml")


def test_config_classes_in_plain_words_resolve_for_model_and_data(capsys):
    cli = lightning_main(["--config", TINY, "--model.classes=[spleen,hepatic lesion]"], run=False)
    assert cli.model.class_names == ["spleen", "liver_tumor"]
    assert cli.datamodule.class_names == ["spleen", "liver_tumor"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: model.classes: 'hepatic lesion' -> liver_tumor (similarity 0.95)"]


def test_a_config_class_that_matches_nothing_is_one_error_line(capsys):
    assert main(["fit", "--config", TINY, "--model.classes=[spleen,banana]"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("clipseg3d fit: error: no class matches 'banana': best similarity")
    assert "nearest: " in lines[-1]
