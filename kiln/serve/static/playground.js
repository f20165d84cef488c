// kiln playground: a chat over the server's own OpenAI endpoint, streamed, with TTFT and
// tokens/s. No build step, no dependencies: served by `kiln serve` at /. Model and user
// text only ever reaches the page as textContent (or an attribute), never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // the conversation as the next request sends it
let running = null;  // the answer streaming now: { controller, stopped }
let plain = false;  // the model has no chat template: plain completions of the typed text
const templates = {};  // model id -> whether it has a chat template (/v1/models says)
// The server's 400 for a chat request to a model without a chat template (kiln.tokenizer).
const NO_TEMPLATE = /no chat template/i;

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}

function setStats(text, done, kind) {
  $("stats").textContent = text;
  $("stats").dataset.done = done ? "1" : "";
  $("stats").dataset.kind = kind || "";  // "models": the model list failed to load
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function setPlain(on) {
  plain = on;
  $("mode").hidden = !on;
  $("system").disabled = on;
  $("prompt").placeholder = on ? "Text to continue (Ctrl+Enter to send)"
    : "Ask something (Ctrl+Enter to send)";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error && body.error.message || JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    select.replaceChildren();
    for (const m of body.data) {
      select.add(new Option(m.id, m.id));
      templates[m.id] = m.chat_template;  // kiln's field; absent elsewhere: chat
    }
  } catch (e) {
    setStats("models: " + e.message, true, "models");
    return;
  }
  if ($("stats").dataset.kind === "models") setStats("", true);  // a wrong key's 401, say
  setPlain(templates[$("model").value] === false);
}

function requestBody(prompt) {
  const body = { model: $("model").value, stream: true, stream_options: { include_usage: true } };
  // An empty field leaves the value to the server (its default temperature; max_tokens:
  // up to the end of the context), rather than sending 0.
  const temperature = $("temperature").value.trim(), maxTokens = $("max-tokens").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  if (plain) {
    body.prompt = prompt;
  } else {
    const system = $("system").value.trim();
    body.messages = (system ? [{ role: "system", content: system }] : [])
      .concat(history, [{ role: "user", content: prompt }]);
  }
  return body;
}

function post(prompt, run) {
  return fetch(plain ? "/v1/completions" : "/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody(prompt)),
    signal: run.controller.signal,
  });
}

async function send() {
  if (running) return;  // one answer at a time (Ctrl+Enter as the disabled Send button)
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const run = { controller: new AbortController(), stopped: false };
  running = run;
  setBusy(true);
  $("prompt").value = "";
  bubble("user", prompt);
  const answer = bubble("assistant", "");
  answer.id = "answer";
  for (const old of document.querySelectorAll("#log .assistant")) if (old !== answer) old.removeAttribute("id");
  setStats("…", false);
  if (!$("model").value) await loadModels();
  const got = { started: performance.now(), first: null, tokens: 0, chunks: 0, text: "",
    finish: null, why: null };
  let cut = null, failed = false;  // why the answer is not whole; whether an error cut it
  try {
    if (running !== run) return;  // cleared meanwhile
    let response = await post(prompt, run);
    if (!plain && response.status === 400) {
      const message = await errorText(response);
      if (!NO_TEMPLATE.test(message)) throw new Error(message);
      setPlain(true);  // /v1/models did not say (another server): now send it as text
      response = await post(prompt, run);
    }
    if (!response.ok) throw new Error(await errorText(response));
    await readStream(response, run, answer, got);
    if (got.finish === "length") cut = "max tokens";
    else if (got.finish === "abort") cut = "aborted by the server" + (got.why ? ": " + got.why : "");
    else if (got.finish === null) cut = "the stream ended before the answer did";
  } catch (e) {
    cut = run.stopped ? "stopped" : "error: " + e.message;
    failed = !run.stopped;
  } finally {
    if (running === run) {  // else Clear took it: nothing of it reaches the new conversation
      running = null;
      setBusy(false);
      finish(prompt, answer, got, cut, failed);
    }
  }
}

async function readStream(response, run, answer, got) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done || running !== run) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const data = JSON.parse(line.slice(6));
        if (data.error) throw new Error(data.error.message);
        if (data.usage) got.tokens = data.usage.completion_tokens;
        for (const choice of data.choices || []) {
          if (choice.finish_reason) [got.finish, got.why] = [choice.finish_reason, choice.stop_reason];
          const piece = plain ? choice.text : choice.delta && choice.delta.content;
          if (!piece) continue;
          if (got.first === null) got.first = performance.now();
          got.chunks += 1;
          got.text += piece;
          answer.textContent = got.text;
        }
      }
    }
    stats(got, false, null);
  }
}

// The answer as it ended: an error before any text replaces it; otherwise its text stays,
// marked when it was cut (stopped, max tokens, the server's abort, an error), and goes
// into the conversation with its question.
function finish(prompt, answer, got, cut, failed) {
  if (failed && !got.text) {
    answer.className = "msg error";
    answer.textContent = cut;
    if ($("stats").dataset.kind === "models") $("stats").dataset.done = "1";  // keep why
    else setStats("", true);
    return;
  }
  if (cut) {
    answer.classList.add("cut");
    answer.dataset.cut = cut;
  }
  if (got.text && !plain) history.push({ role: "user", content: prompt }, { role: "assistant", content: got.text });
  stats(got, true, cut);
}

function stats(got, done, cut) {
  const parts = [];
  if (got.first !== null) {
    const tokens = got.tokens || got.chunks;
    parts.push(`TTFT ${(got.first - got.started).toFixed(0)} ms`);
    if (tokens > 1) {  // a rate needs two tokens: one answers with TTFT alone
      const rate = (tokens - 1) / ((performance.now() - got.first) / 1000);
      parts.push(`${rate.toFixed(1)} tok/s`);
    }
    parts.push(`${tokens} ${tokens === 1 ? "token" : "tokens"}`);
  } else if (done && !cut) {
    parts.push(`${got.tokens} tokens`);  // an empty answer (an end token came first)
  }
  if (cut) parts.push("cut: " + cut);
  if (parts.length || done) setStats(parts.join(" · ") + (done ? "" : " …"), done);
}

function stop() {
  if (!running) return;
  running.stopped = true;
  running.controller.abort();  // the server aborts a request whose client went away
}

function clear() {
  if (running) {
    running.controller.abort();
    running = null;
    setBusy(false);
  }
  history.length = 0;
  $("log").replaceChildren();
  setStats("", false);
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clear);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && running) { e.preventDefault(); stop(); } });
$("key").value = localStorage.getItem("kiln-api-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("kiln-api-key", $("key").value); loadModels(); });
loadModels();
