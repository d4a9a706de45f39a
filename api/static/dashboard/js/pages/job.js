// One job: status and controls, hyperparameters, metrics, the live loss chart and events (both fed by the
// job's SSE stream), checkpoints and result files.

import { ApiError, api, download, sse } from "../api.js";
import { h, clear, action, badge, every, kv, notify, number, progressBar, relative, table, when } from "../dom.js";
import { LossChart } from "../chart.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CAN = {
  cancel: new Set(["validating_files", "queued", "running", "paused"]),
  pause: new Set(["queued", "running"]),
  resume: new Set(["paused"]),
};
const MAX_EVENTS_SHOWN = 500;

export async function render(main, { id }, signal) {
  let job;
  try {
    job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal });
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      main.append(h("h1", {}, "Job not found"),
        h("p", { "data-testid": "not-found" }, `No job ${id} is visible to this key.`),
        h("p", {}, h("a", { href: "#/jobs" }, "Back to jobs")));
      return;
    }
    throw error;
  }

  const status = h("span", { "data-testid": "job-status", class: "badge" });
  const buttons = {};
  const controls = h("div", { class: "row", role: "group", "aria-label": "Job controls" });
  for (const [verb, label] of [["pause", "Pause"], ["resume", "Resume"], ["cancel", "Cancel"]]) {
    const button = h("button", { type: "button", "data-testid": `${verb}-button`, class: verb === "cancel" ? "danger" : "" }, label);
    button.addEventListener("click", action(button, async () => {
      if (verb === "cancel" && !confirm(`Cancel ${id}? Its progress is discarded.`)) return;
      show(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/${verb}`, { method: "POST", signal }));
    }));
    buttons[verb] = button;
    controls.append(button);
  }
  const summary = h("div");
  const errorBox = h("div", { role: "alert" });
  const hyper = h("div");
  const metrics = h("div");
  const chartBox = h("div", { class: "chart", "aria-label": "Loss against step" });
  const events = h("ol", { class: "events", "data-testid": "events-list", "aria-label": "Events, newest first" });
  const checkpoints = h("div");
  const results = h("div", { class: "row" });

  main.append(
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("div", { class: "row" }, h("h1", { class: "mono" }, id), status, h("span", { class: "spacer" }), controls),
    errorBox,
    h("section", { class: "panel", "aria-labelledby": "h-chart" }, h("h2", { id: "h-chart" }, "Loss"), chartBox),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "h-summary" }, h("h2", { id: "h-summary" }, "Summary"), summary),
      h("section", { class: "panel", "aria-labelledby": "h-hyper" }, h("h2", { id: "h-hyper" }, "Hyperparameters"), hyper)),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "h-metrics" }, h("h2", { id: "h-metrics" }, "Final metrics"), metrics),
      h("section", { class: "panel", "aria-labelledby": "h-results" }, h("h2", { id: "h-results" }, "Result files"), results)),
    h("section", { "aria-labelledby": "h-ckpt" }, h("h2", { id: "h-ckpt" }, "Checkpoints"), checkpoints),
    h("section", { class: "panel", "aria-labelledby": "h-events" }, h("h2", { id: "h-events" }, "Events"), events));

  const chart = new LossChart(chartBox, [
    { label: "train_loss", colour: "--series-1" },
    { label: "eval_loss", colour: "--series-2", dashed: true },
  ], { title: null });
  signal.addEventListener("abort", () => chart.destroy());

  function show(next) {
    job = next;
    status.textContent = job.status;
    status.className = `badge ${job.status}`;
    for (const [verb, button] of Object.entries(buttons)) button.disabled = !CAN[verb].has(job.status);
    const p = job.progress || {};
    clear(summary).append(kv([
      ["Model", job.model],
      ["Task", job.task || "—"],
      ["Progress", job.progress ? h("div", {}, progressBar(p.percent), h("span", { class: "muted" },
        `step ${p.step} of ${p.total_steps}, epoch ${number(p.epoch, 3)}`)) : "—"],
      ["Queue position", job.queue_position ?? "—"],
      ["Priority", job.priority],
      ["Created", when(job.created_at)],
      ["Estimated finish", job.estimated_finish ? `${relative(job.estimated_finish)} (${when(job.estimated_finish)})` : "—"],
      ["Finished", when(job.finished_at)],
      ["Attempts", job.attempts],
      ["Trained tokens", job.trained_tokens ?? "—"],
      ["Fine-tuned model", job.fine_tuned_model
        ? h("a", { href: `#/models?model=${encodeURIComponent(job.fine_tuned_model)}`, class: "mono" }, job.fine_tuned_model) : "—"],
      ["Training file", h("span", { class: "mono" }, job.training_file)],
    ]));
    clear(errorBox);
    if (job.error) errorBox.append(h("p", { class: "panel error-text" }, `${job.error.code || "error"}: ${job.error.message}`));
    clear(hyper).append(kv(Object.entries(job.hyperparameters || {}).map(([k, v]) =>
      [k, typeof v === "object" && v !== null ? JSON.stringify(v) : number(v)])));
    clear(metrics).append(renderMetrics(job.metrics));
    clear(results);
    for (const fileId of job.result_files || []) {
      const button = h("button", { type: "button", "data-testid": "result-download" }, `Download ${fileId}`);
      button.addEventListener("click", action(button, () => download(`/v1/files/${encodeURIComponent(fileId)}/content`, `${id}-results.csv`)));
      results.append(button);
    }
    if (!results.childElementCount) results.append(h("span", { class: "muted" }, "Written when the job succeeds."));
  }

  async function loadCheckpoints() {
    const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/checkpoints?limit=100`, { signal });
    clear(checkpoints).append(table({
      testid: "checkpoints-table",
      columns: ["Step", "Model", "Metrics", "Created"],
      empty: "No checkpoints yet.",
      rows: page.data.map((c) => h("tr", {},
        h("td", {}, c.step_number),
        h("td", { class: "mono" }, c.fine_tuned_model_checkpoint),
        h("td", { class: "mono" }, Object.entries(c.metrics || {}).filter(([, v]) => typeof v === "number")
          .map(([k, v]) => `${k}=${number(v)}`).join(" ")),
        h("td", {}, when(c.created_at)))),
    }));
  }

  const seen = new Set();
  function addEvent(event) {
    if (seen.has(event.id)) return false;
    seen.add(event.id);
    if (event.type === "metrics" && event.data) {
      chart.add(0, event.data.step, event.data.train_loss);
      chart.add(1, event.data.step, event.data.eval_loss);
    }
    events.prepend(h("li", { class: event.level },
      h("time", { class: "when", datetime: new Date(event.created_at * 1000).toISOString() }, when(event.created_at)),
      h("span", { class: "msg" }, event.message)));
    while (events.childElementCount > MAX_EVENTS_SHOWN) events.lastElementChild.remove();
    return true;
  }

  // The stream replays every event, then follows new ones until the job ends; a dropped connection is
  // picked up again (events already shown are skipped by id).
  async function follow() {
    while (!signal.aborted) {
      try {
        for await (const message of sse(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?stream=true`, signal)) {
          if (message.event === "done") {
            show(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal }));
            await loadCheckpoints();
            return;
          }
          if (addEvent(message.data) && message.data.type === "message" && /checkpoint/i.test(message.data.message)) {
            await loadCheckpoints();
          }
        }
      } catch (error) {
        if (signal.aborted) return;
        notify(`Live updates interrupted (${error.message}); reconnecting…`);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  show(job);
  await loadCheckpoints();
  follow();
  every(2000, async () => {
    if (TERMINAL.has(job.status)) return;
    show(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal }));
  }, signal);
}

function renderMetrics(metrics) {
  if (!metrics || !Object.keys(metrics).length) return h("span", { class: "muted" }, "Reported when the job succeeds.");
  const flat = Object.entries(metrics).filter(([k]) => k !== "per_type");
  const parts = [kv(flat.map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : number(v)]))];
  if (metrics.per_type) {
    parts.push(table({
      testid: "per-type-metrics",
      columns: ["Type", "Precision", "Recall", "F1", "Support"],
      rows: Object.entries(metrics.per_type).map(([type, m]) => h("tr", {},
        h("td", {}, type), h("td", {}, number(m.precision)), h("td", {}, number(m.recall)),
        h("td", {}, number(m.f1)), h("td", {}, m.support))),
    }));
  }
  return h("div", {}, parts);
}
