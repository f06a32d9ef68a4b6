// longserve web chat: streams replies from POST v1/chat/completions (SSE read from a fetch body) and polls
// the server's Prometheus /metrics. No dependencies, no build step. Model output only ever enters the page
// as text (Text nodes, textContent), never as HTML.

const METRICS_INTERVAL_MS = 2000;

/** An error the server answered with; its message is shown as it is. */
class ApiError extends Error {}

/** The message of a non-2xx response: OpenAI's {"error": {"message"}} when the body has one. */
async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (err) {
    if (!(err instanceof SyntaxError)) throw err; // not JSON: the status line is all there is
  }
  if (response.status === 401) message += "\nEnter a valid key in the API key field.";
  return message;
}

/** What went wrong, in words for the error banner. */
function describe(err) {
  if (err instanceof ApiError) return err.message;
  if (err instanceof TypeError) return `Could not reach the server (${err.message}).`;
  if (err instanceof SyntaxError) return `The server sent something that is not JSON (${err.message}).`;
  return err instanceof Error ? err.message : String(err);
}

/** The data of each server-sent event in a response body, as the events arrive. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r/g, "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      // Lines starting with ":" are keep-alive comments; only data lines carry anything.
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

/** Prometheus text exposition -> Map of sample name -> [{labels, value}]; comments are skipped. */
function parsePrometheus(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const [, name, labelText, raw] = match;
    const labels = {};
    for (const [, key, quoted] of (labelText || "").matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = quoted.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    const value = raw === "+Inf" ? Infinity : raw === "-Inf" ? -Infinity : Number(raw);
    if (!samples.has(name)) samples.set(name, []);
    samples.get(name).push({ labels, value });
  }
  return samples;
}

function sum(samples, name) {
  const found = samples.get(name);
  return found ? found.reduce((total, s) => total + s.value, 0) : null;
}

/** The live panel: running and waiting sequences, KV cache use and generated tokens/s, server-wide. */
class MetricsPanel {
  constructor() {
    this.running = document.getElementById("metric-running");
    this.waiting = document.getElementById("metric-waiting");
    this.kv = document.getElementById("metric-kv");
    this.tps = document.getElementById("metric-tps");
    this.state = document.getElementById("metrics-state");
    this.previous = null; // {tokens, at}: the generation-token counter at the last poll
  }

  start() {
    const tick = async () => {
      if (!document.hidden) await this.poll();
      setTimeout(tick, METRICS_INTERVAL_MS); // after the poll ends, so a slow server never piles them up
    };
    tick();
  }

  async poll() {
    try {
      const response = await fetch("metrics", { cache: "no-store" });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      this.show(parsePrometheus(await response.text()), performance.now());
      this.state.textContent = "";
      this.state.title = "";
    } catch (err) {
      this.state.textContent = "(unavailable)";
      this.state.title = describe(err);
    }
  }

  show(samples, at) {
    const running = sum(samples, "vllm:num_requests_running");
    const waiting = sum(samples, "vllm:num_requests_waiting");
    this.running.textContent = running === null ? "–" : String(running);
    this.waiting.textContent = waiting === null ? "–" : String(waiting);
    const usage = samples.get("vllm:kv_cache_usage_perc") || [];
    const mean = usage.reduce((total, s) => total + s.value, 0) / usage.length;
    this.kv.textContent = usage.length ? `${(100 * mean).toFixed(1)} %` : "–";
    this.kv.title = usage.length > 1 ? `mean of ${usage.length} workers` : "";
    const tokens = sum(samples, "vllm:generation_tokens_total") || 0;
    const previous = this.previous;
    // A counter that went down means the server restarted: start over rather than show a negative rate.
    if (previous && tokens >= previous.tokens && at > previous.at) {
      this.tps.textContent = ((tokens - previous.tokens) / ((at - previous.at) / 1000)).toFixed(1);
    }
    this.previous = { tokens, at };
  }
}

/** The conversation: settings, history, the reply being streamed and the stop button. */
class ChatPage {
  constructor() {
    const byId = (id) => document.getElementById(id);
    this.model = byId("model");
    this.apiKey = byId("api-key");
    this.system = byId("system");
    this.temperature = byId("temperature");
    this.maxTokens = byId("max-tokens");
    this.messages = byId("messages");
    this.empty = byId("empty");
    this.error = byId("error");
    this.prompt = byId("prompt");
    this.sendButton = byId("send");
    this.stopButton = byId("stop");
    this.history = []; // {role, content}: exactly what is on screen, resent with every turn
    this.conversation = 0; // bumped by "New chat", so a reply still finishing cannot join the next one
    this.abort = null; // the AbortController of the reply being streamed
    this.modelsFailed = false;
  }

