"use strict";
// Two runs (jobs, or run directories pulled under the state dir's runs/) overlaid per metric, with
// `grpo compare`'s per-metric table and verdict, and each run's health alarms marked.
(async function () {
  C.header("compare");
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  let charts = [];

  function fillSelect(sel, jobs, runs, chosen) {
    const opts = [C.el("option", { value: "", text: "choose a run…" })];
    const jobGroup = C.el("optgroup", { label: "jobs" }, jobs.map((j) =>
      C.el("option", { value: "job:" + j.id, text: `${j.id} ${C.jobName(j)} (${j.status}, ${j.step || 0}/${j.total_steps || "?"} steps)` })));
    const runGroup = C.el("optgroup", { label: "pulled runs (state dir runs/)" }, runs.map((r) =>
      C.el("option", { value: "run:" + r.name, text: `runs/${r.name} (${r.step || 0}/${r.total_steps || "?"} steps)` })));
    C.clear(sel, opts, jobGroup, runGroup);
    sel.value = chosen || "";
  }

  function table(report) {
    const rows = Object.entries(report.metrics).map(([m, r]) => {
      const fmt = (v) => (r.kind === "rel" && typeof v === "number" ? (100 * v).toFixed(1) + "%" : C.num(v));
      const cells = "level_gap" in r
        ? [C.num(r.start_a), C.num(r.start_b), C.num(r.end_a), C.num(r.end_b), C.num(r.mean_a), C.num(r.mean_b),
           fmt(r.max_gap), r.corr === null ? "n/a" : r.corr.toFixed(2), fmt(r.level_gap)]
        : Array(9).fill("—");
      return C.el("tr", { "data-metric": m }, C.el("td", { class: "mono", text: m }),
        cells.map((c) => C.el("td", { class: "num", text: c })),
        C.el("td", { class: "num", text: fmt(r.tolerance) }),
        C.el("td", { class: "verdict-" + r.verdict.replace(/ /g, "-"), text: r.verdict }));
    });
    const head = ["metric", "start A", "start B", "end A", "end B", "mean A", "mean B", "max gap", "corr", "gap", "tol", "verdict"];
    return C.el("table", { id: "parity-table" }, C.el("thead", {}, C.el("tr", {}, head.map((h) => C.el("th", { class: h === "metric" ? null : "num", text: h })))),
      C.el("tbody", {}, rows));
  }

  function render(got) {
    const r = got.report, n = Object.keys(r.metrics).length;
    const verdict = r.verdict === "within" ? `WITHIN tolerance (${n}/${n} metrics)`
      : `OUTSIDE tolerance (${r.failing.length}/${n} metrics: ${r.failing.join(", ")})`;
    const alarmsOf = (key) => (r.alarms[key] || []).map((a) => `${a.name}@${a.step}`).join(", ") || "none";
    C.clear($("result"), C.el("div", { class: "card" },
      C.el("h2", {}, "verdict: ", C.el("span", { id: "verdict", class: "verdict-" + r.verdict, text: verdict })),
      C.el("p", {}, C.el("b", { text: "A " }), C.el("span", { class: "mono", text: r.run_a.label }), "   ",
        C.el("b", { text: "B " }), C.el("span", { class: "mono", text: r.run_b.label })),
      C.el("p", { class: "muted", id: "overlap", text: r.overlap }),
      table(r),
      C.el("p", { class: "muted", text: "gap: the largest of the start, mean and end gaps (relative ones in % of the larger level); start/end: first/last 10% of the overlap" }),
      r.skipped.length ? C.el("p", { class: "muted", text: "not compared (not in both runs): " + r.skipped.join(", ") }) : null,
      C.el("p", { class: "muted", text: `health alarms: A ${alarmsOf("run_a")}; B ${alarmsOf("run_b")}` })));

    for (const u of charts) u.destroy();
    charts = [];
    const box = $("charts");
    C.clear(box);
    $("charts-card").classList.remove("hidden");
    const frac = r.alignment === "fraction";
    const xs = (run) => run.steps.map((s) => (frac ? s / run.total_steps : s));
    const marks = ["a", "b"].flatMap((k, i) => (r.alarms["run_" + k] || []).map((a) =>
      ({ x: frac ? a.step / got[k].total_steps : a.step, name: `${k.toUpperCase()}: ${a.name}`, color: C.COLORS[i] })));
    // both runs on one x grid: the union of their x values, each run null where it has no point
    const xa = xs(got.a), xb = xs(got.b);
    const grid = Array.from(new Set(xa.concat(xb))).sort((p, q) => p - q);
    const ia = new Map(xa.map((x, i) => [x, i])), ib = new Map(xb.map((x, i) => [x, i]));
    const on = (run, index, m) => grid.map((x) => (index.has(x) ? (run.series[m] || [])[index.get(x)] ?? null : null));
    for (const m of Object.keys(r.metrics)) {
      const data = [grid, on(got.a, ia, m), on(got.b, ib, m)];
      const res = r.metrics[m];
      const title = `${C.TITLES[m] || m}: ${res.verdict}` + ("level_gap" in res ? ` (gap ${C.num(res.level_gap, 3)} / tol ${C.num(res.tolerance, 3)})` : "");
      const dashed = m === C.VAL;
      charts.push(C.chart(C.panel(box, m), title, [
        { label: "A " + r.run_a.label, color: C.COLORS[0], dashed, points: dashed },
        { label: "B " + r.run_b.label, color: C.COLORS[1], dashed: true, points: dashed }], data, () => marks,
      { labels: m === "critic_rewards_mean", xLabel: frac ? "fraction of training" : "step" }));
    }
    document.body.dataset.verdict = r.verdict;
  }

  async function compare(a, b) {
    C.clear($("result"), C.el("p", { class: "empty", text: "Comparing…" }));
    try {
      render(await C.getJSON(`/console/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`));
    } catch (e) {
      C.fail($("result"), e);
      $("charts-card").classList.add("hidden");
    }
  }

  await C.session();
  const got = await C.getJSON("/console/api/jobs");
  fillSelect($("a"), got.data, got.runs, params.get("a"));
  fillSelect($("b"), got.data, got.runs, params.get("b"));
  $("pick").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const a = $("a").value, b = $("b").value;
    if (!a || !b) return;
    history.replaceState(null, "", `/console/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    compare(a, b);
  });
  if (params.get("a") && params.get("b")) await compare(params.get("a"), params.get("b"));
  document.body.dataset.loaded = "1";
})();
