// The last hour's attempts as stacked bars, one per minute: sent at the bottom, then deferred (a try
// that failed for now; the mail is tried again), then cancelled. A mail deferred and later sent shows
// in both minutes. The account's waits are not tries and are not drawn (the banner says them).
// Plain SVG elements and attributes (no inline style), so the page's CSP needs no exception.
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 150;
const AXIS = 28; // room on the left for the scale
const FOOT = 18; // room below for the time labels
const SERIES = ["sent", "deferred", "cancelled"];

function element(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// A round top for the scale: 1, 2, 5, 10, 20, 50, ...
function niceMax(value) {
  let step = 1;
  while (true) {
    for (const factor of [1, 2, 5]) if (step * factor >= value) return step * factor;
    step *= 10;
  }
}

export function drawChart(svg, minutes) {
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const top = niceMax(Math.max(1, ...minutes.map((m) => SERIES.reduce((sum, s) => sum + m[s], 0))));
  const plotHeight = HEIGHT - FOOT - 4;
  const slot = (WIDTH - AXIS) / minutes.length;
  const scale = (n) => (n / top) * plotHeight;
  const nodes = [
    element("line", { x1: AXIS, y1: plotHeight + 4, x2: WIDTH, y2: plotHeight + 4, class: "axis" }),
    element("text", { x: AXIS - 4, y: 12, class: "tick", "text-anchor": "end" }, String(top)),
    element("text", { x: AXIS - 4, y: plotHeight + 4, class: "tick", "text-anchor": "end" }, "0"),
    element("text", { x: AXIS, y: HEIGHT - 4, class: "tick" }, "−60 min"),
    element("text", { x: AXIS + (WIDTH - AXIS) / 2, y: HEIGHT - 4, class: "tick", "text-anchor": "middle" }, "−30 min"),
    element("text", { x: WIDTH, y: HEIGHT - 4, class: "tick", "text-anchor": "end" }, "now"),
  ];
  minutes.forEach((minute, i) => {
    const group = element("g", { class: "minute", "data-start": minute.start });
    const when = new Date(minute.start).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    group.append(
      element("title", {}, `${when}: ${minute.sent} sent, ${minute.deferred} deferred, ${minute.cancelled} cancelled`),
    );
    let y = plotHeight + 4;
    for (const series of SERIES) {
      const height = scale(minute[series]);
      if (height <= 0) continue;
      y -= height;
      group.append(
        element("rect", {
          x: (AXIS + i * slot + 1).toFixed(1),
          y: y.toFixed(1),
          width: Math.max(1, slot - 2).toFixed(1),
          height: height.toFixed(1),
          class: `bar bar-${series}`,
          "data-count": minute[series],
        }),
      );
    }
    nodes.push(group);
  });
  svg.replaceChildren(...nodes);
}
