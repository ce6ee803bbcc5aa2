"use strict";
const REFRESH_MS = __REFRESH__ * 1000;
const KINDS = {
  "snomed": "Diagnosis (SNOMED CT concept)",
  "medication": "Medication (SNOMED CT / dm+d concept)",
  "icd10": "Diagnosis (ICD-10 code prefix)",
  "observation": "Measurement with a threshold",
  "age": "Age",
  "sex": "Sex"
};
const MEASURES = {
  "hba1c": ["HbA1c", ["mmol/mol", "%"]], "egfr": ["eGFR", ["mL/min/{1.73_m2}"]],
  "ldl_cholesterol": ["LDL cholesterol", ["mmol/L"]],
  "total_cholesterol": ["Total cholesterol", ["mmol/L"]], "bmi": ["BMI", ["kg/m2"]],
  "systolic_bp": ["Systolic BP", ["mm[Hg]"]], "diastolic_bp": ["Diastolic BP", ["mm[Hg]"]]
};
let token = null, steps = [], imported = null, saved = null, timer = null, slow = 0;
let lastQuestion = null;

function $(id) { return document.getElementById(id); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined)
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const SVGNS = "http://www.w3.org/2000/svg";
function sv(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function showError(message) { const e = $("error"); e.textContent = message; e.style.display = message ? "block" : "none"; }
function status(text) { $("status").textContent = text; }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = null; try { data = JSON.parse(text); } catch (e) { data = text; }
  if (!response.ok) {
    let detail = data && data.detail !== undefined ? data.detail : data;
    if (detail && typeof detail === "object") detail = detail.message ? detail.message + (detail.waiting_for ? ": " + detail.waiting_for.join("; ") : "") : JSON.stringify(detail);
    const error = new Error(response.status + " " + (data && data.title ? data.title + ": " : "") + detail);
    error.status = response.status; throw error;
  }
  return data;
}

