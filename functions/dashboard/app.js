// The mailq dashboard: a client of the public API and nothing else. No framework, no build step.
// The token lives in this tab's sessionStorage (never a cookie, so no request carries it unasked),
// and every value from the API reaches the page as text (textContent), never as markup.
import { initAccount, refreshAccount, setAccountUser } from "./account.js";
import { closeAttempts, initAttempts, refreshAttempts } from "./attempts.js";
import { drawChart } from "./chart.js";
import { closeMessage, initMessage, renderMessage } from "./message.js";
import { initWebhooks, refreshWebhooks } from "./webhooks.js";

const SESSION_KEY = "mailq.session";
const REFRESH_MS = 3000;
const PAGE_SIZE = 25;
const STATUSES = ["scheduled", "queued", "processing", "sent", "failed", "cancelled"];
// What the API allows (docs: task statuses); the buttons show only where the server offers the action.
const ACTIONS = {
  cancel: { path: "/api/v1/task/{id}/cancel", allowed: new Set(["scheduled", "queued", "failed"]), done: "Cancelled." },
  retry: { path: "/api/v1/task/{id}/retry", allowed: new Set(["failed", "cancelled"]), done: "Queued again." },
};
// PATCH on the task itself moves it in time.
const RESCHEDULE = { path: "/api/v1/task/{id}", allowed: new Set(["scheduled", "queued", "failed"]) };
const DETAIL_FIELDS = [
  ["status", "status"],
  ["recipient_email", "recipient"],
  ["subject", "subject"],
  ["tags", "tags"],
  ["try_count", "tries"],
  ["tries_left", "tries left"],
  ["last_error", "last error"],
  ["message_id", "Message-ID"],
  ["scheduled_at", "scheduled at"],
  ["next_attempt_at", "next attempt"],
  ["created_at", "created"],
  ["updated_at", "last change"],
  ["sent_at", "sent at"],
];
const TIMESTAMPS = new Set(["scheduled_at", "next_attempt_at", "created_at", "updated_at", "sent_at"]);
// The message's members: the message section shows them as labelled fields (message.js).
const MESSAGE_FIELDS = ["body", "html", "from_name", "recipient_name", "cc", "bcc", "reply_to", "headers", "attachments"];
// Bulk actions (POST /api/v1/task/bulk): the statuses each applies to, and what the list's status
// filter becomes for it (absent: every status the action applies to).
const BULK = {
  retry: { statuses: new Set(["failed", "cancelled"]), fallback: null, done: "Queued again", verb: "retry" },
  cancel: { statuses: new Set(["scheduled"]), fallback: "scheduled", done: "Cancelled", verb: "cancel" },
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && problem.detail) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

let session = readSession();
const offered = { cancel: false, retry: false, reschedule: false };
const list = { status: "", filters: {}, cursors: [null], page: 0, next: null };
let openTaskId = null;
let timer = null;
let refreshing = false;
let refreshAgain = false;
let view = "tasks";

// --- the API ---------------------------------------------------------------------------------------

async function api(method, path, body) {
  return apiWith(method, path, body, {});
}

async function apiWith(method, path, body, extra) {
  const headers = { Accept: "application/json", ...extra };
  if (session) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && session) signOut("Your session has ended: sign in again.");
    throw new ApiError(response.status, data);
  }
  return data;
}

async function rawMessage(id) {
  const response = await fetch(`/api/v1/task/${id}/raw`, {
    headers: { Authorization: `Bearer ${session.token}`, Accept: "message/rfc822" },
    credentials: "omit",
    cache: "no-store",
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => null);
    throw new ApiError(response.status, problem);
  }
  return response.text();
}

function readSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    return saved && typeof saved.token === "string" ? saved : null;
  } catch {
    return null;
  }
}

// --- signing in and out ----------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("login-error");
  error.hidden = true;
  try {
    session = null;
    const login = await api("POST", "/api/v1/login", {
      email: form.elements.email.value,
      password: form.elements.password.value,
    });
    session = { token: login.token, id: login.id, email: form.elements.email.value };
    const user = await api("GET", `/api/v1/user/${login.id}`);
    session.email = user.email;
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    form.reset();
    show();
  } catch (err) {
    session = null;
    error.textContent = err.status === 401 ? "The email or password is wrong." : err.message;
    error.hidden = false;
  }
}

function signOut(message) {
  session = null;
  sessionStorage.removeItem(SESSION_KEY);
  clearTimeout(timer);
  closeDetail();
  show();
  if (message) {
    $("login-error").textContent = message;
    $("login-error").hidden = false;
  }
}

