// The account view: the SMTP settings (PATCH /api/v1/user/{id}; a new host, port or security asks for
// the SMTP password again), the declared send limits and connection cap, the account's state, and
// Test connection (POST /api/v1/user/{id}/smtp-check). The banner on every view while the account's
// mail cannot go out. A client of the API only; every value reaches the page as text.

const LIMIT_ROWS = 4;
const PERS = ["second", "minute", "hour", "day"];
const COUNTS = ["messages", "recipients"];
const ENDPOINT = ["smtp_host", "smtp_port", "smtp_security"]; // a change here needs the password again
const STATES = { active: "active: its mail goes out", paused: "paused", backing_off: "backing off" };
const $ = (id) => document.getElementById(id);

let api = null;
let userId = null;
let stored = null; // the user as last read
let dirty = false; // the form holds edits not yet saved: a refresh does not overwrite them
let saves = 0; // counts saves: a refresh's answer read before one ended is stale, and dropped

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value === null || value === undefined ? "" : String(value);
  if (className) element.className = className;
  return element;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function select(name, options, value) {
  const s = document.createElement("select");
  s.name = name;
  for (const o of options) {
    const option = text("option", o);
    option.value = o;
    s.append(option);
  }
  s.value = value;
  return s;
}

export function describeState(state) {
  if (!state || state.state === "active") return STATES.active;
  const parts = [`${STATES[state.state] || state.state}${state.reason ? ` (${state.reason})` : ""}`];
  if (state.detail) parts.push(state.detail);
  if (state.since) parts.push(`since ${when(state.since)}`);
  if (state.until) parts.push(`next attempt after ${when(state.until)}`);
  return parts.join(" · ");
}

function showBanner(state) {
  const waiting = Boolean(state) && state.state !== "active";
  $("account-banner").hidden = !waiting;
  $("account-banner-text").textContent = waiting
    ? `Your mail is not going out: the account is ${describeState(state)}. Its mail waits, no try is spent.`
    : "";
}

function fillLimits(limits) {
  const rows = [];
  for (let n = 0; n < LIMIT_ROWS; n += 1) {
    const limit = limits[n] || { max: "", per: "second", count: "messages" };
    const max = document.createElement("input");
    max.type = "number";
    max.name = "limit-max";
    max.min = "1";
    max.max = "10000000";
    max.value = limit.max;
    max.setAttribute("aria-label", `Limit ${n + 1}: at most`);
    const per = select("limit-per", PERS, limit.per);
    per.setAttribute("aria-label", `Limit ${n + 1}: per`);
    const count = select("limit-count", COUNTS, limit.count || "messages");
    count.setAttribute("aria-label", `Limit ${n + 1}: counting`);
    const tr = document.createElement("tr");
    for (const control of [max, per, count]) {
      const td = document.createElement("td");
      td.append(control);
      tr.append(td);
    }
    rows.push(tr);
  }
  $("limits-table").tBodies[0].replaceChildren(...rows);
}

function readLimits() {
  const limits = [];
  for (const tr of $("limits-table").tBodies[0].rows) {
    const max = tr.querySelector("[name=limit-max]").value.trim();
    if (!max) continue;
    limits.push({ max: Number(max), per: tr.querySelector("[name=limit-per]").value, count: tr.querySelector("[name=limit-count]").value });
  }
  return limits;
}

function fillForm(user) {
  const form = $("smtp-form");
  form.elements.smtp_host.value = user.smtp_host;
  form.elements.smtp_port.value = user.smtp_port;
  form.elements.smtp_security.value = user.smtp_security;
  form.elements["smtp-username"].value = user.smtp_username;
  form.elements["smtp-password"].value = "";
  form.elements.smtp_max_connections.value = user.smtp_max_connections;
  fillLimits(user.smtp_send_limits || []);
  dirty = false;
  askPassword();
}

function endpointChanged() {
  if (!stored) return false;
  const form = $("smtp-form");
  return ENDPOINT.some((name) => String(form.elements[name].value).trim().toLowerCase() !== String(stored[name]).toLowerCase());
}

// A new host, port or security: the password must come with it (the API refuses the change without).
function askPassword() {
  const changed = endpointChanged();
  const password = $("smtp-form").elements["smtp-password"];
  $("password-why").hidden = !changed;
  password.required = changed && $("smtp-form").elements["smtp-username"].value !== "";
  password.placeholder = changed ? "the password for this server" : "unchanged";
}

