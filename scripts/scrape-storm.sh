#!/usr/bin/env bash
# Scrapes /metrics from many clients at once and reports how long each scrape took and how
# many said `dinghook_store_up 0` (hostile clients, item 6; docs/reliability.md).
#
#   scripts/scrape-storm.sh [URL] [SCRAPERS] [SECONDS]
#   scripts/scrape-storm.sh http://127.0.0.1:9464/metrics 16 10
set -euo pipefail

url=${1:-http://127.0.0.1:9464/metrics}
scrapers=${2:-16}
seconds=${3:-10}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

scrape_loop() {
    local n=$1 end=$((SECONDS + seconds))
    while [ "$SECONDS" -lt "$end" ]; do
        local took
        took=$(curl -s -o "$out/body.$n" -w '%{time_total}' --max-time 30 "$url" || echo fail)
        local up
        up=$(grep -h '^dinghook_store_up ' "$out/body.$n" 2>/dev/null | cut -d' ' -f2 || true)
        echo "$took ${up:-none}" >>"$out/times.$n"
    done
}

for n in $(seq "$scrapers"); do
    scrape_loop "$n" &
done
wait

cat "$out"/times.* | sort -n | awk -v scrapers="$scrapers" -v seconds="$seconds" '
    function at(q,   i) { i = int(NR * q); if (i < NR * q) i++; if (i < 1) i = 1; return t[i] }
    { t[NR] = $1; if ($2 != "1") down++ }
    END {
        if (NR == 0) { print "no scrape finished"; exit 1 }
        printf "%d scrapers, %d s: %d scrapes, p50 %.3f s, p99 %.3f s, max %.3f s, store_up not 1: %d\n",
            scrapers, seconds, NR, at(0.5), at(0.99), t[NR], down + 0
    }'
