// mri's front end: hash routes over the JSON API; no framework, no build step, nothing from the network.
import { renderGraph } from "./graph.js";

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
const atlasSelect = document.getElementById("atlas");
const state = { scan: null, atlases: [], atlas: null, auditAtlas: null };

// ---- helpers ------------------------------------------------------------------------------------------
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
      : body.detail;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function showError(err) {
  errorBox.textContent = String(err.message || err);
  errorBox.hidden = false;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(3)}%`);
export const featureHref = (atlas, f) => `#/feature/${f}?atlas=${encodeURIComponent(atlas)}`;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
}

function setHash(parts, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const target = `#/${parts.map(encodeURIComponent).join("/")}${q.toString() ? "?" + q : ""}`;
  if (location.hash !== target) location.hash = target;
}

function atlasFrom(params) {
  const wanted = params.get("atlas");
  if (wanted && state.atlases.some((a) => a.id === wanted)) state.atlas = wanted;
  atlasSelect.value = state.atlas || "";
  return state.atlas;
}

// ---- feature browser ----------------------------------------------------------------------------------
const COLUMNS = [
  ["feature", "#"], ["density", "density"], ["max_act", "max act"], ["mean_act", "mean act"],
  ["label", "label"], ["score", "score"],
];

async function featuresView(params) {
  const atlas = atlasFrom(params);
  if (!atlas) {
    main.replaceChildren(h("p", { class: "muted" }, "This scan has no atlas yet: run `mri atlas` or `mri demo`."));
    return;
  }
  const q = params.get("q") || "";
  const sort = params.get("sort") || "density";
  const order = params.get("order") || "desc";
  const page = Math.max(0, parseInt(params.get("page") || "0", 10) || 0);
  const minD = params.get("min") || "";
  const maxD = params.get("max") || "";
  const size = 50;
  const go = (changes) => setHash(["features"], { atlas, q, sort, order, page, min: minD, max: maxD, ...changes });

  const search = h("input", { type: "search", id: "search", placeholder: "label, token or feature number", value: q });
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => go({ q: search.value, page: 0 }), 350);
  });
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(timer); go({ q: search.value, page: 0 }); } });
  const minInput = h("input", { type: "number", class: "num", id: "min-density", min: 0, max: 1, step: "any", value: minD, placeholder: "0" });
  const maxInput = h("input", { type: "number", class: "num", id: "max-density", min: 0, max: 1, step: "any", value: maxD, placeholder: "1" });
  const applyDensity = () => go({ min: minInput.value, max: maxInput.value, page: 0 });
  minInput.addEventListener("change", applyDensity);
  maxInput.addEventListener("change", applyDensity);

  const query = new URLSearchParams({ atlas, sort, order, offset: page * size, limit: size });
  if (q) query.set("q", q);
  if (minD) query.set("min_density", minD);
  if (maxD) query.set("max_density", maxD);
  const data = await api(`/api/features?${query}`);
  const info = state.atlases.find((a) => a.id === atlas);

  const head = h("tr", {}, COLUMNS.map(([key, title]) => h("th", {
    class: `sortable${key === sort ? " sorted" : ""}${key === sort && order === "asc" ? " asc" : ""}`,
    "data-sort": key,
    onclick: () => go({ sort: key, order: key === sort && order === "desc" ? "asc" : "desc", page: 0 }),
  }, title)), h("th", {}, "peak tokens"));
  const rows = data.features.map((f) => h("tr", { class: "feature-row" },
    h("td", {}, h("a", { href: featureHref(atlas, f.feature) }, String(f.feature))),
    h("td", {}, pct(f.density)), h("td", {}, fmt(f.max_act)), h("td", {}, fmt(f.mean_act)),
    h("td", {}, f.label || h("span", { class: "muted" }, "no label")),
    h("td", {}, f.score === null ? "–" : f.score.toFixed(2)),
    h("td", { class: "tokens" }, f.peak_tokens.map((t) => h("code", {}, JSON.stringify(t)))),
  ));
  const pages = Math.max(1, Math.ceil(data.total / size));
  main.replaceChildren(
    h("h1", {}, `Features of ${atlas}`),
    h("p", { class: "muted" }, info ? `${info.n_features.toLocaleString()} features · ${info.model} · ${info.site}` : ""),
    h("div", { class: "toolbar" }, search, h("label", {}, "density ", minInput, " – ", maxInput)),
    h("p", { class: "muted", id: "total" }, `${data.total.toLocaleString()} match${data.total === 1 ? "" : "es"}`),
    h("table", { id: "features" }, h("thead", {}, head), h("tbody", {}, rows)),
    h("div", { class: "pager" },
      h("button", { id: "prev", disabled: page === 0, onclick: () => go({ page: page - 1 }) }, "← prev"),
      h("span", {}, `page ${page + 1} of ${pages}`),
      h("button", { id: "next", disabled: page + 1 >= pages, onclick: () => go({ page: page + 1 }) }, "next →")),
  );
}

