// The residents' page: the house by room, live over Server-Sent Events, commands as JSON.
"use strict";

const $ = (id) => document.getElementById(id);
let me = null;

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  return { status: response.status, data };
}

function show(signedIn) {
  $("signin").hidden = signedIn;
  $("house").hidden = !signedIn;
  $("logout").hidden = !signedIn;
}

function stateText(state) {
  if (state === null || state === undefined) return "no state yet";
  if (typeof state !== "object") return String(state);
  return Object.entries(state).map(([k, v]) => `${k}: ${v}`).join(", ");
}

function setAvailability(el, online) {
  el.textContent = online === true ? "online" : online === false ? "offline" : "never seen";
  el.className = "availability " + (online === true ? "online" : "offline");
}

function deviceRow(d) {
  const row = document.createElement("div");
  row.className = "device";
  row.dataset.device = d.id;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = d.id;
  const state = document.createElement("span");
  state.className = "state";
  state.textContent = stateText(d.state);
  const availability = document.createElement("span");
  setAvailability(availability, d.online);
  row.append(name, state, availability);
  if (d.kind === "light") {
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.id = `switch-${d.id}`;
    toggle.checked = !!(d.state && d.state.on);
    const label = document.createElement("label");
    label.htmlFor = toggle.id;
    label.textContent = "On";
    toggle.addEventListener("change", () => api("POST", `/api/devices/${d.id}/set`, { on: toggle.checked }));
    const dim = document.createElement("input");
    dim.type = "range";
    dim.min = 0;
    dim.max = 255;
    dim.value = (d.state && d.state.brightness) || 255;
    dim.setAttribute("aria-label", `Brightness of ${d.id}`);
    dim.addEventListener("change", () => api("POST", `/api/devices/${d.id}/set`, { brightness: Number(dim.value) }));
    row.append(label, toggle, dim);
  }
  return row;
}

function renderHouse(house) {
  $("title").textContent = house.house;
  const rooms = new Map(house.rooms.map((r) => [r.id, { name: r.name, devices: [] }]));
  rooms.set(null, { name: "Elsewhere", devices: [] });
  for (const d of house.devices) (rooms.get(d.room) || rooms.get(null)).devices.push(d);
  const list = $("room-list");
  list.replaceChildren();
  for (const room of rooms.values()) {
    if (room.devices.length === 0) continue;
    const box = document.createElement("div");
    box.className = "room";
    const h = document.createElement("h3");
    h.textContent = room.name;
    box.append(h, ...room.devices.map(deviceRow));
    list.append(box);
  }
  const scenes = $("scene-list");
  scenes.replaceChildren(...house.scenes.map((id) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = id;
    b.addEventListener("click", () => api("POST", `/api/scenes/${id}`, {}));
    return b;
  }));
  setAlarm(house.alarm);
  $("event-list").replaceChildren();
  for (const e of (house.recent || []).slice().reverse()) addEvent(`${e.at}: ${e.detail}`);
}

function setAlarm(alarm) {
  if (!alarm) return;
  $("alarm-state").textContent = alarm.state.replace("_", " ");
  if (alarm.code_locked_out !== undefined) {
    $("alarm-lockout").hidden = !alarm.code_locked_out;
    if (alarm.locked_until) {
      const until = new Date(alarm.locked_until).toLocaleTimeString();
      $("alarm-lockout").textContent = `Code entry is locked after too many wrong codes, until ${until}.`;
    }
  }
}

function addEvent(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("event-list").prepend(li);
  while ($("event-list").children.length > 30) $("event-list").lastChild.remove();
}

