#!/usr/bin/env bash
# The receive path driven with curl and `dinghook encrypt`, as the README shows it.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

start_server

# DingTalk's URL check is answered and not stored.
expect_success "$(post '{"EventType":"check_url"}')"
[ "$(stored_count)" = 0 ] || fail "check_url was stored"

# An event is stored before the reply; a re-delivery adds nothing.
event='{"EventType":"chat_update_title","eventId":"curl-1","CorpId":"dingcorp","title":"新群名"}'
expect_success "$(post "$event")"
# grep reads all of the output (no -q): quitting at the first match would break the pipe
# under the CLI, which pipefail then reports as a failure.
"$DINGHOOK_BIN" events list --json | grep '"dedup_key":"event:curl-1"' >/dev/null || fail "event not stored"
expect_success "$(post "$event")"
[ "$(stored_count)" = 1 ] || fail "re-delivery stored twice"
"$DINGHOOK_BIN" events show 1 | grep '新群名' >/dev/null || fail "payload not kept"

# A wrong signature: 401 with a JSON error naming it.
out=$(curl -sS -o - -w ' %{http_code}' -X POST \
    "$BASE/dingtalk/callback?msg_signature=0000&timestamp=$(date +%s)000&nonce=abc" \
    -H 'Content-Type: application/json' -d '{"encrypt":"AAAA"}')
case "$out" in
    *'"code":"signature_mismatch"'*' 401') ;;
    *) fail "wrong signature answered: $out" ;;
esac
# Not JSON: 400.
now_ms="$(date +%s)000"
out=$(curl -sS -o - -w ' %{http_code}' -X POST "$BASE/dingtalk/callback?msg_signature=a&timestamp=$now_ms&nonce=b" -d 'hello')
case "$out" in *'"code":"invalid_body"'*' 400') ;; *) fail "non-JSON body answered: $out" ;; esac
# A timestamp outside the replay window is refused before the body is read.
out=$(curl -sS -o - -w ' %{http_code}' -X POST "$BASE/dingtalk/callback?msg_signature=a&timestamp=1&nonce=b" -d 'hello')
case "$out" in *'"code":"timestamp_out_of_window"'*' 400') ;; *) fail "old timestamp answered: $out" ;; esac

# Ready, and a graceful stop on SIGTERM.
[ "$(curl -sS -o /dev/null -w '%{http_code}' "$BASE/readyz")" = 200 ] || fail "not ready"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "non-zero exit after SIGTERM"
SERVER_PID=""
grep -q '"stopped"' "$WORK/server.log" || grep -q 'stopped' "$WORK/server.log" || fail "no clean stop logged"
# The logs never contain the secrets.
if grep -q -e "$DINGHOOK_TOKEN" -e "$DINGHOOK_AES_KEY" "$WORK/server.log"; then fail "a secret reached the log"; fi
echo "receive.sh: ok"
