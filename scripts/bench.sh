#!/usr/bin/env bash
# dinghook's benchmark, in one go, on loopback only, with bounded time (about 5 minutes):
#
#   1. criterion: verify+decrypt and encrypt+sign of 1 KB and 60 KB events;
#   2. the constant-200 ceiling (examples/ceiling.rs) and dinghook on SQLite and on PostgreSQL,
#      receiving only (dispatcher off) and with its workers handling the check-ins (on),
#      each loaded by the same load generator at 64 connections for $SECONDS_PER_RUN s;
#   3. the morning storm: 50 000 check-ins from 25 000 users, as fast as the load generator can,
#      with the built-in handlers calling a fake DingTalk that throttles above 20 QPS;
#   4. memory: peak RSS under load, idle RSS once the backlog is drained.
#
#   scripts/bench.sh                 # everything (PostgreSQL on 127.0.0.1:5432, trust auth)
#   BENCH_SKIP=criterion,postgres scripts/bench.sh
#
# Knobs (environment): SECONDS_PER_RUN (10), CONNECTIONS (64), STORM_EVENTS (50000),
# STORM_USERS (25000), STORM_QPS (20), STORM_DRAIN_TIMEOUT (900 s), PG_URL.
# The summary is printed last and written to target/bench/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CONNECTIONS=${CONNECTIONS:-64}
STORM_EVENTS=${STORM_EVENTS:-50000}
STORM_USERS=${STORM_USERS:-25000}
STORM_QPS=${STORM_QPS:-20}
STORM_DRAIN_TIMEOUT=${STORM_DRAIN_TIMEOUT:-900}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
BENCH_SKIP=${BENCH_SKIP:-}

skip() { [[ ",$BENCH_SKIP," == *",$1,"* ]]; }

out=target/bench
mkdir -p "$out"
summary="$out/summary.md"
source scripts/common.sh

echo "== building (release)"
cargo build --release --quiet --bin dinghook --bin fake-dingtalk --example loadgen --example ceiling
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

{
    echo "# dinghook benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'); commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')."
    echo
} >"$summary"

# ---------------------------------------------------------------------------------------------
if ! skip criterion; then
    echo "== criterion (crypto)"
    cargo bench --quiet --bench crypto -- --warm-up-time 1 --measurement-time 3 2>/dev/null | tee "$work/criterion.txt"
    {
        echo "## Crypto (criterion, \`cargo bench --bench crypto\`)"
        echo
        echo "| benchmark | median |"
        echo "|---|---|"
        # "name   time:   [low median high]"; a "change:" block (against an earlier run) has a
        # time: line of its own, which is skipped.
        awk '/change:/ { change = 1; next }
             /time:/ { if (change) { change = 0; next }
                       name = $1; if (name == "time:") name = prev
                       for (i = 1; i <= NF; i++) if ($i ~ /^\[/) { print "| " name " | " $(i+2) " " $(i+3) " |"; break } }
             { prev = $1 }' "$work/criterion.txt"
        echo
    } >>"$summary"
fi

# ---------------------------------------------------------------------------------------------
# One loadgen run; prints its JSON.
load() { "$loadgen" --concurrency "$CONNECTIONS" --seconds "$SECONDS_PER_RUN" --json "$@"; }

declare -A peak idle
echo "== ceiling: constant-200 axum server"
port=$(free_port)
target/release/examples/ceiling --listen "127.0.0.1:$port" 2>/dev/null &
ceiling=$!; pids+=("$ceiling")
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
load --plain --url "http://127.0.0.1:$port/dingtalk/callback" >"$work/ceiling.json"
cat "$work/ceiling.json"
kill -TERM "$ceiling"; wait "$ceiling" 2>/dev/null || true

# dinghook on store $2 with the dispatcher $3 (on|off); fills peak/idle for $1 and leaves the
# load generator's JSON in $work/$1.json. With the dispatcher on, the workers run the built-in
# attendance handler on each check-in as it arrives (each schedules its user's lookup).
run_dinghook() {
    local name=$1 url=$2 dispatch=$3 port server
    port=$(free_port)
    DINGHOOK_LISTEN=127.0.0.1:$port DINGHOOK_OPS_LISTEN= DINGHOOK_LOG=warn DINGHOOK_STORE_URL=$url DINGHOOK_DISPATCH=$dispatch \
        "$bin" serve --config config/dev.toml 2>"$work/$name.log" &
    server=$!; pids+=("$server")
    wait_up "http://127.0.0.1:$port/healthz"
    load --url "http://127.0.0.1:$port/dingtalk/callback" >"$work/$name.json"
    cat "$work/$name.json"
    peak[$name]=$(rss_kb "$server" VmHWM)
    # Let the dispatcher finish the check-ins the load left (their lookups are due later),
    # then read the idle size.
    while [ "$dispatch" = on ]; do
        DINGHOOK_STORE_URL=$url "$bin" events stats --json >"$work/$name.stats" 2>/dev/null || true
        json 'sum(n for s, n in d["by_type"].get("attendance_check_record", {}).items() if s != "done")' \
            <"$work/$name.stats" | grep -qx 0 && break
        sleep 0.5
    done
    sleep 2
    idle[$name]=$(rss_kb "$server" VmRSS)
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
}

for dispatch in off on; do
    echo "== dinghook, SQLite, dispatcher $dispatch"
    mkdir -p "$work/sqlite-$dispatch"
    run_dinghook "sqlite-$dispatch" "sqlite://$work/sqlite-$dispatch/dinghook.db" "$dispatch"
    if ! skip postgres; then
        echo "== dinghook, PostgreSQL, dispatcher $dispatch"
        db="dinghook_bench_$$_$dispatch"
        psql "$PG_URL" -qc "CREATE DATABASE $db"
        run_dinghook "postgres-$dispatch" "${PG_URL%/*}/$db" "$dispatch"
        psql "$PG_URL" -qc "DROP DATABASE $db WITH (FORCE)"
    fi
done

{
    echo "## Acknowledged events at $CONNECTIONS connections, ${SECONDS_PER_RUN} s each (\`examples/loadgen\`)"
    echo
    echo "| server | acks/s | ratio to ceiling | p50 ms | p99 ms | max ms | errors | peak RSS MB | idle RSS MB |"
    echo "|---|---|---|---|---|---|---|---|---|"
    base=$(json 'd["rps"]' <"$work/ceiling.json")
    row() {
        local name=$1 label=$2
        [ -f "$work/$name.json" ] || return 0
        local r; r=$(json 'd["rps"]' <"$work/$name.json")
        printf '| %s | %.0f | %.2f | %s | %s | %s | %s | %s | %s |\n' "$label" "$r" \
            "$(awk -v a="$r" -v b="$base" 'BEGIN {print a / b}')" \
            "$(json 'round(d["p50_ms"],2)' <"$work/$name.json")" \
            "$(json 'round(d["p99_ms"],2)' <"$work/$name.json")" \
            "$(json 'round(d["max_ms"],2)' <"$work/$name.json")" \
            "$(json 'd["errors"]' <"$work/$name.json")" \
            "${3:-}" "${4:-}"
    }
    row ceiling "constant-200 axum (ceiling)" "" ""
    for run in sqlite-off sqlite-on postgres-off postgres-on; do
        [ -n "${peak[$run]:-}" ] || continue
        case $run in
            sqlite-*) label="dinghook, SQLite (durable commit)" ;;
            postgres-*) label="dinghook, PostgreSQL" ;;
        esac
        case $run in
            *-off) label="$label, receiving only" ;;
            *-on) label="$label, workers handling the check-ins" ;;
        esac
        row "$run" "$label" "$(mb "${peak[$run]}")" "$(mb "${idle[$run]}")"
    done
    echo
} >>"$summary"

