// The attribution graph viewer: nodes by layer (rows) and token position (columns), edges weighted and signed;
// hover to light a node's neighbourhood, click for details and a link to its feature page, shift-click or
// the button to pin, supernodes listed and optionally merged. Reads mri's and circuit-tracer's graph JSON.
const NS = "http://www.w3.org/2000/svg";
const ROW_H = 74, NODE_GAP = 22, MIN_COL = 64, MARGIN = 40;

function svg(tag, attrs = {}) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function kindOf(n) {
  const t = String(n.feature_type || "").toLowerCase();
  if (t === "embedding") return "token";
  if (t === "logit") return "logit";
  if (t.includes("error")) return "error";
  return "feature";
}

export function normalize(raw) {
  if (!raw || !Array.isArray(raw.nodes) || !Array.isArray(raw.links)) {
    throw new Error("not an attribution graph: it needs nodes and links (circuit-tracer / Neuronpedia JSON)");
  }
  const meta = raw.metadata || {};
  const q = raw.qParams || {};
  const nodes = raw.nodes.map((n) => {
    const id = String(n.node_id ?? n.nodeId ?? n.jsNodeId);
    const kind = kindOf(n);
    const layerNum = parseInt(n.layer, 10);
    let latent = null;
    if (kind === "feature") {
      const parts = id.split("_");
      latent = parts.length === 3 && parts.every((p) => /^\d+$/.test(p)) ? parseInt(parts[1], 10) : Number(n.feature);
    }
    return {
      id, kind, layer: Number.isNaN(layerNum) ? null : layerNum, pos: parseInt(n.ctx_idx, 10) || 0,
      clerp: n.clerp || n.ppClerp || "", activation: n.activation ?? null, influence: n.influence ?? null,
      prob: n.token_prob ?? null, latent, members: null,
    };
  });
  const maxLayer = Math.max(0, ...nodes.filter((n) => n.kind !== "logit" && n.layer !== null).map((n) => n.layer));
  for (const n of nodes) {
    if (n.kind === "token") n.row = 0;
    else if (n.kind === "logit") n.row = Math.max(maxLayer + 2, (n.layer ?? 0) + 1);
    else n.row = (n.layer ?? 0) + 1;
  }
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const links = raw.links
    .filter((l) => byId.has(String(l.source)) && byId.has(String(l.target)) && Number.isFinite(Number(l.weight)))
    .map((l) => ({ source: String(l.source), target: String(l.target), weight: Number(l.weight) }));
  const pinned = Array.isArray(q.pinnedIds) ? q.pinnedIds.map(String) : String(q.pinnedIds || "").split(",").filter(Boolean);
  const supernodes = (Array.isArray(q.supernodes) ? q.supernodes : [])
    .filter((s) => Array.isArray(s) && s.length > 1)
    .map(([label, ...ids]) => ({ label: String(label), ids: ids.map(String).filter((id) => byId.has(id)) }))
    .filter((s) => s.ids.length > 0);
  return { meta, nodes, links, pinned: pinned.filter((id) => byId.has(id)), supernodes };
}

function merged(graph) {
  // Each supernode becomes one node; its members' links are summed, links inside it dropped.
  const owner = new Map();
  const extra = graph.supernodes.map((s, i) => {
    const members = s.ids.map((id) => graph.nodes.find((n) => n.id === id));
    s.ids.forEach((id) => owner.set(id, `supernode:${i}`));
    const rows = members.map((m) => m.row);
    return {
      id: `supernode:${i}`, kind: "supernode", layer: members[0].layer, row: Math.max(...rows),
      pos: Math.round(members.reduce((a, m) => a + m.pos, 0) / members.length), clerp: s.label,
      activation: null, influence: null, prob: null, latent: null, members: s.ids,
    };
  });
  const nodes = [...graph.nodes.filter((n) => !owner.has(n.id)), ...extra];
  const sums = new Map();
  for (const l of graph.links) {
    const s = owner.get(l.source) || l.source, t = owner.get(l.target) || l.target;
    if (s === t) continue;
    const key = `${s}\u0000${t}`;
    sums.set(key, (sums.get(key) || 0) + l.weight);
  }
  const links = [...sums].map(([key, weight]) => { const [source, target] = key.split("\u0000"); return { source, target, weight }; });
  return { ...graph, nodes, links };
}

