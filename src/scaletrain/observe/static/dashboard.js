// scaletrain dashboard: polls the server's JSON API and draws every run it
// serves. Curves overlay all runs; the per-rank panels and tables show the
// run chosen in "details of". Each stream is read from a cursor, so a poll
// moves only new rows. The per-rank panels are in ranks.js.
"use strict";

const POLL_MS = 2000;
const RANK_WINDOW = 120;      // logged steps kept for the heatmap and breakdown
const RANK_ROWS_FIRST = -20000; // first read of ranks.jsonl: its tail only
const KEEP_ROWS = 1000;       // alerts and events kept per run
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const CHARTS = [
  {id: "loss", title: "loss", fields: ["loss", "val_loss"]},
  {id: "lr", title: "learning rate", fields: ["lr"]},
  {id: "grad_norm", title: "gradient norm", fields: ["grad_norm"]},
  {id: "tokens_per_s", title: "throughput (tokens / s)", fields: ["tokens_per_s"]},
  {id: "mfu", title: "MFU", fields: ["mfu"], empty: "no MFU: the device's peak FLOP/s is unknown (e.g. on CPU)"},
  {id: "memory", title: "peak memory", fields: ["mem_peak_bytes"], bytes: true},
];

// Whole steps on the x axis: 1, 2, 5, 10, 20, 50, ...
const STEP_INCREMENTS = [1, 2, 5].flatMap(m => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map(e => m * e)).sort((a, b) => a - b);

const runs = [];
let focus = 0;
let xField = "step"; // or "tokens": compares runs of different batch sizes

