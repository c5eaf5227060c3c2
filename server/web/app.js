// The fedgrpc dashboard: draws the server's /api/state snapshot, and again whenever the
// /api/events stream sends a newer one. Everything a client sent (metric names, messages) is
// put on the page as text (textContent), never parsed as markup.
"use strict";

const STRIP_MAX_SECONDS = 300; // the client strips show the run so far, at most its last five minutes
const STRIP_MIN_SECONDS = 10;
let charts = null;
let lastSnapshot = null;
let unit = "round"; // "version" under --mode fedbuff (the snapshot's run.mode)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 90) return `${value.toFixed(0)} s`;
  if (value < 5400) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];

// The unit that shows `largest` bytes with at most three digits before the point (1 KB = 1000 B).
function byteUnit(largest) {
  let power = 0;
  while (power < BYTE_UNITS.length - 1 && Math.abs(largest) >= 1000 ** (power + 1)) power += 1;
  return power;
}

// Tick labels of a bytes axis: one unit for the whole axis, as many decimals as the ticks' spacing needs.
function byteTicks(chart, splits) {
  const finite = splits.filter((v) => Number.isFinite(v));
  if (!finite.length) return splits.map(() => "");
  const power = byteUnit(Math.max(...finite.map(Math.abs)));
  const scale = 1000 ** power;
  const step = finite.length > 1 ? Math.abs(finite[1] - finite[0]) / scale : 1;
  const decimals = power === 0 ? 0 : Math.min(3, Math.max(0, Math.ceil(-Math.log10(step))));
  return splits.map((v) => (Number.isFinite(v) ? `${(v / scale).toFixed(decimals)} ${BYTE_UNITS[power]}` : ""));
}

function makeChart(id, series, yLabel, yValues) {
  const target = document.getElementById(id);
  target.replaceChildren();
  const y = { label: yLabel, size: 60 };
  if (yValues) y.values = yValues;
  const options = {
    width: Math.max(380, target.clientWidth || 420),
    height: 220,
    scales: { x: { time: false } },
    legend: { live: false },
    axes: [{ label: unit, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] }, y],
    series: [{ label: unit }, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { show: true } }))],
  };
  return new uPlot(options, [[], ...series.map(() => [])], target);
}

const CHARTS = ["metric", "loss", "bytes", "seconds", "staleness"];
const SOURCES = [["central", "#4c78a8"], ["federated", "#f58518"], ["personalized", "#54a24b"]];

function setupCharts(main) {
  const title = main === "accuracy" ? "Accuracy" : main;
  document.getElementById("metric-title").textContent = `${title} by ${unit}`;
  setText("loss-title", `Loss by ${unit}`);
  setText("seconds-title", `${unit === "version" ? "Version" : "Round"} duration (s)`);
  return {
    main,
    metric: makeChart("chart-metric", SOURCES, main),
    loss: makeChart("chart-loss", SOURCES, "loss"),
    bytes: makeChart("chart-bytes", [["up", "#54a24b"], ["down", "#4c78a8"]], "bytes", byteTicks),
    seconds: makeChart("chart-seconds", [[unit, "#b279a2"]], "s"),
    staleness: makeChart("chart-staleness", [["mean", "#4c78a8"], ["max", "#e45756"]], "versions"),
  };
}

function value(metrics, name) {
  return metrics && typeof metrics[name] === "number" ? metrics[name] : null;
}

// The main metric is known once a round has been evaluated; until then the charts say accuracy,
// and they are drawn again under the right name when it comes (a task's macro-F1, say).
function drawCharts(rounds) {
  const main = rounds.length ? rounds[rounds.length - 1].main : "accuracy";
  if (!charts || charts.main !== main) {
    if (charts) for (const name of CHARTS) charts[name].destroy();
    charts = setupCharts(main);
  }
  const x = rounds.map((r) => r.round);
  const bySource = (name) => [x, rounds.map((r) => value(r.central, name)), rounds.map((r) => value(r.federated, name)),
    rounds.map((r) => value(r.federated, "personalized_" + name))];
  charts.metric.setData(bySource(main));
  charts.loss.setData(bySource("loss"));
  charts.bytes.setData([x, rounds.map((r) => r.bytes_in), rounds.map((r) => r.bytes_out)]);
  const largest = Math.max(0, ...rounds.map((r) => Math.max(r.bytes_in, r.bytes_out)));
  setText("bytes-title", `Bytes per round (${BYTE_UNITS[byteUnit(largest)]})`);
  charts.seconds.setData([x, rounds.map((r) => r.seconds)]);
  // --mode fedbuff: how stale each version's updates were (versions between training and buffer)
  const stale = rounds.map((r) => r.staleness || []);
  charts.staleness.setData([x, stale.map((s) => (s.length ? s.reduce((a, b) => a + b, 0) / s.length : null)),
    stale.map((s) => (s.length ? Math.max(...s) : null))]);
  return main;
}