// ---------------------------------------------------------------- the question builder
function newStep(kind) { return { kind: kind || "inclusion", type: "snomed", codes: [], min: "", max: "", op: "ge", value: "", unit: "", concept: "hba1c", days: "365", prefix: "", sexes: ["female"] }; }
function renderSteps() {
  const list = $("steps"); list.replaceChildren();
  steps.forEach((step, i) => list.append(stepCard(step, i)));
}
function stepCard(step, i) {
  const card = el("div", { class: "step " + step.kind, id: "step-" + i });
  const kind = el("select", { id: "step-" + i + "-kind" }, el("option", { value: "inclusion", text: "Include" }), el("option", { value: "exclusion", text: "Exclude" }));
  kind.value = step.kind; kind.onchange = () => { step.kind = kind.value; renderSteps(); };
  const type = el("select", { id: "step-" + i + "-type" });
  for (const [k, v] of Object.entries(KINDS)) type.append(el("option", { value: k, text: v }));
  type.value = step.type; type.onchange = () => { step.type = type.value; step.codes = []; renderSteps(); };
  const remove = el("button", { text: "Remove", id: "step-" + i + "-remove" }); remove.onclick = () => { steps.splice(i, 1); renderSteps(); };
  card.append(el("div", { class: "row" }, el("strong", { text: "Step " + (i + 1) }), kind, type, remove));
  const body = el("div", {});
  if (step.type === "snomed" || step.type === "medication") {
    const q = el("input", { id: "step-" + i + "-search", placeholder: "search concepts, e.g. type 2 diabetes" });
    const go = el("button", { text: "Search", id: "step-" + i + "-go" });
    const desc = el("input", { type: "checkbox", id: "step-" + i + "-desc" }); desc.checked = step.descendants !== false;
    desc.onchange = () => { step.descendants = desc.checked; };
    const results = el("div", { class: "results", id: "step-" + i + "-results" });
    go.onclick = async () => {
      results.replaceChildren(el("span", { class: "muted", text: "searching..." }));
      try {
        const found = await api("GET", "/v1/terminology/search?limit=8&q=" + encodeURIComponent(q.value));
        results.replaceChildren();
        if (!found.results.length) results.append(el("span", { class: "muted", text: "no concept found" }));
        for (const c of found.results) {
          const pick = el("button", { class: "pick", text: c.term + " (" + c.code + ", " + (c.descendants || 0) + " descendants)" });
          pick.onclick = () => { step.codes.push({ id: String(c.code), term: c.term, descendants: desc.checked, count: c.descendants || 0 }); renderSteps(); };
          results.append(pick);
        }
      } catch (e) { results.replaceChildren(el("span", { class: "muted", text: e.message })); }
    };
    q.onkeydown = (ev) => { if (ev.key === "Enter") go.onclick(); };
    body.append(el("div", { class: "row" }, q, go, el("label", {}, desc, " include descendants (<<)")), results);
  } else if (step.type === "icd10") {
    const p = el("input", { id: "step-" + i + "-prefix", placeholder: "E11", value: step.prefix });
    p.oninput = () => { step.prefix = p.value.trim(); };
    body.append(el("label", {}, "ICD-10 code prefix ", p));
  } else if (step.type === "observation") {
    const concept = el("select", { id: "step-" + i + "-concept" });
    for (const [k, v] of Object.entries(MEASURES)) concept.append(el("option", { value: k, text: v[0] }));
    concept.value = step.concept;
    const op = el("select", { id: "step-" + i + "-op" });
    for (const o of [["ge", "at least"], ["gt", "over"], ["le", "at most"], ["lt", "under"]]) op.append(el("option", { value: o[0], text: o[1] }));
    op.value = step.op;
    const value = el("input", { class: "num", id: "step-" + i + "-value", value: step.value });
    const unit = el("select", { id: "step-" + i + "-unit" });
    const units = () => { unit.replaceChildren(); for (const u of MEASURES[concept.value][1]) unit.append(el("option", { value: u, text: u })); if (MEASURES[concept.value][1].includes(step.unit)) unit.value = step.unit; step.unit = unit.value; };
    units();
    const days = el("input", { class: "num", id: "step-" + i + "-days", value: step.days });
    concept.onchange = () => { step.concept = concept.value; units(); };
    op.onchange = () => { step.op = op.value; }; value.oninput = () => { step.value = value.value; };
    unit.onchange = () => { step.unit = unit.value; }; days.oninput = () => { step.days = days.value; };
    body.append(el("div", { class: "row" }, concept, op, value, unit, el("span", { text: "in the last" }), days, el("span", { text: "days" })));
  } else if (step.type === "age") {
    const min = el("input", { class: "num", id: "step-" + i + "-min", value: step.min });
    const max = el("input", { class: "num", id: "step-" + i + "-max", value: step.max });
    min.oninput = () => { step.min = min.value; }; max.oninput = () => { step.max = max.value; };
    body.append(el("div", { class: "row" }, "from", min, "to", max, "years"));
  } else if (step.type === "sex") {
    const row = el("div", { class: "row" });
    for (const s of ["female", "male", "other", "unknown"]) {
      const box = el("input", { type: "checkbox", id: "step-" + i + "-sex-" + s }); box.checked = step.sexes.includes(s);
      box.onchange = () => { step.sexes = box.checked ? [...step.sexes, s] : step.sexes.filter(x => x !== s); };
      row.append(el("label", {}, box, " " + s));
    }
    body.append(row);
  }
  if (step.codes.length) {
    const chips = el("div", { id: "step-" + i + "-codes" });
    step.codes.forEach((c, j) => {
      const x = el("button", { text: "x" }); x.onclick = () => { step.codes.splice(j, 1); renderSteps(); };
      chips.append(el("span", { class: "chip" }, (c.descendants ? "<< " : "") + c.id + " " + c.term + (c.descendants ? " (+" + c.count + " descendants)" : "") + " ", x));
    });
    body.append(chips);
  }
  card.append(body);
  return card;
}
function criterionOf(step, i) {
  const n = (x) => x === "" || x === null || x === undefined ? null : Number(x);
  if (step.type === "snomed" || step.type === "medication") {
    if (!step.codes.length) throw new Error("step " + (i + 1) + ": pick at least one concept");
    const codes = step.codes.map(c => ({ system: "snomed", ecl: (c.descendants ? "<< " : "") + c.id + " |" + c.term.replace(/\|/g, "") + "|" }));
    return { type: step.type === "snomed" ? "condition" : "medication", codes };
  }
  if (step.type === "icd10") {
    if (!step.prefix) throw new Error("step " + (i + 1) + ": an ICD-10 prefix is needed");
    return { type: "condition", codes: [{ system: "icd10", prefix: step.prefix }] };
  }
  if (step.type === "observation") {
    if (step.value === "" || isNaN(Number(step.value))) throw new Error("step " + (i + 1) + ": a threshold value is needed");
    const c = { type: "observation", codes: [{ concept: step.concept }], value: { [step.op]: Number(step.value), unit: step.unit } };
    if (n(step.days)) c.window = { days_before: n(step.days) };
    return c;
  }
  if (step.type === "age") {
    const c = { type: "age" }; if (n(step.min) !== null) c.min = n(step.min); if (n(step.max) !== null) c.max = n(step.max);
    return c;
  }
  if (step.type === "sex") return { type: "sex", values: step.sexes };
  throw new Error("unknown kind");
}
function question() {
  if (imported) return imported;
  const inclusion = [], exclusion = [];
  steps.forEach((s, i) => (s.kind === "inclusion" ? inclusion : exclusion).push(criterionOf(s, i)));
  if (!inclusion.length) throw new Error("a question needs at least one inclusion step");
  return { schema: "concierge.criteria/1", title: $("title").value || "Untitled question", inclusion, exclusion };
}