export function graphDictionaries(meta) {
  // What the graph file says its transcoders are, per layer ({layer: {fingerprint, config}} in
  // metadata.info.dictionary_identity); a graph without it (circuit-tracer's, or an old one) names its
  // transcoders only by folder name, which does not tell one dictionary from another.
  const identity = meta && meta.info && meta.info.dictionary_identity;
  if (!identity || typeof identity !== "object" || Array.isArray(identity)) return [];
  return Object.entries(identity)
    .filter(([layer, d]) => /^\d{1,4}$/.test(layer) && parseInt(layer, 10) <= 4096 && d && typeof d === "object")
    .map(([layer, d]) => ({
      layer: parseInt(layer, 10),
      fingerprint: typeof d.fingerprint === "string" ? d.fingerprint : null,
      config: d.config && typeof d.config === "object" && !Array.isArray(d.config) ? d.config : null,
    }));
}

export async function renderGraph(host, raw, { name, atlases, h, featureHref, api }) {
  const base = normalize(raw);
  const tokens = Array.isArray(base.meta.prompt_tokens) ? base.meta.prompt_tokens : [];
  const pinned = new Set(base.pinned);
  let selected = null, mergeSupernodes = false, threshold = 0;

  // A node's feature page is the atlas of the very dictionary the graph was traced with: the server
  // matches each layer's dictionary fingerprint (or config) against the atlases' manifests. A layer with
  // no such atlas gets no link — latent i of another dictionary at that layer is a different feature.
  const byLayer = new Map();
  let linkNote = "";
  const wanted = graphDictionaries(base.meta);
  if (wanted.length && atlases.length) {
    try {
      for (const r of await api("/api/graph-atlases", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ dictionaries: wanted }),
      })) {
        const atlas = r.atlas === null ? null : atlases.find((a) => a.id === r.atlas);
        if (atlas) byLayer.set(r.layer, atlas);
      }
    } catch (err) { linkNote = ` (${err.message})`; }
  }
  const atlasFor = (layer) => byLayer.get(layer) || null;

  const canvas = h("div", { class: "graph-canvas" });
  const side = h("div", { class: "graph-side" });
  const tooltip = h("div", { class: "tooltip", hidden: true });
  document.querySelectorAll(".tooltip").forEach((t) => t.remove());
  document.body.append(tooltip);
  const title = h("h1", {}, base.meta.slug || name || "graph");
  const subtitle = h("p", { class: "muted" },
    `${base.meta.prompt ? JSON.stringify(base.meta.prompt) + " · " : ""}${base.nodes.length} nodes · ${base.links.length} links` +
    `${base.meta.scan ? " · " + base.meta.scan : ""}`);
  host.replaceChildren(title, subtitle, h("div", { class: "graph-wrap" }, canvas, side));

  function label(n) {
    if (n.kind === "token") return `token ${JSON.stringify(tokens[n.pos] ?? "")} @${n.pos}`;
    if (n.kind === "logit") return n.clerp || `logit ${n.id}`;
    if (n.kind === "error") return `error L${n.layer} @${n.pos}`;
    if (n.kind === "supernode") return `${n.clerp} (${n.members.length} features)`;
    return `L${n.layer} #${n.latent} @${n.pos}${n.clerp ? " — " + n.clerp : ""}`;
  }

  function draw() {
    tooltip.hidden = true;
    const graph = mergeSupernodes ? merged(base) : base;
    const byId = new Map(graph.nodes.map((n) => [n.id, n]));
    const maxW = Math.max(1e-12, ...graph.links.map((l) => Math.abs(l.weight)));
    const rows = [...new Set(graph.nodes.map((n) => n.row))].sort((a, b) => a - b);
    const rowIndex = new Map(rows.map((r, i) => [r, i]));
    const nPos = Math.max(tokens.length, ...graph.nodes.map((n) => n.pos + 1));
    const cells = new Map();
    for (const n of graph.nodes) {
      const key = `${n.row}:${n.pos}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const widths = Array.from({ length: nPos }, (_, p) =>
      Math.max(MIN_COL, ...rows.map((r) => ((cells.get(`${r}:${p}`) || []).length + 1) * NODE_GAP)));
    const xs = [];
    widths.reduce((x, w, p) => { xs[p] = x; return x + w; }, MARGIN);
    const W = MARGIN * 2 + widths.reduce((a, b) => a + b, 0);
    const H = MARGIN + rows.length * ROW_H + 40;
    for (const [key, list] of cells) {
      const [row, pos] = key.split(":").map(Number);
      list.sort((a, b) => (b.influence ?? 0) - (a.influence ?? 0));
      list.forEach((n, i) => {
        n.x = xs[pos] + (widths[pos] - (list.length - 1) * NODE_GAP) / 2 + i * NODE_GAP;
        n.y = MARGIN + (rows.length - 1 - rowIndex.get(row)) * ROW_H + ROW_H / 2;
      });
    }
    const root = svg("svg", { width: W, height: H, id: "graph-svg" });
    rows.forEach((r, i) => {
      const y = MARGIN + (rows.length - 1 - i) * ROW_H + ROW_H / 2;
      const name = r === 0 ? "emb" : graph.nodes.some((n) => n.row === r && n.kind === "logit") ? "logit" : `L${r - 1}`;
      const t = svg("text", { x: 4, y: y + 4, class: "axis" });
      t.textContent = name;
      root.append(t);
    });
    for (let p = 0; p < nPos; p++) {
      const t = svg("text", { x: xs[p] + widths[p] / 2, y: H - 12, class: "axis", "text-anchor": "middle" });
      t.textContent = tokens[p] === undefined ? String(p) : JSON.stringify(tokens[p]).slice(1, -1).slice(0, 12);
      root.append(t);
    }
    const edgeEls = [];
    const edgesLayer = svg("g");
    for (const l of graph.links) {
      if (Math.abs(l.weight) < threshold * maxW) continue;
      const s = byId.get(l.source), t = byId.get(l.target);
      const midY = (s.y + t.y) / 2;
      const path = svg("path", {
        d: `M${s.x},${s.y} C${s.x},${midY} ${t.x},${midY} ${t.x},${t.y}`,
        class: "edge", stroke: l.weight >= 0 ? "#2a6fdb" : "#d0463b",
        "stroke-width": (0.4 + 3.6 * Math.abs(l.weight) / maxW).toFixed(2),
        "stroke-opacity": (0.15 + 0.6 * Math.abs(l.weight) / maxW).toFixed(2),
      });
      path.dataset.source = l.source; path.dataset.target = l.target;
      edgeEls.push(path);
      edgesLayer.append(path);
    }
    root.append(edgesLayer);
    const nodeEls = new Map();
    for (const n of graph.nodes) {
      const fill = { feature: "#e0a040", error: "#aaa", token: "#6aa84f", logit: "#8e7cc3", supernode: "#f1c232" }[n.kind];
      const el = n.kind === "feature"
        ? svg("circle", { cx: n.x, cy: n.y, r: 7 })
        : n.kind === "supernode"
          ? svg("rect", { x: n.x - 10, y: n.y - 8, width: 20, height: 16, rx: 6 })
          : svg("rect", { x: n.x - 7, y: n.y - 7, width: 14, height: 14, rx: n.kind === "error" ? 0 : 3 });
      el.setAttribute("fill", fill);
      el.setAttribute("class", `node ${n.kind}${pinned.has(n.id) ? " pinned" : ""}${selected === n.id ? " selected" : ""}`);
      el.dataset.id = n.id;
      el.dataset.kind = n.kind;
      el.addEventListener("mouseenter", (e) => hover(n, e));
      el.addEventListener("mousemove", (e) => place(e));
      el.addEventListener("mouseleave", unhover);
      el.addEventListener("click", (e) => (e.shiftKey ? togglePin(n.id) : select(n.id)));
      nodeEls.set(n.id, el);
      root.append(el);
    }

    function light(ids, lit) {
      root.classList.add("hovering");
      for (const id of ids) nodeEls.get(id)?.classList.add("lit");
      for (const e of edgeEls) if (lit(e.dataset.source, e.dataset.target)) e.classList.add("lit");
    }
    function hover(n, e) {
      const ids = new Set([n.id]);
      for (const l of graph.links) {
        if (l.source === n.id) ids.add(l.target);
        if (l.target === n.id) ids.add(l.source);
      }
      light(ids, (s, t) => s === n.id || t === n.id);
      const parts = [label(n)];
      if (n.activation !== null) parts.push(`activation ${Number(n.activation).toPrecision(3)}`);
      if (n.influence !== null) parts.push(`influence ${Number(n.influence).toPrecision(3)}`);
      if (n.prob !== null && n.kind === "logit") parts.push(`p ${Number(n.prob).toPrecision(3)}`);
      tooltip.textContent = parts.join(" · ");
      tooltip.hidden = false;
      place(e);
    }
    function place(e) { tooltip.style.left = `${e.clientX + 14}px`; tooltip.style.top = `${e.clientY + 10}px`; }
    function unhover() {
      tooltip.hidden = true;
      root.classList.remove("hovering");
      root.querySelectorAll(".lit").forEach((el) => el.classList.remove("lit"));
    }
    draw.highlight = (ids) => { const s = new Set(ids); light(s, (a, b) => s.has(a) && s.has(b)); };
    draw.clear = unhover;
    canvas.replaceChildren(root);
    drawSide(graph, byId);
  }

  function select(id) { selected = id; draw(); }
  function togglePin(id) { if (pinned.has(id)) pinned.delete(id); else pinned.add(id); draw(); }

  function nodeLink(graph, id) {
    const n = graph.nodes.find((m) => m.id === id);
    return h("a", { href: "#", onclick: (e) => { e.preventDefault(); select(id); } }, n ? label(n) : id);
  }

  function drawSide(graph, byId) {
    const parts = [];
    const thresholdInput = h("input", { type: "range", id: "edge-threshold", min: 0, max: 0.9, step: 0.05, value: threshold });
    thresholdInput.addEventListener("change", () => { threshold = parseFloat(thresholdInput.value); draw(); });
    const mergeBox = h("input", { type: "checkbox", id: "merge-supernodes", checked: mergeSupernodes, disabled: !base.supernodes.length });
    mergeBox.addEventListener("change", () => { mergeSupernodes = mergeBox.checked; selected = null; draw(); });
    parts.push(h("section", {}, h("label", {}, "hide edges under ", thresholdInput, ` ${Math.round(threshold * 100)}% of the strongest`),
      h("br"), h("label", {}, mergeBox, " merge supernodes"),
      h("p", { class: "muted" }, "Hover: neighbourhood · click: details · shift-click: pin. Blue edges excite, red inhibit.")));
    const n = selected ? byId.get(selected) : null;
    if (n) {
      const rows = [["id", n.id], ["kind", n.kind], ["layer", n.layer ?? "–"], ["position", n.pos]];
      if (n.activation !== null) rows.push(["activation", Number(n.activation).toPrecision(4)]);
      if (n.influence !== null) rows.push(["influence", Number(n.influence).toPrecision(4)]);
      const incoming = graph.links.filter((l) => l.target === n.id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10);
      const outgoing = graph.links.filter((l) => l.source === n.id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10);
      const atlas = n.kind === "feature" && n.layer !== null ? atlasFor(n.layer) : null;
      const edgeList = (list, end) => list.length
        ? h("ul", {}, list.map((l) => h("li", {}, `${l.weight >= 0 ? "+" : ""}${l.weight.toPrecision(3)} `, nodeLink(graph, l[end]))))
        : h("p", { class: "muted" }, "none");
      parts.push(h("section", { id: "node-detail" },
        h("h3", {}, label(n)),
        h("dl", { class: "kv" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
        atlas ? h("p", {}, h("a", { href: featureHref(atlas.id, n.latent), id: "open-feature" }, `open feature #${n.latent} (${atlas.id})`))
          : n.kind === "feature" ? h("p", { class: "muted", id: "no-feature-page" }, `no atlas of this transcoder in this scan${linkNote}`) : "",
        h("button", { id: "pin", onclick: () => togglePin(n.id) }, pinned.has(n.id) ? "unpin" : "pin"),
        n.members ? [h("h3", {}, "Members"), h("ul", {}, n.members.map((id) => h("li", {}, label(base.nodes.find((m) => m.id === id)))))] : "",
        h("h3", {}, "Strongest inputs"), edgeList(incoming, "source"),
        h("h3", {}, "Strongest outputs"), edgeList(outgoing, "target")));
    }
    parts.push(h("section", { id: "pinned" }, h("h3", {}, `Pinned (${pinned.size})`),
      pinned.size ? h("ul", {}, [...pinned].map((id) => h("li", {}, nodeLink(graph, id), " ",
        h("button", { title: "unpin", onclick: () => togglePin(id) }, "×")))) : h("p", { class: "muted" }, "none")));
    parts.push(h("section", { id: "supernodes" }, h("h3", {}, `Supernodes (${base.supernodes.length})`),
      base.supernodes.length ? h("ul", {}, base.supernodes.map((s) => h("li", {
        onmouseenter: () => draw.highlight(s.ids), onmouseleave: () => draw.clear(),
      }, `${s.label} (${s.ids.length})`))) : h("p", { class: "muted" }, "none")));
    side.replaceChildren(...parts);
  }

  draw();
}
