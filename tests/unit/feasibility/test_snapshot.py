"""The columnar snapshot: versions, retractions, replays, out-of-order versions, compaction,
Parquet round trips and stable patient ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from feasibility import snapshot as snapshot_module
from feasibility.criteria import parse_question
from feasibility.engines.polars_engine import PolarsEngine, results_of
from feasibility.engines.reference import ReferenceEngine
from feasibility.snapshot import ColumnarSnapshot, epoch_us, scan_table
from tests.spec.feasibility_helpers import (
    AT,
    ICD10,
    LOINC,
    component,
    condition,
    medication,
    observation,
    patient,
    population,
)

DIABETES = parse_question(
    {
        "inclusion": [
            {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]},
            {"type": "age", "min": 18},
        ],
        "exclusion": [
            {
                "type": "observation",
                "codes": [{"concept": "egfr"}],
                "value": {"lt": 30, "unit": "mL/min/{1.73_m2}"},
            }
        ],
    }
)


def envelope(
    patient_: str,
    key: str,
    seq: int,
    facts: list[dict[str, Any]] | None = None,
    retracted: bool = False,
    ingested_at: str = "2026-01-01T10:00:00Z",
) -> dict[str, Any]:
    return {
        "schema": "concierge.facts/1",
        "key": key,
        "patient": patient_,
        "seq": seq,
        "retracted": retracted,
        "provenance": {
            "source": "urn:t",
            "resource_type": key.split("|")[1],
            "resource_id": key.split("|")[2],
            "version": str(seq),
            "ingested_at": ingested_at,
        },
        "facts": [] if retracted else (facts or []),
    }


def condition_codes(snap: ColumnarSnapshot) -> list[tuple[str, str]]:
    """(patient, token) of every live condition row."""
    frames = snap.frames()
    return sorted(
        frames.conditions.join(frames.codesets, on="codeset")
        .join(frames.tokens, on="token_id")
        .join(frames.patients.select("pid", "patient"), on="pid")
        .select("patient", "token")
        .iter_rows()
    )


def steps(snap: ColumnarSnapshot) -> dict[str, Any]:
    frame = PolarsEngine().evaluate_snapshot(DIABETES, snap, AT)
    return {p: r.steps for p, r in results_of(frame, len(DIABETES.steps)).items()}


# --------------------------------------------------------------------------- versions


def test_a_newer_version_replaces_the_rows_of_the_older_one() -> None:
    snap = ColumnarSnapshot()
    snap.apply(envelope("a", "urn:t|Condition|c1", 1, [condition(ICD10, "E11.9")]))
    assert condition_codes(snap) == [("a", f"{ICD10}|E119")]
    assert snap.apply(envelope("a", "urn:t|Condition|c1", 2, [condition(ICD10, "I10")]))
    assert condition_codes(snap) == [("a", f"{ICD10}|I10")]


def test_an_older_or_equal_version_changes_nothing() -> None:
    snap = ColumnarSnapshot()
    assert snap.apply(envelope("a", "urn:t|Condition|c1", 3, [condition(ICD10, "I10")]))
    before = condition_codes(snap)
    assert not snap.apply(envelope("a", "urn:t|Condition|c1", 2, [condition(ICD10, "E11")]))
    assert not snap.apply(envelope("a", "urn:t|Condition|c1", 3, [condition(ICD10, "E11")]))
    assert condition_codes(snap) == before
    assert snap.watermark()["envelopes"] == 3
    assert snap.watermark()["applied"] == 1


def test_replaying_an_envelope_changes_nothing() -> None:
    snap = ColumnarSnapshot()
    stream = [
        envelope("a", "urn:t|Patient|a", 1, [patient()]),
        envelope("a", "urn:t|Condition|c1", 1, [condition(ICD10, "E11.9")]),
        envelope("a", "urn:t|Condition|c2", 1, [condition(ICD10, "I10")]),
    ]
    for e in stream:
        snap.apply(e)
    once = (condition_codes(snap), steps(snap))
    for e in stream + stream:
        assert not snap.apply(e)
    assert (condition_codes(snap), steps(snap)) == once


def test_out_of_order_versions_end_at_the_highest_seq() -> None:
    versions = {seq: [condition(ICD10, code)] for seq, code in ((1, "E10"), (2, "E11"), (3, "I10"))}
    for order in ([1, 2, 3], [3, 2, 1], [2, 3, 1], [3, 1, 2]):
        snap = ColumnarSnapshot()
        for seq in order:
            snap.apply(envelope("a", "urn:t|Condition|c1", seq, versions[seq]))
            snap.frames()  # materialise between envelopes too
        assert condition_codes(snap) == [("a", f"{ICD10}|I10")], order


# --------------------------------------------------------------------------- retractions


def test_a_retraction_removes_the_rows_and_an_older_version_cannot_resurrect_them() -> None:
    snap = ColumnarSnapshot()
    snap.apply(envelope("a", "urn:t|Patient|a", 1, [patient()]))
    snap.apply(envelope("a", "urn:t|Condition|c1", 1, [condition(ICD10, "E11.9")]))
    assert steps(snap)["a"][0] is True
    snap.apply(envelope("a", "urn:t|Condition|c1", 2, retracted=True))
    assert condition_codes(snap) == []
    assert steps(snap)["a"][0] is False
    assert not snap.apply(envelope("a", "urn:t|Condition|c1", 1, [condition(ICD10, "E11.9")]))
    assert condition_codes(snap) == []
    assert snap.apply(envelope("a", "urn:t|Condition|c1", 3, [condition(ICD10, "E11.2")]))
    assert condition_codes(snap) == [("a", f"{ICD10}|E112")]


def test_a_resource_moved_to_another_patient_counts_for_the_new_one_only() -> None:
    snap = ColumnarSnapshot()
    for p in ("a", "b"):
        snap.apply(envelope(p, f"urn:t|Patient|{p}", 1, [patient()]))
    snap.apply(envelope("a", "urn:t|Condition|c1", 1, [condition(ICD10, "E11")]))
    # the adapter retracts from the old patient, then publishes to the new one
    snap.apply(envelope("a", "urn:t|Condition|c1", 2, retracted=True))
    snap.apply(envelope("b", "urn:t|Condition|c1", 3, [condition(ICD10, "E11")]))
    assert condition_codes(snap) == [("b", f"{ICD10}|E11")]
    assert steps(snap)["a"][0] is False and steps(snap)["b"][0] is True


def test_a_retracted_patient_fact_leaves_the_population() -> None:
    snap = ColumnarSnapshot()
    snap.apply(envelope("a", "urn:t|Patient|a", 1, [patient(sex="female")]))
    frames = snap.frames()
    assert frames.patients.get_column("has_demographics").to_list() == [True]
    snap.apply(envelope("a", "urn:t|Patient|a", 2, retracted=True))
    after = snap.frames().patients
    assert after.get_column("has_demographics").to_list() == [False]
    assert after.get_column("sex").to_list() == [None]
    # the frames handed out before are unchanged (safe to read outside the lock)
    assert frames.patients.get_column("sex").to_list() == ["female"]


def test_demographics_come_from_the_latest_patient_version() -> None:
    """The patient view's rule (it replaces "the first Patient by resource key"): the live
    Patient version latest by (last_updated, seq, resource key), undated lowest."""

    def dated(env: dict[str, Any], updated: str | None) -> dict[str, Any]:
        return {**env, "provenance": {**env["provenance"], "last_updated": updated}}

    snap = ColumnarSnapshot()
    snap.apply(envelope("a", "urn:t|Patient|z", 1, [patient(sex="male", site="RZZ")]))
    assert snap.frames().patients.get_column("site").to_list() == ["RZZ"]
    # undated, same seq: the greater key wins ("z" over "b")
    snap.apply(envelope("a", "urn:t|Patient|b", 1, [patient(sex="female", site="RBB")]))
    assert snap.frames().patients.get_column("site").to_list() == ["RZZ"]
    # a dated version outranks an undated one
    snap.apply(
        dated(envelope("a", "urn:t|Patient|b", 2, [patient(site="RBB")]), "2025-03-01T00:00:00Z")
    )
    assert snap.frames().patients.get_column("site").to_list() == ["RBB"]
    # ... and a later last_updated outranks an earlier one
    snap.apply(
        dated(envelope("a", "urn:t|Patient|z", 2, [patient(site="RZZ")]), "2025-04-01T00:00:00Z")
    )
    assert snap.frames().patients.get_column("site").to_list() == ["RZZ"]
    snap.apply(envelope("a", "urn:t|Patient|z", 3, retracted=True))
    assert snap.frames().patients.get_column("site").to_list() == ["RBB"]


# --------------------------------------------------------------------------- compaction


def test_compaction_drops_dead_rows_and_keeps_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_module, "COMPACT_TAIL_MIN", 8)
    monkeypatch.setattr(snapshot_module, "COMPACT_DEAD_MIN", 4)
    snap = ColumnarSnapshot()
    reference: dict[str, dict[str, Any]] = {}
    for n in range(40):
        p = f"p{n % 7}"
        snap.apply(envelope(p, f"urn:t|Patient|{p}", 1, [patient()]))
        reference.setdefault(p, {})[f"urn:t|Patient|{p}"] = {"seq": 1, "facts": [patient()]}
        code = "E11.9" if n % 3 else "I10"
        facts = [condition(ICD10, code), medication("109081006")]
        key = f"urn:t|Condition|c{n % 5}"
        snap.apply(envelope(p, key, n + 1, facts))
        reference[p][key] = {"seq": n + 1, "facts": facts}
        snap.frames()
    frames = snap.frames()
    assert frames.tables["conditions"].main.height > 0
    live = frames.conditions
    assert live.height == sum(
        1 for entries in reference.values() for k in entries if k.startswith("urn:t|Condition")
    )
    want = ReferenceEngine().evaluate(DIABETES, reference, AT)
    got = results_of(PolarsEngine().evaluate_snapshot(DIABETES, snap, AT), len(DIABETES.steps))
    assert got == want
    snap.compact()
    after = snap.frames()
    assert after.tables["conditions"].tail.height == 0
    assert after.tables["conditions"].dead.height == 0
    assert after.conditions.sort("rid").equals(live.sort("rid"))


def test_main_frames_are_sorted_by_code_and_sliced_by_code() -> None:
    snap = ColumnarSnapshot()
    snap.apply_entries(
        population(
            a=[patient(), observation("59261-8", value=60, unit="mmol/mol")],
            b=[patient(), observation("62238-1", value=25, unit="mL/min/{1.73_m2}")],
            c=[patient(), observation("59261-8", value=50, unit="mmol/mol")],
        )
    )
    snap.compact()
    frames = snap.frames()
    view = frames.tables["observations"]
    codesets = view.main.get_column("codeset").to_list()
    assert codesets == sorted(codesets)
    hba1c = frames.tokens.filter(pl.col("token") == f"{LOINC}|59261-8").get_column("token_id")
    wanted = frames.codesets.filter(pl.col("token_id").is_in(hba1c.implode()))
    rows = view.rows(wanted.get_column("codeset").to_list())
    assert sorted(rows.get_column("value").to_list()) == [50.0, 60.0]


# --------------------------------------------------------------------------- ids, watermark


def test_patient_ids_are_dense_in_order_of_first_appearance() -> None:
    snap = ColumnarSnapshot()
    snap.apply(envelope("zed", "urn:t|Condition|c1", 1, [condition(ICD10, "I10")]))
    snap.apply(envelope("amy", "urn:t|Patient|amy", 1, [patient()]))
    snap.apply(envelope("zed", "urn:t|Patient|zed", 1, [patient()]))
    snap.apply(envelope("bob", "urn:t|Condition|c9", 1, retracted=True))
    assert [snap.patient_id(p) for p in ("zed", "amy", "bob")] == [0, 1, 2]
    assert [snap.pseudonym_of(i) for i in range(3)] == ["zed", "amy", "bob"]
    frame = snap.frames().patients
    assert frame.get_column("patient").to_list() == ["zed", "amy", "bob"]
    with pytest.raises(KeyError):
        snap.patient_id("nobody")


def test_watermark_counts_envelopes_and_tracks_ingestion_and_offsets() -> None:
    snap = ColumnarSnapshot()
    snap.apply(envelope("a", "urn:t|Patient|a", 1, [patient()], ingested_at="2026-01-02T00:00:00Z"))
    snap.apply(
        envelope("a", "urn:t|Patient|a", 1, [patient()], ingested_at="2026-01-03T00:00:00+01:00"),
        partition=0,
        offset=41,
    )
    snap.apply(envelope("b", "urn:t|Patient|b", 1, [patient()], ingested_at="2026-01-01T00:00:00Z"),
               partition=1, offset=7)  # fmt: skip
    mark = snap.watermark()
    assert mark["envelopes"] == 3 and mark["applied"] == 2
    assert mark["max_ingested_at"] == "2026-01-03T00:00:00+01:00"
    assert mark["offsets"] == {0: 42, 1: 8}


# --------------------------------------------------------------------------- Parquet


def _everything() -> dict[str, dict[str, dict[str, Any]]]:
    pop = population(
        **{
            f"p{i:02d}": [
                patient(birth=f"{1950 + i}-03-0{1 + i % 9}", sex="male" if i % 2 else "female"),
                condition(ICD10, "E11.9" if i % 3 else "I10"),
                observation("59261-8", value=40.0 + i, unit="mmol/mol"),
                observation("62238-1", value=20.0 + i, unit="mL/min/{1.73_m2}", when="2025-12-01"),
                observation("85354-9", components=[component("8480-6", 120 + i, "mm[Hg]")]),
                medication("109081006"),
            ]
            for i in range(40)
        }
    )
    pop["p03"]["urn:t|Condition|p03-001"]["retracted"] = True
    pop["empty"] = {}
    return pop


def test_parquet_round_trip(tmp_path: Path) -> None:
    snap = ColumnarSnapshot()
    snap.apply_entries(_everything())
    snap.apply(envelope("p01", "urn:t|Condition|p01-001", 5, [condition(ICD10, "E11.5")]),
               partition=2, offset=99)  # fmt: skip
    snap.save_parquet(tmp_path / "snap", buckets=4)
    assert len(list((tmp_path / "snap" / "observations").glob("bucket=*/*.parquet"))) == 4
    loaded = ColumnarSnapshot.load_parquet(tmp_path / "snap")
    a, b = snap.frames(), loaded.frames()
    assert a.patients.equals(b.patients)
    for name in a.tables:
        key = ["rid", *(["fact"] if "fact" in a.table(name).columns else [])]
        key += ["comp"] if name == "components" else []
        assert a.table(name).sort(key).equals(b.table(name).sort(key)), name
    for name in ("tokens", "codesets", "value_sets", "interp_sets"):
        assert (
            getattr(a, name)
            .sort(getattr(a, name).columns)
            .equals(getattr(b, name).sort(getattr(b, name).columns))
        )
    assert loaded.watermark() == snap.watermark()
    assert [loaded.patient_id(p) for p in ("p00", "p39", "empty")] == [0, 39, 40]
    engine = PolarsEngine()
    assert engine.evaluate_snapshot(DIABETES, loaded, AT).equals(
        engine.evaluate_snapshot(DIABETES, snap, AT)
    )


def test_applying_after_a_reload_continues_where_the_saved_snapshot_stopped(
    tmp_path: Path,
) -> None:
    pop = _everything()
    snap = ColumnarSnapshot()
    snap.apply_entries(pop)
    snap.save_parquet(tmp_path / "snap")
    loaded = ColumnarSnapshot.load_parquet(tmp_path / "snap")
    # replays and stale versions stay ignored (tombstones included)
    assert not loaded.apply(
        envelope("p00", "urn:t|Condition|p00-001", 1, [condition(ICD10, "C34")])
    )
    assert not loaded.apply(
        envelope("p03", "urn:t|Condition|p03-001", 1, [condition(ICD10, "E11")])
    )
    # new versions, new patients and new codes apply
    assert loaded.apply(envelope("p00", "urn:t|Condition|p00-001", 2, [condition(ICD10, "I10")]))
    assert loaded.apply(envelope("new", "urn:t|Patient|new", 1, [patient(birth="1970-01-01")]))
    assert loaded.apply(envelope("new", "urn:t|Condition|n1", 1, [condition(ICD10, "E11.65")]))
    assert loaded.patient_id("new") == 41
    pop["p00"]["urn:t|Condition|p00-001"] = {"seq": 2, "facts": [condition(ICD10, "I10")]}
    pop["new"] = {
        "urn:t|Patient|new": {"seq": 1, "facts": [patient(birth="1970-01-01")]},
        "urn:t|Condition|n1": {"seq": 1, "facts": [condition(ICD10, "E11.65")]},
    }
    want = ReferenceEngine().evaluate(DIABETES, pop, AT)
    got = results_of(PolarsEngine().evaluate_snapshot(DIABETES, loaded, AT), len(DIABETES.steps))
    assert got == want


def test_scan_table_reads_one_bucket_at_a_time(tmp_path: Path) -> None:
    snap = ColumnarSnapshot()
    snap.apply_entries(_everything())
    snap.save_parquet(tmp_path / "snap", buckets=8)
    total = snap.frames().observations.height
    per_bucket = [
        scan_table(tmp_path / "snap", "observations", bucket).collect().height
        for bucket in range(8)
    ]
    assert sum(per_bucket) == total
    assert scan_table(tmp_path / "snap", "observations").collect().height == total
    pids = [
        set(scan_table(tmp_path / "snap", "patient_facts", b).collect().get_column("pid").to_list())
        for b in range(8)
    ]
    assert sum(len(p) for p in pids) == len(set().union(*pids))  # each patient in one bucket


def test_epoch_us_matches_the_reference_timestamps() -> None:
    from feasibility.patient_data import epoch

    for text in (
        "2025-10-01T09:00:00+00:00",
        "2025-10-01T09:00:00Z",
        "2025-10-01T09:00:00",
        "2025-10-01T10:00:00.123457+01:00",
        "2025-12-31T23:59:59.999999+00:00",
        "1969-07-20T20:17:40Z",
        "2025-10-01",
    ):
        us = epoch_us(text)
        assert us is not None and us / 1_000_000 == epoch(text)
    assert epoch_us(None) is None and epoch_us("") is None


def test_when_s_is_exactly_the_reference_float_seconds() -> None:
    """polars divides by a scalar through its reciprocal (1 ulp off for about a third of
    values); the snapshot's float seconds must be the correctly rounded ones."""
    from feasibility.patient_data import epoch

    texts = [
        f"2025-12-31T23:59:{s:02d}.{us:06d}+00:00"
        for s in range(0, 60, 7)
        for us in (0, 1, 999998, 999999)
    ] + ["2025-12-31T23:59:59.999999", "2003-12-25T00:00:00.000001Z", "1955-03-01T12:00:00Z"]
    snap = ColumnarSnapshot()
    snap.apply_entries(
        {"a": {f"urn:t|Procedure|{i}": {"seq": 1, "facts": [{"kind": "procedure",
               "codes": [], "status": "completed", "performed": t}]} for i, t in enumerate(texts)}}
    )  # fmt: skip
    frame = snap.frames().procedures.sort("rid")
    assert frame.get_column("when_s").to_list() == [epoch(t) for t in texts]
    assert frame.get_column("when_us").to_list() == [epoch_us(t) for t in texts]


def test_an_event_at_the_index_instant_is_inside_a_window_ending_there() -> None:
    question = parse_question(
        {
            "index_date": "2025-12-31",
            "inclusion": [
                {
                    "type": "medication",
                    "codes": [{"system": "dmd", "code": "109081006"}],
                    "window": {"start": 0, "end": 365},
                }
            ],
        }
    )
    pop = population(
        at_t=[patient(), medication("109081006", start="2025-12-31T23:59:59.999999")],
        before=[patient(), medication("109081006", start="2025-12-31T23:59:59.999998")],
        after=[patient(), medication("109081006", start="2026-01-01T00:00:00")],
    )
    want = ReferenceEngine().evaluate(question, pop, AT)
    assert {p: r.steps for p, r in want.items()} == {
        "at_t": (True,),
        "before": (False,),
        "after": (False,),
    }
    assert PolarsEngine().evaluate(question, pop, AT) == want
