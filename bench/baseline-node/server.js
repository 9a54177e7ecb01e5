// Baseline for rowcast-bench: the simplest server one would write with Node.js, `ws` and
// `pg` that speaks rowcast's protocol. It is what rowcast is compared against (issue 5:
// ≥ 5× its deliveries per server CPU-second, ≤ 1/5 of its RSS per connection).
//
// Owns: the subscription map (product id → set of sockets) and one LISTEN connection on
// `product_change`, whose payload is {"action":…,"product":{…}} (bench/sql/baseline_schema.sql,
// applied at start). REST writes go to Postgres through a small pool; the trigger's
// notification is what fans out, as in rowcast.
//
// Deliberately plain: one JSON.stringify per notification (shared by all subscribers),
// no batching, no backpressure beyond ws's own buffering — the idiomatic first version.
//
// Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/rowcast_baseline node server.js --listen 127.0.0.1:18070
//        [--tls-cert server.pem --tls-key server.key]   (HTTPS/WSS on the same port instead of plain:
//        node's `https` server with the PEM chain and key; `ws` upgrades over it unchanged)

'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const path = require('path');
const { WebSocketServer } = require('ws');
const { Pool, Client } = require('pg');

const args = process.argv.slice(2);
const listenArg = args[args.indexOf('--listen') + 1] || '127.0.0.1:18070';
const [host, port] = [listenArg.slice(0, listenArg.lastIndexOf(':')), Number(listenArg.slice(listenArg.lastIndexOf(':') + 1))];
const argValue = (name) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
const tlsCert = argValue('--tls-cert');
const tlsKey = argValue('--tls-key');
if (!tlsCert !== !tlsKey) { console.error('--tls-cert and --tls-key go together'); process.exit(64); }
const databaseUrl = process.env.DATABASE_URL || 'postgres://postgres@127.0.0.1:5432/rowcast_baseline';
const MAX_BODY = 64 * 1024;

const pool = new Pool({ connectionString: databaseUrl, max: 8 });
const subs = new Map(); // product id -> Set<WebSocket>
let sessions = 0;
let subscriptions = 0;

const PRODUCT_COLS = 'product_id, manufacturer, price_per_unit::text AS price, units_available, product_name';
function wire(r) {
  return {
    productId: Number(r.product_id),
    manufacturer: r.manufacturer,
    pricePerUnit: r.price,
    unitsAvailable: r.units_available,
    productName: r.product_name,
  };
}

function send(res, status, body) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, body === undefined ? {} : { 'content-type': 'application/json' });
  res.end(data);
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) { reject(new Error('too_large')); req.destroy(); } else chunks.push(c);
    });
    req.on('end', () => {
      try { resolve(JSON.parse(Buffer.concat(chunks).toString('utf8'))); } catch (e) { reject(e); }
    });
    req.on('error', reject);
  });
}

function valid(p) {
  return p && typeof p.manufacturer === 'string' && typeof p.productName === 'string' &&
    typeof p.unitsAvailable === 'number' && (typeof p.pricePerUnit === 'string' || typeof p.pricePerUnit === 'number');
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://x');
  const parts = url.pathname.split('/').filter(Boolean);
  try {
    if (req.method === 'GET' && parts.length === 1 && parts[0] === 'stats') {
      return send(res, 200, { sessions, subscriptions });
    }
    if (parts[0] !== 'products' || parts.length > 2) return send(res, 404, { error: 'not_found', message: 'no such route' });
    if (parts.length === 1 && req.method === 'POST') {
      const p = await readJson(req);
      if (!valid(p)) return send(res, 422, { error: 'invalid_body', message: 'bad product' });
      const r = await pool.query(
        `INSERT INTO products (manufacturer, price_per_unit, units_available, product_name) VALUES ($1, $2, $3, $4) RETURNING ${PRODUCT_COLS}`,
        [p.manufacturer, p.pricePerUnit, p.unitsAvailable, p.productName]);
      return send(res, 201, wire(r.rows[0]));
    }
    const id = Number(parts[1]);
    if (parts.length !== 2 || !Number.isInteger(id)) return send(res, 404, { error: 'not_found', message: 'no such route' });
    if (req.method === 'GET') {
      const r = await pool.query(`SELECT ${PRODUCT_COLS} FROM products WHERE product_id = $1`, [id]);
      return r.rowCount ? send(res, 200, wire(r.rows[0])) : send(res, 404, { error: 'not_found', message: 'no such product' });
    }
    if (req.method === 'PUT') {
      const p = await readJson(req);
      if (!valid(p)) return send(res, 422, { error: 'invalid_body', message: 'bad product' });
      const r = await pool.query(
        `UPDATE products SET manufacturer = $2, price_per_unit = $3, units_available = $4, product_name = $5 WHERE product_id = $1 RETURNING ${PRODUCT_COLS}`,
        [id, p.manufacturer, p.pricePerUnit, p.unitsAvailable, p.productName]);
      return r.rowCount ? send(res, 200, wire(r.rows[0])) : send(res, 404, { error: 'not_found', message: 'no such product' });
    }
    if (req.method === 'PATCH') {
      const p = await readJson(req);
      const r = await pool.query(
        `UPDATE products SET manufacturer = COALESCE($2, manufacturer), price_per_unit = COALESCE($3, price_per_unit),
           units_available = COALESCE($4, units_available), product_name = COALESCE($5, product_name)
         WHERE product_id = $1 RETURNING ${PRODUCT_COLS}`,
        [id, p.manufacturer ?? null, p.pricePerUnit ?? null, p.unitsAvailable ?? null, p.productName ?? null]);
      return r.rowCount ? send(res, 200, wire(r.rows[0])) : send(res, 404, { error: 'not_found', message: 'no such product' });
    }
    if (req.method === 'DELETE') {
      const r = await pool.query('DELETE FROM products WHERE product_id = $1', [id]);
      return r.rowCount ? send(res, 204) : send(res, 404, { error: 'not_found', message: 'no such product' });
    }
    return send(res, 405, { error: 'method_not_allowed', message: 'method not allowed' });
  } catch (e) {
    if (e.message === 'too_large') return send(res, 413, { error: 'too_large', message: 'body too large' });
    if (e instanceof SyntaxError) return send(res, 400, { error: 'bad_json', message: 'body is not JSON' });
    console.error('request failed:', e.message);
    return send(res, 500, { error: 'internal', message: 'internal error' });
  }
}