// ---- feature page -------------------------------------------------------------------------------------
function histogram(hist, edges) {
  const ns = "http://www.w3.org/2000/svg";
  const nz = hist.map((c, i) => (c ? i : -1)).filter((i) => i >= 0);
  if (!nz.length) return h("p", { class: "muted" }, "never fired");
  const lo = nz[0], hi = nz[nz.length - 1] + 1, counts = hist.slice(lo, hi);
  const W = 640, H = 140, top = Math.max(...counts), bw = W / counts.length;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "histogram");
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const height = (c / top) * (H - 30);
    r.setAttribute("x", (i * bw).toFixed(1)); r.setAttribute("y", (H - 20 - height).toFixed(1));
    r.setAttribute("width", Math.max(bw - 1, 1).toFixed(1)); r.setAttribute("height", height.toFixed(1));
    r.setAttribute("fill", "#e0a040");
    const t = document.createElementNS(ns, "title");
    t.textContent = `${fmt(edges[lo + i])}–${fmt(edges[lo + i + 1])}: ${c}`;
    r.append(t); svg.append(r);
  });
  for (const [x, anchor, v] of [[0, "start", edges[lo]], [W, "end", edges[hi]]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H - 4); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor); t.textContent = fmt(v);
    svg.append(t);
  }
  return svg;
}

export function exampleRow(ex, scale) {
  const spans = ex.tokens.map((tok, i) => {
    const act = ex.acts[i] || 0;
    const span = h("span", { class: `tok${i === ex.peak && act > 0 ? " peak" : ""}`, title: fmt(act) }, tok);
    if (act > 0 && scale > 0) span.style.background = `rgba(var(--act),${Math.min(act / scale, 1).toFixed(2)})`;
    return span;
  });
  const band = ex.band === null || ex.band === undefined ? "" : ` · band ${ex.band}`;
  return h("div", { class: `ex ${ex.split}` },
    h("span", { class: "tag" }, `${ex.kind} · ${ex.split}${band} · max ${fmt(ex.max_act)}`), spans);
}

function linkList(atlas, items, key) {
  if (!items.length) return h("span", { class: "muted" }, "none");
  return h("ul", {}, items.map((r) => h("li", {},
    h("a", { href: featureHref(atlas, r.feature) }, `#${r.feature}`), " ",
    h("span", { class: "muted" }, `${key} ${fmt(r[key], 2)}`), " ", r.label || "")));
}

