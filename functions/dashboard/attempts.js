// The attempts timeline of one task in the detail panel (GET /api/v1/task/{id}/attempts, oldest
// first, keyset paged): each try with its outcome, how far the conversation got, the server's reply,
// the refused recipients and the time it took; the account's waits shown as such (no try spent).
// Every value reaches the page as text.

const PAGE = 50;
const OUTCOMES = {
  sent: "sent",
  deferred: "deferred (tried again)",
  cancelled: "cancelled",
  waiting: "the account waited",
  paused: "the account was paused",
};
const $ = (id) => document.getElementById(id);

let api = null;
let shown = { taskId: null, pages: 1, next: null };
let asked = 0; // reads under way: only the latest one is shown (a refresh and a click can overlap)

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value === null || value === undefined ? "" : String(value);
  if (className) element.className = className;
  return element;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function entry(attempt) {
  const li = document.createElement("li");
  li.dataset.id = attempt.id;
  li.dataset.outcome = attempt.outcome;
  const account = attempt.outcome === "waiting" || attempt.outcome === "paused";
  li.className = `attempt attempt-${OUTCOMES[attempt.outcome] ? attempt.outcome : "other"}`;
  const head = document.createElement("p");
  head.className = "attempt-head";
  const title = account
    ? `${OUTCOMES[attempt.outcome]}${attempt.reason ? `: ${attempt.reason}` : ""}`
    : `Try ${attempt.try_count ?? "—"}: ${OUTCOMES[attempt.outcome] || attempt.outcome}`;
  head.append(text("b", title, "attempt-outcome"), text("span", ` ${when(attempt.started_at)}`, "muted"));
  if (attempt.repeats > 1) head.append(text("span", ` (${attempt.repeats} times)`, "muted"));
  if (account && !attempt.spent) head.append(text("span", " no try spent", "muted"));
  const facts = [];
  if (attempt.server) facts.push(attempt.server);
  if (attempt.stage) facts.push(`reached ${attempt.stage}`);
  const took = duration(attempt.duration_ms);
  if (took) facts.push(took);
  li.append(head);
  if (facts.length) li.append(text("p", facts.join(" · "), "attempt-facts muted"));
  if (attempt.smtp_code || attempt.reply) {
    // The reply usually starts with its code already; otherwise the code goes first.
    const code = attempt.smtp_code === null || attempt.smtp_code === undefined ? "" : String(attempt.smtp_code);
    const reply = attempt.reply || "";
    li.append(text("p", reply.startsWith(code) ? reply : `${code} ${reply}`.trim(), "attempt-reply"));
  }
  if (attempt.refused && attempt.refused.length) {
    const list = document.createElement("ul");
    list.className = "attempt-refused";
    for (const r of attempt.refused) list.append(text("li", `refused ${r.recipient}: ${r.code} ${r.reply}`));
    li.append(list);
  }
  return li;
}

async function page(taskId, cursor) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (cursor) params.set("cursor", cursor);
  return api("GET", `/api/v1/task/${taskId}/attempts?${params}`);
}

// Reads again as many pages as are shown (the list grows at its end; the first pages stay as they were).
export async function refreshAttempts(taskId) {
  if (shown.taskId !== taskId) shown = { taskId, pages: 1, next: null };
  const mine = ++asked;
  const items = [];
  let cursor = null;
  for (let n = 0; n < shown.pages; n += 1) {
    const answer = await page(taskId, cursor);
    items.push(...answer.items);
    cursor = answer.next_cursor;
    if (!cursor) break;
  }
  if (mine !== asked || shown.taskId !== taskId) return;
  shown.next = cursor;
  $("attempt-list").replaceChildren(...items.map(entry));
  $("attempts-empty").hidden = items.length > 0;
  $("attempts-more").hidden = !cursor;
}

export function closeAttempts() {
  shown = { taskId: null, pages: 1, next: null };
  $("attempt-list").replaceChildren();
}

export function initAttempts(apiCall) {
  api = apiCall;
  $("attempts-more").addEventListener("click", async () => {
    const button = $("attempts-more");
    button.disabled = true;
    try {
      shown.pages += 1;
      await refreshAttempts(shown.taskId);
    } finally {
      button.disabled = false;
    }
  });
}
