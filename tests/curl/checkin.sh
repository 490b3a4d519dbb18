#!/usr/bin/env bash
# A late check-in end to end with real processes: the `fake-dingtalk` binary scripted through
# its admin routes, `dinghook serve` pointed at it through the environment, the push signed by
# `dinghook encrypt`; the user's work notification must reach the fake within 10 s.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
need_fake_bin

# The runner passes a second free port; by hand, the one after PORT.
FAKE_PORT=${FAKE_PORT:-$((PORT + 1))}
FAKE="http://127.0.0.1:$FAKE_PORT"
FAKE_PID=""
stop_fake() {
    if [ -n "$FAKE_PID" ] && kill -0 "$FAKE_PID" 2>/dev/null; then
        kill -KILL "$FAKE_PID" 2>/dev/null || true
        wait "$FAKE_PID" 2>/dev/null || true
    fi
}
trap 'stop_fake; cleanup' EXIT

if curl -s -o /dev/null "$FAKE/"; then fail "port $FAKE_PORT is already in use"; fi
"$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" >>"$WORK/fake.log" 2>&1 &
FAKE_PID=$!
for _ in $(seq 1 100); do
    curl -s -o /dev/null "$FAKE/_fake/state" && break
    sleep 0.05
done
curl -s -o /dev/null "$FAKE/_fake/state" || fail "fake DingTalk did not start"

# What attendance/list answers for the user's day (work date 2024-05-06 = 1714924800000 at
# +08:00): on duty at 09:05 (1714957500000), planned 09:00, late.
curl -sS -f -X POST "$FAKE/_fake/attendance/list/users" -d '{
  "user_ids": ["u-late"],
  "records": [{"workDate": 1714924800000, "checkType": "OnDuty", "timeResult": "Late",
    "locationResult": "Normal", "userCheckTime": 1714957500000, "baseCheckTime": 1714957200000,
    "sourceType": "USER"}]
}' >/dev/null || fail "could not script the fake"

cat >"$WORK/dinghook.toml" <<'TOML'
[handlers.attendance]
coalesce_window = "300ms"
TOML
export DINGHOOK_CONFIG="$WORK/dinghook.toml"
export DINGHOOK_APP_KEY=dingcurlapp
export DINGHOOK_APP_SECRET=curl-app-secret
export DINGHOOK_AGENT_ID=4242
export DINGHOOK_DINGTALK_OAPI_URL="$FAKE"
export DINGHOOK_DINGTALK_API_URL="$FAKE"
# Only the calls this script causes.
export DINGHOOK_RECOVERY=off
start_server

# 2024-05-06 09:05:00 +08:00.
expect_success "$(post '{"EventType":"attendance_check_record","eventId":"curl-checkin-1","CorpId":"dingcorp","dataList":[{"userId":"u-late","corpId":"dingcorp","checkTime":1714957500000,"groupId":"g1","bizId":"b1","locationMethod":"MAP","locationResult":"Normal","checkByUser":true}]}')"

sends=""
for _ in $(seq 1 100); do
    sends=$(curl -sS "$FAKE/_fake/calls?path=/topapi/message/corpconversation/asyncsend_v2")
    case "$sends" in *'"userid_list":"u-late"'*) break ;; esac
    sleep 0.1
done
case "$sends" in *'"userid_list":"u-late"'*) ;; *) fail "no work notification within 10 s: $sends" ;; esac
case "$sends" in *'09:05'*'(Late)'*) ;; *) fail "notification does not say 09:05 Late: $sends" ;; esac

lookups=$(curl -sS "$FAKE/_fake/calls?path=/attendance/list")
[ "$(printf '%s' "$lookups" | grep -o '"seq"' | wc -l)" = 1 ] || fail "expected one attendance/list: $lookups"
case "$lookups" in *'"workDateFrom":"2024-05-06 00:00:00"'*) ;; *) fail "wrong work date: $lookups" ;; esac
case "$lookups" in *'"userIdList":["u-late"]'*) ;; *) fail "wrong users: $lookups" ;; esac
echo "checkin.sh: ok"