async function featureView(parts, params) {
  const atlas = atlasFrom(params);
  const id = parseInt(parts[1], 10);
  const f = await api(`/api/features/${id}?atlas=${encodeURIComponent(atlas)}`);
  const scale = f.max_act || 0;
  const section = (kind, title) => {
    let exs = f.examples.filter((e) => e.kind === kind);
    if (kind === "quantile") exs = exs.sort((a, b) => (b.quantile || 0) - (a.quantile || 0));
    return [h("h2", {}, `${title} (${exs.length})`),
      h("div", { class: `examples ${kind}` }, exs.length ? exs.map((e) => exampleRow(e, scale)) : h("p", { class: "muted" }, "none"))];
  };
  const scores = f.explanations.length
    ? h("table", { class: "scores" }, f.explanations.map((e) => h("tr", {},
      h("td", {}, e.scorer), h("td", {}, e.score === null ? "no score-split examples" : e.score.toFixed(3)),
      h("td", { class: "muted" }, e.ci_low === null ? "" : `95% CI ${e.ci_low.toFixed(3)}–${e.ci_high.toFixed(3)} (${e.explainer})`))))
    : h("p", { class: "muted" }, "not explained yet (mri explain)");
  const tokenTable = (title, rows) => h("div", {}, h("h3", {}, title), h("table", {}, rows.map((r) =>
    h("tr", {}, h("td", {}, h("code", {}, JSON.stringify(r.token))), h("td", {}, (r.value >= 0 ? "+" : "") + r.value.toFixed(3))))));
  const steerLink = `#/steer?atlas=${encodeURIComponent(atlas)}&f=${id}`;
  main.replaceChildren(
    h("p", {}, h("a", { href: `#/features?atlas=${encodeURIComponent(atlas)}` }, "← all features"),
      " · ", h("a", { href: steerLink, id: "steer-link" }, "steer with this feature")),
    h("h1", { id: "feature-title" }, `Feature ${f.feature}`),
    h("div", { class: "label", id: "feature-label" }, f.label || h("span", { class: "muted" }, "no label yet")),
    scores,
    h("p", { class: "muted" }, `${f.model} · ${f.site} · ${Number(f.tokens_seen || 0).toLocaleString()} tokens · atlas ${atlas}`),
    h("table", { class: "stats" },
      h("tr", {}, ["density", "fired", "mean act", "max act"].map((t) => h("th", {}, t))),
      h("tr", {}, h("td", {}, pct(f.density)), h("td", {}, Number(f.fired).toLocaleString()), h("td", {}, fmt(f.mean_act)), h("td", {}, fmt(f.max_act)))),
    h("h2", {}, "Activation histogram (log-spaced bins)"), histogram(f.hist, f.hist_edges),
    h("h2", {}, "Logit effects"),
    h("div", { class: "cols" }, tokenTable("Promoted", f.logit_pos), tokenTable("Suppressed", f.logit_neg)),
    h("h2", {}, "Related features"),
    h("div", { class: "cols" },
      h("div", {}, h("h3", {}, "Co-firing (Jaccard)"), linkList(atlas, f.cofiring, "jaccard")),
      h("div", {}, h("h3", {}, "Nearest decoders (cosine)"), linkList(atlas, f.neighbours, "cosine"))),
    ...section("top", "Top activations"),
    ...section("quantile", "Sampled activations (by rank quantile)"),
    ...section("random", "Non-activating"),
    h("p", { class: "muted" }, "Orange edge: explain split (shown to explainers); blue edge: score split (held out)."),
  );
}

// ---- steering playground ------------------------------------------------------------------------------
function exampleHref(ex) {
  const q = new URLSearchParams({ atlas: ex.atlas, example: "1" });
  if (ex.examples.length) q.set("prompt", ex.examples[0].prompt);
  return `#/steer?${q}`;
}

