// A small program against rowcast.js's types (web/rowcast.d.ts): `tsc --noEmit` must accept it
// (tests/typescript/check.sh, run by tests/run-all.sh). If the declarations drift from how the
// client is used, this stops compiling.
import { connect, type ChangeMessage, type Product } from "../../web/rowcast.js";

const rc = connect("ws://localhost:8080/websocket", {
  onState: (state, info) => console.log(state, info),
  onReset: (reset) => console.log(reset.reason, reset.since, reset.all ?? reset.productIDs),
  onError: (error) => console.warn(error.error, error.message),
});

const rows = new Map<number, Product>();
rc.subscribe([1, 2, 3], {
  snapshot: true,
  presence: true,
  onSnapshot: (product, { productId }) => {
    if (product) rows.set(productId, product);
  },
  onChange: (change: ChangeMessage) => {
    if (change.action === "DELETE") rows.delete(change.product.productId);
    else rows.set(change.product.productId, change.product);
  },
  onPresence: (watchers: number, productId: number) => console.log(productId, watchers),
});

let catalog = 0;
rc.subscribeAll({
  snapshot: true,
  onSnapshot: (products, { seq, more }) => {
    catalog += products.length;
    if (!more) console.log(`catalog of ${catalog} as of ${seq}`);
  },
  onChange: (change) => console.log(change.seq, change.conflated === true),
});

const last: number | null = rc.lastSeq;
console.log(last, rc.state);
rc.unsubscribe([3]);
rc.unsubscribeAll();
rc.close();
