#!/usr/bin/env bash
# Power-cut proof of the write path: record every host write and barrier of the workloads in
# tests/crash_states (random writes with fsyncs on plain, v2, AES and LUKS images, copy-on-write
# from a raw base, extended L2, discard, clusters shared with a snapshot, compressed clusters
# overwritten, seal, growth that moves the refcount table), build N crash states from the logs and
# have QEMU check each: it opens, `qemu-img check` finds no corruption (leaks allowed), and every
# byte fsynced before the crash reads back as written.
#   scripts/crash-states.sh 10000
#   scripts/crash-states.sh 2000 7 snapshot-shared,discard   # another seed, some workloads
# Ends with one line, "N crash states, M failed"; the exit status is non-zero when M > 0.
# QCOWFS_CRASH_STATES_KEEP=DIR keeps the image of each failed state in DIR for qemu-img check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() {
    echo "usage: $0 N [SEED [WORKLOAD[,WORKLOAD...]]]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 3 ]] || usage
for n in "$1" "${2:-1}"; do
    case $n in
    '' | *[!0-9]*) usage ;;
    esac
done
export QCOWFS_CRASH_STATES=$1 QCOWFS_CRASH_STATES_SEED=${2:-1} QCOWFS_CRASH_STATES_WORKLOADS=${3:-}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Every command the tests run is echoed as "$ ..." for the suite's failure output; not here.
nice -n 10 cargo test --release --test crash_states -- --nocapture >"$log" 2>&1 || status=$?
grep -E '^  |^FAILED|panicked|^error' "$log" | grep -v 'crash states, [0-9]* failed$' || true
summary=$(grep -E '^[0-9]+ crash states, [0-9]+ failed$' "$log" | tail -n 1 || true)
if [[ -z $summary ]]; then
    tail -n 30 "$log" >&2
    echo "0 crash states, the run failed before checking any (status $status)"
    exit 1
fi
echo "$summary"
exit "$status"
