# Shared helpers for the curl scripts. Sourced, not run.
# The runner (tests/curl.rs) sets DINGHOOK_BIN (the built binary), PORT and OPS_PORT (free
# ports: the public and the operator listener) and, for
# the scripts that start a fake DingTalk, FAKE_BIN (the fake-dingtalk binary).
set -euo pipefail

: "${DINGHOOK_BIN:?set DINGHOOK_BIN to the dinghook binary}"
: "${PORT:?set PORT to a free port}"
: "${OPS_PORT:?set OPS_PORT to a free port}"

# need_fake_bin: for scripts that start the fake DingTalk; stops at once without FAKE_BIN.
need_fake_bin() {
    : "${FAKE_BIN:?set FAKE_BIN to the fake-dingtalk binary (cargo build -p fake-dingtalk; target/debug/fake-dingtalk)}"
    [ -x "$FAKE_BIN" ] || { echo "FAKE_BIN=$FAKE_BIN is not an executable" >&2; exit 1; }
}

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Configuration through the environment only, as in the container image.
export DINGHOOK_LISTEN="127.0.0.1:$PORT"
export DINGHOOK_OPS_LISTEN="127.0.0.1:$OPS_PORT"
export DINGHOOK_TOKEN="curl-test-token"
export DINGHOOK_AES_KEY="CurlTestKey0123456789abcdefghijklmnopqrstuv"
export DINGHOOK_OWNER_KEY="dingcurltest"
export DINGHOOK_STORE_URL="sqlite://$WORK/data/dinghook.db"
export DINGHOOK_LOG_FORMAT=json
unset DINGHOOK_CONFIG

BASE="http://127.0.0.1:$PORT"
OPS="http://127.0.0.1:$OPS_PORT"

fail() { echo "FAIL: $*" >&2; [ -f "$WORK/server.log" ] && tail -20 "$WORK/server.log" >&2; exit 1; }

# start_server [command prefix...]: starts `dinghook serve` and waits for /healthz.
start_server() {
    "$@" "$DINGHOOK_BIN" serve >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if "$DINGHOOK_BIN" healthcheck "$BASE/healthz" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    fail "server did not become healthy"
}

# post EVENT_JSON: signs and posts like DingTalk; prints "<status> <body>".
post() {
    local cmd
    cmd=$(printf '%s' "$1" | "$DINGHOOK_BIN" encrypt --url "$BASE/dingtalk/callback")
    eval "$cmd -o $WORK/body -w '%{http_code}'" >"$WORK/status"
    echo "$(cat "$WORK/status") $(cat "$WORK/body")"
}

# expect_success "<status> <body>": a 200 whose body verifies and decrypts to success.
expect_success() {
    local status=${1%% *} body=${1#* }
    [ "$status" = 200 ] || fail "expected 200, got $1"
    printf '%s' "$body" >"$WORK/reply.json"
    [ "$("$DINGHOOK_BIN" decrypt "$WORK/reply.json")" = success ] || fail "reply does not decrypt to success: $body"
}

stored_count() {
    "$DINGHOOK_BIN" events list --json --limit 100000 | wc -l | tr -d ' '
}
