// Queues as this tenant sees them: its training jobs waiting and running (training workers) and its
// batches (inference workers), with its limits and what it uses of them.

import { api, listAll } from "../api.js";
import { h, clear, bytes, every, kv, table } from "../dom.js";

async function count(path, status, signal) {
  const { items, more } = await listAll(path, { status }, 500, signal);
  return { items, label: more ? `${items.length}+` : String(items.length) };
}

function usage(used, limit, format = String) {
  const text = `${format(used)} of ${limit === null ? "unlimited" : format(limit)}`;
  if (limit === null || !limit) return text;
  const bar = h("span");
  bar.style.width = `${Math.min(100, (100 * used) / limit).toFixed(1)}%`;
  return h("div", { class: "bar-cell" }, h("div", { class: "bar", role: "progressbar", "aria-valuenow": used,
    "aria-valuemin": 0, "aria-valuemax": limit, "aria-label": text }, bar), h("span", {}, text));
}

export async function render(main, _params, signal) {
  const workers = h("div");
  const waiting = h("div");
  const limits = h("div");
  main.append(h("h1", {}, "Queues"),
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "h-workers" }, h("h2", { id: "h-workers" }, "By kind of worker"), workers),
      h("section", { class: "panel", "aria-labelledby": "h-limits" }, h("h2", { id: "h-limits" }, "Limits and usage"), limits)),
    h("h2", {}, "Your queued training jobs, in the order they will start"), waiting);

  const refresh = async () => {
    const [queued, running, batches, quota] = await Promise.all([
      count("/v1/fine_tuning/jobs", "queued", signal),
      count("/v1/fine_tuning/jobs", "running", signal),
      listAll("/v1/batches", {}, 500, signal),
      api("/v1/limits", { signal }),
    ]);
    const active = batches.items.filter((b) => ["validating", "in_progress", "finalizing", "cancelling"].includes(b.status));
    clear(workers).append(table({
      testid: "queues-table",
      columns: ["Worker kind", "Queued", "Running"],
      rows: [
        h("tr", { dataset: { queue: "training" } }, h("td", {}, "training (gpu)"),
          h("td", { "data-testid": "queued-training" }, queued.label), h("td", { "data-testid": "running-training" }, running.label)),
        h("tr", { dataset: { queue: "inference" } }, h("td", {}, "inference (batches)"),
          h("td", {}, String(active.filter((b) => b.status === "validating").length)),
          h("td", {}, String(active.filter((b) => b.status !== "validating").length))),
      ],
    }));
    clear(limits).append(kv([
      ["Requests per minute", quota.rpm ?? "unlimited"],
      ["Tokens per minute", quota.tpm ?? "unlimited"],
      ["Active jobs", usage(quota.active_jobs, quota.max_active_jobs)],
      ["Stored bytes", usage(quota.storage_bytes, quota.max_storage_bytes, bytes)],
      ["Webhook endpoints", usage(quota.webhook_endpoints, quota.max_webhook_endpoints)],
      ["Active batches", usage(quota.active_batches, quota.max_active_batches)],
      ["Scheduling weight", quota.weight],
    ]));
    const ordered = [...queued.items].sort((a, b) => (a.queue_position ?? 1e9) - (b.queue_position ?? 1e9));
    clear(waiting).append(table({
      testid: "queued-jobs-table",
      columns: ["Position", "Job", "Model", "Priority"],
      empty: "Nothing waiting.",
      rows: ordered.map((job) => h("tr", {},
        h("td", {}, job.queue_position ?? "—"),
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
        h("td", {}, job.model), h("td", {}, job.priority))),
    }));
  };
  await refresh();
  every(3000, refresh, signal);
}
