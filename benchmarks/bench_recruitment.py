"""Candidates routed per second, end to end from cohort-entry events, beside a consume-and-decode
baseline.

Set-up on a real broker, in topics of this run's own (a fresh prefix): the reference data routing
reads (``--sites`` organisations, each with a trial-recruiter nurse, and ``--gps`` GPs with an
e-mail address), every patient's Patient facts (site and registered GP; one patient in ten has no
GP, so a site recruiter is found for them), and one trial recruiting at every site. The real
recruitment consumer (``concierge recruitment run``, SQLite, as the product runs it, without the
scheduler so nothing moves an invitation on) reads all of that; once it has, ``--events``
cohort-entry events (``"trial|patient"`` keys, ``member: true``) are published.

Figure: candidates routed per second (and per hour), from the first cohort event published to the
last invitation routed, counted in the database in the state routing leaves it (an invitation
``proposed`` with its alert queued in the outbox; with e-mail on, the default). The consumer's CPU
time over the same interval is recorded too.

Baseline, same run: a plain confluent-kafka consumer reading the same cohort events and decoding
them as recruitment does (key split, record validated), first message to last.

    python -m benchmarks.bench_recruitment --events 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, Producer

from benchmarks.bench_stream import cpu_seconds
from benchmarks.common import summary, write_result
from core.contracts.facts import (
    Coding,
    OrganizationRecord,
    PatientFact,
    PractitionerRecord,
    PractitionerRoleRecord,
    Provenance,
    ReferenceRecord,
    ResourceFacts,
)
from infra.topics import COHORT, FACTS, REFERENCE, TRIALS
from infra.topics_admin import ensure_topics
from recruitment.contracts import decode_cohort, split_cohort_key

SOURCE = "urn:bench:ehr"
TRIAL = "bench-recruitment-trial"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
TARGET_PER_HOUR = 5_000 * 3600  # issue 16: >= 5,000 candidates/s


def key(resource_type: str, resource_id: str) -> str:
    return f"{SOURCE}|{resource_type}|{resource_id}"


def provenance(resource_type: str, resource_id: str) -> Provenance:
    return Provenance(source=SOURCE, resource_type=resource_type, resource_id=resource_id,
                      version="1", last_updated=T0, ingested_at=T0)  # fmt: skip


def site_code(i: int) -> str:
    return f"RS{i:02d}"


def patient_name(i: int) -> str:
    return f"p-{i:07d}"


def reference_record(resource_type: str, resource_id: str, record: Any) -> ReferenceRecord:
    return ReferenceRecord(
        key=key(resource_type, resource_id),
        seq=1,
        provenance=provenance(resource_type, resource_id),
        record=record,
    )


def reference_records(sites: int, gps: int) -> list[ReferenceRecord]:
    """A trust per site with a trial-recruiter nurse, and ``gps`` GPs, all with e-mail."""
    recruiter = Coding(system="http://snomed.info/sct", code="224535009",
                       display="Clinical trial recruiter")  # fmt: skip
    records: list[ReferenceRecord] = []
    for s in range(sites):
        org, nurse = f"org-{s}", f"nurse-{s}"
        role = PractitionerRoleRecord(
            practitioner=key("Practitioner", nurse),
            organization=key("Organization", org),
            codes=(recruiter,),
        )
        records += [
            reference_record("Organization", org, OrganizationRecord(ods_code=site_code(s))),
            reference_record("Practitioner", nurse,
                             PractitionerRecord(name=f"Nurse {s}", email=f"{nurse}@nhs.example")),
            reference_record("PractitionerRole", f"role-{s}", role),
        ]  # fmt: skip
    for g in range(gps):
        person = PractitionerRecord(name=f"Dr {g}", email=f"gp-{g}@nhs.example")
        records.append(reference_record("Practitioner", f"gp-{g}", person))
    return records


def patient_envelope(i: int, sites: int, gps: int) -> ResourceFacts:
    """Patient ``i``: at site ``i % sites``, with GP ``i // 10 % gps`` (one in ten: no GP)."""
    gp = () if i % 10 == 9 else (key("Practitioner", f"gp-{i // 10 % gps}"),)
    return ResourceFacts(
        key=key("Patient", f"pat-{i}"), patient=patient_name(i), seq=1,
        provenance=provenance("Patient", f"pat-{i}"),
        facts=(PatientFact(site=site_code(i % sites), region="London",
                           gp_practice=key("Organization", f"practice-{i // 10 % gps}"),
                           general_practitioners=gp),))  # fmt: skip


