#!/usr/bin/env bash
# Write throughput of rowcast's two change sources against no trigger at all, in one run:
#
#   none         products without any trigger and no slot (the ceiling);
#   notify       rowcast's default: the commit-ordered changelog trigger + pg_notify;
#   replication  --source replication: triggers off, REPLICA IDENTITY FULL, a logical slot
#                decoded by a running rowcast whose elected reader writes the changelog;
#   decode       no rowcast at all: triggers off, REPLICA IDENTITY FULL, the same publication,
#                and `pg_recvlogical` consuming a pgoutput slot into /dev/null — what logical
#                decoding alone costs the writers on this machine, the ceiling for any WAL reader.
#
# Each cell is `pgbench` with W clients committing single-row UPDATEs of disjoint rows for SECS
# seconds (fsync on; synchronous_commit on unless SYNC=off), on a private PostgreSQL cluster started for the
# run (wal_level=logical in every cell, so only the source differs) and removed afterwards.
# For `replication` it also checks that the reader wrote one changelog row per commit, and how
# long after the load it had caught up.
#
# Under each cell, where its CPU went: microseconds per commit by process role (the writers'
# backends, the reader's session, the walsender, the listener's sessions, rowcast's process).
#
# Usage: bench/writes-sources.sh   (ROWCAST=target/debug/rowcast SECS=10 WRITERS="1 4 16" SYNC=on
# SOURCES="none notify replication decode"; SECS >= 3)
# SYNC=off sets synchronous_commit=off: no WAL flush in the commit, so the CPU cost shows.
set -euo pipefail

ROWCAST=${ROWCAST:-${CARGO_TARGET_DIR:-target}/debug/rowcast}
SECS=${SECS:-10}
WRITERS=${WRITERS:-"1 4 16"}
SYNC=${SYNC:-on}
SOURCES=${SOURCES:-"none notify replication decode"}
ROWS=1024
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$ROWCAST" ] || { echo "no rowcast binary at $ROWCAST (cargo build first)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/rowcast-writes-XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
READER_PID=
READER_ROLE=rowcast-process
cleanup() {
    [ -n "$READER_PID" ] && kill "$READER_PID" 2>/dev/null && wait "$READER_PID" 2>/dev/null
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start -o \
    "-c listen_addresses='' -c unix_socket_directories=$DIR -c wal_level=logical \
     -c max_wal_senders=8 -c max_replication_slots=8 -c fsync=on -c synchronous_commit=$SYNC \
     -c max_connections=100" >/dev/null

url() { echo "postgres:///$1?host=$DIR&user=postgres"; }
sql() { as_pg "$BIN/psql" -h "$DIR" -U postgres -d "$1" -Atqc "$2"; }

# Each process's CPU ticks as `pid role ticks`: PostgreSQL's processes by application_name
# (pgbench = the writers' backends; rowcast-replication = the reader's changelog writes;
# rowcast-replication-stream = the walsender decoding for it; rowcast-listener(-reads) = the
# LISTEN task's sessions) or else backend type, and rowcast's own process.
cpu_ticks() {
    sql "$1" "SELECT pid, replace(coalesce(nullif(application_name, ''), backend_type), ' ', '_')
              FROM pg_stat_activity" |
    while IFS='|' read -r pid role; do
        ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null) && echo "$pid $role $ticks"
    done
    if [ -n "$READER_PID" ]; then
        echo "$READER_PID $READER_ROLE $(awk '{print $14 + $15}' "/proc/$READER_PID/stat")"
    fi
}

# `cpu µs/commit: role n · …` from the two snapshots, largest first: where one commit's CPU went.
cpu_per_commit() {
    awk -v tps="$1" -v secs="$(echo "$3 - $2" | bc)" -v hz="$(getconf CLK_TCK)" '
        FNR == NR { start[$1] = $3; next }
        ($1 in start) { used[$2] += $3 - start[$1] }
        END {
            for (role in used) {
                us = used[role] * 1e6 / hz / (tps * secs)
                if (us >= 1) printf "%.0f %s\n", us, role
            }
        }' "$DIR/cpu.1" "$DIR/cpu.2" |
    sort -rn | awk '{ line = line sprintf("%s%s %s", NR > 1 ? " · " : "", $2, $1) }
                    END { print "cpu µs/commit: " line }'
}

cat > "$DIR/update.sql" <<'SQL'
\set id :client_id * 64 + random(1, 64)
UPDATE products SET units_available = units_available + 1 WHERE product_id = :id;
SQL
chmod 644 "$DIR/update.sql"

