// The live dashboard: a page of products kept current over one WebSocket (rowcast.js), with
// forms that write through the REST API. Subscribes by id to the rows on screen (with watcher
// counts: how many sockets on every instance watch each row), and to every product for the event
// log and the changes-per-second plot. The change message carries no commit time: "since commit"
// is counted from its arrival, which follows the commit by milliseconds.
import { connect } from "/rowcast.js";

const PAGE = 20;
const $ = (id) => document.getElementById(id);
const rows = new Map(); // productId -> <tr>
let pageStarts = [0];
let nextAfter = null;
let subscribed = [];
const watchers = new Map(); // productId -> sockets watching it (presence)
const LOG_SIZE = 50;
const PLOT_SECONDS = 300;
const perSecond = new Array(PLOT_SECONDS).fill(0); // oldest first; the last is the current second
let plotSecond = Math.floor(Date.now() / 1000);

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/websocket`;
const client = connect(wsUrl, {
  onState(state, info) {
    const pill = $("connection");
    pill.dataset.state = state;
    pill.textContent =
      state === "resumed" && info.since !== null && info.since !== undefined
        ? `resumed from seq ${info.since}`
        : state === "reconnecting" ? `reconnecting (attempt ${info.attempt})…` : state;
  },
  onReset() { loadPage(); },
});
window.rowcastClient = client;

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function render(tr, product) {
  tr.replaceChildren(
    cell(product.productId), cell(product.productName), cell(product.manufacturer),
    cell(product.pricePerUnit, "num"), cell(product.unitsAvailable, "num"),
    cell(watchers.get(product.productId) ?? "", "num watchers"));
  const actions = document.createElement("td");
  const edit = document.createElement("button");
  edit.textContent = "Edit";
  edit.onclick = () => startEdit(product);
  const del = document.createElement("button");
  del.textContent = "Delete";
  del.className = "delete";
  del.onclick = () => remove(product.productId);
  actions.append(edit, " ", del);
  tr.append(actions);
  tr.dataset.product = JSON.stringify(product);
}

function flash(tr) {
  tr.classList.remove("flash");
  void tr.offsetWidth; // restart the animation
  tr.classList.add("flash");
}

function onChange(change) {
  $("last-seq").textContent = change.seq;
  const id = change.product.productId;
  let tr = rows.get(id);
  if (!tr) {
    if (change.action !== "INSERT") return;
    tr = document.createElement("tr");
    tr.id = `product-${id}`;
    rows.set(id, tr);
    $("rows").append(tr);
    $("empty").hidden = true;
    labelPage();
  }
  tr.classList.toggle("deleted", change.action === "DELETE");
  render(tr, change.product);
  tr.dataset.seq = change.seq;
  flash(tr);
}

// The range of ids the table shows: rows inserted live join the page, so the label follows the
// rows, not the page as it was loaded.
function labelPage() {
  const ids = [...rows.keys()];
  $("page").textContent = ids.length ? `ids ${Math.min(...ids)}–${Math.max(...ids)}` : "";
}

async function loadPage() {
  const after = pageStarts[pageStarts.length - 1];
  const response = await fetch(`/products?after=${after}&limit=${PAGE}`);
  const products = await response.json();
  nextAfter = response.headers.get("link") ? products[products.length - 1].productId : null;
  $("next").disabled = nextAfter === null;
  $("prev").disabled = pageStarts.length < 2;
  client.unsubscribe(subscribed);
  rows.clear();
  const body = $("rows");
  body.replaceChildren();
  for (const product of products) {
    const tr = document.createElement("tr");
    tr.id = `product-${product.productId}`;
    render(tr, product);
    rows.set(product.productId, tr);
    body.append(tr);
  }
  $("empty").hidden = products.length > 0;
  labelPage();
  // The visible ids, plus the next few on the last page so new products show up live.
  subscribed = products.map((p) => p.productId);
  if (nextAfter === null) {
    const last = products.length ? products[products.length - 1].productId : after;
    for (let id = last + 1; subscribed.length < PAGE; id++) subscribed.push(id);
  }
  client.subscribe(subscribed, {
    snapshot: true,
    presence: true,
    onPresence(count, productId) {
      watchers.set(productId, count);
      const td = rows.get(productId)?.querySelector("td.watchers");
      if (td) td.textContent = count;
    },
    onChange,
    onSnapshot(product, { productId, seq }) {
      $("last-seq").textContent = Math.max(seq, Number($("last-seq").textContent) || 0);
      const tr = rows.get(productId);
      if (tr && product) render(tr, product);
    },
  });
}

function startEdit(product) {
  const form = $("editor");
  for (const name of ["productId", "productName", "manufacturer", "pricePerUnit", "unitsAvailable"]) {
    form.elements[name].value = product[name];
  }
  $("editor-title").textContent = `Edit product ${product.productId}`;
  $("save").textContent = "Save";
}

function resetForm() {
  $("editor").reset();
  $("editor").elements.productId.value = "";
  $("editor-title").textContent = "New product";
  $("save").textContent = "Create";
}

async function remove(id) {
  const response = await fetch(`/products/${id}`, { method: "DELETE" });
  if (!response.ok) $("message").textContent = (await response.json()).message;
}

$("editor").onsubmit = async (event) => {
  event.preventDefault();
  const form = event.target;
  const id = form.elements.productId.value;
  const body = {
    productName: form.elements.productName.value,
    manufacturer: form.elements.manufacturer.value,
    pricePerUnit: form.elements.pricePerUnit.value,
    unitsAvailable: Number(form.elements.unitsAvailable.value),
  };
  const response = await fetch(id ? `/products/${id}` : "/products", {
    method: id ? "PATCH" : "POST",
    headers: { "content-type": id ? "application/merge-patch+json" : "application/json" },
    body: JSON.stringify(body),
  });
  $("message").textContent = response.ok ? "" : (await response.json()).message;
  if (response.ok) resetForm();
};
$("cancel").onclick = resetForm;
$("next").onclick = () => { if (nextAfter !== null) { pageStarts.push(nextAfter); loadPage(); } };
$("prev").onclick = () => { if (pageStarts.length > 1) { pageStarts.pop(); loadPage(); } };

async function pollStats() {
  try {
    const stats = await (await fetch("/stats")).json();
    $("rate").textContent = stats.changesPerSecond.toFixed(1);
    $("sessions").textContent = stats.sessions;
    if (!$("last-seq").textContent || $("last-seq").textContent === "–") $("last-seq").textContent = stats.lastSeq;
  } catch { /* the server is restarting; the pill says so */ }
}
// --- event log and rate plot: every product's changes ---

/** Moves the plot's window to the current second. */
function advancePlot(now) {
  const second = Math.floor(now / 1000);
  const steps = Math.min(PLOT_SECONDS, second - plotSecond);
  for (let i = 0; i < steps; i++) { perSecond.shift(); perSecond.push(0); }
  if (steps > 0) plotSecond = second;
}

// Changes are counted as they arrive but drawn at most once per frame, and only the newest
// LOG_SIZE of them: a burst of thousands costs the page one small redraw.
let pendingLog = [];
function logChange(change) {
  const now = Date.now();
  advancePlot(now);
  perSecond[PLOT_SECONDS - 1] += 1;
  if (pendingLog.push({ change, now }) === 1) requestAnimationFrame(flushLog);
  if (pendingLog.length > LOG_SIZE) pendingLog.shift();
}

function flushLog() {
  const log = $("log");
  for (const { change, now } of pendingLog) {
    const tr = document.createElement("tr");
    tr.className = change.action;
    tr.dataset.arrived = now;
    tr.dataset.seq = change.seq;
    tr.append(cell(change.seq, "num"), cell(change.action),
      cell(`${change.product.productId} ${change.product.productName}`),
      cell(ageText(Date.now() - now), "num age"));
    log.prepend(tr);
  }
  pendingLog = [];
  while (log.children.length > LOG_SIZE) log.lastElementChild.remove();
}

function ageText(ms) {
  const s = Math.floor(ms / 1000);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min` : `${Math.floor(s / 3600)} h`;
}