function show() {
  const signedIn = session !== null;
  $("login-view").hidden = signedIn;
  $("app-view").hidden = !signedIn || view !== "tasks";
  $("webhooks-view").hidden = !signedIn || view !== "webhooks";
  $("account-view").hidden = !signedIn || view !== "account";
  setAccountUser(signedIn ? session.id : null);
  $("sign-out").hidden = !signedIn;
  $("who").hidden = !signedIn;
  $("who").textContent = signedIn ? session.email : "";
  $("views").hidden = !signedIn;
  if (signedIn) {
    discoverActions();
    refresh();
  } else {
    $("login-form").elements.email.focus();
  }
}

// Cancel, retry and reschedule are offered where the server's own OpenAPI document lists them.
async function discoverActions() {
  try {
    const response = await fetch("/openapi.json", { credentials: "omit" });
    const doc = await response.json();
    for (const [name, action] of Object.entries(ACTIONS)) {
      offered[name] = Boolean(doc.paths && doc.paths[action.path] && doc.paths[action.path].post);
    }
    offered.reschedule = Boolean(doc.paths && doc.paths[RESCHEDULE.path] && doc.paths[RESCHEDULE.path].patch);
  } catch {
    // Without the document the buttons stay hidden; everything else works.
  }
}

// --- refreshing ------------------------------------------------------------------------------------

async function refresh() {
  if (refreshing) {
    refreshAgain = true; // one refresh at a time; a click during one asks for another right after
    return;
  }
  clearTimeout(timer);
  if (!session) return;
  refreshing = true;
  try {
    // The account's state on every view: its banner shows while the mail cannot go out.
    if (view === "webhooks") await Promise.all([refreshWebhooks(), refreshAccount()]);
    else if (view === "account") await refreshAccount();
    else await Promise.all([refreshStats(), refreshList(), openTaskId ? refreshDetail() : null, refreshAccount()]);
    $("banner").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (session) {
      $("banner").textContent = `The API answered: ${err.message}`;
      $("banner").hidden = false;
    }
  } finally {
    refreshing = false;
  }
  if (refreshAgain) {
    refreshAgain = false;
    return refresh();
  }
  if (session) timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 5 : REFRESH_MS);
}

async function refreshStats() {
  const stats = await api("GET", "/api/v1/task/stats");
  for (const status of STATUSES) {
    const button = document.querySelector(`#counts button[data-status="${status}"]`);
    const capped = stats.capped.includes(status);
    button.querySelector(".n").textContent = stats.counts[status].toLocaleString() + (capped ? "+" : "");
    button.classList.toggle("active", list.status === status);
  }
  const totals = { sent: 0, deferred: 0, cancelled: 0 }; // attempts, as the chart draws them
  for (const minute of stats.minutes) for (const key of Object.keys(totals)) totals[key] += minute[key];
  for (const [key, value] of Object.entries(totals)) $(`total-${key}`).textContent = value;
  drawChart($("chart"), stats.minutes);
}

function listUrl() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  let path = "/api/v1/task/queue";
  if (list.status === "fail") path = "/api/v1/task/queue/fail";
  else if (list.status) params.set("status", list.status);
  for (const [name, value] of Object.entries(list.filters)) params.set(name, value);
  const cursor = list.cursors[list.page];
  if (cursor) params.set("cursor", cursor);
  return `${path}?${params}`;
}

async function refreshList() {
  let page;
  try {
    page = await api("GET", listUrl());
  } catch (err) {
    if (err.status !== 422) throw err;
    const errors = Object.entries(err.problem.errors || {}).map(([k, v]) => `${k} ${v}`);
    $("banner").textContent = `Filter refused: ${errors.join("; ") || err.message}`;
    $("banner").hidden = false;
    page = { items: [], next_cursor: null };
  }
  list.next = page.next_cursor;
  $("task-table").tBodies[0].replaceChildren(...page.items.map(taskRow));
  $("empty").hidden = page.items.length > 0;
  $("next-page").disabled = !list.next;
  $("prev-page").disabled = list.page === 0;
  $("first-page").disabled = list.page === 0;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function statusBadge(status) {
  const span = document.createElement("span");
  span.className = `status status-${STATUSES.includes(status) ? status : "other"}`;
  span.textContent = status;
  return span;
}

function taskRow(task) {
  const tr = document.createElement("tr");
  tr.dataset.id = task.id;
  tr.tabIndex = 0;
  const status = cell("");
  status.append(statusBadge(task.status));
  const error = cell(task.last_error, "error-text");
  if (task.last_error) error.title = task.last_error;
  tr.append(
    cell(task.id, "num"),
    status,
    cell(task.recipient_email),
    cell(task.subject, "subject"),
    cell(formatTags(task.tags), "tags"),
    cell(task.try_count, "num"),
    cell(formatTime(task.updated_at)),
    error,
  );
  tr.classList.toggle("selected", task.id === openTaskId);
  return tr;
}

function formatTags(tags) {
  return Object.entries(tags || {})
    .map(([key, value]) => `${key}:${value}`)
    .join(" ");
}

function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

// --- one task --------------------------------------------------------------------------------------

async function openDetail(id) {
  openTaskId = id;
  $("detail-message").textContent = "";
  $("reschedule-form").reset();
  $("detail").hidden = false;
  for (const row of $("task-table").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.id) === id);
  try {
    await refreshDetail();
  } catch (err) {
    $("detail-message").textContent = err.message;
  }
}

