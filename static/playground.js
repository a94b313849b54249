// The playground: calls POST /chat_complete on this server and renders the answer as it streams.
// Keys live in this page's memory; sessionStorage only when the user ticks "Remember".
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEYS = ["access-token", "openai-key"];
  const history = []; // {role, content} of the conversation so far
  let controller = null;

  // -- keys: memory by default, sessionStorage on explicit opt-in
  function restoreKeys() {
    if (sessionStorage.getItem("remember") === "1") {
      $("remember").checked = true;
      for (const id of KEYS) $(id).value = sessionStorage.getItem(id) || "";
    } else if (document.body.dataset.demo === "true") {
      // The demo upstream accepts any key; the default access token is public anyway.
      if (document.body.dataset.defaultToken === "true") $("access-token").value = "123456";
      $("openai-key").value = "demo-key";
    }
  }
  function saveKeys() {
    if ($("remember").checked) {
      sessionStorage.setItem("remember", "1");
      for (const id of KEYS) sessionStorage.setItem(id, $(id).value);
    } else {
      for (const id of ["remember", ...KEYS]) sessionStorage.removeItem(id);
    }
  }

  // -- rendering
  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    item.append(who, body);
    $("history").append(item);
    $("history").scrollTop = $("history").scrollHeight;
    return body;
  }
  function setStatus(text) {
    $("status").textContent = text;
  }
  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  // -- errors in plain words
  async function describeError(response) {
    let message = "";
    try {
      const body = await response.json();
      message = body.text || (body.error && body.error.message) || "";
    } catch (e) {
      message = response.statusText;
    }
    if (response.status === 403) return "Wrong access token: check the proxy's access token. (" + message + ")";
    if (response.status === 401) return "OpenAI key missing or rejected: " + message;
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After");
      return "Rate limited" + (wait ? ": retry in " + wait + " s" : "") + ". " + message;
    }
    if (response.status === 413) return "The conversation is too large for this proxy. " + message;
    return "Error " + response.status + ": " + message;
  }

  // -- SSE: events can be split across network chunks, and several can share one
  async function readStream(response, onDelta) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const raw = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
        const data = raw
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a comment such as ": keep-alive"
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error("The answer broke off: " + event.error.message);
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        }
      }
    }
  }

  async function send(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt) return;
    saveKeys();
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, { role: "user", content: prompt });
    const params = { model_name: $("model").value.trim() || "gpt-4o-mini", stream: $("stream").checked };
    if ($("temperature").value !== "") params.temperature = Number($("temperature").value);
    if ($("max-tokens").value !== "") params.max_tokens = Number($("max-tokens").value);

    addMessage("user", prompt);
    $("prompt").value = "";
    history.push({ role: "user", content: prompt });
    controller = new AbortController();
    setBusy(true);
    setStatus("Waiting for the answer…");
    let answer = "";
    let bubble = null;
    try {
      const response = await fetch("/chat_complete", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          "access-token": $("access-token").value,
          "openai-token": $("openai-key").value,
        },
        body: JSON.stringify({ messages, generate_params: params }),
        signal: controller.signal,
        cache: "no-store",
        referrerPolicy: "no-referrer",
      });
      if (!response.ok) throw new Error(await describeError(response));
      bubble = addMessage("assistant", "");
      if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        setStatus("Streaming…");
        await readStream(response, (delta) => {
          answer += delta;
          bubble.textContent = answer;
          $("history").scrollTop = $("history").scrollHeight;
        });
      } else {
        const body = await response.json();
        answer = body.text || "";
        bubble.textContent = answer || "(no text: the model answered with tool calls)";
      }
      history.push({ role: "assistant", content: answer });
      setStatus("Done.");
    } catch (error) {
      if (error.name === "AbortError") {
        setStatus("Stopped.");
        if (answer) history.push({ role: "assistant", content: answer });
      } else {
        addMessage("error", error.message);
        setStatus("");
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    restoreKeys();
    $("send-form").addEventListener("submit", send);
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("clear").addEventListener("click", () => {
      history.length = 0;
      $("history").replaceChildren();
      setStatus("");
    });
    $("remember").addEventListener("change", saveKeys);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("send-form").requestSubmit();
    });
  });
})();
