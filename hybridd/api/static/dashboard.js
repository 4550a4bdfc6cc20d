// hybridd's dashboard: draws the status object pushed on /hybridd/v1/events. Plain JS, no build step, no library.
// Everything from the node (model names, reasons, peer names) goes in as text, never as HTML.
"use strict";

const GIB = 1024 ** 3;
const RECENT_SHOWN = 12;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "style") el.style.cssText = value;
    else el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function gib(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  if (bytes === 0) return "0 GiB";
  for (const [unit, size] of [["GiB", GIB], ["MiB", 1024 ** 2], ["KiB", 1024]]) {
    const value = bytes / size;
    if (value >= 1 || unit === "KiB") return (value >= 10 ? value.toFixed(0) : value.toFixed(1)) + " " + unit;
  }
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return Math.round(seconds * 1000) + " ms";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.round((seconds % 3600) / 60) + " min";
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], {hour12: false});
}

// One steady colour per model, so its engine reads the same in the bars and the tables.
function hue(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return (hash * 137) % 360;
}

function swatch(name) {
  return h("span", {class: "swatch", style: `--hue:${hue(name)}`});
}

function pill(text, kind) {
  return h("span", {class: `pill ${kind || text}`}, text);
}

function placementPill(placement) {
  if (!placement) return pill("none", "none");
  return pill(placement, placement.startsWith("peer:") ? "peer" : placement === "local" ? "local" : "offload");
}

function table(head, rows, empty) {
  if (!rows.length) return h("p", {class: "empty"}, empty);
  return h("table", {}, h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))), h("tbody", {}, rows));
}

function fill(id, ...content) {
  document.querySelector(`#${id} .body`).replaceChildren(...content.flat());
}

function deviceBar(device) {
  const total = Math.max(device.total_bytes, 1);
  const segment = (bytes, cls, title, style) =>
    bytes > 0 ? h("span", {class: `seg ${cls}`, title, style: `width:${(100 * bytes / total).toFixed(3)}%;${style || ""}`}) : null;
  const engineBytes = device.held.filter((held) => held.state === "ready").reduce((sum, held) => sum + held.bytes, 0);
  const pending = device.reserved_bytes - engineBytes;
  const legend = [];
  const parts = [
    segment(device.other_bytes, "other", `other programs: ${gib(device.other_bytes)}`),
    segment(device.display_reserve_bytes, "reserve", `display reserve: ${gib(device.display_reserve_bytes)}`),
  ];
  for (const held of device.held) {
    const loading = held.state !== "ready";
    parts.push(segment(held.bytes, loading ? "held pending" : "held",
      `${held.model} (${held.state || held.kind}): ${gib(held.bytes)}`, `--hue:${hue(held.model)}`));
    legend.push(h("span", {class: "key", "data-model": held.model}, swatch(held.model),
      `${held.model} ${gib(held.bytes)}${loading ? ` (${held.state || "reserved"})` : ""}`));
  }
  parts.push(segment(device.free_bytes, "free", `free: ${gib(device.free_bytes)}`));
  if (device.display_reserve_bytes) legend.push(h("span", {class: "key"}, h("span", {class: "swatch reserve"}), `display reserve ${gib(device.display_reserve_bytes)}`));
  if (device.other_bytes) legend.push(h("span", {class: "key"}, h("span", {class: "swatch other"}), `other programs ${gib(device.other_bytes)}`));
  legend.push(h("span", {class: "key"}, h("span", {class: "swatch free"}), `free ${gib(device.free_bytes)}`));
  const title = device.host ? "host RAM (offloaded layers)" : device.name;
  return h("div", {class: "device", "data-device": device.name},
    h("div", {class: "device-head"}, h("strong", {}, title),
      h("span", {class: "muted"}, [`${gib(engineBytes)} in engines`,
        pending > 0 ? `${gib(pending)} reserved for loads and jobs` : null,
        `${gib(device.free_bytes)} free of ${gib(device.total_bytes)}`].filter(Boolean).join(" · "))),
    h("div", {class: "bar"}, parts),
    h("div", {class: "legend"}, legend));
}

function drawDevices(status) {
  const devices = status.devices || [];
  fill("devices", devices.length ? devices.map(deviceBar) : h("p", {class: "empty"}, "no local devices (external models only)"));
}

// A load under way: its phase, and how much of the model is read where the engine can tell; else how long it took.
function loadCell(engine) {
  const load = engine.load;
  if (!load) return duration(engine.load_seconds);
  const fraction = load.bytes_total ? load.bytes_read / load.bytes_total : null;
  return h("span", {class: "loading", title: load.phase},
    fraction === null ? `${load.phase} ${duration(load.elapsed_s)}`
      : `${load.phase} ${(100 * fraction).toFixed(0)}% · ${duration(load.elapsed_s)}`);
}

