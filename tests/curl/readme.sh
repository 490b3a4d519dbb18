#!/usr/bin/env bash
# The README's quick start, as written: the server on config/dev.toml and the ready-made curl
# request pasted from the README. Only the port and the data directory are changed.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
root=$(cd "$here/../.." && pwd)

unset DINGHOOK_TOKEN DINGHOOK_AES_KEY DINGHOOK_OWNER_KEY
export DINGHOOK_CONFIG="$root/config/dev.toml"
start_server

cmd=$(grep -m1 "^curl -sS -X POST 'http://127.0.0.1:8080/dingtalk/callback?signature=" "$root/README.md") \
    || fail "no ready-made curl request in README.md"
cmd=${cmd//127.0.0.1:8080/127.0.0.1:$PORT}
reply=$(eval "$cmd")
printf '%s' "$reply" >"$WORK/reply.json"
[ "$("$DINGHOOK_BIN" decrypt "$WORK/reply.json")" = success ] || fail "README request: $reply"
"$DINGHOOK_BIN" events list --json | grep '"dedup_key":"event:readme-example-1"' >/dev/null || fail "README event not stored"

# The README's own encrypt pipeline works too.
echo '{"EventType":"im_cool_app_install","eventId":"e-42","coolAppCode":"COOLAPP-1-x","robotCode":"r1","openConversationId":"cid1"}' \
    | "$DINGHOOK_BIN" encrypt --url "$BASE/dingtalk/callback" | sh >/dev/null
[ "$(stored_count)" = 2 ] || fail "encrypt | sh did not store"
echo "readme.sh: ok"
