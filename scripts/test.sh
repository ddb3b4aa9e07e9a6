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
cargo test --release "$@"

step "All checks passed"
