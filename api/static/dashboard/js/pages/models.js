// Models and the playground: classify (labels with scores), NER (entities highlighted in the text),
// generate and chat, each through the same inference routes a client calls.

import { ApiError, api, infer, listAll, streamInfer } from "../api.js";
import { h, clear, action, number, table, when } from "../dom.js";

const MODES = {
  classification: { label: "Classify", placeholder: "A sentence to classify", run: classify },
  embeddings: { label: "Embed", placeholder: "A sentence to embed", run: embed },
  ner: { label: "Find entities", placeholder: "Barack Obama visited Paris with Angela Merkel.", run: ner },
  generation: { label: "Complete", placeholder: "Once upon a time", run: complete },
  chat: { label: "Chat", placeholder: "Say hello in French.", run: chat },
};

function modesOf(model) {
  const modes = [];
  for (const task of model.tasks || []) {
    // A generation model also classifies zero-shot: each label's likelihood as its answer.
    if (task === "generation") modes.push("generation", "chat", "classification");
    else if (MODES[task]) modes.push(task);
  }
  return modes;
}

export async function render(main, { query }, signal) {
  const { items: models } = await listAll("/v1/models", {}, 1000, signal);
  const wanted = query.get("model");
  main.append(h("h1", {}, "Models"));

  // --- playground -----------------------------------------------------------------------------------
  const servable = models.filter((m) => modesOf(m).length);
  const modelSelect = h("select", { id: "playground-model", "data-testid": "playground-model" },
    servable.map((m) => h("option", { value: m.id, selected: m.id === wanted }, m.id)));
  const modeSelect = h("select", { id: "playground-mode", "data-testid": "playground-mode" });
  const input = h("textarea", { id: "playground-input", "data-testid": "playground-input" });
  const maxTokens = h("input", { id: "playground-max-tokens", type: "number", min: 1, max: 512, value: 32 });
  const tokensField = h("div", {}, h("label", { for: "playground-max-tokens" }, "Max tokens"), maxTokens);
  const labels = h("input", { id: "playground-labels", "data-testid": "playground-labels", size: 28,
                              placeholder: "positive, negative", "aria-describedby": "playground-labels-help" });
  const labelsField = h("div", {}, h("label", { for: "playground-labels" }, "Labels (zero-shot)"), labels,
    h("span", { id: "playground-labels-help", class: "visually-hidden" },
      "Comma-separated; leave empty to use the model's trained labels."));
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "playground-submit" }, "Run");
  const output = h("div", { class: "output", "data-testid": "playground-output", "aria-live": "polite" });
  const form = h("form", { class: "panel", "aria-labelledby": "h-playground" },
    h("h2", { id: "h-playground" }, "Playground"),
    h("div", { class: "row" },
      h("div", {}, h("label", { for: "playground-model" }, "Model"), modelSelect),
      h("div", {}, h("label", { for: "playground-mode" }, "Task"), modeSelect),
      tokensField, labelsField),
    h("p"),
    h("label", { for: "playground-input" }, "Input"), input,
    h("div", { class: "row" }, submit),
    output);

  const syncModes = () => {
    const model = servable.find((m) => m.id === modelSelect.value);
    const modes = model ? modesOf(model) : [];
    const previous = modeSelect.value;
    clear(modeSelect).append(...modes.map((mode) => h("option", { value: mode, selected: mode === previous }, MODES[mode].label)));
    syncMode();
  };
  const syncMode = () => {
    const mode = MODES[modeSelect.value];
    input.placeholder = mode ? mode.placeholder : "";
    tokensField.hidden = !["generation", "chat"].includes(modeSelect.value);
    labelsField.hidden = modeSelect.value !== "classification";
  };
  modelSelect.addEventListener("change", syncModes);
  modeSelect.addEventListener("change", syncMode);
  form.addEventListener("submit", action(submit, async () => {
    const text = input.value.trim() || input.placeholder;
    clear(output).append(h("p", { class: "muted" }, "Running…"));
    try {
      const options = { maxTokens: Number(maxTokens.value) || 32,
                        labels: labels.value.split(",").map((l) => l.trim()).filter(Boolean) };
      // Generation streams into `output` as the model writes; the other modes return their answer.
      const result = await MODES[modeSelect.value].run(modelSelect.value, text, options, signal, output);
      if (result) clear(output).append(result);
    } catch (error) {
      clear(output).append(h("p", { class: "error-text", role: "alert" },
        error instanceof ApiError && error.param ? `${error.param}: ${error.message}` : error.message));
    }
  }));
  if (servable.length) syncModes();

  // --- the list -------------------------------------------------------------------------------------
  const rows = models.map((m) => {
    const cells = [
      h("td", { class: "mono" }, m.id),
      h("td", {}, m.kind),
      h("td", {}, (m.tasks || []).join(", ")),
      h("td", { class: "mono" }, m.base_model || "—"),
      h("td", {}, m.fine_tuning_job ? h("a", { href: `#/jobs/${encodeURIComponent(m.fine_tuning_job)}`, class: "mono" }, m.fine_tuning_job) : "—"),
      h("td", {}, when(m.created)),
    ];
    const tryIt = h("button", { type: "button", disabled: !modesOf(m).length }, "Try");
    tryIt.addEventListener("click", () => {
      modelSelect.value = m.id;
      syncModes();
      input.focus();
    });
    const actions = h("td", { class: "row" }, tryIt);
    if (m.kind === "fine-tuned") {
      const del = h("button", { type: "button", class: "danger" }, "Delete");
      del.addEventListener("click", action(del, async () => {
        if (!confirm(`Delete ${m.id}? Its weights are removed.`)) return;
        await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "DELETE", signal });
        location.reload();
      }));
      actions.append(del);
    }
    return h("tr", { dataset: { modelId: m.id } }, ...cells, actions);
  });
  main.append(form, h("h2", {}, "All models"), table({
    testid: "models-table",
    columns: ["ID", "Kind", "Tasks", "Base", "Job", "Created", ""],
    rows,
  }));
}