def trial_record(sites: int) -> dict[str, Any]:
    return {
        "schema": "concierge.trial/1", "id": TRIAL, "version": 1, "title": "Benchmark trial",
        "sponsor": "bench", "status": "active", "criteria": {"schema": "concierge.criteria/1"},
        "recruiting_sites": [site_code(s) for s in range(sites)], "target": None,
        "site_targets": {}, "recruiters": {}, "registered_at": T0.isoformat(),
    }  # fmt: skip


def cohort_record(i: int, sites: int) -> dict[str, Any]:
    """Patient ``i`` entering the trial's cohort, as the stream worker writes it."""
    at = (T0 + timedelta(seconds=i)).isoformat()
    return {"schema": "concierge.cohort/1", "trial": TRIAL, "trial_version": 1,
            "patient": patient_name(i), "site": site_code(i % sites), "region": "London",
            "member": True, "steps": "PPP", "change": 1, "at": at}  # fmt: skip


def reference_messages(sites: int, gps: int) -> list[tuple[str, bytes]]:
    return [(r.key, r.to_json()) for r in reference_records(sites, gps)]


def facts_messages(events: int, sites: int, gps: int) -> list[tuple[str, bytes]]:
    return [(patient_name(i), patient_envelope(i, sites, gps).to_json()) for i in range(events)]


def trial_message(sites: int) -> tuple[str, bytes]:
    return TRIAL, json.dumps(trial_record(sites)).encode()


def cohort_messages(events: int, sites: int) -> list[tuple[str, bytes]]:
    """Cohort entries keyed as the stream worker writes them (a JSON string, quotes included)."""
    return [
        (json.dumps(f"{TRIAL}|{patient_name(i)}"), json.dumps(cohort_record(i, sites)).encode())
        for i in range(events)
    ]


def produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "compression.type": "lz4", "enable.idempotence": True,
                         "queue.buffering.max.messages": 1_000_000})  # fmt: skip
    for k, v in messages:
        while True:
            try:
                producer.produce(topic, key=k.encode(), value=v)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError(f"could not publish to {topic}")


def counts(db: sa.Engine) -> dict[str, int]:
    """Rows the consumer has committed (SQLite: read beside the writer, WAL)."""
    queries = {
        "profiles": "SELECT count(*) FROM patient_profiles",
        "practitioners": "SELECT count(*) FROM practitioners",
        "roles": "SELECT count(*) FROM practitioner_roles WHERE trial_recruiter",
        "trials": "SELECT count(*) FROM trials",
        "memberships": "SELECT count(*) FROM cohort_memberships",
        "candidates": "SELECT count(*) FROM candidates",
        "invited": "SELECT count(*) FROM candidates WHERE status = 'invited'",
        "proposed": "SELECT count(*) FROM invitations WHERE state = 'proposed'",
        "invitations": "SELECT count(*) FROM invitations",
        "alerts": "SELECT count(*) FROM outbox WHERE kind = 'alert'",
        "skipped": "SELECT count(*) FROM skipped_messages",
    }
    try:
        with db.connect() as conn:
            return {name: int(conn.execute(sa.text(q)).scalar_one()) for name, q in queries.items()}
    except sa.exc.DBAPIError:  # not there, or not migrated yet
        return {}


def invitations(db: sa.Engine) -> int:
    """The one light query polled while routing runs."""
    with db.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM invitations")).scalar_one())


def routing_counts(db: sa.Engine) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT routing_via, count(*) FROM candidates GROUP BY routing_via")
        )
        return {str(via): int(n) for via, n in rows}


@contextlib.contextmanager
def database(choice: str, home: Path) -> Iterator[str]:
    """The consumer's database URL: a SQLite file in ``home``, or a fresh schema of the
    PostgreSQL database at ``choice`` (dropped afterwards)."""
    if choice == "sqlite":
        yield f"sqlite:///{home / 'recruitment.sqlite'}"
        return
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(choice)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in choice else "?"
    try:
        yield f"{choice}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def wait_until(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes],
               log: Path, interval: float = 0.1) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the consumer exited: {log.read_text()[-3000:]}")
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what}: {log.read_text()[-3000:]}")


