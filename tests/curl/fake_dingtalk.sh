#!/usr/bin/env bash
# The `fake-dingtalk` binary by hand: the DingTalk endpoints answer, the admin routes script it,
# and it records what it was sent.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
need_fake_bin

FAKE="http://127.0.0.1:$PORT"
"$FAKE_BIN" --listen "127.0.0.1:$PORT" >>"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    curl -s -o /dev/null "$FAKE/_fake/state" && break
    sleep 0.05
done

token=$(curl -sS "$FAKE/gettoken?appkey=dingkey&appsecret=secret")
case "$token" in *'"access_token"'*'"expires_in":7200'*) ;; *) fail "gettoken: $token" ;; esac
at=$(printf '%s' "$token" | sed -E 's/.*"access_token":"([^"]+)".*/\1/')

curl -sS -X POST "$FAKE/_fake/users" -d '{"userid":"u1","name":"Ada","unionid":"un1"}' >/dev/null
user=$(curl -sS -X POST "$FAKE/topapi/v2/user/get?access_token=$at" -H 'Content-Type: application/json' -d '{"userid":"u1"}')
case "$user" in *'"errcode":0'*'"name":"Ada"'*) ;; *) fail "user/get: $user" ;; esac

# Told to throttle the next call, it answers 90018 once.
curl -sS -X POST "$FAKE/_fake/faults" -d '{"errcode":90018,"times":1}' >/dev/null
throttled=$(curl -sS -X POST "$FAKE/topapi/v2/user/get?access_token=$at" -d '{"userid":"u1"}')
case "$throttled" in *'"errcode":90018'*) ;; *) fail "fault not applied: $throttled" ;; esac

calls=$(curl -sS "$FAKE/_fake/calls")
case "$calls" in *'/topapi/v2/user/get'*) ;; *) fail "calls not recorded: $calls" ;; esac
echo "fake_dingtalk.sh: ok"
