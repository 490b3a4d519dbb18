#!/usr/bin/env bash
# Many apps: start-up time and idle RSS of `dinghook serve` with 1 app and with APPS apps (each
# with its own keys and DingTalk credentials, recovery off so nothing calls out).
#
#   scripts/apps-bench.sh                        # 1 000 apps, the release binary (built)
#   APPS=200 DINGHOOK_BIN=target/debug/dinghook scripts/apps-bench.sh
#
# Start-up: from exec to the "dinghook listening" line. RSS: VmRSS after 2 s idle.
set -euo pipefail
cd "$(dirname "$0")/.."

APPS=${APPS:-1000}
if [ -z "${DINGHOOK_BIN:-}" ]; then
    cargo build --release --quiet --bin dinghook
    DINGHOOK_BIN=target/release/dinghook
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" "$APPS" <<'EOF'
import random, string, sys
work, apps = sys.argv[1], int(sys.argv[2])
def key():
    return ''.join(random.choice(string.ascii_letters + string.digits) for _ in range(43))
for n in (1, apps):
    with open(f'{work}/apps{n}.toml', 'w') as f:
        f.write(f'listen = "127.0.0.1:0"\n[ops]\nlisten = ""\n[store]\n'
                f'url = "sqlite://{work}/db{n}.db"\n[recovery]\nenabled = false\n')
        for i in range(n):
            f.write(f'[apps.a{i}]\ntoken = "t{i}"\naes_key = "{key()}"\nowner_key = "dingo{i}"\n'
                    f'app_key = "dingk{i}"\napp_secret = "s{i}"\n')
EOF

measure() {
    local n=$1 start pid t rss
    start=$(date +%s%N)
    "$DINGHOOK_BIN" serve --config "$work/apps$n.toml" >"$work/log$n" 2>&1 &
    pid=$!
    for _ in $(seq 1 1000); do
        grep -q "dinghook listening" "$work/log$n" && break
        sleep 0.01
    done
    t=$(( ($(date +%s%N) - start) / 1000000 ))
    sleep 2
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$n $t $rss"
}

read -r _ t1 rss1 < <(measure 1)
read -r _ tn rssn < <(measure "$APPS")
echo "apps  start-up  idle RSS"
echo "1     ${t1} ms    ${rss1} kB"
echo "$APPS  ${tn} ms    ${rssn} kB"
echo "per app: $(( (rssn - rss1) / (APPS - 1) )) kB"
