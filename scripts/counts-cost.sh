#!/usr/bin/env bash
# What the maintained counts (migrations 8 and 10) cost the acknowledgement path: the release
# server on a fresh store, receiving only, loaded by examples/loadgen (64 connections) in
# rounds that alternate the schema as it is with the count triggers dropped (as before
# migration 8). Prints one line per round; docs/benchmarks.md has the figures.
#
#   scripts/counts-cost.sh sqlite|postgres [ROUNDS] [SECONDS]
#   PG_URL=postgres://postgres@127.0.0.1:5432/postgres scripts/counts-cost.sh postgres 5 8
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

backend=${1:?sqlite or postgres}
rounds=${2:-5}
seconds=${3:-8}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}

cargo build --release --quiet --bin dinghook --example loadgen
if [ "$backend" = postgres ]; then
    db="dinghook_counts_cost_$$"
    psql "$PG_URL" -qc "CREATE DATABASE $db"
    url="${PG_URL%/*}/$db"
    sql() { psql "$url" -qAtc "$1"; }
    trap 'cleanup; psql "$PG_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
else
    url="sqlite://$work/dinghook.db"
    sql() { sqlite3 -cmd ".timeout 10000" "$work/dinghook.db" "$1"; }
fi

port=$(free_port)
DINGHOOK_LISTEN=127.0.0.1:$port DINGHOOK_OPS_LISTEN= DINGHOOK_LOG=warn DINGHOOK_STORE_URL=$url \
    DINGHOOK_DISPATCH=off "$bin" serve --config config/dev.toml 2>"$work/server.log" &
pids+=("$!")
wait_up "http://127.0.0.1:$port/healthz"

if [ "$backend" = postgres ]; then
    triggers=$(sql "SELECT string_agg(pg_get_triggerdef(oid), '; ') FROM pg_trigger \
                    WHERE tgname LIKE 'events_count%'")
    drop="DROP TRIGGER events_count_insert ON events; DROP TRIGGER events_count_update ON events;
          DROP TRIGGER events_count_delete ON events"
else
    triggers=$(sql "SELECT group_concat(sql || ';', ' ') FROM sqlite_master \
                    WHERE type = 'trigger' AND name LIKE 'events_count%'")
    drop="DROP TRIGGER events_count_insert; DROP TRIGGER events_count_update;
          DROP TRIGGER events_count_delete"
fi

load() {
    "$loadgen" --url "http://127.0.0.1:$port/dingtalk/callback" --concurrency 64 \
        --seconds "$1" --json
}
load 2 >/dev/null
for round in $(seq "$rounds"); do
    for schema in counts without; do
        [ "$schema" = without ] && sql "$drop" >/dev/null
        load "$seconds" | json '"%.0f/s p50 %.2f ms p99 %.2f ms errors %d" %
            (d["rps"], d["p50_ms"], d["p99_ms"], d["errors"])' |
            sed "s/^/$backend $schema round $round: /"
        [ "$schema" = without ] && sql "$triggers" >/dev/null
    done
done