# ---------------------------------------------------------------------------------------------
if ! skip storm; then
    echo "== morning storm: $STORM_EVENTS check-ins from $STORM_USERS users, DingTalk at $STORM_QPS QPS"
    start_fake
    port=$(free_port)
    curl -sf -d "{\"limit\": $STORM_QPS}" "$fake_url/_fake/qps" >/dev/null
    # Each user's day in DingTalk: an on-duty punch (normal) and the evening check still ahead,
    # so attendance/list answers two records per user and nobody is notified.
    python3 - "$STORM_USERS" >"$work/days.json" <<'PY'
import datetime, json, sys, time
china = datetime.timezone(datetime.timedelta(hours=8))
today = datetime.datetime.now(china).replace(hour=0, minute=0, second=0, microsecond=0)
ms = lambda d: int(d.timestamp() * 1000)
now = int(time.time() * 1000)
common = {"workDate": ms(today), "locationResult": "Normal", "sourceType": "USER", "groupId": 1, "planId": 1}
print(json.dumps({
    "user_ids": [f"user{u}" for u in range(int(sys.argv[1]))],
    "records": [
        dict(common, checkType="OnDuty", timeResult="Normal", userCheckTime=now, baseCheckTime=ms(today.replace(hour=9))),
        dict(common, checkType="OffDuty", timeResult="NotSigned", userCheckTime=ms(today.replace(hour=18)), baseCheckTime=ms(today.replace(hour=18))),
    ],
}))
PY
    curl -sf --data-binary "@$work/days.json" "$fake_url/_fake/attendance/list/users" >/dev/null
    cp config/dev.toml "$work/storm.toml"
    cat >>"$work/storm.toml" <<'EOF'