def run_recruitment(bootstrap: str, options: argparse.Namespace, cohort: list[Any],
                    prefix: str, home: Path, url: str) -> dict[str, Any]:  # fmt: skip
    """Set up, start ``concierge recruitment run``, publish the cohort events, time the routing."""
    ensure_topics(bootstrap, prefix)
    produce(bootstrap, prefix + REFERENCE, reference_messages(options.sites, options.gps))
    produce(bootstrap, prefix + TRIALS, [trial_message(options.sites)])
    produce(bootstrap, prefix + FACTS, facts_messages(options.events, options.sites, options.gps))
    db = sa.create_engine(url)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_HOME": str(home), "CONCIERGE_RECRUITMENT_URL": url,
           "CONCIERGE_RECRUITMENT_CONSUMER_GROUP": prefix + "recruitment"}  # fmt: skip
    cmd = [sys.executable, "-m", "concierge", "recruitment", "run", "--no-scheduler",
           "--log-level", "WARNING"]  # fmt: skip
    if options.batch_size:
        cmd += ["--batch-size", str(options.batch_size)]
    log = home / "recruitment.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        setup_started = time.monotonic()
        gps_and_nurses = options.gps + options.sites
        wait_until(lambda: (c := counts(db)) and c["profiles"] >= options.events
                   and c["trials"] == 1 and c["practitioners"] >= gps_and_nurses
                   and c["roles"] >= options.sites,
                   900, "set-up not applied", proc, log, interval=0.5)  # fmt: skip
        setup_s = time.monotonic() - setup_started
        print(f"  set-up applied in {setup_s:.1f} s", file=sys.stderr)
        cpu_before = cpu_seconds(proc.pid)
        started = time.monotonic()
        produce(bootstrap, prefix + COHORT, cohort)
        published_s = time.monotonic() - started
        last = [0]

        def routed() -> bool:
            n = invitations(db)
            if n // 5000 > last[0] // 5000:
                print(f"  {n} routed after {time.monotonic() - started:.0f} s", file=sys.stderr)
            last[0] = n
            return n >= options.events

        wait_until(routed, 3600, "routing did not finish", proc, log, interval=0.05)
        wall = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu_before
        final = counts(db)
        via = routing_counts(db)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        db.dispose()
    expected = options.events
    ok = (final["candidates"] == final["invited"] == final["proposed"] == final["alerts"]
          == expected and final["skipped"] == 0)  # fmt: skip
    if not ok:
        raise RuntimeError(f"the database is not in the expected state: {final}")
    return {"wall_s": wall, "cpu_s": cpu, "per_s": expected / wall,
            "per_cpu_s": expected / cpu, "setup_s": setup_s, "publish_s": published_s,
            "final": final, "routing_via": via}  # fmt: skip


