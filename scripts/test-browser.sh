#!/usr/bin/env bash
# Runs the browser tests (newt-indexeddb: the newt-store conformance suite
# and the store's own tests) in headless Chromium with wasm-bindgen-test.
# Installs what is missing, skipping what is present: chromium and
# chromium-driver (Debian), the wasm32 target, and wasm-bindgen-cli (for
# wasm-bindgen-test-runner) at exactly the wasm-bindgen version in Cargo.lock.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

chromium_bin="${CHROMIUM:-/usr/bin/chromium}"
chromedriver_bin="${CHROMEDRIVER:-/usr/bin/chromedriver}"
if [ ! -x "$chromium_bin" ] || [ ! -x "$chromedriver_bin" ]; then
    echo "installing chromium and chromium-driver (about a minute, once)"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
    rustup target add wasm32-unknown-unknown
fi
want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
have=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
    echo "installing wasm-bindgen-cli $want (a few minutes, once)"
    cargo install --quiet wasm-bindgen-cli --version "$want"
fi

export CHROMEDRIVER="$chromedriver_bin"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
cargo test -p newt-indexeddb --target wasm32-unknown-unknown
