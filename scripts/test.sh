#!/usr/bin/env bash
# The whole check, as CI runs it: tools present (installed when root), /dev/fuse present,
# formatting, lints, then the tests in release mode (legacy AES is slow in debug builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/install-deps.sh
source scripts/lib/install-deps.sh

step "Checking tools"
install_deps
require_rust_components
require_fuse_device
qemu-img --version | head -n 1 | sed 's/^/    /'

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --release"
# One test at a time in each binary: the integration tests share one process, and side by side a
# test that signals its daemon by pid, or reopens an image it just closed, can meet another test's
# processes (pids wrap at 32768 here in a suite that starts thousands of commands; a fork holds
# copies of every descriptor until it execs). RUST_TEST_THREADS=2 runs two at a time.
RUST_TEST_THREADS=${RUST_TEST_THREADS:-1} cargo test --release "$@"

step "All checks passed"
