// Webhook endpoints, and the tenant's recent events with every delivery attempt and a redeliver button.

import { api } from "../api.js";
import { h, clear, action, badge, table, when } from "../dom.js";

export async function render(main, _params, signal) {
  const endpoints = await api("/v1/webhook_endpoints?limit=100", { signal });
  const endpointRows = endpoints.data.map((e) => {
    const toggle = h("button", { type: "button" }, e.status === "enabled" ? "Disable" : "Enable");
    toggle.addEventListener("click", action(toggle, async () => {
      const next = e.status === "enabled" ? "disabled" : "enabled";
      Object.assign(e, await api(`/v1/webhook_endpoints/${encodeURIComponent(e.id)}`,
        { method: "PATCH", body: { status: next }, signal }));
      clear(statusCell).append(badge(e.status));
      toggle.textContent = e.status === "enabled" ? "Disable" : "Enable";
    }));
    const statusCell = h("td", {}, badge(e.status));
    return h("tr", { "data-testid": "endpoint-row", dataset: { endpointId: e.id } },
      h("td", { class: "mono" }, e.id), h("td", { class: "mono" }, e.url), h("td", {}, e.events.join(", ")),
      statusCell, h("td", {}, e.description || "—"), h("td", {}, when(e.created_at)), h("td", {}, toggle));
  });

  const log = h("div");
  main.append(
    h("h1", {}, "Webhooks"),
    h("h2", {}, "Endpoints"),
    table({ testid: "webhook-endpoints-table", columns: ["ID", "URL", "Events", "Status", "Description", "Created", ""],
            rows: endpointRows, empty: "No endpoints: POST /v1/webhook_endpoints registers one." }),
    h("h2", {}, "Recent events and their deliveries"),
    h("p", { class: "muted" }, "Open an event to see each delivery attempt; redeliver sends it again with the same webhook-id."),
    log);

  const events = await api("/v1/events?limit=30", { signal });
  clear(log).append(events.data.length ? h("div", { "data-testid": "deliveries-log" }, events.data.map((event) => {
    const attempts = h("div");
    const details = h("details", { class: "delivery panel", dataset: { eventId: event.id } },
      h("summary", {}, h("span", { class: "mono" }, event.type), " · ", h("span", { class: "mono muted" }, event.id),
        " · ", when(event.created_at)),
      attempts);
    const load = async () => {
      const page = await api(`/v1/events/${encodeURIComponent(event.id)}/deliveries`, { signal });
      const redeliver = h("button", { type: "button", "data-testid": "redeliver-button" }, "Redeliver");
      redeliver.addEventListener("click", action(redeliver, async () => {
        const result = await api(`/v1/events/${encodeURIComponent(event.id)}/redeliver`, { method: "POST", signal });
        note.textContent = `Queued for ${result.redelivered_to} destination${result.redelivered_to === 1 ? "" : "s"}.`;
        setTimeout(load, 1500);
      }));
      const note = h("span", { class: "muted", role: "status" });
      clear(attempts).append(
        table({
          testid: "deliveries-table",
          columns: ["Attempt", "URL", "Status", "Duration", "Error or response", "At"],
          empty: "No delivery attempts: no endpoint subscribes to this event type.",
          rows: page.data.map((a) => h("tr", {},
            h("td", {}, a.attempt), h("td", { class: "mono" }, a.url),
            h("td", {}, a.status_code ?? "—"), h("td", {}, a.duration_ms === null ? "—" : `${a.duration_ms} ms`),
            h("td", { class: "mono" }, a.error || a.response_excerpt || ""), h("td", {}, when(a.created_at)))),
        }),
        h("div", { class: "row" }, redeliver, note));
    };
    details.addEventListener("toggle", action(details, async () => { if (details.open) await load(); }));
    return details;
  })) : h("p", { class: "muted" }, "No events yet."));
}