function steerExamplePanel(ex, atlas) {
  // The steering example `mri demo` found (steer/concept.json): what it steers, how hard, and what it did.
  const rate = (x) => (x === null ? "–" : `${Math.round(100 * x)}%`);
  const facts = [
    ["feature", ex.atlas ? h("a", { href: featureHref(ex.atlas, ex.feature) }, `#${ex.feature}`) : `#${ex.feature}`,
      ex.dictionary ? ` of ${ex.dictionary}` : ""],
    ["edit", `${ex.mode} at strength ${fmt(ex.strength, 4)}`],
    ["concept tokens", h("span", { class: "tokens" }, ex.concept_tokens.map((t) => h("code", {}, JSON.stringify(t))))],
    ["concept in", `${rate(ex.steered_rate)} of steered vs ${rate(ex.unsteered_rate)} of unsteered generations` +
      `${ex.rate_ratio === null ? "" : ` (${fmt(ex.rate_ratio, 2)}×)`}${ex.n_prompts ? ` on ${ex.n_prompts} prompts` : ""}`],
    ["perplexity", `${fmt(ex.perplexity_ratio, 3)}× unsteered (${fmt(ex.steered_perplexity)} vs ${fmt(ex.unsteered_perplexity)})`],
    ["passed", ex.passed === null ? "–" : ex.passed ? "yes" : "no"],
  ];
  const replay = ex.atlas
    ? ex.atlas === atlas && new URLSearchParams(location.hash.split("?")[1] || "").get("example")
      ? h("span", { class: "muted" }, "loaded below")
      : h("a", { href: exampleHref(ex), id: "steer-example-load" }, "steer with it in the playground")
    : h("span", { class: "muted" }, "no atlas of its dictionary in this scan, so the playground cannot replay it");
  return h("details", { id: "steer-example", class: "steer-example", open: true },
    h("summary", {}, "Steering example from this scan"),
    h("dl", { class: "kv" }, facts.flatMap(([k, ...v]) => [h("dt", {}, k), h("dd", {}, ...v)])),
    h("p", {}, replay, " · ", h("a", { href: `/api/files/${ex.file}`, target: "_blank", rel: "noopener" }, ex.file)),
    ex.examples.slice(0, 2).map((e) => h("div", { class: "steer-sample" },
      h("p", {}, h("span", { class: "muted" }, "prompt "), h("code", {}, e.prompt)),
      h("div", { class: "steer-grid" },
        h("div", {}, h("h3", {}, "Unsteered"), h("div", { class: "gen" }, e.unsteered)),
        h("div", {}, h("h3", {}, "Steered"), h("div", { class: "gen" }, e.steered))))),
  );
}

