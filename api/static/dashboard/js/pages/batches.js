// Batches: progress by request counts, output and error files to download; refreshed every three seconds.

import { api, download } from "../api.js";
import { h, clear, action, badge, every, progressBar, table, when } from "../dom.js";

const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);

export async function render(main, _params, signal) {
  const holder = h("div");
  main.append(h("h1", {}, "Batches"), holder);

  const fileButton = (fileId, label, name) => {
    if (!fileId) return null;
    const button = h("button", { type: "button" }, label);
    button.addEventListener("click", action(button, () => download(`/v1/files/${encodeURIComponent(fileId)}/content`, name)));
    return button;
  };

  const refresh = async () => {
    const page = await api("/v1/batches?limit=50", { signal });
    const rows = page.data.map((b) => {
      const counts = b.request_counts || { total: 0, completed: 0, failed: 0 };
      const percent = counts.total ? (100 * (counts.completed + counts.failed)) / counts.total : 0;
      const cancel = ACTIVE.has(b.status) && b.status !== "cancelling" ? h("button", { type: "button", class: "danger" }, "Cancel") : null;
      if (cancel) {
        cancel.addEventListener("click", action(cancel, async () => {
          await api(`/v1/batches/${encodeURIComponent(b.id)}/cancel`, { method: "POST", signal });
          await refresh();
        }));
      }
      return h("tr", { "data-testid": "batch-row", dataset: { batchId: b.id } },
        h("td", { class: "mono" }, b.id),
        h("td", { class: "mono" }, b.endpoint),
        h("td", {}, badge(b.status)),
        h("td", {}, progressBar(percent), h("span", { class: "muted" },
          `${counts.completed} done, ${counts.failed} failed of ${counts.total}`)),
        h("td", {}, when(b.created_at)),
        h("td", { class: "row" },
          fileButton(b.output_file_id, "Output", `${b.id}-output.jsonl`),
          fileButton(b.error_file_id, "Errors", `${b.id}-errors.jsonl`),
          cancel));
    });
    clear(holder).append(table({
      testid: "batches-table",
      columns: ["ID", "Endpoint", "Status", "Progress", "Created", "Files"],
      rows,
      empty: "No batches yet: upload a file with purpose \"batch\" and POST /v1/batches.",
    }));
  };
  await refresh();
  every(3000, refresh, signal);
}
