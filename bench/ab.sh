#!/usr/bin/env bash
# Before/after of one server change in the same run: starts two rowcast binaries side by side,
# each on its own fresh database of the Postgres at PG_URL, and runs one scenario against both
# (rowcast-bench alternates nothing itself; both targets see the same client and machine state).
#
# Usage: bench/ab.sh BEFORE_BINARY AFTER_BINARY fanout|steady|conns|churn [scenario args]
# Environment: PG_URL (default postgres://postgres@127.0.0.1:5432), TAG (result file suffix,
# default ab-<scenario>), ROWCAST_ARGS (extra server flags for both, e.g. "--ws-read-buffer-bytes 512").
# Results: bench/results/<scenario>-<TAG>.{json,svg}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
before="$(realpath "${1:?usage: ab.sh BEFORE AFTER scenario [args]}")"
after="$(realpath "${2:?usage: ab.sh BEFORE AFTER scenario [args]}")"
scenario="${3:?usage: ab.sh BEFORE AFTER scenario [args]}"
shift 3
pg="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
bench="${CARGO_TARGET_DIR:-$here/target}/release/rowcast-bench"
(cd "$here" && cargo build --release --locked --quiet)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_http() { for _ in $(seq 100); do curl -sf "$1/stats" >/dev/null && return 0; sleep 0.1; done; echo "no server at $1" >&2; return 1; }

targets=()
port=18301
for side in before after; do
  bin="${!side}"
  db="rowcast_ab_$side"
  psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db" -qc "CREATE DATABASE $db"
  # shellcheck disable=SC2086 # ROWCAST_ARGS is a list of flags
  DATABASE_URL="$pg/$db" "$bin" --listen "127.0.0.1:$port" ${ROWCAST_ARGS:-} \
    >"$here/results/ab-$side-$scenario.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$port"
  targets+=(--target "$side=http://127.0.0.1:$port,pid=${pids[-1]}")
  port=$((port + 1))
done

note="A/B: before=$before (built $(date -u -r "$before" +%FT%H:%MZ)), after=$after (built $(date -u -r "$after" +%FT%H:%MZ)), $(date -u +%FT%H:%MZ)"
"$bench" --out-dir "$here/results" --tag "${TAG:-ab-$scenario}" --note "$note" "${targets[@]}" "$scenario" "$@"
