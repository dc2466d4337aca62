// The "Warmup" tab of TensorBoard (warmup_monitor). Plain JavaScript, no build step; charts by
// uPlot (MIT, shipped beside this file with its licence; see README.md there for why).
// Every text that comes from a run (names, alert kinds and messages, advice) is set with
// textContent, never parsed as HTML: a run named <script> shows as text.
//
// Deep link: the tab reads and writes `run=NAME` (and `overlay=A,B`) in the hash of its own page
// (/data/plugin_entry.html?name=warmup_monitor#run=NAME) and, inside TensorBoard, the
// `wm_run` (and `wm_overlay=A,B`) query parameters of the TensorBoard page
// (/?wm_run=NAME#warmup_monitor).

const BASE = new URL('./', import.meta.url);
const INSTABILITY = new Set([
  'loss_spike', 'loss_trend_spike', 'grad_norm_spike', 'loss_divergence', 'grad_norm_rise',
  'non_finite', 'oscillation', 'persistent_instability', 'warmup_exhausted', 'edge_of_stability',
]);
const VERDICT_COLOR = {
  'healthy': '#1a7f37', 'unstable but recovered': '#9a6700', 'unstable': '#cf222e',
  'too short to judge': '#57606a',
};
const RUN_COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b',
  '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
// Marks drawn on the charts: kind -> [label, colour, size, chart].
const MARKS = {
  instability: ['instability alert', '#cf222e', 7, 'loss'],
  transient: ['transient (recovered at once)', '#8c959f', 7, 'loss'],
  warmup_extended: ['warmup extended', '#8250df', 10, 'lr'],
  lr_backoff: ['lr back-off', '#bf8700', 10, 'lr'],
  rollback: ['rollback', '#000000', 10, 'lr'],
  warmup_exhausted: ['warmup exhausted', '#cf222e', 10, 'lr'],
};
const CHARTS = [
  ['lr', 'learning rate', false],
  ['loss', 'loss (log scale)', true],
  ['grad_norm', 'gradient norm (log scale)', true],
  ['grad_cosine', 'cosine of consecutive gradients', false],
];

const state = {runs: [], focus: null, overlay: new Set(), data: new Map(), plots: []};

export async function render() {
  addStyle();
  await loadUPlot();
  const root = el('div', {class: 'wm-root'});
  document.body.appendChild(root);
  root.appendChild(el('h2', {}, 'Warmup'));
  const status = root.appendChild(el('p', {class: 'wm-muted', id: 'wm-status'}, 'Loading runs…'));
  const list = root.appendChild(el('div', {id: 'wm-runs'}));
  const detail = root.appendChild(el('div', {class: 'wm-detail', id: 'wm-detail'}));
  try {
    state.runs = (await getJson('runs')).runs;
  } catch (e) {
    status.textContent = 'Could not load the runs: ' + e;
    return;
  }
  status.textContent = state.runs.length ?
    'Runs of the monitor under the log directory. Click a run to see it; tick runs to overlay them.' :
    'No run of the monitor under the log directory.';
  const link = readLink();
  for (const name of link.overlay) if (state.runs.some((r) => r.run === name)) state.overlay.add(name);
  list.appendChild(runTable(detail));
  const wanted = state.runs.find((r) => r.run === link.run && !r.error);
  const first = wanted || state.runs.find((r) => !r.error);
  if (first) await showRun(first.run, detail);
}

// ------------------------------------------------------------------ deep links

function readLink() {
  const out = {run: null, overlay: []};
  const params = new URLSearchParams(location.hash.slice(1));
  try {
    const parent = new URLSearchParams(window.parent.location.search);
    if (parent.get('wm_run')) out.run = parent.get('wm_run');
    if (parent.get('wm_overlay')) out.overlay = parent.get('wm_overlay').split(',').filter(Boolean);
  } catch (e) { /* not inside TensorBoard, or another origin */ }
  if (params.get('run')) out.run = params.get('run');
  if (params.get('overlay')) out.overlay = params.get('overlay').split(',').filter(Boolean);
  return out;
}

