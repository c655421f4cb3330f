// cargohold dashboard: reads the node's REST API (the same token as the CLI), follows the
// event stream, and refreshes every 2 s. No framework, no build step, nothing from outside.
"use strict";

const POLL_MS = 2000;
const TREND_POINTS = 150;
const state = {
  token: sessionStorage.getItem("cargohold-token") || "",
  role: "", node: "", volumes: [], nodes: [], rates: {},
  usedTrend: [], events: [], stream: null, timer: 0, refreshing: false, again: false,
};

// --- helpers -----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  for (const child of children) el.append(child);
  return el;
}

const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function rate(n) { return n >= 1 ? `${bytes(n)}/s` : "–"; }
function count(n) { return n >= 1000 ? `${(n / 1000).toFixed(1)}k` : String(Math.round(n)); }

function ago(seconds) {
  const d = new Date(seconds * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
                                    hour12: false });
}

function toast(text, error = false) {
  const el = h("div", { class: error ? "toast error" : "toast", role: "status" }, text);
  $("toasts").append(el);
  setTimeout(() => el.remove(), error ? 8000 : 4000);
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    signIn("The token was not accepted.");
    throw new ApiError(401, "unauthorized", "sign in first");
  }
  if (response.status === 204) return null;
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = answer.error || {};
    throw new ApiError(response.status, error.code || "error",
                       error.message || `${method} ${path}: HTTP ${response.status}`);
  }
  return answer;
}

// --- signing in --------------------------------------------------------------------------

function signIn(message) {
  stopAll();
  $("main").hidden = true;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  if (!$("login").open) $("login").showModal();
  $("token").focus();
}

async function start() {
  try {
    const me = await api("GET", "/v1/whoami");
    state.role = me.role;
    state.node = me.node;
  } catch (e) {
    if (e.status !== 401) toast(e.message, true);
    return;
  }
  if ($("login").open) $("login").close();
  document.body.classList.toggle("read-only", state.role !== "admin");
  $("role").textContent = state.role === "admin" ? "" : "read-only";
  $("node-name").textContent = `node ${state.node}`;
  $("sign-out").hidden = !state.token;
  $("main").hidden = false;
  follow();
  await refresh();
  state.timer = setInterval(refresh, POLL_MS);
}

function stopAll() {
  clearInterval(state.timer);
  state.timer = 0;
  if (state.stream) state.stream.abort();
  state.stream = null;
  setLive(false);
}

// --- data --------------------------------------------------------------------------------

async function refresh() {
  if (state.refreshing) { state.again = true; return; }
  state.refreshing = true;
  try {
    const [volumes, nodes] = await Promise.all([
      api("GET", "/v1/volumes?usage=true"), api("GET", "/v1/nodes")]);
    state.volumes = volumes;
    state.nodes = nodes;
    takeRates(nodes);
    render();
  } catch (e) {
    if (e.status !== 401) toast(`Refresh failed: ${e.message}`, true);
  } finally {
    state.refreshing = false;
    if (state.again) { state.again = false; setTimeout(refresh, 100); }
  }
}

function takeRates(nodes) {
  const rates = {};  // each node reports the volumes attached on it, per second
  for (const node of nodes.filter((n) => n.health === "up")) {
    for (const [name, r] of Object.entries(node.io || {})) {
      rates[name] = { iops: r.read_iops + r.write_iops, throughput: r.read_bytes + r.write_bytes };
    }
  }
  state.rates = rates;
}

function robustness(volume) {
  if (volume.in_sync === 0) return "faulted";
  return volume.in_sync >= volume.replica_count ? "healthy" : "degraded";
}

// --- rendering ---------------------------------------------------------------------------

function render() {
  const leader = state.nodes.find((n) => n.controller);
  $("controller").textContent = leader ? leader.name : "none";
  renderCapacity();
  renderHealth();
  renderVolumes();
  renderRebuilds();
  renderNodes();
}