printf '%-12s %8s %12s %s\n' source writers commits/s note
for source in $SOURCES; do
    db="bench_$source"
    sql postgres "CREATE DATABASE $db"
    "$ROWCAST" --database-url "$(url "$db")" migrate >/dev/null
    sql "$db" "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
               SELECT n, 'Acme', '1.00', 0, 'p' || n FROM generate_series(1, $ROWS) n"
    case $source in
        none) sql "$db" "ALTER TABLE products DISABLE TRIGGER product_change, DISABLE TRIGGER product_truncate" ;;
        decode)
            sql "$db" "ALTER TABLE products DISABLE TRIGGER product_change, DISABLE TRIGGER product_truncate;
                       ALTER TABLE products REPLICA IDENTITY FULL;
                       CREATE PUBLICATION bench_decode FOR TABLE products"
            as_pg "$BIN/pg_recvlogical" -h "$DIR" -U postgres -d "$db" -S bench_decode \
                -P pgoutput --create-slot
            # Status every second, as rowcast confirms: the slot's position keeps up.
            as_pg "$BIN/pg_recvlogical" -h "$DIR" -U postgres -d "$db" -S bench_decode --start \
                -o proto_version=1 -o publication_names=bench_decode -s 1 -F 1 -f /dev/null \
                >"$DIR/recvlogical.log" 2>&1 &
            sleep 0.5
            # As root, $! is runuser's pid: the CPU and the kill are pg_recvlogical's own.
            READER_PID=$(pgrep -n -f "pg_recvlogical .*--start") \
                || { echo "pg_recvlogical did not start" >&2; cat "$DIR/recvlogical.log" >&2; exit 1; }
            READER_ROLE=pg_recvlogical-process
            for _ in $(seq 50); do
                [ "$(sql "$db" "SELECT count(*) FROM pg_replication_slots WHERE active")" = 1 ] && break
                sleep 0.1
            done ;;
        replication)
            READER_ROLE=rowcast-process
            RUST_LOG=warn "$ROWCAST" --source replication --database-url "$(url "$db")" \
                --listen 127.0.0.1:0 >"$DIR/rowcast.log" 2>&1 &
            READER_PID=$!
            for _ in $(seq 100); do
                [ "$(sql "$db" "SELECT armed FROM changelog_source")" = t ] && break
                sleep 0.2
            done
            [ "$(sql "$db" "SELECT armed FROM changelog_source")" = t ] \
                || { echo "the reader did not take over" >&2; cat "$DIR/rowcast.log" >&2; exit 1; } ;;
    esac
    for w in $WRITERS; do
        before=$(sql "$db" "SELECT count(*) FROM product_changes")
        as_pg "$BIN/pgbench" -n -h "$DIR" -U postgres -c "$w" -j "$w" -T "$SECS" \
            -f "$DIR/update.sql" "$db" >"$DIR/pgbench.out" 2>&1 &
        bench_pid=$!
        # CPU by process over the middle of the cell (every writer connected, nothing winds down).
        sleep 1
        for _ in $(seq 50); do
            [ "$(sql "$db" "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'")" -ge "$w" ] && break
            sleep 0.1
        done
        cpu_ticks "$db" >"$DIR/cpu.1"
        t1=$(date +%s.%N)
        sleep $((SECS - 2))
        cpu_ticks "$db" >"$DIR/cpu.2"
        t2=$(date +%s.%N)
        wait "$bench_pid" || true
        out=$(cat "$DIR/pgbench.out")
        tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
        done_tx=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
        note=""
        if [ "$source" = replication ]; then
            start=$(date +%s.%N)
            for _ in $(seq 600); do
                now=$(sql "$db" "SELECT count(*) FROM product_changes")
                [ $((now - before)) -ge "$done_tx" ] && break
                sleep 0.1
            done
            lag=$(echo "$(date +%s.%N) - $start" | bc)
            note="changelog rows $((now - before)) / commits $done_tx, caught up ${lag%???????}s after the load"
        fi
        printf '%-12s %8s %12s %s\n' "$source" "$w" "$tps" "$note"
        printf '%-12s %8s %12s %s\n' "" "" "" "$(cpu_per_commit "$tps" "$t1" "$t2")"
    done
    if [ -n "$READER_PID" ]; then kill "$READER_PID"; wait "$READER_PID" 2>/dev/null || true; READER_PID=; fi
    # A slot left behind would hold WAL (and decoding work) for the cells after it.
    [ "$source" = decode ] && as_pg "$BIN/pg_recvlogical" -h "$DIR" -U postgres -d "$db" -S bench_decode --drop-slot
done
