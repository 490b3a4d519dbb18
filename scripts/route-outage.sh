#!/usr/bin/env bash
# A route's destination down for OUTAGE seconds while events keep coming (RATE events/s), with a
# second route to another destination beside it: nothing is lost, the first route's breaker
# holds its deliveries (none dead), the second keeps delivering throughout, and once the
# destination is back the backlog drains. Release binaries, SQLite, this machine's cores.
#
#   scripts/route-outage.sh                       # 10 minutes down at 200 events/s (the issue's)
#   OUTAGE=60 scripts/route-outage.sh             # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-200}
OUTAGE=${OUTAGE:-600}
BEFORE=${BEFORE:-10}
AFTER=${AFTER:-10}
source scripts/common.sh
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --quiet --bin dinghook --example loadgen --example ceiling
fi

down_port=$(free_port)
other_port=$(free_port)
target/release/examples/ceiling --listen "127.0.0.1:$other_port" 2>/dev/null &
pids+=("$!")
target/release/examples/ceiling --listen "127.0.0.1:$down_port" 2>/dev/null &
down_pid=$!
pids+=("$down_pid")
port=$(free_port)
ops=$(free_port)
cat >"$work/dinghook.toml" <<EOF
listen = "127.0.0.1:$port"
[ops]
listen = "127.0.0.1:$ops"
[callback]
token = "dinghook-dev-token"
aes_key = "DEVONLYdinghookLocalTestingKeyNotForProdXyz"
owner_key = "dingdevappkey"
[store]
url = "sqlite://$work/db/dinghook.db"
[dispatch]
enabled = false
[recovery]
enabled = false
[[routes]]
name = "down"
url = "http://127.0.0.1:$down_port/hook"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
timeout = "2s"
[[routes]]
name = "other"
url = "http://127.0.0.1:$other_port/hook"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EOF
"$bin" serve --config "$work/dinghook.toml" 2>"$work/dinghook.log" &
pids+=("$!")
wait_up "http://127.0.0.1:$port/healthz"

metrics() { curl -sf "http://127.0.0.1:$ops/metrics"; }
# Deliveries of route $1 that ended $2 (done, dead, retry), from /metrics; 0 before the first.
count_of() {
    local n
    n=$(metrics | awk -v key="dinghook_route_deliveries_total{route=\"$1\",outcome=\"$2\"}" '$1 == key {print $2}' | tail -1)
    echo "${n:-0}"
}
# Deliveries of route $1 not done yet.
waiting() {
    "$bin" routes list --json --config "$work/dinghook.toml" 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    d = json.loads(line)
    if d["name"] == sys.argv[1]:
        print(d["pending"] + d["retry"] + d["running"])' "$1"
}

total=$((BEFORE + OUTAGE + AFTER))
echo "== $RATE events/s for $total s; route 'down' loses its destination from ${BEFORE}s to $((BEFORE + OUTAGE))s"
"$loadgen" --json --random-ids --rate "$RATE" --concurrency 8 --seconds "$total" \
    --url "http://127.0.0.1:$port/dingtalk/callback" >"$work/load.json" &
load=$!
sleep "$BEFORE"
kill -TERM "$down_pid"
echo "   destination down at $(date +%T)"
other_at_stop=$(count_of other done)
mid=$((OUTAGE / 2))
sleep "$mid"
other_mid=$(count_of other done)
echo "   halfway: 'other' delivered $((other_mid - other_at_stop)) since the stop ($(( (other_mid - other_at_stop) / (mid > 0 ? mid : 1) ))/s); 'down' has $(waiting down) waiting, $(count_of down dead) dead"
sleep $((OUTAGE - mid))
target/release/examples/ceiling --listen "127.0.0.1:$down_port" 2>/dev/null &
pids+=("$!")
back=$(date +%s.%N)
echo "   destination back at $(date +%T) with $(waiting down) deliveries waiting"
wait "$load"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("   received %d (%.0f/s), errors %d, ack p99 %.2f ms" % (d["ok"], d["rps"], d["errors"], d["p99_ms"]))' "$work/load.json"
received=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok"])' "$work/load.json")
while [ "$(waiting down)" != 0 ] || [ "$(waiting other)" != 0 ]; do sleep 0.5; done
drained=$(python3 -c "import time; print(f'{time.time() - $back:.1f}')")
down_done=$(count_of down done); other_done=$(count_of other done)
echo "== after: 'down' delivered $down_done, dead $(count_of down dead); 'other' delivered $other_done, dead $(count_of other dead); received $received"
echo "   everything delivered ${drained}s after the destination came back (the breaker probes after its cool-down)"
[ "$down_done" -ge "$received" ] && [ "$other_done" -ge "$received" ] && [ "$(count_of down dead)" = 0 ] ||
    { echo "LOST: not every event delivered once to both routes" >&2; exit 1; }
echo "OK: nothing lost, nothing dead"
