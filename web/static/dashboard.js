// InferQ dashboard: reads /api/v1/stats with the token kept in localStorage and draws SVG line charts.
// Each chart writes what it drew into its data-points and data-max attributes (tests read them).
"use strict";

const TOKEN_KEY = "inferq.dashboard.token";
const WINDOW_KEY = "inferq.dashboard.window";
const MAX_MODELS = 12;
const REFRESH_MS = 30000;
const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 420, height: 170, left: 48, right: 10, top: 10, bottom: 24 };

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

// A token in the URL fragment (never sent to the server) is stored, then removed from the address bar.
function readToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    localStorage.setItem(TOKEN_KEY, fragment.get("token"));
    if (fragment.get("window")) localStorage.setItem(WINDOW_KEY, fragment.get("window"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(TOKEN_KEY);
}

function authHeaders(token) {
  return token.startsWith("iq_") ? { "X-API-Key": token } : { Authorization: "Bearer " + token };
}

async function getJSON(path, token) {
  const response = await fetch(path, { headers: authHeaders(token), cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function setState(state, message) {
  document.body.dataset.state = state;
  document.getElementById("status").textContent = message;
}

function fmt(value, unit = "") {
  if (value === null || value === undefined) return "–";
  if (value === 0) return unit === "%" ? "0%" : unit === "ms" ? "0 ms" : "0";
  if (unit === "%") return (value * 100).toFixed(value < 0.1 ? 2 : 1) + "%";
  if (unit === "ms") return value < 10 ? value.toFixed(2) + " ms" : Math.round(value) + " ms";
  return String(value);
}

function timeLabel(iso, stepSeconds) {
  const date = new Date(iso);
  const opts = stepSeconds >= 86400 ? { month: "short", day: "numeric" } : { hour: "2-digit", minute: "2-digit" };
  return date.toLocaleString(undefined, opts);
}

// One SVG line chart; `lines` = [{name, values}] over the shared `times`; null values leave a gap.
function lineChart(kind, title, times, lines, unit, stepSeconds) {
  const { width, height, left, right, top, bottom } = CHART;
  const drawn = lines.flatMap((line) => line.values.filter((v) => v !== null && v !== undefined));
  const max = Math.max(unit === "%" ? 0.01 : 1, ...drawn);
  const x = (i) => left + (times.length > 1 ? (i * (width - left - right)) / (times.length - 1) : 0);
  const y = (v) => top + (height - top - bottom) * (1 - v / max);

  const figure = el("figure", { class: "chart", "data-chart": kind, "data-points": drawn.length,
                                "data-max": drawn.length ? Math.max(...drawn) : 0 });
  figure.append(el("figcaption", {}, title));
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(el("svg:line", { class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0) }));
  svg.append(el("svg:text", { class: "tick", x: left - 4, y: y(max) + 4, "text-anchor": "end" }, fmt(max, unit)));
  svg.append(el("svg:text", { class: "tick", x: left - 4, y: y(0), "text-anchor": "end" }, fmt(0, unit)));
  if (times.length) {
    svg.append(el("svg:text", { class: "tick", x: left, y: height - 6 }, timeLabel(times[0], stepSeconds)));
    svg.append(el("svg:text", { class: "tick", x: width - right, y: height - 6, "text-anchor": "end" },
                  timeLabel(times[times.length - 1], stepSeconds)));
  }
  lines.forEach((line, index) => {
    let d = "";
    let pen = false;
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      pen = true;
    });
    const isolated = line.values.map((v, i) => ({ v, i })).filter(({ v, i }) =>
      v !== null && v !== undefined && (line.values[i - 1] ?? null) === null && (line.values[i + 1] ?? null) === null);
    if (d) svg.append(el("svg:path", { class: `series s${index}`, d, "data-series": line.name }));
    for (const { v, i } of isolated) {  // a lone value has no segment: mark it with a dot
      svg.append(el("svg:circle", { class: `dot s${index}`, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5 }));
    }
  });
  figure.append(svg);
  const legend = el("ul", { class: "legend" });
  lines.forEach((line, index) => legend.append(el("li", { class: `s${index}` }, line.name)));
  figure.append(legend);
  return figure;
}

function tile(label, value) {
  const box = el("div", { class: "tile" });
  box.append(el("span", { class: "label" }, label), el("span", { class: "value" }, value));
  return box;
}

function summaryTiles(stats) {
  const tiles = el("div", { class: "tiles" });
  tiles.append(
    tile("jobs", fmt(stats.jobs.total)),
    tile("failed", fmt(stats.jobs.failed)),
    tile("error rate", fmt(stats.error_rate, "%")),
    tile("cache hit rate", fmt(stats.cache_hit_rate, "%")),
    tile("p50 total", fmt(stats.latency.total_ms.p50, "ms")),
    tile("p95 total", fmt(stats.latency.total_ms.p95, "ms")),
    tile("p99 total", fmt(stats.latency.total_ms.p99, "ms")),
    tile("p95 queue", fmt(stats.latency.queue_ms.p95, "ms")),
    tile("p95 inference", fmt(stats.latency.inference_ms.p95, "ms")),
  );
  return tiles;
}

function charts(stats) {
  const times = stats.series.map((p) => p.t);
  const per = stats.step_seconds >= 3600 ? `${stats.step_seconds / 3600} h` : `${stats.step_seconds / 60} min`;
  const pick = (key) => stats.series.map((p) => p[key]);
  const box = el("div", { class: "charts" });
  box.append(
    lineChart("throughput", `Jobs per ${per}`, times,
              [{ name: "submitted", values: pick("jobs") }, { name: "failed", values: pick("failed") }], "", stats.step_seconds),
    lineChart("error-rate", "Error rate", times, [{ name: "failed / finished", values: pick("error_rate") }], "%",
              stats.step_seconds),
    lineChart("latency", "Total latency percentiles", times, [
      { name: "p50", values: pick("total_p50_ms") }, { name: "p95", values: pick("total_p95_ms") },
      { name: "p99", values: pick("total_p99_ms") }], "ms", stats.step_seconds),
  );
  return box;
}

function modelSection(summary, stats) {
  const section = el("section", { class: "model", "data-model-id": summary.model_id });
  section.append(el("h2", {}, `${summary.name} v${summary.version}`), el("code", {}, summary.model_id));
  section.append(summaryTiles(stats), charts(stats));
  return section;
}

async function render() {
  const token = readToken();
  const windowSelect = document.getElementById("window");
  windowSelect.value = localStorage.getItem(WINDOW_KEY) || windowSelect.value;
  document.body.classList.toggle("signed-in", Boolean(token));
  if (!token) {
    setState("signed-out", "Sign in with an API key (or an access token) to see your models.");
    return;
  }
  const window_ = windowSelect.value;
  setState("loading", "Loading…");
  try {
    const overall = await getJSON(`/api/v1/stats?window=${encodeURIComponent(window_)}`, token);
    const models = overall.models.slice(0, MAX_MODELS);
    const perModel = await Promise.all(models.map((m) =>
      getJSON(`/api/v1/models/${m.model_id}/stats?window=${encodeURIComponent(window_)}`, token)));
    const overview = document.getElementById("overview");
    overview.replaceChildren(el("h2", {}, "All models"), summaryTiles(overall), charts(overall));
    document.getElementById("models").replaceChildren(...models.map((m, i) => modelSection(m, perModel[i])));
    const more = overall.models.length > MAX_MODELS ? ` (busiest ${MAX_MODELS} shown)` : "";
    setState("rendered", `${overall.models.length} model(s) with jobs in the last ${window_}${more}. ` +
             `Updated ${new Date().toLocaleTimeString()}.`);
  } catch (error) {
    if (error.status === 401) {
      localStorage.removeItem(TOKEN_KEY);
      document.body.classList.remove("signed-in");
      setState("signed-out", `Sign in again: ${error.message}`);
    } else {
      setState("error", `Could not load the stats: ${error.message}`);
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    localStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    render();
  });
  document.getElementById("signout").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    document.getElementById("overview").replaceChildren();
    document.getElementById("models").replaceChildren();
    render();
  });
  document.getElementById("window").addEventListener("change", (event) => {
    localStorage.setItem(WINDOW_KEY, event.target.value);
    render();
  });
  document.getElementById("refresh").addEventListener("click", render);
  setInterval(() => { if (document.visibilityState === "visible") render(); }, REFRESH_MS);
  render();
});
