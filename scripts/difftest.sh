#!/usr/bin/env bash
# The differential random-operation tester with many operations: SEED picks the sequence, OPS
# the operations per configuration, CONFIG (comma-separated names) limits it to some of them.
#   scripts/difftest.sh 7 2000               # every configuration, 2000 operations each
#   scripts/difftest.sh 1 12 mbr-aes-over-raw   # replays a failure the suite or a run reported
# Environment: QCOWFS_DIFFTEST_JOBS (configurations at once, default 2), QCOWFS_DIFFTEST_KEEP=1
# (keep a failed run's images and reference under /tmp), QCOWFS_DIFFTEST_EXCLUDE=part,resize
# (operation kinds never drawn; the replay line of a failure repeats it).
# It is the suite's tests/difftest with other numbers: it needs what the suite needs (root or
# FUSE access, qemu-img, qemu-io, fusermount3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() {
    echo "usage: $0 SEED OPS [CONFIG[,CONFIG...]]" >&2
    exit 2
}
[[ $# -ge 2 && $# -le 3 ]] || usage
for n in "$1" "$2"; do
    case $n in
    '' | *[!0-9]*) usage ;;
    esac
done
export QCOWFS_DIFFTEST_SEED=$1 QCOWFS_DIFFTEST_OPS=$2 QCOWFS_DIFFTEST_CONFIG=${3:-}
# Every command the engine runs is echoed as "$ ..." for the suite's failure output; not here.
nice -n 10 cargo test --release --test difftest random_operations -- --nocapture 2>&1 |
    grep --line-buffered -v '^\$ '
