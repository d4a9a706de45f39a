// The public API as the dashboard uses it. The key lives in sessionStorage only: never in a URL (it would
// land in history and server logs) and never in a cookie (the API reads only the Authorization header).

const KEY = "llmos.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

// Called when the API refuses the key (revoked, expired): the app signs out.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

async function send(path, { method = "GET", body, signal, headers = {}, key } = {}) {
  const init = { method, signal, headers: key ? { Authorization: `Bearer ${key}`, ...headers } : authHeaders(headers) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 401 && !key) onUnauthorized();
  return response;
}

async function parse(response) {
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** One request; the parsed body, or an ApiError carrying the API's message, code and param. */
export async function api(path, options = {}) {
  return parse(await send(path, options));
}

/** A list route, page after page, newest first, up to `max` items. */
export async function listAll(path, params = {}, max = 1000, signal) {
  const items = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ ...params, limit: "100" });
    if (after) query.set("after", after);
    const page = await api(`${path}?${query}`, { signal });
    items.push(...page.data);
    if (!page.has_more || items.length >= max || page.data.length === 0) {
      return { items: items.slice(0, max), more: page.has_more };
    }
    after = page.data[page.data.length - 1].id;
  }
}

/**
 * An inference call: waits up to 60 s in the request (Prefer: wait); if the answer is still 202, polls the
 * inference until it holds the response.
 */
export async function infer(path, body, signal) {
  const response = await send(path, { method: "POST", body, signal, headers: { Prefer: "wait=60" } });
  return poll(response, await parse(response), signal);
}

// An inference answer: `data` itself, or, for a 202 handle, the response once the inference holds it.
async function poll(response, data, signal) {
  const deadline = Date.now() + 10 * 60 * 1000;
  while (response.status === 202 && data && data.object === "inference" && !data.response) {
    if (data.status === "failed") throw new ApiError(500, { error: data.error || { message: "the inference failed" } });
    if (Date.now() > deadline) throw new Error(`inference ${data.id} is still ${data.status}; poll it later`);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    data = await api(`/v1/inferences/${encodeURIComponent(data.id)}`, { signal });
    if (data.status === "failed") throw new ApiError(500, { error: data.error || { message: "the inference failed" } });
    if (data.response) return data.response;
  }
  return data;
}

/**
 * Server-Sent Events read with fetch, since EventSource cannot send an Authorization header. Yields
 * {event, id, data} with `data` parsed as JSON; ends when the server closes the stream.
 */
export async function* sse(path, signal) {
  const response = await send(path, { signal, headers: { Accept: "text/event-stream" } });
  if (!response.ok) await parse(response);
  yield* events(response);
}

/**
 * A generation request answered as it is written (`stream: true`): yields OpenAI's chunks, the last one
 * with the usage. A request that had not started within its wait comes back whole: yielded as {whole}.
 */
export async function* streamInfer(path, body, signal) {
  const response = await send(path, {
    method: "POST", signal, headers: { Prefer: "wait=60", Accept: "text/event-stream" },
    body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  if (!response.ok || response.status === 202) {
    yield { whole: await poll(response, await parse(response), signal) };
    return;
  }
  for await (const message of events(response)) {
    if (message.data.error) throw new ApiError(500, { error: message.data.error });
    yield message.data;
  }
}

// The messages of an event stream; `data: [DONE]` (OpenAI's end of a stream) ends it.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message = { event: "message", id: null, data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = text;
        else if (field === "id") message.id = text;
        else if (field === "data") message.data += (message.data ? "\n" : "") + text;
      }
      if (message.data === "[DONE]") return;
      if (message.data) yield { ...message, data: JSON.parse(message.data) };
    }
  }
}

/** Save a file the API serves (it needs the key, so a plain link cannot fetch it). */
export async function download(path, filename) {
  const response = await send(path);
  if (!response.ok) await parse(response);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
