// The "Warmup" tab of TensorBoard (warmup_monitor). Plain JavaScript, no build step.
// Every text that comes from a run (names, alert kinds and messages, advice) is set with
// textContent, never parsed as HTML: a run named <script> shows as text.

const SVG = 'http://www.w3.org/2000/svg';
const INSTABILITY = new Set([
  'loss_spike', 'loss_trend_spike', 'grad_norm_spike', 'non_finite', 'oscillation',
  'persistent_instability', 'warmup_exhausted', 'edge_of_stability',
]);
const VERDICT_COLOR = {
  'healthy': '#1a7f37', 'unstable but recovered': '#9a6700', 'unstable': '#cf222e',
};
const CHARTS = [
  ['lr', 'learning rate', false],
  ['loss', 'loss (log scale)', true],
  ['grad_norm', 'gradient norm (log scale)', true],
  ['grad_cosine', 'cosine of consecutive gradients', false],
];

export async function render() {
  addStyle();
  const root = el('div', {class: 'wm-root'});
  document.body.appendChild(root);
  root.appendChild(el('h2', {}, 'Warmup'));
  const status = root.appendChild(el('p', {class: 'wm-muted'}, 'Loading runs…'));
  const list = root.appendChild(el('div'));
  const detail = root.appendChild(el('div', {class: 'wm-detail'}));
  let runs;
  try {
    runs = (await getJson('./runs')).runs;
  } catch (e) {
    status.textContent = 'Could not load the runs: ' + e;
    return;
  }
  status.textContent = runs.length ?
    'Runs under the log directory. Choose one to see its alerts and curves.' :
    'No run with event files under the log directory.';
  list.appendChild(runTable(runs, (name) => showRun(name, detail)));
  const first = runs.find((r) => !r.error);
  if (first) showRun(first.run, detail);
}

function runTable(runs, onPick) {
  const body = el('tbody');
  for (const r of runs) {
    const alerts = r.alerts ?
      Object.entries(r.alerts).map(([k, n]) => `${k} ×${n}`).join(', ') || 'none' : '';
    const warmup = r.planned_warmup == null ? '-' :
      (r.effective_warmup != null && r.effective_warmup !== r.planned_warmup ?
        `${r.planned_warmup} → ${r.effective_warmup}` : String(r.planned_warmup));
    const verdict = el('td', {}, r.error ? 'not readable' : r.verdict);
    verdict.style.color = VERDICT_COLOR[r.verdict] || '#cf222e';
    verdict.style.fontWeight = 'bold';
    const row = el('tr', {class: 'wm-run'}, [
      el('td', {}, r.run), verdict, el('td', {}, warmup),
      el('td', {}, r.extensions ? String(r.extensions) : '-'),
      el('td', {}, r.error ? r.error : alerts),
    ]);
    if (!r.error) row.addEventListener('click', () => onPick(r.run));
    body.appendChild(row);
  }
  return el('table', {class: 'wm-table'}, [
    el('thead', {}, el('tr', {}, ['run', 'verdict', 'warmup steps', 'extensions', 'alerts']
      .map((h) => el('th', {}, h)))),
    body,
  ]);
}

async function showRun(name, detail) {
  detail.replaceChildren(el('p', {class: 'wm-muted'}, 'Loading ' + name + '…'));
  let data;
  try {
    data = await getJson('./run?' + new URLSearchParams({run: name}));
  } catch (e) {
    detail.replaceChildren(el('p', {}, 'Could not load ' + name + ': ' + e));
    return;
  }
  const s = data.summary;
  const verdict = el('span', {class: 'wm-verdict'}, s.verdict);
  verdict.style.color = VERDICT_COLOR[s.verdict] || '#cf222e';
  const parts = [
    el('h3', {}, [el('span', {}, data.run + ': '), verdict]),
    el('ul', {class: 'wm-advice'}, s.advice.map((a) => el('li', {}, a))),
  ];
  if (s.problems.length) {
    parts.push(el('ul', {class: 'wm-problems'}, s.problems.map((p) => el('li', {}, 'skipped: ' + p))));
  }
  const markers = markersOf(data.alerts, s);
  const last = s.last_step == null ? 1 : s.last_step;
  const x0 = s.first_step == null ? 0 : s.first_step;
  parts.push(el('h4', {}, 'Alerts timeline'));
  parts.push(timeline(data.alerts, markers, x0, last));
  const charts = el('div', {class: 'wm-charts'});
  for (const [key, title, log] of CHARTS) {
    if (data.curves[key]) charts.appendChild(chart(title, data.curves[key], log, markers, x0, last));
  }
  parts.push(charts);
  parts.push(el('h4', {}, `Alerts (${data.alerts.length})`));
  parts.push(alertTable(data.alerts));
  detail.replaceChildren(...parts);
}

function markersOf(alerts, s) {
  const out = [];
  for (const a of alerts) {
    if (a.kind === 'warmup_extended') continue;
    out.push({step: a.step, color: INSTABILITY.has(a.kind) ? '#cf222e' : '#8c959f',
      dash: INSTABILITY.has(a.kind) ? '' : '2,2', label: `${a.kind} at step ${a.step}: ${a.message}`});
  }
  for (const e of s.extensions) {
    out.push({step: e.step, color: '#8250df', dash: '6,3',
      label: `warmup extended at step ${e.step}: ${e.old ?? '?'} → ${e.new ?? '?'} steps`});
  }
  for (const end of new Set([s.planned_warmup, s.effective_warmup])) {
    if (end != null) out.push({step: end, color: '#24292f', dash: '8,3,2,3', label: `end of warmup (${end})`});
  }
  return out;
}

