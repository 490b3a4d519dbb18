#!/usr/bin/env bash
# Many apps: start-up time and idle RSS of `dinghook serve` with 1 app and with APPS apps (each
# with its own keys and DingTalk credentials, recovery off so nothing calls out); then the same
# load (examples/loadgen, CONNECTIONS connections, SECONDS_PER_RUN s, distinct events with random
# eventIds as DingTalk's are) sent to the 1-app server and spread over LOAD_APPS of the APPS-app
# server's apps, ROUNDS times each in turn: first the same steady load (RATE events/s, the
# workers running, no handlers: each event done as it comes), then as fast as the load
# generator can (receiving only, dispatcher off).
#
#   scripts/apps-bench.sh                        # 1 000 apps, the release binaries (built)
#   APPS=200 LOAD_APPS=0 DINGHOOK_BIN=target/debug/dinghook scripts/apps-bench.sh
#
# Start-up: from exec to the "dinghook listening" line. RSS: VmRSS after 2 s idle. Load:
# acknowledged requests/s, latency p50/p99, and the CPU the server and the load generator each
# spent per request (they share the cores).
set -euo pipefail
cd "$(dirname "$0")/.."

APPS=${APPS:-1000}
LOAD_APPS=${LOAD_APPS:-100}
CONNECTIONS=${CONNECTIONS:-32}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
ROUNDS=${ROUNDS:-2}
RATE=${RATE:-2000}
if [ -z "${DINGHOOK_BIN:-}" ]; then
    cargo build --release --quiet --bin dinghook --example loadgen
    DINGHOOK_BIN=target/release/dinghook
fi
LOADGEN=${LOADGEN:-target/release/examples/loadgen}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" "$APPS" "$LOAD_APPS" <<'EOF'
import random, string, sys
work, apps = sys.argv[1], int(sys.argv[2])
def key():
    return ''.join(random.choice(string.ascii_letters + string.digits) for _ in range(43))
keys = [key() for _ in range(apps)]
for n in (1, apps):
    with open(f'{work}/apps{n}.toml', 'w') as f:
        f.write(f'listen = "127.0.0.1:0"\n[ops]\nlisten = ""\n[store]\n'
                f'url = "sqlite://{work}/db{n}.db"\n[recovery]\nenabled = false\n'
                f'[handlers]\nenabled = false\n')
        for i in range(n):
            f.write(f'[apps.a{i}]\ntoken = "t{i}"\naes_key = "{keys[i]}"\nowner_key = "dingo{i}"\n'
                    f'app_key = "dingk{i}"\napp_secret = "s{i}"\n')
# What the load generator sends to: the first app, or the first LOAD_APPS apps.
with open(f'{work}/targets1', 'w') as f:
    f.write(f'/dingtalk/callback/a0 t0 {keys[0]} dingo0\n')
with open(f'{work}/targets{apps}', 'w') as f:
    for i in range(min(int(sys.argv[3]), apps)):
        f.write(f'/dingtalk/callback/a{i} t{i} {keys[i]} dingo{i}\n')
EOF

measure() {
    local n=$1 start pid t rss
    start=$(date +%s%N)
    "$DINGHOOK_BIN" serve --config "$work/apps$n.toml" >"$work/log$n" 2>&1 &
    pid=$!
    for _ in $(seq 1 1000); do
        grep -q "dinghook listening" "$work/log$n" && break
        sleep 0.01
    done
    t=$(( ($(date +%s%N) - start) / 1000000 ))
    sleep 2
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$n $t $rss"
}

read -r _ t1 rss1 < <(measure 1)
read -r _ tn rssn < <(measure "$APPS")
echo "apps  start-up  idle RSS"
echo "1     ${t1} ms    ${rss1} kB"
echo "$APPS  ${tn} ms    ${rssn} kB"
echo "per app: $(( (rssn - rss1) / (APPS - 1) )) kB"

[ "$LOAD_APPS" -gt 0 ] || exit 0

# CPU seconds (user + system) a process has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

# One load run against a fresh server with config apps$1.toml, sending to targets$1; with a
# rate ($3 > 0) the workers run, without one they are off.
load_run() {
    local n=$1 round=$2 rate=$3 port pid before after dispatch=on
    [ "$rate" -gt 0 ] || dispatch=off
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    rm -f "$work/db$n.db"*
    DINGHOOK_LISTEN="127.0.0.1:$port" DINGHOOK_DISPATCH=$dispatch \
        "$DINGHOOK_BIN" serve --config "$work/apps$n.toml" >"$work/load$n-$round.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 500); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break
        sleep 0.01
    done
    before=$(cpu_s "$pid")
    /usr/bin/time -f "%U %S" -o "$work/time" "$LOADGEN" --json --random-ids --rate "$rate" \
        --concurrency "$CONNECTIONS" \
        --seconds "$SECONDS_PER_RUN" --url "http://127.0.0.1:$port/" \
        --apps-file "$work/targets$n" >"$work/load.json"
    after=$(cpu_s "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$work/load.json" "$work/time" "$before" "$after" "$n" "$(wc -l <"$work/targets$n")" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
gen = sum(float(x) for x in open(sys.argv[2]).read().split()[-2:])
server = float(sys.argv[4]) - float(sys.argv[3])
ok = max(d["ok"], 1)
print(f'{sys.argv[5]:>5} apps configured, load over {sys.argv[6]:>3}: {d["rps"]:7.0f} acks/s  '
      f'p50 {d["p50_ms"]:.2f} ms  p99 {d["p99_ms"]:.2f} ms  errors {d["errors"]}  '
      f'server {server / ok * 1e6:.0f} us CPU/req  loadgen {gen / ok * 1e6:.0f} us CPU/req')
EOF
}

echo
echo "the same load: $RATE events/s, $CONNECTIONS connections, $SECONDS_PER_RUN s per run, workers on"
for round in $(seq 1 "$ROUNDS"); do
    load_run 1 "$round" "$RATE"
    load_run "$APPS" "$round" "$RATE"
done
echo
echo "saturation: $CONNECTIONS connections, $SECONDS_PER_RUN s per run, receiving only"
for round in $(seq 1 "$ROUNDS"); do
    load_run 1 "$round" 0
    load_run "$APPS" "$round" 0
done