// "fedavgm (server_lr 0.1, momentum 0.9)"
function strategyText(strategy) {
  if (!strategy) return "-";
  const parameters = Object.entries(strategy).filter(([key]) => key !== "name")
    .map(([key, v]) => `${key} ${key === "digest" ? String(v).slice(0, 12) : v}`);
  return parameters.length ? `${strategy.name} (${parameters.join(", ")})` : String(strategy.name);
}

function stripWindow(clients, now) {
  let earliest = now;
  for (const client of clients.listed) for (const span of client.timeline) earliest = Math.min(earliest, span.start);
  return Math.min(STRIP_MAX_SECONDS, Math.max(STRIP_MIN_SECONDS, now - earliest));
}

function drawClients(clients, now) {
  const box = document.getElementById("clients");
  box.replaceChildren();
  const STRIP_SECONDS = stripWindow(clients, now);
  const header = el("div", "client-row header");
  for (const name of ["client", "state", "address", "last seen", `last ${STRIP_SECONDS.toFixed(0)} s`]) header.append(el("span", "", name));
  box.append(header);
  for (const client of clients.listed) {
    const row = el("div", "client-row");
    row.dataset.client = client.id;
    row.append(el("span", "", client.id), el("span", `state ${client.state}`, client.state), el("span", "muted", client.address),
      el("span", "muted", client.last_seen_s === null ? "-" : `${client.last_seen_s} s ago`));
    const strip = el("div", "strip");
    for (const span of client.timeline) {
      const end = span.end === null ? now : span.end;
      if (end < now - STRIP_SECONDS) continue;
      const left = Math.max(0, (span.start - (now - STRIP_SECONDS)) / STRIP_SECONDS) * 100;
      const width = Math.max(0.4, ((end - Math.max(span.start, now - STRIP_SECONDS)) / STRIP_SECONDS) * 100);
      const bar = el("span", span.kind);
      bar.style.left = `${left}%`;
      bar.style.width = `${width}%`;
      bar.title = `${unit} ${span.round}: ${span.kind} ${(end - span.start).toFixed(1)} s`;
      strip.append(bar);
    }
    row.append(strip);
    box.append(row);
  }
  const counts = Object.entries(clients.by_state).map(([state, n]) => `${n} ${state}`).join(", ");
  const more = clients.total > clients.listed.length ? ` (first ${clients.listed.length} listed)` : "";
  setText("client-counts", `${clients.total} seen: ${counts}${more}`);
}

function drawRefusals(refusals) {
  const body = document.querySelector("#refusals tbody");
  body.replaceChildren();
  for (const r of refusals.recent) {
    const row = el("tr");
    row.append(el("td", "", new Date(r.time * 1000).toLocaleTimeString()), el("td", "", r.address), el("td", "", r.code),
      el("td", "", r.what), el("td", "message", r.message));
    body.append(row);
  }
  const total = Object.values(refusals.by_code).reduce((a, b) => a + b, 0);
  setText("refused", total);
  setText("refusal-counts", Object.entries(refusals.by_code).map(([code, n]) => `${n} ${code}`).join(", "));
}

function when(time) {
  const format = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  return time ? new Date(time * 1000).toLocaleString([], format) : "-";
}

// One cell's list: a line per item, each put on the page as text.
function lines(className, items) {
  const cell = el("td", className);
  for (const item of items) cell.append(el("div", "", item));
  if (!items.length) cell.append(el("span", "muted", "-"));
  return cell;
}

