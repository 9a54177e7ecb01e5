#!/usr/bin/env bash
# CI smoke of rowcast-bench, self-contained: needs no running server and no system
# PostgreSQL. It
#   1. builds the bench in release (its own workspace, bench/target);
#   2. starts a floor-server and runs bench/smoke.sh against it;
#   3. starts the given rowcast release binary on its embedded default (a private PostgreSQL
#      in a fresh temporary data dir) and runs bench/smoke.sh against it, `writes` included,
#      pointed at that embedded cluster over its Unix socket;
#   4. stops everything it started, by pid (rowcast's SIGTERM also stops its cluster), and
#      removes the temporary dir.
# Exits non-zero if the build fails, a server does not start, any scenario fails or any
# correctness counter is non-zero (smoke.sh's rules).
#
# Usage: bench/ci-smoke.sh [ROWCAST_BINARY]
#   ROWCAST_BINARY  default: <repo>/target/release/rowcast (build it first: cargo build --release)
# Environment:
#   CI_SMOKE_PORT   rowcast's HTTP port (default 0: a free one, read from its log)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin="${1:-$repo/target/release/rowcast}"
[[ "$bin" == /* ]] || bin="$PWD/$bin"
if [[ ! -x "$bin" ]]; then
  echo "ci-smoke: no rowcast binary at $bin (build it with: cargo build --release)" >&2
  exit 1
fi
start=$SECONDS

tmp="$(mktemp -d /tmp/rowcast-ci-smoke-XXXXXX)"
# The embedded cluster runs as the `postgres` user when we are root: it must reach the dir.
chmod 755 "$tmp"
floor_pid=""
rowcast_pid=""
stop() { # pid, seconds to wait for it after SIGTERM
  local pid="$1" secs="$2"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "ci-smoke: pid $pid still running ${secs}s after SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$floor_pid" 5
  stop "$rowcast_pid" 30
  rm -rf "$tmp"
}
trap cleanup EXIT

# rowcast first: its initdb and migrations overlap the bench build and the floor smoke.
data_dir="$tmp/pgdata"
"$bin" --listen "127.0.0.1:${CI_SMOKE_PORT:-0}" --embedded-data-dir "$data_dir" \
  >"$tmp/rowcast.log" 2>&1 &
rowcast_pid=$!

echo "── ci-smoke: building the bench (release)"
(cd "$here" && cargo build --release --locked --quiet)
t_build=$((SECONDS - start))

"$here/target/release/floor-server" --listen 127.0.0.1:0 >"$tmp/floor.out" 2>&1 &
floor_pid=$!
for _ in $(seq 100); do grep -q '^listening on ' "$tmp/floor.out" && break; sleep 0.1; done
floor_addr="$(sed -n 's/^listening on //p' "$tmp/floor.out")"
if [[ -z "$floor_addr" ]]; then
  echo "ci-smoke: floor-server did not start" >&2
  cat "$tmp/floor.out" >&2
  exit 1
fi

failed=()
echo "── ci-smoke: smoke against the floor-server (pid $floor_pid, $floor_addr)"
# `writes` measures Postgres only, not the target: it runs once, in the rowcast pass.
SMOKE_OUT="$tmp/floor" SMOKE_SKIP_WRITES=1 "$here/smoke.sh" "http://$floor_addr" "$floor_pid" \
  || failed+=(floor)
stop "$floor_pid" 5
floor_pid=""
t_floor=$((SECONDS - start))

# rowcast logs `rowcast listening (HTTP) address=…` once its cluster, migrations and
# listener are up (the log may carry ANSI colours).
addr=""
for _ in $(seq 1200); do # ≤ 120 s: initdb on a busy 2-core machine
  addr="$(sed 's/\x1b\[[0-9;]*m//g' "$tmp/rowcast.log" | sed -n 's/.*rowcast listening (HTTP).*address=\([0-9.]*:[0-9]*\).*/\1/p' | head -1)"
  [[ -n "$addr" ]] && break
  kill -0 "$rowcast_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z "$addr" ]] || ! curl -fsS "http://$addr/healthz" >/dev/null; then
  echo "ci-smoke: rowcast ($bin) did not start on its embedded default; its log:" >&2
  cat "$tmp/rowcast.log" >&2
  exit 1
fi
# The embedded cluster listens only on its Unix socket, in the data dir.
db_url="postgres:///postgres?host=$data_dir&port=5432&user=postgres&sslmode=disable"
echo "── ci-smoke: smoke against rowcast (pid $rowcast_pid, $addr, embedded cluster in $data_dir)"
# The embedded cluster runs wal_level=logical: `writes` measures the replication source too.
SMOKE_OUT="$tmp/rowcast" BENCH_DATABASE_URL="$db_url" SMOKE_REQUIRE_WRITES=1 SMOKE_ROWCAST_BIN="$bin" \
  "$here/smoke.sh" "http://$addr" "$rowcast_pid" || failed+=(rowcast)

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "── ci-smoke FAILED against: ${failed[*]} (rowcast log follows)" >&2
  tail -50 "$tmp/rowcast.log" >&2
  exit 1
fi
t_all=$((SECONDS - start))
echo "── ci-smoke passed against the floor and rowcast in $t_all s (bench build $t_build s, floor smoke $((t_floor - t_build)) s, rowcast start + smoke $((t_all - t_floor)) s)"
