// kiln playground: a chat over the server's own OpenAI endpoint, streamed, with TTFT and
// tokens/s. No build step, no dependencies: served by `kiln serve` at /.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];

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
    select.innerHTML = "";
    for (const m of body.data) select.add(new Option(m.id, m.id));
  } catch (e) {
    $("stats").textContent = "models: " + e.message;
  }
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  if (!$("model").value) await loadModels();
  $("send").disabled = true;
  $("prompt").value = "";
  bubble("user", prompt);
  history.push({ role: "user", content: prompt });
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value.trim() });
  const answer = bubble("assistant", "");
  answer.id = "answer";
  for (const old of document.querySelectorAll("#log .assistant")) if (old !== answer) old.removeAttribute("id");
  const started = performance.now();
  let first = null, tokens = 0, chunks = 0, text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({
        model: $("model").value, messages: messages.concat(history), stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const data = JSON.parse(line.slice(6));
          if (data.error) throw new Error(data.error.message);
          if (data.usage) tokens = data.usage.completion_tokens;
          for (const choice of data.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (!piece) continue;
            if (first === null) first = performance.now();
            chunks += 1;
            text += piece;
            answer.textContent = text;
          }
        }
      }
      stats(started, first, tokens || chunks, false);
    }
    history.push({ role: "assistant", content: text });
    stats(started, first, tokens || chunks, true);
  } catch (e) {
    answer.className = "msg error";
    answer.textContent = "error " + e.message;
    history.pop();
  } finally {
    $("send").disabled = false;
  }
}

function stats(started, first, tokens, done) {
  if (first === null) return;
  const now = performance.now();
  const ttft = first - started;
  const rate = tokens > 1 ? (tokens - 1) / ((now - first) / 1000) : 0;
  $("stats").textContent = `TTFT ${ttft.toFixed(0)} ms · ${rate.toFixed(1)} tok/s · ` +
    `${tokens} tokens${done ? "" : " …"}`;
  $("stats").dataset.done = done ? "1" : "";
}

$("send").addEventListener("click", send);
$("clear").addEventListener("click", () => { history.length = 0; $("log").innerHTML = ""; $("stats").textContent = ""; });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
$("key").value = localStorage.getItem("kiln-api-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("kiln-api-key", $("key").value); loadModels(); });
loadModels();
