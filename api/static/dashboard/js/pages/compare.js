// Up to five jobs' loss curves on one chart: train_loss solid, eval_loss dashed, one colour per job.
// Read from the events list (not five SSE streams: a browser keeps six connections per host); jobs still
// running are read again every five seconds.

import { api, listAll } from "../api.js";
import { h, badge, every, table } from "../dom.js";
import { LossChart, SERIES_COLOURS } from "../chart.js";
import { MAX_COMPARED } from "./jobs.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function render(main, { query }, signal) {
  const ids = (query.get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean).slice(0, MAX_COMPARED);
  main.append(h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")), h("h1", {}, "Compare loss curves"));
  if (!ids.length) {
    main.append(h("p", {}, "Tick up to five jobs on the jobs page, then choose “Compare curves”."));
    return;
  }
  const jobs = await Promise.all(ids.map((id) => api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal })));
  const chartBox = h("div", { class: "chart" });
  main.append(h("section", { class: "panel" }, chartBox));
  const series = jobs.flatMap((job, i) => [
    { label: `${job.id} train`, colour: SERIES_COLOURS[i] },
    { label: `${job.id} eval`, colour: SERIES_COLOURS[i], dashed: true },
  ]);
  const chart = new LossChart(chartBox, series);
  signal.addEventListener("abort", () => chart.destroy());
  main.append(h("h2", {}, "Jobs"), table({
    testid: "compare-table",
    columns: ["Job", "Model", "Status", "Hyperparameters", "Final metrics"],
    rows: jobs.map((job) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
      h("td", {}, job.model), h("td", {}, badge(job.status)),
      h("td", { class: "mono" }, JSON.stringify(job.hyperparameters)),
      h("td", { class: "mono" }, job.metrics ? JSON.stringify(job.metrics) : "—"))),
  }));

  const done = new Set();
  const load = async () => {
    await Promise.all(jobs.map(async (job, i) => {
      if (done.has(job.id)) return;
      const current = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}`, { signal });
      const { items } = await listAll(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/events`, {}, 20000, signal);
      for (const event of items) {
        if (event.type !== "metrics" || !event.data) continue;
        chart.add(2 * i, event.data.step, event.data.train_loss);
        chart.add(2 * i + 1, event.data.step, event.data.eval_loss);
      }
      if (TERMINAL.has(current.status)) done.add(job.id);
    }));
  };
  await load();
  every(5000, load, signal);
}
