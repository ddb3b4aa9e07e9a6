#!/usr/bin/env bash
# Fuzz qcowfs for SECONDS per target (default 600):
#   scripts/fuzz.sh 1800
#   FUZZ_JOBS=2 FUZZ_TARGETS="image write" scripts/fuzz.sh 1800   # two targets at once
# Targets run at nice 19 (FUZZ_NICE to change it): beside other work they get what is left.
# With a nightly toolchain (cargo-fuzz is installed with `cargo install cargo-fuzz` when missing):
# every cargo-fuzz target, `image` (bytes as an image), `fields` (named field edits of seed images),
# `write` (a write through bytes as an image must be refused or change exactly its bytes: the
# input's last 8 bytes place it) and `guest` (bytes as a guest disk — any file system qcowfs reads,
# a partition table, an LVM2 volume group — through ls, cat and copy-out), one after the other,
# one job each, from the seeds of scripts/fuzz-seeds.sh (made in fuzz/seeds/ when missing) plus the
# regression cases of tests/fuzz_corpus/ (tests/fuzz_corpus/guest/ for `guest`). Corpora grow in fuzz/corpus/TARGET, crashes land in fuzz/artifacts/TARGET, the
# libFuzzer log (final stats at its end) in fuzz/logs/TARGET.log.
# Without them: the stable randomized tests of tests/it/fuzz_images.rs for SECONDS each.
# A failing input goes into tests/fuzz_corpus/ as NAME.bin (a plain image; for `fields` inputs,
# QCOWFS_FIELDS_DUMP=DIR cargo +nightly fuzz run fields INPUT writes the edited image to DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DURATION=${1:-600}

if cargo +nightly --version >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install --locked cargo-fuzz || cargo install cargo-fuzz || true
fi
if cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    TARGETS=${FUZZ_TARGETS:-image fields write guest}
    echo "fuzz.sh: cargo-fuzz targets $TARGETS, ${DURATION}s each (nightly: $(cargo +nightly --version))"
    if ! ls fuzz/seeds/*.qcow2 fuzz/seeds/guest/*.raw >/dev/null 2>&1; then
        scripts/fuzz-seeds.sh fuzz/seeds >/dev/null
    fi
    mkdir -p fuzz/corpus/image fuzz/corpus/fields fuzz/corpus/write fuzz/corpus/guest fuzz/logs
    cp -n fuzz/seeds/*.qcow2 tests/fuzz_corpus/*.bin fuzz/corpus/image/
    # An image seed is also a write input (its last 8 bytes place the write).
    cp -n fuzz/seeds/*.qcow2 tests/fuzz_corpus/*.bin fuzz/corpus/write/
    cp -n fuzz/seeds/guest/*.raw fuzz/corpus/guest/
    cp -n tests/fuzz_corpus/guest/* fuzz/corpus/guest/ 2>/dev/null || true
    # The fields target's input is a seed index byte then the edit program: one byte per seed
    # (the sorted fuzz/seeds/*.qcow2), each unchanged.
    n=$(ls fuzz/seeds/*.qcow2 | wc -l)
    for i in $(seq 0 $((n - 1))); do
        out=fuzz/corpus/fields/seed$i.in
        [ -e "$out" ] || printf "\\$(printf %03o "$i")" >"$out"
    done
    # The overlay seed's raw backing file, where the targets open their inputs.
    cp -n fuzz/seeds/fuzz-base.raw "${TMPDIR:-/tmp}/" 2>/dev/null || true
    # FUZZ_JOBS targets at once (default 1): each still runs DURATION seconds, on a share of
    # the CPUs, so the final stats say how many inputs it ran.
    JOBS=${FUZZ_JOBS:-1}
    run_target() {
        local target=$1 rc=0 len=()
        # A guest file system is read whole: FAT16/32 start at about 2 MiB, so its inputs may be
        # 4 MiB (libFuzzer cuts every input at 1 MiB by default, and such a volume is refused).
        [ "$target" = guest ] && len=(-max_len=4194304)
        nice -n "${FUZZ_NICE:-19}" cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- \
            "${len[@]}" -max_total_time="$DURATION" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
            >"fuzz/logs/$target.log" 2>&1 || rc=$?
        grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)|SUMMARY|artifact_prefix|Test unit written' \
            "fuzz/logs/$target.log" | sed "s/^/    $target: /" || true
        return "$rc"
    }
    # Built once, before any target runs: parallel builds of one crate would race.
    cargo +nightly fuzz build >/dev/null
    status=0
    running=0
    for target in $TARGETS; do
        if [ "$running" -ge "$JOBS" ]; then
            wait -n || status=$?
            running=$((running - 1))
        fi
        echo "fuzz.sh: running $target (log: fuzz/logs/$target.log)"
        run_target "$target" &
        running=$((running + 1))
    done
    while [ "$running" -gt 0 ]; do
        wait -n || status=$?
        running=$((running - 1))
    done
    exit "$status"
fi

echo "fuzz.sh: no nightly toolchain or cargo-fuzz; running the stable randomized tests (tests/it/fuzz_images.rs), ${DURATION}s each"
echo "fuzz.sh: (the guest target has no stable fallback beyond tests/it/guest_files.rs's corruption test)"
QCOWFS_FUZZ_SECONDS=$DURATION cargo test --release --test it fuzz_images:: -- --nocapture