// ---------------------------------------------------------------- charts (inline SVG)
function svgRoot(width, height, label) {
  const root = sv("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": label });
  const defs = sv("defs"); const p = sv("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" });
  p.append(sv("rect", { width: 6, height: 6, fill: "#f3e3c3" }), sv("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#8a5a00", "stroke-width": 2 }));
  defs.append(p); root.append(defs); return root;
}
// Horizontal bars: rows of [label, cell, secondCell?]; a withheld cell is a hatched mark.
function bars(rows, label, opts) {
  opts = opts || {};
  const width = opts.width || 560, lw = opts.labelWidth || 190, rh = 20, height = rows.length * rh + 8;
  const root = svgRoot(width, height, label);
  const max = Math.max(1, ...rows.map(r => r[1] && !r[1].suppressed ? r[1].value || 0 : 0));
  const scale = (width - lw - 90) / max;
  rows.forEach((r, i) => {
    const y = 4 + i * rh, cell = r[1];
    root.append(sv("text", { x: 0, y: y + 14 }, r[0].length > 30 ? r[0].slice(0, 29) + "..." : r[0]));
    if (!cell) return;
    if (cell.suppressed) {
      root.append(sv("rect", { x: lw, y: y + 3, width: 50, height: 14, class: "w" }));
      root.append(sv("text", { x: lw + 56, y: y + 14, class: "withheld" }, "withheld"));
    } else {
      const w = Math.max(1, (cell.value || 0) * scale);
      root.append(sv("rect", { x: lw, y: y + 3, width: w, height: 14, class: opts.cls || "bar" }));
      root.append(sv("text", { x: lw + w + 5, y: y + 14 }, cell.display));
    }
  });
  return root;
}
function cellText(cell) {
  if (!cell) return el("span", { class: "muted", text: "-" });
  return cell.suppressed ? el("span", { class: "withheld-text", text: "withheld" }) : el("span", { text: cell.display });
}
function series(points, label) {
  // the caption has a strip of its own above the plot (top), so no point is drawn under it
  const width = 560, height = 170, left = 40, bottom = 20, top = 28;
  const root = svgRoot(width, height, label);
  const shown = points.filter(p => !p.suppressed);
  const max = Math.max(1, ...shown.map(p => p.value));
  const x = (i) => left + (points.length > 1 ? i * (width - left - 10) / (points.length - 1) : (width - left) / 2);
  const y = (v) => height - bottom - v * (height - bottom - top) / max;
  root.append(sv("text", { x: left, y: 12, class: "muted" }, "hatched: withheld day"));
  root.append(sv("line", { x1: left, y1: y(max), x2: width - 5, y2: y(max), class: "grid" }));
  root.append(sv("line", { x1: left, y1: height - bottom, x2: width - 5, y2: height - bottom, class: "axis" }));
  root.append(sv("text", { x: 0, y: y(max) + 4 }, String(max)));
  let d = "", pen = false;
  points.forEach((p, i) => {
    if (p.suppressed) {
      root.append(sv("rect", { x: x(i) - 3, y: height - bottom - 14, width: 6, height: 14, class: "w" }));
      pen = false; return;
    }
    d += (pen ? "L" : "M") + x(i).toFixed(1) + "," + y(p.value).toFixed(1) + " "; pen = true;
    root.append(sv("circle", { cx: x(i), cy: y(p.value), r: 3, class: "bar" }));
  });
  if (d) root.append(sv("path", { d: d.trim(), class: "line" }));
  if (points.length) {
    root.append(sv("text", { x: left, y: height - 4 }, points[0].day));
    root.append(sv("text", { x: width - 80, y: height - 4 }, points[points.length - 1].day));
  }
  return root;
}

