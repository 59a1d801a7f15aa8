// The console page: starts from the server's snapshot and applies each change the server
// sends (server-sent events from /events). Everything is drawn here: no library, no network
// beyond this console.
"use strict";

const board = { proplets: [], experiments: new Map(), rounds: new Map(), problem: "" };
let selected = null; // the experiment shown below: the newest one until a row is clicked
let pinned = false;
const SERIES = [
  ["train_loss", "train loss", (r) => r.train && r.train.loss],
  ["train_accuracy", "train accuracy", (r) => r.train && r.train.accuracy],
  ["eval_loss", "eval loss", (r) => r.eval && r.eval.loss],
  ["eval_accuracy", "eval accuracy", (r) => r.eval && r.eval.accuracy],
];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child === null || child === undefined ? "" : child);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "—";
}

function after(t, start) {
  // A time, and how long after the round started it was.
  if (!t) return "—";
  return start ? `${clock(t)} (+${(t - start).toFixed(2)}s)` : clock(t);
}

function number(x, digits) {
  return typeof x === "number" ? x.toFixed(digits) : "—";
}

function renderProplets() {
  const body = document.querySelector("#proplets tbody");
  const rows = board.proplets.map((p) =>
    el("tr", { "data-id": p.id, "data-alive": p.alive ? "yes" : "no" },
      el("td", {}, p.name || "—"),
      el("td", { class: "id" }, p.id),
      el("td", { class: p.alive ? "alive-yes" : "alive-no" }, p.alive ? "alive" : "gone"),
      el("td", {}, clock(p.last_seen)),
      el("td", { class: "num" }, String(p.task_count))));
  body.replaceChildren(...rows);
  const alive = board.proplets.filter((p) => p.alive).length;
  document.getElementById("alive-count").textContent = `${alive} alive of ${board.proplets.length}`;
}

function experimentsNewestFirst() {
  return [...board.experiments.values()].sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
}

function renderExperiments() {
  const body = document.querySelector("#experiments tbody");
  const list = experimentsNewestFirst();
  if (!pinned && list.length) selected = list[0].experiment_id;
  body.replaceChildren(...list.map((e) => {
    const planned = e.rounds_planned ? ` of ${e.rounds_planned}` : "";
    const end = e.end_reason ? `${e.end_reason.toLowerCase()} ${e.end_detail || ""}` : "";
    const row = el("tr", {
      class: "selectable" + (e.experiment_id === selected ? " selected" : ""),
      "data-experiment-id": e.experiment_id, "data-state": e.state },
      el("td", {}, e.experiment_id),
      el("td", { class: `state state-${e.state}` }, e.state),
      el("td", {}, `${e.current_round}${planned}`),
      el("td", {}, clock(e.created_at)),
      el("td", {}, end));
    row.addEventListener("click", () => { selected = e.experiment_id; pinned = true; render(); });
    return row;
  }));
}

function roundsOf(experimentId) {
  return [...board.rounds.values()]
    .filter((r) => r.experiment_id === experimentId)
    .sort((a, b) => (a.index || 0) - (b.index || 0) || (a.started_at || 0) - (b.started_at || 0));
}

function renderRounds(rounds) {
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren(...rounds.map((r) => el("tr", { "data-round-id": r.round_id, "data-state": r.state },
    el("td", { class: "num" }, r.index ? String(r.index) : "—"),
    el("td", {}, r.round_id),
    el("td", { class: `state state-${r.state}` }, r.state),
    el("td", { class: "num" }, `${r.num_updates ?? (r.reported || []).length}/${r.k_of_n ?? "?"}`),
    el("td", {}, clock(r.started_at)),
    el("td", {}, after(r.closed_at, r.started_at)),
    el("td", {}, after(r.completed_at, r.started_at)),
    el("td", {}, r.closed_by || (r.failure_reason ? `failed: ${r.failure_reason}` : "—")),
    el("td", { class: "num" }, r.new_model_version ? `v${r.new_model_version}` : "—"),
    ...SERIES.map(([, , pick]) => el("td", { class: "num" }, number(pick(r), 4))))));
}

