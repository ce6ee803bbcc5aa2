"""Bounded load through ``/fhir`` as a source system sends it, and the ledger of what was
acknowledged.

Senders ``PUT /fhir/{type}/{id}`` each patient's resources in order (the Patient first), at a
bounded rate, then now and then a new version of an Observation or a DELETE of a Condition. A
request is acknowledged only by 200/201; anything else (503, 5xx, a refused or dropped
connection while the API is down) is retried after a back-off, as a real source retries, until
it is acknowledged. The ledger keeps, per resource, the last version acknowledged: the oracle's
"accepted resources".
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from core.settings import Settings
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.synthetic.generator import GeneratorConfig, iter_patients


@dataclass
class Acked:
    version: str | None  # meta.versionId acknowledged last (None for a DELETE)
    deleted: bool


@dataclass
class Ledger:
    acked: dict[tuple[str, str], Acked] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    #: (request start, seconds) of each failed attempt, by kind, for the report
    failures: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rtype: str, rid: str, version: str | None, deleted: bool) -> None:
        with self.lock:
            self.acked[(rtype, rid)] = Acked(version, deleted)


def requests_of(config: GeneratorConfig, seed: int) -> list[list[tuple[str, str, str, Any]]]:
    """Per patient, the requests in order: ``(method, type, id, resource or None)``."""
    rng = random.Random(seed)
    out = []
    for resources in iter_patients(config):
        work: list[tuple[str, str, str, Any]] = [
            ("PUT", r["resourceType"], r["id"], r) for r in resources
        ]
        for r in resources:
            if r["resourceType"] == "Observation" and "valueQuantity" in r and rng.random() < 0.1:
                newer = copy.deepcopy(r)
                newer["meta"] = {**r.get("meta", {}), "versionId": "2"}
                newer["valueQuantity"]["value"] = round(r["valueQuantity"]["value"] * 1.1, 2)
                work.append(("PUT", "Observation", r["id"], newer))
            elif r["resourceType"] == "Condition" and rng.random() < 0.05:
                work.append(("DELETE", "Condition", r["id"], None))
        out.append(work)
    return out


class Load:
    """``senders`` threads sharing ``rate`` requests per second over the patients' requests."""

    def __init__(
        self,
        api: str,
        headers: dict[str, str],
        patients: list[list[tuple[str, str, str, Any]]],
        rate: float = 60.0,
        senders: int = 2,
        source: str = "urn:concierge:source:default",
    ) -> None:
        self.api = api
        self.headers = {**headers, "Content-Type": "application/fhir+json"}
        self.patients = list(patients)
        self.rate = rate
        self.senders = senders
        self.ledger = Ledger()
        #: Patient id -> the pseudonym it is keyed by on the facts topic: the keyed HMAC of its
        #: NHS number under the deployment's pseudonym key (fhir_adapters/pseudonym.py)
        self.pseudonyms: dict[str, str] = {}
        pseudonymiser = Pseudonymiser(Settings().pseudonym_key.get_secret_value().encode())
        for work in self.patients:
            for _, rtype, rid, resource in work:
                if rtype == "Patient" and resource is not None:
                    tokens = [f"{i['system']}|{i['value']}" for i in resource.get("identifier", ())]
                    self.pseudonyms[rid] = pseudonymiser.for_patient(tokens, source, rid)
        self._next = 0
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._stop = threading.Event()
        self._idle = [threading.Event() for _ in range(senders)]
        self._threads: list[threading.Thread] = []
        self.sent = 0

    @property
    def total_requests(self) -> int:
        return sum(len(p) for p in self.patients)

    def start(self) -> Load:
        self._running.set()
        for index in range(self.senders):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def pause(self, timeout: float = 60.0) -> None:
        """Stop sending once every sender's current request is acknowledged."""
        self._running.clear()
        for idle in self._idle:
            if not idle.wait(timeout):
                raise AssertionError("a sender did not come to rest (a request never acked)")

    def resume(self) -> None:
        for idle in self._idle:
            idle.clear()
        self._running.set()

    def finished(self) -> bool:
        with self._lock:
            return self._next >= len(self.patients)

    def wait_finished(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.finished() and time.monotonic() < deadline:
            time.sleep(0.5)
        self.pause()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for thread in self._threads:
            thread.join(30)

    def _take(self) -> list[tuple[str, str, str, Any]] | None:
        with self._lock:
            if self._next >= len(self.patients):
                return None
            work = self.patients[self._next]
            self._next += 1
            return work

    def _run(self, index: int) -> None:
        interval = self.senders / self.rate
        client = httpx.Client(base_url=self.api, headers=self.headers, timeout=30)
        while not self._stop.is_set():
            if not self._running.is_set():
                self._idle[index].set()
                self._running.wait()
                continue
            work = self._take()
            if work is None:
                self._idle[index].set()
                time.sleep(0.2)
                continue
            for method, rtype, rid, resource in work:
                self._send(client, method, rtype, rid, resource, interval)
                if self._stop.is_set():
                    return
        client.close()

    def _send(
        self,
        client: httpx.Client,
        method: str,
        rtype: str,
        rid: str,
        resource: Any,
        interval: float,
    ) -> None:
        """One request, retried until acknowledged (a source's retry loop)."""
        delay = 0.2
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if method == "PUT":
                    response = client.put(f"/fhir/{rtype}/{rid}", json=resource)
                else:
                    response = client.delete(f"/fhir/{rtype}/{rid}")
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                response = None
                status = type(exc).__name__
            with self.ledger.lock:
                self.ledger.statuses[status] += 1
            self.sent += 1
            if response is not None and response.status_code in (200, 201):
                version = None if method == "DELETE" else resource.get("meta", {}).get("versionId")
                self.ledger.record(rtype, rid, version, method == "DELETE")
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
                return
            if response is not None and response.status_code in (400, 413, 422):
                raise AssertionError(
                    f"{method} {rtype}/{rid} refused as invalid: {response.status_code} "
                    f"{response.text[:300]}"
                )
            self.ledger.failures.append((started, status))
            retry_after = None
            if response is not None and response.headers.get("Retry-After", "").isdigit():
                retry_after = float(response.headers["Retry-After"])
            time.sleep(min(retry_after or delay, 5.0))
            delay = min(delay * 2, 2.0)


__all__ = ["Acked", "Ledger", "Load", "requests_of"]
