"use strict";
// Shared by the console's pages: DOM building (text only: every value from the server is set with
// textContent or as an attribute, never parsed as HTML), JSON calls with the session cookie, the CSRF
// header on POSTs, formatting, and uPlot charts with health alarms drawn where they fired.

const C = {};

C.el = function (tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
};

C.clear = function (node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
};

C.loginUrl = () => "/console/login?next=" + encodeURIComponent(location.pathname + location.search);

class ApiError extends Error {}

C.getJSON = async function (url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  return C._body(r);
};

C.post = async function (url) {
  const r = await fetch(url, {
    method: "POST", credentials: "same-origin", body: "{}",
    headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRF-Token": C.csrf || "" },
  });
  return C._body(r);
};

C._body = async function (r) {
  if (r.status === 401) {
    location.href = C.loginUrl();
    throw new ApiError("signed out");
  }
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new ApiError((body && body.error && body.error.message) || `HTTP ${r.status}`);
  return body;
};

// The session's CSRF token and the job actions this server's API has (pause/resume where it has them).
C.session = async function () {
  const s = await C.getJSON("/console/api/session");
  C.csrf = s.csrf;
  C.actions = new Set(s.actions || []);
  return s;
};

C.header = function (here) {
  const logout = C.el("button", { type: "button", text: "Sign out", id: "logout", onclick: async () => {
    try { await C.post("/console/logout"); } finally { location.href = "/console/login"; }
  } });
  const link = (href, text, key) => C.el("a", { href, text, class: here === key ? "here" : null });
  const top = C.el("header", { class: "top" }, C.el("a", { class: "brand", href: "/console/", text: "grpo console" }),
    C.el("nav", {}, link("/console/", "Jobs", "jobs"), link("/console/compare", "Compare", "compare")),
    C.el("span", { class: "spacer" }), logout);
  document.body.prepend(top);
};

C.pad = (n) => String(n).padStart(2, "0");
C.time = function (ts) {
  if (!ts) return "—";
  const d = new Date(ts * 1000);
  return `${d.getFullYear()}-${C.pad(d.getMonth() + 1)}-${C.pad(d.getDate())} ${C.pad(d.getHours())}:${C.pad(d.getMinutes())}:${C.pad(d.getSeconds())}`;
};
C.duration = function (a, b) {
  if (!a) return "—";
  let s = Math.max(0, Math.round((b || Date.now() / 1000) - a));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  s %= 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
};
C.num = function (v, digits = 4) {
  if (v === null || v === undefined) return "n/a";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : String(+v.toPrecision(digits));
};
C.status = (s) => C.el("span", { class: "status s-" + String(s).replace(/[^a-z_]/g, ""), text: String(s).replace(/_/g, " ") });
C.TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

C.jobName = function (job) {
  const m = job.metadata || {};
  return m.name || m.job_name || Object.entries(m).map(([k, v]) => `${k}=${v}`).join(", ");
};

C.steps = function (job) {
  if (!job.total_steps) return C.el("span", { class: "muted", text: job.step ? String(job.step) : "—" });
  const pct = Math.min(100, (100 * (job.step || 0)) / job.total_steps);
  const fill = C.el("i");
  fill.style.width = pct + "%";
  return C.el("span", {}, `${job.step || 0}/${job.total_steps}`, C.el("span", { class: "bar" }, fill));
};

C.copyButton = function (text) {
  const b = C.el("button", { type: "button", class: "copy", text: "copy" });
  b.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); b.textContent = "copied"; }
    catch (e) { b.textContent = "select it"; }
    setTimeout(() => { b.textContent = "copy"; }, 1500);
  });
  return b;
};

// -- charts -------------------------------------------------------------------------------------------
C.COLORS = ["#0972d3", "#e07941", "#2ea597", "#8456ce", "#c33d69", "#688ae8"];
C.TITLES = {
  critic_rewards_mean: "reward (critic_rewards_mean)",
  actor_pg_loss: "policy loss (actor_pg_loss)",
  actor_entropy: "entropy (actor_entropy)",
  actor_grad_norm: "grad norm (actor_grad_norm)",
  critic_advantages_mean: "advantages (critic_advantages_mean)",
  response_length_mean: "response length (response_length_mean)",
};
C.STEP_METRICS = Object.keys(C.TITLES);
C.VAL = "val_score_rewards_mean";

// alarms: () => [{x, name, color}]; `labels` writes the alarm names beside the lines (canvas text).
C.alarmPlugin = function (alarms, labels) {
  return { hooks: { draw: [(u) => {
    const ctx = u.ctx, { left, top, width, height } = u.bbox, dpr = uPlot.pxRatio;
    ctx.save();
    ctx.lineWidth = dpr;
    ctx.setLineDash([4 * dpr, 3 * dpr]);
    ctx.font = `${10 * dpr}px sans-serif`;
    for (const a of alarms()) {
      const x = Math.round(u.valToPos(a.x, "x", true));
      if (!(x >= left && x <= left + width)) continue;
      ctx.strokeStyle = a.color;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      if (labels) {
        ctx.save(); ctx.translate(x - 3 * dpr, top + 4 * dpr); ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "right"; ctx.fillStyle = a.color; ctx.fillText(a.name, 0, 0); ctx.restore();
      }
    }
    ctx.restore();
  }] } };
};

C.STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000];
// A tick label with as many decimals as the tick spacing needs (so close ticks never print alike).
C.tick = function (v, incr) {
  if (v === null || v === undefined) return "";
  if (Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-4 && incr < 1e-4)) return v.toExponential(1);
  let decimals = 0;  // the fewest that write the spacing exactly (0.025 -> 3)
  while (decimals < 8 && Math.abs(Math.round(incr * 10 ** decimals) - incr * 10 ** decimals) > 1e-6) decimals++;
  return v.toFixed(decimals);
};

// One panel: `series` = [{label, color, dashed, points}], data = [xs, ys...]. Resizes with its box.
C.chart = function (box, title, series, data, alarms, { labels = false, xLabel = "step" } = {}) {
  const width = () => Math.max(300, box.clientWidth - 8);
  const opts = {
    title, width: width(), height: 230,
    scales: { x: { time: false } },
    axes: [{ label: xLabel, labelSize: 18, size: 36, incrs: xLabel === "step" ? C.STEP_INCRS : undefined },
      { size: 62, values: (u, splits, ax, space, incr) => splits.map((v) => C.tick(v, incr)) }],
    series: [{ label: xLabel, value: (u, v) => (v === null || v === undefined ? "--" : C.num(v)) }].concat(series.map((s) => ({
      label: s.label, stroke: s.color, width: 1.6, spanGaps: true, dash: s.dashed ? [6, 4] : undefined,
      points: { show: s.points ? true : undefined, size: 5 },
      value: (u, v) => (v === null || v === undefined ? "--" : C.num(v)),
    }))),
    legend: { live: true },
    plugins: [C.alarmPlugin(alarms, labels)],
  };
  const u = new uPlot(opts, data, box);
  new ResizeObserver(() => { if (Math.abs(u.width - width()) > 4) u.setSize({ width: width(), height: 230 }); }).observe(box);
  return u;
};

C.panel = function (parent, key) {
  const box = C.el("div", { class: "chart", "data-metric": key });
  parent.append(box);
  return box;
};

C.fail = function (where, err) {
  C.clear(where, C.el("div", { class: "error-box", text: String(err && err.message ? err.message : err) }));
};
