#!/usr/bin/env bash
# Run the randomized image fuzzer for DURATION seconds (default 600):
#   scripts/fuzz.sh 3600
# A failing input is saved under /tmp (the message says where); copy it into tests/fuzz_corpus/
# as NAME.bin to keep it as a regression case. QCOWFS_FUZZ_SEED picks another mutation sequence.
# With a nightly toolchain and cargo-fuzz, `cargo +nightly fuzz run image` drives the same code.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DURATION=${1:-600}
QCOWFS_FUZZ_SECONDS=$DURATION cargo test --release --test fuzz_images mutated_images_never_panic_or_hang -- --nocapture
