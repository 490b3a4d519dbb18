#!/usr/bin/env bash
# To-do ↔ work notification with the real binaries: the `fake-dingtalk` binary plays DingTalk,
# `dinghook serve` (configured through the environment) handles todo_task_create / _update /
# _delete: one OA notification with a pending status bar, one status-bar update to done, one
# recall.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
need_fake_bin

# The fake takes any free port (0) and says which in its log.
FAKE_PID=""
stop_fake() {
    if [ -n "$FAKE_PID" ] && kill -0 "$FAKE_PID" 2>/dev/null; then
        kill -KILL "$FAKE_PID" 2>/dev/null || true
        wait "$FAKE_PID" 2>/dev/null || true
    fi
    cleanup
}
trap stop_fake EXIT
"$FAKE_BIN" --listen 127.0.0.1:0 >>"$WORK/fake.log" 2>&1 &
FAKE_PID=$!
FAKE=""
for _ in $(seq 1 100); do
    FAKE=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$WORK/fake.log" | head -1 || true)
    [ -n "$FAKE" ] && curl -s -o /dev/null "$FAKE/_fake/state" && break
    sleep 0.05
done
[ -n "$FAKE" ] || fail "fake DingTalk did not start: $(cat "$WORK/fake.log")"

curl -sS -X POST "$FAKE/_fake/users" \
    -d '[{"userid":"user-a","unionid":"union-a"},{"userid":"user-b","unionid":"union-b"}]' >/dev/null
put_task() {
    curl -sS -X POST "$FAKE/_fake/todos" -d "{\"union_id\":\"union-a\",\"task\":{\"id\":\"task-1\",
        \"subject\":\"Write the report\",\"done\":$1,\"modifiedTime\":$2,\"creatorId\":\"union-a\",
        \"executorIds\":[\"union-a\",\"union-b\"]}}" >/dev/null
}
put_task false 1

export DINGHOOK_APP_KEY=dingcurltodo DINGHOOK_APP_SECRET=secret DINGHOOK_AGENT_ID=4242
export DINGHOOK_DINGTALK_OAPI_URL="$FAKE" DINGHOOK_DINGTALK_API_URL="$FAKE"
export DINGHOOK_POLL_INTERVAL=50ms DINGHOOK_RECOVERY=off
start_server

todo_event() {
    expect_success "$(post "{\"EventType\":\"$1\",\"eventId\":\"$2\",\"taskId\":\"task-1\",\"UnionIdList\":[\"union-a\"]}")"
}
calls_to() { curl -sS "$FAKE/_fake/calls?path=$1"; }
# count PATH: calls the fake recorded to PATH (grep finding none is not an error here).
count() { calls_to "$1" | { grep -o '"seq"' || true; } | wc -l | tr -d ' '; }
# wait_for PATH COUNT: until the fake recorded COUNT calls to PATH.
wait_for() {
    for _ in $(seq 1 200); do
        n=$(count "$1")
        [ "$n" -ge "$2" ] && return 0
        sleep 0.05
    done
    fail "expected $2 call(s) to $1, got $n: $(curl -sS "$FAKE/_fake/calls")"
}

todo_event todo_task_create c-1
wait_for /topapi/message/corpconversation/asyncsend_v2 1
sent=$(calls_to /topapi/message/corpconversation/asyncsend_v2)
case "$sent" in *'"userid_list":"user-a,user-b"'*) ;; *) fail "recipients: $sent" ;; esac
case "$sent" in *'"status_value":"待处理"'*) ;; *) fail "pending status bar: $sent" ;; esac

put_task true 2
todo_event todo_task_update u-1
todo_event todo_task_update u-2
wait_for /topapi/message/corpconversation/status_bar/update 1
todo_event todo_task_delete d-1
wait_for /topapi/message/corpconversation/recall 1
sleep 0.3
[ "$(count /topapi/message/corpconversation/status_bar/update)" = 1 ] \
    || fail "status bar updated more than once: $(calls_to /topapi/message/corpconversation/status_bar/update)"
case "$(calls_to /topapi/message/corpconversation/status_bar/update)" in *'"status_value":"已完成"'*) ;; *) fail "status bar value" ;; esac
state=$(curl -sS "$FAKE/_fake/state")
case "$state" in *'"recalled":true'*) ;; *) fail "not recalled: $state" ;; esac
[ "$("$DINGHOOK_BIN" events list --json --limit 100 | { grep -c '"done"' || true; })" = 4 ] \
    || fail "events not all done: $("$DINGHOOK_BIN" events list --json --limit 100)"
echo "todo.sh: ok"
