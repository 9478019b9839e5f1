// scaletrain dashboard, per-rank panels of the focused run: the heatmap of
// per-rank, per-step times and the time breakdown as stacked bars. Loaded
// before dashboard.js, whose helpers (el, fmt, fmtBytes, median) it uses.
"use strict";

const PHASES = [["data_s", "data", "#a3a3a3"], ["forward_s", "forward", "#3b82f6"], ["backward_s", "backward", "#6366f1"],
  ["optimizer_s", "optimizer", "#10b981"], ["comm_wait_s", "comm wait", "#ef4444"], ["other_s", "other", "#f59e0b"]];

// Ranks of a synchronous job finish each step together, so step time alone hides a straggler: it shows in
// the time a rank spends on its own work, and its peers' in waiting (inside backward, in comm wait).
const HEAT_FIELDS = {
  own_work_s: ["own work (step − backward − comm wait)",
    r => (r.step_time_s == null ? null : r.step_time_s - (r.backward_s ?? 0) - (r.comm_wait_s ?? 0))],
  step_time_s: ["step time", r => r.step_time_s],
  ...Object.fromEntries(PHASES.map(([key, name]) => [key, [name, r => r[key]]])),
};
const heat = {cells: 0, steps: [], ranks: [], field: "own_work_s", hottest: null};

function heatColor(ratio) {
  // 1x the step's median: pale green; 2x and beyond: saturated red.
  const t = Math.min(1, Math.max(0, ratio - 1));
  return `hsl(${120 - 120 * t}, ${45 + 35 * t}%, ${82 - 32 * t}%)`;
}

function stepMedian(byRank) {
  return median([...byRank.values()].map(HEAT_FIELDS[heat.field][1]).filter(v => v != null));
}

function renderHeatmap(run) {
  const canvas = document.getElementById("heatmap");
  const value = HEAT_FIELDS[heat.field][1];
  const steps = [...run.ranks.keys()].sort((a, b) => a - b);
  const ranks = [...new Set(steps.flatMap(s => [...run.ranks.get(s).keys()]))].sort((a, b) => a - b);
  const left = 56, bottom = 18, cellH = Math.max(3, Math.min(18, Math.floor(400 / Math.max(1, ranks.length))));
  canvas.width = canvas.clientWidth || 800;
  canvas.height = ranks.length * cellH + bottom;
  const cellW = (canvas.width - left) / Math.max(1, steps.length);
  const ctx = canvas.getContext("2d");
  ctx.font = "11px system-ui";
  ctx.fillStyle = "#444";
  let cells = 0, hottest = null;
  steps.forEach((step, col) => {
    const byRank = run.ranks.get(step), mid = stepMedian(byRank);
    ranks.forEach((rank, row) => {
      const r = byRank.get(rank), v = r ? value(r) : null, ratio = mid > 0 ? v / mid : 1;
      ctx.fillStyle = v == null ? "#e5e7eb" : heatColor(ratio);
      ctx.fillRect(left + col * cellW, row * cellH, Math.max(1, cellW - 1), Math.max(1, cellH - 1));
      if (v == null) return;
      cells++;
      if (!hottest || ratio > hottest.ratio) hottest = {rank, step, ratio};
    });
  });
  ctx.fillStyle = "#444";
  if (cellH >= 10) ranks.forEach((rank, row) => ctx.fillText(`rank ${rank}`, 4, row * cellH + cellH - 4));
  if (steps.length) {
    ctx.fillText(`step ${steps[0]}`, left, canvas.height - 4);
    const last = `step ${steps[steps.length - 1]}`;
    ctx.fillText(last, canvas.width - ctx.measureText(last).width - 2, canvas.height - 4);
  } else {
    ctx.fillText("no per-rank rows (ranks.jsonl) yet", left, 14);
  }
  Object.assign(heat, {cells, hottest, steps, ranks, left, cellW, cellH, run});
  document.getElementById("heat-steps").textContent = steps.length;
  renderStragglers(run);
}

function renderStragglers(run) {
  // The trainer's own verdict (metrics' "stragglers": rank, ratio), last few logged steps that had one.
  const name = s => (s && typeof s === "object" ? `rank ${s.rank}${s.ratio ? ` (${fmt(s.ratio)}x)` : ""}` : `rank ${s}`);
  const flagged = [...run.metrics.values()].filter(r => r.stragglers?.length).slice(-5)
    .map(r => `step ${r.step}: ${r.stragglers.map(name).join(", ")}`);
  document.getElementById("stragglers").textContent =
    flagged.length ? `stragglers flagged by the trainer — ${flagged.join("; ")}` : "";
}

function describeCell(event) {
  const canvas = event.target, box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width, y = (event.clientY - box.top) * canvas.height / box.height;
  const step = heat.steps[Math.floor((x - heat.left) / heat.cellW)], rank = heat.ranks[Math.floor(y / heat.cellH)];
  const row = heat.run?.ranks.get(step)?.get(rank);
  if (x < heat.left || !row) return;
  const [name, value] = HEAT_FIELDS[heat.field], mid = stepMedian(heat.run.ranks.get(step));
  const parts = PHASES.map(([key, phase]) => `${phase} ${fmt(row[key])} s`).join(", ");
  document.getElementById("heat-info").textContent = `rank ${rank}, step ${step}: ${name} ${fmt(value(row))} s ` +
    `(${(value(row) / mid).toFixed(2)}x the step's median); step ${fmt(row.step_time_s)} s — ${parts}`;
}

function resourceNote(r) {
  const parts = [`rss ${fmtBytes(r.rss_bytes)}`];
  if (r.mem_allocated_bytes != null) parts.push(`gpu ${fmtBytes(r.mem_allocated_bytes)} / ${fmtBytes(r.mem_reserved_bytes)}`);
  if (r.cpu_util != null) parts.push(`cpu ${(100 * r.cpu_util).toFixed(0)}%`);
  if (r.gpu_util != null) parts.push(`gpu util ${fmt(r.gpu_util)}`);
  return parts.join(" · ");
}

function renderBreakdown(run) {
  // Each rank's mean phase times over the heatmap's steps; bars share one scale, so a longer bar is a slower rank.
  const byRank = new Map();
  for (const rows of run.ranks.values()) {
    for (const [rank, r] of rows) (byRank.get(rank) || byRank.set(rank, []).get(rank)).push(r);
  }
  const mean = (rows, key) => rows.reduce((sum, r) => sum + (r[key] ?? 0), 0) / rows.length;
  const lines = [...byRank.entries()].sort((a, b) => a[0] - b[0]).map(([rank, rows]) => ({rank,
    phases: PHASES.map(([key]) => mean(rows, key)), total: mean(rows, "step_time_s"), last: rows[rows.length - 1]}));
  const longest = Math.max(1e-12, ...lines.map(l => Math.max(l.total, l.phases.reduce((a, b) => a + b, 0))));
  const node = document.getElementById("breakdown");
  node.replaceChildren(...lines.map(line => el("div", {class: "bar-row"}, el("span", {class: "label"}, `rank ${line.rank}`),
    el("div", {class: "bar"}, ...line.phases.map((v, i) => el("span", {title: `${PHASES[i][1]} ${fmt(v)} s`,
      style: `width:${(100 * v / longest).toFixed(2)}%;background:${PHASES[i][2]}`}))),
    el("span", {class: "note"}, `${fmt(line.total)} s · ${resourceNote(line.last)}`))));
  if (!lines.length) node.append(el("div", {class: "empty"}, "no per-rank rows (ranks.jsonl) yet"));
}
