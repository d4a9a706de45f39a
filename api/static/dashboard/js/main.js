// The shell: sign-in, theme, navigation and a hash router (#/jobs, #/jobs/{id}, #/compare?ids=…, …).
// Each page is a module with render(main, params, signal); the signal aborts its streams and timers when
// the user navigates away.

import { ApiError, api, session, setUnauthorizedHandler } from "./api.js";
import { h, clear, notify } from "./dom.js";
import * as jobs from "./pages/jobs.js";
import * as job from "./pages/job.js";
import * as compare from "./pages/compare.js";
import * as models from "./pages/models.js";
import * as batches from "./pages/batches.js";
import * as webhooks from "./pages/webhooks.js";
import * as queues from "./pages/queues.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOut = document.getElementById("sign-out");
let current = null; // AbortController of the page on screen

const routes = [
  [/^\/jobs\/([^/]+)$/, job, (m) => ({ id: decodeURIComponent(m[1]) })],
  [/^\/jobs$/, jobs],
  [/^\/compare$/, compare],
  [/^\/models$/, models],
  [/^\/batches$/, batches],
  [/^\/webhooks$/, webhooks],
  [/^\/queues$/, queues],
];

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query = ""] = hash.split("?");
  return { path, query: new URLSearchParams(query) };
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  notify("");
  clear(main);
  if (!session.key) {
    renderSignIn();
    return;
  }
  nav.hidden = false;
  signOut.hidden = false;
  const { path, query } = parseHash();
  for (const [pattern, page, params] of routes) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const link of nav.querySelectorAll("a")) {
      link.toggleAttribute("aria-current", path.startsWith(`/${link.dataset.section}`) ||
        (link.dataset.section === "jobs" && path === "/compare"));
      if (link.hasAttribute("aria-current")) link.setAttribute("aria-current", "page");
    }
    try {
      await page.render(main, { ...(params ? params(match) : {}), query }, current.signal);
    } catch (error) {
      if (error.name === "AbortError") return;
      main.append(h("p", { class: "error-text", role: "alert" }, pageError(error)));
    }
    return;
  }
  main.append(h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Back to jobs")));
}

function pageError(error) {
  if (error instanceof ApiError && error.status === 403) {
    return `This key may not read this page: ${error.message}`;
  }
  return error.message;
}

function renderSignIn() {
  nav.hidden = true;
  signOut.hidden = true;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
                             "data-testid": "api-key-input", placeholder: "sk-…", required: true,
                             "aria-describedby": "api-key-help" });
  const message = h("p", { class: "error-text", role: "alert" });
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "api-key-submit" }, "Sign in");
  const form = h("form", { class: "panel signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { id: "api-key-help", class: "muted" },
      "Paste a key from `llmos keys create`. It stays in this tab's session storage and is sent only to this server."),
    h("div", { class: "row" }, submit),
    message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    submit.disabled = true;
    message.textContent = "";
    try {
      // /v1/limits answers any valid key, whatever its scopes.
      await api("/v1/limits", { key });
      session.set(key);
      if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
      else await route();
    } catch (error) {
      message.textContent = error instanceof ApiError && error.status === 401
        ? "That key was not accepted (unknown, revoked or expired)." : error.message;
    } finally {
      submit.disabled = false;
    }
  });
  main.append(form);
  input.focus();
}

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  window.dispatchEvent(new Event("llmos:theme"));
}

document.getElementById("theme-toggle").addEventListener("click", () => {
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  const now = document.documentElement.dataset.theme || (dark ? "dark" : "light");
  const next = now === "dark" ? "light" : "dark";
  localStorage.setItem("llmos.theme", next);
  applyTheme(next);
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(localStorage.getItem("llmos.theme")));

signOut.addEventListener("click", () => {
  session.clear();
  location.hash = "#/signin";
});

setUnauthorizedHandler(() => {
  session.clear();
  route();
  notify("The API no longer accepts this key; sign in again.");
});

applyTheme(localStorage.getItem("llmos.theme"));
window.addEventListener("hashchange", route);
route();