async function steerView(params) {
  const atlas = atlasFrom(params);
  const found = state.scan.steer_example ? await api("/api/steer/example") : { present: false };
  const example = found.present ? steerExamplePanel(found.example, atlas) : "";
  if (!atlas) {
    main.replaceChildren(h("h1", {}, "Steering playground"), example,
      h("p", { class: "muted" }, "Steering needs an atlas and its dictionary in the scan."));
    return;
  }
  main.replaceChildren(h("h1", {}, "Steering playground"), example, h("p", { class: "muted", id: "steer-status" }, "loading the model…"));
  const info = await api(`/api/steer?atlas=${encodeURIComponent(atlas)}`);
  const initial = (params.get("f") || "").split(",").filter(Boolean).map((s) => {
    const [feature, mult, mode] = s.split(":");
    return { feature: parseInt(feature, 10) || 0, mult: mult === undefined ? 4 : parseFloat(mult), mode: mode || "add" };
  });
  const ex = found.present ? found.example : null;
  if (!initial.length && ex && params.get("example") && ex.atlas === atlas && ex.feature !== null && ex.strength !== null) {
    // the example's own strength, exactly: the slider shows it rounded to its step until it is moved
    initial.push({ feature: ex.feature, mult: ex.strength / (ex.mode === "clamp" ? 1 : info.scale), mode: ex.mode, exact: ex.strength });
  }
  if (!initial.length) initial.push({ feature: 0, mult: 4, mode: "add" });

  const status = h("p", { class: "muted", id: "steer-status" }, `${info.model} · steering at ${info.site} · typical norm ${fmt(info.scale)}`);
  const prompt = h("textarea", { id: "prompt", rows: 2, cols: 80 }, params.get("prompt") || "The weather today");
  const maxTokens = h("input", { type: "number", class: "num", id: "max-tokens", min: 1, max: info.max_new_tokens, value: 24 });
  const temperature = h("input", { type: "number", class: "num", id: "temperature", min: 0, max: 5, step: 0.1, value: 0 });
  const seed = h("input", { type: "number", class: "num", id: "seed", min: 0, value: 0 });
  const positions = h("select", { id: "positions" }, ["all", "generated", "prompt"].map((p) => h("option", { value: p }, p)));
  const editsBox = h("div", { id: "edits" });
  const plainOut = h("div", { class: "gen", id: "unsteered" });
  const steeredOut = h("div", { class: "gen", id: "steered" });
  const rows = [];

  function addRow(init) {
    const feature = h("input", { type: "number", class: "num feature", min: 0, max: info.n_features - 1, value: init.feature });
    const mode = h("select", { class: "mode" }, ["add", "clamp", "ablate"].map((m) => h("option", { value: m, selected: m === init.mode }, m)));
    const slider = h("input", { type: "range", class: "strength", min: -8, max: 8, step: 0.25, value: init.mult });
    const shown = h("span", { class: "strength-value" });
    const label = h("span", { class: "feature-label muted" });
    const row = { feature, mode, slider, maxAct: 1, exact: init.exact ?? null };
    const strength = () => (mode.value === "ablate" ? 0 : row.exact !== null ? row.exact
      : parseFloat(slider.value) * (mode.value === "add" ? info.scale : row.maxAct));
    row.strength = strength;
    const describe = () => {
      slider.disabled = mode.value === "ablate";
      shown.textContent = mode.value === "ablate" ? "ablated"
        : row.exact !== null ? `${strength().toFixed(2)} (the example's strength)` : `${slider.value}× = ${strength().toFixed(2)}`;
    };
    const lookup = async () => {
      try {
        const f = await api(`/api/features/${parseInt(feature.value, 10) || 0}?atlas=${encodeURIComponent(atlas)}`);
        row.maxAct = f.max_act || 1;
        label.replaceChildren(h("a", { href: featureHref(atlas, f.feature) }, `#${f.feature}`), " ", f.label || "no label");
      } catch (err) { label.textContent = err.message; }
      describe();
    };
    feature.addEventListener("change", lookup);
    mode.addEventListener("change", () => { row.exact = null; describe(); run(); });
    slider.addEventListener("input", () => { row.exact = null; describe(); });
    slider.addEventListener("change", run);
    const remove = h("button", { title: "remove", onclick: () => { rows.splice(rows.indexOf(row), 1); el.remove(); } }, "×");
    const el = h("div", { class: "edit-row" }, "feature ", feature, mode, slider, shown, remove, label);
    rows.push(row);
    editsBox.append(el);
    lookup();
  }

  let running = 0;
  async function run() {
    if (!rows.length) return;
    const ticket = ++running;
    status.textContent = "generating…";
    const body = {
      prompt: prompt.value, atlas, positions: positions.value, seed: parseInt(seed.value, 10) || 0,
      max_new_tokens: parseInt(maxTokens.value, 10) || 24, temperature: parseFloat(temperature.value) || 0,
      edits: rows.map((r) => ({ feature: parseInt(r.feature.value, 10) || 0, mode: r.mode.value, strength: r.strength() })),
    };
    try {
      const out = await api("/api/steer", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      if (ticket !== running) return;
      plainOut.replaceChildren(h("span", { class: "prompt" }, out.prompt), out.unsteered);
      steeredOut.replaceChildren(h("span", { class: "prompt" }, out.prompt), out.steered);
      status.textContent = `${info.model} · ${out.steered_tokens} tokens in ${out.seconds.toFixed(2)} s`;
    } catch (err) {
      if (ticket === running) status.textContent = err.message;
    }
  }

  initial.forEach(addRow);
  main.replaceChildren(
    h("h1", {}, "Steering playground"), example, status,
    h("div", {}, prompt),
    h("div", { class: "toolbar" },
      h("label", {}, "new tokens ", maxTokens), h("label", {}, "temperature ", temperature),
      h("label", {}, "seed ", seed), h("label", {}, "positions ", positions),
      h("button", { onclick: () => addRow({ feature: 0, mult: 4, mode: "add" }) }, "+ feature"),
      h("button", { class: "primary", id: "generate", onclick: run }, "Generate")),
    h("p", { class: "muted" }, "Strength: add — multiples of the site's typical norm; clamp — multiples of the feature's top activation."),
    editsBox,
    h("div", { class: "steer-grid" },
      h("div", {}, h("h2", {}, "Unsteered"), plainOut),
      h("div", {}, h("h2", {}, "Steered"), steeredOut)),
  );
}

// ---- graphs -------------------------------------------------------------------------------------------
async function graphsView() {
  const list = await api("/api/graphs");
  const file = h("input", { type: "file", id: "graph-file", accept: ".json,application/json" });
  file.addEventListener("change", async () => {
    const chosen = file.files[0];
    if (!chosen) return;
    try {
      const data = JSON.parse(await chosen.text());
      await showGraph(data, chosen.name);
    } catch (err) { showError(err); }
  });
  main.replaceChildren(
    h("h1", {}, "Attribution graphs"),
    list.length
      ? h("table", { id: "graphs" }, h("tr", {}, ["graph", "prompt", "nodes", "links"].map((t) => h("th", {}, t))),
        list.map((g) => h("tr", {}, h("td", {}, h("a", { href: `#/graph/${encodeURIComponent(g.name)}` }, g.slug || g.name)),
          h("td", {}, g.prompt || ""), h("td", {}, g.nodes ?? "?"), h("td", {}, g.links ?? "?"))))
      : h("p", { class: "muted" }, "No graphs in this scan yet (mri trace run … --out SCAN/graphs/NAME.json)."),
    h("p", {}, "Open a graph file from disk (ours or circuit-tracer's JSON): ", file),
  );
}

async function showGraph(data, name) {
  main.replaceChildren(h("p", {}, h("a", { href: "#/graphs" }, "← all graphs")), h("div", { id: "graph-host" }));
  await renderGraph(document.getElementById("graph-host"), data, { name, atlases: state.atlases, h, featureHref, api });
}

async function graphView(parts) {
  const name = parts[1];
  await showGraph(await api(`/api/graphs/${encodeURIComponent(name)}`), name);
}

// ---- audit --------------------------------------------------------------------------------------------
function renderValue(value, depth = 0) {
  if (value === null || value === undefined) return h("span", { class: "muted" }, "–");
  if (typeof value === "number" && !Number.isInteger(value)) return fmt(value, 4);
  if (typeof value !== "object") return String(value);
  if (depth > 6) return h("pre", {}, JSON.stringify(value, null, 1));
  if (Array.isArray(value)) {
    if (!value.length) return h("span", { class: "muted" }, "none");
    return h("ul", {}, value.slice(0, 200).map((v) => h("li", {}, renderValue(v, depth + 1))));
  }
  if (typeof value.feature === "number") {
    // only the atlas of the audit's own dictionary describes its feature numbers (state.auditAtlas)
    const atlas = value.atlas && state.atlases.some((a) => a.id === value.atlas) ? value.atlas : state.auditAtlas;
    if (atlas) {
      const rest = Object.fromEntries(Object.entries(value).filter(([k]) => k !== "feature" && k !== "atlas"));
      return h("span", {}, h("a", { href: featureHref(atlas, value.feature) }, `feature #${value.feature}`), " ",
        Object.keys(rest).length ? renderValue(rest, depth + 1) : "");
    }
  }
  return h("dl", { class: "kv" }, Object.entries(value).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, renderValue(v, depth + 1))]));
}

