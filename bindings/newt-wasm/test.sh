#!/usr/bin/env bash
# Tests the npm package as a user gets it: builds and packs it (build.sh),
# installs the tarball into an empty project outside the clone, then runs
# the Node tests there (newt alone, and interop.test.mjs against the
# reference JS stack, @matrix-org/matrix-sdk-crypto-wasm, installed beside
# it; npm caches it in ~/.npm) and type-checks the TypeScript example with
# `tsc --noEmit --strict`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="${NEWT_TOOLS_DIR:-$HOME/.cache/newt-tools}"
"$here/build.sh"
tarball=$(ls "$here"/dist/newt-wasm-*.tgz)

project=$(mktemp -d "${TMPDIR:-/tmp}/newt-wasm-test.XXXXXX")
trap 'rm -rf "$project"' EXIT
cd "$project"
npm init -y >/dev/null
npm install --silent --no-audit --no-fund "$tarball" @matrix-org/matrix-sdk-crypto-wasm@18.9.0
cp "$here"/tests/*.mjs "$here"/tests/*.ts "$project/"
node --test "$project"/*.test.mjs
node "$project/panic-check.mjs"
"$tools/node_modules/.bin/tsc" --noEmit --strict --target es2022 --lib esnext,dom --module nodenext \
    --moduleResolution nodenext "$project/example.ts"
echo "newt-wasm: node tests and tsc --strict passed on $(basename "$tarball")"
