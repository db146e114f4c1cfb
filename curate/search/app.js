// curate serve: the search page. Every value from the data is put in the page with textContent (never as
// HTML), and images only as data: URIs the server made, so a caption holding markup stays text.
"use strict";

const $ = (id) => document.getElementById(id);
const THUMB_PREFIX = "data:image/jpeg;base64,";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmt(v) {
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(4);
  if (v === null || v === undefined) return "";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

async function api(path, params) {
  const res = await fetch(path + "?" + new URLSearchParams(params).toString());
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function image(uri) {
  if (typeof uri === "string" && uri.startsWith(THUMB_PREFIX)) {
    const img = el("img");
    img.alt = "";
    img.src = uri;
    return img;
  }
  return el("div", "noimg", "no image");
}

const thumbs = new Map();  // key -> thumbnail of every sample shown so far, for the detail panel

function tile(hit) {
  if (hit.thumb) thumbs.set(hit.key, hit.thumb);
  const t = el("div", "tile");
  t.dataset.key = hit.key;
  t.appendChild(image(hit.thumb));
  t.appendChild(el("div", "cap", hit.caption || ""));
  const clip = typeof hit.clip_score === "number" ? " clip " + hit.clip_score.toFixed(3) : "";
  t.appendChild(el("div", "meta", "#" + hit.rank + " score " + hit.score.toFixed(4) + clip));
  t.appendChild(el("div", "meta", hit.key));
  t.addEventListener("click", () => openSample(hit.key));
  return t;
}

function fillGrid(grid, hits) {
  grid.replaceChildren(...hits.map(tile));
}

function fillTable(table, obj) {
  table.replaceChildren(...Object.keys(obj || {}).sort().map((k) => {
    const tr = el("tr");
    tr.appendChild(el("td", null, k));
    tr.appendChild(el("td", null, fmt(obj[k])));
    return tr;
  }));
}

function status(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function search(q) {
  status("searching…");
  try {
    const r = await api("/api/search", { q: q, k: 24, modality: $("modality").value });
    fillGrid($("grid"), r.hits);
    status(r.hits.length + " hits for “" + r.query + "”");
  } catch (e) {
    status(e.message, true);
  }
}

async function openSample(key) {
  status("loading " + key + "…");
  try {
    const [s, n] = await Promise.all([
      api("/api/sample", { key: key }),
      api("/api/neighbours", { key: key, k: 12, modality: $("modality").value }),
    ]);
    $("detail").hidden = false;
    $("detail-title").textContent = "Sample " + s.key;
    $("detail-image").replaceChildren(image(thumbs.get(key)));
    $("detail-caption").textContent = s.ledger.caption || "";
    const v = $("detail-verdict");
    if (s.export) {
      v.className = s.export.decision;
      v.textContent = s.export.decision === "dropped" ? "dropped by export: " + (s.export.reason || "?")
        : s.export.decision === "kept" ? "kept by export" : "not in the export";
    } else {
      v.className = "";
      v.textContent = "";
    }
    fillGrid($("neighbours"), n.hits);
    fillTable($("ledger"), s.ledger);
    fillTable($("signals"), s.signals);
    status("sample " + key + ": " + n.hits.length + " neighbours");
  } catch (e) {
    status(e.message, true);
  }
}

async function init() {
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (q) search(q);
  });
  $("close").addEventListener("click", () => { $("detail").hidden = true; });
  try {
    const info = await api("/api/info", {});
    $("modality").replaceChildren(...info.modalities.map((m) => {
      const o = el("option", null, m);
      o.value = m;
      return o;
    }));
    $("info").textContent = info.dataset + ": " + info.rows + " samples, " + info.factory
      + (info.where ? " — where " + info.where : "");
  } catch (e) {
    status(e.message, true);
  }
  route();
  window.addEventListener("hashchange", route);
}

// #key=KEY opens a sample (the HTML report links here), #q=TEXT runs a search
function route() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("key")) openSample(h.get("key"));
  else if (h.get("q")) { $("q").value = h.get("q"); search(h.get("q")); }
}

document.addEventListener("DOMContentLoaded", init);