def run_baseline(bootstrap: str, topic: str, expected: int) -> dict[str, Any]:
    """A plain consumer reading the cohort events and decoding them as recruitment does."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})  # fmt: skip
    consumer.subscribe([topic])
    decoded = 0
    first = None
    deadline = time.monotonic() + 300
    try:
        while decoded < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, 1.0):
                if message.error() is not None:
                    continue
                if first is None:
                    first = time.monotonic()
                raw = message.key()
                k = raw.decode() if isinstance(raw, bytes) else (raw or "")
                if split_cohort_key(k) is not None and decode_cohort(message.value(), k):
                    decoded += 1
        wall = time.monotonic() - (first or time.monotonic())
    finally:
        consumer.close()
    if decoded < expected:
        raise RuntimeError(f"baseline decoded {decoded} of {expected}")
    return {"wall_s": wall, "per_s": decoded / wall}


def in_process(options: argparse.Namespace, url: str, profiler: Any = None) -> dict[str, Any]:
    """Routing without Kafka (a profiling aid): the same set-up and cohort records applied through
    the consumer's unit of work, ``--batch-size`` records per transaction, on a migrated database
    at ``url``. Returns candidates per second over the cohort records alone."""
    from core.contracts.cohorts import CohortRecord
    from core.contracts.trials import OpaqueTrialRecord
    from recruitment.db import upgrade
    from recruitment.notify import EMAIL, MemoryChannel
    from recruitment.runtime import build_runtime
    from recruitment.settings import RecruitmentSettings

    upgrade(url)
    settings = RecruitmentSettings(url=url, app_base_url="https://concierge.example")
    runtime = build_runtime(settings, url=url, channels={EMAIL: MemoryChannel()})
    service = runtime.service
    try:
        with runtime.sessions.begin() as session:
            work = service.unit_of_work(session)
            for reference in reference_records(options.sites, options.gps):
                work.reference(reference)
            trial = OpaqueTrialRecord.model_validate(trial_record(options.sites))
            work.trial(trial.id, trial)
            for i in range(options.events):
                work.facts(patient_envelope(i, options.sites, options.gps))
            work.finish()
        records = [
            CohortRecord.model_validate(cohort_record(i, options.sites))
            for i in range(options.events)
        ]
        batch = options.batch_size or 500
        if profiler is not None:
            profiler.enable()
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            with runtime.sessions.begin() as session:
                work = service.unit_of_work(session)
                if hasattr(work, "prefetch_cohort"):  # the per-row path has none
                    work.prefetch_cohort([(r.trial, r.patient) for r in chunk])
                for record in chunk:
                    work.cohort(record.trial, record.patient, record)
                work.finish()
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        if profiler is not None:
            profiler.disable()
        with runtime.sessions() as session:
            from recruitment.models import Invitation

            invited = session.scalar(sa.select(sa.func.count()).select_from(Invitation))
    finally:
        runtime.close()
    if invited != options.events:
        raise RuntimeError(f"{invited} invitations for {options.events} cohort records")
    return {"wall_s": wall, "per_s": options.events / wall, "cpu_s": cpu,
            "per_cpu_s": options.events / cpu}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="cohort-entry events")
    parser.add_argument("--quick", action="store_true", help="2,000 events (a smoke run)")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--gps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="consumer batch (default: the product's setting)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--in-process", action="store_true",
                        help="no Kafka: apply the records through the unit of work directly "
                        "(a profiling aid; prints, writes no result)")  # fmt: skip
    parser.add_argument("--profile", type=Path, default=None,
                        help="with --in-process: cProfile file")  # fmt: skip
    parser.add_argument("--database", default="sqlite",
                        help="sqlite (a file of the run's own) or a PostgreSQL URL; the consumer "
                        "gets a fresh schema in it")  # fmt: skip
    options = parser.parse_args()
    if options.quick:
        options.events = min(options.events, 2000)
    if options.in_process:
        home = Path(tempfile.mkdtemp(prefix="bench-recruitment-"))
        url = f"sqlite:///{home / 'recruitment.sqlite'}"
        if options.profile:
            import cProfile

            profiler = cProfile.Profile()
            found = in_process(options, url, profiler)
            profiler.dump_stats(options.profile)
        else:
            found = in_process(options, url)
        print(json.dumps(found))
        return
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    cohort = cohort_messages(options.events, options.sites)
    ours: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    for repeat in range(options.repeats):
        prefix = f"bench-recr-{uuid.uuid4().hex[:8]}."
        home = Path(tempfile.mkdtemp(prefix="bench-recruitment-"))
        print(
            f"run {repeat + 1}: {options.events} cohort events, topics {prefix}*", file=sys.stderr
        )
        with database(options.database, home) as url:
            run = run_recruitment(bootstrap, options, cohort, prefix, home, url)
        base = run_baseline(bootstrap, prefix + COHORT, options.events)
        ours.append(run)
        baselines.append(base)
        print(f"  recruitment: {run['per_s']:8.1f} candidates routed/s ({run['wall_s']:.1f} s, "
              f"{run['per_cpu_s']:.1f}/CPU-s); consume-and-decode: {base['per_s']:8.0f}/s",
              file=sys.stderr)  # fmt: skip
    value = summary([r["per_s"] for r in ours])["median"]
    baseline = summary([b["per_s"] for b in baselines])["median"]
    parameters = {"events": options.events, "sites": options.sites, "gps": options.gps,
                  "trials": 1, "batch_size": options.batch_size or "default (500)",
                  "database": "sqlite" if options.database == "sqlite" else "postgresql",
                  "repeats": options.repeats}  # fmt: skip
    last = ours[-1]
    backend = "SQLite" if options.database == "sqlite" else "PostgreSQL"
    extra = {
        "per_hour": round(value * 3600),
        "baseline_per_hour": round(baseline * 3600),
        "target_per_hour": TARGET_PER_HOUR,
        "meets_target": value * 3600 >= TARGET_PER_HOUR,
        "per_cpu_second": round(summary([r["per_cpu_s"] for r in ours])["median"], 1),
        "wall_seconds": [round(r["wall_s"], 2) for r in ours],
        "baseline_wall_seconds": [round(b["wall_s"], 3) for b in baselines],
        "publish_seconds": round(last["publish_s"], 2),
        "setup_seconds": round(last["setup_s"], 1),
        "final_state": last["final"],
        "routing_via": last["routing_via"],
        "measured": "first cohort event published -> last invitation committed (proposed, alert "
        f"queued); consumer = `concierge recruitment run --no-scheduler` on {backend}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    # the PostgreSQL URL holds a password: the command names the backend only
    args = ["$POSTGRES_URL" if a == options.database != "sqlite" else a for a in sys.argv[1:]]
    command = "python -m benchmarks.bench_recruitment " + " ".join(args)
    name = "recruitment_routed_per_second"
    if options.database != "sqlite":
        name += "_postgres"
    result = write_result(name, value, "candidates/second", baseline,
                          parameters, command.strip(), extra)  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}
                     | {"per_hour": extra["per_hour"]}))  # fmt: skip


if __name__ == "__main__":
    main()
