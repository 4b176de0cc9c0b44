#!/usr/bin/env bash
# Installs what newt's commands need on a fresh machine, skipping what is
# already present. Called by scripts/test.sh (and so by .ci/run).
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "newt needs a Rust toolchain (rustup, Rust >= 1.89): https://rustup.rs" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    installed_components=$(rustup component list --installed 2>/dev/null || true)
    for component in rustfmt clippy; do
        if ! grep -q "^${component}" <<<"$installed_components"; then
            rustup component add "$component"
        fi
    done
    if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
        rustup target add wasm32-unknown-unknown
    fi
fi
