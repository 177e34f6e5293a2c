"""The monitor's single page: plain HTML, CSS and JavaScript, no CDN (it must work offline)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Corolla swarm monitor</title>
<style>
  :root { --bg: #f6f7f9; --fg: #1d2330; --muted: #677086; --card: #fff; --line: #e3e6ec;
          --red: #d93b3b; --amber: #f0a929; --lime: #8ccf5a; --green: #2f9e44; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         background: var(--bg); color: var(--fg); }
  header { padding: 14px 24px; display: flex; align-items: baseline; gap: 16px; background: var(--fg); color: #fff; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header .meta { color: #b7bfd1; font-size: 12px; }
  main { padding: 16px 24px 32px; max-width: 1200px; }
  #status { padding: 10px 14px; border-radius: 6px; font-weight: 600; margin-bottom: 16px; color: #fff; }
  #status.ok { background: var(--green); }
  #status.bad { background: var(--red); }
  #status.wait { background: var(--muted); }
  .model { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
           margin-bottom: 16px; }
  .model.unhealthy { border-color: var(--red); box-shadow: 0 0 0 2px rgba(217, 59, 59, .25); }
  .model h2 { font-size: 15px; margin: 0 0 2px; word-break: break-all; }
  .model .summary { color: var(--muted); margin-bottom: 10px; }
  .model.unhealthy .summary { color: var(--red); font-weight: 600; }
  .bar { display: flex; gap: 2px; height: 28px; margin-bottom: 4px; }
  .block { flex: 1; min-width: 3px; border-radius: 2px; }
  .block.c0 { background: var(--red); }
  .block.c1 { background: var(--amber); }
  .block.c2 { background: var(--lime); }
  .block.c3 { background: var(--green); }
  .axis { display: flex; justify-content: space-between; color: var(--muted); font-size: 11px; margin-bottom: 8px; }
  .legend { color: var(--muted); font-size: 12px; margin-bottom: 10px; }
  .legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; }
  table { width: 100%; border-collapse: collapse; font-size: 13px; }
  th { text-align: left; color: var(--muted); font-weight: 600; border-bottom: 1px solid var(--line); padding: 6px; }
  td { border-bottom: 1px solid var(--line); padding: 6px; font-variant-numeric: tabular-nums; }
  td.num, th.num { text-align: right; }
  .state-online { color: var(--green); font-weight: 600; }
  .state-joining { color: var(--amber); font-weight: 600; }
  .state-offline { color: var(--red); font-weight: 600; }
  code { font-size: 12px; color: var(--muted); }
  #empty { color: var(--muted); }
</style>
</head>
<body>
<header><h1>Corolla swarm monitor</h1><span class="meta" id="meta">connecting…</span></header>
<main>
  <div id="status" class="wait">Reading the swarm…</div>
  <div id="models"></div>
  <p id="empty" hidden>No model is announced in this swarm yet.</p>
</main>
<script>
"use strict";
let refreshSeconds = 5;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function colour(n) { return "c" + Math.min(n, 3); }

function fmt(n) { return n === null || n === undefined ? "\\u2014" : Number(n).toLocaleString("en-US"); }

function drawModel(m) {
  const box = el("section", { "class": "model" + (m.healthy ? "" : " unhealthy"), "data-model": m.name });
  box.appendChild(el("h2", {}, m.name));
  const online = m.servers.filter(s => s.state === "online").length;
  const summary = m.healthy
    ? `${m.num_blocks} blocks, all served \\u00b7 ${online} server(s) online`
    : `Missing block(s) ${m.missing} of ${m.num_blocks} \\u00b7 ${online} server(s) online`;
  box.appendChild(el("div", { "class": "summary" }, summary));
  const bar = el("div", { "class": "bar", "role": "img", "aria-label": "servers per block" });
  m.servers_per_block.forEach((n, i) => {
    bar.appendChild(el("div", { "class": "block " + colour(n), "data-block": String(i), "data-servers": String(n),
                                "title": `block ${i}: ${n} server(s)` }));
  });
  box.appendChild(bar);
  const axis = el("div", { "class": "axis" });
  axis.appendChild(el("span", {}, "block 0"));
  axis.appendChild(el("span", {}, `block ${m.num_blocks - 1}`));
  box.appendChild(axis);
  const legend = el("div", { "class": "legend" }, "servers per block:");
  [["c0", "none"], ["c1", "1"], ["c2", "2"], ["c3", "3+"]].forEach(([c, label]) => {
    legend.appendChild(el("i", { "class": "block " + c }));
    legend.appendChild(document.createTextNode(label));
  });
  box.appendChild(legend);
  const table = el("table", { "class": "servers" });
  const head = el("tr");
  [["Name", ""], ["Peer", ""], ["Span", ""], ["State", ""], ["Throughput (tok/s)", "num"],
   ["Free cache (tokens)", "num"], ["Weights", ""], ["Version", ""],
   ["Reached", "", "direct, or through a relay (peers cannot dial the server)"],
   ["Tokens served", "num", "tokens this server processed for clients since it started"]].forEach(([h, c, t]) => {
    head.appendChild(el("th", { ...(c ? { "class": c } : {}), ...(t ? { "title": t } : {}) }, h));
  });
  table.appendChild(el("thead")).appendChild(head);
  const body = table.appendChild(el("tbody"));
  for (const s of m.servers) {
    const row = el("tr", { "class": "server", "data-peer": s.peer_id, "data-state": s.state });
    row.appendChild(el("td", {}, s.public_name || "\\u2014"));
    const peer = row.appendChild(el("td"));
    peer.appendChild(el("code", { "title": s.peer_id }, "\\u2026" + s.peer_id.slice(-8)));
    row.appendChild(el("td", {}, `${s.start}:${s.end}`));
    row.appendChild(el("td", { "class": "state-" + s.state }, s.state));
    row.appendChild(el("td", { "class": "num" }, Number(s.throughput).toFixed(1)));
    row.appendChild(el("td", { "class": "num" }, fmt(s.cache_tokens_left)));
    row.appendChild(el("td", { "class": "weights", "title": (s.adapters || []).join(", ") }, s.weights || "\\u2014"));
    row.appendChild(el("td", {}, s.version || "\\u2014"));
    row.appendChild(el("td", s.relayed ? { "class": "relayed", "title": "relay " + (s.relay || "?") } : {},
                       s.relayed ? "relayed" : "direct"));
    row.appendChild(el("td", { "class": "num" }, fmt(s.tokens_served)));
    body.appendChild(row);
  }
  box.appendChild(table);
  return box;
}

function draw(state) {
  refreshSeconds = state.refresh_seconds || refreshSeconds;
  const status = document.getElementById("status");
  const broken = state.models.filter(m => !m.healthy);
  if (!state.updated) {
    status.className = "wait";
    status.textContent = state.error ? "Cannot read the swarm: " + state.error : "Reading the swarm\\u2026";
  } else if (broken.length) {
    status.className = "bad";
    status.textContent = broken.map(m => `${m.name}: missing block(s) ${m.missing}`).join("; ");
  } else if (state.models.length) {
    status.className = "ok";
    status.textContent = `All blocks of ${state.models.length} model(s) are served`;
  } else {
    status.className = "bad";
    status.textContent = "No model is announced in this swarm";
  }
  const models = document.getElementById("models");
  models.replaceChildren(...state.models.map(drawModel));
  document.getElementById("empty").hidden = state.models.length > 0;
  const age = state.updated ? Math.max(0, Date.now() / 1000 - state.updated).toFixed(0) + " s ago" : "never";
  document.getElementById("meta").textContent =
    `read ${age} \\u00b7 refreshes every ${refreshSeconds} s` + (state.error ? " \\u00b7 last read failed" : "");
  document.body.dataset.healthy = String(state.healthy);
  document.body.dataset.updated = String(state.updated);
}

async function tick() {
  try {
    const response = await fetch("api/v1/state", { cache: "no-store" });
    draw(await response.json());
  } catch (e) {
    document.getElementById("meta").textContent = "monitor unreachable: " + e;
  }
  setTimeout(tick, refreshSeconds * 1000);
}
tick();
</script>
</body>
</html>
"""
