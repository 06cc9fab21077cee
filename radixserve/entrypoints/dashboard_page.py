"""The /dashboard page: one self-contained HTML document (no build step, no external
script or font: servers are often offline), plain JavaScript drawing SVG line charts
from /dashboard/data, polled every second, over the last five minutes (the page keeps
the samples: a reload starts afresh).

With --api-key the page reads the key from its URL fragment (/dashboard#key=...), which
the browser never sends to the server, and passes it on each poll."""

DASHBOARD_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>radixserve dashboard</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
  h1 { font-size: 18px; margin: 0 0 8px 0; }
  #status { font-size: 13px; margin-bottom: 12px; color: #555; }
  #status.error { color: #b00; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px; }
  .panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
  .panel h2 { font-size: 14px; margin: 0 0 4px 0; }
  .panel .now { font-size: 12px; color: #444; min-height: 16px; }
  .panel .note { font-size: 12px; color: #a60; }
  svg.chart { width: 100%; height: 160px; }
  svg.chart .axis { stroke: #bbb; stroke-width: 1; }
  svg.chart .label { font-size: 10px; fill: #777; }
  svg.chart path.series { fill: none; stroke-width: 1.5; }
  .legend span { font-size: 12px; margin-right: 10px; }
  #queue table { border-collapse: collapse; font-size: 12px; }
  #queue th, #queue td { text-align: left; padding: 2px 8px 2px 0; border-bottom: 1px solid #eee; }
</style>
</head>
<body>
<h1>radixserve</h1>
<div id="status">connecting...</div>
<div class="grid" id="panels"></div>
<div class="panel" id="queue" style="margin-top: 12px">
  <h2>Head of the waiting queue (longest wait first)</h2>
  <table><thead><tr><th>rid</th><th>dp rank</th><th>prompt tokens</th><th>waited (s)</th></tr>
  </thead><tbody id="queue-rows"></tbody></table>
  <div class="now" id="queue-empty">no request is waiting</div>
</div>
<script>
"use strict";
const WINDOW_S = 300;
const POLL_MS = 1000;
const W = 400, H = 150, PAD_L = 44, PAD_B = 14, PAD_T = 6;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

// Each chart: its series (name, label) and how a sample (with the previous one) gives
// their values; null is a gap (no data for that interval).
const CHARTS = [
  {id: "requests", title: "Requests", series: [["running", "running"], ["queued", "queued"]],
   values: (s) => [s.num_running_reqs, s.num_queue_reqs], fmt: (v) => v.toFixed(0)},
  {id: "kv", title: "KV cache token usage", series: [["usage", "used / capacity"]],
   values: (s) => [s.token_usage], fmt: (v) => (100 * v).toFixed(1) + "%", max: 1},
  {id: "radix", title: "Radix tree size (tokens)", series: [["tokens", "cached tokens"]],
   values: (s) => [s.radix_tree_tokens], fmt: (v) => v.toFixed(0)},
  {id: "throughput", title: "Generation throughput (token/s)", metrics: true,
   series: [["gen", "gen throughput"]],
   values: (s) => [s.gen_throughput], fmt: (v) => v.toFixed(1)},
  {id: "hit", title: "Cache hit rate (prompt tokens, per interval)",
   series: [["hit", "cached / (cached + computed)"]],
   values: (s, p) => {
     if (!p) return [null];
     const cached = s.total_cached_tokens - p.total_cached_tokens;
     const computed = s.total_prefill_tokens - p.total_prefill_tokens;
     return [cached + computed > 0 ? cached / (cached + computed) : null];
   }, fmt: (v) => (100 * v).toFixed(1) + "%", max: 1},
  {id: "ttft", title: "Time to first token (s, mean per interval)", metrics: true,
   series: [["ttft", "mean TTFT"]],
   values: (s, p) => {
     if (!p || s.ttft_count === null || p.ttft_count === null) return [null];
     const n = s.ttft_count - p.ttft_count;
     return [n > 0 ? (s.ttft_sum_s - p.ttft_sum_s) / n : null];
   }, fmt: (v) => v.toFixed(3)},
];

const SVG_NS = "http://www.w3.org/2000/svg";
const history = [];  // {t, values: {chartId: [..]}}
let previous = null;

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function buildPanels() {
  const root = document.getElementById("panels");
  for (const c of CHARTS) {
    const panel = document.createElement("div");
    panel.className = "panel";
    panel.id = "panel-" + c.id;
    const h = document.createElement("h2");
    h.textContent = c.title;
    panel.appendChild(h);
    const legend = document.createElement("div");
    legend.className = "legend";
    c.series.forEach(([, label], i) => {
      const span = document.createElement("span");
      span.style.color = COLORS[i];
      span.textContent = "\u25A0 " + label;
      legend.appendChild(span);
    });
    panel.appendChild(legend);
    const svg = el("svg", {"class": "chart", id: "chart-" + c.id, viewBox: `0 0 ${W} ${H}`,
                          preserveAspectRatio: "none"}, null);
    el("line", {"class": "axis", x1: PAD_L, y1: H - PAD_B, x2: W, y2: H - PAD_B}, svg);
    el("line", {"class": "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B}, svg);
    c.top = el("text", {"class": "label", x: 2, y: PAD_T + 8}, svg);
    el("text", {"class": "label", x: 2, y: H - PAD_B}, svg).textContent = "0";
    c.left = el("text", {"class": "label", x: PAD_L, y: H - 2}, svg);
    el("text", {"class": "label", x: W - 20, y: H - 2}, svg).textContent = "now";
    c.paths = c.series.map(([name], i) => el("path", {
      "class": "series", "data-series": name, "data-points": "0", d: "",
      stroke: COLORS[i]}, svg));
    panel.appendChild(svg);
    c.now = document.createElement("div");
    c.now.className = "now";
    panel.appendChild(c.now);
    c.note = document.createElement("div");
    c.note.className = "note";
    panel.appendChild(c.note);
    root.appendChild(panel);
  }
}

function redraw(nowT) {
  // The time axis spans the samples so far, from a minute up to the whole window.
  const span = Math.min(WINDOW_S, Math.max(60, nowT - history[0].t));
  for (const c of CHARTS) {
    c.left.textContent = `-${Math.round(span)}s`;
    let max = c.max || 0;
    if (!c.max) {
      for (const h of history) for (const v of h.values[c.id]) if (v !== null && v > max) max = v;
      max = max > 0 ? max * 1.1 : 1;
    }
    c.top.textContent = c.fmt(max);
    c.series.forEach((_, i) => {
      let d = "", points = 0, pen = false;
      for (const h of history) {
        const v = h.values[c.id][i];
        if (v === null || v === undefined) { pen = false; continue; }
        const x = PAD_L + (W - PAD_L) * (1 - (nowT - h.t) / span);
        const y = (H - PAD_B) - (H - PAD_B - PAD_T) * Math.min(v / max, 1);
        d += (pen ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1) + " ";
        pen = true;
        points += 1;
      }
      c.paths[i].setAttribute("d", d.trim());
      c.paths[i].setAttribute("data-points", String(points));
    });
  }
}

function showLatest(sample) {
  const latest = history[history.length - 1];
  for (const c of CHARTS) {
    const parts = c.series.map(([, label], i) => {
      const v = latest.values[c.id][i];
      return label + ": " + (v === null || v === undefined ? "-" : c.fmt(v));
    });
    c.now.textContent = parts.join("   ");
    c.note.textContent = c.metrics && !sample.metrics_enabled
      ? "needs --enable-metrics (the server runs without it)" : "";
  }
  document.getElementById("status").textContent =
    `${sample.num_used_tokens} of ${sample.max_total_num_tokens} KV tokens in use, ` +
    `${sample.num_pending_requests} requests pending, updated ` +
    new Date(sample.time * 1000).toLocaleTimeString();
}

function showQueue(head) {
  const body = document.getElementById("queue-rows");
  body.replaceChildren();
  for (const e of head) {
    const tr = document.createElement("tr");
    for (const v of [e.rid, e.dp_rank, e.prompt_tokens, e.waited_s.toFixed(2)]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  document.getElementById("queue-empty").style.display = head.length ? "none" : "";
}

function authHeaders() {
  const m = /(?:^#|&)key=([^&]*)/.exec(window.location.hash);
  return m ? {"Authorization": "Bearer " + decodeURIComponent(m[1])} : {};
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/dashboard/data", {headers: authHeaders(), cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status + (r.status === 401
      ? " (give the API key as /dashboard#key=...)" : ""));
    const sample = await r.json();
    const values = {};
    for (const c of CHARTS) values[c.id] = c.values(sample, previous);
    previous = sample;
    history.push({t: sample.time, values: values});
    while (history.length && history[0].t < sample.time - WINDOW_S) history.shift();
    status.className = "";
    redraw(sample.time);
    showLatest(sample);
    showQueue(sample.queue_head);
  } catch (e) {
    status.className = "error";
    status.textContent = "cannot reach the server: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}

buildPanels();
poll();
</script>
</body>
</html>
"""
