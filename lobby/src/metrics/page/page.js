// Lobby's status page: polls api/stats (the `lobby stats --json` contract),
// computes rates from successive answers and keeps the last five minutes of
// them in fixed-size rings. The DOM is built once per target and upstream
// and then updated in place, so a page left open all day does not grow.
// Rows of a collapsed target are built when it is first opened. A module:
// strict, and nothing of it in the page's global scope.

const PERIOD_MS = 2000;
/** Samples kept per series: five minutes at one poll every two seconds. */
const SAMPLES = 150;
/** Past this many targets, groups start collapsed. */
const OPEN_UP_TO = 20;
const SVG = "http://www.w3.org/2000/svg";

/** A fixed-size ring of numbers, oldest first when read. */
class Ring {
  constructor() {
    this.values = new Float64Array(SAMPLES);
    this.next = 0;
    this.length = 0;
  }
  push(value) {
    this.values[this.next] = value;
    this.next = (this.next + 1) % SAMPLES;
    this.length = Math.min(this.length + 1, SAMPLES);
  }
  max() {
    let max = 0;
    for (let i = 0; i < this.length; i++) max = Math.max(max, this.values[i]);
    return max;
  }
  /** Polyline points, right-aligned on x in 0..SAMPLES-1, y in 0..100. */
  points(scale) {
    const out = [];
    const start = (this.next + SAMPLES - this.length) % SAMPLES;
    for (let k = 0; k < this.length; k++) {
      const value = this.values[(start + k) % SAMPLES];
      const y = 98 - (scale > 0 ? (value / scale) * 94 : 0);
      out.push(`${SAMPLES - this.length + k},${y.toFixed(1)}`);
    }
    return out.join(" ");
  }
}

const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

/** Sets text only when it changed: no layout work for still figures. */
const setText = (node, text) => {
  if (node.textContent !== text) node.textContent = text;
};

const setAttr = (node, name, value) => {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
};

const UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB"];
/** Binary units, as `lobby stats` prints them. */
const bytes = (n) => {
  if (!Number.isFinite(n)) return "-";
  if (n < 1024) return `${Math.round(n)} B`;
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${UNITS[unit]}`;
};
const count = (n) => (Number.isFinite(n) ? n.toLocaleString("en-US") : "-");
const rate = (n) => (Number.isFinite(n) ? (n < 10 ? n.toFixed(1) : Math.round(n).toString()) : "-");
const optional = (value) => (value === undefined || value === null ? "-" : String(value));

function sparkline(classes) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${SAMPLES - 1} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  const title = document.createElementNS(SVG, "title");
  svg.append(title);
  const lines = classes.map((name) => {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", name);
    svg.append(line);
    return line;
  });
  return { svg, title, lines };
}

/** Draws rings on one chart with a common scale; the title says the peak. */
function draw(chart, rings, label, format) {
  const scale = Math.max(...rings.map((r) => r.max()));
  rings.forEach((ring, i) => setAttr(chart.lines[i], "points", ring.points(scale)));
  setText(chart.title, `${label}, peak ${format(scale)}/s`);
}

/** `IP:PORT`, with brackets around an IPv6 address. */
const socket = (address, port) => (address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`);

/** An upstream has an entry per address (a name may resolve to several):
 * name and address tell entries apart. */
const entryKey = (u) => `${u.name} ${u.address ?? ""}`;

/** One upstream entry: its last figures, rates and rings; its row once shown. */
class Upstream {
  constructor(target, data) {
    this.target = target;
    this.data = data;
    this.earlier = null;
    this.rates = { connections: NaN, out: NaN, in: NaN };
    this.rings = { connections: new Ring(), out: new Ring(), in: new Ring() };
    this.row = null;
    this.visible = true;
  }

  /** Takes a new answer, received at `now` (ms). */
  update(data, now) {
    const before = this.earlier;
    const seconds = before ? (now - before.at) / 1000 : 0;
    // Counters restart when an upstream changes address (SPEC: they
    // survive only an unchanged name and address), like `lobby stats`.
    const comparable =
      before && seconds > 0 && before.address === data.address &&
      data.connections >= before.connections && data.bytes_out >= before.bytes_out &&
      data.bytes_in >= before.bytes_in;
    if (comparable) {
      this.rates = {
        connections: (data.connections - before.connections) / seconds,
        out: (data.bytes_out - before.bytes_out) / seconds,
        in: (data.bytes_in - before.bytes_in) / seconds,
      };
      for (const key of ["connections", "out", "in"]) this.rings[key].push(this.rates[key]);
    }
    this.data = data;
    this.earlier = {
      at: now,
      address: data.address,
      connections: data.connections,
      bytes_out: data.bytes_out,
      bytes_in: data.bytes_in,
    };
  }

