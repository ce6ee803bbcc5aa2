"""Readers asking while faults happen, and the check that no answer came from a stale view.

A sampler measures the facts topic's high watermarks every quarter second with its own client.
Askers send an ad hoc question and read the saved question's answer in a loop. The contract:
every answer is 503 (with ``Retry-After``) or current, where current means the snapshot it was
computed on had read at least the facts topic as it stood ``MAX_STALENESS`` (plus a second for
the sampler's own resolution) before the request was sent. Nothing else: no 500, no 2xx from a
snapshot that stopped reading.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaException, TopicPartition

#: How old the newest facts a 2xx answer reflects may be (the readers' freshness bound).
MAX_STALENESS = 5.0
#: How far a saved answer's stream time may trail the clock (CONCIERGE_STREAM_MAX_LAG_SECONDS).
STREAM_MAX_LAG = 15.0
SLACK = 1.0


@dataclass
class Answer:
    route: str
    started: float
    status: int | str
    retry_after: str | None
    offsets: dict[int, int] | None
    detail: Any = None
    #: a saved answer's stream time behind the wall clock when it was asked (seconds)
    stream_lag: float | None = None


@dataclass
class Probe:
    api: str
    bootstrap: str
    facts_topic: str
    headers: dict[str, str]
    question: dict[str, Any]
    trial: str
    answers: list[Answer] = field(default_factory=list)
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Probe:
        for target in (self._sample, self._ask):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _sample(self) -> None:
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "chaos-probe",
             "enable.auto.commit": False, "socket.timeout.ms": 2000}
        )  # fmt: skip
        partitions: list[int] = []
        while not self._stop.is_set():
            try:
                if not partitions:
                    meta = consumer.list_topics(self.facts_topic, timeout=2)
                    partitions = sorted(meta.topics[self.facts_topic].partitions)
                highs = {
                    p: consumer.get_watermark_offsets(
                        TopicPartition(self.facts_topic, p), timeout=2, cached=False
                    )[1]
                    for p in partitions
                }
                self.samples.append((time.monotonic(), highs))
            except (KafkaException, KeyError):
                pass  # the broker is down: no sample, so no answer is judged against one
            time.sleep(0.25)
        consumer.close()

    def _ask(self) -> None:
        client = httpx.Client(base_url=self.api, headers=self.headers, timeout=20)
        routes = [
            ("ask", lambda: client.post("/v1/feasibility/ask", json=self.question)),
            (
                "saved",
                lambda: client.get(f"/v1/feasibility/saved-questions/{self.trial}/answer"),
            ),
        ]
        turn = 0
        while not self._stop.is_set():
            route, call = routes[turn % 2]
            turn += 1
            started = time.monotonic()
            wall = time.time()
            try:
                response = call()
            except httpx.HTTPError as exc:
                self.answers.append(Answer(route, started, type(exc).__name__, None, None))
                time.sleep(0.5)
                continue
            offsets = None
            stream_lag: float | None = None
            detail: Any = None
            try:
                body = response.json()
            except ValueError:
                body = {}
            if response.status_code == 200:
                as_of = body.get("as_of") or {}
                raw = as_of.get("offsets") or {}
                offsets = {int(p): int(o) for p, o in raw.items()}
                if as_of.get("stream_time"):
                    stream_time = datetime.fromisoformat(as_of["stream_time"])
                    stream_lag = wall - stream_time.timestamp()
            else:
                detail = body.get("detail", body)
            self.answers.append(
                Answer(
                    route,
                    started,
                    response.status_code,
                    response.headers.get("Retry-After"),
                    offsets,
                    detail,
                    stream_lag,
                )
            )
            time.sleep(0.35)
        client.close()

    # ------------------------------------------------------------------ the contract

    def high_before(self, instant: float) -> dict[int, int] | None:
        """The newest sample taken at or before ``instant``."""
        times = [t for t, _ in self.samples]
        index = bisect.bisect_right(times, instant) - 1
        return self.samples[index][1] if index >= 0 else None

    def violations(self) -> list[str]:
        bad = []
        for answer in list(self.answers):
            if isinstance(answer.status, str):
                continue  # the API was down: no answer at all is not a wrong answer
            if answer.status == 503:
                if not answer.retry_after:
                    bad.append(f"{answer.route}: 503 without Retry-After")
                continue
            if answer.status != 200:
                bad.append(f"{answer.route}: {answer.status} {answer.detail}")
                continue
            if answer.stream_lag is not None and answer.stream_lag > STREAM_MAX_LAG + SLACK:
                bad.append(f"{answer.route}: 200 from a stream {answer.stream_lag:.0f} s behind")
            floor = self.high_before(answer.started - MAX_STALENESS - SLACK)
            if floor is None or answer.offsets is None:
                continue
            behind = {p: h - answer.offsets.get(p, 0) for p, h in floor.items()
                      if answer.offsets.get(p, 0) < h}  # fmt: skip
            if behind:
                bad.append(
                    f"{answer.route}: 200 from a snapshot behind the topic as it stood "
                    f"{MAX_STALENESS + SLACK:.0f} s earlier (messages behind per partition "
                    f"{behind})"
                )
        return bad

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for answer in self.answers:
            key = f"{answer.route}:{answer.status}"
            out[key] = out.get(key, 0) + 1
        return out


__all__ = ["MAX_STALENESS", "Answer", "Probe"]
