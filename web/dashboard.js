// The live dashboard: a page of products kept current over one WebSocket (rowcast.js), with
// forms that write through the REST API. Subscribes only to the rows on screen.
import { connect } from "/rowcast.js";

const PAGE = 20;
const $ = (id) => document.getElementById(id);
const rows = new Map(); // productId -> <tr>
let pageStarts = [0];
let nextAfter = null;
let subscribed = [];

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
    cell(product.pricePerUnit, "num"), cell(product.unitsAvailable, "num"));
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
  }
  tr.classList.toggle("deleted", change.action === "DELETE");
  render(tr, change.product);
  tr.dataset.seq = change.seq;
  flash(tr);
}

async function loadPage() {
  const after = pageStarts[pageStarts.length - 1];
  const response = await fetch(`/products?after=${after}&limit=${PAGE}`);
  const products = await response.json();
  nextAfter = response.headers.get("link") ? products[products.length - 1].productId : null;
  $("next").disabled = nextAfter === null;
  $("prev").disabled = pageStarts.length < 2;
  $("page").textContent = products.length ? `ids ${products[0].productId}–${products[products.length - 1].productId}` : "";
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
  // The visible ids, plus the next few on the last page so new products show up live.
  subscribed = products.map((p) => p.productId);
  if (nextAfter === null) {
    const last = products.length ? products[products.length - 1].productId : after;
    for (let id = last + 1; subscribed.length < PAGE; id++) subscribed.push(id);
  }
  client.subscribe(subscribed, {
    snapshot: true,
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
setInterval(pollStats, 1000);
pollStats();
loadPage();
