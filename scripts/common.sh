# Shared by scripts/bench.sh and scripts/soak.sh (sourced, not run): a scratch directory and
# background processes that go away on exit, and small helpers.
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

bin=target/release/dinghook
fake_bin=target/release/fake-dingtalk
loadgen=target/release/examples/loadgen

# The free port of a fresh listener, from the kernel.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until URL answers 2xx.
wait_up() { for _ in $(seq 1 200); do "$bin" healthcheck "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "not up: $1" >&2; return 1; }
# Evaluates a Python expression over the JSON on standard input, bound to d.
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# kB of a process's VmHWM (peak) or VmRSS (now): rss_kb PID VmHWM|VmRSS
rss_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# Starts the fake DingTalk (target/release/fake-dingtalk, built with
# `cargo build --release -p fake-dingtalk`) on a free port (background, cleaned up); sets fake_url.
start_fake() {
    local port; port=$(free_port)
    [ -x "$fake_bin" ] || { echo "no $fake_bin: cargo build --release -p fake-dingtalk" >&2; return 1; }
    "$fake_bin" --listen "127.0.0.1:$port" 2>"$work/fake.log" &
    pids+=("$!")
    fake_url="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do curl -s -o /dev/null "$fake_url/_fake/state" && return 0; sleep 0.05; done
    echo "the fake DingTalk did not start" >&2; return 1
}