function live() {
  const events = new EventSource("/api/events");
  events.onmessage = (m) => {
    const { topic, payload } = JSON.parse(m.data);
    const [, id, leaf] = topic.split("/");
    if (topic === "dpi/alarm/state") { setAlarm(payload); return; }
    if (topic === "dpi/alarm/event") {
      const who = payload.user || payload.device || "";
      addEvent(`${payload.at}: ${payload.event} ${who} — ${payload.reason}`);
      if (payload.event === "code_lockout") refreshAlarm();
      $("alarm-message").textContent = `${payload.event}: ${payload.reason}`;
      return;
    }
    const row = document.querySelector(`.device[data-device="${CSS.escape(id)}"]`);
    if (!row) return;
    if (leaf === "state") {
      row.querySelector(".state").textContent = stateText(payload);
      const toggle = row.querySelector("input[type=checkbox]");
      if (toggle && typeof payload === "object" && "on" in payload) toggle.checked = payload.on;
    } else if (leaf === "availability") {
      setAvailability(row.querySelector(".availability"), payload === "online");
    }
  };
}

async function refreshAlarm() {
  $("alarm-lockout").hidden = false;
  const house = await api("GET", "/api/house");
  if (house.data) setAlarm(house.data.alarm);
}

async function admin() {
  $("admin").hidden = false;
  const users = await api("GET", "/api/users");
  $("user-list").replaceChildren(...(users.data ? users.data.users : []).map((u) => {
    const li = document.createElement("li");
    li.textContent = `${u.name} (${u.role}${u.has_code ? ", has a code" : ""}) `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = `Remove ${u.name}`;
    remove.addEventListener("click", async () => { await api("DELETE", `/api/users/${u.name}`); admin(); });
    const code = document.createElement("input");
    code.type = "password";
    code.inputMode = "numeric";
    code.setAttribute("aria-label", `New alarm code for ${u.name}`);
    const set = document.createElement("button");
    set.type = "button";
    set.textContent = `Set ${u.name}'s code`;
    set.addEventListener("click", async () => {
      const r = await api("POST", `/api/users/${u.name}/pin`, { code: code.value });
      code.value = "";
      $("creds").textContent = r.status === 200 ? `${u.name}'s code is set.` : (r.data && r.data.error) || "refused";
      admin();
    });
    li.append(remove, code, set);
    return li;
  }));
  const house = await api("GET", "/api/house");
  $("device-admin").replaceChildren(...house.data.devices.map((d) => {
    const li = document.createElement("li");
    li.textContent = `${d.id} `;
    const issue = document.createElement("button");
    issue.type = "button";
    issue.textContent = `New password for ${d.id}`;
    issue.addEventListener("click", async () => {
      const r = await api("POST", `/api/devices/${d.id}/creds`, {});
      $("creds").textContent = r.data && r.data.password ? `${d.id}: password ${r.data.password} (shown once)` : "refused";
    });
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.textContent = `Revoke ${d.id}`;
    revoke.addEventListener("click", () => api("POST", `/api/devices/${d.id}/revoke`, {}));
    li.append(issue, revoke);
    return li;
  }));
  const status = await api("GET", "/api/status");
  $("hub-status").textContent = JSON.stringify(status.data, null, 1);
}

async function start() {
  const house = await api("GET", "/api/house");
  if (house.status === 401) { show(false); return; }
  show(true);
  me = house.data.me;
  renderHouse(house.data);
  live();
  if (me && me.role === "admin") admin();
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await api("POST", "/api/login", { user: $("user").value, password: $("password").value });
    if (r.status === 200) { $("password").value = ""; start(); }
    else $("signin-error").textContent = r.status === 401 ? "Wrong user name or password." : "Sign-in failed; try again.";
  });
  $("logout").addEventListener("click", async () => { await api("POST", "/api/logout", {}); location.reload(); });
  for (const b of document.querySelectorAll("#keypad button")) {
    b.addEventListener("click", async () => {
      const body = { action: b.dataset.action };
      if ($("code").value) body.code = $("code").value;
      $("code").value = "";
      const r = await api("POST", "/api/alarm", body);
      if (r.status !== 202) $("alarm-message").textContent = (r.data && r.data.error) || "refused";
    });
  }
  $("add-user").addEventListener("submit", async (e) => {
    e.preventDefault();
    await api("POST", "/api/users", { name: $("new-name").value, role: $("new-role").value, password: $("new-password").value });
    admin();
  });
  start();
});
