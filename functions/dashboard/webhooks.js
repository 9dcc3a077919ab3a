// The webhooks view: the user's endpoints (create, with the secret shown once; enable or disable,
// rotate, delete) and each endpoint's delivery log with replay. A client of /api/v1/webhooks only;
// every value reaches the page as text.

const EVENTS = ["task.sent", "task.deferred", "task.cancelled"];
const LOG_SIZE = 20;
const $ = (id) => document.getElementById(id);

let api = null;
let openEndpoint = null; // the endpoint whose delivery log is shown
let logCursors = [null];

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value === null || value === undefined ? "" : String(value);
  if (className) element.className = className;
  return element;
}

function button(label, onClick, name) {
  const b = text("button", label);
  b.type = "button";
  if (name) b.name = name;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await onClick();
    } catch (err) {
      say(err.message);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function say(message) {
  $("webhooks-message").textContent = message;
}

function showSecret(endpoint, verb) {
  $("webhook-secret-value").textContent = endpoint.secret;
  $("webhook-secret-what").textContent = `${verb} ${endpoint.url}: its signing secret, shown this once.`;
  $("webhook-secret").hidden = false;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function endpointRow(endpoint) {
  const tr = document.createElement("tr");
  tr.dataset.id = endpoint.id;
  const state = endpoint.enabled ? "enabled" : `disabled${endpoint.disabled_reason ? `: ${endpoint.disabled_reason}` : ""}`;
  const actions = document.createElement("td");
  actions.className = "row-actions";
  actions.append(
    endpoint.enabled
      ? button("Disable", () => change(endpoint, { enabled: false }, "Disabled."), "disable")
      : button("Enable", () => change(endpoint, { enabled: true }, "Enabled: events go out again."), "enable"),
    button("Deliveries", () => openLog(endpoint), "deliveries"),
    button("Rotate secret", async () => {
      const rotated = await api("POST", `/api/v1/webhooks/${endpoint.id}/rotate`);
      showSecret({ ...endpoint, ...rotated }, "Rotated");
      say("The old secret signs too for a while (see the API reference), then stops.");
    }, "rotate"),
    button("Delete", async () => {
      if (!window.confirm(`Delete the endpoint ${endpoint.url} and its delivery log?`)) return;
      await api("DELETE", `/api/v1/webhooks/${endpoint.id}`);
      if (openEndpoint && openEndpoint.id === endpoint.id) closeLog();
      say("Deleted.");
      await refreshWebhooks();
    }, "delete"),
  );
  tr.append(
    text("td", endpoint.id, "num"),
    text("td", endpoint.url, "url"),
    text("td", endpoint.events.join(" ")),
    text("td", state, endpoint.enabled ? "" : "error-text"),
    actions,
  );
  return tr;
}

async function change(endpoint, body, done) {
  await api("PATCH", `/api/v1/webhooks/${endpoint.id}`, body);
  say(done);
  await refreshWebhooks();
}

export async function refreshWebhooks() {
  const { items } = await api("GET", "/api/v1/webhooks");
  $("webhook-table").tBodies[0].replaceChildren(...items.map(endpointRow));
  $("webhooks-empty").hidden = items.length > 0;
  if (openEndpoint) {
    const still = items.find((e) => e.id === openEndpoint.id);
    if (still) await refreshLog();
    else closeLog();
  }
}

function deliveryRow(delivery) {
  const tr = document.createElement("tr");
  tr.dataset.id = delivery.id;
  const actions = document.createElement("td");
  if (delivery.state !== "pending") {
    actions.append(
      button("Replay", async () => {
        await api("POST", `/api/v1/webhooks/${openEndpoint.id}/deliveries/${delivery.id}/replay`);
        say(`Delivery ${delivery.id} sent again (the same webhook-id).`);
        logCursors = [null];
        await refreshLog();
      }, "replay"),
    );
  }
  tr.append(
    text("td", delivery.id, "num"),
    text("td", delivery.event_type),
    text("td", delivery.task_id, "num"),
    text("td", delivery.state, `state state-${delivery.state}`),
    text("td", delivery.attempts, "num"),
    text("td", delivery.last_status ?? "—", "num"),
    text("td", delivery.last_error ?? "", "error-text"),
    text("td", when(delivery.created_at)),
    actions,
  );
  return tr;
}

async function openLog(endpoint) {
  openEndpoint = endpoint;
  logCursors = [null];
  $("delivery-endpoint").textContent = endpoint.url;
  $("delivery-log").hidden = false;
  await refreshLog();
}

function closeLog() {
  openEndpoint = null;
  $("delivery-log").hidden = true;
}

async function refreshLog() {
  const params = new URLSearchParams({ limit: String(LOG_SIZE) });
  const cursor = logCursors[logCursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  const page = await api("GET", `/api/v1/webhooks/${openEndpoint.id}/deliveries?${params}`);
  $("delivery-table").tBodies[0].replaceChildren(...page.items.map(deliveryRow));
  $("deliveries-empty").hidden = page.items.length > 0;
  $("deliveries-older").disabled = !page.next_cursor;
  $("deliveries-older").dataset.cursor = page.next_cursor || "";
  $("deliveries-newest").disabled = logCursors.length === 1;
}

async function create(event) {
  event.preventDefault();
  const form = event.target;
  const events = [...form.querySelectorAll("input[name=events]:checked")].map((i) => i.value);
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  try {
    const created = await api("POST", "/api/v1/webhooks", { url: form.elements.url.value.trim(), events });
    showSecret(created, "Created");
    say("");
    form.reset();
    await refreshWebhooks();
  } catch (err) {
    const errors = Object.entries((err.problem && err.problem.errors) || {}).map(([k, v]) => `${k} ${v}`);
    say(errors.join("; ") || err.message);
  } finally {
    submit.disabled = false;
  }
}

export function initWebhooks(apiCall) {
  api = apiCall;
  const boxes = $("webhook-events");
  for (const name of EVENTS) {
    const label = text("label", "");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "events";
    box.value = name;
    box.checked = true;
    label.append(box, ` ${name}`);
    boxes.append(label);
  }
  $("webhook-form").addEventListener("submit", create);
  $("webhook-secret-close").addEventListener("click", () => {
    $("webhook-secret").hidden = true;
    $("webhook-secret-value").textContent = "";
  });
  $("delivery-close").addEventListener("click", closeLog);
  $("deliveries-older").addEventListener("click", () => {
    logCursors.push($("deliveries-older").dataset.cursor);
    refreshLog();
  });
  $("deliveries-newest").addEventListener("click", () => {
    logCursors = [null];
    refreshLog();
  });
}