function closeDetail() {
  openTaskId = null;
  $("detail").hidden = true;
  closeMessage();
  closeAttempts();
  for (const row of $("task-table").tBodies[0].rows) row.classList.remove("selected");
}

async function refreshDetail() {
  const id = openTaskId;
  const [task] = await Promise.all([api("GET", `/api/v1/task/${id}`), refreshAttempts(id)]);
  if (id === openTaskId) renderDetail(task);
}

function renderDetail(task) {
  $("detail-id").textContent = `#${task.id}`;
  const rows = [];
  const known = new Set(["id", ...MESSAGE_FIELDS]);
  for (const [key, label] of DETAIL_FIELDS) {
    known.add(key);
    if (key in task) rows.push([key, label, task[key]]);
  }
  // Whatever else the API returns (headers, tags, cc, ... as it learns them) is shown as it comes.
  for (const [key, value] of Object.entries(task)) if (!known.has(key)) rows.push([key, key, value]);
  $("detail-fields").replaceChildren(
    ...rows.flatMap(([key, label, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.dataset.field = key;
      if (key === "status") dd.append(statusBadge(value));
      else if (key === "tags") dd.textContent = formatTags(value) || "—";
      else if (TIMESTAMPS.has(key)) {
        dd.textContent = formatTime(value);
        if (value) dd.title = value;
      } else if (value !== null && typeof value === "object") {
        const pre = document.createElement("pre");
        pre.textContent = JSON.stringify(value, null, 2);
        dd.append(pre);
      } else dd.textContent = value === null ? "—" : String(value);
      return [dt, dd];
    }),
  );
  renderMessage(task, session && session.email); // the actions answer without the message: kept
  for (const [name, action] of Object.entries(ACTIONS)) {
    $(`${name}-task`).hidden = !(offered[name] && action.allowed.has(task.status));
  }
  $("reschedule-form").hidden = !(offered.reschedule && RESCHEDULE.allowed.has(task.status));
}

async function act(name) {
  const action = ACTIONS[name];
  const id = openTaskId;
  const button = $(`${name}-task`);
  button.disabled = true;
  try {
    const task = await api("POST", action.path.replace("{id}", id));
    if (task && task.id === id) renderDetail(task);
    $("detail-message").textContent = action.done;
    refresh();
  } catch (err) {
    // A 404 naming no route (rather than the task) or a 405: the server does not have this action.
    const noRoute = err.status === 404 && !(err.problem.detail || "").startsWith("No such task");
    if (noRoute || err.status === 405) {
      offered[name] = false;
      button.hidden = true;
      $("detail-message").textContent = `This server does not offer ${name} yet.`;
    } else {
      $("detail-message").textContent = err.message; // e.g. 409: it is being sent right now
    }
  } finally {
    button.disabled = false;
  }
}

async function reschedule(event) {
  event.preventDefault();
  const form = event.target;
  const id = openTaskId;
  const when = new Date(form.elements.at.value); // datetime-local: the browser's own time zone
  if (Number.isNaN(when.getTime())) return;
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const task = await api("PATCH", RESCHEDULE.path.replace("{id}", id), { scheduled_at: when.toISOString() });
    if (task && task.id === id) renderDetail(task);
    $("detail-message").textContent = task.status === "scheduled" ? "Rescheduled." : "Due now: on its way.";
    form.reset();
    refresh();
  } catch (err) {
    if (err.status === 405) {
      offered.reschedule = false;
      form.hidden = true;
    }
    $("detail-message").textContent = err.message; // e.g. 409: it is being sent right now
  } finally {
    button.disabled = false;
  }
}

// The time zone the reschedule field means (datetime-local has none of its own).
function timeZoneLabel() {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const minutes = -new Date().getTimezoneOffset();
  const sign = minutes < 0 ? "-" : "+";
  const hh = String(Math.floor(Math.abs(minutes) / 60)).padStart(2, "0");
  const mm = String(Math.abs(minutes) % 60).padStart(2, "0");
  return `${zone} (UTC${sign}${hh}:${mm})`;
}

