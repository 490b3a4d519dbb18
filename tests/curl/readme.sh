#!/usr/bin/env bash
# The README's quick start, as written: its first command (scripts/quickstart.sh: the fake
# DingTalk and the server on config/dev.toml, one event round the loop), then the ready-made
# curl request and the `encrypt | sh` example pasted from the README. Only the ports, the data
# directory and the prebuilt binaries are given through the environment.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
root=$(cd "$here/../.." && pwd)
: "${FAKE_BIN:?set FAKE_BIN to the fake-dingtalk binary}"
: "${FAKE_PORT:?set FAKE_PORT to a free port}"
: "${API_PORT:?set API_PORT to a free port}"

unset DINGHOOK_TOKEN DINGHOOK_AES_KEY DINGHOOK_OWNER_KEY DINGHOOK_LOG_FORMAT
export DINGHOOK_CONFIG="$root/config/dev.toml"
export FAKE_LISTEN="127.0.0.1:$FAKE_PORT"
export DINGHOOK_API_LISTEN="127.0.0.1:$API_PORT"
export DINGHOOK_BIN FAKE_BIN DATA_DIR="$WORK"
FAKE="http://$FAKE_LISTEN"

start=$(grep -m1 '^scripts/quickstart.sh' "$root/README.md") || fail "no quick start command in README.md"
# Its own process group, so stopping it reaches the fake and the server it started.
(cd "$root" && exec setsid bash -c "$start") >"$WORK/quickstart.log" 2>&1 &
QS_PID=$!
stop_quickstart() {
    kill -TERM -- "-$QS_PID" 2>/dev/null || true
    wait "$QS_PID" 2>/dev/null || true
}
trap 'stop_quickstart; cleanup' EXIT
for _ in $(seq 1 600); do
    grep -q 'Ctrl-C stops both' "$WORK/quickstart.log" && break
    kill -0 "$QS_PID" 2>/dev/null || { cat "$WORK/quickstart.log" >&2; fail "the quick start stopped"; }
    sleep 0.05
done
grep -q 'Ctrl-C stops both' "$WORK/quickstart.log" || { cat "$WORK/quickstart.log" >&2; fail "the quick start did not finish its loop"; }
grep -q 'the reply decrypts to: success' "$WORK/quickstart.log" || fail "quick start: no decrypted reply"
grep -q '"msgKey"' "$WORK/quickstart.log" || fail "quick start: no welcome shown at the fake DingTalk"
grep -q 'now: .*"state":"done"' "$WORK/quickstart.log" || fail "quick start: the API's action did not run"
grep -q 'stored: .*"source":"stream"' "$WORK/quickstart.log" || fail "quick start: no event over Stream mode"
grep -q 'the fake gateway saw it acknowledged: "quickstart-stream-' "$WORK/quickstart.log" || fail "quick start: the Stream event was not acknowledged"

# The README's HTTP API examples: the first listing, as written but for the port.
cmd=$(grep -m1 "^curl -sS -H \"Authorization: Bearer dinghook-dev-api-token\" 'http://127.0.0.1:8081/api/v1/events" "$root/README.md") \
    || fail "no HTTP API listing example in README.md"
listing=$(eval "${cmd//127.0.0.1:8081/127.0.0.1:$API_PORT}")
case "$listing" in *'"items":[{'*) ;; *) fail "README API listing: $listing" ;; esac

# The ready-made request.
cmd=$(grep -m1 "^curl -sS -X POST 'http://127.0.0.1:8080/dingtalk/callback?signature=" "$root/README.md") \
    || fail "no ready-made curl request in README.md"
cmd=${cmd//127.0.0.1:8080/127.0.0.1:$PORT}
reply=$(eval "$cmd")
printf '%s' "$reply" >"$WORK/reply.json"
[ "$("$DINGHOOK_BIN" decrypt "$WORK/reply.json")" = success ] || fail "README request: $reply"

wait_done() {
    for _ in $(seq 1 200); do
        "$DINGHOOK_BIN" events list --json --limit 1000 | grep "\"dedup_key\":\"$1\"" | grep '"state":"done"' >/dev/null && return 0
        sleep 0.05
    done
    "$DINGHOOK_BIN" events list >&2
    fail "$1 was not handled"
}
wait_done "event:readme-example-1"
welcomes=$(curl -sS "$FAKE/_fake/calls?path=/v1.0/robot/groupMessages/send" | grep -o '"msgKey"' | wc -l | tr -d ' ')
[ "$welcomes" = 2 ] || fail "expected the quick start's and the README's welcome at the fake, got $welcomes"

# The README's own encrypt pipeline works too.
pipeline=$(grep -m1 -A1 "^echo '{\"EventType\":\"chat_update_title\"" "$root/README.md") || fail "no encrypt example in README.md"
pipeline=${pipeline//cargo run --release -- /\"\$DINGHOOK_BIN\" }
pipeline=${pipeline//--config config\/dev.toml/}
eval "$pipeline" >/dev/null
wait_done "event:e-42"

# The whole loop without one ERROR line.
if grep -E 'ERROR|panicked' "$WORK/quickstart.log" >&2; then fail "the quick start logged errors"; fi
echo "readme.sh: ok"