function drawPlot() {
  advancePlot(Date.now());
  const canvas = $("rate-plot");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = 24;
  const max = Math.max(1, ...perSecond);
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#d4d4d8";
  ctx.fillStyle = "#71717a";
  ctx.font = "11px system-ui, sans-serif";
  ctx.beginPath();
  ctx.moveTo(pad, height - pad); ctx.lineTo(width, height - pad);
  ctx.moveTo(pad, 4); ctx.lineTo(pad, height - pad);
  ctx.stroke();
  ctx.fillText(`${max}/s`, 2, 12);
  ctx.fillText("0", 12, height - pad);
  ctx.fillText("-5 min", pad, height - 6);
  ctx.fillText("now", width - 26, height - 6);
  ctx.strokeStyle = "#2563eb";
  ctx.fillStyle = "rgba(37, 99, 235, 0.15)";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const x = (i) => pad + (i * (width - pad)) / (PLOT_SECONDS - 1);
  const y = (v) => height - pad - (v * (height - pad - 8)) / max;
  perSecond.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  ctx.stroke();
  ctx.lineTo(x(PLOT_SECONDS - 1), y(0)); ctx.lineTo(x(0), y(0)); ctx.closePath(); ctx.fill();
  ctx.lineWidth = 1;
  canvas.dataset.total = perSecond.reduce((a, b) => a + b, 0);
  canvas.dataset.max = max;
  for (const tr of $("log").children) {
    tr.querySelector("td.age").textContent = ageText(Date.now() - Number(tr.dataset.arrived));
  }
}

client.subscribeAll({ onChange: logChange });
setInterval(drawPlot, 1000);
drawPlot();
setInterval(pollStats, 1000);
pollStats();
loadPage();
