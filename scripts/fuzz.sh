#!/usr/bin/env bash
# Runs both fuzz targets, one after the other, for SECONDS each (default 600), one process each.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). See docs/reliability.md.
#
#   scripts/fuzz.sh [SECONDS] [extra cargo-fuzz flags, e.g. --sanitizer none]
#
# The corpus grows in fuzz/corpus/<target>/ (ignored by git) from the seeds in fuzz/seeds/;
# a crash is saved in fuzz/artifacts/<target>/ and stops that target with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-600}
shift || true
for target in callback_request failed_list; do
    mkdir -p "corpus/$target"
    echo "== $target for ${seconds}s"
    cargo +nightly fuzz run "$@" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 -print_final_stats=1
    # -jobs=1 runs the fuzzer in a child that logs to fuzz-0.log (printed above when it ends);
    # keep each target's log apart.
    if [[ -f fuzz-0.log ]]; then
        mv fuzz-0.log "fuzz-$target.log"
    fi
done