function renderCapacity() {
  let capacity = 0, free = 0, used = 0, provisioned = 0;
  for (const node of state.nodes) {
    for (const s of node.data_servers) {
      capacity += s.capacity; free += s.free; used += s.used; provisioned += s.provisioned;
    }
  }
  const other = Math.max(0, capacity - free - used);  // the disks' other contents
  const chart = $("capacity-chart");
  chart.replaceChildren();
  const radius = 48, length = 2 * Math.PI * radius;
  let at = 0;
  const ring = (value, color, label) => {
    const share = capacity ? value / capacity : 0;
    const arc = svg("circle", {
      cx: 60, cy: 60, r: radius, fill: "none", stroke: color, "stroke-width": 16,
      "stroke-dasharray": `${share * length} ${length}`, "stroke-dashoffset": -at * length,
      transform: "rotate(-90 60 60)",
    });
    arc.append(svg("title", {}, document.createTextNode(`${label}: ${bytes(value)}`)));
    chart.append(arc);
    at += share;
  };
  chart.append(svg("circle", { cx: 60, cy: 60, r: radius, fill: "none", stroke: "#e7edf7",
                               "stroke-width": 16 }));
  ring(used, "#1f6feb", "used by replicas");
  ring(other, "#9db8ea", "other data on the disks");
  const centre = svg("text", { x: 60, y: 58, "text-anchor": "middle", "font-size": 16,
                               "font-weight": 700, fill: "#1b2330" });
  centre.textContent = capacity ? `${Math.round(100 * (capacity - free) / capacity)}%` : "–";
  const under = svg("text", { x: 60, y: 75, "text-anchor": "middle", "font-size": 10,
                              fill: "#667085" });
  under.textContent = "in use";
  chart.append(centre, under);

  const figures = $("capacity-figures");
  figures.replaceChildren(
    h("dt", {}, h("span", { class: "swatch used" }), "Used by volumes"), h("dd", {}, bytes(used)),
    h("dt", {}, h("span", { class: "swatch other" }), "Other data"), h("dd", {}, bytes(other)),
    h("dt", {}, h("span", { class: "swatch free" }), "Free"), h("dd", {}, bytes(free)),
    h("dt", {}, "Raw capacity"), h("dd", {}, bytes(capacity)),
  );
  const ratio = capacity ? provisioned / capacity : 0;
  $("provisioned-text").textContent = `${bytes(provisioned)} (${ratio.toFixed(2)}× capacity)`;
  const bar = $("provisioned-bar");
  bar.style.width = `${Math.min(100, ratio * 50)}%`;  // the bar's end: 2× capacity
  bar.className = `fill${ratio > 1.8 ? " bad" : ratio > 1.2 ? " warn" : ""}`;

  state.usedTrend.push(capacity - free);
  if (state.usedTrend.length > TREND_POINTS) state.usedTrend.shift();
  const trend = $("used-trend");
  trend.replaceChildren();
  const points = state.usedTrend;
  if (points.length > 1 && capacity) {  // share of the capacity in use, 0 at the bottom
    const path = points.map((v, i) =>
      `${(i / (TREND_POINTS - 1)) * 300},${38 - (v / capacity) * 36}`).join(" ");
    trend.append(svg("polyline", { points: path, fill: "none", stroke: "#1f6feb",
                                   "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }));
  }
}

function renderHealth() {
  const counts = { healthy: 0, degraded: 0, faulted: 0 };
  for (const v of state.volumes) counts[robustness(v)]++;
  for (const [key, n] of Object.entries(counts)) {
    $(`count-${key}`).textContent = n;
    $(`count-${key}`).parentElement.classList.toggle("zero", n === 0);
  }
  const servers = state.nodes.flatMap((n) => n.data_servers);
  $("count-nodes").textContent = `${state.nodes.filter((n) => n.health === "up").length}/${state.nodes.length}`;
  $("count-servers").textContent = `${servers.filter((s) => s.health === "up").length}/${servers.length}`;
  const iops = Object.values(state.rates).reduce((sum, r) => sum + r.iops, 0);
  $("count-iops").textContent = count(iops);
}

function serverNames() {
  const names = {};
  for (const node of state.nodes) {
    node.data_servers.forEach((s, i) => { names[s.id] = `${node.name}/${i + 1}`; });
  }
  return names;
}

function renderVolumes() {
  const filter = $("filter").value.trim().toLowerCase();
  const names = serverNames();
  const body = $("volumes").tBodies[0];
  const rows = state.volumes
    .filter((v) => !filter || v.name.toLowerCase().includes(filter))
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((v) => volumeRow(v, names));
  body.replaceChildren(...rows);
  $("no-volumes").hidden = state.volumes.length > 0;
}

function volumeRow(v, names) {
  const health = robustness(v);
  const r = state.rates[v.name];
  const usedShare = v.used !== null && v.used !== undefined ? v.used / v.size : null;
  const fill = h("div", { class: "fill" });
  if (usedShare !== null) fill.style.width = `${Math.min(100, usedShare * 100)}%`;
  const chips = v.replicas.map((rep) => h("span", {
    class: "chip", title: `${rep.state}${rep.reason ? `: ${rep.reason}` : ""}` },
    h("span", { class: `dot ${rep.state}` }), names[rep.server] || rep.server.slice(0, 8)));
  const flags = [];
  if (v.encryption) flags.push("encrypted");
  if (v.origin) flags.push(`clone filling ${Math.round(100 * v.filled)}%`);
  if (v.restoring) flags.push("restoring");
  if (v.standby) flags.push("standby");
  return h("tr", { dataset: { volume: v.name } },
    h("td", { class: "name" }, v.name, flags.length ? h("div", { class: "sub" }, flags.join(" · ")) : null,
      h("div", { class: "sub" }, v.fs)),
    h("td", {}, h("span", { class: `badge ${v.state}`, dataset: { field: "state" } }, v.state)),
    h("td", {}, h("span", { class: `badge ${health}`, dataset: { field: "health" } }, health)),
    h("td", {}, h("div", { class: "chips" }, chips),
      h("div", { class: "sub" }, `${v.in_sync} of ${v.replica_count} in sync`)),
    h("td", {}, v.attachment ? v.attachment.node : h("span", { class: "sub" }, "–")),
    h("td", { class: "num" }, bytes(v.size)),
    h("td", { class: "use" }, usedShare === null ? "–" :
      [`${bytes(v.used)} `, h("span", { class: "sub" }, `${Math.round(usedShare * 100)}%`),
       h("div", { class: "bar" }, fill)]),
    h("td", { class: "num", dataset: { field: "iops" } }, r ? count(r.iops) : "–"),
    h("td", { class: "num", dataset: { field: "throughput" } }, r ? rate(r.throughput) : "–"),
    h("td", { class: "actions admin-only" }, actions(v)),
  );
}

function actions(v) {
  const out = [];
  if (v.state === "detached") {
    out.push(h("button", { class: "small", type: "button", onclick: () => act(v, "attach") }, "Attach"));
  } else if (v.state === "attached") {
    out.push(h("button", { class: "small", type: "button", onclick: () => act(v, "detach") }, "Detach"));
  }
  out.push(
    h("button", { class: "small", type: "button", onclick: () => resize(v) }, "Resize"),
    h("button", { class: "small", type: "button", onclick: () => snapshot(v) }, "Snapshot"),
    h("button", { class: "small", type: "button", onclick: () => backup(v) }, "Backup"),
    h("button", { class: "small danger", type: "button", onclick: () => remove(v) }, "Delete"),
  );
  return out;
}

function renderRebuilds() {
  const names = serverNames();
  const items = [];
  for (const v of state.volumes) {
    for (const rep of v.replicas) {
      if (rep.state === "in_sync") continue;
      const what = rep.replaces ? "rebuild" : rep.state === "resyncing" ? "resync" : "out of sync";
      const bar = h("progress", { max: 1, value: rep.progress || 0 });
      items.push(h("li", { class: "rebuild", dataset: { volume: v.name, server: rep.server } },
        h("div", { class: "label" },
          h("span", {}, h("b", {}, v.name), ` on ${names[rep.server] || rep.server.slice(0, 8)} · ${what}`),
          h("span", { dataset: { field: "progress" } }, `${Math.round(100 * (rep.progress || 0))}%`)),
        bar,
        rep.reason ? h("span", { class: "sub" }, rep.reason) : null));
    }
  }
  $("rebuilds").replaceChildren(...items);
  $("no-rebuilds").hidden = items.length > 0;
}

function renderNodes() {
  const boxes = state.nodes.map((node) => h("div", { class: "node", dataset: { node: node.name } },
    h("header", {},
      h("span", {}, h("b", {}, node.name), node.controller ? h("span", { class: "sub" }, " · controller") : null,
        node.draining ? h("span", { class: "sub" }, " · draining") : null),
      h("span", { class: `badge ${node.health}` }, node.health)),
    h("table", {}, h("tbody", {}, node.data_servers.map((s, i) => {
      const fill = h("div", { class: "fill" });
      const share = s.capacity ? (s.capacity - s.free) / s.capacity : 0;
      fill.style.width = `${share * 100}%`;
      if (share > 0.9) fill.className = "fill bad"; else if (share > 0.75) fill.className = "fill warn";
      const errors = (s.io_errors || 0) + (s.checksum_errors || 0);
      return h("tr", { dataset: { server: s.id } },
        h("td", {}, `${node.name}/${i + 1}`, h("div", { class: "sub" }, s.path)),
        h("td", {}, h("span", { class: `badge ${s.health}` }, s.health)),
        h("td", { class: "use" }, `${bytes(s.capacity - s.free)} of ${bytes(s.capacity)}`, h("div", { class: "bar" }, fill)),
        h("td", { class: "num" }, errors ? h("span", { class: "error", title: `${s.io_errors} I/O errors, ${s.checksum_errors} checksum errors (${s.checksum_repaired} repaired)` }, `${errors} errors`) : h("span", { class: "sub" }, "no errors")));
    })))));
  $("nodes").replaceChildren(...boxes);
}

// --- events ------------------------------------------------------------------------------

function setLive(on) {
  $("live").classList.toggle("off", !on);
  $("live").textContent = on ? "live" : "offline";
}

async function follow() {
  const controller = new AbortController();
  state.stream = controller;
  const headers = state.token ? { authorization: `Bearer ${state.token}` } : {};
  try {
    const response = await fetch("/v1/events", { headers, signal: controller.signal });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    setLive(true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        if (line.trim()) showEvent(JSON.parse(line));
      }
    }
  } catch (e) {
    if (controller.signal.aborted) return;
  }
  setLive(false);
  if (state.stream === controller) setTimeout(() => { if (state.stream === controller) follow(); }, 2000);
}

function showEvent(event) {
  if (event.kind === "stream") return;
  const item = h("li", { class: "fresh", dataset: { kind: event.kind, event: event.event } },
    h("time", {}, ago(event.time)), h("span", { class: "kind" }, event.kind), h("span", {}, event.message));
  const list = $("events");
  list.prepend(item);
  while (list.children.length > 200) list.lastChild.remove();
  refresh();  // what changed shows at once, not at the next poll
}

// --- actions -----------------------------------------------------------------------------

async function act(volume, verb) {
  try {
    await api("POST", `/v1/volumes/${encodeURIComponent(volume.name)}/${verb}`);
    toast(`${volume.name}: ${verb === "attach" ? "attached" : "detached"}`);
  } catch (e) { toast(e.message, true); }
  refresh();
}

function ask({ title, text, label, value = "", ok = "OK", danger = false, check }) {
  return new Promise((resolve) => {
    const dialog = $("ask");
    $("ask-title").textContent = title;
    $("ask-text").textContent = text || "";
    $("ask-label").hidden = !label;
    $("ask-label").querySelector("span").textContent = label || "";
    const input = $("ask-input");
    input.value = value;
    const button = $("ask-ok");
    button.textContent = ok;
    button.className = danger ? "primary danger-fill" : "primary";
    const error = dialog.querySelector(".error");
    error.hidden = true;
    const onClose = () => {
      dialog.removeEventListener("close", onClose);
      resolve(dialog.returnValue === "ok" ? input.value.trim() : null);
    };
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    if (label) input.focus();
    button.onclick = (e) => {
      const problem = check ? check(input.value.trim()) : "";
      if (problem) { e.preventDefault(); error.textContent = problem; error.hidden = false; }
    };
  });
}

async function resize(v) {
  const size = await ask({ title: `Resize ${v.name}`, text: `Now ${bytes(v.size)}. Volumes only grow; an attached one grows online.`,
                           label: "New size (e.g. 4G)", value: "", ok: "Resize" });
  if (!size) return;
  try {
    await api("POST", `/v1/volumes/${encodeURIComponent(v.name)}/resize`, { size });
    toast(`${v.name}: resized to ${size}`);
  } catch (e) { toast(e.message, true); }
  refresh();
}

async function snapshot(v) {
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const name = await ask({ title: `Snapshot of ${v.name}`, text: "Crash-consistent; a mounted file system is frozen for the cut.",
                           label: "Snapshot name", value: `ui-${stamp}`, ok: "Take snapshot" });
  if (!name) return;
  try {
    await api("POST", `/v1/volumes/${encodeURIComponent(v.name)}/snapshots`, { name });
    toast(`${v.name}@${name} taken`);
  } catch (e) { toast(e.message, true); }
}

async function backup(v) {
  const yes = await ask({ title: `Back up ${v.name}`, text: "A snapshot is taken now and sent to the backup target; the volume stays in use.", ok: "Start backup" });
  if (yes === null) return;
  try {
    const job = await api("POST", "/v1/backups", { volume: v.name });
    toast(`Backup of ${v.name} started (job ${job.id})`);
  } catch (e) { toast(e.message, true); }
}

async function remove(v) {
  const typed = await ask({ title: `Delete ${v.name}?`, danger: true, ok: "Delete",
                            text: `Its data on every replica is deleted and cannot be brought back. Type the volume's name to confirm.`,
                            label: "Volume name", check: (t) => (t === v.name ? "" : `Type ${v.name} to confirm`) });
  if (typed !== v.name) return;
  try {
    await api("DELETE", `/v1/volumes/${encodeURIComponent(v.name)}`);
    toast(`${v.name} deleted`);
  } catch (e) { toast(e.message, true); }
  refresh();
}

function createVolume() {
  const dialog = $("create");
  const form = $("create-form");
  form.reset();
  const error = form.querySelector(".error");
  error.hidden = true;
  dialog.returnValue = "";
  dialog.showModal();
  form.elements.name.focus();
}

async function submitCreate(event) {
  const form = $("create-form");
  if (event.submitter && event.submitter.value === "cancel") return;
  event.preventDefault();
  const error = form.querySelector(".error");
  const f = form.elements;
  try {
    await api("POST", "/v1/volumes", { name: f.name.value.trim(), size: f.size.value.trim(),
                                        replicas: Number(f.replicas.value), fs: f.fs.value,
                                        encrypt: f.encrypt.checked });
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    return;
  }
  $("create").close("ok");
  toast(`${f.name.value.trim()} created`);
  refresh();
}

// --- wiring ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("cargohold-token", state.token);
    start();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem("cargohold-token");
    state.token = "";
    signIn("");
  });
  $("new-volume").addEventListener("click", createVolume);
  $("create-form").addEventListener("submit", submitCreate);
  $("filter").addEventListener("input", renderVolumes);
  start();
});
