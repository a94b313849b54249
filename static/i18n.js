// The pages' words and numbers in the reader's language. The server (handlers/pages.py) picks the
// language, renders the page in it and embeds the page's strings of both languages as JSON; the
// switch on the page changes the language in place and remembers it in a cookie. How a page adds a
// string: the head of static/i18n/en.json.
"use strict";

window.I18N = (function () {
  const COOKIE = "chat_gpt_proxy_lang";
  const strings = JSON.parse(document.getElementById("i18n-strings").textContent);
  const ATTRIBUTES = ["placeholder", "title", "aria-label"];
  let lang = strings[document.documentElement.lang] ? document.documentElement.lang : "en";
  const listeners = [];
  const formats = new Map();

  // Intl formatters are costly to build: one per language and options.
  function format(kind, options) {
    const id = kind + " " + lang + " " + JSON.stringify(options || {});
    if (!formats.has(id)) {
      const make = { number: Intl.NumberFormat, date: Intl.DateTimeFormat, plural: Intl.PluralRules }[kind];
      formats.set(id, new make(lang, options));
    }
    return formats.get(id);
  }

  // The string `key` with its {name} placeholders filled from `values`; numbers are written the
  // language's way. A value of plural forms is chosen by values.n.
  function t(key, values) {
    let text = key in strings[lang] ? strings[lang][key] : strings.en[key];
    if (text === undefined) return key; // tests/test_i18n.py keeps this from happening
    values = values || {};
    if (typeof text === "object") text = text[format("plural").select(Number(values.n))] || text.other;
    return text.replace(/\{(\w+)\}/g, (whole, name) => {
      if (!(name in values)) return whole;
      const value = values[name];
      return typeof value === "number" ? format("number").format(value) : String(value);
    });
  }

  // Seconds as a person says them: "45 s", "2 min 5 s", "3 h 20 min", "24 d 15 h".
  function duration(seconds) {
    let rest = Math.max(0, Math.ceil(Number(seconds) || 0));
    const units = [
      ["d", 86400],
      ["h", 3600],
      ["min", 60],
      ["s", 1],
    ];
    const parts = [];
    for (const [unit, size] of units) {
      const count = Math.floor(rest / size);
      if (count > 0 || (unit === "s" && parts.length === 0)) parts.push(t("common.duration." + unit, { n: count }));
      rest -= count * size;
      if (parts.length === 2) break;
    }
    return parts.join(" ");
  }

  function apply(root) {
    for (const node of root.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const name of ATTRIBUTES) {
      for (const node of root.querySelectorAll("[data-i18n-" + name + "]")) {
        node.setAttribute(name, t(node.getAttribute("data-i18n-" + name)));
      }
    }
    for (const button of root.querySelectorAll("button[data-lang]")) {
      button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
    }
  }

  // Text that is worked out (a status, an error): `render` is called again when the language changes.
  function show(node, render) {
    node.i18nRender = render;
    node.textContent = render ? render() : "";
  }

  function setLanguage(code) {
    if (!strings[code] || code === lang) return;
    lang = code;
    document.documentElement.lang = code;
    document.cookie = COOKIE + "=" + code + "; Path=/; Max-Age=31536000; SameSite=Lax";
    apply(document);
    for (const node of document.querySelectorAll("*")) {
      if (node.i18nRender) node.textContent = node.i18nRender();
    }
    for (const listener of listeners) listener(code);
  }

  for (const button of document.querySelectorAll("button[data-lang]")) {
    button.addEventListener("click", () => setLanguage(button.dataset.lang));
  }
  apply(document);

  return {
    t: t,
    show: show,
    duration: duration,
    number: (value, options) => format("number", options).format(value),
    date: (value, options) => format("date", options).format(value),
    onChange: (listener) => listeners.push(listener),
    get lang() {
      return lang;
    },
  };
})();