function timeline(alerts, markers, x0, x1) {
  const w = 900, h = 46, pad = 50;
  const svg = svgEl('svg', {width: w, height: h, class: 'wm-svg'});
  const sx = (x) => pad + (w - 2 * pad) * (x - x0) / Math.max(1, x1 - x0);
  svg.appendChild(svgEl('line', {x1: pad, x2: w - pad, y1: 22, y2: 22, stroke: '#d0d7de'}));
  for (const m of markers) {
    if (m.color === '#24292f' || m.color === '#8250df') {
      const line = svgEl('line', {x1: sx(m.step), x2: sx(m.step), y1: 6, y2: 38, stroke: m.color,
        'stroke-dasharray': m.dash});
      line.appendChild(svgText('title', m.label));
      svg.appendChild(line);
    }
  }
  for (const a of alerts) {
    if (a.kind === 'warmup_extended') continue;
    const dot = svgEl('circle', {cx: sx(a.step), cy: 22, r: 5,
      fill: INSTABILITY.has(a.kind) ? '#cf222e' : '#8c959f', 'fill-opacity': 0.7});
    dot.appendChild(svgText('title', `${a.kind} at step ${a.step}: ${a.message}`));
    svg.appendChild(dot);
  }
  svg.appendChild(svgText('text', String(x0), {x: pad, y: 44, 'font-size': 10, 'text-anchor': 'middle'}));
  svg.appendChild(svgText('text', String(x1), {x: w - pad, y: 44, 'font-size': 10, 'text-anchor': 'middle'}));
  return svg;
}

function chart(title, points, log, markers, x0, x1) {
  const w = 440, h = 220, left = 58, right = 10, top = 22, bottom = 28;
  const pts = points.filter(([, y]) => y != null && (!log || y > 0));
  const svg = svgEl('svg', {width: w, height: h, class: 'wm-svg'});
  svg.appendChild(svgText('text', title, {x: left, y: 14, 'font-size': 12, 'font-weight': 'bold'}));
  if (!pts.length) return svg;
  const f = log ? Math.log10 : (v) => v;
  let lo = Math.min(...pts.map(([, y]) => f(y))), hi = Math.max(...pts.map(([, y]) => f(y)));
  if (hi === lo) { hi += 1; lo -= log ? 1 : 0; }
  const sx = (x) => left + (w - left - right) * (x - x0) / Math.max(1, x1 - x0);
  const sy = (y) => top + (h - top - bottom) * (1 - (f(y) - lo) / (hi - lo));
  svg.appendChild(svgEl('rect', {x: left, y: top, width: w - left - right, height: h - top - bottom,
    fill: 'none', stroke: '#d0d7de'}));
  for (const m of markers) {
    if (m.step < x0 || m.step > x1) continue;
    const line = svgEl('line', {x1: sx(m.step), x2: sx(m.step), y1: top, y2: h - bottom,
      stroke: m.color, 'stroke-dasharray': m.dash, 'stroke-opacity': 0.8});
    line.appendChild(svgText('title', m.label));
    svg.appendChild(line);
  }
  const d = pts.map(([x, y], i) => `${i ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');
  svg.appendChild(svgEl('path', {d, fill: 'none', stroke: '#0969da', 'stroke-width': 1.3}));
  const fmt = (v) => (log ? Math.pow(10, v) : v).toPrecision(3);
  svg.appendChild(svgText('text', fmt(hi), {x: left - 4, y: top + 4, 'font-size': 10, 'text-anchor': 'end'}));
  svg.appendChild(svgText('text', fmt(lo), {x: left - 4, y: h - bottom, 'font-size': 10, 'text-anchor': 'end'}));
  svg.appendChild(svgText('text', String(x0), {x: left, y: h - 10, 'font-size': 10}));
  svg.appendChild(svgText('text', String(x1) + ' (step)', {x: w - right, y: h - 10, 'font-size': 10,
    'text-anchor': 'end'}));
  return svg;
}

function alertTable(alerts) {
  if (!alerts.length) return el('p', {class: 'wm-muted'}, 'No alert.');
  const fmt = (v) => typeof v === 'number' ? v.toPrecision(4) : String(v);
  return el('table', {class: 'wm-table'}, [
    el('thead', {}, el('tr', {}, ['step', 'kind', 'message', 'value', 'threshold']
      .map((h) => el('th', {}, h)))),
    el('tbody', {}, alerts.map((a) => el('tr', {}, [
      el('td', {}, String(a.step)), el('td', {}, a.kind), el('td', {}, a.message),
      el('td', {}, fmt(a.value)), el('td', {}, fmt(a.threshold)),
    ]))),
  ]);
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs = {}, children = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  append(node, children);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function svgText(tag, text, attrs = {}) {
  const node = svgEl(tag, attrs);
  node.textContent = text;
  return node;
}

function append(node, children) {
  if (children == null) return;
  if (typeof children === 'string') node.textContent = children;
  else if (Array.isArray(children)) children.forEach((c) => append(node, c));
  else node.appendChild(children);
}

function addStyle() {
  const style = document.createElement('style');
  style.textContent = `
    body { font-family: Roboto, system-ui, sans-serif; margin: 16px; color: #1f2328; }
    .wm-muted { color: #57606a; }
    .wm-table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
    .wm-table td, .wm-table th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left;
      vertical-align: top; }
    .wm-table th { background: #f6f8fa; }
    .wm-run { cursor: pointer; }
    .wm-run:hover { background: #f6f8fa; }
    .wm-verdict { font-weight: bold; }
    .wm-problems { color: #9a6700; }
    .wm-charts { display: flex; flex-wrap: wrap; gap: 8px; }
    .wm-svg { font-family: Roboto, system-ui, sans-serif; }
  `;
  document.head.appendChild(style);
}
