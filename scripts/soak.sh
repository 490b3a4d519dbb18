#!/usr/bin/env bash
# Soak: a steady load against the release binary with its workers busy, sampling the server's
# RSS every second; prints the outcome and plots RSS and backlog over time.
#
#   scripts/soak.sh                          # 600 s at 2 000 events/s
#   SOAK_SECONDS=60 SOAK_RATE=500 scripts/soak.sh
#
# The events are check-ins of SOAK_USERS users, handled by the built-in attendance handler
# against a fake DingTalk (lookups coalesced per user and window, batched per 50 users), on
# SQLite. Output: target/soak/{samples.csv,summary.md} and the plot at $SOAK_PLOT
# (docs/soak-rss.png). The plot needs Python's matplotlib (`pip install matplotlib`).
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_RATE=${SOAK_RATE:-2000}
SOAK_USERS=${SOAK_USERS:-5000}
SOAK_PLOT=${SOAK_PLOT:-docs/soak-rss.png}

out=target/soak
mkdir -p "$out"
source scripts/common.sh

cargo build --release --quiet --bin dinghook --bin fake-dingtalk --example loadgen
start_fake
port=$(free_port)
ops_port=$(free_port)
mkdir -p "$work/data"
url="sqlite://$work/data/dinghook.db"
DINGHOOK_LISTEN=127.0.0.1:$port DINGHOOK_OPS_LISTEN=127.0.0.1:$ops_port DINGHOOK_LOG=warn DINGHOOK_STORE_URL=$url \
    DINGHOOK_APP_KEY=dingsoak DINGHOOK_APP_SECRET=soak-secret DINGHOOK_AGENT_ID=1 \
    DINGHOOK_DINGTALK_OAPI_URL=$fake_url DINGHOOK_DINGTALK_API_URL=$fake_url \
    DINGHOOK_RECOVERY=off \
    "$bin" serve --config config/dev.toml 2>"$out/server.log" &
server=$!; pids+=("$server")
wait_up "http://127.0.0.1:$port/healthz"

# One sample a second: elapsed s, RSS kB, events waiting (from /metrics).
sample() {
    local t0=$1
    echo "seconds,rss_kb,waiting" >"$out/samples.csv"
    while kill -0 "$server" 2>/dev/null; do
        local rss waiting
        rss=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$server/status" 2>/dev/null) || break
        waiting=$(curl -s "http://127.0.0.1:$ops_port/metrics" |
            awk '/^dinghook_queue_depth\{.*state="(pending|retry)"\}/ {n += $2} END {print n + 0}')
        echo "$(( $(date +%s) - t0 )),$rss,$waiting" >>"$out/samples.csv"
        sleep 1
    done
}
sample "$(date +%s)" &
sampler=$!; pids+=("$sampler")

echo "== soak: $SOAK_SECONDS s at $SOAK_RATE events/s ($SOAK_USERS users)"
"$loadgen" --url "http://127.0.0.1:$port/dingtalk/callback" \
    --concurrency 64 --rate "$SOAK_RATE" --seconds "$SOAK_SECONDS" --users "$SOAK_USERS" \
    --size 400 --json | tee "$out/load.json"
sleep 15
kill "$sampler" 2>/dev/null || true
peak=$(rss_kb "$server" VmHWM)
curl -s "http://127.0.0.1:$ops_port/metrics" >"$out/metrics.txt"
kill -TERM "$server"; wait "$server" 2>/dev/null || true
DINGHOOK_STORE_URL=$url "$bin" events stats --json >"$out/stats.json"
curl -s "$fake_url/_fake/state" >"$out/fake-state.json" || true

python3 - "$out" "$peak" "$SOAK_PLOT" <<'EOF'
import csv, json, sys
out, peak, plot = sys.argv[1], int(sys.argv[2]) / 1024, sys.argv[3]
load = json.load(open(f"{out}/load.json"))
stats = json.load(open(f"{out}/stats.json"))
rows = [(int(r["seconds"]), int(r["rss_kb"]) / 1024, int(r["waiting"])) for r in csv.DictReader(open(f"{out}/samples.csv"))]
secs = [r[0] for r in rows]; rss = [r[1] for r in rows]; waiting = [r[2] for r in rows]
# RSS flatness: the mean of the second minute against the mean of the last minute of load.
def mean(xs): return sum(xs) / max(len(xs), 1)
dur = load["seconds"]
early = [r for s, r, _ in rows if 60 <= s < 120]
late = [r for s, r, _ in rows if dur - 60 <= s < dur]
lines = [
    f"# Soak: {dur:.0f} s at {load['rps']:.0f} acks/s",
    "",
    f"- requests: {load['ok']} acknowledged, {load['errors']} errors; p50 {load['p50_ms']:.2f} ms, p99 {load['p99_ms']:.2f} ms, max {load['max_ms']:.2f} ms",
    f"- RSS: min {min(rss):.1f} MB, max {max(rss):.1f} MB, mean of minute 2 {mean(early):.1f} MB, mean of the last minute {mean(late):.1f} MB; peak (VmHWM) {peak:.1f} MB",
    f"- events waiting: max {max(waiting)}, at the end {waiting[-1] if waiting else 'n/a'}",
    f"- final states: {json.dumps(stats['by_state'])}",
    f"- by type: {json.dumps(stats['by_type'])}",
]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib missing: no plot (pip install matplotlib)")
    sys.exit(0)
fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
ax.plot(secs, rss, color="tab:blue", label="server RSS (MB)")
ax.set_xlabel("seconds since start")
ax.set_ylabel("RSS (MB)", color="tab:blue")
ax.set_ylim(0, max(64, max(rss) * 1.2))
ax.axvline(dur, color="grey", linestyle=":", linewidth=1)
ax2 = ax.twinx()
ax2.plot(secs, waiting, color="tab:orange", linewidth=0.8, label="events not yet done")
ax2.set_ylabel("events not yet done (pending, incl. lookups due later)", color="tab:orange")
ax2.set_ylim(0, max(10, max(waiting) * 1.2))
ax.set_title(f"dinghook soak: {load['rps']:.0f} events/s for {dur:.0f} s, {load['errors']} errors, p99 {load['p99_ms']:.1f} ms")
fig.tight_layout()
fig.savefig(plot)
print(f"plot: {plot}")
EOF
