"""The sponsor page: ``GET /sponsor``.

A static page (no data in it) whose script calls the sponsor API with a sponsor token, pasted
in or passed in the URL fragment ``#token=...`` (browsers never send the fragment to the
server, so it stays out of logs; the page keeps it in ``sessionStorage`` and removes it from
the address bar), as the clinician page does. On it a sponsor:

* builds a question without writing JSON: inclusion and exclusion steps, each a criterion of a
  kind (diagnosis or medication by SNOMED CT concept search, descendants included with ``<<``;
  an ICD-10 code prefix; a measurement with a threshold, its unit and a window in days; age;
  sex), or pastes criteria JSON, an ATLAS definition (translated by
  ``/v1/feasibility/import/atlas``) or a FHIR Group (answered by ``/ask-group``);
* asks it: the funnel, the sites, the cohort profile and each criterion's impact, drawn as
  inline SVG charts (nothing is fetched from elsewhere: it works offline); a withheld cell is
  drawn as a hatched mark reading "withheld", never as a number or a length;
* registers it as a saved question and watches its live count, the forecast (with its
  interval), the daily series and the site ranking move as patients stream in.

Every answer it asks for is charged to the organisation's query budget like any other (an
unchanged answer read again is free); the page polls the live answer every few seconds.

Mount with ``app.include_router(build_page_router())``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from .strict_page import content_security_policy, page_headers

#: The page's style, script and body: plain files beside this module (package data), so they
#: read as what they are; nothing is fetched at run time.
_ASSETS = Path(__file__).parent / "sponsor_page"

#: Seconds between polls of a saved question's live answer (the forecast: three times that).
REFRESH_SECONDS = 5

_STYLE = (_ASSETS / "page.css").read_text(encoding="utf-8")

_SCRIPT = (_ASSETS / "page.js").read_text(encoding="utf-8")

_BODY = (_ASSETS / "body.html").read_text(encoding="utf-8")


_SCRIPT_TEXT = _SCRIPT.replace("__REFRESH__", str(REFRESH_SECONDS))
PAGE = (
    "<!doctype html><html lang=en><head><meta charset=utf-8>"
    "<title>Sponsor workspace</title>"
    f"<style>{_STYLE}</style></head><body>{_BODY}<script>{_SCRIPT_TEXT}</script></body></html>"
)

#: Only this page's own script and style run; the page talks to this origin only. Element
#: styles set from the script (showing a hidden section) go through the CSSOM, which a style
#: hash allows.
CONTENT_SECURITY_POLICY = content_security_policy(_SCRIPT_TEXT, _STYLE, img_src="'self' data:")

HEADERS = page_headers(CONTENT_SECURITY_POLICY)


def build_page_router() -> APIRouter:
    """``GET /sponsor``: the page (no authentication: it holds nothing; the API checks)."""
    router = APIRouter(tags=["sponsor workspace"])

    @router.get("/sponsor", response_class=HTMLResponse, include_in_schema=False)
    def sponsor_page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=HEADERS)

    return router


__all__ = ["CONTENT_SECURITY_POLICY", "PAGE", "build_page_router"]
