// rowcast.js — a browser client for rowcast's WebSocket protocol (docs/protocol.md).
//
//   import { connect } from "/rowcast.js";
//   const rc = connect("ws://localhost:8080/websocket", { onState: (s, info) => console.log(s, info) });
//   rc.subscribe([1, 2], { snapshot: true, onChange: (c) => console.log(c.seq, c.action, c.product) });
//
// It reconnects by itself (exponential backoff with jitter) and resumes with `since` = the last
// seq it saw, so onChange sees every change exactly once, in commit order, across reconnects and
// server restarts. If the server cannot resume (the changelog no longer reaches back that far),
// onReset is called and a fresh snapshot follows. No dependencies; an ES module. Types:
// /rowcast.d.ts (beside this file).
//
//   rc.subscribeAll({ onChange: (c) => log(c) });                 // every product, present and future
//   rc.subscribe([1], { presence: true, onPresence: (n) => show(n) });  // watcher counts

const INITIAL_DELAY_MS = 250;
const MAX_DELAY_MS = 10_000;
// The backoff starts over only once a connection has stayed open this long: a server that
// accepts and then closes at once (1013: busy, or too many sessions) must not be retried every
// 250 ms by every client.
const HEALTHY_AFTER_MS = 5_000;

/** Opens a client; see the Client class. */
export function connect(url, options = {}) {
  return new Client(url, options);
}