function writeLink() {
  const params = new URLSearchParams();
  if (state.focus) params.set('run', state.focus);
  if (state.overlay.size) params.set('overlay', [...state.overlay].join(','));
  history.replaceState(null, '', '#' + params.toString());
  try {
    if (window.parent !== window && state.focus) {
      const url = new URL(window.parent.location.href);
      url.searchParams.set('wm_run', state.focus);
      window.parent.history.replaceState(window.parent.history.state, '', url.toString());
    }
  } catch (e) { /* another origin: the tab's own hash still links */ }
}

// ------------------------------------------------------------------ runs table

function runTable(detail) {
  const body = el('tbody');
  for (const r of state.runs) {
    const alerts = r.alerts ?
      Object.entries(r.alerts).map(([k, n]) => `${k} ×${n}`).join(', ') || 'none' : '';
    const warmup = r.planned_warmup == null ? '-' :
      (r.effective_warmup != null && r.effective_warmup !== r.planned_warmup ?
        `${r.planned_warmup} → ${r.effective_warmup}` : String(r.planned_warmup));
    const verdict = el('td', {class: 'wm-verdict'}, r.error ? 'not readable' : r.verdict);
    verdict.style.color = VERDICT_COLOR[r.verdict] || '#cf222e';
    if (r.verdict_reason) verdict.title = r.verdict_reason;
    const box = el('input', {type: 'checkbox', 'aria-label': 'overlay ' + r.run});
    box.checked = state.overlay.has(r.run);
    box.disabled = Boolean(r.error);
    box.addEventListener('click', (ev) => {
      ev.stopPropagation();
      if (box.checked) state.overlay.add(r.run); else state.overlay.delete(r.run);
      writeLink();
      if (state.focus) showRun(state.focus, detail);
    });
    const row = el('tr', {class: 'wm-run', 'data-run': r.run}, [
      el('td', {}, box), el('td', {class: 'wm-name'}, r.run), verdict, el('td', {}, warmup),
      el('td', {}, r.episodes == null ? '-' : (r.episodes || !r.unstable_steps ? String(r.episodes) :
        `${r.unstable_steps} flagged step(s), no episode ids`)),
      el('td', {}, r.error ? r.error : alerts),
    ]);
    if (!r.error) row.addEventListener('click', () => showRun(r.run, detail));
    body.appendChild(row);
  }
  return el('table', {class: 'wm-table'}, [
    el('thead', {}, el('tr', {}, ['overlay', 'run', 'verdict', 'warmup steps', 'episodes', 'alerts']
      .map((h) => el('th', {}, h)))),
    body,
  ]);
}

async function runData(name) {
  if (!state.data.has(name)) state.data.set(name, await getJson('run?' + new URLSearchParams({run: name})));
  return state.data.get(name);
}

// ------------------------------------------------------------------ one run