function renderPlot(rounds) {
  const plot = document.getElementById("plot");
  const W = 640, H = 260, L = 44, R = 12, T = 12, B = 30;
  const points = [];
  for (const [key, , pick] of SERIES) {
    for (const r of rounds) {
      const y = pick(r);
      if (r.index && typeof y === "number" && Number.isFinite(y)) points.push({ key, x: r.index, y, round: r });
    }
  }
  const xmax = Math.max(1, ...rounds.map((r) => r.index || 0));
  const ymax = Math.max(1, ...points.map((p) => p.y));
  const px = (x) => L + (xmax === 1 ? (W - L - R) / 2 : ((x - 1) / (xmax - 1)) * (W - L - R));
  const py = (y) => H - B - (y / ymax) * (H - T - B);
  const nodes = [];
  for (let i = 0; i <= 4; i++) {
    const y = (ymax * i) / 4;
    nodes.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y) }));
    nodes.push(svg("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end" }, y.toFixed(2)));
  }
  nodes.push(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  nodes.push(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  const step = Math.max(1, Math.ceil(xmax / 12));
  for (let x = 1; x <= xmax; x += step) {
    nodes.push(svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle" }, String(x)));
  }
  nodes.push(svg("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle" }, "round"));
  for (const [key] of SERIES) {
    const mine = points.filter((p) => p.key === key);
    if (mine.length > 1) {
      const d = mine.map((p, i) => `${i ? "L" : "M"}${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join(" ");
      nodes.push(svg("path", { class: `line series-${key}${key.startsWith("eval") ? " eval" : ""}`, d }));
    }
    for (const p of mine) {
      const dot = svg("circle", { class: `series-${key}`, cx: px(p.x), cy: py(p.y), r: 3.5,
        "data-series": key, "data-round": p.x, "data-round-id": p.round.round_id, "data-value": p.y });
      dot.append(svg("title", {}, `round ${p.x} ${key.replace("_", " ")} ${p.y.toFixed(4)}`));
      nodes.push(dot);
    }
  }
  plot.replaceChildren(...nodes);
  const legend = document.getElementById("legend");
  legend.replaceChildren(...SERIES.filter(([key]) => points.some((p) => p.key === key))
    .map(([key, label]) => el("span", { class: `series-${key}` }, label)));
}

function render() {
  renderProplets();
  renderExperiments();
  document.getElementById("selected").textContent = selected || "—";
  const rounds = selected === null ? [] : roundsOf(selected);
  renderRounds(rounds);
  renderPlot(rounds);
  document.getElementById("problem").textContent = board.problem;
}

let pending = false;
function renderSoon() {
  // Many changes arrive together (a round's updates): draw once per frame.
  if (!pending) {
    pending = true;
    requestAnimationFrame(() => { pending = false; render(); });
  }
}

function connect() {
  const status = document.getElementById("status");
  const events = new EventSource("/events");
  events.addEventListener("snapshot", (e) => {
    const s = JSON.parse(e.data);
    board.proplets = s.proplets;
    board.experiments = new Map(s.experiments.map((x) => [x.experiment_id, x]));
    board.rounds = new Map(s.rounds.map((x) => [x.round_id, x]));
    board.problem = s.problem;
    status.textContent = "live";
    status.className = "status live";
    render();
  });
  events.addEventListener("proplets", (e) => { board.proplets = JSON.parse(e.data); renderSoon(); });
  events.addEventListener("experiment", (e) => {
    const x = JSON.parse(e.data);
    board.experiments.set(x.experiment_id, x);
    renderSoon();
  });
  events.addEventListener("round", (e) => {
    const x = JSON.parse(e.data);
    board.rounds.set(x.round_id, x);
    renderSoon();
  });
  events.addEventListener("problem", (e) => { board.problem = JSON.parse(e.data); renderSoon(); });
  events.onerror = () => {
    // EventSource reconnects by itself; the next snapshot replaces everything.
    status.textContent = "reconnecting";
    status.className = "status connecting";
  };
}

connect();
