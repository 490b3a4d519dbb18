#!/usr/bin/env bash
# A cool app installed in a group, end to end with the real binaries: the `fake-dingtalk` binary
# stands in for DingTalk, `dinghook serve` receives the signed callback, looks the group up and
# greets it once, even when DingTalk delivers the install three times.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
need_fake_bin
: "${FAKE_PORT:?set FAKE_PORT to a second free port}"

FAKE="http://127.0.0.1:$FAKE_PORT"
"$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" >>"$WORK/fake.log" 2>&1 &
FAKE_PID=$!
trap 'kill -KILL $FAKE_PID 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "$FAKE/_fake/state" && break; sleep 0.05; done
curl -sS -X POST "$FAKE/_fake/groups" -d '{"openConversationId":"cidCurl1","title":"研发群","coolAppCode":"COOLAPP-1-curl"}' >/dev/null

export DINGHOOK_APP_KEY=dingcurlapp DINGHOOK_APP_SECRET=curl-app-secret DINGHOOK_AGENT_ID=1001
export DINGHOOK_DINGTALK_OAPI_URL=$FAKE DINGHOOK_DINGTALK_API_URL=$FAKE
export DINGHOOK_POLL_INTERVAL=50ms
start_server

event='{"EventType":"im_cool_app_install","eventId":"curl-install-1","CorpId":"dingcorp","coolAppCode":"COOLAPP-1-curl","robotCode":"robotCurl","openConversationId":"cidCurl1","operator":"u1","operateTime":"1641866135051"}'
for _ in 1 2 3; do expect_success "$(post "$event")"; done

sent=""
for _ in $(seq 1 100); do
    sent=$(curl -sS "$FAKE/_fake/calls?path=/v1.0/robot/groupMessages/send")
    case "$sent" in *robotCurl*) break ;; esac
    sleep 0.1
done
for want in '"robotCode":"robotCurl"' '"openConversationId":"cidCurl1"' '"coolAppCode":"COOLAPP-1-curl"'; do
    case "$sent" in *"$want"*) ;; *) fail "group message without $want: $sent" ;; esac
done
sleep 0.5
count=$(curl -sS "$FAKE/_fake/calls?path=/v1.0/robot/groupMessages/send" | grep -o '"seq"' | wc -l | tr -d ' ')
[ "$count" = 1 ] || fail "expected one welcome message, got $count"
case "$sent" in *'研发群'*) ;; *) fail "the welcome does not name the group: $sent" ;; esac
"$DINGHOOK_BIN" events list --json | grep '"state":"done"' >/dev/null || fail "install not done"
if grep -q -e curl-app-secret -e "$DINGHOOK_AES_KEY" "$WORK/server.log"; then fail "a secret reached the log"; fi
echo "install.sh: ok"
