#!/usr/bin/env bash
# Commit→client latency of the two change sources, before and after a change, in the same rounds:
# each round runs notify (AFTER's build), replication BEFORE and replication AFTER, order rotated,
# each on a fresh embedded cluster (a reused one slows every mode as its tables grow), with
# `rowcast-bench steady --clients 2000 --subs 10 --products 2000 --rate 500 --duration 15 --writers 4`.
#
# Usage: BEFORE=/path/rowcast-old AFTER=/path/rowcast-new [COMMIT=sync|async] [ROUNDS=3] [TAG=s9] \
#        [BENCH=bench/target/release/rowcast-bench] bench/steady-sources.sh
# Results: bench/results/steady-steady-$TAG-{notify,$COMMIT-before,$COMMIT-after}-$round.json
set -euo pipefail

: "${BEFORE:?BEFORE=path of the old rowcast binary}" "${AFTER:?AFTER=path of the new one}"
COMMIT=${COMMIT:-async}
ROUNDS=${ROUNDS:-3}
TAG=${TAG:-ab}
BENCH=${BENCH:-${CARGO_TARGET_DIR:-bench/target}/release/rowcast-bench}
PORT=18080
DATA=$(mktemp -d /tmp/rowcast-steady-XXXXXX)
# The embedded cluster runs as the postgres user when this runs as root: it must reach its directory.
chmod 755 "$DATA"
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$DATA"
}
trap cleanup EXIT

run() { # name binary [rowcast flags…]
    local name=$1 binary=$2
    shift 2
    rm -rf "$DATA/cluster"
    RUST_LOG=warn "$binary" --listen "127.0.0.1:$PORT" --embedded-data-dir "$DATA/cluster" "$@" \
        >"$DATA/$name.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 120); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.5; done
    curl -sf "127.0.0.1:$PORT/readyz" >/dev/null \
        || { echo "$name: rowcast did not become ready" >&2; tail -20 "$DATA/$name.log" >&2; exit 1; }
    sleep 2
    "$BENCH" --out-dir bench/results --tag "steady-$TAG-$name-$round" steady \
        --target "rowcast=http://127.0.0.1:$PORT,pid=$SERVER" --clients 2000 --subs 10 \
        --products 2000 --rate 500 --duration 15 --writers 4 2>&1 | grep -E '^\[rowcast\]'
    kill "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=
}

for round in $(seq "$ROUNDS"); do
    case $((round % 3)) in
        0) order="notify before after" ;;
        1) order="before after notify" ;;
        *) order="after notify before" ;;
    esac
    for mode in $order; do
        echo "=== round $round: $mode"
        case $mode in
            notify) run notify "$AFTER" ;;
            before) run "$COMMIT-before" "$BEFORE" --source replication --replication-commit "$COMMIT" ;;
            after) run "$COMMIT-after" "$AFTER" --source replication --replication-commit "$COMMIT" ;;
        esac
    done
done
