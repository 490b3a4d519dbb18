#!/usr/bin/env bash
# Routes: one signed-HTTP route to a constant-200 sink (examples/ceiling), on SQLite, the load
# generator, the sink and dinghook sharing this machine's cores.
#
#   1. steady: RATE events/s for SECONDS_PER_RUN s, received and delivered at once: acks/s,
#      the acknowledgement latency, and the acknowledgement → delivered latency (p50/p99 from
#      dinghook_route_delivery_seconds);
#   2. drain: the route paused, BACKLOG events received, then resumed: deliveries per second
#      until none is left.
#
#   scripts/routes-bench.sh                 # release binaries (built)
#   RATE=1000 BACKLOG=20000 scripts/routes-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-2000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
BACKLOG=${BACKLOG:-50000}
CONNECTIONS=${CONNECTIONS:-32}
ROUTE_CONCURRENCY=${ROUTE_CONCURRENCY:-32}
source scripts/common.sh
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --quiet --bin dinghook --example loadgen --example ceiling
fi

sink_port=$(free_port)
target/release/examples/ceiling --listen "127.0.0.1:$sink_port" 2>/dev/null &
pids+=("$!")
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
name = "sink"
url = "http://127.0.0.1:$sink_port/hook"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
concurrency = $ROUTE_CONCURRENCY
EOF
"$bin" serve --config "$work/dinghook.toml" 2>"$work/dinghook.log" &
server=$!
pids+=("$server")
wait_up "http://127.0.0.1:$port/healthz"

metrics() { curl -sf "http://127.0.0.1:$ops/metrics"; }
# Deliveries done so far.
delivered() { metrics | awk '/^dinghook_route_deliveries_total\{route="sink",outcome="done"\}/ {print $2}' | tail -1; }
# Deliveries waiting (pending + retry + running).
waiting() {
    "$bin" routes list --json --config "$work/dinghook.toml" 2>/dev/null |
        python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); print(d["pending"]+d["retry"]+d["running"])'
}
# p50 and p99 of the acknowledgement → delivered histogram (upper bucket bounds).
latency() {
    metrics | python3 -c '
import re, sys
buckets = []
for line in sys.stdin:
    m = re.match(r"dinghook_route_delivery_seconds_bucket\{.*le=\"([^\"]+)\".*\} (\S+)", line)
    if m:
        buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
total = buckets[-1][1] if buckets else 0
def q(p):
    for le, n in buckets:
        if n >= p * total:
            return le
print(f"p50 <= {q(0.5) * 1000:g} ms, p99 <= {q(0.99) * 1000:g} ms over {total:.0f} deliveries")'
}
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }

echo "== steady: $RATE events/s for $SECONDS_PER_RUN s"
before=$(cpu_s "$server")
/usr/bin/time -f "%U %S" -o "$work/time" "$loadgen" --json --random-ids --rate "$RATE" \
    --concurrency "$CONNECTIONS" --seconds "$SECONDS_PER_RUN" \
    --url "http://127.0.0.1:$port/dingtalk/callback" >"$work/steady.json"
for _ in $(seq 1 100); do [ "$(waiting)" = 0 ] && break; sleep 0.1; done
after=$(cpu_s "$server")
python3 - "$work/steady.json" "$work/time" "$before" "$after" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
gen = sum(float(x) for x in open(sys.argv[2]).read().split()[-2:])
ok = max(d["ok"], 1)
server = float(sys.argv[4]) - float(sys.argv[3])
print(f'acks/s {d["rps"]:.0f}, errors {d["errors"]}, ack latency p50 {d["p50_ms"]:.2f} ms p99 {d["p99_ms"]:.2f} ms; '
      f'dinghook {server / ok * 1e6:.0f} us CPU/event (receive + deliver), load generator {gen / ok * 1e6:.0f} us')
EOF
echo "ack -> delivered: $(latency); delivered $(delivered)"

echo "== drain: $BACKLOG events received with the route paused, then resumed"
"$bin" routes pause sink --config "$work/dinghook.toml" >/dev/null
sleep 1.5
"$loadgen" --json --random-ids --concurrency "$CONNECTIONS" --requests "$BACKLOG" --seconds 0 \
    --url "http://127.0.0.1:$port/dingtalk/callback" >"$work/backlog.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("received %d at %.0f/s, errors %d" % (d["ok"], d["rps"], d["errors"]))' "$work/backlog.json"
start_done=$(delivered)
start=$(date +%s.%N)
"$bin" routes resume sink --config "$work/dinghook.toml" >/dev/null
while [ "$(waiting)" != 0 ]; do sleep 0.2; done
end=$(date +%s.%N)
end_done=$(delivered)
python3 -c "n=$end_done-$start_done; t=$end-$start; print(f'drained {n:.0f} deliveries in {t:.1f} s: {n/t:.0f}/s')"
