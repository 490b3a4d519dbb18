#!/usr/bin/env bash
# The HTTP API, release binaries, the load generator, the fake DingTalk and dinghook sharing
# this machine's cores.
#
#   1. reading: 1 000 000 events (written with sqlite3 / psql after dinghook made the schema),
#      then each kind of `GET /api/v1/events` page timed REQUESTS times: p50/p99/max;
#   2. acting: ACTIONS work notifications submitted as fast as CONCURRENCY connections allow
#      (p99 of the acceptance), run through the app's client at QPS against the fake (which
#      refuses anything above QPS in any second): all done, each sent once, the fake never
#      refused one; a SIGKILL of dinghook in the middle (KILL=1, the default) and a restart:
#      none lost, repeats only of calls in flight at the kill; the same ACTIONS again with the
#      same keys: nothing new sent;
#   3. side by side: callbacks at RATE/s for SECONDS s alone, then again while the API is
#      read as fast as 4 connections go: the acknowledgement latency both times.
#
#   scripts/api-bench.sh                      # SQLite
#   STORE=postgres scripts/api-bench.sh       # PostgreSQL (DINGHOOK_TEST_PG_URL's server)
#   EVENTS=200000 ACTIONS=2000 QPS=200 scripts/api-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-1000000}
REQUESTS=${REQUESTS:-50}
ACTIONS=${ACTIONS:-10000}
QPS=${QPS:-500}
CONCURRENCY=${CONCURRENCY:-32}
KILL=${KILL:-1}
RATE=${RATE:-1000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
STORE=${STORE:-sqlite}
PG=${DINGHOOK_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
TOKEN=api-bench-token-0123456789
source scripts/common.sh
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --quiet --bin dinghook --example api_load --example loadgen -p dinghook
    cargo build --release --quiet -p fake-dingtalk
fi
load=target/release/examples/api_load

start_fake
curl -sf -X POST "$fake_url/_fake/users" -H 'content-type: application/json' \
    -d '{"userid": "alice", "unionid": "union-alice", "name": "Alice", "active": true}' >/dev/null
curl -sf -X POST "$fake_url/_fake/qps" -H 'content-type: application/json' -d "{\"limit\": $QPS}" >/dev/null

mkdir -p "$work/db"
if [ "$STORE" = postgres ]; then
    db="dinghook_apibench_$$"
    psql "$PG" -qc "CREATE DATABASE $db" >/dev/null
    store_url="${PG%/*}/$db"
    trap 'cleanup; psql "$PG" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
else
    store_url="sqlite://$work/db/dinghook.db"
fi
port=$(free_port)
ops=$(free_port)
api=$(free_port)
cat >"$work/dinghook.toml" <<EOF
listen = "127.0.0.1:$port"
[ops]
listen = "127.0.0.1:$ops"
[api]
listen = "127.0.0.1:$api"
token = "$TOKEN"
# The load generator is one token asking as fast as it can: no per-token budget here.
requests_per_second = 0
[callback]
token = "dinghook-dev-token"
aes_key = "DEVONLYdinghookLocalTestingKeyNotForProdXyz"
owner_key = "dingdevappkey"
[store]
url = "$store_url"
[dingtalk]
app_key = "dingbench"
app_secret = "bench-secret"
agent_id = 4242
oapi_url = "$fake_url"
api_url = "$fake_url"
qps = $QPS
monthly_quota = 100000000
[handlers]
enabled = false
[dispatch]
# Runs in flight at the SIGKILL wait out their lease: short, so the run is not minutes long.
lease = "10s"
handler_timeout = "5s"
[recovery]
enabled = false
EOF
server=
start_server() {
    "$bin" serve --config "$work/dinghook.toml" 2>>"$work/dinghook.log" &
    server=$!
    pids+=("$server")
    wait_up "http://127.0.0.1:$port/healthz"
}
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

echo "== reading: $EVENTS events in $STORE"
"$bin" events stats --config "$work/dinghook.toml" >/dev/null  # the schema
fill="WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < $EVENTS)"
select="SELECT 'event:bench-'||i,
  CASE WHEN i % 100 = 0 THEN 'chat_update_title' WHEN i % 7 = 0 THEN 'todo_task_update' ELSE 'attendance_check_record' END,
  'dingcorp', '{\"EventType\":\"x\",\"eventId\":\"bench-'||i||'\"}', 'push', 1790000000000 + i*100,
  CASE WHEN i % 5000 = 0 THEN 'dead' WHEN i % 997 = 0 THEN 'retry' WHEN i > $EVENTS - 1000 THEN 'pending' ELSE 'done' END,
  1, CASE WHEN i % 5000 <> 0 AND (i % 997 = 0 OR i > $EVENTS - 1000) THEN 4102444800000 ELSE 1790000000000 + i*100 END,
  1790000000000 + i*100, CASE WHEN i % 3 = 0 THEN 'ops' ELSE 'default' END"
columns="dedup_key, event_type, corp_id, payload, source, received_at, state, attempts, next_attempt_at, updated_at, app"
if [ "$STORE" = postgres ]; then
    # Without the count triggers (superuser): the counts are not what is measured here.
    psql "${PG%/*}/$db" -qc "SET session_replication_role = replica; INSERT INTO events ($columns) ${select/FROM n/} FROM generate_series(1, $EVENTS) AS i; ANALYZE events;" >/dev/null
else
    sqlite3 "$work/db/dinghook.db" "$fill INSERT INTO events ($columns) $select FROM n;"
fi
start_server
for query in "" "state=dead" "state=retry" "state=pending" "state=running" "type=chat_update_title" \
    "app=ops" "app=ops&state=dead" "cursor=$((EVENTS / 2))" "state=dead&cursor=$((EVENTS / 2))" \
    "type=no_such_type" "since=$((1790000000000 + (EVENTS - 10) * 100))"; do
    "$load" --url "http://127.0.0.1:$api" --token "$TOKEN" --concurrency 1 --requests "$REQUESTS" \
        --get "/api/v1/events?limit=50&$query" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("  %-36s p50 %6.2f ms  p99 %6.2f ms  max %6.2f ms  %s" % (sys.argv[1] or "(newest)", d["p50_ms"], d["p99_ms"], d["max_ms"], d["statuses"]))' "$query"
done

echo "== acting: $ACTIONS work notifications at QPS $QPS (the fake refuses more)"
before=$(cpu_s "$server")
"$load" --url "http://127.0.0.1:$api" --token "$TOKEN" --actions "$ACTIONS" --concurrency "$CONCURRENCY" \
    --key-prefix bench >"$work/submit.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  submitted %d in %.1f s (%.0f/s): %s; acceptance p50 %.2f ms p99 %.2f ms max %.2f ms; load generator %.0f us CPU/request" % (d["requests"], d["seconds"], d["per_second"], d["statuses"], d["p50_ms"], d["p99_ms"], d["max_ms"], d["loadgen_cpu_us_per_request"]))' "$work/submit.json"
sent() { curl -sf "$fake_url/_fake/state" | json 'len(d["sent_messages"])'; }
started=$(date +%s.%N)
if [ "$KILL" = 1 ]; then
    target=$((ACTIONS / 3))
    while [ "$(sent)" -lt "$target" ]; do sleep 0.2; done
    kill -KILL "$server"
    wait "$server" 2>/dev/null || true
    sleep 0.5
    at_kill=$(sent)
    echo "  SIGKILL with $at_kill sent; restarting"
    start_server
fi
# Actions not done or dead yet (the reading part's waiting events are scheduled for 2100).
waiting() {
    local n=0 state
    for state in pending retry running; do
        n=$((n + $(curl -sf -H "Authorization: Bearer $TOKEN" \
            "http://127.0.0.1:$api/api/v1/events?type=dinghook_action&state=$state&limit=500" |
            json 'len(d["items"])')))
    done
    echo "$n"
}
while [ "$(waiting)" != 0 ]; do sleep 0.5; done
ended=$(date +%s.%N)
after=$(cpu_s "$server")
curl -sf "$fake_url/_fake/calls?path=/topapi/message/corpconversation/asyncsend_v2" >"$work/calls.json"
curl -sf "$fake_url/_fake/state" >"$work/state.json"
curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$api/api/v1/events?type=dinghook_action&state=dead&limit=5" >"$work/dead.json"
python3 - "$work/calls.json" "$work/state.json" "$work/dead.json" "$ACTIONS" "$QPS" "$started" "$ended" <<'EOF'
import json, sys, collections
calls = json.load(open(sys.argv[1]))
calls = calls.get("calls", calls) if isinstance(calls, dict) else calls
state = json.load(open(sys.argv[2]))
dead = json.load(open(sys.argv[3]))["items"]
n, qps, t0, t1 = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
sends = [c for c in calls if c["path"].endswith("/asyncsend_v2")]
texts = collections.Counter(c["body"]["msg"]["text"]["content"] for c in sends)
sent = [m for m in state["sent_messages"]]
times = sorted(c["at_ms"] for c in sends)
peak, j = 0, 0
for i, t in enumerate(times):
    while times[j] <= t - 1000:
        j += 1
    peak = max(peak, i - j + 1)
repeats = sum(k - 1 for k in texts.values() if k > 1)
print(f"  done in {t1 - t0:.1f} s ({n / qps:.0f} s at QPS {qps}); calls {len(sends)}, distinct {len(texts)}, "
      f"repeated {repeats}, sent {len(sent)}, refused by the fake {len(sends) - len(sent)}, "
      f"busiest second {peak} calls; dead actions {len(dead)}")
EOF
if [ "$KILL" != 1 ]; then
    python3 -c "print('  dinghook %.0f us CPU per action (store + run)' % (($after - $before) / $ACTIONS * 1e6))"
fi

echo "== the same $ACTIONS again, same keys"
"$load" --url "http://127.0.0.1:$api" --token "$TOKEN" --actions "$ACTIONS" --concurrency "$CONCURRENCY" \
    --key-prefix bench >"$work/again.json"
sleep 2
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  answers %s, p99 %.2f ms" % (d["statuses"], d["p99_ms"]))' "$work/again.json"
echo "  sent in all: $(sent)"

echo "== callbacks at $RATE/s for $SECONDS_PER_RUN s: alone, then with the API read as fast as 4 connections go"
callbacks() {
    "$loadgen" --json --random-ids --rate "$RATE" --concurrency 32 --seconds "$SECONDS_PER_RUN" \
        --url "http://127.0.0.1:$port/dingtalk/callback" --event-type some_unhandled_type
}
callbacks >"$work/alone.json"
"$load" --url "http://127.0.0.1:$api" --token "$TOKEN" --concurrency 4 \
    --requests $((SECONDS_PER_RUN * 2000)) --get '/api/v1/events?limit=50&state=dead' >"$work/reads.json" &
reader=$!
callbacks >"$work/beside.json"
kill "$reader" 2>/dev/null || true
wait "$reader" 2>/dev/null || true
python3 - "$work/alone.json" "$work/beside.json" <<'EOF2'
import json, sys
for name, path in (("alone", sys.argv[1]), ("beside the API", sys.argv[2])):
    d = json.load(open(path))
    print(f"  {name:>15}: acks/s {d['rps']:.0f}, errors {d['errors']}, ack p50 {d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms")
EOF2
