// spade-edge station page. Plain JavaScript, no framework, no network beyond this server.
// Every value that comes from the server reaches the DOM through textContent or setAttribute,
// never innerHTML, so a part id like "<img onerror=...>" shows as text.
"use strict";

const MAX_CARDS = 12;
const MAX_POINTS = 500;
const TOKEN_KEY = "spade-edge-token";

const state = {
  lastId: 0,
  threshold: null,
  points: [], // {t: ms, score, anomalous}
  gallery: null,
  current: null, // result shown in the review dialog
  pendingRollback: null, // version chosen before the token was given
  es: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(2);
  return x.toFixed(a >= 100 ? 1 : digits);
}

function verdictOf(r) {
  if (r.anomalous === true) return { cls: "nok", word: "REJECT" };
  if (r.anomalous === false) return { cls: "ok", word: "GOOD" };
  return { cls: "unknown", word: "NO THRESHOLD" };
}

function timeOf(r) {
  const t = r.time ? Date.parse(r.time) : NaN;
  return Number.isNaN(t) ? Date.now() : t;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });
}

async function api(path, opts = {}) {
  const res = await fetch(path, Object.assign({ cache: "no-store" }, opts));
  let body = null;
  const type = res.headers.get("content-type") || "";
  if (type.includes("json")) {
    try { body = await res.json(); } catch (_) { body = null; }
  }
  return { ok: res.ok, status: res.status, body };
}

// GET a JSON endpoint: its body, or null when it failed (the page keeps what it shows).
async function getBody(path) {
  const r = await api(path).catch(() => null);
  return r && r.ok && r.body ? r.body : null;
}

// GET /v1/results?QUERY: the result rows, [] when it failed.
async function getResults(query) {
  const body = await getBody(`/v1/results?${query}`);
  if (!body) return [];
  return Array.isArray(body) ? body : body.results || [];
}

// fn runs at most once per `ms` however often it is asked for (a burst of results).
function debounced(fn, ms) {
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
}

function errorText(r) {
  if (r.body && typeof r.body === "object") {
    const e = r.body.error ?? r.body.detail;
    if (typeof e === "string") return e;
    if (e) return JSON.stringify(e);
  }
  return `HTTP ${r.status}`;
}

// ---------------------------------------------------------------- cards
function makeCard(r) {
  const node = $("card-tpl").content.firstElementChild.cloneNode(true);
  const v = verdictOf(r);
  node.classList.add(v.cls);
  node.dataset.id = String(r.id);
  const btn = node.querySelector(".card-btn");
  const part = r.part_id || `#${r.id}`;
  btn.setAttribute("aria-label", `${v.word}: part ${part}, score ${fmt(r.score)}; open review`);
  btn.addEventListener("click", () => openReview(r));
  const img = node.querySelector("img");
  if (r.image_kept === false) {
    node.querySelector(".thumb").replaceChildren(el("span", "noimg", "image not kept"));
  } else {
    img.src = `/v1/results/${encodeURIComponent(r.id)}/overlay.png`;
    img.alt = `Heat map of part ${part}`;
  }
  node.querySelector(".verdict").textContent = v.word;
  node.querySelector(".score").textContent =
    r.threshold == null ? `score ${fmt(r.score)}` : `${fmt(r.score)} / ${fmt(r.threshold)}`;
  const frac = r.threshold ? Math.min(1, r.score / (2 * r.threshold)) : 0;
  node.querySelector(".fill").style.width = `${(frac * 100).toFixed(1)}%`;
  if (r.threshold == null) node.querySelector(".tick").hidden = true;
  node.querySelector(".part").textContent = part;
  const t = node.querySelector(".time");
  t.textContent = clock(timeOf(r));
  if (r.time) t.setAttribute("datetime", r.time);
  return node;
}

function addResult(r, { live = true, card = true } = {}) {
  if (typeof r.id !== "number" || r.id <= state.lastId) return;
  state.lastId = r.id;
  if (r.threshold != null) state.threshold = r.threshold;
  if (card) {
    const cards = $("cards");
    cards.prepend(makeCard(r));
    while (cards.children.length > MAX_CARDS) cards.lastElementChild.remove();
    $("empty").hidden = true;
  }
  state.points.push({ t: timeOf(r), score: r.score, anomalous: r.anomalous });
  if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
  if (live) {
    scheduleSummary();
    drawPlot();
    if (state.gallery && r.gallery_version !== state.gallery.current) scheduleGallery();
  }
}

