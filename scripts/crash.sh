#!/usr/bin/env bash
# Kill -9 the qcowfs daemon at random moments during writes, ROUNDS times (default 200), taking
# turns on a plain image with 4 KiB clusters, an AES image with 64 KiB clusters and an AES overlay
# with 4 KiB clusters over a raw base, which carry their state (and any damage) from round to
# round. After each kill, `qemu-img check` must find no corruption (leaks are allowed), every byte
# covered by the last completed fsync must read back and the base must be unchanged. (A kill
# never loses what the host page cache holds; power cuts are scripts/crash-states.sh's job.)
# Prints each round and, at the end, how many rounds survived.
#   scripts/crash.sh 500
#   QCOWFS_CRASH_SEED=7 scripts/crash.sh 100     # another sequence of writes and kill moments
# It is the suite's kill -9 test (tests/it/kill_9.rs) with more rounds: it needs what the suite needs
# (root or FUSE access, qemu-img, fusermount3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${1:-200}
case $ROUNDS in
'' | *[!0-9]*)
    echo "usage: $0 [ROUNDS]" >&2
    exit 2
    ;;
esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
QCOWFS_CRASH_ROUNDS=$ROUNDS cargo test --release --test it kill_9::kill_9_at_random_moments -- --nocapture \
    2>&1 | tee "$log" | grep --line-buffered -E '^(round |FAILED |test |error|thread )' || status=$?
# The pipeline's status is cargo's (pipefail), unless grep found nothing to print.
summary=$(grep -E '^kill -9 rounds survived' "$log" | tail -n 1 || true)
if [[ -n $summary ]]; then
    echo "$summary"
else
    echo "crash.sh: the test stopped before its summary; the last lines it printed:" >&2
    tail -n 40 "$log" >&2
    [[ $status -ne 0 ]] || status=1
fi
exit "$status"
