// The admin page's tabs beside Usage: Tokens (add, edit, rotate, disable, delete; each person's own
// view), Requests (one row per request from the ledger) and Audit, over /admin/api/ with the admin-token
// header only (credentials: "omit": no cookie is ever sent). Token and model names come from users:
// they only ever go into the page through textContent and setAttribute, never as markup.
// The strings are the admin.console.* keys of static/i18n/<language>.json (static/i18n.js); fixed text
// carries data-i18n and is reworded in place by the language switch, the rest is drawn again.
"use strict";

(function () {
  const t = I18N.t;
  const $ = (id) => document.getElementById(id);
  const STORE_KEY = "admin-token";

  // -- DOM helpers (no markup strings)

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return node;
  }
  // An element whose whole text is the string `key`: reworded in place when the language changes.
  function fixed(tag, attributes, key) {
    return el(tag, Object.assign({ "data-i18n": key }, attributes || {}), t(key));
  }
  const words = (key) => fixed("span", {}, key);
  const text = (node, value) => {
    node.textContent = value;
    return node;
  };

  // -- numbers, money, times, the language's way

  const integer = (value) => I18N.number(value || 0, { maximumFractionDigits: 0 });
  function usd(value) {
    if (typeof value !== "number" || !isFinite(value)) return "–";
    const abs = Math.abs(value);
    // Cents from a dollar up; below that three significant digits, as on the Usage tab.
    const digits = abs >= 1 || abs === 0 ? 2 : Math.min(10, Math.max(2, 2 - Math.floor(Math.log10(abs))));
    return I18N.number(value, { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: digits });
  }
  const ms = (value) => (typeof value === "number" ? t("admin.console.ms", { n: Math.round(value) }) : "–");
  const shortTime = (iso) => (typeof iso === "string" ? iso.replace("T", " ").replace("Z", "") : "–");
  function ago(iso) {
    if (typeof iso !== "string") return t("admin.console.never");
    return t("admin.console.ago", { time: I18N.duration((Date.now() - Date.parse(iso)) / 1000) });
  }

  // -- the API

  class ApiFailure extends Error {
    constructor(message, status, param) {
      super(message);
      this.status = status;
      this.param = param;
    }
  }

  function adminToken() {
    return ($("admin-token") && $("admin-token").value) || sessionStorage.getItem(STORE_KEY) || "";
  }

  async function api(method, path, body) {
    const headers = { "admin-token": adminToken(), Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch("/admin/api" + path, {
        method: method,
        headers: headers,
        body: body !== undefined ? JSON.stringify(body) : undefined,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new ApiFailure(t("common.error.unreachable", { message: e.message }), 0);
    }
    if (response.ok) {
      return (response.headers.get("Content-Type") || "").startsWith("application/json") ? response.json() : response;
    }
    let message = response.statusText;
    let param = null;
    try {
      const answer = await response.json();
      message = (answer.error && answer.error.message) || answer.text || message;
      param = (answer.error && answer.error.param) || null;
    } catch (e) {
      // not JSON: the status text says it
    }
    if (response.status === 403) throw new ApiFailure(t("admin.console.error.forbidden"), 403);
    throw new ApiFailure(t("common.error.status", { status: response.status, message: message }), response.status, param);
  }

  // A message line: the server's words as they came, or ours (drawn again in a new language).
  function say(node, message, isError) {
    I18N.show(node, message ? (typeof message === "function" ? message : () => message) : null);
    node.hidden = !message;
    if (isError !== undefined) node.classList.toggle("error", isError);
  }

  function table(id, captionKey, columns) {
    const head = el("tr");
    for (const [key, numeric] of columns) head.append(fixed("th", { scope: "col", class: numeric ? "num" : null }, key));
    return el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        { id: id, class: "console-table" },
        fixed("caption", { class: "visually-hidden" }, captionKey),
        el("thead", {}, head),
        el("tbody"),
      ),
    );
  }

  // -- the page's frame: tabs over the usage report and the three new sections

  const tabs = ["usage", "tokens", "requests", "audit"];
  let activeTab = "usage";

  function buildFrame() {
    const form = $("query");
    const usage = el("section", { id: "tab-usage", role: "tabpanel", "aria-labelledby": "tab-usage-button" });
    for (const id of ["error", "status", "report"]) if ($(id)) usage.append($(id));
    const bar = el("nav", { class: "tabs", role: "tablist", "aria-label": t("admin.console.tabs"), "data-i18n-aria-label": "admin.console.tabs" });
    for (const name of tabs) {
      const button = fixed(
        "button",
        { type: "button", role: "tab", id: "tab-" + name + "-button", "aria-controls": "tab-" + name, "data-tab": name },
        "admin.console.tab." + name,
      );
      button.addEventListener("click", () => showTab(name));
      bar.append(button);
    }
    form.after(bar);
    bar.after(usage);
    usage.after(buildTokens(), buildRequests(), buildAudit(), buildConfirm());
    const asked = location.hash.slice(1);
    showTab(tabs.includes(asked) ? asked : "usage");
    window.addEventListener("hashchange", () => {
      const name = location.hash.slice(1);
      if (tabs.includes(name) && name !== activeTab) showTab(name);
    });
    // What is drawn from data (rows, amounts, times) is drawn again in the new language.
    I18N.onChange(() => {
      if (activeTab === "tokens") {
        if (shownPerson && !$("person").hidden) showPerson(shownPerson);
        else drawTokens();
      }
      if (activeTab === "requests") drawRequests();
      if (activeTab === "audit") drawAudit();
    });
  }

  function showTab(name) {
    activeTab = name;
    for (const other of tabs) {
      $("tab-" + other).hidden = other !== name;
      $("tab-" + other + "-button").setAttribute("aria-selected", String(other === name));
    }
    if (location.hash.slice(1) !== name) history.replaceState(null, "", name === "usage" ? location.pathname : "#" + name);
    if (name === "tokens") loadTokens();
    if (name === "requests") loadRequests(0);
    if (name === "audit") loadAudit(false);
  }

  // -- Tokens

  let tokens = [];
  let runtimeTokens = true;
  let editing = null; // the name being edited, or "" for a new one
  let shownExpires = ""; // the day the edit form opened with
  let lastDone = null; // what the last action did, shown before the count

  function buildTokens() {
    const section = el("section", { id: "tab-tokens", role: "tabpanel", "aria-labelledby": "tab-tokens-button", hidden: true });
    const list = el("div", { id: "tokens-list", class: "card" });
    const bar = el(
      "div",
      { class: "toolbar" },
      fixed("h2", {}, "admin.console.tokens.title"),
      fixed("button", { type: "button", id: "add-person", class: "primary" }, "admin.console.tokens.add"),
      fixed("button", { type: "button", id: "tokens-refresh", class: "secondary" }, "admin.console.refresh"),
    );
    list.append(
      bar,
      el("p", { id: "tokens-error", class: "error", role: "alert", hidden: true }),
      el("p", { id: "tokens-status", class: "status", role: "status" }),
      buildNewToken(),
      buildForm(),
      table("tokens-table", "admin.console.tokens.title", [
        ["admin.console.col.name"],
        ["admin.console.col.source"],
        ["admin.console.col.status"],
        ["admin.console.col.spend"],
        ["admin.console.col.limits"],
        ["admin.console.col.models"],
        ["admin.console.col.last_active"],
        ["admin.console.col.actions"],
      ]),
    );
    section.append(list, buildPerson());
    section.querySelector("#add-person").addEventListener("click", () => openForm(null));
    section.querySelector("#tokens-refresh").addEventListener("click", () => loadTokens());
    return section;
  }

  function buildNewToken() {
    const box = el(
      "div",
      { id: "new-token", class: "new-token", hidden: true, role: "region", "aria-live": "polite" },
      el("p", { id: "new-token-title" }),
      el(
        "div",
        { class: "new-token-row" },
        el("code", { id: "new-token-value", tabindex: "0" }),
        fixed("button", { type: "button", id: "copy-token" }, "admin.console.new.copy"),
        fixed("button", { type: "button", id: "new-token-done", class: "secondary" }, "admin.console.new.done"),
      ),
      el("p", { id: "copy-status", class: "status" }),
    );
    box.querySelector("#copy-token").addEventListener("click", copyToken);
    box.querySelector("#new-token-done").addEventListener("click", hideNewToken);
    return box;
  }

  function showNewToken(name, value) {
    I18N.show($("new-token-title"), () => t("admin.console.new.title", { name: name }));
    text($("new-token-value"), value);
    I18N.show($("copy-status"), null);
    $("new-token").hidden = false;
    $("copy-token").focus();
  }

  function hideNewToken() {
    // The value leaves the page: nothing keeps it once it is handed over.
    text($("new-token-value"), "");
    $("new-token").hidden = true;
  }

  async function copyToken() {
    const value = $("new-token-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
      I18N.show($("copy-status"), () => t("admin.console.new.copied"));
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents($("new-token-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      const copied = document.execCommand && document.execCommand("copy");
      I18N.show($("copy-status"), () => t(copied ? "admin.console.new.copied" : "admin.console.new.copy_failed"));
    }
  }

  const FORM_FIELDS = [
    // [field, input type, label key, extra attributes]
    ["budget_usd", "number", "admin.console.form.budget_usd", { min: 0, step: "any" }],
    ["budget_tokens", "number", "admin.console.form.budget_tokens", { min: 0, step: 1 }],
    ["rate_limit_per_minute", "number", "admin.console.form.rate", { min: 0, step: 1 }],
    ["max_concurrent", "number", "admin.console.form.concurrent", { min: 0, step: 1 }],
    [
      "allowed_models",
      "text",
      "admin.console.form.models",
      { placeholder: t("admin.console.form.models.hint"), "data-i18n-placeholder": "admin.console.form.models.hint" },
    ],
    ["expires", "date", "admin.console.form.expires", {}],
  ];

  function buildForm() {
    const form = el("form", { id: "token-form", class: "token-form", hidden: true, novalidate: true });
    form.append(
      el("h3", { id: "token-form-title" }),
      el(
        "label",
        { class: "wide" },
        words("admin.console.form.name"),
        el("input", {
          id: "tf-name",
          name: "name",
          required: true,
          autocomplete: "off",
          spellcheck: "false",
          placeholder: t("admin.console.form.name.hint"),
          "data-i18n-placeholder": "admin.console.form.name.hint",
        }),
      ),
    );
    for (const [field, type, label, extra] of FORM_FIELDS) {
      form.append(el("label", {}, words(label), el("input", Object.assign({ id: "tf-" + field, name: field, type: type }, extra))));
    }
    const period = el("select", { id: "tf-budget_period", name: "budget_period" });
    for (const p of ["month", "week", "day"]) period.append(fixed("option", { value: p }, "admin.console.form.period." + p));
    const cache = el("select", { id: "tf-cache", name: "cache" });
    for (const [value, key] of [["", "default"], ["true", "on"], ["false", "off"]]) {
      cache.append(fixed("option", { value: value }, "admin.console.form.cache." + key));
    }
    form.append(
      el("label", {}, words("admin.console.form.budget_period"), period),
      el("label", {}, words("admin.console.form.cache"), cache),
      el(
        "label",
        { class: "check" },
        el("input", { id: "tf-use_server_key", name: "use_server_key", type: "checkbox" }),
        words("admin.console.form.server_key"),
      ),
      el("p", { id: "token-form-error", class: "error", role: "alert", hidden: true }),
      el(
        "div",
        { class: "buttons" },
        el("button", { type: "submit", id: "token-form-submit" }),
        fixed("button", { type: "button", id: "token-form-cancel", class: "secondary" }, "admin.console.form.cancel"),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submitForm();
    });
    form.querySelector("#token-form-cancel").addEventListener("click", closeForm);
    return form;
  }

  function openForm(token) {
    if (!runtimeTokens) {
      say($("tokens-error"), () => t("admin.console.tokens.no_database"), true);
      return;
    }
    hideNewToken();
    editing = token ? token.name : "";
    const fields = (token && token.fields) || {};
    I18N.show($("token-form-title"), () => (token ? t("admin.console.form.edit", { name: token.name }) : t("admin.console.form.new")));
    I18N.show($("token-form-submit"), () => t(token ? "admin.console.form.save" : "admin.console.form.create"));
    $("tf-name").value = token ? token.name : "";
    $("tf-name").disabled = Boolean(token);
    for (const [field] of FORM_FIELDS) {
      const value = fields[field];
      let shown = value === undefined || value === null ? "" : String(value);
      if (field === "allowed_models" && Array.isArray(value)) shown = value.join(", ");
      // The date input holds a day; the time of day is kept unless the day is changed (formBody).
      if (field === "expires" && shown) shown = shown.slice(0, 10);
      $("tf-" + field).value = shown;
    }
    shownExpires = $("tf-expires").value;
    $("tf-budget_period").value = fields.budget_period || "month";
    $("tf-cache").value = fields.cache === undefined ? "" : String(fields.cache);
    $("tf-use_server_key").checked = Boolean(fields.use_server_key);
    say($("token-form-error"), "");
    for (const input of $("token-form").querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    $("token-form").hidden = false;
    (token ? $("tf-budget_usd") : $("tf-name")).focus();
  }

  function closeForm() {
    $("token-form").hidden = true;
    editing = null;
  }

  // The form's fields as the API takes them: empty means "unset" (null when editing, absent when new).
  function formBody() {
    const body = {};
    const isNew = editing === "";
    const put = (field, value) => {
      if (value === null && isNew) return;
      body[field] = value;
    };
    for (const [field, type, label] of FORM_FIELDS) {
      const input = $("tf-" + field);
      const raw = input.value.trim();
      if (field === "expires" && !isNew && raw === shownExpires) continue;
      // What the browser cannot read as a number reads as empty, which would remove the limit;
      // and JSON has no Infinity: 1e400 would travel as null, which removes it too.
      if (type === "number" && (input.validity.badInput || (raw && !Number.isFinite(Number(raw))))) {
        const refusal = new Error(t("admin.console.form.not_a_number", { field: t(label) }));
        refusal.param = field;
        throw refusal;
      }
      if (!raw) put(field, null);
      else if (field === "allowed_models") put(field, raw.split(",").map((m) => m.trim()).filter(Boolean));
      else if (type === "number") put(field, Number(raw));
      else put(field, raw);
    }
    const given = (field) => body[field] !== undefined && body[field] !== null;
    put("budget_period", given("budget_usd") || given("budget_tokens") ? $("tf-budget_period").value : null);
    const cache = $("tf-cache").value;
    put("cache", cache === "" ? null : cache === "true");
    put("use_server_key", $("tf-use_server_key").checked ? true : null);
    return body;
  }

  async function submitForm() {
    const isNew = editing === "";
    say($("token-form-error"), "");
    try {
      const body = formBody();
      if (isNew) {
        const made = await api("POST", "/tokens", Object.assign({ name: $("tf-name").value.trim() }, body));
        closeForm();
        await loadTokens(["create", made.name]);
        showNewToken(made.name, made.token);
      } else {
        const name = editing;
        await api("PATCH", "/tokens/" + encodeURIComponent(name), body);
        closeForm();
        await loadTokens(["update", name]);
      }
    } catch (e) {
      say($("token-form-error"), e.message, true);
      const input = e.param && $("tf-" + e.param);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        input.focus();
      }
    }
  }

  function badge(status) {
    return fixed("span", { class: "badge badge-" + status, "data-status": status }, "admin.console.status." + status);
  }

  function spendText(token) {
    const s = token.spend || {};
    const tokensText = (n) => t("admin.console.spend.tokens", { n: n || 0 });
    const parts = [];
    if (typeof token.budget_usd === "number") {
      parts.push(t("admin.console.spend.of", { spent: usd(s.spent_usd), budget: usd(token.budget_usd), left: usd(s.remaining_usd) }));
    }
    if (typeof token.budget_tokens === "number") {
      parts.push(
        t("admin.console.spend.of", {
          spent: tokensText(s.spent_tokens),
          budget: tokensText(token.budget_tokens),
          left: tokensText(s.remaining_tokens),
        }),
      );
    }
    if (!parts.length) parts.push(t("admin.console.spend." + (s.period || "month"), { spent: usd(s.spent_usd) }));
    return parts.join("; ");
  }

  function limitsText(token) {
    const parts = [];
    if (token.rate_limit_per_minute) parts.push(t("admin.console.limits.rate", { n: token.rate_limit_per_minute }));
    if (token.max_concurrent) parts.push(t("admin.console.limits.concurrent", { n: token.max_concurrent }));
    return parts.length ? parts.join(" · ") : t("admin.console.limits.none");
  }

  const modelsText = (token) => (token.allowed_models ? token.allowed_models.join(", ") : t("admin.console.models.any"));

  function tokenRow(token) {
    const row = el("tr", { "data-name": token.name, "data-source": token.source });
    const name = el("th", { scope: "row" }, el("button", { type: "button", class: "link", "data-action": "view" }, token.name));
    if (token.admin) name.append(" ", fixed("span", { class: "badge badge-admin" }, "admin.console.admin"));
    const actions = el("div", { class: "row-actions" });
    if (token.source === "page") {
      for (const action of ["edit", "rotate", token.disabled ? "enable" : "disable", "delete"]) {
        actions.append(
          fixed("button", { type: "button", class: "small" + (action === "delete" ? " danger" : ""), "data-action": action }, "admin.console.action." + action),
        );
      }
    } else {
      actions.append(fixed("span", { class: "muted" }, "admin.console.tokens.readonly"));
    }
    row.append(
      name,
      fixed("td", {}, "admin.console.source." + token.source),
      el("td", {}, badge(token.status)),
      el("td", { class: "spend" }, spendText(token)),
      el("td", {}, limitsText(token)),
      el("td", { class: "models" }, modelsText(token)),
      el("td", { title: token.last_active || "" }, ago(token.last_active)),
      el("td", { class: "actions" }, actions),
    );
    for (const button of row.querySelectorAll("button[data-action]")) {
      button.addEventListener("click", () => act(button.dataset.action, token));
    }
    return row;
  }

  function drawTokens() {
    $("tokens-table").tBodies[0].replaceChildren(...tokens.map(tokenRow));
    const made = tokens.filter((x) => x.source === "page").length;
    const done = lastDone;
    I18N.show($("tokens-status"), () => {
      const count = tokens.length
        ? t("admin.console.tokens.count", { n: tokens.length, page: made, file: tokens.length - made })
        : t("admin.console.tokens.none");
      return (done ? t("admin.console.done." + done[0], { name: done[1] }) + " " : "") + count;
    });
  }

  async function loadTokens(done) {
    lastDone = done || null;
    if (!adminToken()) {
      say($("tokens-error"), () => t("admin.console.need_token"), true);
      return;
    }
    say($("tokens-error"), "");
    I18N.show($("tokens-status"), () => t("admin.console.loading"));
    try {
      const answer = await api("GET", "/tokens");
      tokens = answer.tokens;
      runtimeTokens = answer.runtime_tokens;
      drawTokens();
      if (!runtimeTokens) say($("tokens-error"), () => t("admin.console.tokens.no_database"), false);
      $("req-names").replaceChildren(...tokens.map((x) => el("option", { value: x.name })));
    } catch (e) {
      I18N.show($("tokens-status"), null);
      say($("tokens-error"), e.message, true);
    }
  }

  function buildConfirm() {
    return el(
      "dialog",
      { id: "console-confirm", "aria-labelledby": "console-confirm-text" },
      el("p", { id: "console-confirm-text" }),
      el(
        "div",
        { class: "buttons" },
        fixed("button", { type: "button", id: "console-confirm-yes", class: "danger" }, "admin.console.confirm.yes"),
        fixed("button", { type: "button", id: "console-confirm-no", class: "secondary" }, "admin.console.confirm.no"),
      ),
    );
  }

  function confirmAction(message) {
    const dialog = $("console-confirm");
    text($("console-confirm-text"), message);
    return new Promise((resolve) => {
      const finish = (answer) => {
        dialog.close();
        $("console-confirm-yes").onclick = $("console-confirm-no").onclick = dialog.oncancel = null;
        resolve(answer);
      };
      $("console-confirm-yes").onclick = () => finish(true);
      $("console-confirm-no").onclick = () => finish(false);
      dialog.oncancel = () => finish(false);
      dialog.showModal();
      $("console-confirm-no").focus();
    });
  }

  async function act(action, token) {
    const path = "/tokens/" + encodeURIComponent(token.name);
    if (action === "view") return showPerson(token.name);
    if (action === "edit") return openForm(token);
    const asked = ["rotate", "disable", "delete"].includes(action);
    if (asked && !(await confirmAction(t("admin.console.confirm." + action, { name: token.name })))) return;
    try {
      if (action === "rotate") {
        const answer = await api("POST", path + "/rotate");
        await loadTokens([action, token.name]);
        showNewToken(token.name, answer.token);
        return;
      }
      if (action === "delete") await api("DELETE", path);
      else await api("PATCH", path, { disabled: action === "disable" });
      hideNewToken();
      await loadTokens([action, token.name]);
    } catch (e) {
      say($("tokens-error"), e.message, true);
    }
  }

  // -- a person's own view

  let shownPerson = null;

  function buildPerson() {
    const box = el("div", { id: "person", class: "card", hidden: true });
    box.append(
      el(
        "div",
        { class: "toolbar" },
        el("h2", { id: "person-title" }),
        fixed("button", { type: "button", id: "person-back", class: "secondary" }, "admin.console.person.back"),
      ),
      el("p", { id: "person-error", class: "error", role: "alert", hidden: true }),
      el("p", { id: "person-span", class: "status" }),
      el("dl", { id: "person-limits", class: "facts" }),
      fixed("h3", {}, "admin.console.person.by_model"),
      table("person-models", "admin.console.person.by_model", [
        ["admin.console.col.model"],
        ["admin.console.col.requests", 1],
        ["admin.console.col.input", 1],
        ["admin.console.col.cached", 1],
        ["admin.console.col.output", 1],
        ["admin.console.col.cost", 1],
      ]),
      fixed("h3", {}, "admin.console.person.by_day"),
      table("person-days", "admin.console.person.by_day", [
        ["admin.console.col.day"],
        ["admin.console.col.requests", 1],
        ["admin.console.col.tokens", 1],
        ["admin.console.col.cost", 1],
      ]),
      fixed("h3", {}, "admin.console.person.refusals"),
      table("person-refusals", "admin.console.person.refusals", [["admin.console.col.kind"], ["admin.console.col.count", 1]]),
    );
    box.querySelector("#person-back").addEventListener("click", () => {
      shownPerson = null;
      $("person").hidden = true;
      $("tokens-list").hidden = false;
      drawTokens();
    });
    return box;
  }

  function rows(tableId, items, cells) {
    const body = $(tableId).tBodies[0];
    if (!items.length) {
      const columns = $(tableId).tHead.rows[0].cells.length;
      body.replaceChildren(el("tr", {}, fixed("td", { colspan: columns, class: "muted" }, "admin.console.person.none")));
      return;
    }
    body.replaceChildren(
      ...items.map((item) => {
        const row = el("tr");
        cells(item).forEach((value, index) => row.append(el(index ? "td" : "th", index ? { class: "num" } : { scope: "row" }, value)));
        return row;
      }),
    );
  }

  async function showPerson(name) {
    shownPerson = name;
    $("tokens-list").hidden = true;
    $("person").hidden = false;
    text($("person-title"), name);
    say($("person-error"), "");
    const query = new URLSearchParams();
    if ($("from") && $("from").value) query.set("from", $("from").value);
    if ($("to") && $("to").value) query.set("to", $("to").value);
    try {
      const view = await api("GET", "/tokens/" + encodeURIComponent(name) + "/usage?" + query.toString());
      const token = view.token;
      I18N.show($("person-span"), () => t("admin.console.person.span", { from: view.from, to: view.to }));
      const facts = [
        ["admin.console.col.status", t("admin.console.status." + token.status)],
        ["admin.console.col.spend", spendText(token)],
        ["admin.console.col.limits", limitsText(token)],
        ["admin.console.col.models", modelsText(token)],
        ["admin.console.col.last_active", token.last_active ? shortTime(token.last_active) : t("admin.console.never")],
      ];
      $("person-limits").replaceChildren(...facts.map(([key, value]) => el("div", {}, fixed("dt", {}, key), el("dd", {}, value))));
      rows("person-models", view.by_model, (m) => [
        m.model === null ? "–" : m.model,
        integer(m.requests),
        integer(m.input_tokens),
        integer(m.cached_tokens),
        integer(m.output_tokens),
        usd(m.usd),
      ]);
      rows("person-days", view.by_day, (d) => [d.day, integer(d.requests), integer(d.tokens), usd(d.usd)]);
      rows("person-refusals", Object.entries(view.refusals), ([kind, count]) => [kind, integer(count)]);
    } catch (e) {
      say($("person-error"), e.message, true);
    }
  }

  // -- Requests

  const PAGE = 50;
  let requestsOffset = 0;
  let requests = null; // the last page shown

  function buildRequests() {
    const section = el("section", { id: "tab-requests", role: "tabpanel", "aria-labelledby": "tab-requests-button", hidden: true });
    const status = el("select", { id: "req-status" });
    for (const [value, key] of [["", "any"], ["2xx", "ok"], ["4xx", "errors"], ["429", "limited"], ["5xx", "server"]]) {
      status.append(fixed("option", { value: value }, "admin.console.requests.status." + key));
    }
    const form = el(
      "form",
      { id: "requests-filter", class: "filters" },
      el("label", {}, words("admin.console.requests.name"), el("input", { id: "req-name", list: "req-names", autocomplete: "off", spellcheck: "false" })),
      el("datalist", { id: "req-names" }),
      el("label", {}, words("admin.console.requests.model"), el("input", { id: "req-model", autocomplete: "off", spellcheck: "false" })),
      el("label", {}, words("admin.console.requests.status"), status),
      el(
        "label",
        {},
        words("admin.console.requests.request_id"),
        el("input", { id: "req-id", autocomplete: "off", spellcheck: "false" }),
      ),
      el("label", {}, words("admin.console.requests.from"), el("input", { id: "req-from", type: "date" })),
      el("label", {}, words("admin.console.requests.to"), el("input", { id: "req-to", type: "date" })),
      el(
        "div",
        { class: "buttons" },
        fixed("button", { type: "submit", id: "req-show" }, "admin.console.requests.show"),
        fixed("button", { type: "button", id: "req-csv", class: "secondary" }, "admin.console.requests.csv"),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      loadRequests(0);
    });
    form.querySelector("#req-csv").addEventListener("click", downloadRequests);
    const pager = el(
      "div",
      { class: "pager" },
      fixed("button", { type: "button", id: "req-prev", class: "secondary", disabled: true }, "admin.console.requests.prev"),
      el("span", { id: "req-page" }),
      fixed("button", { type: "button", id: "req-next", class: "secondary", disabled: true }, "admin.console.requests.next"),
    );
    pager.querySelector("#req-prev").addEventListener("click", () => loadRequests(Math.max(0, requestsOffset - PAGE)));
    pager.querySelector("#req-next").addEventListener("click", () => loadRequests(requestsOffset + PAGE));
    section.append(
      el(
        "div",
        { class: "card" },
        fixed("h2", {}, "admin.console.requests.title"),
        form,
        fixed("p", { class: "note" }, "admin.console.requests.note"),
        el("p", { id: "requests-error", class: "error", role: "alert", hidden: true }),
        el("p", { id: "requests-status", class: "status", role: "status" }),
        table("requests-table", "admin.console.requests.title", [
          ["admin.console.col.time"],
          ["admin.console.col.name"],
          ["admin.console.col.route"],
          ["admin.console.col.model"],
          ["admin.console.col.upstream"],
          ["admin.console.col.status"],
          ["admin.console.col.input", 1],
          ["admin.console.col.cached", 1],
          ["admin.console.col.output", 1],
          ["admin.console.col.cost", 1],
          ["admin.console.col.latency", 1],
          ["admin.console.col.ttft", 1],
          ["admin.console.col.cache"],
          ["admin.console.col.estimated"],
          ["admin.console.col.request_id"],
        ]),
        pager,
      ),
    );
    return section;
  }

  function requestQuery() {
    const query = new URLSearchParams();
    for (const [key, id] of [["name", "req-name"], ["model", "req-model"], ["status", "req-status"], ["request_id", "req-id"], ["from", "req-from"], ["to", "req-to"]]) {
      const value = $(id).value.trim();
      if (value) query.set(key, value);
    }
    return query;
  }

  function requestRow(r) {
    const status = el("td", { class: "status-cell" + (r.status >= 400 ? " failed" : "") }, String(r.status));
    if (r.refusal) status.append(" ", el("span", { class: "refusal" }, r.refusal));
    // The proxy's id, then the upstream's (the x-request-id a user's SDK reports), when there is one.
    const ids = el("td", { class: "request-id" }, el("code", {}, r.request_id));
    if (r.upstream_request_id) ids.append(" ", el("code", { class: "upstream-request-id" }, r.upstream_request_id));
    return el(
      "tr",
      { "data-request-id": r.request_id },
      el("td", { class: "time" }, shortTime(r.time)),
      el("td", {}, r.token),
      el("td", {}, r.route),
      el("td", { class: "models" }, r.model === null ? "–" : r.model),
      el("td", {}, r.upstream || "–"),
      status,
      el("td", { class: "num" }, integer(r.input_tokens)),
      el("td", { class: "num" }, integer(r.cached_tokens)),
      el("td", { class: "num" }, integer(r.output_tokens)),
      el("td", { class: "num" }, usd(r.usd)),
      el("td", { class: "num" }, ms(r.latency_ms)),
      el("td", { class: "num" }, ms(r.ttft_ms)),
      el("td", {}, r.cache || "–"),
      el("td", {}, r.estimated ? t("admin.console.yes") : ""),
      ids,
    );
  }

  function drawRequests() {
    if (requests === null) return;
    const offset = requestsOffset;
    const count = requests.requests.length;
    $("requests-table").tBodies[0].replaceChildren(...requests.requests.map(requestRow));
    const page = () => (count ? t("admin.console.requests.page", { first: offset + 1, last: offset + count }) : "");
    I18N.show($("requests-status"), () => page() || t("admin.console.requests.none"));
    I18N.show($("req-page"), page);
    $("req-prev").disabled = offset === 0;
    $("req-next").disabled = !requests.more;
  }

  async function loadRequests(offset) {
    if (!adminToken()) {
      say($("requests-error"), () => t("admin.console.need_token"), true);
      return;
    }
    const query = requestQuery();
    query.set("limit", String(PAGE));
    query.set("offset", String(offset));
    say($("requests-error"), "");
    I18N.show($("requests-status"), () => t("admin.console.loading"));
    try {
      const answer = await api("GET", "/requests?" + query.toString());
      requestsOffset = offset;
      requests = answer;
      drawRequests();
    } catch (e) {
      I18N.show($("requests-status"), null);
      say($("requests-error"), e.message, true);
    }
  }

  async function downloadRequests() {
    const query = requestQuery();
    query.set("format", "csv");
    try {
      const response = await api("GET", "/requests?" + query.toString());
      const blob = await response.blob();
      const link = el("a", { download: "requests.csv", hidden: true });
      link.href = URL.createObjectURL(blob);
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 30000);
    } catch (e) {
      say($("requests-error"), e.message, true);
    }
  }

  // -- Audit

  let audit = [];

  function buildAudit() {
    const section = el("section", { id: "tab-audit", role: "tabpanel", "aria-labelledby": "tab-audit-button", hidden: true });
    const more = fixed("button", { type: "button", id: "audit-more", class: "secondary", hidden: true }, "admin.console.audit.more");
    more.addEventListener("click", () => loadAudit(true));
    section.append(
      el(
        "div",
        { class: "card" },
        el(
          "div",
          { class: "toolbar" },
          fixed("h2", {}, "admin.console.audit.title"),
          fixed("button", { type: "button", id: "audit-refresh", class: "secondary" }, "admin.console.refresh"),
        ),
        el("p", { id: "audit-error", class: "error", role: "alert", hidden: true }),
        el("p", { id: "audit-status", class: "status", role: "status" }),
        table("audit-table", "admin.console.audit.title", [
          ["admin.console.col.time"],
          ["admin.console.col.who"],
          ["admin.console.col.action"],
          ["admin.console.col.name"],
          ["admin.console.col.changes"],
        ]),
        more,
      ),
    );
    section.querySelector("#audit-refresh").addEventListener("click", () => loadAudit(false));
    return section;
  }

  function changes(before, after) {
    const list = el("ul", { class: "changes" });
    const keys = new Set([...Object.keys(before || {}), ...Object.keys(after || {})]);
    const show = (value) => (value === undefined ? t("admin.console.audit.unset") : JSON.stringify(value));
    for (const key of [...keys].sort()) {
      const was = before ? before[key] : undefined;
      const now = after ? after[key] : undefined;
      if (JSON.stringify(was) === JSON.stringify(now)) continue;
      list.append(el("li", {}, el("code", {}, key), ": " + (before ? show(was) + " → " : "") + show(now)));
    }
    return list;
  }

  function drawAudit() {
    $("audit-table").tBodies[0].replaceChildren(
      ...audit.map((a) =>
        el(
          "tr",
          { "data-audit-id": a.id },
          el("td", { class: "time" }, shortTime(a.at)),
          el("td", {}, a.actor),
          fixed("td", {}, "admin.console.audit.action." + a.action),
          el("td", {}, a.name),
          el("td", {}, a.action === "delete" || a.action === "rotate" ? "" : changes(a.before, a.after)),
        ),
      ),
    );
    I18N.show($("audit-status"), audit.length ? null : () => t("admin.console.audit.none"));
  }

  async function loadAudit(older) {
    if (!adminToken()) {
      say($("audit-error"), () => t("admin.console.need_token"), true);
      return;
    }
    say($("audit-error"), "");
    const query = new URLSearchParams({ limit: "50" });
    if (older && audit.length) query.set("before", String(audit[audit.length - 1].id));
    try {
      const answer = await api("GET", "/audit?" + query.toString());
      audit = older ? audit.concat(answer.audit) : answer.audit;
      drawAudit();
      $("audit-more").hidden = answer.audit.length < 50;
    } catch (e) {
      say($("audit-error"), e.message, true);
    }
  }

  buildFrame();
})();