  start() {
    byIdListen("composer", "submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener("click", () => this.abort && this.abort.abort());
    byIdListen("new-chat", "click", () => this.newChat());
    byIdListen("reload-models", "click", () => this.loadModels());
    this.apiKey.addEventListener("change", () => this.loadModels());
    this.loadModels();
  }

  headers() {
    const headers = { "Content-Type": "application/json" };
    const key = this.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async loadModels() {
    let ids;
    try {
      const response = await fetch("v1/models", { headers: this.headers() });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      const body = await response.json();
      ids = body.data.filter((card) => !card.embedding_only).map((card) => card.id);
    } catch (err) {
      this.fillModels([], "unavailable");
      this.showError(`Could not list the models: ${describe(err)}`);
      this.modelsFailed = true;
      return;
    }
    this.fillModels(ids, "no model is served yet");
    if (this.modelsFailed) this.clearError();
    this.modelsFailed = false;
  }

  fillModels(ids, placeholder) {
    const previous = this.model.value;
    this.model.replaceChildren();
    if (!ids.length) this.model.append(new Option(placeholder, ""));
    for (const id of ids) this.model.append(new Option(id, id));
    if (ids.includes(previous)) this.model.value = previous;
  }

  /** temperature and max_tokens as typed; empty means the server's default, range checks are the server's. */
  sampling() {
    const params = {};
    for (const [name, input] of [["temperature", this.temperature], ["max_tokens", this.maxTokens]]) {
      if (input.validity.badInput) throw new Error(`${name} must be a number`);
      if (input.value.trim() !== "") params[name] = Number(input.value);
    }
    return params;
  }

  async send() {
    const text = this.prompt.value.trim();
    if (!text || this.abort) return;
    const model = this.model.value;
    if (!model) {
      this.showError("No model to talk to: the server lists none (reload the list with ↻).");
      return;
    }
    let params;
    try {
      params = this.sampling();
    } catch (err) {
      this.showError(describe(err));
      return;
    }
    this.clearError();
    const user = { role: "user", content: text };
    const system = this.system.value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history, user];
    const conversation = this.conversation;
    this.prompt.value = "";
    const userView = this.addMessage("user", text);
    const reply = this.addMessage("assistant", "");
    reply.root.classList.add("pending");
    const abort = new AbortController();
    this.setStreaming(abort);
    const outcome = {
      content: "", reasoning: "", finish: null, usage: null, stopped: false, error: null, firstAt: null,
    };
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: this.headers(),
        body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...params }),
        signal: abort.signal,
      });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(`The reply broke off: ${chunk.error.message}`);
        for (const choice of chunk.choices || []) {
          const thought = choice.delta && choice.delta.reasoning_content;
          if (thought) {
            // A reasoning model's thinking: shown apart, above the answer, and not sent back next turn.
            outcome.firstAt = outcome.firstAt ?? performance.now();
            outcome.reasoning += thought;
            reply.thinking().appendData(thought);
            this.scrollDown();
          }
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            outcome.firstAt = outcome.firstAt ?? performance.now();
            outcome.content += delta;
            reply.text.appendData(delta);
            this.scrollDown();
          }
          if (choice.finish_reason) outcome.finish = choice.finish_reason;
        }
        if (chunk.usage) outcome.usage = chunk.usage;
      }
    } catch (err) {
      if (err.name === "AbortError") outcome.stopped = true;
      else outcome.error = err;
    } finally {
      this.setStreaming(null);
      reply.root.classList.remove("pending");
    }
    if (conversation !== this.conversation) return; // "New chat" was pressed meanwhile
    if (outcome.error) this.showError(describe(outcome.error));
    if (!outcome.content && !outcome.reasoning) {
      // Nothing came back: undo the turn, so the message can be sent again as it was.
      userView.root.remove();
      reply.root.remove();
      if (!this.prompt.value) this.prompt.value = text;
      this.empty.hidden = this.history.length > 0;
      return;
    }
    this.history.push(user, { role: "assistant", content: outcome.content });
    reply.meta.textContent = replyMeta(outcome, (performance.now() - outcome.firstAt) / 1000);
    if (outcome.error) reply.root.classList.add("failed");
  }

  setStreaming(abort) {
    this.abort = abort;
    this.sendButton.disabled = abort !== null;
    this.stopButton.disabled = abort === null;
  }

  newChat() {
    if (this.abort) this.abort.abort();
    this.conversation += 1;
    this.history = [];
    this.messages.replaceChildren(this.empty);
    this.empty.hidden = false;
    this.clearError();
    this.prompt.focus();
  }

  /** A message box; its text is a Text node, so whatever the model writes stays text. */
  addMessage(role, content) {
    this.empty.hidden = true;
    const root = element("div", `message ${role}`);
    const text = document.createTextNode(content);
    const body = element("div", "content");
    body.append(text);
    const meta = element("div", "meta");
    root.append(element("div", "role", role === "user" ? "You" : this.model.value), body, meta);
    this.messages.append(root);
    this.scrollDown();
    let thoughts = null;
    const thinking = () => {
      // Made when the first reasoning arrives: a collapsible block before the answer.
      if (thoughts === null) {
        const details = element("details", "thinking");
        details.open = true;
        thoughts = document.createTextNode("");
        const inner = element("div", "thinking-text");
        inner.append(thoughts);
        details.append(element("summary", null, "Thinking"), inner);
        root.insertBefore(details, body);
      }
      return thoughts;
    };
    return { root, text, meta, thinking };
  }

  scrollDown() {
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }

  clearError() {
    this.error.textContent = "";
    this.error.hidden = true;
  }
}

/** The line under a finished reply: why it ended, its token counts and its speed after the first token. */
function replyMeta(outcome, seconds) {
  const parts = [];
  if (outcome.stopped) parts.push("stopped");
  else if (outcome.error) parts.push("failed");
  else if (outcome.finish === "length") parts.push("reached max tokens");
  const usage = outcome.usage;
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    if (usage.completion_tokens > 1 && seconds > 0) {
      parts.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
  }
  return parts.join(" · ");
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function byIdListen(id, type, listener) {
  document.getElementById(id).addEventListener(type, listener);
}

new ChatPage().start();
new MetricsPanel().start();