export class Client {
  /**
   * @param {string} url  ws:// or wss:// URL of /websocket
   * @param {object} [options]
   * @param {(state: string, info: object) => void} [options.onState]
   *   "connecting" | "connected" | "reconnecting" ({attempt, delayMs, code}) |
   *   "resumed" ({since}) | "closed"
   * @param {(reset: object) => void} [options.onReset]  the server could not replay from
   *   `since`; a snapshot of the products follows (through onSnapshot / onChange)
   * @param {(error: object) => void} [options.onError]  {"type":"error"} messages
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this.state = "connecting";
    /** Highest seq seen: where a reconnect resumes. */
    this.lastSeq = null;
    /** productId → {onChange, onSnapshot, onPresence, seq} */
    this.subscriptions = new Map();
    /** The subscription to every product: {onChange, onSnapshot, snapshot, seq}, or null. */
    this.all = null;
    /** Watcher counts were asked for (the server keeps that for the whole connection). */
    this.presence = false;
    this.socket = null;
    this.attempt = 0;
    this.closed = false;
    this.resuming = null;
    this.pending = [];
    this.open();
  }

  /**
   * Subscribes to `ids`. With `snapshot: true`, the current rows arrive first
   * (onSnapshot(product or null, {productId, seq}) per id), then every change after them.
   */
  subscribe(ids, { snapshot = false, onChange = () => {}, onSnapshot, presence = false, onPresence } = {}) {
    const fresh = [];
    for (const id of ids) {
      const existing = this.subscriptions.get(id);
      if (existing) {
        Object.assign(existing, { onChange, onSnapshot, onPresence });
      } else {
        this.subscriptions.set(id, { onChange, onSnapshot, onPresence, snapshot, seq: 0 });
        fresh.push(id);
      }
    }
    const askPresence = presence && !this.presence;
    if (presence) this.presence = true;
    if (fresh.length || askPresence) {
      const command = { command: "subscribe", productIDs: fresh };
      if (snapshot) command.snapshot = true;
      if (this.presence) command.presence = true;
      this.send(command);
    }
  }

  /**
   * Subscribes to every product, present and future. With `snapshot: true` the whole catalog
   * arrives first, in pages (onSnapshot(products, {seq, more}) per page; `more` is false on the
   * last), then every change after it.
   */
  subscribeAll({ snapshot = false, onChange = () => {}, onSnapshot } = {}) {
    if (this.all) {
      Object.assign(this.all, { onChange, onSnapshot });
      return;
    }
    // seq: the all-stream's own position (null: none yet). Not lastSeq: a by-id snapshot can be
    // newer than the all-stream has reached.
    // pendingSnapshot: a snapshot was asked for (or a reset promised one) and its last page has
    // not arrived: a reconnect asks for it again rather than resuming half a catalog.
    this.all = { onChange, onSnapshot, seq: null, pendingSnapshot: snapshot };
    const command = { command: "subscribe", all: true };
    if (snapshot) command.snapshot = true;
    this.send(command);
  }

  /** Stops the subscription to every product (by-id subscriptions stay). */
  unsubscribeAll() {
    if (!this.all) return;
    this.all = null;
    this.send({ command: "unsubscribe", all: true });
  }

  /** Stops the changes of `ids`. */
  unsubscribe(ids) {
    const gone = ids.filter((id) => this.subscriptions.delete(id));
    if (gone.length) this.send({ command: "unsubscribe", productIDs: gone });
  }

  /** Closes for good. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
    this.setState("closed", {});
  }

  // --- internals ---

  setState(state, info) {
    this.state = state;
    this.options.onState?.(state, info);
  }

  send(command) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(command));
    }
    // Otherwise the reconnect's resume subscribe covers it (the ids are in this.subscriptions).
  }

  open() {
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      const reconnect = this.opened === true;
      this.opened = true;
      clearTimeout(this.healthy);
      this.healthy = setTimeout(() => { this.attempt = 0; }, HEALTHY_AFTER_MS);
      const ids = [...this.subscriptions.keys()];
      const presence = this.presence ? { presence: true } : {};
      if (this.all) {
        const all = { command: "subscribe", all: true };
        if (this.all.pendingSnapshot) {
          all.snapshot = true;
        } else if (this.all.seq !== null) {
          all.since = this.all.seq;
          this.resuming = this.all.seq;
        }
        socket.send(JSON.stringify(all));
      }
      if (ids.length && this.lastSeq !== null) {
        // Everything after lastSeq, for every product: no gap, and duplicates are dropped in
        // receive().
        this.resuming = this.lastSeq;
        socket.send(JSON.stringify({ command: "subscribe", productIDs: ids, since: this.lastSeq, ...presence }));
      } else if (this.lastSeq === null) {
        // Nothing seen yet: subscribe as the application asked (subscribes made before the
        // socket opened were kept in this.subscriptions).
        const withSnapshot = ids.filter((id) => this.subscriptions.get(id).snapshot);
        const live = ids.filter((id) => !this.subscriptions.get(id).snapshot);
        if (withSnapshot.length) socket.send(JSON.stringify({ command: "subscribe", productIDs: withSnapshot, snapshot: true, ...presence }));
        if (live.length) socket.send(JSON.stringify({ command: "subscribe", productIDs: live, ...presence }));
      }
      this.setState("connected", { reconnected: reconnect });
      if (reconnect && this.resuming === null) this.setState("resumed", { since: null });
    };
    socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (this.closed || socket !== this.socket) return;
      clearTimeout(this.healthy);
      this.attempt += 1;
      const base = Math.min(MAX_DELAY_MS, INITIAL_DELAY_MS * 2 ** (this.attempt - 1));
      // Equal jitter: half fixed, half random, so many clients do not return in lockstep.
      const delayMs = Math.round(base / 2 + Math.random() * (base / 2));
      this.setState("reconnecting", { attempt: this.attempt, delayMs, code: event.code });
      this.timer = setTimeout(() => this.open(), delayMs);
    };
  }

  seen(seq) {
    if (this.lastSeq === null || seq > this.lastSeq) this.lastSeq = seq;
  }

  receive(message) {
    switch (message.type) {
      case "change": {
        const id = message.product.productId;
        const subscription = this.subscriptions.get(id);
        this.seen(message.seq);
        // Changes to all products arrive in seq order: one position covers them all.
        if (this.all && (this.all.seq === null || message.seq > this.all.seq)) {
          this.all.seq = message.seq;
          this.all.onChange(message);
        }
        if (!subscription || message.seq <= subscription.seq) return;
        subscription.seq = message.seq;
        subscription.onChange(message);
        return;
      }
      case "presence":
        this.subscriptions.get(message.productId)?.onPresence?.(message.watchers, message.productId);
        return;
      case "subscribed":
        // Changes up to this seq for subscribed products were delivered before the ack.
        if (message.seq !== undefined) this.seen(message.seq);
        if (message.all && this.all && (this.all.seq === null || message.seq > this.all.seq)) {
          this.all.seq = message.seq;
        }
        if (this.resuming !== null && message.seq === this.resuming) {
          this.setState("resumed", { since: this.resuming });
          this.resuming = null;
        }
        return;
      case "snapshot": {
        this.seen(message.seq);
        if (message.all) {
          if (this.all && (this.all.seq === null || message.seq >= this.all.seq)) {
            this.all.seq = message.seq;
            this.all.onSnapshot?.(message.products, { seq: message.seq, more: message.more });
          }
          if (!message.more && this.all) this.all.pendingSnapshot = false;
          if (!message.more && this.resuming !== null) {
            this.setState("resumed", { since: this.resuming, snapshot: message.seq });
            this.resuming = null;
          }
          return;
        }
        for (const product of message.products) this.snapshotOne(product.productId, product, message.seq);
        for (const id of message.missing) this.snapshotOne(id, null, message.seq);
        if (this.resuming !== null) {
          this.setState("resumed", { since: this.resuming, snapshot: message.seq });
          this.resuming = null;
        }
        return;
      }
      case "reset":
        // A snapshot follows. After a rewound database its seqs are lower than the ones seen
        // so far: forget them, or every later change would look like a duplicate.
        for (const id of message.productIDs ?? []) {
          const subscription = this.subscriptions.get(id);
          if (subscription) subscription.seq = -1;
        }
        if (message.all && this.all) Object.assign(this.all, { seq: null, pendingSnapshot: true });
        if (message.reason === "rewound") this.lastSeq = null;
        this.options.onReset?.(message);
        return;
      case "error":
        this.options.onError?.(message);
        return;
      default:
        return; // "unsubscribed" and future message types
    }
  }

  snapshotOne(id, product, seq) {
    const subscription = this.subscriptions.get(id);
    if (!subscription || seq <= subscription.seq) return;
    subscription.seq = seq;
    subscription.onSnapshot?.(product, { productId: id, seq });
  }
}
