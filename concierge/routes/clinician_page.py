"""A small clinician page: ``GET /clinician``.

The page itself is static and carries no patient data. Its script reads a clinician token (pasted
in, or passed in the URL fragment ``#token=...``, which browsers never send to the server, so it
stays out of server and proxy logs), calls the clinician API under ``/v1/clinician`` with it
(every read of an identity is audited there), shows the clinician's invitations and the
candidates still waiting (held or unrouted), refreshes every few seconds, and offers the
transitions each invitation allows. API errors are shown as the API words them.

The token is kept in ``sessionStorage`` (this tab only) and removed from the address bar.

Mount with ``app.include_router(build_page_router())``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from .strict_page import content_security_policy, page_headers

#: Seconds between refreshes of the lists.
REFRESH_SECONDS = 5

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2733; background: #f4f6f8; }
header { background: #005eb8; color: #fff; padding: 0.8rem 1.5rem; display: flex;
         align-items: center; gap: 1rem; flex-wrap: wrap; }
header h1 { font-size: 1.2rem; margin: 0; flex: 1; }
header input { width: 22rem; padding: 0.3rem; }
main { padding: 1rem 1.5rem; }
section { background: #fff; border-radius: 6px; padding: 0.5rem 1rem 1rem; margin-bottom: 1rem;
          box-shadow: 0 1px 2px rgba(0,0,0,0.1); }
h2 { font-size: 1.05rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.35rem 0.5rem; border-bottom: 1px solid #e3e7eb;
         vertical-align: top; }
th { background: #eef2f5; }
.state { font-weight: 600; padding: 0.1rem 0.4rem; border-radius: 4px; background: #e8edf2;
         white-space: nowrap; }
.state-approved, .state-enrolled, .state-consented { background: #d7f0dd; }
.state-rejected, .state-withdrawn, .state-expired, .state-declined,
.state-screen_failed { background: #f6dcdc; }
.muted { color: #5f6b77; font-size: 0.85rem; }
button { margin: 0 0.3rem 0.3rem 0; padding: 0.25rem 0.6rem; cursor: pointer; }
button.approve { background: #007f3b; color: #fff; border: 1px solid #006030; }
button.reject, button.withdraw { background: #fff; color: #b3001b; border: 1px solid #b3001b; }
#error { display: none; background: #fde2e2; color: #8a0014; border: 1px solid #e0a0a0;
         padding: 0.6rem 1rem; margin: 1rem 1.5rem 0; border-radius: 6px; }
#status { font-size: 0.85rem; }
"""

