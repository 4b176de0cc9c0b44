#!/usr/bin/env bash
# Tests the npm package as a user gets it: builds and packs it (build.sh),
# installs the tarball into an empty project outside the clone, then runs
# the Node tests there (newt alone, and interop.test.mjs against the
# reference JS stack, @matrix-org/matrix-sdk-crypto-wasm, installed beside
# it; npm caches it in ~/.npm) and type-checks the TypeScript example with
# `tsc --noEmit --strict`. Then the browser check: the example page
# (example/, served from that project by example/serve.mjs on 127.0.0.1)
# in headless Chromium through playwright-core (npm; it downloads no
# browser): two devices on IndexedDB, a decrypted message, the same emoji on
# both sides, in the page and in a Web Worker; the screenshot goes to
# dist/example.png. Chromium must be installed (scripts/test-browser.sh
# does it; CHROMIUM=/path overrides /usr/bin/chromium).
set -euo pipefail
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    echo "newt-wasm test.sh: no Chromium at $chromium; run scripts/test-browser.sh (installs it) or set CHROMIUM" >&2
    exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
tools="${NEWT_TOOLS_DIR:-$HOME/.cache/newt-tools}"
"$here/build.sh"
tarball=$(ls "$here"/dist/newt-wasm-*.tgz)

project=$(mktemp -d "${TMPDIR:-/tmp}/newt-wasm-test.XXXXXX")
trap 'rm -rf "$project"' EXIT
cd "$project"
npm init -y >/dev/null
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund "$tarball" \
    @matrix-org/matrix-sdk-crypto-wasm@18.9.0 playwright-core@1.65.2
cp "$here"/tests/*.mjs "$here"/tests/*.ts "$here"/example/*.html "$here"/example/*.js \
    "$here"/example/*.mjs "$project/"
node --test "$project"/*.test.mjs
node "$project/panic-check.mjs"
"$tools/node_modules/.bin/tsc" --noEmit --strict --target es2022 --lib esnext,dom --module nodenext \
    --moduleResolution nodenext "$project/example.ts"
CHROMIUM="$chromium" node "$project/browser-check.mjs" "$here/dist/example.png"
echo "newt-wasm: node tests, tsc --strict and the browser check passed on $(basename "$tarball")"
