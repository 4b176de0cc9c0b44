#!/usr/bin/env bash
# Installs what the wasm package needs, skipping what is present:
# the wasm32 target, wasm-bindgen-cli at exactly the wasm-bindgen version in
# Cargo.lock (in ~/.cargo/bin), and binaryen (wasm-opt) and typescript from
# npm in ~/.cache/newt-tools (never Debian's binaryen: it breaks modules).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${NEWT_TOOLS_DIR:-$HOME/.cache/newt-tools}"

if ! rustup target list --installed | grep -q '^wasm32-unknown-unknown$'; then
    rustup target add wasm32-unknown-unknown
fi
want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$root/Cargo.lock")
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
    echo "installing wasm-bindgen-cli $want (a few minutes, once)"
    # Not --locked: its lock file names crate versions this registry may not have.
    cargo install --quiet wasm-bindgen-cli --version "$want"
fi
if [ ! -x "$tools/node_modules/.bin/wasm-opt" ] || [ ! -x "$tools/node_modules/.bin/tsc" ]; then
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" binaryen@132.0.0 typescript@5.9
fi
