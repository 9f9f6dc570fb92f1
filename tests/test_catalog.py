import pytest

from clipseg3d.catalog import CatalogError, ClassCatalog, ClassEntry


def test_builtin_catalog_has_the_32_classes_in_order():
    catalog = ClassCatalog.builtin()
    assert len(catalog) == 32
    assert catalog.names[:3] == ["spleen", "right_kidney", "left_kidney"]
    assert catalog.names[25:] == ["kidney_tumor", "liver_tumor", "pancreas_tumor", "hepatic_vessel_tumor",
                                  "lung_tumor", "colon_tumor", "kidney_cyst"]
    assert sum(entry.kind == "tumour" for entry in catalog) == 7
    assert catalog["liver_tumor"].prompt == "A computerized tomography of a liver tumor"


def test_lookup_is_case_insensitive_and_knows_aliases():
    catalog = ClassCatalog.builtin()
    assert catalog["Inferior Vena Cava"].name == "postcava"
    assert catalog["KIDNEY TUMOUR"].name == "kidney_tumor"
    assert catalog.index("Right Kidney") == 1
    assert "ivc" in catalog and "brain" not in catalog
    with pytest.raises(CatalogError, match="unknown class 'brain'"):
        catalog["brain"]


def test_relations_are_data():
    catalog = ClassCatalog.builtin()
    assert {e.name for e in catalog.tumours_of("liver")} == {"liver_tumor", "hepatic_vessel_tumor"}
    assert {e.name for e in catalog.tumours_of("left_kidney")} == {"kidney_tumor", "kidney_cyst"}
    lung = catalog["right_lung"]
    assert (lung.side, lung.partner) == ("right", "left_lung")
    assert catalog[lung.partner].side == "left"


@pytest.mark.parametrize("entries, message", [
    ([{"name": "liver"}, {"name": "Liver"}], "clashes"),
    ([{"name": "blob_tumor", "kind": "tumour", "parents": ["blob"]}], "unknown parent 'blob'"),
    ([{"name": "blob_tumor", "kind": "tumour"}], "needs at least one parent"),
    ([{"name": "x", "kind": "bone"}], "kind 'bone'"),
    ([{"name": "a", "partner": "b"}], "unknown partner 'b'"),
])
def test_invalid_catalogs_are_rejected(entries, message):
    with pytest.raises(CatalogError, match=message):
        ClassCatalog.from_mapping({"classes": entries}, source="test.yaml")


def test_extend_checks_new_entries_against_existing_ones():
    catalog = ClassCatalog.builtin()
    lesion = ClassEntry.from_dict({"name": "spleen_lesion", "kind": "tumour", "parents": ["spleen"]})
    assert catalog.extend([lesion]).names[-1] == "spleen_lesion"
    with pytest.raises(CatalogError, match="clashes"):
        catalog.extend([ClassEntry.from_dict({"name": "Spleen"}, source="plugin x")])
