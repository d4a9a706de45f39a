// Jobs: newest first, refreshed every two seconds, filtered by status; pick up to five to compare.

import { api } from "../api.js";
import { h, clear, badge, every, progressBar, relative, when } from "../dom.js";

const STATUSES = ["validating_files", "queued", "running", "paused", "cancelling", "succeeded", "failed", "cancelled"];
export const MAX_COMPARED = 5;

export async function render(main, { query }, signal) {
  const status = query.get("status") || "";
  const selected = new Set();
  const filter = h("select", { id: "status-filter", "data-testid": "status-filter" },
    h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s.replaceAll("_", " "))));
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs";
  });
  const compareButton = h("button", { type: "button", disabled: true, "data-testid": "compare-button" }, "Compare curves");
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`;
  });
  const holder = h("div");
  const more = h("p", { class: "muted" });
  main.append(
    h("div", { class: "row" }, h("h1", {}, "Fine-tuning jobs"), h("span", { class: "spacer" }),
      h("label", { class: "inline", for: "status-filter" }, "Status", filter), compareButton),
    holder, more);

  const updateCompare = () => {
    compareButton.disabled = selected.size < 1;
    compareButton.textContent = selected.size ? `Compare curves (${selected.size})` : "Compare curves";
    for (const box of holder.querySelectorAll("input[type=checkbox]")) {
      box.disabled = !box.checked && selected.size >= MAX_COMPARED;
    }
  };

  // Rows are patched in place, keyed by job id, so a focused checkbox or link keeps its focus across refreshes.
  const rows = new Map();
  const tbody = h("tbody");
  const empty = h("div", { class: "empty" });
  holder.append(h("div", { class: "table-wrap" },
    h("table", { "data-testid": "jobs-table" },
      h("thead", {}, h("tr", {}, ["", "ID", "Model", "Task", "Status", "Progress", "Created", "Estimated finish"]
        .map((c, i) => h("th", { scope: "col" }, i ? c : h("span", { class: "visually-hidden" }, "Select"))))),
      tbody),
    empty));

  const row = (job) => {
    let entry = rows.get(job.id);
    if (!entry) {
      const box = h("input", { type: "checkbox", "aria-label": `Compare ${job.id}` });
      box.addEventListener("change", () => {
        if (box.checked) selected.add(job.id); else selected.delete(job.id);
        updateCompare();
      });
      const cells = Array.from({ length: 4 }, () => h("td"));
      const tr = h("tr", { "data-testid": "job-row", dataset: { jobId: job.id } },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
        h("td", {}, job.model), h("td", {}, job.task || "—"), cells[0], cells[1], h("td", {}, when(job.created_at)), cells[3]);
      entry = { tr, cells, key: "" };
      rows.set(job.id, entry);
    }
    const key = JSON.stringify([job.status, job.progress && job.progress.percent, job.queue_position, job.estimated_finish]);
    if (key !== entry.key) {
      entry.key = key;
      const [status, progress, , eta] = entry.cells;
      clear(status).append(badge(job.status));
      clear(progress).append(job.progress ? progressBar(job.progress.percent)
        : job.status === "queued" && job.queue_position ? h("span", { class: "muted" }, `#${job.queue_position} in queue`) : "—");
      eta.textContent = job.estimated_finish ? relative(job.estimated_finish) : "—";
    }
    return entry.tr;
  };

  const refresh = async () => {
    const params = new URLSearchParams({ limit: "50" });
    if (status) params.set("status", status);
    const page = await api(`/v1/fine_tuning/jobs?${params}`, { signal });
    const wanted = page.data.map(row);
    const ids = new Set(page.data.map((job) => job.id));
    for (const [id, entry] of rows) if (!ids.has(id)) { entry.tr.remove(); rows.delete(id); }
    if (wanted.some((tr, i) => tbody.children[i] !== tr)) tbody.append(...wanted);
    empty.textContent = page.data.length ? "" : status ? `No ${status.replaceAll("_", " ")} jobs.`
      : "No jobs yet: create one with `llmos jobs create` or POST /v1/fine_tuning/jobs.";
    empty.hidden = page.data.length > 0;
    more.textContent = page.has_more ? "Showing the newest 50; filter by status to narrow." : "";
    updateCompare();
  };
  await refresh();
  every(2000, refresh, signal);
}
