// The admin page's tabs beside Usage: Tokens (add, edit, rotate, disable, delete; each person's own
// view), Requests (one row per request from the ledger) and Audit, over /admin/api/ with the admin-token
// header only (credentials: "omit": no cookie is ever sent). Token and model names come from users:
// they only ever go into the page through textContent and setAttribute, never as markup.
// Every string the tabs show is in STRINGS below (one place, to move into the pages' language files).
"use strict";

(function () {
  const STRINGS = {
    "console.tab.usage": "Usage",
    "console.tab.tokens": "Tokens",
    "console.tab.requests": "Requests",
    "console.tab.audit": "Audit",
    "console.tabs": "Admin sections",
    "console.need_token": "Enter the admin token above first.",
    "console.loading": "Loading…",
    "console.refresh": "Refresh",
    "console.tokens.title": "People and their tokens",
    "console.tokens.add": "Add a person",
    "console.tokens.none": "No named token yet: add a person.",
    "console.tokens.count": "{n} tokens ({page} made here, {file} from the tokens file).",
    "console.tokens.readonly": "Defined in the tokens file: change it there.",
    "console.tokens.no_database": "Adding people here needs a database: set USAGE_DATABASE and restart the proxy.",
    "console.col.name": "Name",
    "console.col.source": "From",
    "console.col.status": "Status",
    "console.col.spend": "Spend this period",
    "console.col.limits": "Limits",
    "console.col.models": "Models",
    "console.col.last_active": "Last active",
    "console.col.actions": "Actions",
    "console.source.page": "page",
    "console.source.file": "file",
    "console.status.active": "active",
    "console.status.disabled": "disabled",
    "console.status.expired": "expired",
    "console.status.over_budget": "over budget",
    "console.admin": "admin",
    "console.spend.of": "{spent} of {budget} · {left} left",
    "console.spend.plain": "{spent} this {period}",
    "console.spend.tokens": "{n} tokens",
    "console.limits.rate": "{n}/min",
    "console.limits.concurrent": "{n} at once",
    "console.limits.none": "none",
    "console.models.any": "any",
    "console.never": "never",
    "console.action.view": "View",
    "console.action.edit": "Edit",
    "console.action.rotate": "Rotate",
    "console.action.disable": "Disable",
    "console.action.enable": "Enable",
    "console.action.delete": "Delete",
    "console.confirm.rotate": "Give {name} a new token? The current one stops working at once.",
    "console.confirm.disable": "Disable {name}? Every request with this token is refused until it is enabled again.",
    "console.confirm.delete": "Delete {name}? The token is refused from now on; its spend stays in the ledger.",
    "console.confirm.yes": "Yes",
    "console.confirm.no": "Cancel",
    "console.form.new": "Add a person",
    "console.form.edit": "Edit {name}",
    "console.form.name": "Name",
    "console.form.name.hint": "letters, digits, . _ @ -",
    "console.form.budget_usd": "Budget, US dollars",
    "console.form.budget_tokens": "Budget, tokens",
    "console.form.budget_period": "Budget period",
    "console.form.period.day": "day",
    "console.form.period.week": "week",
    "console.form.period.month": "month",
    "console.form.rate": "Requests per minute",
    "console.form.concurrent": "At once",
    "console.form.models": "Models (comma-separated)",
    "console.form.models.hint": "empty: the proxy's",
    "console.form.server_key": "May use the proxy's OpenAI key",
    "console.form.cache": "Response cache",
    "console.form.cache.default": "as the proxy decides",
    "console.form.cache.on": "on",
    "console.form.cache.off": "off",
    "console.form.expires": "Expires (UTC day)",
    "console.form.create": "Create",
    "console.form.save": "Save",
    "console.form.cancel": "Cancel",
    "console.new.title": "The token of {name}, shown this once: copy it now and hand it over.",
    "console.new.copy": "Copy",
    "console.new.copied": "Copied.",
    "console.new.copy_failed": "Select it and copy it by hand.",
    "console.new.done": "Done",
    "console.done.create": "{name} added.",
    "console.done.update": "{name} saved.",
    "console.done.rotate": "{name} has a new token; the old one is refused.",
    "console.done.disable": "{name} is disabled.",
    "console.done.enable": "{name} is enabled.",
    "console.done.delete": "{name} deleted.",
    "console.person.title": "{name}",
    "console.person.back": "Back to the list",
    "console.person.limits": "Limits",
    "console.person.by_model": "Spend by model",
    "console.person.by_day": "Spend by day",
    "console.person.refusals": "Refusals by kind",
    "console.person.none": "Nothing in these days.",
    "console.person.span": "From {from} to {to} (UTC days, the dates above).",
    "console.col.model": "Model",
    "console.col.requests": "Requests",
    "console.col.input": "Input",
    "console.col.cached": "Cached",
    "console.col.output": "Output",
    "console.col.cost": "Cost",
    "console.col.day": "Day",
    "console.col.tokens": "Tokens",
    "console.col.kind": "Kind",
    "console.col.count": "Count",
    "console.requests.title": "Requests",
    "console.requests.name": "Name",
    "console.requests.model": "Model",
    "console.requests.status": "Status",
    "console.requests.status.any": "any",
    "console.requests.status.errors": "errors (4xx)",
    "console.requests.status.server": "server errors (5xx)",
    "console.requests.status.ok": "success (2xx)",
    "console.requests.from": "From (UTC day)",
    "console.requests.to": "To (UTC day)",
    "console.requests.show": "Show",
    "console.requests.csv": "Download CSV",
    "console.requests.prev": "Newer",
    "console.requests.next": "Older",
    "console.requests.page": "Rows {first}–{last}",
    "console.requests.none": "No request matches.",
    "console.requests.note": "Prompts and answers are never stored: only what each request cost and how it went.",
    "console.col.time": "Time (UTC)",
    "console.col.route": "Route",
    "console.col.upstream": "Upstream",
    "console.col.latency": "Latency",
    "console.col.ttft": "First token",
    "console.col.cache": "Cache",
    "console.col.estimated": "Estimated",
    "console.col.request_id": "Request id",
    "console.yes": "yes",
    "console.audit.title": "Audit",
    "console.audit.more": "Older entries",
    "console.audit.none": "No admin action yet.",
    "console.col.who": "Who",
    "console.col.action": "Action",
    "console.col.changes": "Changes",
    "console.audit.action.create": "created",
    "console.audit.action.update": "changed",
    "console.audit.action.rotate": "rotated",
    "console.audit.action.disable": "disabled",
    "console.audit.action.enable": "enabled",
    "console.audit.action.delete": "deleted",
    "console.audit.unset": "unset",
    "console.error.forbidden": "Wrong admin token: the server refused it (HTTP 403).",
    "console.error.status": "Error {status}: {message}",
    "console.error.unreachable": "Could not reach the proxy: {message}",
  };

  // The pages' language files, once they hold these keys, win over the English here.
  function t(key, values) {
    const shared = window.I18N && typeof window.I18N.t === "function" ? window.I18N.t(key, values) : key;
    let text = shared !== key ? shared : STRINGS[key] !== undefined ? STRINGS[key] : key;
    for (const [name, value] of Object.entries(values || {})) text = text.split("{" + name + "}").join(String(value));
    return text;
  }

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
  const text = (node, value) => {
    node.textContent = value;
    return node;
  };

  // -- numbers, money, times

  const integerFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const integer = (value) => integerFormat.format(value || 0);
  function usd(value) {
    if (typeof value !== "number" || !isFinite(value)) return "–";
    const abs = Math.abs(value);
    const digits = abs >= 1 || abs === 0 ? 2 : Math.min(10, Math.max(2, 2 - Math.floor(Math.log10(abs))));
    return "$" + value.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: digits });
  }
  const ms = (value) => (typeof value === "number" ? integer(Math.round(value)) + " ms" : "–");
  const shortTime = (iso) => (typeof iso === "string" ? iso.replace("T", " ").replace("Z", "") : "–");
  function ago(iso) {
    if (typeof iso !== "string") return t("console.never");
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
    return Math.round(seconds / 86400) + " d ago";
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
      throw new ApiFailure(t("console.error.unreachable", { message: e.message }), 0);
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
    if (response.status === 403) throw new ApiFailure(t("console.error.forbidden"), 403);
    throw new ApiFailure(t("console.error.status", { status: response.status, message: message }), response.status, param);
  }

  function say(node, message, isError) {
    node.textContent = message || "";
    node.hidden = !message;
    if (isError !== undefined) node.classList.toggle("error", isError);
  }

  function table(id, caption, columns) {
    const head = el("tr");
    for (const [key, numeric] of columns) head.append(el("th", { scope: "col", class: numeric ? "num" : null }, t(key)));
    return el(
      "div",
      { class: "table-wrap" },
      el("table", { id: id, class: "console-table" }, el("caption", { class: "visually-hidden" }, caption), el("thead", {}, head), el("tbody")),
    );
  }

  // -- the page's frame: tabs over the usage report and the three new sections

  const tabs = ["usage", "tokens", "requests", "audit"];
  let activeTab = "usage";

  function buildFrame() {
    const main = document.querySelector("main");
    const form = $("query");
    const usage = el("section", { id: "tab-usage", role: "tabpanel", "aria-labelledby": "tab-usage-button" });
    for (const id of ["error", "status", "report"]) if ($(id)) usage.append($(id));
    const bar = el("nav", { class: "tabs", role: "tablist", "aria-label": t("console.tabs") });
    for (const name of tabs) {
      const button = el(
        "button",
        { type: "button", role: "tab", id: "tab-" + name + "-button", "aria-controls": "tab-" + name, "data-tab": name },
        t("console.tab." + name),
      );
      button.addEventListener("click", () => showTab(name));
      bar.append(button);
    }
    form.after(bar);
    bar.after(usage);
    usage.after(buildTokens(), buildRequests(), buildAudit(), buildConfirm());
    showTab(location.hash.slice(1) && tabs.includes(location.hash.slice(1)) ? location.hash.slice(1) : "usage");
    window.addEventListener("hashchange", () => {
      const name = location.hash.slice(1);
      if (tabs.includes(name) && name !== activeTab) showTab(name);
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

  function buildTokens() {
    const section = el("section", { id: "tab-tokens", role: "tabpanel", "aria-labelledby": "tab-tokens-button", hidden: true });
    const list = el("div", { id: "tokens-list", class: "card" });
    const bar = el(
      "div",
      { class: "toolbar" },
      el("h2", {}, t("console.tokens.title")),
      el("button", { type: "button", id: "add-person", class: "primary" }, t("console.tokens.add")),
      el("button", { type: "button", id: "tokens-refresh", class: "secondary" }, t("console.refresh")),
    );
    list.append(
      bar,
      el("p", { id: "tokens-error", class: "error", role: "alert", hidden: true }),
      el("p", { id: "tokens-status", class: "status", role: "status" }),
      buildNewToken(),
      buildForm(),
      table("tokens-table", t("console.tokens.title"), [
        ["console.col.name"],
        ["console.col.source"],
        ["console.col.status"],
        ["console.col.spend"],
        ["console.col.limits"],
        ["console.col.models"],
        ["console.col.last_active"],
        ["console.col.actions"],
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
        el("button", { type: "button", id: "copy-token" }, t("console.new.copy")),
        el("button", { type: "button", id: "new-token-done", class: "secondary" }, t("console.new.done")),
      ),
      el("p", { id: "copy-status", class: "status" }),
    );
    box.querySelector("#copy-token").addEventListener("click", copyToken);
    box.querySelector("#new-token-done").addEventListener("click", hideNewToken);
    return box;
  }

  function showNewToken(name, value) {
    text($("new-token-title"), t("console.new.title", { name: name }));
    text($("new-token-value"), value);
    text($("copy-status"), "");
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
      text($("copy-status"), t("console.new.copied"));
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents($("new-token-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      text($("copy-status"), document.execCommand && document.execCommand("copy") ? t("console.new.copied") : t("console.new.copy_failed"));
    }
  }

  const FORM_FIELDS = [
    // [field, input type, label key, extra attributes]
    ["budget_usd", "number", "console.form.budget_usd", { min: 0, step: "any" }],
    ["budget_tokens", "number", "console.form.budget_tokens", { min: 0, step: 1 }],
    ["rate_limit_per_minute", "number", "console.form.rate", { min: 0, step: 1 }],
    ["max_concurrent", "number", "console.form.concurrent", { min: 0, step: 1 }],
    ["allowed_models", "text", "console.form.models", { placeholder: t("console.form.models.hint") }],
    ["expires", "date", "console.form.expires", {}],
  ];

  function buildForm() {
    const form = el("form", { id: "token-form", class: "token-form", hidden: true, novalidate: true });
    form.append(
      el("h3", { id: "token-form-title" }),
      el(
        "label",
        { class: "wide" },
        t("console.form.name"),
        el("input", { id: "tf-name", name: "name", required: true, autocomplete: "off", spellcheck: "false", placeholder: t("console.form.name.hint") }),
      ),
    );
    for (const [field, type, label, extra] of FORM_FIELDS) {
      form.append(el("label", {}, t(label), el("input", Object.assign({ id: "tf-" + field, name: field, type: type }, extra))));
    }
    const period = el("select", { id: "tf-budget_period", name: "budget_period" });
    for (const p of ["month", "week", "day"]) period.append(el("option", { value: p }, t("console.form.period." + p)));
    const cache = el("select", { id: "tf-cache", name: "cache" });
    for (const [value, key] of [["", "default"], ["true", "on"], ["false", "off"]]) {
      cache.append(el("option", { value: value }, t("console.form.cache." + key)));
    }
    form.append(
      el("label", {}, t("console.form.budget_period"), period),
      el("label", {}, t("console.form.cache"), cache),
      el("label", { class: "check" }, el("input", { id: "tf-use_server_key", name: "use_server_key", type: "checkbox" }), t("console.form.server_key")),
      el("p", { id: "token-form-error", class: "error", role: "alert", hidden: true }),
      el(
        "div",
        { class: "buttons" },
        el("button", { type: "submit", id: "token-form-submit" }),
        el("button", { type: "button", id: "token-form-cancel", class: "secondary" }, t("console.form.cancel")),
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
      say($("tokens-error"), t("console.tokens.no_database"), true);
      return;
    }
    hideNewToken();
    editing = token ? token.name : "";
    const fields = (token && token.fields) || {};
    text($("token-form-title"), token ? t("console.form.edit", { name: token.name }) : t("console.form.new"));
    text($("token-form-submit"), token ? t("console.form.save") : t("console.form.create"));
    $("tf-name").value = token ? token.name : "";
    $("tf-name").disabled = Boolean(token);
    for (const [field] of FORM_FIELDS) {
      const value = fields[field];
      $("tf-" + field).value =
        value === undefined || value === null ? "" : field === "allowed_models" ? value.join(", ") : field === "expires" ? String(value).slice(0, 10) : String(value);
    }
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
    for (const [field, type] of FORM_FIELDS) {
      const raw = $("tf-" + field).value.trim();
      if (!raw) put(field, null);
      else if (field === "allowed_models") put(field, raw.split(",").map((m) => m.trim()).filter(Boolean));
      else if (type === "number") put(field, Number(raw));
      else put(field, raw);
    }
    const hasBudget = body.budget_usd !== undefined && body.budget_usd !== null || body.budget_tokens !== undefined && body.budget_tokens !== null;
    put("budget_period", hasBudget ? $("tf-budget_period").value : null);
    const cache = $("tf-cache").value;
    put("cache", cache === "" ? null : cache === "true");
    put("use_server_key", $("tf-use_server_key").checked ? true : null);
    return body;
  }

  async function submitForm() {
    const isNew = editing === "";
    const body = formBody();
    say($("token-form-error"), "");
    try {
      if (isNew) {
        const name = $("tf-name").value.trim();
        const made = await api("POST", "/tokens", Object.assign({ name: name }, body));
        closeForm();
        await loadTokens(t("console.done.create", { name: made.name }));
        showNewToken(made.name, made.token);
      } else {
        const name = editing;
        await api("PATCH", "/tokens/" + encodeURIComponent(name), body);
        closeForm();
        await loadTokens(t("console.done.update", { name: name }));
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
    return el("span", { class: "badge badge-" + status, "data-status": status }, t("console.status." + status));
  }

  function spendText(token) {
    const s = token.spend || {};
    const tokensText = (n) => t("console.spend.tokens", { n: integer(n) });
    const parts = [];
    if (typeof token.budget_usd === "number") {
      parts.push(t("console.spend.of", { spent: usd(s.spent_usd), budget: usd(token.budget_usd), left: usd(s.remaining_usd) }));
    }
    if (typeof token.budget_tokens === "number") {
      parts.push(t("console.spend.of", { spent: tokensText(s.spent_tokens), budget: tokensText(token.budget_tokens), left: tokensText(s.remaining_tokens) }));
    }
    if (!parts.length) parts.push(t("console.spend.plain", { spent: usd(s.spent_usd), period: s.period || "month" }));
    return parts.join("; ");
  }

  function limitsText(token) {
    const parts = [];
    if (token.rate_limit_per_minute) parts.push(t("console.limits.rate", { n: integer(token.rate_limit_per_minute) }));
    if (token.max_concurrent) parts.push(t("console.limits.concurrent", { n: integer(token.max_concurrent) }));
    return parts.length ? parts.join(" · ") : t("console.limits.none");
  }

  function tokenRow(token) {
    const row = el("tr", { "data-name": token.name, "data-source": token.source });
    const view = el("button", { type: "button", class: "link", "data-action": "view" }, token.name);
    const name = el("th", { scope: "row" }, view);
    if (token.admin) name.append(" ", el("span", { class: "badge badge-admin" }, t("console.admin")));
    const cell = el("td", { class: "actions" });
    const actions = el("div", { class: "row-actions" });
    cell.append(actions);
    if (token.source === "page") {
      const toggle = token.disabled ? "enable" : "disable";
      for (const action of ["edit", "rotate", toggle, "delete"]) {
        actions.append(el("button", { type: "button", class: "small" + (action === "delete" ? " danger" : ""), "data-action": action }, t("console.action." + action)));
      }
    } else {
      actions.append(el("span", { class: "muted", title: t("console.tokens.readonly") }, t("console.tokens.readonly")));
    }
    row.append(
      name,
      el("td", {}, t("console.source." + token.source)),
      el("td", {}, badge(token.status)),
      el("td", { class: "spend" }, spendText(token)),
      el("td", {}, limitsText(token)),
      el("td", { class: "models" }, token.allowed_models ? token.allowed_models.join(", ") : t("console.models.any")),
      el("td", { title: token.last_active || "" }, ago(token.last_active)),
      cell,
    );
    for (const button of row.querySelectorAll("button[data-action]")) {
      button.addEventListener("click", () => act(button.dataset.action, token));
    }
    return row;
  }

  async function loadTokens(done) {
    if (!adminToken()) {
      say($("tokens-error"), t("console.need_token"), true);
      return;
    }
    say($("tokens-error"), "");
    text($("tokens-status"), t("console.loading"));
    try {
      const answer = await api("GET", "/tokens");
      tokens = answer.tokens;
      runtimeTokens = answer.runtime_tokens;
      const body = $("tokens-table").tBodies[0];
      body.replaceChildren(...tokens.map(tokenRow));
      const made = tokens.filter((x) => x.source === "page").length;
      text(
        $("tokens-status"),
        (done ? done + " " : "") +
          (tokens.length ? t("console.tokens.count", { n: tokens.length, page: made, file: tokens.length - made }) : t("console.tokens.none")),
      );
      if (!runtimeTokens) say($("tokens-error"), t("console.tokens.no_database"), false);
      updateNames();
    } catch (e) {
      text($("tokens-status"), "");
      say($("tokens-error"), e.message, true);
    }
  }

  function confirmAction(message) {
    const dialog = $("console-confirm");
    text($("console-confirm-text"), message);
    return new Promise((resolve) => {
      const finish = (answer) => {
        dialog.close();
        $("console-confirm-yes").onclick = $("console-confirm-no").onclick = null;
        resolve(answer);
      };
      $("console-confirm-yes").onclick = () => finish(true);
      $("console-confirm-no").onclick = () => finish(false);
      dialog.oncancel = () => finish(false);
      dialog.showModal();
      $("console-confirm-no").focus();
    });
  }

  function buildConfirm() {
    return el(
      "dialog",
      { id: "console-confirm", "aria-labelledby": "console-confirm-text" },
      el("p", { id: "console-confirm-text" }),
      el(
        "div",
        { class: "buttons" },
        el("button", { type: "button", id: "console-confirm-yes", class: "danger" }, t("console.confirm.yes")),
        el("button", { type: "button", id: "console-confirm-no", class: "secondary" }, t("console.confirm.no")),
      ),
    );
  }

  async function act(action, token) {
    const path = "/tokens/" + encodeURIComponent(token.name);
    if (action === "view") return showPerson(token.name);
    if (action === "edit") return openForm(token);
    if (["rotate", "disable", "delete"].includes(action) && !(await confirmAction(t("console.confirm." + action, { name: token.name })))) return;
    try {
      if (action === "rotate") {
        const answer = await api("POST", path + "/rotate");
        await loadTokens(t("console.done.rotate", { name: token.name }));
        showNewToken(token.name, answer.token);
        return;
      }
      if (action === "delete") await api("DELETE", path);
      else await api("PATCH", path, { disabled: action === "disable" });
      hideNewToken();
      await loadTokens(t("console.done." + action, { name: token.name }));
    } catch (e) {
      say($("tokens-error"), e.message, true);
    }
  }

  // -- a person's own view

  function buildPerson() {
    const box = el("div", { id: "person", class: "card", hidden: true });
    box.append(
      el("div", { class: "toolbar" }, el("h2", { id: "person-title" }), el("button", { type: "button", id: "person-back", class: "secondary" }, t("console.person.back"))),
      el("p", { id: "person-error", class: "error", role: "alert", hidden: true }),
      el("p", { id: "person-span", class: "status" }),
      el("dl", { id: "person-limits", class: "facts" }),
      el("h3", {}, t("console.person.by_model")),
      table("person-models", t("console.person.by_model"), [["console.col.model"], ["console.col.requests", 1], ["console.col.input", 1], ["console.col.cached", 1], ["console.col.output", 1], ["console.col.cost", 1]]),
      el("h3", {}, t("console.person.by_day")),
      table("person-days", t("console.person.by_day"), [["console.col.day"], ["console.col.requests", 1], ["console.col.tokens", 1], ["console.col.cost", 1]]),
      el("h3", {}, t("console.person.refusals")),
      table("person-refusals", t("console.person.refusals"), [["console.col.kind"], ["console.col.count", 1]]),
    );
    box.querySelector("#person-back").addEventListener("click", () => {
      $("person").hidden = true;
      $("tokens-list").hidden = false;
    });
    return box;
  }

  function rows(tableId, items, cells) {
    const body = $(tableId).tBodies[0];
    if (!items.length) {
      const columns = $(tableId).tHead.rows[0].cells.length;
      body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "muted" }, t("console.person.none"))));
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
    $("tokens-list").hidden = true;
    $("person").hidden = false;
    text($("person-title"), t("console.person.title", { name: name }));
    say($("person-error"), "");
    const query = new URLSearchParams();
    if ($("from") && $("from").value) query.set("from", $("from").value);
    if ($("to") && $("to").value) query.set("to", $("to").value);
    try {
      const view = await api("GET", "/tokens/" + encodeURIComponent(name) + "/usage?" + query.toString());
      const token = view.token;
      text($("person-span"), t("console.person.span", { from: view.from, to: view.to }));
      const facts = [
        [t("console.col.status"), t("console.status." + token.status)],
        [t("console.col.spend"), spendText(token)],
        [t("console.col.limits"), limitsText(token)],
        [t("console.col.models"), token.allowed_models ? token.allowed_models.join(", ") : t("console.models.any")],
        [t("console.col.last_active"), token.last_active ? shortTime(token.last_active) : t("console.never")],
      ];
      $("person-limits").replaceChildren(...facts.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
      rows("person-models", view.by_model, (m) => [m.model === null ? "–" : m.model, integer(m.requests), integer(m.input_tokens), integer(m.cached_tokens), integer(m.output_tokens), usd(m.usd)]);
      rows("person-days", view.by_day, (d) => [d.day, integer(d.requests), integer(d.tokens), usd(d.usd)]);
      rows("person-refusals", Object.entries(view.refusals), ([kind, count]) => [kind, integer(count)]);
    } catch (e) {
      say($("person-error"), e.message, true);
    }
  }

  // -- Requests

  const PAGE = 50;
  let requestsOffset = 0;

  function buildRequests() {
    const section = el("section", { id: "tab-requests", role: "tabpanel", "aria-labelledby": "tab-requests-button", hidden: true });
    const status = el("select", { id: "req-status" });
    for (const [value, key] of [["", "any"], ["2xx", "ok"], ["4xx", "errors"], ["5xx", "server"]]) status.append(el("option", { value: value }, t("console.requests.status." + key)));
    const form = el(
      "form",
      { id: "requests-filter", class: "filters" },
      el("label", {}, t("console.requests.name"), el("input", { id: "req-name", list: "req-names", autocomplete: "off", spellcheck: "false" })),
      el("datalist", { id: "req-names" }),
      el("label", {}, t("console.requests.model"), el("input", { id: "req-model", autocomplete: "off", spellcheck: "false" })),
      el("label", {}, t("console.requests.status"), status),
      el("label", {}, t("console.requests.from"), el("input", { id: "req-from", type: "date" })),
      el("label", {}, t("console.requests.to"), el("input", { id: "req-to", type: "date" })),
      el(
        "div",
        { class: "buttons" },
        el("button", { type: "submit", id: "req-show" }, t("console.requests.show")),
        el("button", { type: "button", id: "req-csv", class: "secondary" }, t("console.requests.csv")),
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
      el("button", { type: "button", id: "req-prev", class: "secondary", disabled: true }, t("console.requests.prev")),
      el("span", { id: "req-page" }),
      el("button", { type: "button", id: "req-next", class: "secondary", disabled: true }, t("console.requests.next")),
    );
    pager.querySelector("#req-prev").addEventListener("click", () => loadRequests(Math.max(0, requestsOffset - PAGE)));
    pager.querySelector("#req-next").addEventListener("click", () => loadRequests(requestsOffset + PAGE));
    section.append(
      el(
        "div",
        { class: "card" },
        el("h2", {}, t("console.requests.title")),
        form,
        el("p", { class: "note" }, t("console.requests.note")),
        el("p", { id: "requests-error", class: "error", role: "alert", hidden: true }),
        el("p", { id: "requests-status", class: "status", role: "status" }),
        table("requests-table", t("console.requests.title"), [
          ["console.col.time"],
          ["console.col.name"],
          ["console.col.route"],
          ["console.col.model"],
          ["console.col.upstream"],
          ["console.col.status"],
          ["console.col.input", 1],
          ["console.col.cached", 1],
          ["console.col.output", 1],
          ["console.col.cost", 1],
          ["console.col.latency", 1],
          ["console.col.ttft", 1],
          ["console.col.cache"],
          ["console.col.estimated"],
          ["console.col.request_id"],
        ]),
        pager,
      ),
    );
    return section;
  }

  function updateNames() {
    const list = $("req-names");
    if (list) list.replaceChildren(...tokens.map((x) => el("option", { value: x.name })));
  }

  function requestQuery() {
    const query = new URLSearchParams();
    for (const [key, id] of [["name", "req-name"], ["model", "req-model"], ["status", "req-status"], ["from", "req-from"], ["to", "req-to"]]) {
      const value = $(id).value.trim();
      if (value) query.set(key, value);
    }
    return query;
  }

  function requestRow(r) {
    const status = el("td", { class: "status-cell" + (r.status >= 400 ? " failed" : "") }, String(r.status));
    if (r.refusal) status.append(" ", el("span", { class: "refusal" }, r.refusal));
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
      el("td", {}, r.estimated ? t("console.yes") : ""),
      el("td", { class: "request-id" }, el("code", {}, r.request_id)),
    );
  }

  async function loadRequests(offset) {
    if (!adminToken()) {
      say($("requests-error"), t("console.need_token"), true);
      return;
    }
    const query = requestQuery();
    query.set("limit", String(PAGE));
    query.set("offset", String(offset));
    say($("requests-error"), "");
    text($("requests-status"), t("console.loading"));
    try {
      const answer = await api("GET", "/requests?" + query.toString());
      requestsOffset = offset;
      $("requests-table").tBodies[0].replaceChildren(...answer.requests.map(requestRow));
      text(
        $("requests-status"),
        answer.requests.length ? t("console.requests.page", { first: offset + 1, last: offset + answer.requests.length }) : t("console.requests.none"),
      );
      $("req-prev").disabled = offset === 0;
      $("req-next").disabled = !answer.more;
      text($("req-page"), answer.requests.length ? t("console.requests.page", { first: offset + 1, last: offset + answer.requests.length }) : "");
    } catch (e) {
      text($("requests-status"), "");
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

  let oldestAudit = null;

  function buildAudit() {
    const section = el("section", { id: "tab-audit", role: "tabpanel", "aria-labelledby": "tab-audit-button", hidden: true });
    const more = el("button", { type: "button", id: "audit-more", class: "secondary", hidden: true }, t("console.audit.more"));
    more.addEventListener("click", () => loadAudit(true));
    section.append(
      el(
        "div",
        { class: "card" },
        el("div", { class: "toolbar" }, el("h2", {}, t("console.audit.title")), el("button", { type: "button", id: "audit-refresh", class: "secondary" }, t("console.refresh"))),
        el("p", { id: "audit-error", class: "error", role: "alert", hidden: true }),
        el("p", { id: "audit-status", class: "status", role: "status" }),
        table("audit-table", t("console.audit.title"), [["console.col.time"], ["console.col.who"], ["console.col.action"], ["console.col.name"], ["console.col.changes"]]),
        more,
      ),
    );
    section.querySelector("#audit-refresh").addEventListener("click", () => loadAudit(false));
    return section;
  }

  function changes(before, after) {
    const list = el("ul", { class: "changes" });
    const keys = new Set([...Object.keys(before || {}), ...Object.keys(after || {})]);
    const show = (value) => (value === undefined ? t("console.audit.unset") : JSON.stringify(value));
    for (const key of [...keys].sort()) {
      const was = before ? before[key] : undefined;
      const now = after ? after[key] : undefined;
      if (JSON.stringify(was) === JSON.stringify(now)) continue;
      list.append(el("li", {}, el("code", {}, key), ": " + (before ? show(was) + " → " : "") + show(now)));
    }
    return list;
  }

  async function loadAudit(older) {
    if (!adminToken()) {
      say($("audit-error"), t("console.need_token"), true);
      return;
    }
    say($("audit-error"), "");
    const query = new URLSearchParams({ limit: "50" });
    if (older && oldestAudit !== null) query.set("before", String(oldestAudit));
    try {
      const answer = await api("GET", "/audit?" + query.toString());
      const body = $("audit-table").tBodies[0];
      const made = answer.audit.map((a) =>
        el(
          "tr",
          { "data-audit-id": a.id },
          el("td", { class: "time" }, shortTime(a.at)),
          el("td", {}, a.actor),
          el("td", {}, t("console.audit.action." + a.action)),
          el("td", {}, a.name),
          el("td", {}, a.action === "delete" || a.action === "rotate" ? "" : changes(a.before, a.after)),
        ),
      );
      if (older) body.append(...made);
      else body.replaceChildren(...made);
      if (answer.audit.length) oldestAudit = answer.audit[answer.audit.length - 1].id;
      $("audit-more").hidden = answer.audit.length < 50;
      text($("audit-status"), body.rows.length ? "" : t("console.audit.none"));
    } catch (e) {
      say($("audit-error"), e.message, true);
    }
  }

  buildFrame();
})();