// ---------------------------------------------------------------- counters
const scheduleSummary = debounced(() => loadSummary(), 300);

async function loadSummary() {
  const s = await getBody("/v1/station");
  if (!s) return;
  $("station-name").textContent = s.station || "station";
  document.title = `${s.station || "station"} · spade-edge`;
  $("c-parts").textContent = String(s.parts);
  $("c-rejects").textContent = String(s.rejects);
  const h = s.last_hour || {};
  $("c-rate").textContent = h.reject_rate == null ? "–"
    : `${(100 * h.reject_rate).toFixed(1)} % (${h.rejects}/${h.parts})`;
}

// ---------------------------------------------------------------- plot
function drawPlot() {
  const canvas = $("plot");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  const h = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  const css = getComputedStyle(document.documentElement);
  const col = (name) => css.getPropertyValue(name).trim();
  g.clearRect(0, 0, w, h);
  const pad = { l: 48, r: 10, t: 10, b: 24 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  const pts = state.points;
  const thr = state.threshold;
  // Scale to the bulk of the scores (95th percentile) and the threshold, so drift near the
  // threshold stays visible; a few huge rejects are drawn as triangles at the top edge.
  const sorted = pts.map((p) => p.score).sort((a, b) => a - b);
  const p95 = sorted.length ? sorted[Math.floor(0.95 * (sorted.length - 1))] : 0;
  const ymax = Math.max(thr != null ? thr * 2 : 0, p95 * 1.15, 1e-6);
  const t1 = pts.length ? pts[pts.length - 1].t : Date.now();
  const t0 = pts.length > 1 ? pts[0].t : t1 - 60000;
  const span = Math.max(1000, t1 - t0);
  const X = (t) => pad.l + ((t - t0) / span) * pw;
  const Y = (s) => pad.t + ph - (Math.max(0, s) / ymax) * ph;
  g.font = "13px system-ui, sans-serif";
  g.fillStyle = col("--muted");
  g.strokeStyle = col("--grid");
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    const y = Y(v);
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
    g.fillText(fmt(v, 2), 4, y + 4);
  }
  g.fillText(clock(t0), pad.l, h - 6);
  const last = clock(t1);
  g.fillText(last, w - pad.r - g.measureText(last).width, h - 6);
  if (thr != null) {
    g.strokeStyle = col("--nok");
    g.setLineDash([6, 4]);
    g.lineWidth = 2;
    g.beginPath(); g.moveTo(pad.l, Y(thr)); g.lineTo(w - pad.r, Y(thr)); g.stroke();
    g.setLineDash([]);
  }
  for (const p of pts) {
    g.fillStyle = p.anomalous === true ? col("--nok") : p.anomalous === false ? col("--ok") : col("--muted");
    const x = X(p.t);
    g.beginPath();
    if (p.score > ymax) { // off the scale: a triangle pointing up at the top edge
      g.moveTo(x, pad.t); g.lineTo(x - 5, pad.t + 8); g.lineTo(x + 5, pad.t + 8); g.closePath();
    } else {
      g.arc(x, Y(p.score), 3.5, 0, 2 * Math.PI);
    }
    g.fill();
  }
  $("plot-thr").textContent = thr == null ? "(none)" : fmt(thr);
}

// ---------------------------------------------------------------- gallery
const scheduleGallery = debounced(() => loadGallery(), 300);