async function classify(model, text, { labels }, signal) {
  const body = { model, input: text, ...(labels.length ? { labels } : {}) };
  const result = await infer("/v1/classifications", body, signal);
  const item = result.data[0];
  const scores = Object.entries(item.scores || { [item.label]: item.score }).sort((a, b) => b[1] - a[1]);
  return h("div", {},
    h("p", {}, "Label: ", h("strong", { "data-testid": "playground-label" }, item.label), ` (${number(item.score, 3)})`),
    h("div", { class: "scores" }, scores.flatMap(([label, p]) => {
      const bar = h("span");
      bar.style.width = `${(p * 100).toFixed(1)}%`;
      return [h("span", {}, label), h("div", { class: "bar", "aria-hidden": "true" }, bar), h("span", { class: "muted" }, number(p, 3))];
    })));
}

async function ner(model, text, _options, signal) {
  const result = await infer("/v1/ner", { model, input: text }, signal);
  const entities = [...result.data[0].entities].sort((a, b) => a.start - b.start);
  const parts = [];
  let at = 0;
  for (const e of entities) {
    if (e.start < at) continue; // overlapping spans: keep the first
    parts.push(text.slice(at, e.start));
    parts.push(h("mark", { dataset: { entity: e.entity_group }, title: `${e.entity_group} ${number(e.score, 3)}` },
      text.slice(e.start, e.end), h("small", {}, e.entity_group)));
    at = e.end;
  }
  parts.push(text.slice(at));
  return h("div", {},
    h("p", { class: "ner-text" }, parts),
    h("p", { class: "muted" }, entities.length ? `${entities.length} entit${entities.length === 1 ? "y" : "ies"}` : "No entities found."));
}

async function complete(model, prompt, { maxTokens }, signal, output) {
  await streamed(output, h("span", { class: "muted" }, prompt),
    streamInfer("/v1/completions", { model, prompt, max_tokens: maxTokens }, signal),
    (choice) => choice.text, (whole) => whole.choices[0].text);
}

async function chat(model, content, { maxTokens }, signal, output) {
  await streamed(output, null,
    streamInfer("/v1/chat/completions", { model, messages: [{ role: "user", content }], max_tokens: maxTokens }, signal),
    (choice) => choice.delta.content || "", (whole) => whole.choices[0].message.content);
}

// Shows the first choice's text growing chunk by chunk, then the usage; `textOf` reads a chunk's choice,
// `wholeText` an answer that came whole.
async function streamed(output, lead, chunks, textOf, wholeText) {
  const text = h("span", { "data-testid": "playground-generated" });
  const status = h("p", { class: "muted" }, "Generating…");
  clear(output).append(h("div", {}, h("div", { class: "generated" }, lead, text), status));
  for await (const chunk of chunks) {
    const answer = chunk.whole || chunk;
    if (chunk.whole) text.textContent = wholeText(chunk.whole);
    for (const choice of chunk.choices || []) if (choice.index === 0) text.append(textOf(choice));
    if (answer.usage) {
      const line = usage(answer);
      if (line) status.replaceWith(line);
      else status.remove();
    }
  }
  if (status.isConnected) status.remove();
}

async function embed(model, text, _options, signal) {
  const result = await infer("/v1/embeddings", { model, input: text, encoding_format: "float" }, signal);
  const vector = result.data[0].embedding;
  const norm = Math.sqrt(vector.reduce((sum, v) => sum + v * v, 0));
  return h("div", {},
    h("p", {}, h("strong", { "data-testid": "playground-dimensions" }, String(vector.length)), " dimensions, norm ",
      number(norm, 4)),
    h("p", { class: "generated mono" }, `[${vector.slice(0, 8).map((v) => v.toFixed(4)).join(", ")}, …]`),
    usage(result));
}

function usage(result) {
  const u = result.usage;
  if (!u) return null;
  return h("p", { class: "muted" }, u.completion_tokens === undefined ? `${u.prompt_tokens} tokens`
    : `${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens`);
}
