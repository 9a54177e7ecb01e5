#!/usr/bin/env bash
# One command per scenario for the full benchmark (BENCHMARKS.md): starts fresh servers —
# rowcast (../target/release/rowcast), the Node.js baseline (baseline-node/) and the floor
# (floor-server, started by rowcast-bench --floor) — runs the scenario against all three
# side by side at the issue's target sizes, writes results/<scenario>.{json,svg}, and stops
# every server it started.
#
# Usage: bench/run.sh fanout|steady|conns|churn|hostile|writes [scenario args]
#   With scenario args, they replace the default (target-size) ones below.
# Environment:
#   PG_URL        Postgres server for rowcast, the baseline and `writes`
#                 (default postgres://postgres@127.0.0.1:5432)
#   ROWCAST_URL   measure an already running rowcast instead of starting one
#   ROWCAST_BIN   rowcast binary to start (default ../target/release/rowcast; built if missing,
#                 and the run warns — and says so in its note — if a source file is newer)
#   NO_BASELINE=1 skip the Node.js baseline
#   TAG           suffix for the result files
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$here"
scenario="${1:?usage: run.sh fanout|steady|conns|churn|hostile|writes [args]}"
shift
pg="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
bench="$here/target/release/rowcast-bench"
cargo build --release --locked --quiet

# What server state was measured, without asking git: a digest of the server's sources.
fingerprint="$(cd "$repo" && find src migrations sql Cargo.toml Cargo.lock -type f 2>/dev/null | sort | xargs sha256sum | sha256sum | cut -c1-12)"
note="server source digest $fingerprint (sha256 of src/ migrations/ sql/ Cargo.toml Cargo.lock), $(date -u +%Y-%m-%dT%H:%MZ)"
rowcast_bin="${ROWCAST_BIN:-$repo/target/release/rowcast}"
if [[ "$scenario" != writes && -z "${ROWCAST_URL:-}" ]]; then
  [[ -x "$rowcast_bin" ]] || (cd "$repo" && cargo build --release --quiet)
  # The digest above names the sources, not the binary: say when they may differ.
  newer="$(cd "$repo" && find src migrations sql Cargo.toml Cargo.lock -type f -newer "$rowcast_bin" 2>/dev/null | head -3 | tr '\n' ' ')"
  note="$note; rowcast binary $rowcast_bin built $(date -u -r "$rowcast_bin" +%Y-%m-%dT%H:%MZ)"
  if [[ -n "$newer" ]]; then
    echo "run.sh: WARNING: sources newer than $rowcast_bin ($newer…): the binary may not match the digest" >&2
    note="$note, OLDER than sources ($newer)"
  fi
fi
out=(--out-dir "$here/results" --note "$note")
[[ -n "${TAG:-}" ]] && out+=(--tag "$TAG")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

ensure_db() { psql "$pg/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1 || psql "$pg/postgres" -qc "CREATE DATABASE $1"; }

wait_http() { for _ in $(seq 100); do curl -sf "$1/stats" >/dev/null && return 0; sleep 0.1; done; echo "no server at $1" >&2; return 1; }

if [[ "$scenario" == writes ]]; then
  wargs=(--writers 1,4,16 --secs 3 --warmup-secs 1 --repeats 3)
  [[ $# -gt 0 ]] && wargs=("$@")
  exec "$bench" "${out[@]}" writes --database-url "$pg/postgres" --migrations-dir "$repo/migrations" "${wargs[@]}"
fi

targets=()
if [[ -n "${ROWCAST_URL:-}" ]]; then
  targets+=(--target "rowcast=$ROWCAST_URL")
else
  ensure_db rowcast_bench
  DATABASE_URL="$pg/rowcast_bench" "$rowcast_bin" --listen 127.0.0.1:18080 \
    >"$here/results/rowcast-$scenario.log" 2>&1 &
  pids+=($!)
  wait_http http://127.0.0.1:18080
  targets+=(--target "rowcast=http://127.0.0.1:18080,pid=${pids[-1]}")
fi
if [[ -z "${NO_BASELINE:-}" ]]; then
  [[ -d baseline-node/node_modules ]] || (cd baseline-node && npm ci --no-audit --no-fund --silent)
  ensure_db rowcast_baseline
  DATABASE_URL="$pg/rowcast_baseline" node baseline-node/server.js --listen 127.0.0.1:18070 \
    >"$here/results/baseline-$scenario.log" 2>&1 &
  pids+=($!)
  wait_http http://127.0.0.1:18070
  targets+=(--target "baseline=http://127.0.0.1:18070,pid=${pids[-1]}")
fi

case "$scenario" in
  fanout) args=(fanout --subscribers 100,1000,5000,10000 --updates 30) ;;
  steady) args=(steady --clients 10000 --subs 10 --products 10000 --rate 1000 --duration 20 --writers 8) ;;
  conns)  args=(conns --connections 10000) ;;
  churn)  args=(churn --rounds 5 --round-secs 6 --ids 1024 --concurrency 64) ;;
  hostile) args=(hostile) ;; # its defaults are the full size: 2000 honest clients, every attack
  *) echo "unknown scenario $scenario" >&2; exit 64 ;;
esac
[[ $# -gt 0 ]] && args=("$scenario" "$@")
"$bench" "${out[@]}" "${targets[@]}" --floor "${args[@]}"
