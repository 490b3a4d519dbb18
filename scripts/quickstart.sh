#!/usr/bin/env bash
# The whole loop on one machine, with no DingTalk account: a fake DingTalk
# (crates/fake-dingtalk) and dinghook on its embedded SQLite default (config/dev.toml, public
# development keys). One cool-app install event is signed and posted as DingTalk would; the
# script shows it received, handled, and the welcome message dinghook sent to the fake
# DingTalk. Both keep running (Ctrl-C stops them) for the README's curl examples.
#
# Environment (all optional): DINGHOOK_LISTEN (127.0.0.1:8080), DINGHOOK_OPS_LISTEN
# (127.0.0.1:9464: /metrics), DINGHOOK_API_LISTEN (127.0.0.1:8081: the HTTP API),
# FAKE_LISTEN (127.0.0.1:9000),
# DINGHOOK_STREAM (on: Stream mode against the fake as well; off: HTTP push only),
# DINGHOOK_STORE_URL (the config's sqlite://data/dinghook.db), DATA_DIR (data: the fake's log
# and the first reply), DINGHOOK_BIN and FAKE_BIN (prebuilt binaries; otherwise both are built
# with cargo --release).
set -euo pipefail
cd "$(dirname "$0")/.."

export DINGHOOK_CONFIG="$PWD/config/dev.toml"
export DINGHOOK_LISTEN="${DINGHOOK_LISTEN:-127.0.0.1:8080}"
export DINGHOOK_OPS_LISTEN="${DINGHOOK_OPS_LISTEN:-127.0.0.1:9464}"
export DINGHOOK_API_LISTEN="${DINGHOOK_API_LISTEN:-127.0.0.1:8081}"
API="http://$DINGHOOK_API_LISTEN"
API_TOKEN="dinghook-dev-api-token"
FAKE_LISTEN="${FAKE_LISTEN:-127.0.0.1:9000}"
# config/dev.toml points the DingTalk client at 127.0.0.1:9000; follow FAKE_LISTEN.
export DINGHOOK_DINGTALK_OAPI_URL="http://$FAKE_LISTEN"
export DINGHOOK_DINGTALK_API_URL="http://$FAKE_LISTEN"
# Stream mode too: the default app also holds an outbound WebSocket to the fake's Stream
# gateway (step 5), beside the HTTP push.
export DINGHOOK_STREAM="${DINGHOOK_STREAM:-on}"
BASE="http://$DINGHOOK_LISTEN"
FAKE="http://$FAKE_LISTEN"

if [ -z "${DINGHOOK_BIN:-}" ] || [ -z "${FAKE_BIN:-}" ]; then
    echo "== building dinghook and the fake DingTalk (cargo build --release)"
    cargo build --release --quiet -p dinghook -p fake-dingtalk
    DINGHOOK_BIN="${DINGHOOK_BIN:-$PWD/target/release/dinghook}"
    FAKE_BIN="${FAKE_BIN:-$PWD/target/release/fake-dingtalk}"
fi

DATA_DIR="${DATA_DIR:-data}"
mkdir -p "$DATA_DIR"
pids=()
stop() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 0' INT TERM

"$FAKE_BIN" --listen "$FAKE_LISTEN" >>"$DATA_DIR/fake-dingtalk.log" 2>&1 &
pids+=($!)
"$DINGHOOK_BIN" serve &
pids+=($!)

for _ in $(seq 1 200); do
    if curl -fs -o /dev/null "$FAKE/_fake/state" && "$DINGHOOK_BIN" healthcheck "$BASE/healthz" 2>/dev/null; then
        break
    fi
    sleep 0.05
done
"$DINGHOOK_BIN" healthcheck "$BASE/healthz" || { echo "dinghook did not start" >&2; exit 1; }

# The group the cool app is installed in, as DingTalk knows it.
curl -fsS -X POST "$FAKE/_fake/groups" -d '{"openConversationId":"cidDevGroup","title":"dinghook 试用群","coolAppCode":"COOLAPP-dev"}' >/dev/null