async function auditView() {
  const data = await api("/api/audit");
  if (!data.present) {
    main.replaceChildren(h("h1", {}, "Audit"),
      h("p", { class: "muted", id: "no-audit" }, "This scan has no audit report yet (audit/report.json): run `mri audit`."));
    return;
  }
  const report = data.report;
  state.auditAtlas = data.atlas;
  const findings = Array.isArray(report.findings) ? report.findings : [];
  const skip = new Set(["findings"]);
  const header = Object.fromEntries(Object.entries(report).filter(([k, v]) => !skip.has(k) && (typeof v !== "object" || v === null)));
  const other = Object.fromEntries(Object.entries(report).filter(([k, v]) => !skip.has(k) && typeof v === "object" && v !== null));
  const model = report.model && typeof report.model === "object" ? report.model.name : report.model;
  const against = report.base && typeof report.base === "object" ? report.base.name : report.base;
  main.replaceChildren(
    h("h1", {}, report.title || (model ? `Audit of ${model}${against ? " against " + against : ""}` : "Audit report")),
    h("p", { class: "muted", id: "audit-features" }, data.atlas
      ? `feature numbers link to atlas ${data.atlas}, built from the dictionary the audit read`
      : "feature numbers are not linked: this scan has no atlas of the dictionary the audit read"),
    renderValue(header),
    h("h2", {}, `Findings (${findings.length})`),
    h("div", { id: "findings" }, findings.length ? findings.map((f) => {
      const severity = String(f.severity || f.level || (f.high_confidence === true ? "high" : "")).toLowerCase();
      const rest = Object.fromEntries(Object.entries(f).filter(([k]) => !["title", "name", "severity", "level", "summary", "description", "evidence", "kind", "confidence"].includes(k)));
      return h("div", { class: `finding ${severity}` },
        h("h3", {}, f.kind ? h("span", { class: "badge" }, f.kind) : "", severity ? h("span", { class: "badge" }, severity) : "",
          f.title || f.name || f.check || "finding",
          typeof f.confidence === "number" ? h("span", { class: "muted confidence" }, ` · confidence ${f.confidence.toFixed(2)}`) : ""),
        f.summary || f.description ? h("p", {}, f.summary || f.description) : "",
        f.evidence !== undefined ? h("div", { class: "evidence" }, h("h3", {}, "Evidence"), renderValue(f.evidence)) : "",
        Object.keys(rest).length ? renderValue(rest) : "");
    }) : h("p", { class: "muted" }, "no findings")),
    Object.keys(other).length ? [h("h2", {}, "Details"), renderValue(other)] : "",
  );
}

