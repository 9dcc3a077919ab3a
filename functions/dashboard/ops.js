// The operator's view: the figures of GET /ops/status (what `mailq status` shows), refreshed every few
// seconds. The operator token lives in this tab's sessionStorage; every value reaches the page as text.
const TOKEN_KEY = "mailq.ops";
const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
let timer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function show(signedIn) {
  $("token-view").hidden = signedIn;
  $("figures-view").hidden = !signedIn;
  $("forget").hidden = !signedIn;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, className] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    tr.append(td);
  }
  return tr;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function render(f) {
  const tasks = Object.entries(f.tasks).map(([status, n]) => row([[status, "status-name"], [n.toLocaleString(), "num"], ["exact"]]));
  for (const [status, n] of Object.entries(f.finished)) {
    tasks.push(row([[status, "status-name"], [n.toLocaleString(), "num"], ["exact"]]));
  }
  for (const [status, n] of Object.entries(f.estimated)) {
    if (!(status in f.finished)) {
      tasks.push(row([[status, "status-name"], [`~${n.toLocaleString()}`, "num"], [`estimate (more than ${f.finished_cap.toLocaleString()} finished; last ANALYZE)`]]));
    }
  }
  $("ops-tasks").tBodies[0].replaceChildren(...tasks);
  $("ops-tasks").tBodies[0].querySelectorAll("tr").forEach((tr) => (tr.dataset.status = tr.cells[0].textContent));
  const lists = Object.entries(f.lists).map(([name, n]) => row([[name], [n.toLocaleString(), "num"]]));
  lists.push(row([["paused accounts"], [f.paused_accounts.toLocaleString(), "num"]]));
  $("ops-lists").tBodies[0].replaceChildren(...lists);
  const workers = Object.entries(f.workers_alive).map(([role, n]) => row([[`${role} workers alive`], [String(n), "num"]]));
  workers.push(row([["oldest due, not yet sent"], [age(f.oldest_due_seconds), "num"]]));
  workers.push(row([["work waiting for the sweep"], [f.sweep_pending.toLocaleString(), "num"]]));
  $("ops-workers").tBodies[0].replaceChildren(...workers);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  clearTimeout(timer);
  const saved = token();
  if (!saved) return show(false);
  try {
    const response = await fetch("/ops/status", {
      headers: { Authorization: `Bearer ${saved}`, Accept: "application/json" },
      credentials: "omit",
      cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (response.status === 401) {
      forget("The operator token was refused.");
      return;
    }
    if (!response.ok) throw new Error((body && body.detail) || `HTTP ${response.status}`);
    show(true);
    $("banner").hidden = true;
    render(body);
  } catch (err) {
    $("banner").textContent = `The figures could not be read: ${err.message}`;
    $("banner").hidden = false;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function forget(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  show(false);
  $("token-error").textContent = message || "";
  $("token-error").hidden = !message;
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, event.target.elements.token.value);
  event.target.reset();
  refresh();
});
$("forget").addEventListener("click", () => forget());
show(Boolean(token()));
refresh();
