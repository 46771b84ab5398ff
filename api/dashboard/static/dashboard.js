// The StreamLens dashboard: one tenant's windows, read from /v1/metrics with a read
// key, drawn with uPlot, and the quality of its calls, read from /v1/evaluations with
// the same key. The key lives in sessionStorage only: never in the URL, whose
// fragment holds the view (range, bucket, filters, dimension, split, refresh).
"use strict";

(() => {
  const RANGES = { "15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400 };
  const BUCKETS = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600, "1d": 86400 };
  // The bucket a range starts with: from a few dozen to a few hundred points.
  const BUCKET_FOR_RANGE = { "15m": "1m", "1h": "1m", "6h": "5m", "24h": "15m", "7d": "1h", custom: "1h" };
  const REFRESH_SECONDS = ["5", "15", "60"];
  const PAGE = 1000; // the query API's largest limit
  const RETRY_SECONDS = 5; // after a 503, as the API's Retry-After says
  const KEY_STORAGE = "streamlens.readKey";
  const TENANT_STORAGE = "streamlens.tenant";
  const CHART_HEIGHT = 220;
  const COLORS = ["#2563eb", "#dc2626", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d",
    "#9333ea", "#ea580c", "#0d9488", "#4f46e5"];
  // A dimension's value as the view and the Value choices hold it: "" is every
  // value, NO_VALUE the calls without one, and "=" before a value's text keeps an
  // empty text apart from both.
  const NO_VALUE = "-";
  const OTHER = "(other)"; // the row of the values beyond a window's most frequent
  // Where each kind of row is read, and the answer's field that holds them.
  const METRICS = { path: "v1/metrics", field: "metrics" };
  const EVALUATIONS = { path: "v1/evaluations", field: "evaluations" };

  const p95 = (row) => row.p95_latency_ms;
  const ttft = (row) => row.avg_time_to_first_token_ms;
  const cost = (row) => row.estimated_cost_usd;
  // What each chart plots; split by route or model, a chart draws one line per
  // group of its `split` value instead.
  const CHARTS = [
    {
      id: "calls", title: "Calls and errors", unit: "",
      series: [
        { label: "calls", value: (row) => row.requests },
        { label: "errors (not timeouts)", value: (row) => row.errors - row.timeouts },
        { label: "timeouts", value: (row) => row.timeouts },
      ],
      split: { title: "Calls", value: (row) => row.requests },
    },
    {
      id: "latency", title: "Latency", unit: "ms",
      series: [
        { label: "p50", value: (row) => row.p50_latency_ms },
        { label: "p95", value: p95 },
        { label: "p99", value: (row) => row.p99_latency_ms },
      ],
      split: { title: "p95 latency", value: p95 },
    },
    {
      id: "ttft", title: "Average time to first token", unit: "ms",
      series: [{ label: "time to first token", value: ttft }],
      split: { title: "Average time to first token", value: ttft },
    },
    {
      id: "tokens", title: "Tokens", unit: "",
      series: [
        { label: "prompt", value: (row) => row.prompt_tokens },
        { label: "completion", value: (row) => row.completion_tokens },
        { label: "cache read", value: (row) => row.cache_read_tokens },
      ],
      split: { title: "Prompt + completion tokens", value: (row) => row.prompt_tokens + row.completion_tokens },
    },
    {
      id: "cost", title: "Cost", unit: "USD",
      series: [{ label: "cost", value: cost }],
      split: { title: "Cost", value: cost },
    },
  ];

  // The chart an alert rule's metric is drawn on, where its firing spans are marked
  // (a `score_avg:<name>` rule: that name's chart in Quality).
  const ALERT_CHARTS = {
    calls: "calls", errors: "calls", error_rate: "calls", timeouts: "calls", timeout_rate: "calls",
    p50_latency_ms: "latency", p95_latency_ms: "latency", p99_latency_ms: "latency",
    avg_time_to_first_token_ms: "ttft", prompt_tokens: "tokens", completion_tokens: "tokens",
    estimated_cost_usd: "cost",
  };
  const SCORE_PREFIX = "score_avg:";
  const RECENT_TRANSITIONS = 50;
  const MARK_FILL = "rgba(220, 38, 38, 0.13)";

  const $ = (id) => document.getElementById(id);

  const valueKey = (value) => (value === null ? NO_VALUE : `=${value}`);
  const valueOfKey = (key) => (key === NO_VALUE ? null : key.slice(1));
  const isValueKey = (key) => key === NO_VALUE || key.startsWith("=");
  const valueLabel = (value) => (value === null ? "(none)" : value === "" ? '""' : value);
  // Calls without a value first and the merged rest last, around the named values.
  const valueRank = (value) => (value === null ? 0 : value === OTHER ? 2 : 1);
  const compareValues = (a, b) => valueRank(a) - valueRank(b) || (a < b ? -1 : a > b ? 1 : 0);

  // What the page shows, for people and for tests: the uPlot instances (their
  // `data` is what is plotted), the charts' query, the table as rendered, timings.
  // `dimensions`: the tenant's, once read (null before, or when they could not be).
  // `quality`: the evaluations' query, names shown, their uPlot instances (scored
  // names only) and label counts over the range ({label: count}, labelled names only).
  // `usage`: the days GET /v1/usage answered, oldest first (null: not read).
  // `alerts`: the rules as GET /v1/alerts answered (null when they could not be read),
  // the names of those firing, and the spans marked on each chart ({chart: [[from, to]]},
  // `to` null while it lasts).
  const exposed = { charts: {}, query: null, table: [], state: "idle", loads: 0, timings: {}, dimensions: null,
    quality: { query: null, names: [], charts: {}, labels: {} },
    alerts: { rules: null, firing: [], marks: {} }, usage: null };
  window.streamlens = exposed;

  const state = {
    key: null,
    tenant: null,
    view: null,
    xRange: [0, 1],
    sort: { key: "calls", descending: true },
    tableRows: [],
    tableView: null,
    timer: null,
    generation: 0,
    loginAt: null,
  };

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  // ---- the view, kept in the URL fragment --------------------------------------------

  function readView() {
    const params = new URLSearchParams(location.hash.slice(1));
    const wanted = params.get("range");
    const range = wanted in RANGES || wanted === "custom" ? wanted : "1h";
    const bucket = params.get("bucket") in BUCKETS ? params.get("bucket") : BUCKET_FOR_RANGE[range];
    const dimension = params.get("dimension") || "";
    const value = dimension && isValueKey(params.get("value") || "") ? params.get("value") : "";
    const splits = dimension ? ["route", "model", "value"] : ["route", "model"];
    const split = splits.includes(params.get("split")) ? params.get("split") : "";
    const refresh = REFRESH_SECONDS.includes(params.get("refresh")) ? params.get("refresh") : "";
    return {
      range, bucket, split, refresh,
      route: params.get("route") || "",
      model: params.get("model") || "",
      dimension, value,
      from: params.get("from") || "",
      to: params.get("to") || "",
    };
  }

  function writeView(view) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(view)) {
      const custom = name === "from" || name === "to";
      if (value && (!custom || view.range === "custom")) params.set(name, value);
    }
    history.replaceState(null, "", "#" + params);
  }

  function showView(view) {
    $("range").value = view.range;
    $("bucket").value = view.bucket;
    $("split").value = view.split;
    $("from").value = view.from;
    $("to").value = view.to;
    $("custom-range").hidden = view.range !== "custom";
    $("auto-refresh").checked = Boolean(view.refresh);
    if (view.refresh) $("refresh-every").value = view.refresh;
    for (const name of ["route", "model"]) keepOption($(name), view[name]);
    keepOption($("dimension"), view.dimension);
    showDimension(view);
  }

  // The Value choice and the split by values exist only while a dimension is chosen.
  function showDimension(view) {
    $("value-field").hidden = !view.dimension;
    const byValue = $("split-value");
    byValue.hidden = byValue.disabled = !view.dimension;
    byValue.textContent = view.dimension || "dimension";
    keepOption($("value"), view.value, view.value && valueLabel(valueOfKey(view.value)));
    $("split").value = view.split;
  }

  function viewFromControls() {
    return {
      range: $("range").value,
      bucket: $("bucket").value,
      split: $("split").value,
      refresh: $("auto-refresh").checked ? $("refresh-every").value : "",
      route: $("route").value,
      model: $("model").value,
      dimension: $("dimension").value,
      value: $("dimension").value ? $("value").value : "",
      from: $("from").value,
      to: $("to").value,
    };
  }

  // Seconds since the epoch; a relative range starts on a bucket boundary, so its
  // first bucket is whole.
  function timeWindow(view) {
    if (view.range === "custom") {
      const from = Date.parse(view.from);
      const to = Date.parse(view.to);
      if (Number.isNaN(from) || Number.isNaN(to)) throw new Error("Custom range: enter both From and To.");
      if (from >= to) throw new Error("Custom range: From must be before To.");
      return { from: from / 1000, to: to / 1000, open: false };
    }
    const bucket = BUCKETS[view.bucket];
    const now = Date.now() / 1000;
    return { from: Math.floor((now - RANGES[view.range]) / bucket) * bucket, to: now, open: true };
  }

  const iso = (seconds) => new Date(seconds * 1000).toISOString();
  const seconds = (timestamp) => Date.parse(timestamp) / 1000;

  // ---- the API -----------------------------------------------------------------------

  async function getJson(path, params) {
    const url = params ? `${path}?${new URLSearchParams(params)}` : path;
    let response;
    try {
      response = await fetch(url, { headers: { Authorization: `Bearer ${state.key}` }, cache: "no-store" });
    } catch (error) {
      throw new ApiError(0, `the query API did not answer (${error.message})`);
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch {
        // not the API's JSON error: keep the status text
      }
      throw new ApiError(response.status, detail);
    }
    return response.json();
  }

  // Every row of a query, newest first. The range is cut at bucket boundaries into
  // spans read side by side, each a smaller query than the whole; a span's one row
  // per bucket fits a page, with room to tell that nothing is left.
  async function allRows(params, source = METRICS) {
    const bucket = BUCKETS[params.bucket];
    const span = (PAGE - 1) * bucket;
    const end = params.to ? seconds(params.to) : Date.now() / 1000;
    const reads = [];
    let start = seconds(params.from);
    for (let next = Math.floor(start / bucket) * bucket + span; ; next += span) {
      // The last span ends where the range does; an open range's stays open, for
      // windows newer than this page's clock.
      const last = next >= end;
      reads.push(pagedRows({ ...params, from: iso(start), to: last ? params.to : iso(next) }, source));
      if (last) break;
      start = next;
    }
    return (await Promise.all(reads)).reverse().flat();
  }

  // A full page may end inside a bucket: its oldest bucket is left out and read
  // again whole by the next page, which ends where that bucket ends.
  async function pagedRows(params, source) {
    const rows = [];
    let to = params.to;
    for (;;) {
      const { to: _, ...rest } = params;
      const answer = await getJson(source.path, { ...rest, ...(to ? { to } : {}), limit: PAGE });
      const page = answer[source.field];
      if (page.length < PAGE) return rows.concat(page);
      const oldest = page[page.length - 1].window_start;
      const whole = page.filter((row) => row.window_start !== oldest);
      if (whole.length === 0) throw new ApiError(0, `more than ${PAGE} groups in the bucket at ${oldest}`);
      rows.push(...whole);
      to = iso(seconds(oldest) + BUCKETS[params.bucket]);
    }
  }

  function baseParams(win) {
    const params = { tenant_id: state.tenant, from: iso(win.from) };
    if (!win.open) params.to = iso(win.to);
    return params;
  }

  // A dimension's rows only when the charts show its values, or one of them: its
  // values of a bucket add up to the main row, which is read otherwise.
  function chartParams(view, win) {
    const params = { ...baseParams(win), bucket: view.bucket, group_by: view.split === "value" ? "" : view.split };
    if (view.route) params.route = view.route;
    if (view.model) params.model = view.model;
    if (view.dimension && (view.split === "value" || view.value)) {
      params.dimension = view.dimension;
      // An empty `value=` asks for the calls without a value.
      if (view.value) params.value = valueOfKey(view.value) ?? "";
    }
    return params;
  }

  // The table and the filters' choices: every route, model (and value) of the range.
  function tableParams(view, win) {
    const params = { ...baseParams(win), bucket: "1d", group_by: "route,model" };
    if (view.dimension) params.dimension = view.dimension;
    return params;
  }

  // The evaluations of the charts' range and filters, per bucket, route and model.
  // They are kept per window and key, not per value of a dimension: a dimension's
  // filter does not apply to them.
  function evaluationParams(view, win) {
    const params = { ...baseParams(win), bucket: view.bucket, group_by: "route,model" };
    if (view.route) params.route = view.route;
    if (view.model) params.model = view.model;
    return params;
  }

  // `rows` null when they could not be read: a refused key or the database away is
  // the whole page's failure, anything else (a server without evaluations) the
  // Quality section's alone.
  async function readEvaluations(view, win) {
    const params = evaluationParams(view, win);
    try {
      return { params, rows: await allRows(params, EVALUATIONS), error: null };
    } catch (error) {
      if (error instanceof ApiError && [401, 403, 503].includes(error.status)) throw error;
      return { params, rows: null, error };
    }
  }

  // The names the API takes for this tenant: today's setting and every earlier
  // one, whose rows stay readable. True when the view's dimension is not among them
  // and was dropped.
  async function loadDimensions() {
    const tenant = state.tenant;
    let names;
    try {
      const answer = await getJson(`v1/tenants/${encodeURIComponent(tenant)}/dimensions`);
      const earlier = (answer.changes || []).flatMap((change) => change.dimensions);
      names = [...new Set([...answer.dimensions, ...earlier])];
    } catch {
      names = null;
    }
    if (tenant !== state.tenant) return false;
    // A failed re-read keeps the list already shown.
    if (names === null && exposed.dimensions !== null) return false;
    exposed.dimensions = names;
    return showDimensionChoices(names);
  }

  function showDimensionChoices(names) {
    // A dimension the tenant does not have would only be refused by the API. While
    // the list cannot be read, the view's own stays: the API tells whether it may.
    const view = state.view;
    const dropped = names !== null && Boolean(view.dimension) && !names.includes(view.dimension);
    if (dropped) {
      state.view = { ...view, dimension: "", value: "", split: view.split === "value" ? "" : view.split };
      writeView(state.view);
      showDimension(state.view);
    }
    const choices = names ?? (state.view.dimension ? [state.view.dimension] : []);
    const select = $("dimension");
    select.disabled = choices.length === 0;
    if (select.disabled) {
      select.title = names
        ? "This tenant slices its calls by no dimension (PUT /v1/tenants/{tenant}/dimensions sets some)."
        : "The tenant's dimensions could not be read.";
      select.replaceChildren(new Option(names ? "none configured" : "unavailable", ""));
    } else {
      select.title = "";
      select.replaceChildren(new Option("none", ""), ...choices.map((name) => new Option(name, name)));
    }
    select.value = state.view.dimension;
    return dropped;
  }

  // The tenant's alert rules and their latest transitions; null when they could not be
  // read for another reason than the key (which fails the whole page).
  async function readAlerts() {
    try {
      return await getJson("v1/alerts", { tenant_id: state.tenant, recent: RECENT_TRANSITIONS });
    } catch (error) {
      if (error instanceof ApiError && [401, 403].includes(error.status)) throw error;
      return null;
    }
  }

  // The tenant's usage on the days the range touches (UTC); null when it could not be
  // read for another reason than the key.
  async function readUsage(win) {
    const day = (secondsSinceEpoch) => iso(secondsSinceEpoch).slice(0, 10);
    try {
      return await getJson("v1/usage", { tenant_id: state.tenant, from: day(win.from), to: day(win.to + 86400) });
    } catch (error) {
      if (error instanceof ApiError && [401, 403].includes(error.status)) throw error;
      return null;
    }
  }

  function showUsage(answer) {
    const note = $("usage-note");
    const rows = answer === null ? [] : answer.days;
    exposed.usage = answer === null ? null : rows;
    note.textContent = answer === null
      ? "Usage could not be read."
      : rows.length === 0 ? `No events or calls of ${state.tenant} on these days.` : "";
    note.hidden = !note.textContent;
    const number = (value) => value.toLocaleString("en-US");
    $("usage").querySelector("tbody").replaceChildren(...[...rows].reverse().map((one) => {
      const row = document.createElement("tr");
      const cells = [one.day, number(one.events_accepted), number(one.events_refused), number(one.calls_counted)];
      cells.forEach((text, i) => {
        const cell = row.insertCell();
        cell.textContent = text;
        if (i > 0) cell.className = "num";
      });
      return row;
    }));
  }

  // ---- loading -----------------------------------------------------------------------

  // `quietly`: an auto-refresh, which keeps what is shown until the new data is in.
  async function load(quietly = false) {
    const generation = ++state.generation;
    clearTimeout(state.timer);
    const view = state.view;
    let win;
    try {
      win = timeWindow(view);
    } catch (error) {
      setStatus("error", error.message);
      return;
    }
    if (!quietly) setStatus("loading", "Loading…");
    try {
      const params = chartParams(view, win);
      exposed.query = params;
      const fetchStart = performance.now();
      const [rows, alerts] = await Promise.all([allRows(params), readAlerts()]);
      if (generation !== state.generation) return;
      showAlerts(alerts);
      const drawStart = performance.now();
      state.xRange = [win.from, win.to];
      drawCharts(view, rows);
      // Where the time goes: reading the rows, and building and drawing the charts.
      exposed.timings.readMs = drawStart - fetchStart;
      exposed.timings.drawMs = performance.now() - drawStart;
      // After the charts: its roll-up of the whole range would slow theirs down; the
      // evaluations alongside it.
      const [tableRows, evaluations, usage] = await Promise.all([
        allRows(tableParams(view, win)),
        readEvaluations(view, win),
        readUsage(win),
      ]);
      if (generation !== state.generation) return;
      showUsage(usage);
      state.tableRows = tableRows;
      state.tableView = view;
      showFilterChoices(tableRows);
      drawTable();
      drawQuality(view, evaluations);
      const buckets = new Set(rows.map((row) => row.window_start)).size;
      if (rows.length === 0) {
        const of = params.dimension ? `rows of ${params.dimension}` : "windows";
        setStatus("empty", `No ${of} for ${state.tenant} in this range.`);
      } else {
        setStatus("ok", `${buckets} buckets of ${view.bucket} · updated ${new Date().toLocaleTimeString()}`);
      }
      exposed.loads += 1;
      schedule(view.refresh ? Number(view.refresh) : null);
    } catch (error) {
      if (generation !== state.generation) return;
      failed(error);
    }
  }

  function failed(error) {
    const status = error instanceof ApiError ? error.status : 0;
    if (status === 401 || status === 403) {
      forget();
      showLogin(refusal(status, error.message));
      setStatus("refused", refusal(status, error.message));
    } else if (status === 503) {
      setStatus("unavailable", `The metrics database did not answer (503); retrying in ${RETRY_SECONDS} s.`);
      schedule(RETRY_SECONDS);
    } else {
      setStatus("error", status ? `The query API answered ${status}: ${error.message}` : error.message);
      schedule(state.view.refresh ? Number(state.view.refresh) : null);
    }
  }

  function refusal(status, detail) {
    return status === 401
      ? `The key was refused (401): ${detail}.`
      : `This key may not read these metrics (403): ${detail}.`;
  }

  function schedule(secondsFromNow) {
    clearTimeout(state.timer);
    if (secondsFromNow) state.timer = setTimeout(() => load(true), secondsFromNow * 1000);
  }

  function setStatus(name, text) {
    exposed.state = name;
    const status = $("status");
    status.dataset.state = name;
    status.textContent = text;
    $("charts").classList.toggle("empty", name === "empty");
  }

  // ---- alerts ------------------------------------------------------------------------

  const chartOfMetric = (metric) =>
    metric.startsWith(SCORE_PREFIX) ? `score:${metric.slice(SCORE_PREFIX.length)}` : ALERT_CHARTS[metric];

  // When a rule was firing, from its transitions: from each firing window's start to
  // the start of the window that resolved it (null: still firing). A budget, which
  // does not resolve, marks the window that reached it.
  function firingSpans(rule) {
    const told = [...rule.transitions].sort((a, b) => seconds(a.window_start) - seconds(b.window_start));
    if (rule.period) return told.map((one) => [seconds(one.window_start), seconds(one.window_end)]);
    const spans = [];
    let open = null;
    for (const one of told) {
      if (one.state === "firing" && open === null) open = seconds(one.window_start);
      if (one.state === "resolved" && open !== null) {
        spans.push([open, seconds(one.window_start)]);
        open = null;
      }
    }
    if (open !== null) spans.push([open, rule.state === "firing" ? null : seconds(told[told.length - 1].window_end)]);
    return spans;
  }

  const ruleScope = (rule) =>
    [rule.route, rule.model].filter((part) => part !== null).join(" · ") || "all routes and models";
  const ruleCondition = (rule) =>
    `${rule.metric} ${rule.op} ${rule.threshold}${rule.period ? ` a ${rule.period}` : ""}`;
  const shownTime = (timestamp) => new Date(timestamp).toLocaleString();

  function showAlerts(answer) {
    const alerts = exposed.alerts;
    const note = $("rules-note");
    if (answer === null) {
      note.textContent = "Alert rules could not be read.";
      note.hidden = false;
      return;
    }
    alerts.rules = answer.rules;
    const firing = answer.rules.filter((rule) => rule.state === "firing");
    alerts.firing = firing.map((rule) => rule.rule_name);
    $("firing").hidden = firing.length === 0;
    $("firing-list").replaceChildren(...firing.map((rule) => {
      const item = document.createElement("li");
      const latest = rule.transitions.find((one) => one.state === "firing");
      const value = latest && latest.value !== null ? `: ${Number(latest.value.toPrecision(4))}` : "";
      item.textContent = `${rule.rule_name} - ${ruleCondition(rule)} on ${ruleScope(rule)}${value}`
        + (rule.since ? `, since the window of ${shownTime(rule.since)}` : "");
      return item;
    }));
    const marks = {};
    for (const rule of answer.rules) {
      const chart = chartOfMetric(rule.metric);
      if (chart === undefined) continue;
      marks[chart] = (marks[chart] || []).concat(firingSpans(rule));
    }
    alerts.marks = marks;
    note.textContent = answer.rules.length ? "" : `${state.tenant} has no alert rules (POST /v1/alerts/rules).`;
    note.hidden = !note.textContent;
    $("rules").querySelector("tbody").replaceChildren(...answer.rules.map((rule) => {
      const latest = rule.transitions[0];
      const cells = [
        rule.rule_name,
        ruleCondition(rule),
        ruleScope(rule),
        rule.state,
        latest ? `${latest.state} at the window of ${shownTime(latest.window_start)}` : "none yet",
        latest ? `${latest.delivery}${latest.attempts > 1 ? ` after ${latest.attempts} attempts` : ""}` : "",
      ];
      const row = document.createElement("tr");
      for (const text of cells) row.insertCell().textContent = text;
      row.cells[3].dataset.state = rule.state;
      return row;
    }));
  }

  // Behind the lines: the spans its rules fired over, shaded.
  function drawMarks(chart, markKey) {
    const spans = exposed.alerts.marks[markKey] || [];
    if (spans.length === 0) return;
    const { ctx, bbox } = chart;
    ctx.save();
    ctx.fillStyle = MARK_FILL;
    for (const [from, to] of spans) {
      const left = Math.max(chart.valToPos(from, "x", true), bbox.left);
      const right = Math.min(chart.valToPos(to === null ? state.xRange[1] : to, "x", true), bbox.left + bbox.width);
      if (right > left) ctx.fillRect(left, bbox.top, right - left, bbox.height);
    }
    ctx.restore();
  }

  // ---- charts ------------------------------------------------------------------------

  function chartSeries(chart, view, groups) {
    const unit = chart.unit ? `, ${chart.unit}` : "";
    if (!view.split) return { title: chart.title + unit, series: chart.series };
    const byValue = view.split === "value";
    return {
      title: `${chart.split.title} by ${byValue ? view.dimension : view.split}${unit}`,
      series: groups.map((group) => ({ label: byValue ? valueLabel(group) : group, value: chart.split.value })),
    };
  }

  function drawCharts(view, rows) {
    const xs = [...new Set(rows.map((row) => seconds(row.window_start)))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const groups = view.split ? [...new Set(rows.map((row) => row[view.split]))] : [];
    groups.sort(view.split === "value" ? compareValues : undefined);
    const groupIndex = new Map(groups.map((group, i) => [group, i]));
    for (const chart of CHARTS) {
      const { title, series } = chartSeries(chart, view, groups);
      const columns = series.map(() => new Array(xs.length).fill(null));
      for (const row of rows) {
        const i = at.get(seconds(row.window_start));
        if (view.split) {
          const s = groupIndex.get(row[view.split]);
          columns[s][i] = series[s].value(row);
        } else {
          series.forEach((one, s) => { columns[s][i] = one.value(row); });
        }
      }
      plot(chart.id, title, series.map((one) => one.label), [xs, ...columns]);
    }
  }

  function chartBox(id) {
    let box = $("charts").querySelector(`.chart[data-chart="${CSS.escape(id)}"]`);
    if (!box) {
      box = document.createElement("div");
      box.className = "chart";
      box.dataset.chart = id;
      box.append(document.createElement("h3"), document.createElement("div"));
      $("charts").append(box);
    }
    return box;
  }

  const chartWidth = (box) => Math.max(box.clientWidth - 16, 200);

  // `charts`: where the instance is kept; `box`: the .chart it is drawn in.
  // `markKey`: the alert marks drawn on it (`chartOfMetric`).
  function plot(id, title, labels, data, { charts = exposed.charts, box = chartBox(id), markKey = id } = {}) {
    box.querySelector("h3").textContent = title;
    const existing = charts[id];
    const signature = JSON.stringify(labels);
    if (existing && existing.signature === signature) {
      existing.setData(data);
      showRange(existing);
      return;
    }
    if (existing) existing.destroy();
    const options = {
      width: chartWidth(box),
      height: CHART_HEIGHT,
      scales: { x: { time: true } },
      series: [{}, ...labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5 }))],
      axes: [{}, { size: 64 }],
      hooks: { drawAxes: [(chart) => drawMarks(chart, markKey)], draw: [drawn] },
    };
    const created = new uPlot(options, data, box.querySelector("div"));
    created.signature = signature;
    charts[id] = created;
    showRange(created);
  }

  // The whole range, also where it holds no windows; a drag still zooms in.
  function showRange(chart) {
    chart.setScale("x", { min: state.xRange[0], max: state.xRange[1] });
  }

  function drawn() {
    if (state.loginAt !== null && exposed.timings.firstChartMs === undefined) {
      exposed.timings.firstChartMs = performance.now() - state.loginAt;
    }
  }

  // ---- quality: the evaluations ------------------------------------------------------

  const pairLabel = (row) => `${row.route} · ${row.model}`;
  const byRouteModel = (a, b) =>
    a.route !== b.route ? (a.route < b.route ? -1 : 1) : a.model === b.model ? 0 : a.model < b.model ? -1 : 1;
  // Labels by count, most first, then by name; "(other)", the rest of each window's, last.
  const byCount = ([a, x], [b, y]) =>
    (a === OTHER) - (b === OTHER) || y - x || (a < b ? -1 : a > b ? 1 : 0);

  function qualityBox(name) {
    const boxes = $("quality-charts");
    let box = boxes.querySelector(`.chart[data-chart="${CSS.escape(name)}"]`);
    if (!box) {
      box = document.createElement("div");
      box.className = "chart";
      box.dataset.chart = name;
      const table = document.createElement("table");
      table.className = "labels";
      table.createCaption().textContent = "labels over the range";
      const head = table.createTHead().insertRow();
      for (const [text, className] of [["label", ""], ["count", "num"], ["share", "num"]]) {
        const th = document.createElement("th");
        th.textContent = text;
        th.className = className;
        head.append(th);
      }
      table.createTBody();
      box.append(document.createElement("h3"), document.createElement("div"), table);
      boxes.append(box);
    }
    return box;
  }

  function forgetQualityChart(name) {
    const charts = exposed.quality.charts;
    if (charts[name]) charts[name].destroy();
    delete charts[name];
  }

  function drawQuality(view, { params, rows, error }) {
    const quality = exposed.quality;
    quality.query = params;
    const note = $("quality-note");
    // What could not be read leaves what was drawn on screen.
    if (rows === null) {
      const status = error instanceof ApiError ? error.status : 0;
      note.textContent = `Evaluations could not be read: ${status ? `${status}, ` : ""}${error.message}.`;
      note.hidden = false;
      return;
    }
    const byName = new Map();
    for (const row of rows) {
      if (!byName.has(row.name)) byName.set(row.name, []);
      byName.get(row.name).push(row);
    }
    const names = [...byName.keys()].sort();
    for (const box of [...$("quality-charts").children]) {
      const name = box.dataset.chart;
      if (byName.has(name)) continue;
      forgetQualityChart(name);
      delete quality.labels[name];
      box.remove();
    }
    for (const name of names) drawEvaluation(name, byName.get(name));
    // In the order of their names, new ones among them.
    $("quality-charts").append(...names.map(qualityBox));
    quality.names = names;
    if (names.length === 0) {
      note.textContent = `No evaluations yet for ${state.tenant} in this range.`;
    } else if (view.dimension) {
      note.textContent = `Evaluations are kept per route and model, not per value of ${view.dimension}: `
        + "these are of every value.";
    } else {
      note.textContent = "";
    }
    note.hidden = !note.textContent;
  }

  // One evaluation name: its average score per route and model over time (when any
  // of its evaluations had a score), and its labels' counts over the range.
  function drawEvaluation(name, rows) {
    const box = qualityBox(name);
    const scored = rows.some((row) => row.scores > 0);
    const title = scored ? `${name}: average score by route · model` : `${name}: labels`;
    box.querySelector("h3").textContent = title;
    const chartPlace = box.querySelector("div");
    chartPlace.hidden = !scored;
    if (scored) {
      const xs = [...new Set(rows.map((row) => seconds(row.window_start)))].sort((a, b) => a - b);
      const at = new Map(xs.map((x, i) => [x, i]));
      const pairs = [];
      const pairIndex = new Map();
      for (const row of [...rows].sort(byRouteModel)) {
        const label = pairLabel(row);
        if (!pairIndex.has(label)) {
          pairIndex.set(label, pairs.length);
          pairs.push(label);
        }
      }
      const columns = pairs.map(() => new Array(xs.length).fill(null));
      for (const row of rows) {
        columns[pairIndex.get(pairLabel(row))][at.get(seconds(row.window_start))] = row.score_avg;
      }
      plot(name, title, pairs, [xs, ...columns], { charts: exposed.quality.charts, box, markKey: `score:${name}` });
    } else {
      forgetQualityChart(name);
    }
    const counts = new Map();
    for (const row of rows) {
      for (const [label, count] of Object.entries(row.labels)) counts.set(label, (counts.get(label) || 0) + count);
    }
    const lines = [...counts].sort(byCount);
    const total = lines.reduce((sum, [, count]) => sum + count, 0);
    const table = box.querySelector("table.labels");
    table.hidden = lines.length === 0;
    table.tBodies[0].replaceChildren(...lines.map(([label, count]) => {
      const tr = document.createElement("tr");
      for (const [text, className] of [
        [label, ""], [count.toLocaleString(), "num"], [`${(100 * count / total).toFixed(1)} %`, "num"],
      ]) {
        const td = document.createElement("td");
        td.textContent = text;
        td.className = className;
        tr.append(td);
      }
      return tr;
    }));
    if (lines.length) {
      exposed.quality.labels[name] = Object.fromEntries(lines);
    } else {
      delete exposed.quality.labels[name];
    }
  }

  // ---- the table and the filters' choices --------------------------------------------

  // Rows that tie on the sorted column stay in the order of their names.
  function byNames(a, b) {
    if (a.route !== b.route) return a.route < b.route ? -1 : 1;
    if (a.model !== b.model) return a.model < b.model ? -1 : 1;
    return compareValues(a.value, b.value);
  }

  function drawTable() {
    // The view the rows were read for: a newer one may still be loading.
    const view = state.tableView;
    if (!view) return;
    const dimension = view.dimension;
    const merged = new Map();
    for (const row of state.tableRows) {
      if ((view.route && row.route !== view.route) || (view.model && row.model !== view.model)) continue;
      if (view.value && row.value !== valueOfKey(view.value)) continue;
      const value = dimension ? row.value : undefined;
      const key = JSON.stringify([row.route, row.model, value]);
      const line = merged.get(key) || { route: row.route, model: row.model, value, calls: 0, errors: 0, p95: null,
        tokens: 0, cost: 0 };
      line.calls += row.requests;
      line.errors += row.errors;
      if (row.p95_latency_ms !== null) line.p95 = Math.max(line.p95 ?? -Infinity, row.p95_latency_ms);
      line.tokens += row.prompt_tokens + row.completion_tokens;
      line.cost += row.estimated_cost_usd;
      merged.set(key, line);
    }
    const lines = [...merged.values()];
    for (const line of lines) line.error_rate = line.calls ? line.errors / line.calls : 0;
    const { key, descending } = state.sort;
    lines.sort((a, b) => {
      if (key === "value") return (descending ? -1 : 1) * compareValues(a.value, b.value) || byNames(a, b);
      const [x, y] = descending ? [b[key], a[key]] : [a[key], b[key]];
      if (x === y) return byNames(a, b);
      if (x === null) return 1;
      if (y === null) return -1;
      return x < y ? -1 : 1;
    });
    $("table-title").textContent = `Routes × models${dimension ? ` × ${dimension}` : ""} over the range`;
    $("value-column").hidden = !dimension;
    $("value-column").textContent = dimension || "value";
    const body = $("table").tBodies[0];
    body.replaceChildren(...lines.map((line) => {
      const tr = document.createElement("tr");
      const cells = [
        [line.route, ""], [line.model, ""],
        ...(dimension ? [[valueLabel(line.value), ""]] : []),
        [line.calls.toLocaleString(), "num"],
        [`${(100 * line.error_rate).toFixed(1)} %`, "num"],
        [line.p95 === null ? "–" : line.p95.toFixed(0), "num"],
        [line.tokens.toLocaleString(), "num"],
        [line.cost.toFixed(4), "num"],
      ];
      for (const [text, className] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        td.className = className;
        tr.append(td);
      }
      return tr;
    }));
    for (const th of $("table").tHead.rows[0].cells) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (descending ? "descending" : "ascending") : "none");
    }
    exposed.table = lines;
  }

  // A chosen value stays a choice even when the range holds none of it.
  function keepOption(select, value, label = value) {
    if (value && ![...select.options].some((option) => option.value === value)) {
      select.append(new Option(label, value));
    }
    select.value = value;
  }

  function showFilterChoices(tableRows) {
    for (const name of ["route", "model"]) {
      const select = $(name);
      const values = [...new Set(tableRows.map((row) => row[name]))].sort();
      select.replaceChildren(new Option("all", ""), ...values.map((value) => new Option(value, value)));
      keepOption(select, state.view[name]);
    }
    const values = state.view.dimension ? [...new Set(tableRows.map((row) => row.value))].sort(compareValues) : [];
    $("value").replaceChildren(
      new Option("all", ""),
      ...values.map((value) => new Option(valueLabel(value), valueKey(value))),
    );
    keepOption($("value"), state.view.value, state.view.value && valueLabel(valueOfKey(state.view.value)));
  }

  // ---- the key -----------------------------------------------------------------------

  function showLogin(message) {
    $("board").hidden = true;
    $("tenant-name").hidden = true;
    $("forget-key").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("key").focus();
  }

  function forget() {
    clearTimeout(state.timer);
    state.generation += 1;
    state.key = null;
    state.tenant = null;
    exposed.dimensions = null;
    sessionStorage.removeItem(KEY_STORAGE);
    sessionStorage.removeItem(TENANT_STORAGE);
  }

  async function open(key, typedTenant) {
    state.key = key;
    state.loginAt = performance.now();
    let who;
    try {
      who = await getJson("dashboard/tenant");
    } catch (error) {
      forget();
      const status = error instanceof ApiError ? error.status : 0;
      exposed.state = status === 401 || status === 403 ? "refused" : "unavailable";
      showLogin(
        status === 401 || status === 403
          ? refusal(status, error.message)
          : `The key could not be checked: ${error.message} (${status || "no answer"}). Try again shortly.`,
      );
      return;
    }
    let tenant = who.tenant_id;
    if (tenant === null) {
      // AUTH=off: any tenant may be read, so the page has to be told which.
      $("tenant-field").hidden = false;
      if (!typedTenant) {
        showLogin("API keys are off on this server: type the tenant to show.");
        return;
      }
      tenant = typedTenant;
      sessionStorage.setItem(TENANT_STORAGE, tenant);
    }
    state.tenant = tenant;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login").hidden = true;
    $("board").hidden = false;
    $("tenant-name").textContent = tenant;
    $("tenant-name").hidden = false;
    $("forget-key").hidden = false;
    // A dimension named by the address is checked against the tenant's first;
    // otherwise the list arrives while the charts load.
    const dimensions = loadDimensions();
    if (state.view.dimension) await dimensions;
    await load();
  }

  // ---- wiring ------------------------------------------------------------------------

  function changed(event) {
    if (event.target.id === "range") {
      const range = $("range").value;
      $("bucket").value = BUCKET_FOR_RANGE[range];
      if (range === "custom" && !$("from").value) {
        const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 16);
        $("to").value = local(Date.now());
        $("from").value = local(Date.now() - 86400000);
      }
      $("custom-range").hidden = range !== "custom";
    }
    if (event.target.id === "dimension") {
      // Another dimension has other values; choosing one is meant to show them.
      const dimension = $("dimension").value;
      const split = $("split").value;
      $("value").replaceChildren(new Option("all", ""));
      showDimension({ dimension, value: "", split: dimension ? "value" : split === "value" ? "" : split });
    }
    state.view = viewFromControls();
    writeView(state.view);
    if (event.target.id === "auto-refresh" || event.target.id === "refresh-every") {
      schedule(state.view.refresh ? Number(state.view.refresh) : null);
    } else {
      load();
    }
  }

  function start() {
    state.view = readView();
    showView(state.view);
    $("controls").addEventListener("change", changed);
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    $("refresh").addEventListener("click", () => {
      loadDimensions().then((dropped) => dropped && load());
      load();
    });
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      open($("key").value.trim(), $("tenant").value.trim());
    });
    $("forget-key").addEventListener("click", () => {
      forget();
      showLogin("");
    });
    for (const th of $("table").tHead.rows[0].cells) {
      th.addEventListener("click", () => {
        const key = th.dataset.key;
        const named = ["route", "model", "value"].includes(key);
        state.sort = { key, descending: state.sort.key === key ? !state.sort.descending : !named };
        drawTable();
      });
    }
    window.addEventListener("resize", () => {
      for (const [id, chart] of Object.entries(exposed.charts)) {
        chart.setSize({ width: chartWidth(chartBox(id)), height: CHART_HEIGHT });
      }
      for (const [name, chart] of Object.entries(exposed.quality.charts)) {
        chart.setSize({ width: chartWidth(qualityBox(name)), height: CHART_HEIGHT });
      }
    });
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) {
      open(saved, sessionStorage.getItem(TENANT_STORAGE) || "");
    } else {
      showLogin("");
    }
  }

  start();
})();
