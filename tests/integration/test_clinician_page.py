"""The clinician page (``GET /clinician``) in a real headless Chromium, against the real app.

The app (``concierge.api.create_app``) is served by uvicorn on a free port, over a migrated
SQLite recruitment store seeded through the service with one candidate routed to a GP. The page
gets the GP's token in the URL fragment, shows the candidate with the patient's details, approves
the invitation with a click; the database shows the change. A clinician of another site sees
nothing, and a bad token is reported as the API words it. The page is saved to
``test-artifacts/clinician-page.png``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from selenium.webdriver.common.by import By

from concierge.api import create_app
from core.auth import issue
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.rest import IngestService
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault
from recruitment.models import Invitation, InvitationEvent
from recruitment.runtime import Runtime, build_runtime
from recruitment.settings import RecruitmentSettings
from tests.browser import chromium, page_text, screenshot, wait_for
from tests.recruitment_helpers import (
    SOURCE,
    Clock,
    Identities,
    cohort,
    fresh_database,
    organization,
    patient_facts,
    practitioner,
    practitioner_key,
    recruiter_role,
    trial,
)

pytestmark = pytest.mark.integration

KEY = "page-test-token-key-0123456789abcdef"
GP1 = practitioner_key("gp1")
ADA = {
    "given": "Ada",
    "family": "Lovelace",
    "nhs_number": "9434765919",
    "birth_date": "1960-01-01",
    "phone": "07700900001",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    url: str
    runtime: Runtime
    identities: Identities

    def token(self, practitioner: str, sites: tuple[str, ...] = ()) -> str:
        return issue(KEY.encode(), "clinician", "Test practice", practitioner=practitioner,
                     sites=sites)  # fmt: skip

    def invitation(self) -> Invitation:
        with self.runtime.sessions() as session:
            (invitation,) = session.scalars(sa.select(Invitation)).all()
            return invitation

    def events(self) -> list[tuple[str, str | None, str]]:
        with self.runtime.sessions() as session:
            rows = session.execute(
                sa.select(InvitationEvent.actor, InvitationEvent.from_state,
                          InvitationEvent.to_state).order_by(InvitationEvent.id)
            )  # fmt: skip
            return [tuple(row) for row in rows]  # type: ignore[misc]


def seed(runtime: Runtime) -> None:
    """One trial at RA3 and RB1, a GP, a recruiter nurse at RB1, one patient entering at RA3."""
    with runtime.sessions.begin() as session:
        work = runtime.service.unit_of_work(session)
        work.trial("t1", trial(sites=("RA3", "RB1"), title="SGLT2 in type 2 diabetes"))
        for record in (
            practitioner("gp1"),
            practitioner("nurse"),
            organization("trust-b", "RB1"),
            recruiter_role("role-n", "nurse", "trust-b"),
        ):
            work.reference(record)
        work.facts(patient_facts("p1", gps=[GP1]))
        work.cohort("t1", "p1", cohort("t1", "p1", 1, site="RA3"))
        work.finish()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with fresh_database("sqlite", tmp_path) as url:
        runtime = build_runtime(RecruitmentSettings(url=url), url=url, channels={}, clock=Clock())
        seed(runtime)
        settings = Settings(
            home=tmp_path / "home",
            token_key=KEY,  # type: ignore[arg-type]
            kafka_bootstrap_servers="127.0.0.1:1",
            feasibility_feed=False,
            recruitment_api=False,
            surveillance_monitor=False,
            audit_anchor_seconds=0,
        )
        ingestor = Ingestor(MemoryVault(), MemorySink(), Pseudonymiser(b"p" * 32), SOURCE)
        identities = Identities(people={"p1": dict(ADA)})
        app = create_app(
            settings,
            ingest_service=IngestService(ingestor),
            recruitment=runtime,
            recruitment_identities=identities,
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            yield Served(base, runtime, identities)
        finally:
            server.should_exit = True
            thread.join(30)


def test_the_page_itself_holds_no_patient_data(served: Served) -> None:
    response = httpx.get(f"{served.url}/clinician")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert "script-src 'sha256-" in response.headers["content-security-policy"]
    for identifying in (*ADA.values(), "p1", GP1):
        assert identifying not in response.text
    assert "/v1/clinician/invitations" in response.text  # what the script calls


def test_a_gp_sees_the_candidate_arrive_and_approves_it(served: Served) -> None:
    assert served.invitation().state == "sent_to_clinician"
    with chromium() as driver:
        driver.get(f"{served.url}/clinician#token={served.token(GP1)}")
        wait_for(lambda: "Ada Lovelace" in page_text(driver), timeout=30, what="the candidate")
        text = page_text(driver)
        assert "9434765919" in text and "SGLT2 in type 2 diabetes" in text
        assert "sent to clinician" in text
        assert "token=" not in driver.current_url  # the fragment is taken off the address bar
        buttons = {
            b.get_attribute("data-action")
            for b in driver.find_elements(By.CSS_SELECTOR, "button[data-action]")
        }
        assert buttons == {"approve", "reject", "withdraw"}
        driver.find_element(By.CSS_SELECTOR, "button[data-action='approve']").click()

        def approved() -> bool:
            state = driver.find_element(By.CSS_SELECTOR, "span[data-state]")
            return state.get_attribute("data-state") == "approved"

        wait_for(approved, timeout=30, what="the page to show the invitation approved")
        assert "Patient contacted" in page_text(driver)  # the next step is offered
        assert served.invitation().state == "approved"
        actor, before, after = served.events()[-1]
        assert (before, after) == ("sent_to_clinician", "approved")
        assert actor == "clinician:Test practice"

        # A new candidate arriving while the page is open shows up at the next refresh.
        served.identities.people["p2"] = {"given": "Alan", "family": "Turing"}
        with served.runtime.sessions.begin() as session:
            work = served.runtime.service.unit_of_work(session)
            work.facts(patient_facts("p2", gps=[GP1]))
            work.cohort("t1", "p2", cohort("t1", "p2", 1, site="RA3"))
            work.finish()
        wait_for(lambda: "Alan Turing" in page_text(driver), timeout=30, what="the new candidate")
        assert "2 invitation(s)" in page_text(driver)
        path = screenshot(driver, "clinician-page")
        assert path.stat().st_size > 0


def test_a_clinician_of_another_site_sees_no_candidate(served: Served) -> None:
    nurse = practitioner_key("nurse")  # a trial recruiter, but at RB1; the patient is at RA3
    with chromium() as driver:
        driver.get(f"{served.url}/clinician#token={served.token(nurse, sites=('RB1',))}")
        wait_for(lambda: "No invitations for you." in page_text(driver), timeout=30,
                 what="the empty list")  # fmt: skip
        text = page_text(driver)
        assert "0 invitation(s), 0 candidate(s)" in text
        assert "Ada" not in text and "9434765919" not in text


def test_an_api_error_is_shown_as_the_api_words_it(served: Served) -> None:
    with chromium() as driver:
        driver.get(f"{served.url}/clinician#token=not-a-token")
        wait_for(lambda: "401" in page_text(driver), timeout=30, what="the error")
        assert "malformed token" in page_text(driver)
        assert served.invitation().state == "sent_to_clinician"
