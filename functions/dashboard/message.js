// The message of one task in the detail panel: its fields, labelled; its HTML part in a sandboxed
// frame (remote content blocked until the user asks); the message as sent (GET /task/{id}/raw).
// Every value reaches the page as text (textContent), never as markup.

const RAW_SHOWN = 200_000; // characters of the raw message shown at most (attachments can be 10 MiB)
const PREVIEW = { blocked: "/ui/preview.html", remote: "/ui/preview-remote.html" };

const $ = (id) => document.getElementById(id);
let pending = null; // the HTML waiting for the preview frame to be ready
let shownTask = null;

function text(tag, value, className) {
  const element = document.createElement(tag);
  element.textContent = value === null || value === undefined ? "" : String(value);
  if (className) element.className = className;
  return element;
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function address(name, email) {
  return name ? `${name} <${email}>` : email;
}

// [field, label, value as text or a list of nodes], only those the task has.
function fields(task, sender) {
  const rows = [];
  if (sender) rows.push(["from", "From", address(task.from_name, sender)]);
  rows.push(["to", "To", address(task.recipient_name, task.recipient_email)]);
  if (task.cc && task.cc.length) rows.push(["cc", "Cc", task.cc.join(", ")]);
  if (task.bcc && task.bcc.length) rows.push(["bcc", "Bcc", task.bcc.join(", ")]);
  if (task.reply_to) rows.push(["reply_to", "Reply-To", task.reply_to]);
  const headers = Object.entries(task.headers || {});
  if (headers.length) {
    const list = document.createElement("dl");
    list.className = "headers";
    for (const [name, value] of headers) list.append(text("dt", name), text("dd", value));
    rows.push(["headers", "Headers", [list]]);
  }
  const attachments = task.attachments || [];
  if (attachments.length) {
    const list = document.createElement("ul");
    list.className = "attachments";
    for (const a of attachments) {
      const item = document.createElement("li");
      item.append(text("span", a.filename, "filename"), text("span", ` ${a.content_type}, ${size(a.size)}`, "muted"));
      list.append(item);
    }
    rows.push(["attachments", "Attachments", [list]]);
  }
  return rows;
}

export function renderMessage(task, sender) {
  if (!("body" in task)) return; // an action's answer: the message did not change
  const rows = fields(task, sender);
  $("message-fields").replaceChildren(
    ...rows.flatMap(([key, label, value]) => {
      const dd = document.createElement("dd");
      dd.dataset.field = key;
      if (Array.isArray(value)) dd.append(...value);
      else dd.textContent = value;
      return [text("dt", label), dd];
    }),
  );
  $("detail-body").textContent = task.body ?? "";
  const changed = !shownTask || shownTask.id !== task.id || shownTask.html !== task.html;
  shownTask = { id: task.id, html: task.html };
  $("html-part").hidden = !task.html;
  if (changed) {
    resetPreview(task.html);
    $("raw-message").hidden = true;
    $("raw-message").textContent = "";
    $("show-raw").textContent = "Show the message as sent";
  }
}

function resetPreview(html) {
  const frame = $("preview");
  $("load-remote").setAttribute("aria-pressed", "false");
  $("load-remote").textContent = "Load remote content";
  pending = html || null;
  frame.src = html ? PREVIEW.blocked : "about:blank";
}

function toggleRemote() {
  const button = $("load-remote");
  const on = button.getAttribute("aria-pressed") !== "true";
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "Block remote content" : "Load remote content";
  pending = shownTask && shownTask.html;
  $("preview").src = on ? PREVIEW.remote : PREVIEW.blocked;
}

async function toggleRaw(api) {
  const pre = $("raw-message");
  const button = $("show-raw");
  if (!pre.hidden) {
    pre.hidden = true;
    button.textContent = "Show the message as sent";
    return;
  }
  button.disabled = true;
  try {
    const raw = await api(shownTask.id);
    pre.textContent = raw.length > RAW_SHOWN ? `${raw.slice(0, RAW_SHOWN)}\n… (${size(raw.length)} in all)` : raw;
    pre.hidden = false;
    button.textContent = "Hide the message as sent";
  } catch (err) {
    pre.textContent = err.message;
    pre.hidden = false;
  } finally {
    button.disabled = false;
  }
}

export function closeMessage() {
  shownTask = null;
  pending = null;
  $("preview").src = "about:blank";
}

export function initMessage(rawApi) {
  // The frame says when it is ready; only then (and only to our own origin) does the HTML go to it.
  window.addEventListener("message", (event) => {
    const frame = $("preview");
    if (event.origin !== window.location.origin || event.source !== frame.contentWindow) return;
    if (event.data && event.data.previewReady && pending !== null) {
      frame.contentWindow.postMessage({ html: pending }, window.location.origin);
    }
  });
  $("load-remote").addEventListener("click", toggleRemote);
  $("show-raw").addEventListener("click", () => toggleRaw(rawApi));
}