async function loadGallery() {
  const g = await getBody("/v1/gallery");
  if (!g) return;
  state.gallery = g;
  if (g.threshold != null) { state.threshold = g.threshold; drawPlot(); }
  $("c-gallery").textContent = `v${g.current} · ${g.n_images} images`;
  const tbody = $("versions").tBodies[0];
  const rows = [];
  for (const v of [...(g.versions || [])].sort((a, b) => b.version - a.version)) {
    const tr = el("tr");
    if (v.version === g.current) tr.className = "current";
    const thr = v.thresholds && typeof v.thresholds === "object" ? v.thresholds.image ?? v.thresholds.threshold : null;
    tr.append(el("td", null, `v${v.version}${v.version === g.current ? " ✓" : ""}`),
      el("td", null, v.n_images), el("td", null, fmt(thr)),
      el("td", null, v.created ? clock(Date.parse(v.created)).slice(0, 5) : "–"));
    const td = el("td");
    if (v.version !== g.current) {
      const b = el("button", "small", `Use v${v.version}`);
      b.type = "button";
      b.setAttribute("aria-label", `Roll back to gallery v${v.version}`);
      b.title = `Roll back to gallery v${v.version}`;
      b.addEventListener("click", () => rollback(v.version, b));
      td.append(b);
    }
    tr.append(td);
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function withToken(msgEl, call) {
  const tok = token();
  if (!tok) {
    msgEl.className = "msg";
    msgEl.textContent = "Enter the operator token first.";
    openTokenRow();
    return null;
  }
  const r = await call(tok).catch((e) => ({ ok: false, status: 0, body: { error: String(e) } }));
  if (r.status === 401 || r.status === 403) sessionStorage.removeItem(TOKEN_KEY);
  return r;
}

async function rollback(version, button) {
  const msg = $("gallery-msg");
  const tok = token();
  if (!tok) { // ask here, then roll back to the version chosen
    state.pendingRollback = version;
    msg.className = "msg";
    msg.textContent = `Enter the operator token to roll back to v${version}.`;
    $("gal-token").hidden = false;
    $("gal-token-go").textContent = `Roll back to v${version}`;
    $("gal-token-input").focus();
    return;
  }
  $("gal-token").hidden = true;
  if (button) button.disabled = true;
  const r = await withToken(msg, (t) => api("/v1/gallery/rollback", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${t}` },
    body: JSON.stringify({ version }),
  }));
  if (button) button.disabled = false;
  if (!r) return;
  if (r.ok) {
    msg.className = "msg ok";
    msg.textContent = `Now serving gallery v${r.body.version}.`;
  } else {
    msg.className = "msg error";
    msg.textContent = `Rollback failed: ${errorText(r)}${r.status === 401 ? " (token cleared)" : ""}`;
  }
  await loadGallery();
}

// ---------------------------------------------------------------- review
function openTokenRow() {
  $("token-row").hidden = false;
  $("token").focus();
}

function dlRow(dl, k, v) {
  dl.append(el("dt", null, k), el("dd", null, v));
}

function openReview(r) {
  state.current = r;
  const v = verdictOf(r);
  const part = r.part_id || `#${r.id}`;
  $("rv-title").textContent = `Part ${part}`;
  const verdict = $("rv-verdict");
  verdict.className = `verdict ${v.cls}`;
  verdict.textContent = v.word;
  const dl = $("rv-dl");
  dl.replaceChildren();
  dlRow(dl, "Score", fmt(r.score));
  dlRow(dl, "Threshold", fmt(r.threshold));
  dlRow(dl, "Score / threshold", r.threshold ? `${fmt(r.score / r.threshold, 2)}×` : "–");
  dlRow(dl, "Map max / pixel threshold", `${fmt(r.map_max)} / ${fmt(r.pixel_threshold)}`);
  dlRow(dl, "Defect area", r.defect_fraction == null ? "–" : `${fmt(100 * r.defect_fraction, 2)} %`);
  dlRow(dl, "Regions", String((r.regions || []).length));
  dlRow(dl, "Time", r.time ? new Date(timeOf(r)).toLocaleString([], { hour12: false }) : "–");
  dlRow(dl, "Result id", String(r.id));
  dlRow(dl, "Source", [r.source, r.station].filter(Boolean).join(" · ") || "–");
  dlRow(dl, "Gallery version", r.gallery_version == null ? "–" : `v${r.gallery_version}`);
  dlRow(dl, "Latency", r.latency_ms ? `${fmt(r.latency_ms.total, 1)} ms` : "–");
  const orig = $("rv-orig");
  const svg = $("rv-svg");
  svg.replaceChildren();
  const kept = r.image_kept !== false;
  orig.hidden = !kept;
  $("rv-overlay").hidden = !kept;
  if (kept) {
    orig.onload = () => outline(svg, r.regions || [], orig.naturalWidth, orig.naturalHeight);
    orig.src = `/v1/results/${encodeURIComponent(r.id)}/image`;
    $("rv-overlay").src = `/v1/results/${encodeURIComponent(r.id)}/overlay.png`;
  }
  $("good-msg").textContent = "";
  $("good-msg").className = "msg";
  $("mark-good").disabled = !kept;
  $("token-row").hidden = Boolean(token());
  const d = $("review");
  if (!d.open) d.showModal();
  $("mark-good").focus();
}

function outline(svg, regions, w, h) {
  const NS = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const stroke = Math.max(2, Math.round(Math.max(w, h) / 150));
  regions.forEach((g, i) => {
    const rect = document.createElementNS(NS, "rect");
    rect.setAttribute("x", String(g.x));
    rect.setAttribute("y", String(g.y));
    rect.setAttribute("width", String(g.w));
    rect.setAttribute("height", String(g.h));
    rect.setAttribute("stroke-width", String(stroke));
    rect.setAttribute("class", i === 0 ? "region main" : "region");
    svg.append(rect);
  });
}

async function markGood(ev) {
  ev.preventDefault();
  const r = state.current;
  if (!r) return;
  const msg = $("good-msg");
  const input = $("token");
  if (!token()) {
    const typed = input.value.trim();
    if (!typed) {
      msg.className = "msg";
      msg.textContent = "Enter the operator token, then press Mark as good.";
      openTokenRow();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, typed);
    input.value = "";
  }
  const button = $("mark-good");
  button.disabled = true;
  msg.className = "msg";
  msg.textContent = "Adding to the gallery…";
  const res = await withToken(msg, (t) => api("/v1/gallery/normal", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${t}` },
    body: JSON.stringify({ ids: [r.id] }),
  }));
  button.disabled = false;
  if (!res) return;
  if (res.ok) {
    msg.className = "msg ok";
    msg.textContent = `Added. Gallery v${res.body.version} is serving (${res.body.n_images} images).`;
    $("token-row").hidden = true;
  } else if (res.status === 401 || res.status === 403) {
    msg.className = "msg error";
    msg.textContent = `Token rejected — nothing was changed. Enter the token again. (${errorText(res)})`;
    openTokenRow();
  } else {
    msg.className = "msg error";
    msg.textContent = `Not added: ${errorText(res)}`;
  }
  await loadGallery();
}

// ---------------------------------------------------------------- live stream
function setConn(text, cls) {
  const c = $("conn");
  c.textContent = text;
  c.className = `conn ${cls}`;
}

async function catchUp() {
  // After a (re)connect: whatever was archived while the stream was down, in id order.
  for (let i = 0; i < 20; i++) {
    const rows = await getResults(`since_id=${state.lastId}&limit=100`);
    rows.forEach((x, i) => addResult(x, { live: false, card: i >= rows.length - MAX_CARDS }));
    if (rows.length < 100) break;
  }
  drawPlot();
  loadSummary();
}

function connect() {
  const es = new EventSource("/v1/events");
  state.es = es;
  es.addEventListener("open", () => { setConn("live", "up"); catchUp(); });
  es.addEventListener("error", () => setConn("reconnecting…", "down"));
  es.addEventListener("result", (ev) => {
    let r;
    try { r = JSON.parse(ev.data); } catch (_) { return; }
    addResult(r);
  });
}

async function init() {
  $("good-form").addEventListener("submit", markGood);
  $("gal-token").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const typed = $("gal-token-input").value.trim();
    if (!typed || state.pendingRollback == null) return;
    sessionStorage.setItem(TOKEN_KEY, typed);
    $("gal-token-input").value = "";
    rollback(state.pendingRollback, null);
  });
  $("rv-close").addEventListener("click", () => $("review").close());
  $("review").addEventListener("click", (ev) => { if (ev.target === $("review")) $("review").close(); });
  window.addEventListener("resize", drawPlot);
  const rows = await getResults(`limit=${MAX_POINTS}`);
  rows.forEach((x, i) => addResult(x, { live: false, card: i >= rows.length - MAX_CARDS }));
  await Promise.all([loadSummary(), loadGallery()]);
  drawPlot();
  connect();
  document.body.dataset.ready = "1";
  performance.mark("station-ready"); // first data drawn (benches/bench_station.py reads it)
}

document.addEventListener("DOMContentLoaded", init);