async function showRun(name, detail) {
  state.focus = name;
  writeLink();
  for (const row of document.querySelectorAll('.wm-run')) {
    row.classList.toggle('wm-selected', row.dataset.run === name);
  }
  detail.replaceChildren(el('p', {class: 'wm-muted'}, 'Loading ' + name + '…'));
  let runs;
  try {
    const names = [name, ...[...state.overlay].filter((n) => n !== name)];
    runs = await Promise.all(names.map(runData));
  } catch (e) {
    detail.replaceChildren(el('p', {}, 'Could not load ' + name + ': ' + e));
    return;
  }
  const data = runs[0];
  const s = data.summary;
  const verdict = el('span', {class: 'wm-verdict'}, s.verdict);
  verdict.style.color = VERDICT_COLOR[s.verdict] || '#cf222e';
  const parts = [
    el('h3', {id: 'wm-focus'}, [el('span', {}, data.run + ': '), verdict]),
    el('p', {class: 'wm-reason'}, 'Why: ' + s.verdict_reason),
    el('ul', {class: 'wm-advice'}, s.advice.map((a) => el('li', {}, a))),
  ];
  if (s.problems.length) {
    parts.push(el('ul', {class: 'wm-problems'}, s.problems.map((p) => el('li', {}, 'skipped: ' + p))));
  }
  if (runs.length > 1) {
    parts.push(el('p', {class: 'wm-muted'}, 'Overlaid: ' + runs.slice(1).map((r) => r.run).join(', ')));
  }
  parts.push(el('p', {class: 'wm-muted'},
    'Drag on a chart to zoom (double-click to reset); the legend under each chart reads the ' +
    'values under the cursor. Shaded: unstable episodes; dotted: end of warmup.'));
  const charts = el('div', {class: 'wm-charts'});
  parts.push(charts);
  const inside = el('div', {class: 'wm-layers'});
  if (data.layers) {
    parts.push(el('h4', {}, `Inside the model: ${data.layers.groups.length} groups` +
      (runs.length > 1 ? ` (${data.run})` : '')));
    parts.push(el('p', {class: 'wm-muted'},
      'Rows: groups of layers, the bottom of the network at the bottom; colour: log10 of the ' +
      'value (the mean of log10 over a column when a column spans several steps). A collapse ' +
      'shows as the bottom rows\' gradient share going dark; an exploding layer as its update ' +
      'ratio going bright. Hover for values; dotted: end of warmup.'));
    parts.push(inside);
  }
  parts.push(el('h4', {}, `Episodes (${s.episodes.length}) and alerts (${data.alerts.length})`));
  parts.push(episodeList(data));
  detail.replaceChildren(...parts);
  for (const p of state.plots) p.destroy();
  state.plots = [];
  const sync = uPlot.sync('wm');
  for (const [key, title, log] of CHARTS) {
    if (!runs.some((r) => r.curves[key])) continue;
    const box = charts.appendChild(el('div', {class: 'wm-chart', 'data-chart': key}));
    box.appendChild(el('div', {class: 'wm-chart-title'}, title));
    state.plots.push(chart(box, key, runs, log, sync));
  }
  if (data.layers) {
    for (const [stat, title] of HEATMAPS) {
      if (!data.layers[stat].some((row) => row.some((v) => v != null))) continue;
      const box = inside.appendChild(el('div', {class: 'wm-chart wm-heatmap', 'data-heatmap': stat}));
      box.appendChild(el('div', {class: 'wm-chart-title'}, title));
      state.plots.push(heatmap(box, data, stat, sync));
    }
  }
}

// ------------------------------------------------------------------ per-group heatmaps

const HEATMAPS = [
  ['grad_share', 'gradient share of each group: group norm / global norm (log10)'],
  ['update_ratio', 'update ratio of each group: ‖Δθ‖ / ‖θ‖ (log10)'],
];
// Colour maps as stops (matplotlib's viridis and magma), interpolated in RGB.
const CMAPS = {
  grad_share: ['#440154', '#472c7a', '#3b518b', '#2c718e', '#21908d', '#27ad81', '#5cc863',
    '#aadc32', '#fde725'],
  update_ratio: ['#000004', '#1c1044', '#4f127b', '#812581', '#b5367a', '#e55064', '#fb8761',
    '#fec287', '#fcfdbf'],
};
// The bottom of the gradient-share scale (log10), as in the report; a value of 0 comes as ZERO.
const SHARE_FLOOR = -7;
const ZERO = -99;

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function colour(stops, t) {
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t));
  const a = rgb(stops[i]), b = rgb(stops[i + 1]), f = t - i;
  return `rgb(${a.map((x, k) => Math.round(x + (b[k] - x) * f)).join(',')})`;
}

function shortNames(groups) {
  // Without the dotted prefix every group shares (model.transformer.h.0 -> h.0).
  if (groups.length < 2) return groups.slice();
  const parts = groups.map((g) => g.split('.'));
  let common = 0;
  while (parts.every((p) => p.length > common + 1 && p[common] === parts[0][common])) common++;
  return parts.map((p) => p.slice(common).join('.'));
}

function heatLimits(rows, stat) {
  const vals = rows.flat().filter((v) => v != null && v > ZERO).sort((a, b) => a - b);
  if (!vals.length) return [-1, 0];
  let lo = vals[Math.floor(0.01 * (vals.length - 1))], hi = vals[vals.length - 1];
  if (stat === 'grad_share') { lo = Math.max(SHARE_FLOOR, Math.min(lo, -1)); hi = 0; }
  if (hi - lo < 1) lo = hi - 1;
  return [Math.floor(lo * 2) / 2, Math.ceil(hi * 2) / 2];
}

