#!/usr/bin/env bash
# One command per scenario for the full benchmark (BENCHMARKS.md): starts fresh servers —
# rowcast (../target/release/rowcast), the Node.js baseline (baseline-node/) and the floor
# (floor-server, started by rowcast-bench --floor) — runs the scenario against all three
# side by side at the issue's target sizes, writes results/<scenario>.{json,svg}, and stops
# every server it started.
#
# Usage: bench/run.sh fanout|steady|conns|churn|hostile|puts|writes [scenario args]
#   With scenario args, they replace the default (target-size) ones below.
# Environment:
#   PG_URL        Postgres server for rowcast, the baseline and `writes`
#                 (default postgres://postgres@127.0.0.1:5432)
#   ROWCAST_URL   measure an already running rowcast instead of starting one
#   ROWCAST_BIN   rowcast binary to start (default ../target/release/rowcast; built if missing,
#                 and the run warns — and says so in its note — if a source file is newer)
#   NO_BASELINE=1 skip the Node.js baseline
#   ROWCAST_DB_PARAMS  appended to rowcast's DATABASE_URL, e.g. '?sslmode=disable' (libpq's default,
#                 `prefer`, encrypts to a server with ssl=on; the Node baseline's `pg` never does)
#   TLS=1         serve and measure every server over TLS (https/wss): a throw-away CA and a
#                 127.0.0.1/localhost certificate from gen-cert.sh (in a temporary dir), rowcast on
#                 --tls-listen 127.0.0.1:18443, Node on https://127.0.0.1:18070, the floor with
#                 --floor-tls-cert; the client trusts the CA (--tls-ca). TAG defaults to `tls`.
#   TAG           suffix for the result files
#   CARGO_TARGET_DIR  where the bench is built (default bench/target)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$here"
scenario="${1:?usage: run.sh fanout|steady|conns|churn|hostile|puts|writes [args]}"
shift
pg="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
bench="${CARGO_TARGET_DIR:-$here/target}/release/rowcast-bench"
cargo build --release --locked --quiet
tls="${TLS:-}"
[[ "$tls" == 0 ]] && tls=""
[[ -n "$tls" && -z "${TAG:-}" ]] && TAG=tls

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
[[ -n "$tls" ]] && note="$note; TLS: every server over https/wss (HTTP/1.1) with a throw-away P-256 certificate from gen-cert.sh"
out=(--out-dir "$here/results" --note "$note")
[[ -n "${TAG:-}" ]] && out+=(--tag "$TAG")

pids=()
tlsdir=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [[ -n "$tlsdir" ]] && rm -rf "$tlsdir"
  return 0
}
trap cleanup EXIT
curl_tls=()
if [[ -n "$tls" && "$scenario" != writes ]]; then
  tlsdir="$(mktemp -d /tmp/rowcast-bench-tls-XXXXXX)"
  "$here/gen-cert.sh" "$tlsdir" 2
  curl_tls=(--cacert "$tlsdir/ca.pem")
  out+=(--tls-ca "$tlsdir/ca.pem" --floor-tls-cert "$tlsdir/server.pem" --floor-tls-key "$tlsdir/server.key")
fi

ensure_db() { psql "$pg/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1 || psql "$pg/postgres" -qc "CREATE DATABASE $1"; }

wait_http() { for _ in $(seq 100); do curl -sf "${curl_tls[@]}" "$1/stats" >/dev/null && return 0; sleep 0.1; done; echo "no server at $1" >&2; return 1; }

if [[ "$scenario" == writes ]]; then
  wargs=(--writers 1,4,16 --secs 3 --warmup-secs 1 --repeats 3)
  [[ $# -gt 0 ]] && wargs=("$@")
  # With a rowcast binary, `writes` adds the replication source when the server runs
  # wal_level=logical (else it says why it left it out).
  [[ -x "$rowcast_bin" ]] || (cd "$repo" && cargo build --release --quiet)
  exec "$bench" "${out[@]}" writes --database-url "$pg/postgres" --migrations-dir "$repo/migrations" \
    --rowcast-bin "$rowcast_bin" "${wargs[@]}"
fi

targets=()
if [[ -n "${ROWCAST_URL:-}" ]]; then
  targets+=(--target "rowcast=$ROWCAST_URL")
else
  ensure_db rowcast_bench
  rowcast_tls=()
  [[ -n "$tls" ]] && rowcast_tls=(--tls-listen 127.0.0.1:18443 --tls-cert "$tlsdir/server.pem" --tls-key "$tlsdir/server.key")
  DATABASE_URL="$pg/rowcast_bench${ROWCAST_DB_PARAMS:-}" "$rowcast_bin" --listen 127.0.0.1:18080 "${rowcast_tls[@]}" \
    >"$here/results/rowcast-$scenario.log" 2>&1 &
  pids+=($!)
  if [[ -n "$tls" ]]; then
    wait_http https://127.0.0.1:18443
    targets+=(--target "rowcast=https://127.0.0.1:18443,pid=${pids[-1]}")
  else
    wait_http http://127.0.0.1:18080
    targets+=(--target "rowcast=http://127.0.0.1:18080,pid=${pids[-1]}")
  fi
fi
if [[ -z "${NO_BASELINE:-}" ]]; then
  [[ -d baseline-node/node_modules ]] || (cd baseline-node && npm ci --no-audit --no-fund --silent)
  ensure_db rowcast_baseline
  node_tls=()
  scheme=http
  [[ -n "$tls" ]] && node_tls=(--tls-cert "$tlsdir/server.pem" --tls-key "$tlsdir/server.key") && scheme=https
  DATABASE_URL="$pg/rowcast_baseline" node baseline-node/server.js --listen 127.0.0.1:18070 "${node_tls[@]}" \
    >"$here/results/baseline-$scenario.log" 2>&1 &
  pids+=($!)
  wait_http "$scheme://127.0.0.1:18070"
  targets+=(--target "baseline=$scheme://127.0.0.1:18070,pid=${pids[-1]}")
fi

case "$scenario" in
  fanout) args=(fanout --subscribers 100,1000,5000,10000 --updates 30) ;;
  steady) args=(steady --clients 10000 --subs 10 --products 10000 --rate 1000 --duration 20 --writers 8) ;;
  conns)  args=(conns --connections 10000) ;;
  churn)  args=(churn --rounds 5 --round-secs 6 --ids 1024 --concurrency 64) ;;
  hostile) args=(hostile) ;; # its defaults are the full size: 2000 honest clients, every attack
  puts)   args=(puts --connections 4 --products 256 --secs 10 --rounds 3) ;;
  *) echo "unknown scenario $scenario" >&2; exit 64 ;;
esac
[[ $# -gt 0 ]] && args=("$scenario" "$@")
"$bench" "${out[@]}" "${targets[@]}" --floor "${args[@]}"
