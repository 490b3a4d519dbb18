#!/usr/bin/env bash
# The binary run exactly as the Dockerfile runs it: configuration from the environment only,
# a non-root user, the SQLite file in a data directory that user owns, and the image's
# HEALTHCHECK command.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

mkdir -p "$WORK/data"
export DINGHOOK_STORE_URL="sqlite://$WORK/data/dinghook.db"
export DINGHOOK_LISTEN="0.0.0.0:$PORT"
export DINGHOOK_OPS_LISTEN="0.0.0.0:$OPS_PORT"
prefix=()
if [ "$(id -u)" = 0 ]; then
    # As root, drop to an unprivileged user like the image's (uid 10001 there; nobody here).
    chown -R nobody "$WORK"
    chmod 755 "$WORK"
    prefix=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
fi
start_server "${prefix[@]}"
if [ "$(id -u)" = 0 ]; then
    owner=$(stat -c %U "$WORK/data/dinghook.db")
    [ "$owner" = nobody ] || fail "database owned by $owner, expected the unprivileged user"
fi
"$DINGHOOK_BIN" healthcheck "http://127.0.0.1:$PORT/healthz" || fail "HEALTHCHECK command failed"
if "$DINGHOOK_BIN" healthcheck "http://127.0.0.1:$PORT/nope" 2>/dev/null; then fail "healthcheck passed on a 404"; fi
expect_success "$(post '{"EventType":"im_cool_app_install","eventId":"docker-1"}')"
[ "$(stored_count)" = 1 ] || fail "event not stored"
# /metrics is on the operator port only; the public port answers the callback and the probes.
code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/metrics")
[ "$code" = 404 ] || fail "public /metrics answered $code, expected 404"
curl -sf "$OPS/metrics" | grep -q '^dinghook_events_received_total' || fail "no metrics on the operator port"
curl -sf "$OPS/readyz" >/dev/null || fail "no /readyz on the operator port"
echo "container.sh: ok"
