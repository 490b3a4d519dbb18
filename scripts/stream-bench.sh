#!/usr/bin/env bash
# Stream mode: the fake DingTalk pushes N events over one WebSocket as fast as dinghook's acks
# let it (the fake's window of un-acked frames), dinghook stores each on SQLite and answers
# SUCCESS after the commit. Both processes share this machine's cores.
#
# Reports: events/s acknowledged (from the first frame to the last SUCCESS), the ack latency
# p50/p99 (bucket bounds of dinghook_stream_ack_duration_seconds: frame in → ack out), and the
# CPU per event of dinghook and of the fake (user + system time over the run / N).
#
#   scripts/stream-bench.sh                    # N=50000 WINDOW=64 CONCURRENCY=64
#   N=20000 WINDOW=256 CONCURRENCY=256 scripts/stream-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-50000}
WINDOW=${WINDOW:-64}
CONCURRENCY=${CONCURRENCY:-64}
source scripts/common.sh
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --quiet --bin dinghook
    cargo build --release --quiet -p fake-dingtalk --bin fake-dingtalk
fi

start_fake
fake_pid=${pids[-1]}
curl -sf -X POST "$fake_url/_fake/stream/settings" -H 'content-type: application/json' \
    -d "{\"window\": $WINDOW, \"ack_timeout_ms\": 60000}" >/dev/null

port=$(free_port)
ops=$(free_port)
cat >"$work/dinghook.toml" <<EOF
listen = "127.0.0.1:$port"
log_level = "warn"
[ops]
listen = "127.0.0.1:$ops"
[dingtalk]
app_key = "dingbenchapp"
app_secret = "bench-secret"
api_url = "$fake_url"
oapi_url = "$fake_url"
[store]
url = "sqlite://$work/db/dinghook.db"
[dispatch]
enabled = false
[recovery]
enabled = false
[stream]
enabled = true
concurrency = $CONCURRENCY
EOF
"$bin" serve --config "$work/dinghook.toml" 2>"$work/dinghook.log" &
server=$!
pids+=("$server")
wait_up "http://127.0.0.1:$port/healthz"

metrics() { curl -sf "http://127.0.0.1:$ops/metrics"; }
sample() { metrics | awk -v k="$1" 'index($0, k" ") == 1 {print $2}' | tail -1; }
acked() { local v; v=$(sample 'dinghook_stream_acks_total{app="default",status="SUCCESS"}'); echo "${v:-0}"; }
# Clock ticks of user + system time of a process.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

for _ in $(seq 1 100); do
    [ "$(sample 'dinghook_stream_connected{app="default"}')" = "1" ] && break
    sleep 0.05
done
[ "$(sample 'dinghook_stream_connected{app="default"}')" = "1" ] || { echo "not connected" >&2; cat "$work/dinghook.log" >&2; exit 1; }

fake0=$(cpu_ticks "$fake_pid")
dh0=$(cpu_ticks "$server")
t0=$(date +%s.%N)
curl -sf -X POST "$fake_url/_fake/stream/events/generate" -H 'content-type: application/json' \
    -d "{\"count\": $N, \"id_prefix\": \"bench-\"}" >/dev/null
while [ "$(acked)" -lt "$N" ]; do sleep 0.05; done
t1=$(date +%s.%N)
fake1=$(cpu_ticks "$fake_pid")
dh1=$(cpu_ticks "$server")

state=$(curl -sf "$fake_url/_fake/stream/state?frames=false")
success=$(echo "$state" | json 'd["acks"].get("SUCCESS", 0)')
distinct=$(echo "$state" | json 'len(d["acked_event_ids"])')
redeliveries=$(echo "$state" | json 'd["redeliveries"]')
stored=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from events').fetchone()[0])" "$work/db/dinghook.db")

# p50 and p99 as the histogram's bucket bounds.
metrics >"$work/metrics.txt"
percentiles=$(python3 -c '
import re, sys
buckets = []
for line in sys.stdin:
    if not line.startswith("dinghook_stream_ack_duration_seconds_bucket{") or "app=\"default\"" not in line:
        continue
    m = re.search(r"le=\"([^\"]+)\".*\} (\S+)$", line.strip())
    if m:
        buckets.append((float(m.group(1)), float(m.group(2))))
total = buckets[-1][1] if buckets else 0
def p(q):
    for le, c in buckets:
        if total and c >= q * total:
            return "<= %g ms" % (le * 1000)
    return "?"
print(p(0.50), "/", p(0.99))
' <"$work/metrics.txt")

python3 - "$N" "$t0" "$t1" "$fake0" "$fake1" "$dh0" "$dh1" "$hz" <<EOF
import sys
n, t0, t1 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
f0, f1, d0, d1, hz = (float(x) for x in sys.argv[4:9])
secs = t1 - t0
print(f"events: {n}, window {$WINDOW}, concurrency {$CONCURRENCY}")
print(f"acknowledged SUCCESS in {secs:.2f} s: {n / secs:,.0f} events/s")
print(f"ack latency p50 / p99 (histogram bounds): $percentiles")
print(f"CPU per event: dinghook {(d1 - d0) / hz / n * 1e6:.0f} us, fake {(f1 - f0) / hz / n * 1e6:.0f} us")
print(f"fake: {$success} SUCCESS acks, {$distinct} distinct events, {$redeliveries} redeliveries; stored: $stored")
EOF
