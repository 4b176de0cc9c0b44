#!/usr/bin/env bash
# newt's test command: what the README promises and CI runs.
#   scripts/test.sh          everything: format, lints, all tests including the
#                            interop tests against matrix-sdk-crypto, wasm32 check,
#                            the IndexedDB store's tests in headless Chromium,
#                            the npm package's tests in Node, the demo, and the
#                            benchmarks in smoke mode
#   scripts/test.sh --quick  the default crates' tests only (no reference build)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

if [ "${1:-}" = "--quick" ]; then
    exec cargo test
fi

# A clean run writes a few GB into target/. CI builds everything once, so the
# incremental caches (3 GB of it) would only cost disk; the free space is
# printed at each step so a full disk shows up as such.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi
# Each step prints how long the previous one took, so a slow step shows.
step_started=$SECONDS
step() {
    if [ -n "${step_name:-}" ]; then
        printf '    (%s: %ss)\n' "$step_name" "$((SECONDS - step_started))"
    fi
    step_name="$*"
    step_started=$SECONDS
    printf '\n==> %s\n' "$*"
    if [ -n "${CI:-}" ]; then
        df -Ph . | awk 'NR == 2 { print "    (disk: " $4 " free)" }' || true
    fi
}

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test (workspace, including interop with matrix-sdk-crypto)"
cargo test --workspace
step "wasm32 build check of the core crates"
cargo check --target wasm32-unknown-unknown -p newt-proto -p newt-store -p newt-store-crypto -p newt-indexeddb -p newt
step "browser: newt-indexeddb (conformance suite and store tests) in headless Chromium"
scripts/test-browser.sh
step "newt-wasm: the npm package built, packed, installed and tested in Node"
bindings/newt-wasm/test.sh
step "demo"
cargo run -q -p newt-cli -- demo >/dev/null
step "benchmarks, smoke mode (every workload once; no timings asserted)"
benches/run.sh --smoke
step "done"
echo "all checks passed"
