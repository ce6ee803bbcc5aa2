"""Who may read the worker's status pages, and the audit record of every read.

The worker's web port serves three pages anyone on the host may call, ``/health`` (liveness
and processing counters), ``/readyz`` (readiness, and what it waits for) and ``/metrics``
(Prometheus: lag per partition, messages in and out; :mod:`.metrics`): none carries a
pseudonym, a fact or a count of patients. Every other page (``/state/digest``,
``/state/patients/{pseudonym}``, ``/state/cohorts``, ``/state/devices``) shows patient-level
data or exact counts, so it needs an admin bearer token (``concierge token create --role admin``,
checked by :class:`core.auth.TokenVerifier` exactly as the API checks it: keys by ``kid``, an
external provider's keys, the revocation list), and each request
to one of them, refused or answered, leaves a record in the audit log the API writes
(``CONCIERGE_AUDIT_URL``), naming the pseudonyms a patient page served. An answer is sent only
once its record is written: when the audit log cannot be written the page answers 503.

The pages run inside Faust's web server (aiohttp), not FastAPI, so the API's dependencies and
middleware do not apply here; this module does the same checks for those pages.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core.audit import AuditLog
from core.auth import Principal, TokenCheckUnavailable, TokenError, TokenVerifier
from core.settings import Settings

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
#: The pages that need no token: liveness and readiness, no patient data.
OPEN_PAGES = ("/health", "/healthz", "/readyz", "/metrics")
#: Attempts at writing one audit record (another process, the API, appends to the same log).
AUDIT_ATTEMPTS = 3


@dataclass(frozen=True)
class Refusal:
    """An answer other than the page: 401, 403 or 503, as problem+json."""

    status: int
    detail: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        title = {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}
        return {
            "type": "about:blank",
            "title": title.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }


class AuditUnavailable(RuntimeError):
    """The audit record of a read could not be written: the read is not served."""


class PageAccess:
    """Admin tokens for the worker's pages, and their audit records."""

    def __init__(self, settings: Settings, verifier: TokenVerifier | None = None) -> None:
        # the API's whole check: this site's keys by kid, the provider's, the revocation list
        self.verifier = verifier or TokenVerifier.from_settings(settings)
        self.audit_url = settings.resolved_audit_url()
        self._audit: AuditLog | None = None
        self._opening = threading.Lock()
        # One thread of its own: audit writes never queue behind a partition rebuild on the
        # event loop's default executor, and they are serialised anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page-audit")

    def authorise(self, authorization: str | None) -> tuple[Principal | None, Refusal | None]:
        """The caller of a protected page, and the refusal when it may not read it."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, Refusal(
                401, "a bearer token of role admin is required", {"WWW-Authenticate": "Bearer"}
            )
        try:
            principal = self.verifier.verify(token.strip())
        except TokenCheckUnavailable as exc:
            return None, Refusal(503, str(exc), {"Retry-After": "2"})
        except TokenError as exc:
            return None, Refusal(401, str(exc), {"WWW-Authenticate": "Bearer"})
        if principal.role != "admin":
            return principal, Refusal(
                403, f"the worker's state pages need the role admin; you are {principal.role}"
            )
        return principal, None

    def audit_log(self) -> AuditLog:
        with self._opening:
            if self._audit is None:
                self._audit = AuditLog(self.audit_url)
            return self._audit

    def record(
        self,
        principal: Principal | None,
        action: str,
        status: int,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append the request's audit record (as the API's middleware writes them); retried a
        few times, since the API appends to the same log from another process."""
        body = {"status": status, "service": "worker", **(detail or {})}
        for attempt in range(1, AUDIT_ATTEMPTS + 1):
            try:
                self.audit_log().append(
                    actor=principal.sub if principal else "anonymous",
                    role=principal.role if principal else "anonymous",
                    org=principal.org if principal else "",
                    action=action,
                    detail=body,
                )
                return
            except (SQLAlchemyError, OSError) as exc:
                if attempt == AUDIT_ATTEMPTS:
                    log.error("audit record of %s not written: %s", action, type(exc).__name__)
                    raise AuditUnavailable(type(exc).__name__) from exc
                time.sleep(0.05 * attempt)

    async def record_async(
        self,
        principal: Principal | None,
        action: str,
        status: int,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """:meth:`record` off the event loop; it completes before the answer is sent."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.record, principal, action, status, detail)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._audit is not None:
            self._audit.engine.dispose()


__all__ = ["OPEN_PAGES", "PROBLEM", "AuditUnavailable", "PageAccess", "Refusal"]