// ---- API ----------------------------------------------------------------------------------------------
async function apiView() {
  // The endpoints, from the app's own OpenAPI spec: FastAPI's docs pages load Swagger UI from a CDN, which
  // the Content-Security-Policy (and being offline) rules out.
  const spec = await api("/openapi.json");
  const rows = Object.entries(spec.paths).flatMap(([path, item]) => Object.entries(item).map(([method, op]) => {
    const params = (op.parameters || []).map((p) => `${p.name}${p.required ? "" : "?"}`);
    const body = op.requestBody ? Object.values(op.requestBody.content || {})[0]?.schema?.$ref?.split("/").pop() : null;
    return h("tr", { class: "endpoint" },
      h("td", {}, h("code", {}, method.toUpperCase())), h("td", {}, h("code", {}, path)),
      h("td", {}, params.join(", "), body ? `${params.length ? ", " : ""}body: ${body}` : ""),
      h("td", {}, op.summary || ""), h("td", { class: "muted" }, (op.description || "").split("\n\n")[0]));
  }));
  main.replaceChildren(
    h("h1", {}, `${spec.info.title} API ${spec.info.version}`),
    h("p", { class: "muted" }, "JSON over HTTP; the full spec is ", h("a", { href: "/openapi.json" }, "/openapi.json"), "."),
    h("table", { id: "endpoints" }, h("tr", {}, ["method", "path", "parameters", "summary", "what it answers"].map((t) => h("th", {}, t))), rows),
  );
}

// ---- router -------------------------------------------------------------------------------------------
async function route() {
  errorBox.hidden = true;
  document.querySelectorAll(".tooltip").forEach((t) => t.remove());
  const { parts, params } = parseHash();
  const view = parts[0] || "features";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === view || (view === "feature" && a.dataset.nav === "features") || (view === "graph" && a.dataset.nav === "graphs")));
  try {
    if (view === "feature") await featureView(parts, params);
    else if (view === "steer") await steerView(params);
    else if (view === "graphs") await graphsView();
    else if (view === "graph") await graphView(parts);
    else if (view === "audit") await auditView();
    else if (view === "api") await apiView();
    else await featuresView(params);
  } catch (err) {
    showError(err);
  }
}

async function start() {
  try {
    state.scan = await api("/api/scan");
    state.atlases = state.scan.atlases;
    state.atlas = state.atlases.length ? state.atlases[0].id : null;
    document.getElementById("scan-name").textContent = `${state.scan.root}${state.scan.model ? " · " + state.scan.model : ""}`;
    atlasSelect.replaceChildren(...state.atlases.map((a) => h("option", { value: a.id }, `${a.id} (${a.site}, ${a.n_features})`)));
    atlasSelect.addEventListener("change", () => {
      state.atlas = atlasSelect.value;
      const { parts } = parseHash();
      const view = parts[0] === "steer" ? "steer" : "features";
      setHash([view], { atlas: state.atlas });
    });
  } catch (err) {
    showError(err);
    return;
  }
  window.addEventListener("hashchange", route);
  await route();
  document.body.dataset.ready = "1";
}

start();
