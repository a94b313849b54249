// The admin page: reads GET /admin/usage with the admin-token header and draws it as plain SVG.
// No library, nothing from other hosts (the page's CSP allows neither). Token and model names come
// from users: they only ever go into the page through textContent and setAttribute, never as markup.
// Words, numbers and dates follow the page's language (static/i18n.js): the charts are redrawn and
// the status and error lines reworded when the switch changes it.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const t = I18N.t;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STORE_KEY = "admin-token";
  // Distinguishable colours (Tableau 10); tokens past the eighth share the grey of "others".
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];
  const OTHERS = "\u0000others"; // cannot clash with a token name (names are printable)
  const OTHERS_COLOR = "#9aa3b2";
  const MAX_MODELS = 12;

  let current = null; // the last report shown, redrawn when the window is resized
  let sequence = 0; // a newer load wins over a slower older one
  let chartIds = 0;

  // -- numbers and dates

  function usd(value) {
    if (typeof value !== "number" || !isFinite(value)) return "–";
    const abs = Math.abs(value);
    // Cents for a dollar or more; below that three significant digits, so that the few
    // millionths of a dollar a short request costs do not all show as $0.00.
    const digits = abs >= 1 || abs === 0 ? 2 : Math.min(10, Math.max(2, 2 - Math.floor(Math.log10(abs))));
    return I18N.number(value, {
      style: "currency",
      currency: "USD",
      minimumFractionDigits: 2,
      maximumFractionDigits: digits,
    });
  }
  const integer = (value) => I18N.number(value || 0, { maximumFractionDigits: 0 });
  const PERCENT = { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1 };
  const percent = (share) =>
    share >= 0.001 || share === 0 ? I18N.number(share, PERCENT) : "< " + I18N.number(0.001, PERCENT);

  // Dates are UTC calendar days, as in the ledger.
  const todayUTC = () => new Date().toISOString().slice(0, 10);
  function addDays(day, count) {
    const date = new Date(day + "T00:00:00Z");
    date.setUTCDate(date.getUTCDate() + count);
    return date.toISOString().slice(0, 10);
  }
  function daysBetween(first, last) {
    const days = [];
    for (let day = first; day <= last && days.length < 1000; day = addDays(day, 1)) days.push(day);
    return days;
  }
  const asDate = (day) => new Date(day.slice(0, 10) + "T00:00:00Z");
  // "Nov 27" / "27 нояб."
  const shortDay = (day) => I18N.date(asDate(day), { month: "short", day: "numeric", timeZone: "UTC" });
  function longDate(iso) {
    // "2027-01-01T00:00:00Z" -> "Jan 1, 2027 00:00 UTC" / "1 янв. 2027 г. 00:00 UTC"
    if (typeof iso !== "string" || iso.length < 10) return "–";
    const time = iso.length >= 16 ? " " + iso.slice(11, 16) + " UTC" : "";
    return I18N.date(asDate(iso), { year: "numeric", month: "short", day: "numeric", timeZone: "UTC" }) + time;
  }
  // A period of UTC days the language's way: "с 1 по 7 дек. 2026 г." / "from Dec 1 to Dec 7, 2026".
  // The first day leaves out what it shares with the last (Intl's range parts say which), unless
  // the years differ: then both are whole.
  const DAY = { year: "numeric", month: "short", day: "numeric", timeZone: "UTC" };
  function period(first, last) {
    const start = asDate(first);
    const end = asDate(last);
    const parts = new Intl.DateTimeFormat(I18N.lang, DAY).formatRangeToParts(start, end);
    const startParts = parts.filter((part) => part.source === "startRange");
    const lastStart = parts.lastIndexOf(startParts[startParts.length - 1]);
    const whole = !startParts.length || startParts.some((part) => part.type === "year");
    const from = whole ? I18N.date(start, DAY) : parts.slice(0, lastStart + 1).map((part) => part.value).join("");
    return { from: from.trim(), to: I18N.date(end, DAY) };
  }
  const tokenLabel = (token) =>
    token === OTHERS ? t("admin.others") : token === "-" ? "- (ACCESS_TOKEN)" : String(token);
  // The ledger's rows keep null for "no model"; the summary keys models by this label.
  const NO_MODEL = "\u0000no model";
  const modelKey = (model) => (model === null || model === undefined || model === "" ? NO_MODEL : String(model));
  const modelLabel = (model) => (model === NO_MODEL ? t("admin.no_model") : model);
  // Shortens an SVG text (already in the page, so that it can be measured) to fit in width pixels.
  function fit(node, width) {
    const full = node.textContent;
    let length = full.length;
    while (length > 1 && node.getComputedTextLength() > width) {
      length--;
      node.textContent = full.slice(0, length) + "…";
    }
    return node;
  }

  // "Nice" axis ticks: 0, step, 2 step, … up to at least max.
  function ticks(max, count) {
    if (!(max > 0)) return [0, 1];
    const rough = max / count;
    const magnitude = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= rough);
    const out = [];
    for (let i = 0; i * step < max * (1 + 1e-9) || out.length < 2; i++) out.push(Number((i * step).toPrecision(12)));
    if (out[out.length - 1] < max) out.push(Number((out.length * step).toPrecision(12)));
    return out;
  }

  // -- DOM helpers (no markup strings anywhere)

  function element(tag, attributes, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svg(tag, attributes, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    if (parent) parent.append(node);
    return node;
  }
  function svgText(parent, x, y, text, attributes) {
    const node = svg("text", Object.assign({ x: x, y: y }, attributes || {}), parent);
    node.textContent = text;
    return node;
  }
  function titled(node, text) {
    // <title> as the first child: the accessible name and the tooltip of an SVG element.
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = text;
    node.prepend(title);
    return node;
  }
  function chartRoot(width, height, title, description) {
    const id = "chart-" + ++chartIds;
    const root = svg("svg", {
      viewBox: "0 0 " + width + " " + height,
      width: width,
      height: height,
      role: "img",
      "aria-labelledby": id + "-title " + id + "-desc",
    });
    const titleNode = svg("title", { id: id + "-title" }, root);
    titleNode.textContent = title;
    const desc = svg("desc", { id: id + "-desc" }, root);
    desc.textContent = description;
    return root;
  }
  function swatch(color) {
    const icon = svg("svg", { viewBox: "0 0 10 10", "aria-hidden": "true", focusable: "false" });
    svg("rect", { width: 10, height: 10, rx: 2, fill: color }, icon);
    return icon;
  }
  function widthOf(container, fallback) {
    return Math.max(300, Math.floor(container.clientWidth || fallback));
  }

  // -- the report, summed up the ways the charts need it

  // One report row added to a token's sums or to the totals.
  function addRow(sums, row, spend) {
    sums.usd += spend;
    sums.requests += row.requests || 0;
    sums.input += row.input_tokens || 0;
    sums.cached += row.cached_tokens || 0;
    sums.output += row.output_tokens || 0;
    sums.estimated += row.estimated || 0;
  }

  function summarise(report) {
    const tokens = new Map();
    const models = new Map();
    const days = new Map();
    const totals = { usd: 0, requests: 0, input: 0, cached: 0, output: 0, estimated: 0 };
    for (const row of report.rows) {
      const spend = Number(row.usd) || 0;
      const token = String(row.token);
      if (!tokens.has(token)) {
        tokens.set(token, { token: token, usd: 0, requests: 0, input: 0, cached: 0, output: 0, estimated: 0 });
      }
      addRow(tokens.get(token), row, spend);
      const model = modelKey(row.model);
      if (!models.has(model)) models.set(model, { model: model, usd: 0, requests: 0, input: 0, output: 0 });
      const m = models.get(model);
      m.usd += spend;
      m.requests += row.requests || 0;
      m.input += row.input_tokens || 0;
      m.output += row.output_tokens || 0;
      if (!days.has(row.day)) days.set(row.day, new Map());
      const perToken = days.get(row.day);
      if (!perToken.has(token)) perToken.set(token, { usd: 0, requests: 0 });
      perToken.get(token).usd += spend;
      perToken.get(token).requests += row.requests || 0;
      addRow(totals, row, spend);
    }
    const bySpend = (a, b) => b.usd - a.usd || (a.token || a.model).localeCompare(b.token || b.model);
    const tokenList = [...tokens.values()].sort(bySpend);
    // The chart's series: the biggest spenders, then one "others" series if there are too many.
    const shown = tokenList.length > PALETTE.length ? tokenList.slice(0, PALETTE.length - 1) : tokenList;
    const colors = new Map(shown.map((t, i) => [t.token, PALETTE[i]]));
    const series = shown.map((t) => t.token);
    if (shown.length < tokenList.length) series.push(OTHERS);
    return {
      tokens: tokenList,
      models: [...models.values()].sort(bySpend),
      days: days,
      totals: totals,
      colors: colors,
      series: series,
    };
  }
  const colorOf = (summary, token) => summary.colors.get(token) || OTHERS_COLOR;

  // -- (a) spend per day per token: stacked bars

  function drawDaily(report, summary) {
    const box = $("daily-chart");
    box.replaceChildren();
    const days = daysBetween(report.from, report.to);
    const width = widthOf(box, 1000);
    const height = 300;
    const margin = { left: 72, right: 12, top: 22, bottom: 34 };
    const plotWidth = width - margin.left - margin.right;
    const plotHeight = height - margin.top - margin.bottom;
    const stacks = days.map((day) => {
      const perToken = summary.days.get(day) || new Map();
      const values = new Map();
      for (const [token, value] of perToken) {
        const key = summary.colors.has(token) ? token : OTHERS;
        const sum = values.get(key) || { usd: 0, requests: 0, tokens: 0 };
        sum.usd += value.usd;
        sum.requests += value.requests;
        sum.tokens += 1;
        values.set(key, sum);
      }
      let total = 0;
      for (const value of values.values()) total += value.usd;
      return { day: day, values: values, total: total };
    });
    const maxTotal = Math.max(0, ...stacks.map((s) => s.total));
    const axis = ticks(maxTotal, 4);
    const top = axis[axis.length - 1];
    const y = (value) => margin.top + plotHeight - (value / top) * plotHeight;
    const root = chartRoot(
      width,
      height,
      t("admin.daily.chart", period(report.from, report.to)),
      t("admin.daily.chart.desc", { total: usd(summary.totals.usd) }),
    );
    root.classList.add("daily");
    for (const value of axis) {
      svg("line", { class: "grid", x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value) }, root);
      svgText(root, margin.left - 8, y(value) + 4, usd(value), { class: "axis", "text-anchor": "end" });
    }
    const slot = plotWidth / Math.max(1, days.length);
    const barWidth = Math.max(1, Math.min(56, slot * 0.72));
    const labelEvery = Math.ceil(days.length / Math.max(1, Math.floor(plotWidth / 64)));
    stacks.forEach((stack, index) => {
      const x = margin.left + index * slot + (slot - barWidth) / 2;
      const group = svg("g", { class: "day", "data-day": stack.day }, root);
      let base = 0;
      for (const token of summary.series) {
        const value = stack.values.get(token);
        if (!value || !(value.usd > 0)) continue;
        const rect = svg(
          "rect",
          {
            class: "seg",
            x: x,
            y: y(base + value.usd),
            width: barWidth,
            height: Math.max(0.5, y(base) - y(base + value.usd)),
            fill: colorOf(summary, token),
            "data-token": token === OTHERS ? "" : token,
            "data-day": stack.day,
          },
          group,
        );
        const who = token === OTHERS ? t("admin.other_tokens", { n: value.tokens }) : tokenLabel(token);
        const requests = t("admin.requests", { n: value.requests });
        titled(rect, t("admin.daily.segment", { day: stack.day, who, usd: usd(value.usd), requests }));
        base += value.usd;
      }
      if (stack.total > 0 && slot >= 44) {
        svgText(group, x + barWidth / 2, y(stack.total) - 5, usd(stack.total), {
          class: "value",
          "text-anchor": "middle",
        });
      }
      if (index % labelEvery === 0) {
        svgText(root, margin.left + index * slot + slot / 2, height - margin.bottom + 18, shortDay(stack.day), {
          class: "axis",
          "text-anchor": "middle",
        });
      }
    });
    svg("line", { class: "base", x1: margin.left, x2: width - margin.right, y1: y(0), y2: y(0) }, root);
    box.append(root);

    const legend = $("daily-legend");
    legend.replaceChildren();
    for (const token of summary.series) {
      const item = element("li", { "data-token": token === OTHERS ? "" : token });
      const others = summary.tokens.length - summary.series.length + 1;
      const name = token === OTHERS ? t("admin.other_tokens", { n: others }) : tokenLabel(token);
      item.append(swatch(colorOf(summary, token)), element("span", {}, name));
      legend.append(item);
    }
  }

  // -- (b) spend by model: horizontal bars

  function drawModels(summary) {
    const box = $("model-chart");
    box.replaceChildren();
    let models = summary.models;
    if (models.length > MAX_MODELS) {
      const rest = models.slice(MAX_MODELS - 1);
      const others = { model: "", usd: 0, requests: 0, input: 0, output: 0, others: rest.length };
      for (const m of rest) {
        others.usd += m.usd;
        others.requests += m.requests;
        others.input += m.input;
        others.output += m.output;
      }
      models = models.slice(0, MAX_MODELS - 1).concat([others]);
    }
    const width = widthOf(box, 520);
    const row = 30;
    const labelWidth = Math.min(190, Math.floor(width * 0.36));
    const valueWidth = 96;
    const height = models.length * row + 8;
    const barSpace = width - labelWidth - valueWidth - 12;
    const max = Math.max(0, ...models.map((m) => m.usd));
    const root = chartRoot(width, height, t("admin.models"), t("admin.models.chart.desc"));
    root.classList.add("models");
    box.append(root); // in the page first: the labels are measured
    models.forEach((m, index) => {
      const top = 4 + index * row;
      const label = m.others ? t("admin.other_models", { n: m.others }) : modelLabel(m.model);
      const group = svg("g", { class: "model", "data-model": m.others ? "" : label }, root);
      fit(svgText(group, labelWidth - 8, top + row / 2 + 4, label, { "text-anchor": "end" }), labelWidth - 10);
      const length = max > 0 ? Math.max(m.usd > 0 ? 1 : 0, (m.usd / max) * barSpace) : 0;
      const bar = svg(
        "rect",
        {
          class: "model-bar",
          x: labelWidth,
          y: top + 5,
          width: length,
          height: row - 10,
          rx: 3,
          "data-model": m.others ? "" : label,
        },
        group,
      );
      const requests = t("admin.requests", { n: m.requests });
      titled(bar, t("admin.models.bar", { model: label, usd: usd(m.usd), requests, input: m.input, output: m.output }));
      svgText(group, labelWidth + length + 6, top + row / 2 + 4, usd(m.usd), { class: "value strong" });
    });
  }

  // -- (c) top tokens by spend: a table

  function drawTable(summary) {
    const body = $("top-tokens").tBodies[0];
    const foot = $("top-tokens").tFoot;
    body.replaceChildren();
    foot.replaceChildren();
    const cells = (sums) => [
      integer(sums.requests),
      integer(sums.input),
      integer(sums.cached),
      integer(sums.output),
      integer(sums.estimated),
      usd(sums.usd),
    ];
    const totals = summary.totals;
    summary.tokens.forEach((sums, index) => {
      const tr = element("tr", { "data-token": sums.token });
      tr.append(element("td", { class: "num" }, String(index + 1)));
      const name = element("th", { scope: "row", class: "token", title: tokenLabel(sums.token) });
      name.append(swatch(colorOf(summary, sums.token)), document.createTextNode(tokenLabel(sums.token)));
      tr.append(name);
      for (const text of cells(sums)) tr.append(element("td", { class: "num" }, text));
      tr.append(element("td", { class: "num" }, percent(totals.usd > 0 ? sums.usd / totals.usd : 0)));
      body.append(tr);
    });
    const total = element("tr");
    total.append(element("td"), element("th", { scope: "row" }, t("admin.all_tokens")));
    for (const text of cells(totals)) total.append(element("td", { class: "num" }, text));
    total.append(element("td", { class: "num" }, totals.usd > 0 ? percent(1) : "–"));
    foot.append(total);
  }

  // -- (d) remaining budgets: spent against budget, with the reset date

  function budgetBars(budget) {
    const bars = [];
    if (typeof budget.budget_usd === "number") {
      bars.push({
        kind: "usd",
        spent: Number(budget.spent_usd) || 0,
        limit: budget.budget_usd,
        remaining: budget.remaining_usd,
        show: usd,
      });
    }
    if (typeof budget.budget_tokens === "number") {
      bars.push({
        kind: "tokens",
        spent: Number(budget.spent_tokens) || 0,
        limit: budget.budget_tokens,
        remaining: budget.remaining_tokens,
        show: (n) => t("admin.tokens", { n: n || 0 }),
      });
    }
    return bars;
  }

  function drawBudgets(report) {
    const box = $("budget-chart");
    box.replaceChildren();
    const budgets = (report.budgets || []).slice().sort((a, b) => String(a.token).localeCompare(String(b.token)));
    if (!budgets.length) {
      box.append(element("p", { class: "empty" }, t("admin.budgets.none")));
      return;
    }
    const width = widthOf(box, 520);
    const rows = [];
    for (const budget of budgets) for (const bar of budgetBars(budget)) rows.push([budget, bar]);
    const root = chartRoot(width, 100, t("admin.budgets"), t("admin.budgets.chart.desc"));
    root.classList.add("budgets");
    box.append(root); // in the page first: the labels are measured, and a row takes the lines it needs
    const trackWidth = width - 8;
    let top = 2;
    for (const [budget, bar] of rows) {
      const share = bar.limit > 0 ? bar.spent / bar.limit : 1;
      const level = share >= 1 ? "over" : share >= 0.8 ? "warn" : "ok";
      const remaining = typeof bar.remaining === "number" ? bar.remaining : Math.max(0, bar.limit - bar.spent);
      const group = svg("g", { class: "budget " + level, "data-token": budget.token, "data-kind": bar.kind }, root);
      const amounts = { spent: bar.show(bar.spent), limit: bar.show(bar.limit), left: bar.show(remaining) };
      const resets = longDate(budget.resets_at);
      titled(
        group,
        t("admin.budget.title", {
          token: tokenLabel(budget.token),
          this_period: t("admin.budget.this." + budget.period),
          resets,
          ...amounts,
        }),
      );
      const name = svgText(group, 0, top + 13, tokenLabel(budget.token), { class: "value strong" });
      // Tokens: the unit once ("1,320 of 200,000 tokens · 198,680 left"), so that it fits a phone.
      const short =
        bar.kind === "tokens"
          ? t("admin.budget.amounts.tokens", { spent: integer(bar.spent), left: integer(remaining), n: bar.limit })
          : t("admin.budget.amounts", amounts);
      const amountsText = svgText(group, trackWidth, top + 13, short, {
        class: "value",
        "text-anchor": "end",
      });
      const room = trackWidth - amountsText.getComputedTextLength() - 12;
      if (room >= Math.min(80, name.getComputedTextLength())) {
        fit(name, room);
      } else {
        // No room beside the name (a phone): the amounts go on a line of their own.
        top += 16;
        amountsText.setAttribute("x", 0);
        amountsText.setAttribute("y", top + 13);
        amountsText.setAttribute("text-anchor", "start");
        fit(name, trackWidth);
        fit(amountsText, trackWidth);
      }
      svg("rect", { class: "track", x: 0, y: top + 19, width: trackWidth, height: 12, rx: 6 }, group);
      const filled = Math.min(1, Math.max(0, share)) * trackWidth;
      const spentWidth = Math.max(share > 0 ? 2 : 0, filled);
      svg("rect", { class: "spent " + level, x: 0, y: top + 19, width: spentWidth, height: 12, rx: 6 }, group);
      const used = t("admin.budget.used", {
        per_period: t("admin.budget.per." + budget.period),
        share: percent(Math.max(0, share)),
      });
      const resetsText = t("admin.budget.resets", { resets });
      const below = svgText(group, 0, top + 45, used + " · " + resetsText, { class: "axis" });
      if (below.getComputedTextLength() > trackWidth) {
        below.textContent = used;
        top += 15;
        svgText(group, 0, top + 45, resetsText, { class: "axis" });
      }
      top += 52;
    }
    const height = top + 2;
    root.setAttribute("viewBox", "0 0 " + width + " " + height);
    root.setAttribute("height", height);
  }

  // -- totals

  function drawTotals(summary) {
    const list = $("totals");
    list.replaceChildren();
    const totals = summary.totals;
    const facts = [
      ["spend", usd(totals.usd)],
      ["requests", integer(totals.requests)],
      ["tokens", integer(summary.tokens.length)],
      ["models", integer(summary.models.length)],
      ["input", integer(totals.input)],
      ["output", integer(totals.output)],
      ["estimated", integer(totals.estimated)],
    ];
    for (const [name, value] of facts) {
      const item = element("div");
      item.append(element("dt", { "data-i18n": "admin.fact." + name }, t("admin.fact." + name)), element("dd", {}, value));
      list.append(item);
    }
  }

  function draw(report) {
    const summary = summarise(report);
    $("report").hidden = false; // visible first, so that the charts can measure their width
    drawTotals(summary);
    drawDaily(report, summary);
    drawModels(summary);
    drawBudgets(report);
    drawTable(summary);
  }

  // -- talking to the server

  // An error the page words itself: `render` gives its text in the current language.
  class LoadError extends Error {
    constructor(render, status) {
      super(render());
      this.render = render;
      this.status = status || 0;
    }
  }

  async function describeError(response) {
    let message = "";
    let code = "";
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || body.text || "";
      code = (body.error && body.error.code) || "";
    } catch (e) {
      message = response.statusText;
    }
    const status = response.status;
    if (status === 403) return () => t("admin.error.admin_token");
    if (status === 404 && code === "usage_database_unset") return () => t("admin.error.ledger_off");
    if (status === 404) return () => t("admin.error.no_admin", { message });
    if (status === 400) return () => t("admin.error.dates_refused", { message });
    return () => t("common.error.status", { status: String(status), message: message || t("admin.error.no_answer") });
  }

  async function fetchUsage(format) {
    const token = $("admin-token").value;
    const query = new URLSearchParams({ from: $("from").value, to: $("to").value });
    if (format) query.set("format", format);
    let response;
    try {
      response = await fetch("/admin/usage?" + query.toString(), {
        headers: { "admin-token": token, Accept: format === "csv" ? "text/csv" : "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new LoadError(() => t("common.error.unreachable", { message: e.message }));
    }
    if (!response.ok) {
      if (response.status === 403) sessionStorage.removeItem(STORE_KEY);
      throw new LoadError(await describeError(response), response.status);
    }
    return response;
  }

  // The error and status lines take a function that words them, called again on a language switch.
  function showError(render) {
    I18N.show($("error"), render || null);
    $("error").hidden = !render;
  }
  function setStatus(render) {
    I18N.show($("status"), render || null);
  }
  const failure = (e, key) => (e instanceof LoadError ? e.render : () => t(key, { message: e.message }));
  function clearReport() {
    current = null;
    $("report").hidden = true;
  }
  function checkDates() {
    if (!$("from").value || !$("to").value) return () => t("admin.error.both_dates");
    if ($("from").value > $("to").value) return () => t("admin.error.dates_order");
    return null;
  }

  async function load() {
    const problem = checkDates();
    if (problem) {
      showError(problem);
      return;
    }
    const mine = ++sequence;
    sessionStorage.setItem(STORE_KEY, $("admin-token").value);
    showError(null);
    setStatus(() => t("admin.status.loading"));
    $("load").disabled = true;
    try {
      const response = await fetchUsage("");
      const report = await response.json();
      if (mine !== sequence) return;
      current = report;
      draw(report);
      const rows = report.rows.length;
      const asOf = new Date();
      // Worded again on a language switch: the dates too.
      const dates = () => period(report.from, report.to);
      setStatus(
        rows
          ? () =>
              t("admin.status.rows", {
                ...dates(),
                rows: t("admin.status.rows.count", { n: rows }),
                time: asOf.toLocaleTimeString(I18N.lang),
              })
          : () => t("admin.status.empty", dates()),
      );
    } catch (e) {
      if (mine !== sequence) return;
      clearReport();
      setStatus(null);
      showError(failure(e, "admin.error.show"));
    } finally {
      if (mine === sequence) $("load").disabled = false;
    }
  }

  async function downloadCsv() {
    const problem = checkDates();
    if (problem) {
      showError(problem);
      return;
    }
    showError(null);
    $("csv").disabled = true;
    try {
      const response = await fetchUsage("csv");
      const blob = await response.blob();
      const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
      const name = match ? match[1] : "usage-" + $("from").value + "-" + $("to").value + ".csv";
      const link = element("a", { download: name });
      link.href = URL.createObjectURL(blob);
      link.hidden = true;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 30000);
      setStatus(() => t("admin.status.csv", { name }));
    } catch (e) {
      if (e instanceof LoadError && e.status === 403) clearReport();
      showError(failure(e, "admin.error.csv"));
    } finally {
      $("csv").disabled = !$("admin-token").value;
    }
  }

  function forget() {
    sequence++;
    sessionStorage.removeItem(STORE_KEY);
    $("admin-token").value = "";
    $("csv").disabled = true;
    clearReport();
    showError(null);
    setStatus(() => t("admin.status.forgotten"));
  }

  function start() {
    const today = todayUTC();
    $("from").value = today.slice(0, 8) + "01";
    $("to").value = today;
    $("admin-token").value = sessionStorage.getItem(STORE_KEY) || "";
    $("csv").disabled = !$("admin-token").value;
    $("admin-token").addEventListener("input", () => {
      $("csv").disabled = !$("admin-token").value;
    });
    $("query").addEventListener("submit", (event) => {
      event.preventDefault();
      load();
    });
    $("csv").addEventListener("click", downloadCsv);
    $("forget").addEventListener("click", forget);
    let resizing = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => current && draw(current), 150);
    });
    // The charts' words and numbers are drawn in: draw them again in the new language.
    I18N.onChange(() => current && draw(current));
    if ($("admin-token").value) load();
  }

  start();
})();
