"use strict";
// The jobs list: every job with its status, model, steps and times, refreshed every few seconds.
(async function () {
  C.header("jobs");
  const jobsBox = document.getElementById("jobs"), runsBox = document.getElementById("runs");

  function jobsTable(jobs) {
    if (!jobs.length) return C.el("p", { class: "empty", text: "No jobs yet. Create one with `grpo submit` or the openai SDK." });
    const head = ["Job", "Name", "Status", "Model", "Steps", "Created", "Started", "Finished", "Duration"];
    return C.el("table", { id: "jobs-table" },
      C.el("thead", {}, C.el("tr", {}, head.map((h) => C.el("th", { text: h })))),
      C.el("tbody", {}, jobs.map((j) => C.el("tr", { "data-job": j.id },
        C.el("td", {}, C.el("a", { href: "/console/jobs/" + encodeURIComponent(j.id), class: "mono", text: j.id })),
        C.el("td", { class: "name", text: C.jobName(j) }),
        C.el("td", {}, C.status(j.status)),
        C.el("td", { class: "mono", text: j.model }),
        C.el("td", { class: "num" }, C.steps(j)),
        C.el("td", { text: C.time(j.created_at) }),
        C.el("td", { text: C.time(j.started_at) }),
        C.el("td", { text: C.time(j.finished_at) }),
        C.el("td", { text: C.duration(j.started_at, j.finished_at) }),
      ))));
  }

  function runsTable(runs) {
    if (!runs.length) return C.el("p", { class: "muted", text: "None under runs/." });
    return C.el("table", { id: "runs-table" },
      C.el("thead", {}, C.el("tr", {}, ["Run", "Steps", "Compare"].map((h) => C.el("th", { text: h })))),
      C.el("tbody", {}, runs.map((r) => C.el("tr", {},
        C.el("td", { class: "mono", text: "runs/" + r.name }),
        C.el("td", { class: "num" }, C.steps(r)),
        C.el("td", {}, C.el("a", { href: "/console/compare?b=" + encodeURIComponent("run:" + r.name), text: "compare with a job" })),
      ))));
  }

  async function refresh() {
    try {
      const got = await C.getJSON("/console/api/jobs");
      C.clear(jobsBox, jobsTable(got.data));
      C.clear(runsBox, runsTable(got.runs));
      document.getElementById("updated").textContent = "updated " + C.time(Date.now() / 1000).slice(11);
      document.body.dataset.loaded = "1";
    } catch (e) {
      C.fail(jobsBox, e);
    }
  }
  await C.session();
  await refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, 3000);  // a hidden tab does not poll
})();