[handlers.attendance]
# Lookups wait one window after the window's end; a short window keeps the drain about DingTalk.
coalesce_window = "5s"
EOF
    mkdir -p "$work/storm"
    surl="sqlite://$work/storm/dinghook.db"
    DINGHOOK_LISTEN=127.0.0.1:$port DINGHOOK_OPS_LISTEN= DINGHOOK_LOG=warn DINGHOOK_STORE_URL=$surl \
        DINGHOOK_APP_KEY=dingstorm DINGHOOK_APP_SECRET=storm-secret DINGHOOK_AGENT_ID=1 \
        DINGHOOK_DINGTALK_OAPI_URL=$fake_url DINGHOOK_DINGTALK_API_URL=$fake_url \
        DINGHOOK_DINGTALK_QPS=$STORM_QPS DINGHOOK_RECOVERY=off DINGHOOK_BATCH_SIZE=50 \
        "$bin" serve --config "$work/storm.toml" 2>"$work/storm.log" &
    server=$!; pids+=("$server")
    wait_up "http://127.0.0.1:$port/healthz"
    started=$(date +%s.%N)
    "$loadgen" --url "http://127.0.0.1:$port/dingtalk/callback" --concurrency "$CONNECTIONS" --seconds 0 \
        --requests "$STORM_EVENTS" --users "$STORM_USERS" --size 400 --json >"$work/storm.json"
    acked_at=$(date +%s.%N)
    cat "$work/storm.json"
    storm_peak_during=$(rss_kb "$server" VmHWM)
    drained=""
    deadline=$(( $(date +%s) + STORM_DRAIN_TIMEOUT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        DINGHOOK_STORE_URL=$surl "$bin" events stats --json >"$work/storm.stats" 2>/dev/null || { sleep 1; continue; }
        if json 'sum(d["by_state"].get(s,0) for s in ("pending","leased","retry"))' <"$work/storm.stats" | grep -qx 0; then
            drained=$(date +%s.%N); break
        fi
        sleep 1
    done
    sleep 2
    storm_peak=$(rss_kb "$server" VmHWM); storm_idle=$(rss_kb "$server" VmRSS)
    curl -sf "$fake_url/_fake/calls" >"$work/calls.json"
    curl -sf "$fake_url/_fake/state" >"$work/fake-state.json"
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
    DINGHOOK_STORE_URL=$surl "$bin" events stats --json >"$work/storm.stats"
    python3 - "$work" "$started" "$acked_at" "${drained:-}" "$STORM_QPS" "$storm_peak_during" "$storm_peak" "$storm_idle" >>"$summary" <<'EOF'
import json, sys
work, started, acked_at, drained, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
peak_during, peak, idle = (int(x) / 1024 for x in sys.argv[6:9])
load = json.load(open(f"{work}/storm.json"))
stats = json.load(open(f"{work}/storm.stats"))
calls = json.load(open(f"{work}/calls.json"))
checkins = stats["by_type"].get("attendance_check_record", {})
stored = sum(checkins.values())
lookups = stats["by_type"].get("dinghook_attendance_lookup", {})
def busiest_second(times):
    """The most calls in any one-second window."""
    times = sorted(times)
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1000.0:
            j += 1
        most = max(most, i - j + 1)
    return most
paths = {}
for c in calls:
    paths.setdefault(c["path"], []).append(c["at_ms"])
# DingTalk limits QPS per app and API; the client's limiter covers all APIs together.
per_api = max((busiest_second(t) for t in paths.values()), default=0)
overall = busiest_second([c["at_ms"] for c in calls])
paths = {p: len(t) for p, t in paths.items()}
codes = [str(c.get("answer_code")) for c in calls]
throttled = sum(1 for a in codes if a == "90018" or "Qps" in a)
failed = sum(1 for a in codes if a not in ("0", "ok", "None"))
print("## Morning storm (`scripts/bench.sh`, storm part)")
print()
print(f"{load['ok'] + load['errors']} check-in events from the load generator's users, "
      f"{load['concurrency']} connections, fake DingTalk throttling above {limit} QPS, "
      "built-in handlers (attendance lookups coalesced per user and 5 s window, batched per "
      "50 users into `attendance/list` calls; 4 workers claiming 50 events each), SQLite. "
      "DingTalk holds two records per user (a normal on-duty punch, the evening check still "
      "ahead), so nobody is notified and every call is a lookup page.")
print()
print("| measure | value |")
print("|---|---|")
print(f"| acknowledged (200, reply verified) | {load['ok']} of {load['ok'] + load['errors']} |")
print(f"| time to acknowledge all | {acked_at - started:.1f} s ({load['rps']:.0f} acks/s) |")
print(f"| ack latency p50 / p99 / max | {load['p50_ms']:.2f} / {load['p99_ms']:.2f} / {load['max_ms']:.2f} ms |")
print(f"| check-in events stored | {stored} (lost: {load['ok'] - stored}) |")
print(f"| states of the check-ins | {json.dumps(checkins)} |")
print(f"| lookups scheduled (per user and window) | {sum(lookups.values())}: {json.dumps(lookups)} |")
print(f"| DingTalk calls made | {len(calls)}: {json.dumps(paths)} |")
print(f"| highest calls in any 1 s window, per API / all APIs together (limit {limit}) | {per_api} / {overall} |")
print(f"| calls the fake throttled / answered with any error | {throttled} / {failed} |")
if drained:
    print(f"| time to drain the backlog (from the first request) | {float(drained) - started:.1f} s |")
else:
    print("| time to drain the backlog | not drained within STORM_DRAIN_TIMEOUT |")
print(f"| server peak RSS during the acks / overall / idle after | {peak_during:.1f} / {peak:.1f} / {idle:.1f} MB |")
print()
EOF
fi

echo
cat "$summary"