event_id="quickstart-$(date +%s%N)"
event='{"EventType":"im_cool_app_install","eventId":"'"$event_id"'","coolAppCode":"COOLAPP-dev","robotCode":"dingdevrobot","openConversationId":"cidDevGroup","operator":"manager01"}'
echo
echo "== 1. DingTalk posts a signed, encrypted cool-app install to $BASE/dingtalk/callback"
reply=$(printf '%s' "$event" | "$DINGHOOK_BIN" encrypt | sh)
echo "   reply: $reply"
printf '%s' "$reply" >"$DATA_DIR/quickstart-reply.json"
echo "   the reply decrypts to: $("$DINGHOOK_BIN" decrypt "$DATA_DIR/quickstart-reply.json")"

echo
echo "== 2. stored, then handled by the built-in cool-app handler"
state=""
for _ in $(seq 1 200); do
    state=$("$DINGHOOK_BIN" events list --json --limit 1000 | grep "\"event:$event_id\"" | grep -o '"state":"[a-z]*"' || true)
    [ "$state" = '"state":"done"' ] && break
    sleep 0.05
done
"$DINGHOOK_BIN" events list --limit 3
[ "$state" = '"state":"done"' ] || { echo "the event was not handled: $state" >&2; exit 1; }

echo
echo "== 3. what dinghook sent to (fake) DingTalk: the group welcome"
curl -fsS "$FAKE/_fake/calls?path=/v1.0/robot/groupMessages/send"
echo

echo
echo "== 4. your system acts back through the HTTP API: a work notification, stored, then sent"
curl -fsS -X POST "$FAKE/_fake/users" -d '{"userid":"manager01","unionid":"union-manager01","name":"Manager","active":true}' >/dev/null
action=$(curl -fsS -X POST "$API/api/v1/apps/default/actions" \
    -H "Authorization: Bearer $API_TOKEN" -H "Idempotency-Key: quickstart-$event_id" \
    -H 'Content-Type: application/json' \
    -d '{"type":"work_notification","userid_list":["manager01"],"msg":{"msgtype":"text","text":{"content":"dinghook quick start: the cool app is installed"}}}')
echo "   accepted: $action"
action_id=$(printf '%s' "$action" | sed 's/.*"id":\([0-9]*\).*/\1/')
for _ in $(seq 1 200); do
    shown=$(curl -fsS -H "Authorization: Bearer $API_TOKEN" "$API/api/v1/actions/$action_id")
    case "$shown" in *'"state":"done"'*|*'"state":"dead"'*) break ;; esac
    sleep 0.05
done
echo "   now: $shown"
case "$shown" in *'"state":"done"'*) ;; *) echo "the action did not run" >&2; exit 1 ;; esac

if [ "$DINGHOOK_STREAM" = "on" ]; then
    echo
    echo "== 5. Stream mode: the fake's gateway sends an event over dinghook's WebSocket; acknowledged after the commit"
    stream_id="quickstart-stream-$(date +%s%N)"
    curl -fsS -X POST "$FAKE/_fake/stream/events" \
        -d '{"eventType":"chat_update_title","eventId":"'"$stream_id"'","data":{"ChatId":"chatDev","OpenConversationId":"cidDevGroup","Title":"改名了","TimeStamp":1}}' >/dev/null
    stored=""
    for _ in $(seq 1 200); do
        stored=$("$DINGHOOK_BIN" events list --json --limit 1000 | grep "\"event:$stream_id\"" || true)
        case "$stored" in *'"state":"done"'*) break ;; esac
        sleep 0.05
    done
    echo "   stored: $stored"
    case "$stored" in *'"source":"stream"'*) ;; *) echo "the Stream event was not stored" >&2; exit 1 ;; esac
    acked=$(curl -fsS "$FAKE/_fake/stream/state?frames=false" | grep -o "\"$stream_id\"" | head -1 || true)
    echo "   the fake gateway saw it acknowledged: ${acked:-no}"
fi

cat <<EOF

dinghook listens on $BASE (callback: $BASE/dingtalk/callback, metrics: http://$DINGHOOK_OPS_LISTEN/metrics,
the HTTP API: $API/api/v1/, token $API_TOKEN);
the fake DingTalk on $FAKE (its calls: $FAKE/_fake/calls). Try the README's curl examples.
Ctrl-C stops both.
EOF
wait "${pids[1]}"