function heatmap(box, data, stat, sync) {
  const L = data.layers;
  const rows = L[stat], xs = L.steps, w = L.width, n = L.groups.length;
  const names = shortNames(L.groups);
  const [lo, hi] = heatLimits(rows, stat);
  const stops = CMAPS[stat];
  const every = Math.max(1, Math.ceil(n / 24));
  const ticks = [];
  for (let g = 0; g < n; g += every) ticks.push(g);
  const readout = el('div', {class: 'wm-muted wm-readout'}, 'hover a cell for its group, step and value');
  const end = data.summary.effective_warmup || data.summary.planned_warmup;
  const paint = (u) => {
    const ctx = u.ctx;
    const {left, top, width, height} = u.bbox;
    ctx.save();
    ctx.beginPath(); ctx.rect(left, top, width, height); ctx.clip();
    for (let g = 0; g < n; g++) {
      const y0 = u.valToPos(g + 0.5, 'y', true), y1 = u.valToPos(g - 0.5, 'y', true);
      const row = rows[g];
      for (let i = 0; i < xs.length; i++) {
        const v = row[i];
        if (v == null) continue;
        const x0 = u.valToPos(xs[i] - 0.5, 'x', true), x1 = u.valToPos(xs[i] + w - 0.5, 'x', true);
        ctx.fillStyle = colour(stops, (v - lo) / (hi - lo));
        ctx.fillRect(x0, y0, Math.max(1, x1 - x0 + 0.5), Math.max(1, y1 - y0 + 0.5));
      }
    }
    if (end != null) {
      const x = u.valToPos(end - 0.5, 'x', true);
      ctx.strokeStyle = '#ffffff'; ctx.setLineDash([2, 3]); ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    }
    ctx.restore();
  };
  const read = (u) => {
    const {left, top} = u.cursor;
    if (left == null || left < 0) return;
    const step = u.posToVal(left, 'x'), g = Math.round(u.posToVal(top, 'y'));
    const i = Math.floor((step - xs[0] + 0.5) / w);
    if (g < 0 || g >= n || i < 0 || i >= xs.length) return;
    const v = rows[g][i];
    const span = w > 1 ? `steps ${xs[i]}-${xs[i] + w - 1}` : `step ${xs[i]}`;
    readout.textContent = `${L.groups[g]} · ${span} · ` +
      (v == null ? 'not logged' : v <= ZERO ? `${stat.replace('_', ' ')} 0` :
        `${stat.replace('_', ' ')} ${Math.pow(10, v).toPrecision(3)} (log10 ${v.toFixed(2)})`);
  };
  const opts = {
    width: Math.min(1100, Math.max(480, (document.body.clientWidth || 1000) - 60)),
    height: Math.max(150, Math.min(600, 13 * n + 60)),
    series: [{label: 'step'}, {label: stat, stroke: 'transparent', points: {show: false}}],
    scales: {x: {time: false, auto: false, range: [xs[0] - 0.5, xs[xs.length - 1] + w - 0.5]},
      y: {auto: false, range: [-0.5, n - 0.5]}},
    axes: [{label: 'optimizer step', size: 40},
      {size: Math.min(240, Math.max(60, 24 + 8 * Math.max(...names.map((s) => s.length)))),
        splits: () => ticks, values: (u, vals) => vals.map((v) => names[v] ?? '')}],
    cursor: {sync: {key: sync.key}, drag: {x: true, y: false}, points: {show: false}},
    legend: {show: false},
    hooks: {draw: [paint], setCursor: [read]},
  };
  const plot = new uPlot(opts, [xs, xs.map(() => null)], box);
  const bar = el('div', {class: 'wm-colorbar'}, [
    el('span', {}, `10^${lo}`),
    el('span', {class: 'wm-ramp'}),
    el('span', {}, `10^${hi}`),
  ]);
  bar.querySelector('.wm-ramp').style.background =
    `linear-gradient(to right, ${stops.join(', ')})`;
  box.appendChild(bar);
  box.appendChild(readout);
  return plot;
}

function lrIsLog(runs) {
  const peaks = runs.map((r) => r.summary.peak_lr).filter((p) => typeof p === 'number' && p > 0);
  return peaks.length > 1 && Math.max(...peaks) >= 10 * Math.min(...peaks);
}

