// Building the page from data. Everything the API returns is user-controlled (file names, metadata,
// model suffixes, event messages), so it only ever reaches the DOM as text nodes and attribute values,
// never as HTML.

/** h("a", {href, class, dataset: {...}, onclick}, child, ...) → an element; children may be strings or arrays. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

/** "in 3 min" / "2 h ago", for estimated_finish and the like. */
export function relative(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const delta = Math.round(seconds - Date.now() / 1000);
  const abs = Math.abs(delta);
  const text = abs < 60 ? `${abs} s` : abs < 3600 ? `${Math.round(abs / 60)} min` : `${(abs / 3600).toFixed(1)} h`;
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "unlimited";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function number(value, digits = 4) {
  if (typeof value !== "number") return value === null || value === undefined ? "—" : String(value);
  // Significant digits without the trailing zeros toPrecision leaves (0.001, not 0.001000).
  return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(digits)));
}

export function badge(status, attrs = {}) {
  return h("span", { class: `badge ${status}`, ...attrs }, status.replaceAll("_", " "));
}

export function progressBar(percent) {
  const value = Math.max(0, Math.min(100, percent || 0));
  const bar = h("span");
  bar.style.width = `${value}%`;
  return h("div", { class: "bar-cell" },
    h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": value,
               "aria-label": "Progress" }, bar),
    h("span", { class: "muted" }, `${value.toFixed(value % 1 ? 1 : 0)}%`));
}

export function table({ columns, rows, testid, empty = "Nothing here yet." }) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c))));
  const body = h("tbody", {}, rows);
  const wrap = h("div", { class: "table-wrap" }, h("table", { "data-testid": testid }, head, body));
  if (!rows.length) wrap.append(h("div", { class: "empty" }, empty));
  return wrap;
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

/** Show an error where the user is looking (the notice bar is a polite live region). */
export function notify(message) {
  const notice = document.getElementById("notice");
  notice.textContent = message || "";
}

/** Run an async action from a button: disabled while it runs, errors to the notice bar. */
export function action(button, fn) {
  return async (event) => {
    event?.preventDefault();
    button.disabled = true;
    notify("");
    try {
      await fn();
    } catch (error) {
      notify(error.message);
    } finally {
      button.disabled = false;
    }
  };
}

/** setInterval that skips a beat while the previous call is still running, and stops with the page. */
export function every(ms, fn, signal) {
  let running = false;
  const timer = setInterval(async () => {
    if (running || document.hidden) return;
    running = true;
    try { await fn(); } catch (error) { if (error.name !== "AbortError") notify(error.message); } finally { running = false; }
  }, ms);
  signal.addEventListener("abort", () => clearInterval(timer));
}