// ---------------------------------------------------------------- answers
function showAnswer(answer) {
  $("answer").style.display = "block";
  $("total").replaceChildren(cellText(answer.total));
  $("answer-meta").textContent = "question " + answer.question + ", evaluated at " + answer.evaluated_at;
  const funnel = answer.funnel.map(r => [r.label, r.remaining]);
  $("funnel").replaceChildren(bars(funnel, "attrition funnel"));
  const sites = Object.entries(answer.by_site).sort((a, b) => (b[1].value || 0) - (a[1].value || 0));
  $("sites").replaceChildren(bars(sites.map(([s, c]) => [s + (answer.sites[s] && answer.sites[s].name ? " " + answer.sites[s].name : ""), c]), "eligible by site"));
  $("notes").replaceChildren(...(answer.notes || []).map(n => el("li", { text: n })));
  $("rules").replaceChildren(...(answer.rules || []).map(n => el("li", { text: n })));
  const ranked = sites.slice(0, 3).map(([s]) => s).filter(s => s !== "unresolved site");
  if (!$("sites-input").value) $("sites-input").value = ranked.join(",");
}
function showProfile(body) {
  const p = body.profile, rows = [];
  for (const s of p.sexes) for (const b of p.age_bands) rows.push([s + " " + b, p.age_by_sex[s][b]]);
  const keep = rows.filter(r => !(r[1].suppressed && r[0].startsWith("unknown")));
  $("profile").replaceChildren(bars(keep, "age bands by sex", { labelWidth: 110 }),
    el("h3", { text: "By region" }), bars(Object.entries(p.by_region), "by region", { labelWidth: 190 }));
}
function showImpact(body) {
  $("impact").replaceChildren(bars(body.impact.map(r => [(r.kind === "exclusion" ? "without exclusion: " : "without: ") + r.label, r.without_it]), "criterion impact", { labelWidth: 260, cls: "bar2" }),
    el("p", { class: "muted", text: "the cohort with each step removed and the others kept; the cohort now: " + (body.total.suppressed ? "withheld" : body.total.display) }));
}
async function ask() {
  showError(""); status("asking...");
  let q;
  try { q = question(); } catch (e) { showError(e.message); status(""); return; }
  lastQuestion = q;
  try {
    const answer = q.resourceType === "Group" ? await api("POST", "/v1/feasibility/ask-group", q) : await api("POST", "/v1/feasibility/ask", q);
    showAnswer(answer);
    if (q.resourceType !== "Group") {
      const [profile, impact] = await Promise.all([api("POST", "/v1/feasibility/profile", q), api("POST", "/v1/feasibility/impact", q)]);
      showProfile(profile); showImpact(impact);
    }
    status("answered"); $("register").disabled = q.resourceType === "Group";
  } catch (e) { showError(e.message); status(""); }
}
async function importText() {
  showError("");
  let data; try { data = JSON.parse($("paste").value); } catch (e) { showError("not JSON: " + e.message); return; }
  try {
    if (data.resourceType === "Group") { imported = data; }
    else if (data.ConceptSets || data.PrimaryCriteria || data.expression) {
      const result = await api("POST", "/v1/feasibility/import/atlas", data.expression || data);
      imported = result.criteria;
    } else { await api("POST", "/v1/feasibility/check", data); imported = data; }
    $("imported").textContent = "Imported " + (imported.resourceType === "Group" ? "a FHIR Group (answered without profile or impact)" : "criteria: " + (imported.title || "") + ", " + ((imported.inclusion || []).length + (imported.exclusion || []).length) + " steps") + ". The builder is set aside.";
    $("unimport").style.display = "inline";
  } catch (e) { showError(e.message); }
}
async function register() {
  showError("");
  const id = $("trial-id").value.trim();
  const sites = $("sites-input").value.split(",").map(s => s.trim()).filter(Boolean);
  const target = Number($("target").value) || null;
  try {
    const q = lastQuestion || question();
    const record = await api("POST", "/v1/feasibility/saved-questions", { id, title: q.title || id, criteria: q, recruiting_sites: sites, target });
    saved = record.id; $("live").style.display = "block"; $("live-title").textContent = record.title + " (" + record.id + ", version " + record.version + ")";
    slow = 0; poll(); $("live").scrollIntoView();
  } catch (e) { showError(e.message); }
}
function showLive(answer) {
  $("live-count").replaceChildren(cellText(answer.total));
  $("live-meta").textContent = "stream time " + (answer.as_of && answer.as_of.stream_time || answer.evaluated_at);
}
function showForecast(body) {
  const f = body.forecast;
  const text = f.forecast ? "target " + body.target.target + " reached about " + f.projected_date + " (90% interval " + (f.interval[0] || "?") + " to " + (f.interval[1] || "beyond " + Math.round(f.horizon_days / 365) + " years") + ")" : "no forecast: " + f.reason;
  $("forecast").textContent = text + (f.conversion_known === false && f.forecast ? "; conversion not observed yet" : "");
  $("series").replaceChildren(series(body.series, "live count by day"));
}
function showSites(body) {
  const table = el("table", { id: "ranking" }, el("tr", {}, ...["rank", "site", "eligible now", "new / 30 days", "lost: opt-outs", "lost: limits", "consent", "enrolment", "target reached (90% interval)"].map(h => el("th", { text: h }))));
  for (const r of body.sites.slice(0, 12)) {
    const p = r.projection || {};
    const when = p.forecast ? p.projected_date + " (" + (p.interval[0] || "?") + " to " + (p.interval[1] || "later") + ")" : (p.reason || "");
    table.append(el("tr", {}, el("td", { text: r.rank || "-" }), el("td", { text: r.site + (r.recruiting ? " *" : "") }), el("td", {}, cellText(r.eligible_now)), el("td", {}, cellText(r.new_per_30_days)), el("td", {}, cellText(r.lost_to_opt_outs)), el("td", {}, cellText(r.lost_to_limits)), el("td", {}, cellText(r.consent_rate)), el("td", {}, cellText(r.enrolment_rate)), el("td", { text: when })));
  }
  $("ranking-box").replaceChildren(table, el("p", { class: "muted", text: "* recruiting; ranked by projected time for the site alone to reach the trial's target" }));
}
async function poll() {
  if (timer) clearTimeout(timer);
  if (!saved) return;
  try {
    showLive(await api("GET", "/v1/feasibility/saved-questions/" + saved + "/answer"));
    if (slow % 3 === 0) {
      showForecast(await api("GET", "/v1/feasibility/saved-questions/" + saved + "/forecast"));
      showSites(await api("GET", "/v1/feasibility/saved-questions/" + saved + "/sites"));
    }
    slow += 1; status("live, updated " + new Date().toLocaleTimeString()); showError("");
  } catch (e) {
    // a 503 says which view is behind and why: show it, so a wait that does not end is explained
    status(e.status === 503 ? "waiting for the stream (" + e.message.replace(/^503 /, "") + ")" : "");
    if (e.status !== 503) showError(e.message);
  }
  timer = setTimeout(poll, REFRESH_MS);
}
// Open a saved question (#saved=ID): its criteria are answered as the builder's would be, and
// its live count, forecast and site ranking are followed.
async function openSaved(id) {
  saved = id; $("live").style.display = "block"; $("live-title").textContent = id; slow = 0;
  try {
    const record = await api("GET", "/v1/feasibility/saved-questions/" + encodeURIComponent(id));
    $("live-title").textContent = record.title + " (" + record.id + ", version " + record.version + ")";
    imported = record.criteria; $("paste").value = JSON.stringify(record.criteria, null, 2);
    $("trial-id").value = record.id; $("target").value = record.target || "";
    $("sites-input").value = (record.recruiting_sites || []).join(",");
    $("imported").textContent = "The criteria of saved question " + record.id + ". The builder is set aside.";
    $("unimport").style.display = "inline";
    await ask();
  } catch (e) { showError(e.message); }
  poll();
}

function start() {
  const fromFragment = new URLSearchParams(location.hash.slice(1));
  const given = fromFragment.get("token");
  if (given) { sessionStorage.setItem("sponsor-token", given); history.replaceState(null, "", location.pathname + location.search); }
  token = sessionStorage.getItem("sponsor-token");
  $("token").value = token ? "(token set)" : "";
  $("token").onchange = () => { token = $("token").value.trim(); sessionStorage.setItem("sponsor-token", token); };
  steps = [newStep("inclusion")]; renderSteps();
  $("add-inclusion").onclick = () => { steps.push(newStep("inclusion")); renderSteps(); };
  $("add-exclusion").onclick = () => { const s = newStep("exclusion"); steps.push(s); renderSteps(); };
  $("ask").onclick = ask; $("register").onclick = register; $("import").onclick = importText;
  $("unimport").onclick = () => { imported = null; $("imported").textContent = ""; $("unimport").style.display = "none"; };
  const open = fromFragment.get("saved"); if (open && token) openSaved(open);
}
document.addEventListener("DOMContentLoaded", start);