_SCRIPT = """
"use strict";
const REFRESH_MS = __REFRESH__ * 1000;
const LABELS = {
  "approve": "Approve contact", "reject": "Decline contact", "contacted": "Patient contacted",
  "interested": "Interested", "declined": "Patient declined", "no-response": "No response",
  "consented": "Consented", "enrolled": "Enrolled", "screen-failed": "Screen failed",
  "withdraw": "Withdraw"
};
let token = null;
let timer = null;
let busy = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value; else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.style.display = message ? "block" : "none";
}

function setStatus(message) {
  document.getElementById("status").textContent = message;
}

async function problem(response) {
  let text = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    text = response.status + " " + (body.title || response.statusText) +
      (body.detail !== undefined ? ": " + detail : "");
  } catch (e) { /* not JSON */ }
  return text;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, {
    headers: Object.assign({"Authorization": "Bearer " + token,
                            "Content-Type": "application/json"}, (options || {}).headers),
    cache: "no-store"
  }));
  if (!response.ok) throw new Error(await problem(response));
  return response.json();
}

function patientCell(patient) {
  if (!patient) return el("td", {class: "muted", text: "identity not available"});
  return el("td", {},
    el("div", {class: "name", text: patient.name || "(no name)"}),
    el("div", {class: "muted", text: "NHS " + (patient.nhs_number || "-") +
                                      " \\u00b7 born " + (patient.birth_date || "-") +
                                      (patient.phone ? " \\u00b7 " + patient.phone : "")}));
}

function trialCell(item) {
  return el("td", {}, el("div", {text: item.trial_title || item.trial}),
            el("div", {class: "muted", text: item.trial + " \\u00b7 site " + item.site}));
}

function when(text) {
  return text ? new Date(text).toLocaleString() : "";
}

function invitationRow(inv) {
  const actions = el("td", {class: "actions"});
  for (const action of inv.allowed_actions) {
    const button = el("button", {class: action, "data-action": action, "data-invitation": inv.id,
                                 type: "button", text: LABELS[action] || action});
    button.addEventListener("click", () => act(inv, action, button));
    actions.append(button);
  }
  if (!inv.allowed_actions.length) actions.append(el("span", {class: "muted", text: "closed"}));
  return el("tr", {"data-invitation": inv.id},
    patientCell(inv.patient), trialCell(inv),
    el("td", {}, el("span", {class: "state state-" + inv.state, "data-state": inv.state,
                             text: inv.state.replace(/_/g, " ")})),
    el("td", {class: "muted", text: when(inv.state_changed_at)}),
    actions);
}

function candidateRow(c) {
  const reasons = (c.held_reasons || []).map(h => h.reason).join("; ");
  return el("tr", {"data-candidate": c.id},
    patientCell(c.patient), trialCell(c),
    el("td", {}, el("span", {class: "state state-" + c.status, text: c.status})),
    el("td", {class: "muted", text: reasons || c.routing_reason || ""}));
}

function fill(id, rows, empty, columns) {
  const body = document.getElementById(id);
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", {colspan: String(columns), class: "muted", text: empty}))]));
}

async function refresh() {
  if (!token || busy) return;
  try {
    const [invitations, candidates] = await Promise.all([
      api("/v1/clinician/invitations?limit=100"),
      api("/v1/clinician/candidates?limit=100")
    ]);
    fill("invitations", invitations.items.map(invitationRow), "No invitations for you.", 5);
    const waiting = candidates.items.filter(c => !c.invitation);
    fill("candidates", waiting.map(candidateRow), "No candidates waiting.", 4);
    document.getElementById("counts").textContent =
      invitations.count + " invitation(s), " + candidates.count + " candidate(s)";
    setStatus("Updated " + new Date().toLocaleTimeString());
    showError("");
  } catch (error) {
    showError("Could not load your candidates: " + error.message);
  }
}

async function act(inv, action, button) {
  busy = true;
  button.disabled = true;
  try {
    const done = await api("/v1/clinician/invitations/" + encodeURIComponent(inv.id) + "/" +
                           action, {method: "POST", body: JSON.stringify({version: inv.version})});
    setStatus((LABELS[action] || action) + ": now " + done.state.replace(/_/g, " "));
    showError("");
  } catch (error) {
    showError((LABELS[action] || action) + " failed: " + error.message);
  } finally {
    busy = false;
    button.disabled = false;
    await refresh();
  }
}

function start(value) {
  token = (value || "").trim();
  if (!token) { showError("Paste your clinician token to see your candidates."); return; }
  sessionStorage.setItem("clinician-token", token);
  document.getElementById("token").value = "";
  document.getElementById("signed-in").textContent = "Token set";
  if (timer) clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
  refresh();
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start(document.getElementById("token").value);
});
document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem("clinician-token");
  token = null;
  if (timer) clearInterval(timer);
  fill("invitations", [], "Signed out.", 5);
  fill("candidates", [], "Signed out.", 4);
  document.getElementById("signed-in").textContent = "";
  setStatus("");
});

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  history.replaceState(null, "", location.pathname + location.search);  // off the address bar
  start(fragment.get("token"));
} else if (sessionStorage.getItem("clinician-token")) {
  start(sessionStorage.getItem("clinician-token"));
} else {
  showError("Paste your clinician token to see your candidates.");
}
""".replace("__REFRESH__", str(REFRESH_SECONDS))

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Trial candidates - clinician view</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>Trial candidates for your patients</h1>
  <form id="token-form" autocomplete="off">
    <input id="token" type="password" placeholder="Paste your clinician token"
           aria-label="Clinician token">
    <button type="submit">Use token</button>
    <button type="button" id="sign-out">Sign out</button>
  </form>
  <span id="signed-in"></span>
</header>
<div id="error" role="alert"></div>
<main>
  <p class="muted"><span id="counts"></span> <span id="status"></span>
     (refreshes every __REFRESH__ s)</p>
  <section>
    <h2>Invitations</h2>
    <table>
      <thead><tr><th>Patient</th><th>Trial</th><th>State</th><th>Changed</th>
                 <th>Actions</th></tr></thead>
      <tbody id="invitations"></tbody>
    </table>
  </section>
  <section>
    <h2>Candidates waiting (held or without a clinician)</h2>
    <table>
      <thead><tr><th>Patient</th><th>Trial</th><th>Status</th><th>Why</th></tr></thead>
      <tbody id="candidates"></tbody>
    </table>
  </section>
</main>
<script>__SCRIPT__</script>
</body>
</html>
"""

PAGE = (
    _BODY.replace("__STYLE__", _STYLE)
    .replace("__SCRIPT__", _SCRIPT)
    .replace("__REFRESH__", str(REFRESH_SECONDS))
)


#: Only this page's own script and style run; the page talks to this origin only.
CONTENT_SECURITY_POLICY = content_security_policy(_SCRIPT, _STYLE, img_src="'self'")

HEADERS = page_headers(CONTENT_SECURITY_POLICY)


def build_page_router() -> APIRouter:
    """``GET /clinician``: the page (no authentication: it holds nothing; the API checks)."""
    router = APIRouter(tags=["clinician"])

    @router.get("/clinician", response_class=HTMLResponse, include_in_schema=False)
    def clinician_page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=HEADERS)

    return router


__all__ = ["CONTENT_SECURITY_POLICY", "PAGE", "build_page_router"]