function valueAt(points, step) {
  // points: [[step, value], ...] ascending; the value at the last step <= `step`.
  let lo = 0, hi = points.length - 1, best = null;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] <= step) { best = points[mid][1]; lo = mid + 1; } else hi = mid - 1;
  }
  return best;
}

function chart(box, key, runs, log, sync) {
  if (key === 'lr' && lrIsLog(runs)) log = true;
  const columns = [];  // [{label, stroke, points, dash, marker, width}]
  const several = runs.length > 1;
  runs.forEach((r, i) => {
    const color = RUN_COLORS[i % RUN_COLORS.length];
    const name = several ? r.run + ' ' : '';
    const points = r.curves[key];
    if (points) columns.push({label: name + key, stroke: color, points});
    if (key === 'loss') {
      if (r.curves.val_loss) {
        columns.push({label: name + 'validation loss', stroke: color, points: r.curves.val_loss,
          dash: [6, 4], marker: 4});
      }
      if (r.spike_threshold != null && points && points.length) {
        columns.push({label: name + '10x initial loss', stroke: color, dash: [2, 4], width: 1,
          points: [[points[0][0], r.spike_threshold]], constant: r.spike_threshold});
      }
    }
    for (const [kind, [label, mcolor, size, where]] of Object.entries(MARKS)) {
      if (where !== key) continue;
      const steps = markSteps(r, kind);
      if (!steps.length || !points) continue;
      columns.push({label: name + label, stroke: mcolor, marker: size, fill: several ? color : mcolor,
        points: steps.map((st) => [st, valueAt(points, st)]).filter(([, v]) => v != null && (!log || v > 0))});
    }
  });
  const xs = [...new Set(columns.flatMap((c) => c.points.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const data = [xs];
  for (const c of columns) {
    const ys = new Array(xs.length).fill(null);
    for (const [x, y] of c.points) ys[index.get(x)] = (y == null || (log && y <= 0)) ? null : y;
    if (c.constant != null) ys.fill(c.constant);
    data.push(ys);
  }
  const series = [{label: 'step'}];
  for (const c of columns) {
    series.push(c.marker ? {
      label: c.label, stroke: c.stroke, fill: c.dash ? undefined : (c.fill || c.stroke),
      width: c.dash ? 1.2 : 0, dash: c.dash, spanGaps: true,
      paths: c.dash ? undefined : () => null,
      points: {show: true, size: c.marker, stroke: '#24292f', fill: c.fill || c.stroke, width: 1},
    } : {label: c.label, stroke: c.stroke, width: c.width || 1.3, dash: c.dash, spanGaps: true,
      points: {show: false}});
  }
  const opts = {
    width: Math.min(1100, Math.max(480, (document.body.clientWidth || 1000) - 60)),
    height: 230,
    series,
    scales: {x: {time: false}, y: log ? {distr: 3} : {}},
    axes: [{label: 'optimizer step', size: 40}, {size: 70}],
    cursor: {sync: {key: sync.key}, drag: {x: true, y: false}},
    legend: {live: true},
    hooks: {drawClear: [(u) => drawBands(u, runs)]},
  };
  return new uPlot(opts, data, box);
}

function markSteps(r, kind) {
  const alerts = r.alerts;
  if (kind === 'instability') {
    return [...new Set(alerts.filter((a) => INSTABILITY.has(a.kind) && a.kind !== 'warmup_exhausted')
      .map((a) => a.step))];
  }
  return [...new Set(alerts.filter((a) => a.kind === kind).map((a) => a.step))];
}

function spans(episodes) {
  // [start, end + 1) of each episode, overlapping or touching ones merged.
  const out = [];
  for (const [a, b] of episodes.map((e) => [e.start, e.end + 1]).sort((x, y) => x[0] - y[0])) {
    if (out.length && a <= out[out.length - 1][1]) out[out.length - 1][1] = Math.max(out[out.length - 1][1], b);
    else out.push([a, b]);
  }
  return out;
}

function drawBands(u, runs) {
  // Unstable episodes as shaded spans, the end of warmup as a dotted line, per run colour.
  const ctx = u.ctx;
  const {top, height} = u.bbox;
  ctx.save();
  runs.forEach((r, i) => {
    const color = runs.length > 1 ? RUN_COLORS[i % RUN_COLORS.length] : '#cf222e';
    ctx.fillStyle = color;
    ctx.globalAlpha = 0.12;
    for (const [a, b] of spans(r.summary.episodes)) {
      const x0 = u.valToPos(a, 'x', true), x1 = u.valToPos(b, 'x', true);
      ctx.fillRect(x0, top, Math.max(2, x1 - x0), height);
    }
    ctx.globalAlpha = 0.9;
    ctx.strokeStyle = runs.length > 1 ? color : '#24292f';
    ctx.setLineDash([2, 3]);
    for (const end of new Set([r.summary.planned_warmup, r.summary.effective_warmup])) {
      if (end == null) continue;
      const x = u.valToPos(end, 'x', true);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    }
  });
  ctx.restore();
}

// ------------------------------------------------------------------ episodes

function episodeList(data) {
  const s = data.summary;
  const box = el('div', {class: 'wm-episodes'});
  if (!data.alerts.length) {
    box.appendChild(el('p', {class: 'wm-muted'}, 'No alert.'));
    return box;
  }
  for (const e of s.episodes) {
    const ranges = e.steps.map(([a, b]) => a === b ? String(a) : `${a}-${b}`).join(', ');
    const facts = e.facts;  // worded by the report (warmup_monitor.report.episodes.Episode.facts)
    const details = el('details', {class: 'wm-episode'}, [
      el('summary', {}, facts.join(' · ')),
      el('p', {class: 'wm-muted'}, 'flagged steps: ' + ranges),
      alertTable(e.alerts.map((i) => data.alerts[i])),
    ]);
    box.appendChild(details);
  }
  const grouped = new Set(s.episodes.flatMap((e) => e.alerts));
  const others = data.alerts.filter((a, i) => !grouped.has(i));
  if (others.length) {
    box.appendChild(el('details', {class: 'wm-episode', open: ''}, [
      el('summary', {}, `actions and notes (${others.length})`), alertTable(others),
    ]));
  }
  return box;
}

function alertTable(alerts) {
  const fmt = (v) => v == null ? '\u2014' : typeof v === 'number' ? v.toPrecision(4) : String(v);
  return el('table', {class: 'wm-table'}, [
    el('thead', {}, el('tr', {}, ['step', 'kind', 'message', 'value', 'threshold']
      .map((h) => el('th', {}, h)))),
    el('tbody', {}, alerts.map((a) => el('tr', {}, [
      el('td', {}, String(a.step)), el('td', {}, a.kind), el('td', {}, a.message),
      el('td', {}, fmt(a.value)), el('td', {}, fmt(a.threshold)),
    ]))),
  ]);
}

// ------------------------------------------------------------------ plumbing

function loadUPlot() {
  const css = document.createElement('link');
  css.rel = 'stylesheet';
  css.href = new URL('uPlot.min.css', BASE).href;
  document.head.appendChild(css);
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = new URL('uPlot.iife.min.js', BASE).href;
    script.onload = resolve;
    script.onerror = () => reject(new Error('could not load uPlot'));
    document.head.appendChild(script);
  });
}

async function getJson(path) {
  const response = await fetch(new URL(path, BASE));
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
    .wm-reason { margin: 2px 0 6px; }
    .wm-table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
    .wm-table td, .wm-table th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left;
      vertical-align: top; }
    .wm-table th { background: #f6f8fa; }
    .wm-run { cursor: pointer; }
    .wm-run:hover, .wm-selected { background: #f6f8fa; }
    .wm-selected .wm-name { font-weight: bold; }
    .wm-verdict { font-weight: bold; }
    .wm-problems { color: #9a6700; }
    .wm-chart { margin: 10px 0 18px; }
    .wm-chart-title { font-weight: bold; font-size: 13px; margin-bottom: 2px; }
    .wm-episode { margin: 4px 0; font-size: 13px; }
    .wm-episode > summary { cursor: pointer; }
    .u-legend { font-size: 12px; text-align: left; }
    .wm-colorbar { display: flex; align-items: center; gap: 6px; font-size: 12px; margin: 2px 0; }
    .wm-ramp { display: inline-block; width: 240px; height: 10px; border: 1px solid #d0d7de; }
    .wm-readout { font-size: 12px; min-height: 16px; }
  `;
  document.head.appendChild(style);
}
