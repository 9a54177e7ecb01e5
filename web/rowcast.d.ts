// Types of rowcast.js, the browser client of rowcast's push protocol (docs/protocol.md).
// Served beside it as /rowcast.d.ts; checked by `tsc --noEmit` against tests/typescript/example.ts
// (tests/run-all.sh).

/** A product as REST and the push protocol represent it. */
export interface Product {
  productId: number;
  manufacturer: string;
  pricePerUnit: string;
  unitsAvailable: number;
  productName: string;
}

/** One committed change (`{"type":"change"}`). */
export interface ChangeMessage {
  type: "change";
  /** Position in commit order. */
  seq: number;
  action: "INSERT" | "UPDATE" | "DELETE";
  /** The row after the change (before it, for DELETE). */
  product: Product;
  /** The newest version after versions the client did not receive were skipped. */
  conflated?: true;
}

/** `{"type":"reset"}`: the stream starts again from a snapshot. */
export interface ResetMessage {
  type: "reset";
  productIDs?: number[];
  all?: true;
  since: number;
  reason: "pruned" | "rewound";
  prunedThrough?: number;
  latest?: number;
  message: string;
}

/** `{"type":"error"}`: a command could not be used; the connection stays. */
export interface ErrorMessage {
  type: "error";
  error: string;
  message: string;
}

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "resumed" | "closed";

export interface ClientOptions {
  /** "reconnecting" info: {attempt, delayMs, code}; "resumed": {since, snapshot?}. */
  onState?: (state: ConnectionState, info: Record<string, unknown>) => void;
  /** The server could not replay from `since`; a snapshot follows. */
  onReset?: (reset: ResetMessage) => void;
  onError?: (error: ErrorMessage) => void;
}

export interface SubscribeOptions {
  /** The current rows first (onSnapshot per id), then every change after them. */
  snapshot?: boolean;
  onChange?: (change: ChangeMessage) => void;
  /** `product` is null for an id without a row. */
  onSnapshot?: (product: Product | null, info: { productId: number; seq: number }) => void;
  /** Ask for watcher counts (kept for the whole connection once asked). */
  presence?: boolean;
  /** Sockets subscribed to the product across every instance; at most once a second. */
  onPresence?: (watchers: number, productId: number) => void;
}

export interface SubscribeAllOptions {
  /** The whole catalog first, in pages (`more` is false on the last), then every change. */
  snapshot?: boolean;
  onChange?: (change: ChangeMessage) => void;
  onSnapshot?: (products: Product[], info: { seq: number; more: boolean }) => void;
}

export declare class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  state: ConnectionState;
  /** Highest seq seen: where a reconnect resumes. */
  lastSeq: number | null;
  subscribe(ids: number[], options?: SubscribeOptions): void;
  unsubscribe(ids: number[]): void;
  /** Every product, present and future. */
  subscribeAll(options?: SubscribeAllOptions): void;
  unsubscribeAll(): void;
  close(): void;
}

/** Opens a client that reconnects and resumes by itself. */
export declare function connect(url: string, options?: ClientOptions): Client;