function onConnection(ws) {
  sessions++;
  const mine = new Set();
  ws.on('message', (data, isBinary) => {
    let cmd;
    try { cmd = JSON.parse(data.toString('utf8')); } catch { cmd = null; }
    if (!cmd || !Array.isArray(cmd.productIDs) || (cmd.command !== 'subscribe' && cmd.command !== 'unsubscribe') || isBinary) {
      ws.send(JSON.stringify({ type: 'error', error: 'bad_command', message: 'expected subscribe/unsubscribe with productIDs' }));
      return;
    }
    const sub = cmd.command === 'subscribe';
    for (const id of cmd.productIDs) {
      if (sub && !mine.has(id)) {
        mine.add(id);
        let set = subs.get(id);
        if (!set) subs.set(id, (set = new Set()));
        set.add(ws);
        subscriptions++;
      } else if (!sub && mine.has(id)) {
        mine.delete(id);
        const set = subs.get(id);
        set.delete(ws);
        if (set.size === 0) subs.delete(id);
        subscriptions--;
      }
    }
    ws.send(JSON.stringify({ type: sub ? 'subscribed' : 'unsubscribed', productIDs: cmd.productIDs }));
  });
  ws.on('close', () => {
    sessions--;
    for (const id of mine) {
      const set = subs.get(id);
      set.delete(ws);
      if (set.size === 0) subs.delete(id);
      subscriptions--;
    }
    mine.clear();
  });
  ws.on('error', () => {});
}

async function main() {
  await pool.query(fs.readFileSync(path.join(__dirname, '..', 'sql', 'baseline_schema.sql'), 'utf8'));
  const listener = new Client({ connectionString: databaseUrl, application_name: 'baseline-listener' });
  await listener.connect();
  listener.on('notification', (n) => {
    let change;
    try { change = JSON.parse(n.payload); } catch { return; }
    const set = subs.get(change.product && change.product.productId);
    if (!set) return;
    const frame = JSON.stringify({ type: 'change', action: change.action, product: change.product });
    for (const ws of set) ws.send(frame);
  });
  listener.on('error', (e) => { console.error('listener failed:', e.message); process.exit(1); });
  await listener.query('LISTEN product_change');

  const onRequest = (req, res) => { handle(req, res); };
  const server = tlsCert
    ? https.createServer({ cert: fs.readFileSync(tlsCert), key: fs.readFileSync(tlsKey), ALPNProtocols: ['http/1.1'] }, onRequest)
    : http.createServer(onRequest);
  server.keepAliveTimeout = 60000;
  const wss = new WebSocketServer({ server, path: '/websocket', maxPayload: MAX_BODY });
  wss.on('connection', onConnection);
  server.listen(port, host, () => console.log(`listening on ${tlsCert ? 'https' : 'http'}://${host}:${server.address().port}`));
  const stop = () => { server.close(); wss.clients.forEach((c) => c.terminate()); listener.end(); pool.end(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => { console.error(e); process.exit(1); });