  /** Whether its name, host or address contains `query` (lower case). */
  matches(query) {
    const d = this.data;
    return `${d.name} ${d.host} ${socket(d.address ?? "", d.port)}`.toLowerCase().includes(query);
  }

  buildRow() {
    const tr = el("tr");
    tr.dataset.upstream = `${this.target}/${this.data.name}`;
    const cell = (className) => tr.appendChild(el("td", className));
    this.row = {
      tr,
      name: cell(""),
      state: cell("state"),
      admin: cell(""),
      weight: cell("num"),
      address: cell(""),
      connections: cell("num"),
      resets: cell("num"),
      bytesOut: cell("num"),
      bytesIn: cell("num"),
      connectionRate: cell("num connection-rate"),
      outRate: cell("num"),
      inRate: cell("num"),
      connectionChart: sparkline(["conn"]),
      byteChart: sparkline(["out", "in"]),
    };
    cell("").append(this.row.connectionChart.svg);
    cell("").append(this.row.byteChart.svg);
    return tr;
  }

  render() {
    const { row, data } = this;
    setAttr(row.tr, "data-state", data.available ? "up" : "down");
    setText(row.name, data.name);
    setText(row.state, data.available ? "UP" : "DOWN");
    setText(row.admin, optional(data.admin_state));
    setText(row.weight, optional(data.weight));
    const address = data.address === null || data.address === undefined ? "unresolved" : socket(data.address, data.port);
    setText(row.address, data.host === data.address ? address : `${address} (${data.host})`);
    setText(row.connections, count(data.connections));
    setText(row.resets, count(data.resets));
    setText(row.bytesOut, bytes(data.bytes_out));
    setText(row.bytesIn, bytes(data.bytes_in));
    setText(row.connectionRate, rate(this.rates.connections));
    setText(row.outRate, bytes(this.rates.out));
    setText(row.inRate, bytes(this.rates.in));
    draw(row.connectionChart, [this.rings.connections], "connections", rate);
    draw(row.byteChart, [this.rings.out, this.rings.in], "bytes out, in", bytes);
  }
}

const HEADINGS = [
  ["Upstream", ""], ["State", ""], ["Admin", ""], ["Weight", "num"], ["Address", ""],
  ["Conns", "num"], ["Resets", "num"], ["Out", "num"], ["In", "num"],
  ["Conn/s", "num"], ["Out/s", "num"], ["In/s", "num"], ["Conn/s, 5 min", ""], ["Bytes/s, 5 min", ""],
];

/** One target: a collapsible group whose table is built when first opened. */
class Target {
  constructor(data, open) {
    this.name = data.name;
    this.upstreams = new Map();
    this.tbody = null;
    /** Whether the table's rows must be built or put in order. */
    this.reordered = true;
    this.details = el("details", "target");
    this.details.dataset.target = data.name;
    const summary = el("summary");
    this.label = summary.appendChild(el("span", "tname"));
    this.listener = summary.appendChild(el("span", "muted"));
    this.pool = summary.appendChild(el("span", "muted"));
    this.badge = summary.appendChild(el("span", "badge"));
    this.totals = summary.appendChild(el("span", "rates muted num"));
    this.details.append(summary);
    this.details.addEventListener("toggle", () => this.details.open && this.render());
    this.details.open = open;
  }

  update(data, now) {
    this.data = data;
    const seen = new Set();
    for (const u of data.upstreams) {
      const key = entryKey(u);
      seen.add(key);
      let upstream = this.upstreams.get(key);
      if (!upstream) {
        upstream = new Upstream(data.name, u);
        this.upstreams.set(key, upstream);
        this.reordered = true;
      }
      upstream.update(u, now);
    }
    for (const [key, upstream] of this.upstreams) {
      if (!seen.has(key)) {
        upstream.row?.tr.remove();
        this.upstreams.delete(key);
      }
    }
    // Map order is insertion order: keep the report's.
    if ([...this.upstreams.keys()].some((key, i) => key !== entryKey(data.upstreams[i]))) {
      this.upstreams = new Map(data.upstreams.map((u) => [entryKey(u), this.upstreams.get(entryKey(u))]));
      this.reordered = true;
    }
  }

