#!/usr/bin/env bash
# CI smoke of rowcast-bench: every scenario (hostile with every attack included) for a few
# seconds at small sizes, against one running server. Exits non-zero if any scenario fails or
# any correctness counter (missing, duplicates, order violations, unexpected, error frames, dropped connections,
# notifications ≠ commits) is non-zero. It is a check that the tool and the protocol work,
# not a benchmark: the numbers it prints mean little at these sizes.
#
# Usage:
#   bench/smoke.sh                      # starts bench's own floor-server and tests against it
#   bench/smoke.sh URL [PID]            # e.g. bench/smoke.sh http://127.0.0.1:18080 "$(pgrep -f 'rowcast --listen')"
# Environment:
#   BENCH_DATABASE_URL  Postgres for the `writes` scenario (default postgres://postgres@127.0.0.1:5432/postgres;
#                       `writes` is skipped, and says so, when that Postgres is not reachable)
#   SMOKE_REQUIRE_WRITES=1  an unreachable BENCH_DATABASE_URL fails the smoke instead of skipping `writes`
#   SMOKE_SKIP_WRITES=1     skip `writes` (e.g. when another pass runs it)
#   SMOKE_ROWCAST_BIN       a rowcast binary: `writes` adds its `replication` and `replication-async` variants (needs wal_level=logical)
#   SMOKE_OUT           where result files go (default: a fresh temporary directory)
# bench/ci-smoke.sh runs this against a floor-server and a rowcast on its embedded default,
# with no system PostgreSQL needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$here"
cargo build --release --locked --quiet
bench="$here/target/release/rowcast-bench"
out="${SMOKE_OUT:-$(mktemp -d)}"
db_url="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

floor_pid=""
cleanup() { if [[ -n "$floor_pid" ]]; then kill "$floor_pid" 2>/dev/null || true; wait "$floor_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [[ $# -ge 1 ]]; then
  url="$1"
  pid="${2:-}"
else
  fifo="$out/floor.addr"
  "$here/target/release/floor-server" --listen 127.0.0.1:0 >"$fifo" &
  floor_pid=$!
  for _ in $(seq 50); do [[ -s "$fifo" ]] && break; sleep 0.1; done
  addr="$(sed -n 's/^listening on //p' "$fifo")"
  [[ -n "$addr" ]] || { echo "smoke: floor-server did not start" >&2; exit 1; }
  url="http://$addr"
  pid="$floor_pid"
fi
spec="server=$url${pid:+,pid=$pid}"
common=(--quiet --target "$spec" --out-dir "$out" --tag smoke --connect-timeout-ms 5000 --ack-timeout-ms 5000)

failed=()
run() { # name, scenario args…; $secs (default 120) bounds the run
  local name="$1"; shift
  echo "── smoke: $name"
  if ! timeout "${secs:-120}" "$bench" "${common[@]}" "$@"; then failed+=("$name"); fi
}

run fanout fanout --subscribers 10,50 --updates 5 --gap-ms 5 --settle-ms 200
run steady steady --clients 50 --subs 4 --products 20 --rate 100 --duration 3 --writers 2 --settle-ms 300
run conns  conns --connections 200 --steps 2 --settle-ms 300
run churn  churn --rounds 2 --round-secs 2 --ids 64 --concurrency 8 --settle-ms 200
# Every attack, a few sockets each, 2 s per phase (~35 s): the honest counters must stay zero.
# The floor has no SSE, /metrics or HTTP/2: those attackers just count 404s and refused
# connections there, which is what hostile does with any endpoint a target lacks.
secs=240 run hostile hostile --clients 50 --subs 4 --products 20 --rate 50 --writers 2 \
  --phase-secs 2 --attack-lead-ms 300 --settle-ms 300 --settle-timeout-ms 5000 --drain-timeout-ms 5000 \
  --subs-sockets 4 --subs-ids 2000 --subs-chunk 500 --since0-sockets 10 --since0-ids 3 \
  --ops-conns 4 --ackflood-sockets 2 --sse-readers 10 --sse-ids 10 --h2-conns 2 --h2-streams 20 \
  --h2-ids 5 --snapshot-sockets 10 --snapshot-ids 10 --rest-conns 4

if [[ -n "${SMOKE_SKIP_WRITES:-}" ]]; then
  echo "── smoke: writes skipped (SMOKE_SKIP_WRITES)"
elif pg_isready -q -d "$db_url" 2>/dev/null || psql "$db_url" -Atc 'select 1' >/dev/null 2>&1; then
  echo "── smoke: writes"
  if ! timeout 120 "$bench" --quiet --out-dir "$out" --tag smoke writes --database-url "$db_url" \
      --writers 1,2 --secs 1 --warmup-secs 0 --repeats 1 --rows 64 --migrations-dir "$repo/migrations" \
      ${SMOKE_ROWCAST_BIN:+--rowcast-bin "$SMOKE_ROWCAST_BIN"}; then
    failed+=(writes)
  fi
elif [[ -n "${SMOKE_REQUIRE_WRITES:-}" ]]; then
  echo "── smoke: writes FAILED (no Postgres at $db_url, and SMOKE_REQUIRE_WRITES is set)" >&2
  failed+=(writes)
else
  echo "── smoke: writes SKIPPED (no Postgres at $db_url)"
fi

echo "results in $out"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "smoke FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "smoke passed: all scenarios ran, all correctness counters zero"
