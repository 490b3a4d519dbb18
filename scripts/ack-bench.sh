#!/usr/bin/env bash
# Acknowledged events/s against the release binary: 64 connections for 10 s with the load
# generator, on a fresh store, with the dispatcher on or off. Loopback only; stops by itself.
#
#   scripts/ack-bench.sh sqlite on|off
#   scripts/ack-bench.sh postgres on|off   (needs PostgreSQL on 127.0.0.1:5432, trust auth)
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:-sqlite}; dispatch=${2:-on}
cargo build --release --quiet --bin dinghook --example loadgen
work=$(mktemp -d)
trap 'kill -INT "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
case "$backend" in
    sqlite) url="sqlite://$work/data/dinghook.db" ;;
    postgres)
        db="dinghook_bench_$$"
        psql -h 127.0.0.1 -U postgres -d test -qc "CREATE DATABASE $db"
        url="postgres://postgres@127.0.0.1:5432/$db" ;;
    *) echo "backend: sqlite or postgres" >&2; exit 2 ;;
esac
port=18090
DINGHOOK_LISTEN=127.0.0.1:$port DINGHOOK_LOG=warn DINGHOOK_STORE_URL=$url DINGHOOK_DISPATCH=$dispatch \
    target/release/dinghook serve --config config/dev.toml 2>"$work/server.log" &
server=$!
for _ in $(seq 1 100); do target/release/dinghook healthcheck "http://127.0.0.1:$port/healthz" 2>/dev/null && break; sleep 0.05; done
target/release/examples/loadgen --url "http://127.0.0.1:$port/dingtalk/callback" --concurrency 64 --seconds 10
sleep 0.5
DINGHOOK_STORE_URL=$url target/release/dinghook events stats
ticks=$(getconf CLK_TCK)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$server/stat")
echo "server CPU: $((utime / ticks)) s user, $((stime / ticks)) s system; peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$server/status")"
kill -INT $server; wait $server || true
if [ "$backend" = postgres ]; then psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE $db WITH (FORCE)"; fi
