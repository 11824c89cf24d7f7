"use strict";
// One job: its facts, live charts of the six step metrics (+ validation reward, + the handler's own
// metrics) with health alarms marked, a step's samples (each trajectory's turns: assistant text, tool calls, tool
// results), checkpoints, events (newest first), config, and its actions.
(async function () {
  C.header("jobs");
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const $ = (id) => document.getElementById(id);
  const api = "/v1/fine_tuning/jobs/" + encodeURIComponent(jobId);
  const state = { job: null, charts: {}, chartKeys: "", alarms: [], events: [], olderCursor: null, armed: null,
    sampleStep: null, sampleKey: "" };
  document.title = "grpo console: " + jobId;

  // -- facts, error, actions ------------------------------------------------------------------------------
  function renderJob(d) {
    const j = d.job;
    state.job = j;
    document.body.dataset.status = j.status;
    C.clear($("title"), C.el("span", { class: "mono", text: j.id }), " ", C.status(j.status));
    const fact = (label, value, mono) => C.el("div", {}, C.el("span", { text: label }),
      value instanceof Node ? value : C.el("b", { class: mono ? "mono" : null, text: value === null || value === undefined || value === "" ? "—" : value }));
    const hp = j.hyperparameters || {};
    C.clear($("facts"),
      fact("Name", C.jobName(j)), fact("Model", j.model, true), fact("Steps", C.steps(j)),
      fact("Created", C.time(j.created_at)), fact("Started", C.time(j.started_at)), fact("Finished", C.time(j.finished_at)),
      fact("Duration", C.duration(j.started_at, j.finished_at)),
      fact("Hyperparameters", `batch_size ${hp.batch_size}, n_epochs ${hp.n_epochs}, lr multiplier ${hp.learning_rate_multiplier}`),
      fact("Fine-tuned model", j.fine_tuned_model ? C.el("b", { class: "mono" }, j.fine_tuned_model, C.copyButton(j.fine_tuned_model)) : "—"),
      fact("Trained tokens", j.trained_tokens), fact("Training file", j.training_file, true),
      fact("Validation file", j.validation_file, true),
      fact("Compare", C.el("a", { href: "/console/compare?a=" + encodeURIComponent("job:" + j.id), text: "compare this run…" })));
    if (j.error && j.error.message) {
      C.clear($("error"), C.el("div", { class: "error-box", id: "job-error" }, C.el("b", { text: "The job failed" + (j.error.code ? ` (${j.error.code})` : "") + ":" }),
        C.el("pre", { text: j.error.message })));
    } else {
      C.clear($("error"));
    }
    $("config").textContent = d.config || "(no job.yaml)";
    renderActions(j);
  }

  function actionButton(action, label, danger) {
    const b = C.el("button", { type: "button", id: action, class: danger ? "danger" : null, text: label });
    b.addEventListener("click", async () => {
      if (danger && state.armed !== action) {  // a second click within 5 s confirms
        state.armed = action; b.classList.add("armed"); b.textContent = "Confirm: " + label.toLowerCase();
        setTimeout(() => { if (state.armed === action) { state.armed = null; renderActions(state.job); } }, 5000);
        return;
      }
      state.armed = null;
      b.disabled = true;
      try {
        await C.post(`${api}/${action}`);
        $("action-error").classList.add("hidden");
      } catch (e) {
        $("action-error").textContent = `${label} failed: ${e.message}`;
        $("action-error").classList.remove("hidden");
      }
      await refresh();
    });
    return b;
  }

  function renderActions(j) {
    if (state.armed) return;
    const buttons = [];
    if (C.actions.has("pause") && (j.status === "running" || j.status === "queued")) buttons.push(actionButton("pause", "Pause"));
    if (C.actions.has("resume") && j.status === "paused") buttons.push(actionButton("resume", "Resume"));
    if (C.actions.has("cancel") && !C.TERMINAL.has(j.status)) buttons.push(actionButton("cancel", "Cancel job", true));
    C.clear($("actions"), buttons);
  }

  // -- charts ---------------------------------------------------------------------------------------------
  function alarmMarks() {
    return state.alarms.map((a) => ({ x: a.step, name: a.name, color: a.level === "error" ? "#d13212" : "#b35900" }));
  }

  function panels(m) {
    const out = C.STEP_METRICS.map((key) => ({
      key, title: C.TITLES[key],
      series: key === "critic_rewards_mean"
        ? [{ key, label: "train", color: C.COLORS[0] }, { key: C.VAL, label: "validation", color: C.COLORS[1], dashed: true, points: true }]
        : [{ key, label: key, color: C.COLORS[0] }],
    }));
    if (m.reward_metrics.length) {
      out.push({ key: "reward_metrics", title: "reward handler metrics (metrics_list)",
        series: m.reward_metrics.map((k, i) => ({ key: k, label: k, color: C.COLORS[(i + 2) % C.COLORS.length] })) });
    }
    return out;
  }

  function renderCharts(m) {
    const box = $("charts");
    document.body.dataset.points = String(m.steps.length);
    if (!m.steps.length) {
      if (!Object.keys(state.charts).length) C.clear(box, C.el("p", { class: "empty", text: "No training step yet." }));
      return;
    }
    const list = panels(m);
    const keys = list.map((p) => p.key + ":" + p.series.map((s) => s.key).join(",")).join("|");
    const dataOf = (p) => [m.steps, ...p.series.map((s) => m.series[s.key] || m.steps.map(() => null))];
    if (keys !== state.chartKeys) {  // first data, or a metric appeared: build the panels
      for (const u of Object.values(state.charts)) u.destroy();
      state.charts = {};
      C.clear(box);
      for (const p of list) {
        state.charts[p.key] = C.chart(C.panel(box, p.key), p.title, p.series, dataOf(p), alarmMarks,
          { labels: p.key === "critic_rewards_mean" });
      }
      state.chartKeys = keys;
    } else {
      for (const p of list) state.charts[p.key].setData(dataOf(p));
    }
  }

  function renderAlarms() {
    if (!state.alarms.length) {
      C.clear($("alarms"), C.el("p", { class: "muted", text: "None so far (docs/health.md lists the rules)." }));
      return;
    }
    C.clear($("alarms"), C.el("table", { id: "alarms-table" },
      C.el("thead", {}, C.el("tr", {}, ["Step", "Alarm", "Level", "What it means"].map((h) => C.el("th", { text: h })))),
      C.el("tbody", {}, state.alarms.map((a) => C.el("tr", {},
        C.el("td", { class: "num", text: a.step }), C.el("td", { class: "mono", text: a.name }),
        C.el("td", {}, C.el("span", { class: "lvl lvl-" + String(a.level).replace(/[^a-z]/g, ""), text: a.level })),
        C.el("td", { text: a.message }))))));
  }

  // -- samples: a step's trajectories, turn by turn -----------------------------------------------------------
  function renderTurn(t) {
    const parts = [C.el("span", { class: "role", text: t.role === "tool" ? `tool ${t.name || ""}` : t.role })];
    if (t.reasoning) parts.push(C.el("details", {}, C.el("summary", { text: "reasoning" }), C.el("pre", { text: t.reasoning })));
    if (t.content) parts.push(C.el("pre", { class: "content", text: t.content }));
    for (const c of t.tool_calls || []) {
      parts.push(C.el("div", { class: "tool-call mono" }, "→ ", C.el("b", { text: c.name || "?" }), C.el("span", { text: `(${c.arguments || ""})` })));
    }
    if (!t.content && !(t.tool_calls || []).length) parts.push(C.el("pre", { class: "content muted", text: "(empty)" }));
    return C.el("div", { class: "turn turn-" + String(t.role).replace(/[^a-z]/g, "") }, parts);
  }

  function renderSamples(d) {
    const key = JSON.stringify([d.step, d.steps.length, d.samples.length]);
    if (key === state.sampleKey) return;
    state.sampleKey = key;
    const select = $("sample-step");
    C.clear(select, d.steps.slice().reverse().map((s) => C.el("option", { value: String(s), text: String(s) })));
    if (d.step !== null) select.value = String(d.step);
    $("samples").dataset.step = d.step === null ? "" : String(d.step);
    if (!d.samples.length) {
      C.clear($("samples"), C.el("p", { class: "muted", text: "No samples yet (written once a step ends)." }));
      return;
    }
    C.clear($("samples"), d.samples.map((s) => C.el("div", { class: "sample" },
      C.el("div", { class: "row muted" }, C.el("span", { class: "grow mono", text: `${s.id} #${s.sample}` }),
        C.el("span", { text: (s.truncated ? "truncated · " : "") + `${s.turns.length} message${s.turns.length === 1 ? "" : "s"} · reward ` }),
        C.el("b", { class: "score", text: s.score === null ? "not scored" : C.num(s.score) })),
      s.prompt ? C.el("div", { class: "turn turn-user" }, C.el("span", { class: "role", text: "user" }), C.el("pre", { class: "content", text: s.prompt })) : "",
      s.turns.map(renderTurn))));
  }

  async function loadSamples() {
    const q = state.sampleStep === null ? "" : `?step=${state.sampleStep}`;
    renderSamples(await C.getJSON(`/console/api/jobs/${encodeURIComponent(jobId)}/samples${q}`));
  }
  $("sample-step").addEventListener("change", async (ev) => {
    state.sampleStep = Number(ev.target.value);
    await loadSamples();
  });

  // -- checkpoints and events -------------------------------------------------------------------------------
  function renderCheckpoints(list) {
    if (!list.length) {
      C.clear($("checkpoints"), C.el("p", { class: "muted", text: "No checkpoint yet." }));
      return;
    }
    C.clear($("checkpoints"), C.el("table", { id: "checkpoints-table" },
      C.el("thead", {}, C.el("tr", {}, ["Step", "Saved", "Model id", "Reward"].map((h) => C.el("th", { text: h })))),
      C.el("tbody", {}, list.map((c) => C.el("tr", {},
        C.el("td", { class: "num", text: c.step_number }), C.el("td", { text: C.time(c.created_at) }),
        C.el("td", {}, C.el("code", { class: "model-id", text: c.fine_tuned_model_checkpoint }), C.copyButton(c.fine_tuned_model_checkpoint)),
        C.el("td", { class: "num", text: C.num((c.metrics || {}).critic_rewards_mean) }))))));
  }

  function eventDetail(e) {
    const d = e.data;
    if (!d || typeof d !== "object") return "";
    if (e.type === "metrics") return `reward ${C.num(d.critic_rewards_mean)}, loss ${C.num(d.actor_pg_loss)}`;
    return Object.entries(d).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join("  ");
  }

  function renderEvents() {
    const showMetrics = $("show-metrics").checked;
    const shown = state.events.filter((e) => showMetrics || e.type !== "metrics");
    C.clear($("events"), C.el("table", { id: "events-table" },
      C.el("thead", {}, C.el("tr", {}, ["Time", "Level", "Message", "Data"].map((h) => C.el("th", { text: h })))),
      C.el("tbody", {}, shown.map((e) => C.el("tr", { "data-event": e.id },
        C.el("td", { text: C.time(e.created_at) }),
        C.el("td", {}, C.el("span", { class: "lvl lvl-" + String(e.level).replace(/[^a-z]/g, ""), text: e.level })),
        C.el("td", { class: "message" }, C.el("pre", { text: e.message })),
        C.el("td", { class: "mono muted", text: eventDetail(e) }))))));
    const hidden = state.events.length - shown.length;
    $("events-note").textContent = hidden ? `${hidden} per-step metrics events hidden` : "";
    $("older").classList.toggle("hidden", !state.olderCursor);
  }

  async function loadEvents() {
    const page = await C.getJSON(`${api}/events?limit=100`);
    const have = new Set(state.events.map((e) => e.id));
    const fresh = page.data.filter((e) => !have.has(e.id));
    if (!state.events.length) state.olderCursor = page.has_more ? page.last_id : null;
    state.events = fresh.concat(state.events);
    renderEvents();
  }

  $("older").addEventListener("click", async () => {
    const page = await C.getJSON(`${api}/events?limit=100&after=${encodeURIComponent(state.olderCursor)}`);
    state.events = state.events.concat(page.data);
    state.olderCursor = page.has_more ? page.last_id : null;
    renderEvents();
  });
  $("show-metrics").addEventListener("change", renderEvents);

  // -- refresh loop -----------------------------------------------------------------------------------------
  let timer = null;
  async function refresh() {
    try {
      const [d, m, ck] = await Promise.all([C.getJSON(`/console/api/jobs/${encodeURIComponent(jobId)}`),
        C.getJSON(`/console/api/jobs/${encodeURIComponent(jobId)}/metrics`), C.getJSON(`${api}/checkpoints?limit=100`)]);
      state.alarms = m.alarms;
      renderJob(d);
      renderCharts(m);
      renderAlarms();
      renderCheckpoints(ck.data);
      await loadSamples();
      await loadEvents();
      $("updated").textContent = C.TERMINAL.has(d.job.status) ? "" : "live: updated " + C.time(Date.now() / 1000).slice(11);
      document.body.dataset.refreshes = String(+(document.body.dataset.refreshes || 0) + 1);  // all of it drawn
      // polling stops at the second refresh that finds the job ended (its last events can land just after)
      state.endedRefreshes = C.TERMINAL.has(d.job.status) ? (state.endedRefreshes || 0) + 1 : 0;
      if (state.endedRefreshes >= 2 && timer) { clearInterval(timer); timer = null; }
    } catch (e) {
      C.fail($("error"), e);
    }
  }
  await C.session();
  await refresh();
  if (!C.TERMINAL.has(state.job && state.job.status)) timer = setInterval(() => { if (!document.hidden) refresh(); }, 2000);
})();