// The changed members only: an untouched form sends nothing.
function changes() {
  const form = $("smtp-form");
  const body = {};
  const host = form.elements.smtp_host.value.trim();
  if (host.toLowerCase() !== stored.smtp_host) body.smtp_host = host;
  const port = Number(form.elements.smtp_port.value);
  if (port !== stored.smtp_port) body.smtp_port = port;
  if (form.elements.smtp_security.value !== stored.smtp_security) body.smtp_security = form.elements.smtp_security.value;
  if (form.elements["smtp-username"].value !== stored.smtp_username) body["smtp-username"] = form.elements["smtp-username"].value;
  const password = form.elements["smtp-password"].value;
  if (password !== "" || endpointChanged()) body["smtp-password"] = password;
  const cap = form.elements.smtp_max_connections.value.trim();
  if (cap === "" ? false : Number(cap) !== stored.smtp_max_connections) body.smtp_max_connections = Number(cap);
  const limits = readLimits();
  if (JSON.stringify(limits) !== JSON.stringify(stored.smtp_send_limits.map((l) => ({ max: l.max, per: l.per, count: l.count || "messages" })))) {
    body.smtp_send_limits = limits;
  }
  return body;
}

async function save(event) {
  event.preventDefault();
  const submit = $("smtp-form").querySelector("button[type=submit]");
  const body = changes();
  if (Object.keys(body).length === 0) {
    $("account-message").textContent = "Nothing changed.";
    return;
  }
  submit.disabled = true;
  saves += 1;
  try {
    const user = await api("PATCH", `/api/v1/user/${userId}`, body);
    saves += 1;
    stored = user;
    fillForm(user);
    showState(user);
    const resumed = ["smtp_host", "smtp_port", "smtp_security", "smtp-username", "smtp-password"].some((k) => k in body);
    $("account-message").textContent = resumed ? "Saved: the account's mail is tried again now." : "Saved.";
  } catch (err) {
    const errors = Object.entries((err.problem && err.problem.errors) || {}).map(([k, v]) => `${k} ${v}`);
    $("account-message").textContent = `Not saved: ${errors.join("; ") || err.message}`;
  } finally {
    submit.disabled = false;
  }
}

function showState(user) {
  const state = user.smtp_state;
  $("account-state").textContent = describeState(state);
  $("account-state").dataset.state = state ? state.state : "";
  showBanner(state);
}

// Every refresh, whatever the view: the banner follows the account's state.
export async function refreshAccount() {
  if (userId === null) return;
  const asked = saves;
  const user = await api("GET", `/api/v1/user/${userId}`);
  if (asked !== saves) return; // a save began or ended meanwhile: its answer is newer than this one
  stored = dirty ? { ...stored, smtp_state: user.smtp_state } : user;
  showState(user);
  if (!dirty) fillForm(user);
}

function checkStep(step) {
  const tr = document.createElement("tr");
  tr.dataset.step = step.step;
  tr.append(
    text("td", step.step),
    text("td", step.ok ? "ok" : "failed", step.ok ? "" : "error-text"),
    text("td", step.code ?? "", "num"),
    text("td", step.reply ?? ""),
    text("td", `${Math.round(step.ms)} ms`, "num"),
  );
  return tr;
}

async function check() {
  const button = $("smtp-check");
  button.disabled = true;
  $("check-summary").textContent = "Testing…";
  try {
    const result = await api("POST", `/api/v1/user/${userId}/smtp-check`);
    $("check-summary").textContent = result.ok
      ? `${result.server}: every step passed.`
      : `${result.server}: ${result.error || "a step failed"}`;
    $("check-steps").tBodies[0].replaceChildren(...result.steps.map(checkStep));
    const rows = [["AUTH", result.auth], ["Security", result.security]];
    if (result.tls) {
      rows.push(["TLS", [result.tls.version, result.tls.cipher].filter(Boolean).join(", ")]);
      rows.push(["Certificate", result.tls.certificate_subject || ""]);
      rows.push(["Issued by", result.tls.certificate_issuer || ""]);
      if (result.tls.certificate_expires) rows.push(["Expires", when(result.tls.certificate_expires)]);
    }
    rows.push(["Extensions", result.extensions.join(", ") || "none"]);
    $("check-fields").replaceChildren(
      ...rows.flatMap(([label, value]) => {
        const dd = text("dd", value);
        dd.dataset.field = label.toLowerCase();
        return [text("dt", label), dd];
      }),
    );
    $("check-result").hidden = false;
  } catch (err) {
    $("check-summary").textContent = err.status === 429 ? `Too many tests just now: ${err.message}` : err.message;
  } finally {
    button.disabled = false;
  }
}

export function setAccountUser(id) {
  userId = id;
  stored = null;
  dirty = false;
  if (id === null) {
    $("account-banner").hidden = true;
    $("check-result").hidden = true;
    $("check-summary").textContent = "";
  }
}

export function initAccount(apiCall, openView) {
  api = apiCall;
  const form = $("smtp-form");
  form.addEventListener("submit", save);
  form.addEventListener("input", () => {
    dirty = true;
    askPassword();
  });
  $("account-discard").addEventListener("click", () => {
    if (stored) fillForm(stored);
    $("account-message").textContent = "";
  });
  $("smtp-check").addEventListener("click", check);
  $("account-banner-link").addEventListener("click", () => openView("account"));
  fillLimits([]);
}
