// The playground: calls POST /chat_complete on this server and renders the answer as it streams.
// Keys live in this page's memory; sessionStorage only when the user ticks "Remember".
// Words come from static/i18n (I18N.t), so that they follow the language switch.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const t = I18N.t;
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
  // text: the message itself, or for an error a function that words it in the current language.
  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.dataset.i18n = "playground.who." + role;
    who.textContent = t(who.dataset.i18n);
    const body = document.createElement("span");
    body.className = "text";
    if (typeof text === "function") I18N.show(body, text);
    else body.textContent = text;
    item.append(who, body);
    $("history").append(item);
    $("history").scrollTop = $("history").scrollHeight;
    return body;
  }
  function setStatus(key) {
    I18N.show($("status"), key ? () => t(key) : null);
  }
  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  // -- errors in plain words, as functions that word them in the current language

  class PageError extends Error {
    constructor(render) {
      super(render());
      this.render = render;
    }
  }

  // What each error code means to the person at the page; the server's own words follow in the
  // message. A code not listed here gets the server's message as it is.
  const BY_CODE = {
    invalid_access_token: "playground.error.access_token",
    access_token_disabled: "playground.error.token_disabled",
    access_token_expired: "playground.error.token_expired",
    model_not_allowed: "playground.error.model_not_allowed",
    model_not_priced: "playground.error.model_not_priced",
    budget_exceeded: "playground.error.budget_exceeded",
    proxy_rate_limited: "playground.error.rate_limited",
    rate_limit_exceeded: "playground.error.rate_limited",
    proxy_concurrency_limited: "playground.error.concurrency",
    missing_openai_token: "playground.error.openai_key",
    invalid_openai_token: "playground.error.openai_key",
    invalid_api_key: "playground.error.openai_key",
    request_too_large: "playground.error.too_large",
  };
  // Without a code the status says it (an upstream's 401 is about the key, a 429 a rate limit);
  // a 403 without one is left to the server's message: it has several causes.
  const BY_STATUS = {
    401: "playground.error.openai_key",
    413: "playground.error.too_large",
    429: "playground.error.rate_limited",
  };
  // The forms that say when to retry, for an answer with Retry-After.
  const WAITS = {
    "playground.error.rate_limited": "playground.error.rate_limited_wait",
    "playground.error.budget_exceeded": "playground.error.budget_exceeded_wait",
  };

  async function describeError(response) {
    let message = "";
    let code = "";
    try {
      const body = await response.json();
      message = body.text || (body.error && body.error.message) || "";
      code = (body.error && body.error.code) || "";
    } catch (e) {
      message = response.statusText;
    }
    const status = response.status;
    const key = BY_CODE[code] || (code ? undefined : BY_STATUS[status]);
    if (!key) return () => t("common.error.status", { status: String(status), message });
    const wait = Number(response.headers.get("Retry-After"));
    if (WAITS[key] && wait > 0) return () => t(WAITS[key], { wait: I18N.duration(wait), message });
    return () => t(key, { message });
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
        if (event.error) {
          const message = event.error.message;
          throw new PageError(() => t("playground.error.broke_off", { message }));
        }
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
    setStatus("playground.status.waiting");
    let answer = "";
    let bubble = null;
    try {
      let response;
      try {
        response = await fetch("/chat_complete", {
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
      } catch (error) {
        if (error.name === "AbortError") throw error;
        const message = error.message;
        throw new PageError(() => t("common.error.unreachable", { message }));
      }
      if (!response.ok) throw new PageError(await describeError(response));
      bubble = addMessage("assistant", "");
      if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        setStatus("playground.status.streaming");
        await readStream(response, (delta) => {
          answer += delta;
          bubble.textContent = answer;
          $("history").scrollTop = $("history").scrollHeight;
        });
      } else {
        const body = await response.json();
        answer = body.text || "";
        if (answer) bubble.textContent = answer;
        else I18N.show(bubble, () => t("playground.no_text"));
      }
      history.push({ role: "assistant", content: answer });
      setStatus("playground.status.done");
    } catch (error) {
      if (error.name === "AbortError") {
        setStatus("playground.status.stopped");
        if (answer) history.push({ role: "assistant", content: answer });
      } else {
        const message = error.message;
        addMessage("error", error instanceof PageError ? error.render : () => message);
        setStatus(null);
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
      setStatus(null);
    });
    $("remember").addEventListener("change", saveKeys);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("send-form").requestSubmit();
    });
  });
})();