// ---- helpers --------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}
function fmt(v) {
  if (v == null) return "–";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(2) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toPrecision(4);
}
function fmtBytes(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function clock(unixS) { return unixS == null ? "–" : new Date(unixS * 1000).toLocaleTimeString(); }
function median(values) {
  const s = [...values].sort((a, b) => a - b);
  return s.length ? (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2 : NaN;
}
async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}
function table(id, header, rows, empty) {
  const node = document.getElementById(id);
  node.replaceChildren();
  if (!rows.length) { node.append(el("tr", {}, el("td", {class: "empty"}, empty))); return; }
  node.append(el("tr", {}, ...header.map(h => el("th", {}, h))));
  for (const {cells, cls} of rows) node.append(el("tr", {class: cls || ""}, ...cells.map(c => el("td", {}, c))));
}

// ---- polling --------------------------------------------------------------
function newRun(info) {
  return {index: info.index, info, color: PALETTE[info.index % PALETTE.length], status: null, changed: true,
    cursor: {metrics: {}, ranks: {}, alerts: {}, events: {}},
    metrics: new Map(), fields: new Set(), ranks: new Map(), alerts: [], events: []};
}

function clearStream(run, name) {
  if (name === "metrics") run.fields = new Set();
  run[name] = name === "metrics" || name === "ranks" ? new Map() : [];
}

function addRows(run, name, rows) {
  if (name === "metrics") {
    // A step logged twice (e.g. a separate val_loss line) merges; the later value wins. A rollback
    // rewrites the file, which restarts the stream instead.
    for (const r of rows) {
      run.metrics.set(r.step, {...run.metrics.get(r.step), ...r});
      for (const [k, v] of Object.entries(r)) if (v != null) run.fields.add(k);
    }
  } else if (name === "ranks") {
    for (const r of rows) {
      if (!run.ranks.has(r.step)) run.ranks.set(r.step, new Map());
      run.ranks.get(r.step).set(r.rank, r);
    }
    const steps = [...run.ranks.keys()].sort((a, b) => a - b);
    for (const s of steps.slice(0, Math.max(0, steps.length - RANK_WINDOW))) run.ranks.delete(s);
  } else {
    run[name].push(...rows);
    run[name].splice(0, Math.max(0, run[name].length - KEEP_ROWS));
  }
}

async function pollStream(run, name) {
  const cursor = run.cursor[name];
  for (let page = 0; page < 50; page++) { // bounded catch-up per poll
    const since = cursor.since ?? (name === "ranks" ? RANK_ROWS_FIRST : 0);
    const gen = cursor.gen == null ? "" : `&gen=${cursor.gen}`;
    const got = await getJSON(`/api/runs/${run.index}/${name}?since=${since}${gen}`);
    if (got.reset) clearStream(run, name);
    cursor.gen = got.gen;
    cursor.since = got.next;
    if (got.rows.length || got.reset) { addRows(run, name, got.rows); run.changed = true; }
    if (got.next >= got.total) return;
  }
}

async function poll() {
  const infos = await getJSON("/api/runs");
  for (const info of infos) {
    if (runs[info.index]) runs[info.index].info = info; else runs[info.index] = newRun(info);
  }
  await Promise.all(runs.map(async run => {
    await Promise.all(Object.keys(run.cursor).map(name => pollStream(run, name)));
    run.status = await getJSON(`/api/runs/${run.index}/status`);
  }));
}

async function tick() {
  try {
    await poll();
    document.getElementById("connection").textContent = "";
  } catch (err) {
    document.getElementById("connection").textContent = `server unreachable (${err.message}); retrying`;
  }
  render();
  window.dashboard.ticks++;
  setTimeout(tick, POLL_MS);
}

// ---- curves ---------------------------------------------------------------
const charts = {};

function seriesOf(spec) {
  // One series per run and field, leaving out fields no run has logged (val_loss without validation).
  const out = [];
  for (const run of runs) {
    for (const field of spec.fields) {
      if (field !== spec.fields[0] && !run.fields.has(field)) continue;
      out.push({run, field, label: `${run.info.name} · ${field}`});
    }
  }
  return out;
}

function rowsByX() {
  // Each run's rows keyed by the x axis field.
  return runs.map(run => (xField === "step" ? run.metrics
    : new Map([...run.metrics.values()].filter(r => r[xField] != null).map(r => [r[xField], r]))));
}

function chartData(series, byX) {
  // uPlot wants one x array for all series: the union of every run's x values, nulls where a run has none.
  const xs = [...new Set(byX.flatMap(rows => [...rows.keys()]))].sort((a, b) => a - b);
  return [xs, ...series.map(({run, field}) => xs.map(x => byX[run.index].get(x)?.[field] ?? null))];
}

function makeChart(spec, series, data) {
  const card = document.getElementById(`chart-${spec.id}`);
  const plot = card.querySelector(".plot");
  plot.replaceChildren();
  const yValues = spec.bytes ? (u, vals) => vals.map(fmtBytes) : (u, vals) => vals.map(fmt);
  const opts = {
    width: Math.max(200, plot.clientWidth), height: 220, legend: {live: true},
    scales: {x: {time: false}},
    axes: [{label: xField, incrs: xField === "step" ? STEP_INCREMENTS : undefined, values: xField === "step" ? undefined
      : (u, vals) => vals.map(fmt)}, {values: yValues, size: spec.bytes ? 80 : 64}],
    series: [{label: xField}, ...series.map(({run, field}) => ({
      label: `${run.info.name} · ${field}`, stroke: run.color, width: 1.5, spanGaps: true,
      dash: field === "val_loss" ? [6, 4] : undefined,
      value: (u, v) => (spec.bytes ? fmtBytes(v) : fmt(v)),
    }))],
  };
  return new uPlot(opts, data, plot);
}

function renderCharts() {
  const container = document.getElementById("charts");
  if (!container.children.length) {
    for (const spec of CHARTS) {
      container.append(el("div", {class: "card", id: `chart-${spec.id}`, "data-points": "0"},
        el("h2", {}, spec.title), el("div", {class: "muted note"}), el("div", {class: "plot"})));
    }
    new ResizeObserver(() => {
      for (const c of Object.values(charts)) c.plot.setSize({width: c.plot.root.parentNode.clientWidth, height: 220});
    }).observe(container);
  }
  if (!runs.some(r => r.changed)) return;
  const byX = rowsByX();
  for (const spec of CHARTS) {
    const series = seriesOf(spec);
    const data = chartData(series, byX);
    const signature = [xField, ...series.map(s => s.label)].join("|");
    if (!charts[spec.id] || charts[spec.id].signature !== signature) {
      const old = charts[spec.id]?.plot, sameX = old?.series[0].label === xField;
      const zoom = sameX && isZoomed(old) && {min: old.scales.x.min, max: old.scales.x.max};
      old?.destroy();
      charts[spec.id] = {plot: makeChart(spec, series, data), signature};
      if (zoom) charts[spec.id].plot.setScale("x", zoom);
    } else {
      const plot = charts[spec.id].plot;
      plot.setData(data, !isZoomed(plot)); // new steps keep a user's zoom (drag to zoom, double-click resets)
    }
    const card = document.getElementById(`chart-${spec.id}`);
    const total = data.slice(1).reduce((n, ys) => n + ys.filter(y => y != null).length, 0);
    card.dataset.points = total;
    card.querySelector(".note").textContent = total === 0 && data[0].length ? (spec.empty || "no values logged") : "";
  }
}

function isZoomed(plot) {
  const xs = plot.data[0], {min, max} = plot.scales.x;
  return xs.length > 1 && (min > xs[0] || max < xs[xs.length - 1]);
}

function points(chartId) {
  // Non-null points each series of a chart holds, by series label (for tests and curious users).
  const plot = charts[chartId]?.plot;
  if (!plot) return {};
  return Object.fromEntries(plot.series.slice(1).map((s, i) => [s.label, plot.data[i + 1].filter(y => y != null).length]));
}

// ---- tables ---------------------------------------------------------------
function renderFiring() {
  // The last state of each alert name, over every run: what is firing now.
  const node = document.getElementById("firing");
  node.replaceChildren();
  for (const run of runs) {
    const last = new Map(run.alerts.map(a => [a.name, a]));
    for (const a of last.values()) {
      if (a.state !== "firing") continue;
      node.append(el("div", {class: a.severity}, `${run.info.name}: ${a.name} (${a.severity}) since step ${a.step} — ${a.message}`));
    }
  }
}

function renderTables(run) {
  const newest = rows => [...rows].reverse().slice(0, 200);
  table("alerts", ["time", "step", "severity", "name", "state", "message", "value"], newest(run.alerts).map(a =>
    ({cls: `${a.state} ${a.severity}`, cells: [clock(a.time), a.step, a.severity, a.name, a.state, a.message, fmt(a.value)]})),
  "no alerts");
  table("events", ["time", "step", "kind", "rank", "detail"], newest(run.events).map(e =>
    ({cells: [clock(e.time), e.step, e.kind, e.rank, e.detail]})), "no events");
  const status = run.status || {};
  table("checkpoints", ["step", "valid", "size", "saved"], newest(status.checkpoints || []).map(c =>
    ({cls: c.valid || c.checking ? "" : "invalid",
      cells: [c.step, c.checking ? "checking…" : c.valid ? "valid" : `invalid: ${c.problem}`, fmtBytes(c.bytes), clock(c.time)]})),
  "no checkpoints");
  const summary = Object.entries(status.summary || {}).filter(([, v]) => !Array.isArray(v) || v.length);
  table("summary", ["key", "value"], summary.map(([k, v]) =>
    ({cells: [k, typeof v === "object" && v !== null ? JSON.stringify(v).slice(0, 160) : fmt(v)]})),
  "no summary yet (written when the run ends)");
  document.getElementById("config").textContent = status.config ?? "no config.toml";
  renderHang(status.hang_report);
}

function renderHang(report) {
  // The same lines as the watchdog's summary on stderr.
  document.getElementById("hang").hidden = !report;
  if (!report) return;
  const lines = [`trigger: ${report.trigger}`, `likely cause: ${report.likely_cause}`,
    `suspect rank(s): ${(report.suspect_ranks || []).join(", ") || "none identified"}`,
    ...(report.ranks || []).map(r => `  rank ${r.rank}: step ${r.step} phase ${r.phase} collectives ${r.collectives} ` +
      `${r.in_collective ? `in ${r.in_collective} ` : ""}at ${r.at || "no dump (unreachable)"}`)];
  document.getElementById("hang-body").replaceChildren(el("pre", {}, lines.join("\n")));
}

function renderRuns() {
  const header = document.getElementById("runs"), select = document.getElementById("focus");
  header.replaceChildren(...runs.map(run => {
    let last = null, skipped = 0;
    for (const r of run.metrics.values()) { last = Math.max(last ?? r.step, r.step); skipped += r.skipped ? 1 : 0; }
    const idle = run.info.state === "running" && run.info.idle_s != null ? ` · written ${fmt(Math.round(run.info.idle_s))} s ago` : "";
    return el("span", {class: "run-tag", title: run.info.path},
      el("span", {class: "swatch", style: `background:${run.color}`}), run.info.name,
      el("span", {class: `state ${run.info.state.split(" ")[0]}`}, run.info.state),
      last == null ? "no steps yet" : `step ${last}`, skipped ? ` · ${skipped} skipped` : "", idle);
  }));
  if (select.options.length !== runs.length) {
    select.replaceChildren(...runs.map(run => el("option", {value: run.index}, run.info.name)));
    select.value = focus;
  }
}

function render() {
  renderRuns();
  renderCharts();
  renderFiring();
  const run = runs[focus];
  if (run) {
    document.getElementById("focus-state").textContent = `${run.info.path} · ${run.info.state}`;
    renderHeatmap(run);
    renderBreakdown(run);
    renderTables(run);
  }
  for (const r of runs) r.changed = false;
}

window.dashboard = {runs, charts, ticks: 0, points, heatmapCells: () => heat.cells, heatmapHottest: () => heat.hottest};
document.getElementById("breakdown-legend").append(...PHASES.map(([, name, color]) =>
  el("span", {}, el("span", {class: "swatch", style: `background:${color}`}), ` ${name}`)));
const heatSelect = document.getElementById("heat-field");
heatSelect.append(...Object.entries(HEAT_FIELDS).map(([key, [name]]) => el("option", {value: key}, name)));
heatSelect.addEventListener("change", e => { heat.field = e.target.value; render(); });
document.getElementById("x-field").addEventListener("change", e => {
  xField = e.target.value;
  for (const run of runs) run.changed = true;
  render();
});
document.getElementById("focus").addEventListener("change", e => { focus = Number(e.target.value); render(); });
document.getElementById("heatmap").addEventListener("mousemove", describeCell);
tick();
