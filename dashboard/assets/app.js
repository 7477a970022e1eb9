// The dashboard polls /api/status (GetClusterStatus as JSON) every second
// and redraws. Plain DOM, no libraries: it must run with no network.
'use strict';

const POLL_MS = 1000;
const palette = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac',
  '#1f77b4', '#2ca02c', '#9467bd', '#8c564b', '#17becf', '#bcbd22'];
const $ = (id) => document.getElementById(id);
const num = (v) => Number(v || 0); // int64 fields arrive as strings

function fmtAge(sec) {
  sec = num(sec);
  if (sec <= 0) return '-';
  if (sec < 1) return (sec * 1000).toFixed(0) + ' ms';
  if (sec < 120) return sec.toFixed(1) + ' s';
  return (sec / 60).toFixed(1) + ' min';
}
function fmtBytes(b) {
  b = num(b);
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b) + ' ' + units[i];
}
function td(text, cls) {
  const el = document.createElement('td');
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

let cells = [];
function ensureMap(n) {
  if (cells.length === n) return;
  const map = $('map');
  map.textContent = '';
  map.style.gridTemplateColumns = `repeat(${Math.ceil(Math.sqrt(n))}, 1fr)`;
  cells = [];
  for (let p = 0; p < n; p++) {
    const c = document.createElement('div');
    c.className = 'cell';
    c.title = 'partition ' + p;
    map.appendChild(c);
    cells.push({ el: c, color: '', cls: 'cell' });
  }
}

function drawMap(s) {
  const n = num(s.partitionCount);
  ensureMap(n);
  const moving = new Set(s.movingPartitions || []);
  const frozen = new Set(s.frozenPartitions || []);
  const names = (s.shards || []).map((x) => x.name);
  for (let p = 0; p < n; p++) {
    const owner = (s.owners || [])[p] || 0;
    const color = palette[owner % palette.length];
    const cls = 'cell' + (frozen.has(p) ? ' frozen' : moving.has(p) ? ' moving' : '');
    const c = cells[p];
    if (c.color !== color) { c.el.style.background = color; c.color = color; }
    if (c.cls !== cls) { c.el.className = cls; c.cls = cls; }
    c.el.title = `partition ${p}: ${names[owner] || '?'}${frozen.has(p) ? ' (frozen)' : moving.has(p) ? ' (moving)' : ''}`;
  }
  const legend = $('legend');
  legend.textContent = '';
  names.forEach((name, i) => {
    const item = document.createElement('span');
    item.innerHTML = `<span class="swatch" style="background:${palette[i % palette.length]}"></span>`;
    item.appendChild(document.createTextNode(name));
    legend.appendChild(item);
  });
  const m = document.createElement('span');
  m.className = 'muted';
  m.textContent = `moving ${moving.size} · frozen ${frozen.size}`;
  legend.appendChild(m);
}

function drawShards(s) {
  const body = $('shards').querySelector('tbody');
  body.textContent = '';
  for (const sh of s.shards || []) {
    const tr = document.createElement('tr');
    tr.dataset.shard = sh.name;
    if (!sh.reachable) tr.className = 'down';
    const state = String(sh.state || '').replace('SHARD_STATE_', '').toLowerCase();
    tr.append(
      td(sh.name), td(sh.reachable ? state : 'UNREACHABLE'), td(num(sh.partitions)), td((100 * num(sh.share)).toFixed(1) + '%'),
      td(num(sh.weight)), td(num(sh.rows).toLocaleString()), td(fmtBytes(sh.bytes)),
      td(num(sh.qps).toFixed(1), 'qps'), td(num(sh.p99Ms).toFixed(2) + ' ms'),
      td(`${num(sh.poolAcquired)}/${num(sh.poolMax)}`), td(num(sh.backlog)), td(fmtAge(sh.oldestEventAgeSeconds)),
      td(sh.relayLeading ? 'here' : '-'));
    body.appendChild(tr);
  }
}

function drawEvents(s) {
  const e = s.events || {};
  $('ev-rate').textContent = num(e.publishedPerSecond).toFixed(1);
  $('ev-total').textContent = num(e.publishedTotal);
  $('ev-backlog').textContent = num(e.backlog);
  $('ev-oldest').textContent = fmtAge(e.oldestEventAgeSeconds);
  $('ev-watches').textContent = num(e.watchStreams);
  $('ev-sent').textContent = num(e.watchEventsSent);
  const c = s.cache || {};
  $('cache-ratio').textContent = c.enabled ? (100 * num(c.hitRatio)).toFixed(1) + '%' : 'off';
  $('cache-breaker').textContent = c.enabled ? c.breaker : '-';
}

function drawRebalance(s) {
  const r = s.rebalance;
  const table = $('moves');
  const body = table.querySelector('tbody');
  if (!r) { $('rebalance').textContent = 'none'; table.hidden = true; return; }
  const state = String(r.state || '').replace('REBALANCE_STATE_', '').toLowerCase();
  $('rebalance').textContent = `#${r.id} ${state}: ${num(r.movesDone)}/${(r.moves || []).length} moves done, ` +
    `${num(r.rowsCopied).toLocaleString()}/${num(r.rowsTotal).toLocaleString()} rows copied`;
  body.textContent = '';
  for (const m of r.moves || []) {
    const tr = document.createElement('tr');
    tr.dataset.move = m.id;
    const total = num(m.rowsTotal);
    const done = m.state === 'cleaned_up';
    const frac = done ? 1 : total > 0 ? Math.min(num(m.rowsCopied) / total, 1) : 0;
    const prog = document.createElement('td');
    prog.innerHTML = `<span class="bar"><span style="width:${(100 * frac).toFixed(1)}%"></span></span> `;
    const pct = document.createElement('span');
    pct.className = 'pct';
    pct.textContent = (100 * frac).toFixed(0) + '%';
    prog.appendChild(pct);
    tr.append(td(m.id), td(`${m.source} → ${m.target}`), td((m.partitions || []).length), td(m.state, 'state'), prog,
      td(num(m.lastFreezeMs).toFixed(1) + ' ms'), td(num(m.maxFreezeMs).toFixed(1) + ' ms'));
    body.appendChild(tr);
  }
  table.hidden = false;
}

function draw(s) {
  $('topology-version').textContent = num(s.topologyVersion);
  $('partition-count').textContent = num(s.partitionCount);
  const problems = s.problems || [];
  const h = $('health');
  h.textContent = problems.length ? 'unhealthy' : 'healthy';
  h.className = 'badge ' + (problems.length ? 'unhealthy' : 'healthy');
  const ul = $('problems');
  ul.textContent = '';
  for (const p of problems) { const li = document.createElement('li'); li.textContent = p; ul.appendChild(li); }
  drawMap(s);
  drawShards(s);
  drawEvents(s);
  drawRebalance(s);
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  document.body.dataset.polls = String(num(document.body.dataset.polls) + 1);
}

function token() { return sessionStorage.getItem('shardgate-token') || ''; }

async function poll() {
  try {
    const headers = token() ? { Authorization: 'Bearer ' + token() } : {};
    const res = await fetch('/api/status', { headers, cache: 'no-store' });
    if (res.status === 401 || res.status === 403) {
      $('auth').hidden = false;
      $('auth-error').textContent = (await res.text()).trim();
    } else if (!res.ok) {
      $('updated').textContent = 'status unavailable: ' + (await res.text()).trim();
    } else {
      $('auth').hidden = true;
      draw(await res.json());
    }
  } catch (err) {
    $('updated').textContent = 'cannot reach the server: ' + err;
  }
  setTimeout(poll, POLL_MS);
}

$('auth-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem('shardgate-token', $('auth-token').value.trim());
  $('auth-token').value = '';
});
poll();