  /** Marks the upstreams the filter shows; whether the group shows. A
   * target that matches shows all its upstreams; "only DOWN" shows down
   * upstreams and the groups that have one. */
  filter(query, downOnly) {
    const own = `${this.name} ${this.data.protocol}/${this.data.port} ${this.data.upstream_group}`
      .toLowerCase().includes(query);
    let any = false;
    for (const u of this.upstreams.values()) {
      u.visible = (own || u.matches(query)) && !(downOnly && u.data.available);
      any ||= u.visible;
    }
    return any || (own && !downOnly);
  }

  render() {
    const d = this.data;
    setText(this.label, d.name);
    setText(this.listener, `${d.protocol}/${d.port}`);
    setText(this.pool, `${d.upstream_group} · ${d.distribution}`);
    const all = this.upstreams.size;
    const up = [...this.upstreams.values()].filter((u) => u.data.available).length;
    setText(this.badge, `${up}/${all} up`);
    setAttr(this.badge, "class", `badge ${up === all ? "all" : up === 0 ? "none" : "some"}`);
    let connections = 0, out = 0, inbound = 0;
    for (const u of this.upstreams.values()) {
      connections += u.rates.connections || 0;
      out += u.rates.out || 0;
      inbound += u.rates.in || 0;
    }
    setText(this.totals, `${rate(connections)} conn/s · out ${bytes(out)}/s · in ${bytes(inbound)}/s`);
    if (!this.details.open) return;
    if (!this.tbody) this.buildTable();
    if (this.reordered) {
      const rows = [...this.upstreams.values()].map((u) => u.row?.tr ?? u.buildRow());
      this.tbody.replaceChildren(...rows);
      this.reordered = false;
    }
    for (const u of this.upstreams.values()) {
      u.row.tr.hidden = !u.visible;
      if (!u.row.tr.hidden) u.render();
    }
  }

  buildTable() {
    const table = el("table");
    const head = table.appendChild(el("thead")).appendChild(el("tr"));
    for (const [text, className] of HEADINGS) head.append(el("th", className, text));
    this.tbody = table.appendChild(el("tbody"));
    this.details.append(table);
  }
}

const targets = new Map();
const main = document.getElementById("targets");
const filter = document.getElementById("filter");
const downOnly = document.getElementById("down-only");
const status = document.getElementById("status");
const totals = document.getElementById("totals");

function apply(report, now) {
  const open = report.targets.length <= OPEN_UP_TO;
  const seen = new Set();
  for (const t of report.targets) {
    seen.add(t.name);
    let target = targets.get(t.name);
    if (!target) {
      target = new Target(t, open);
      targets.set(t.name, target);
    }
    target.update(t, now);
  }
  for (const [name, target] of targets) {
    if (!seen.has(name)) {
      target.details.remove();
      targets.delete(name);
    }
  }
  const order = report.targets.map((t) => targets.get(t.name).details);
  if (order.some((node, i) => main.children[i] !== node)) main.replaceChildren(...order);
  refresh();
  let upstreams = 0, down = 0;
  for (const t of report.targets) {
    upstreams += t.upstreams.length;
    down += t.upstreams.filter((u) => !u.available).length;
  }
  setText(totals, `${report.targets.length} targets · ${upstreams} upstreams · ${down} down`);
}

/** Applies the filter and redraws what is visible. */
function refresh() {
  const query = filter.value.trim().toLowerCase();
  for (const target of targets.values()) {
    target.details.hidden = !target.filter(query, downOnly.checked);
    if (!target.details.hidden) target.render();
  }
}

async function poll() {
  try {
    const response = await fetch("api/stats", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const report = await response.json();
    apply(report, performance.now());
    setText(status, `updated ${new Date().toLocaleTimeString()}`);
    status.classList.remove("stale");
  } catch (error) {
    setText(status, `no answer from lobby (${error.message}); retrying`);
    status.classList.add("stale");
  }
  setTimeout(poll, PERIOD_MS);
}

let typing = 0;
filter.addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(refresh, 150);
});
downOnly.addEventListener("change", refresh);
const openAll = (open) => {
  for (const target of targets.values()) if (!target.details.hidden) target.details.open = open;
};
document.getElementById("expand").addEventListener("click", () => openAll(true));
document.getElementById("collapse").addEventListener("click", () => openAll(false));
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && document.activeElement !== filter) {
    event.preventDefault();
    filter.focus();
  }
});
poll();
