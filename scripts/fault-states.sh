#!/usr/bin/env bash
# Host-failure proof of the write path, the crash states' twin: run the workloads of
# tests/crash_states (random writes with fsyncs on plain, v2, AES and LUKS images, copy-on-write
# from a raw base, extended L2, discard, clusters shared with a snapshot, compressed clusters
# overwritten, seal, growth that moves the refcount table) and a discard-heavy one, each once to
# count the top layer's host operations, then N times in all with host operation k failing (EIO,
# ENOSPC, a short write, a failed barrier; k spread evenly over the operations). Each run must
# report the failure to its caller, never serve stale bytes, keep every byte a successful fsync
# acknowledged once reopened (QEMU reading the same), and pass `qemu-img check` (leaks allowed).
#   scripts/fault-states.sh 2000
#   scripts/fault-states.sh 500 7 discard,discard-heavy   # another seed, some workloads
# Ends with one line, "N fault states, M failed"; the exit status is non-zero when M > 0.
# QCOWFS_FAULT_STATES_KEEP=DIR keeps the image of each failed state in DIR for qemu-img check;
# QCOWFS_FAULT_STATES_ONLY=FAULT:K (as a FAILED line names it) runs that one state per workload.
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
export QCOWFS_FAULT_STATES=$1 QCOWFS_FAULT_STATES_SEED=${2:-1} QCOWFS_FAULT_STATES_WORKLOADS=${3:-}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Every command the tests run is echoed as "$ ..." for the suite's failure output; not here.
nice -n 10 cargo test --release --test fault_states -- --nocapture >"$log" 2>&1 || status=$?
grep -E '^  |^FAILED|panicked|^error' "$log" | grep -v 'fault states, [0-9]* failed$' || true
summary=$(grep -E '^[0-9]+ fault states, [0-9]+ failed$' "$log" | tail -n 1 || true)
if [[ -z $summary ]]; then
    tail -n 30 "$log" >&2
    echo "0 fault states, the run failed before checking any (status $status)"
    exit 1
fi
echo "$summary"
exit "$status"
