#!/usr/bin/env bash
# Builds the npm package of newt-wasm into bindings/newt-wasm/pkg and packs
# it into bindings/newt-wasm/dist/newt-wasm-<version>.tgz (the artefact the
# tests install). Tools it needs are installed on first use, outside the
# clone: wasm-bindgen-cli (exactly the crate's version) in ~/.cargo/bin,
# binaryen and typescript from npm in ~/.cache/newt-tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tools="${NEWT_TOOLS_DIR:-$HOME/.cache/newt-tools}"
"$root/scripts/setup-wasm.sh"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
cargo build --quiet -p newt-wasm --target wasm32-unknown-unknown --profile wasm-release
wasm="$target_dir/wasm32-unknown-unknown/wasm-release/newt_wasm.wasm"

rm -rf "$here/pkg" && mkdir -p "$here/pkg"
# --weak-refs: objects are freed when garbage collected (free() still works).
wasm-bindgen --target web --weak-refs --out-dir "$here/pkg" --out-name newt "$wasm"
"$tools/node_modules/.bin/wasm-opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue \
    "$here/pkg/newt_bg.wasm" -o "$here/pkg/newt_bg.wasm"
cp "$here"/npm/* "$here/pkg/"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
sed -i "s/\"version\": \"0.0.0\"/\"version\": \"$version\"/" "$here/pkg/package.json"

raw=$(stat -c %s "$here/pkg/newt_bg.wasm")
gz=$(gzip -9 -c "$here/pkg/newt_bg.wasm" | wc -c)
echo "newt_bg.wasm: $raw bytes raw, $gz bytes gzip -9"

mkdir -p "$here/dist"
rm -f "$here"/dist/*.tgz
(cd "$here/pkg" && npm pack --silent --pack-destination "$here/dist" >/dev/null)
ls "$here"/dist/*.tgz
