// The HTML preview's frame: takes the mail's HTML from the dashboard (same origin only) and shows it
// in the sandboxed frame beside this script. The markup never touches this document: it becomes the
// srcdoc of a frame that may run no script (functions/dashboard/preview.html).
const frame = document.getElementById("mail");

window.addEventListener("message", (event) => {
  if (event.origin !== window.location.origin || event.source !== window.parent) return;
  const data = event.data;
  if (!data || typeof data.html !== "string") return;
  frame.srcdoc = data.html;
});
window.parent.postMessage({ previewReady: true }, window.location.origin);