function drawEngines(status) {
  const rows = [];
  for (const model of status.models || []) {
    const engines = model.engines.length ? model.engines : [null];
    for (const engine of engines) {
      const state = engine ? engine.state : model.state;
      rows.push(h("tr", {"data-model": model.name},
        h("td", {}, swatch(model.name), model.name),
        h("td", {}, engine ? placementPill(engine.placement) : h("span", {class: "muted"}, model.engine)),
        h("td", {}, pill(state)),
        h("td", {class: "num"}, engine && engine.ctx ? engine.ctx.toLocaleString() : "–"),
        h("td", {class: "num"}, engine ? `${engine.in_flight} / ${engine.waiting}` : "–"),
        h("td", {class: "num"}, engine && engine.idle_s !== null ? duration(engine.idle_s) : engine && engine.in_flight ? "busy" : "–"),
        h("td", {class: "num"}, engine ? engine.requests : model.requests),
        h("td", {class: "num"}, engine ? loadCell(engine) : "–")));
      if (engine && engine.last_error) rows.push(h("tr", {class: "error-row"}, h("td", {colspan: 8}, engine.last_error)));
    }
  }
  fill("engines", table(["model", "where", "state", "ctx", "running / waiting", "idle", "requests", "load"], rows, "no models configured"));
}

function drawPeers(status) {
  const rows = (status.peers || []).map((peer) => h("tr", {"data-peer": peer.name},
    h("td", {}, h("strong", {}, peer.name), h("div", {class: "muted small"}, peer.hardware || "")),
    h("td", {}, pill(peer.up ? "up" : "down"), peer.down_reason ? h("div", {class: "muted small"}, peer.down_reason) : null),
    h("td", {class: "num"}, peer.rtt_ms === null || peer.rtt_ms === undefined ? "–" : `${peer.rtt_ms.toFixed(1)} ms`),
    h("td", {class: "num"}, gib(peer.free_bytes)),
    h("td", {class: "num"}, peer.queue_depth ?? "–"),
    h("td", {}, (peer.models || []).join(", "))));
  fill("peers", table(["peer", "link", "RTT", "free", "queue", "models"], rows, "no peers: pair one with `hybridd pair`"));
}

function drawJobs(status) {
  const rows = (status.fine_tuning_jobs || []).map((job) => {
    const fraction = job.total_steps ? job.step / job.total_steps : 0;
    return h("tr", {"data-job": job.id},
      h("td", {}, h("code", {}, job.id)), h("td", {}, job.model), h("td", {}, pill(job.status)),
      h("td", {}, job.placement ? placementPill(job.placement) : "–"),
      h("td", {}, h("div", {class: "progress", title: `${job.step} of ${job.total_steps || "?"} steps`},
        h("span", {style: `width:${(100 * fraction).toFixed(1)}%`})),
        h("span", {class: "muted small"}, job.total_steps ? `${job.step} / ${job.total_steps}` : "starting")),
      h("td", {class: "reason"}, job.reason || ""));
  });
  fill("jobs", table(["job", "model", "status", "where", "progress", "why"], rows, "no fine-tuning jobs running"));
}

function drawRecent(status) {
  const recent = (status.recent || []).slice(-RECENT_SHOWN).reverse();
  const rows = recent.map((r) => h("tr", {class: r.status >= 400 ? "failed" : null, "data-model": r.model, "data-at": r.at},
    h("td", {class: "num"}, clock(r.at)),
    h("td", {}, swatch(r.model), r.model, h("div", {class: "muted small"}, r.api)),
    h("td", {}, placementPill(r.placement)),
    h("td", {class: "num"}, pill(String(r.status), r.status >= 400 ? "failed" : "ok")),
    h("td", {class: "num"}, duration(r.seconds),
      r.first_token_s !== null ? h("div", {class: "muted small"}, `first token ${duration(r.first_token_s)}`) : null),
    h("td", {class: "num"}, r.tokens ?? "–", r.tok_s ? h("div", {class: "muted small"}, `${r.tok_s} tok/s`) : null),
    h("td", {class: "reason"}, r.reason || "")));
  fill("recent", table(["time", "model", "placement", "status", "took", "tokens", "why"], rows,
    "no requests yet: this fills as requests are served"));
}

function draw(status) {
  document.getElementById("node").textContent = status.node;
  document.getElementById("version").textContent = `v${status.version} · pid ${status.pid} · ${location.host}`;
  document.getElementById("uptime").textContent = `up ${duration(status.uptime_s)}`;
  document.getElementById("warnings").replaceChildren(...(status.warnings || []).map((w) => h("div", {class: "warning"}, w)));
  drawDevices(status);
  drawEngines(status);
  drawPeers(status);
  drawJobs(status);
  drawRecent(status);
  document.body.dataset.updated = String(Date.now());
}

function connect() {
  const link = document.getElementById("link");
  const events = new EventSource("/hybridd/v1/events");
  events.addEventListener("status", (event) => {
    link.textContent = "live";
    link.className = "pill up";
    draw(JSON.parse(event.data));
  });
  events.addEventListener("error", () => {
    // EventSource reconnects by itself (after the server's retry: interval); say so meanwhile.
    link.textContent = "reconnecting";
    link.className = "pill down";
  });
}

connect();
