"""The terminology store over the hand-made RF2 releases (``tests/fixtures/snomed``)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from terminology.expand import ExpansionFailed, Terminology
from terminology.rf2 import ReleaseError
from terminology.store import NoRelease, TerminologyStore

from ...terminology_fixtures import RELEASE_2025, RELEASE_2026, VALUESETS, VS_NOT_TYPE_1


@pytest.fixture
def store(tmp_path: Path) -> TerminologyStore:
    return TerminologyStore(f"sqlite:///{tmp_path / 'terminology.db'}")


def test_a_release_loads_with_its_version_counts_and_hierarchy(store: TerminologyStore) -> None:
    assert store.current() is None
    with pytest.raises(NoRelease):
        store.hierarchy()
    info = store.load_release(RELEASE_2025)
    assert info.version.endswith("/version/20250401")
    assert info.version.startswith("http://snomed.info/sct/")
    # 21 concepts, one inactive; the stated relationship file and inactive rows are not read
    assert (info.concepts, info.active_concepts, info.is_a) == (21, 20, 21)
    _, hierarchy = store.hierarchy()
    assert len(hierarchy) == 20
    assert hierarchy.index_of(190330002) is None  # inactive
    t2 = hierarchy.index_of(44054006)
    assert t2 is not None
    # the stated-only parent (hypertension) is not a parent
    assert sorted(hierarchy.ids[hierarchy.parents_of(t2)].tolist()) == [73211009]


def test_terms_semantic_tags_synonyms_and_descendant_counts(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    detail = store.concept(127013003)
    assert detail is not None
    assert detail.concept.term == "Diabetic renal disease"  # preferred in GB English
    assert detail.concept.fsn == "Disorder of kidney due to diabetes mellitus (disorder)"
    assert detail.concept.semantic_tag == "disorder"
    assert [p.code for p in detail.parents] == ["73211009", "90708001"]
    assert [c.code for c in detail.children] == ["420279001"]
    [dm] = store.summaries([73211009])
    # 46635009 44054006 313436004 999001021000000105 127013003 420279001 11687002
    assert dm.descendants == 7
    t1 = store.concept(46635009)
    assert t1 is not None
    assert t1.synonyms == ["Type 1 diabetes mellitus", "Insulin dependent diabetes mellitus"]
    # no language refset row: the FSN without its tag
    [pregnancy] = store.summaries([173300003])
    assert pregnancy.term == "Disorder of pregnancy"
    # an inactive description is not kept
    assert "Sugar diabetes" not in (store.concept(73211009) or detail).synonyms


def test_search_by_words_prefixes_and_id(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    found = store.search("diab mell type 2")
    codes = [s.code for s in found]
    assert codes[0] == "44054006"  # its preferred term matched
    assert set(codes) >= {"44054006", "313436004", "420279001", "999001021000000105"}
    assert "46635009" not in codes
    assert [s.code for s in store.search("non-insulin")] == ["44054006"]
    assert [s.code for s in store.search("127013003")] == ["127013003"]
    assert store.search("renal", limit=2)[0].matched is not None
    assert len(store.search("renal", limit=2)) == 2
    assert store.search("  ") == []
    assert store.search("coma") == []  # only an inactive concept has it


def test_ancestors(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    codes = {s.code for s in store.ancestors(420279001)}
    assert codes == {
        "44054006",
        "127013003",
        "73211009",
        "90708001",
        "64572001",
        "404684003",
        "138875005",
    }


def test_a_new_release_replaces_the_old_and_bumps_the_generation(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    terminology = Terminology(store)
    before = terminology.expand_ecl("<< 73211009")
    generation = store.generation()
    store.load_release(RELEASE_2026)
    assert store.generation() == generation + 1
    after = terminology.expand_ecl("<< 73211009")
    assert set(before.codes["http://snomed.info/sct"]) - set(
        after.codes["http://snomed.info/sct"]
    ) == {"11687002"}
    assert after.release is not None and after.release.endswith("/version/20260101")
    history = store.history()
    assert [h["current"] for h in history] == [False, True]


def test_a_zipped_release_as_trud_ships_it(store: TerminologyStore, tmp_path: Path) -> None:
    archive = tmp_path / "uk_sct2cl_40.0.0_20250401000001Z.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in RELEASE_2025.rglob("*.txt"):
            z.write(path, str(Path(RELEASE_2025.name) / path.relative_to(RELEASE_2025)))
    info = store.load_release(archive)
    assert info.active_concepts == 20


def test_what_is_not_a_release_is_refused_clearly(store: TerminologyStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReleaseError, match="neither RF2 Snapshot files nor FHIR ValueSet"):
        store.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(RELEASE_2025, broken)
    concept = next(broken.rglob("sct2_Concept_*"))
    concept.write_text("id\tactive\n1\t1\n")
    with pytest.raises(ReleaseError, match="RF2 needs"):
        store.load(broken)
    no_relationships = tmp_path / "partial"
    shutil.copytree(RELEASE_2025, no_relationships)
    for path in no_relationships.rglob("sct2_Relationship_*"):
        path.unlink()
    with pytest.raises(ReleaseError, match="no relationship Snapshot file"):
        store.load(no_relationships)
    assert store.current() is None  # nothing half-loaded


def test_valuesets_load_and_expand(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    loaded = store.load(VALUESETS)["valuesets"]
    assert {v["url"] for v in loaded} >= {VS_NOT_TYPE_1}
    terminology = Terminology(store)
    expansion = terminology.expand_valueset(VS_NOT_TYPE_1, "1.0.0")
    assert expansion.valueset == f"{VS_NOT_TYPE_1}|1.0.0"
    assert "46635009" not in expansion.codes["http://snomed.info/sct"]
    with pytest.raises(ExpansionFailed, match=r"is not loaded \(versions loaded: 1.0.0\)"):
        terminology.expand_valueset(VS_NOT_TYPE_1, "9")
    with pytest.raises(ExpansionFailed, match="is not loaded"):
        terminology.expand_valueset("https://example.org/nothing")


def test_expansions_over_the_limit_are_refused(store: TerminologyStore) -> None:
    store.load_release(RELEASE_2025)
    with pytest.raises(ExpansionFailed, match="expands to 9 codes, more than the 5 allowed"):
        Terminology(store, max_expansion=5).expand_ecl("<< 73211009 OR 64572001")


def test_expanding_without_a_release_says_so(store: TerminologyStore) -> None:
    with pytest.raises(ExpansionFailed, match="no SNOMED CT release is loaded"):
        Terminology(store).expand_ecl("<< 73211009")