// --- wiring ----------------------------------------------------------------------------------------

function applyFilters(event) {
  event.preventDefault();
  const form = $("filters");
  list.status = form.elements.status.value;
  list.filters = {};
  for (const input of form.querySelectorAll("[data-param]")) {
    const value = input.value.trim();
    if (!value) continue;
    // datetime-local is the browser's own time zone; the API gets the instant it means.
    const when = input.hasAttribute("data-time") ? new Date(value) : null;
    list.filters[input.name] = when && !Number.isNaN(when.getTime()) ? when.toISOString() : value;
  }
  list.cursors = [null];
  list.page = 0;
  refresh();
}

// --- bulk actions ----------------------------------------------------------------------------------

async function bulk(name) {
  const action = BULK[name];
  const body = { action: name, ...list.filters };
  if (action.statuses.has(list.status)) body.status = list.status;
  else if (action.fallback) body.status = action.fallback;
  const what = body.status || [...action.statuses].join(" and ");
  if (!window.confirm(`${name === "retry" ? "Retry" : "Cancel"} every ${what} task that matches the filters?`)) return;
  const button = $(`bulk-${name}`);
  button.disabled = true;
  const totals = { changed: 0, unchanged: 0 };
  try {
    // The API changes at most a bounded number per request and answers where to go on: call again.
    for (let cursor = null, first = true; first || cursor; first = false) {
      const headers = { "Idempotency-Key": crypto.randomUUID() };
      const answer = await apiWith("POST", "/api/v1/task/bulk", cursor ? { ...body, cursor } : body, headers);
      totals.changed += answer.changed;
      totals.unchanged += answer.unchanged;
      cursor = answer.next_cursor;
      $("bulk-message").textContent = `${action.done}: ${totals.changed} (${totals.unchanged} unchanged)…`;
    }
    $("bulk-message").textContent = `${action.done}: ${totals.changed}` + (totals.unchanged ? ` (${totals.unchanged} changed meanwhile, left alone)` : "") + ".";
    refresh();
  } catch (err) {
    const errors = Object.entries(err.problem.errors || {}).map(([k, v]) => `${k} ${v}`);
    $("bulk-message").textContent = errors.join("; ") || err.message;
  } finally {
    button.disabled = false;
  }
}

// --- views -----------------------------------------------------------------------------------------

function showView(name) {
  view = name;
  $("app-view").hidden = name !== "tasks";
  $("webhooks-view").hidden = name !== "webhooks";
  $("account-view").hidden = name !== "account";
  for (const b of document.querySelectorAll("#views button")) b.setAttribute("aria-pressed", String(b.dataset.view === name));
  refresh();
}

function pickStatus(status) {
  $("filters").elements.status.value = status;
  $("filters").requestSubmit();
}

// A module runs once the document is parsed: the elements are there.
function init() {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("filters").addEventListener("submit", applyFilters);
  for (const button of document.querySelectorAll("#counts button")) {
    button.addEventListener("click", () => pickStatus(button.dataset.status));
  }
  $("next-page").addEventListener("click", () => {
    list.cursors[list.page + 1] = list.next;
    list.page += 1;
    refresh();
  });
  $("prev-page").addEventListener("click", () => {
    list.page = Math.max(0, list.page - 1);
    refresh();
  });
  $("first-page").addEventListener("click", () => {
    list.page = 0;
    refresh();
  });
  const rows = $("task-table").tBodies[0];
  rows.addEventListener("click", (event) => {
    const row = event.target.closest("tr");
    if (row) openDetail(Number(row.dataset.id));
  });
  rows.addEventListener("keydown", (event) => {
    const row = event.target.closest("tr");
    if (row && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      openDetail(Number(row.dataset.id));
    }
  });
  $("detail-close").addEventListener("click", closeDetail);
  $("cancel-task").addEventListener("click", () => act("cancel"));
  $("retry-task").addEventListener("click", () => act("retry"));
  $("reschedule-form").addEventListener("submit", reschedule);
  $("time-zone").textContent = timeZoneLabel();
  $("bulk-retry").addEventListener("click", () => bulk("retry"));
  $("bulk-cancel").addEventListener("click", () => bulk("cancel"));
  for (const b of document.querySelectorAll("#views button")) b.addEventListener("click", () => showView(b.dataset.view));
  initMessage(rawMessage);
  initWebhooks(api);
  initAttempts(api);
  initAccount(api, showView);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && session) refresh();
  });
  show();
}

init();