// Under fl-server --federation: the sites that announced themselves, and the jobs.
function drawFederation(fed) {
  const sites = document.querySelector("#sites tbody");
  sites.replaceChildren();
  for (const site of fed.sites) {
    const row = el("tr");
    row.dataset.site = site.client_id;
    const status = site.online ? "online" : "offline";
    row.append(el("td", "", `client ${site.client_id}`), el("td", `state ${status}`, `${status} (${seconds(site.last_seen_s)} ago)`),
      el("td", "", site.version), el("td", "muted", site.address),
      lines("tasks", site.tasks.map((t) => `${t.name} ${String(t.digest).slice(0, 12)}`)),
      lines("policy", Object.entries(site.policy).map(([key, v]) => `${key} = ${v}`)));
    sites.append(row);
  }
  const online = fed.sites.filter((site) => site.online).length;
  setText("fed-online", `${online} / ${fed.sites.length}`);
  setText("site-counts", `${fed.sites.length} announced, ${online} online`);
  const jobs = document.querySelector("#jobs tbody");
  jobs.replaceChildren();
  const count = (state) => fed.jobs.filter((job) => job.state === state).length;
  for (const job of [...fed.jobs].reverse()) {  // newest first
    const row = el("tr");
    row.dataset.job = job.id;
    const state = el("td", `state ${job.state}`, job.state);
    if (job.detail) state.append(el("div", "muted", job.detail));
    row.append(el("td", "", job.id), el("td", "", job.name), el("td", "", job.task), state,
      el("td", "", `${job.rounds_done} / ${job.rounds}`), el("td", "", `${when(job.submitted_at)} by ${job.submitted_by}`),
      el("td", "", when(job.started_at)), el("td", "", when(job.ended_at)),
      lines("message", job.withdrawals.map((w) => `client ${w.client_id}: ${w.reason}`)));
    jobs.append(row);
  }
  setText("fed-queued", count("queued"));
  setText("fed-running", fed.running || "none");
  setText("fed-ended", count("finished") + count("failed") + count("stopped"));
  setText("job-counts", `${fed.total_jobs} in all${fed.total_jobs > fed.jobs.length ? ` (the last ${fed.jobs.length} listed)` : ""}: ${count("finished")} finished, ${count("failed")} failed, ${count("stopped")} stopped`);
}

// #federation or #run: which view is shown (the federation's, where there is one, by default).
function showView() {
  const federation = Boolean(lastSnapshot && lastSnapshot.federation) && location.hash !== "#run";
  document.getElementById("federation-view").hidden = !federation;
  document.getElementById("run-view").hidden = federation;
  document.getElementById("tab-federation").className = federation ? "current" : "";
  document.getElementById("tab-run").className = federation ? "" : "current";
  if (!federation && charts) for (const name of CHARTS) charts[name].setSize({ width: Math.max(380, charts[name].root.parentNode.clientWidth || 420), height: 220 });
}

function draw(snapshot) {
  if (lastSnapshot && snapshot.version < lastSnapshot.version) return;
  lastSnapshot = snapshot;
  if (snapshot.federation) {
    document.getElementById("views").hidden = false;
    drawFederation(snapshot.federation);
    showView();
  }
  const run = snapshot.run, state = snapshot.state;
  document.getElementById("no-run").hidden = Boolean(run);
  if (!run) {
    setText("run", "federation · no job running");
    return;
  }
  if (unit !== (run.mode === "fedbuff" ? "version" : "round")) {  // fedbuff: a version line, not rounds
    unit = run.mode === "fedbuff" ? "version" : "round";
    if (charts) for (const name of CHARTS) charts[name].destroy();
    charts = null;
    setText("round-label", unit);
    setText("in-round-label", `time in ${unit}`);
    document.getElementById("staleness-box").hidden = unit !== "version";
  }
  setText("run", `run ${run.run_id} · task ${run.task} · ${run.clients} clients · strategy ${strategyText(run.strategy)}`
    + `${run.secagg ? " · secure aggregation" : ""} · partition ${run.partition} · compression ${run.compression}`);
  setText("phase", state.phase);
  setText("round", `${state.round} / ${run.rounds}`);
  setText("in-round", state.phase === "finished" ? "-" : seconds(state.time_in_round_s));
  setText("eta", seconds(state.eta_s));
  const main = drawCharts(snapshot.rounds);
  const last = snapshot.rounds[snapshot.rounds.length - 1];
  const shown = last ? value(last.central, main) ?? value(last.federated, main) : null;
  setText("main-label", main);
  setText("main", shown === null ? "-" : shown.toFixed(4));
  drawClients(snapshot.clients, snapshot.now);
  drawRefusals(snapshot.refusals);
}

function live(on) {
  const badge = document.getElementById("live");
  badge.textContent = on ? "live" : "offline";
  badge.className = `badge ${on ? "on" : "off"}`;
}

async function start() {
  try {
    const reply = await fetch("/api/state", { cache: "no-store" });
    draw(await reply.json());
  } catch (error) {
    live(false);
  }
  const events = new EventSource("/api/events");
  events.onopen = () => live(true);
  events.onerror = () => live(false);
  events.onmessage = (message) => draw(JSON.parse(message.data));
}

window.addEventListener("hashchange", showView);
start();
