#!/usr/bin/env bash
# newt vs matrix-sdk-crypto 0.18, side by side, plus the crypto floor.
#
#   benches/run.sh           # the full run (about 20-30 minutes on 2 cores)
#   benches/run.sh --smoke   # every workload once, small sizes (CI)
#   benches/run.sh --only 'encrypt_one|import/100000' [--rounds 1]
#                            # the full-size rows whose workload matches the
#                            # (extended) regex, e.g. to re-measure a fix
#
# newt builds into $CARGO_TARGET_DIR (default target/), and the fixtures and
# results go there too; the reference keeps its own benches/reference/target.
#
# Builds both harnesses in release, generates the fixtures (into target/),
# runs each workload alternately (newt, reference, newt, reference), measures
# the per-operation cost of the vodozemac primitives in the same run, and
# prints a table; results.{jsonl,csv,md} are kept in target/bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=full
ROUNDS=2
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) MODE=smoke; ROUNDS=1 ;;
    --only) ONLY="${2:?--only needs a regex}"; shift ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
    *) echo "usage: benches/run.sh [--smoke] [--only REGEX] [--rounds N]" >&2; exit 2 ;;
  esac
  shift
done

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
REF_TARGET="$ROOT/benches/reference/target"
echo "== building (release)" >&2
cargo build --release --quiet -p newt-bench
CARGO_TARGET_DIR="$REF_TARGET" \
  cargo build --release --quiet --manifest-path benches/reference/Cargo.toml

NEWT="$TARGET/release/newt-bench"
REF="$REF_TARGET/release/newt-reference-bench"
FIX="$TARGET/bench-fixtures/$MODE"
OUT="$TARGET/bench-results/$(date -u +%Y%m%dT%H%M%SZ)-$MODE"
export BENCH_TMPDIR="$TARGET/bench-tmp"
mkdir -p "$OUT" "$BENCH_TMPDIR"

# Fixtures are deterministic in shape (not in key material); regenerate only
# when the generator changed.
STAMP=$(sha256sum "$TARGET/release/gen-fixtures" | cut -c1-16)
if [[ "$(cat "$FIX/.stamp" 2>/dev/null)" != "$STAMP" ]]; then
  echo "== generating fixtures in $FIX" >&2
  rm -rf "$FIX"
  if [[ $MODE == smoke ]]; then
    "$TARGET/release/gen-fixtures" "$FIX" --smoke
  else
    "$TARGET/release/gen-fixtures" "$FIX"
  fi
  echo "$STAMP" > "$FIX/.stamp"
fi

# workload  stores  samples-per-process
if [[ $MODE == smoke ]]; then
  WORKLOADS="
keys_query/150        memory,sqlite 1
keys_claim/163        memory,sqlite 1
share/163             memory,sqlite 1
missing_sessions/2000 memory,sqlite 1
encrypt_one/1         memory,sqlite 3
decrypt_one/1         memory,sqlite 3
decrypt_batch/1000    memory,sqlite 1
import/1000           memory,sqlite 1
export/1000           memory,sqlite 1
open_store/1000       sqlite        1
"
else
  WORKLOADS="
keys_query/150        memory,sqlite 10
keys_query/2000       memory,sqlite 4
keys_query/10000      memory,sqlite 1
keys_claim/163        memory,sqlite 8
keys_claim/1000       memory,sqlite 3
share/163             memory,sqlite 10
share/1000            memory,sqlite 5
share/10000           memory,sqlite 2
missing_sessions/2000 memory,sqlite 3
encrypt_one/1         memory,sqlite 300
decrypt_one/1         memory,sqlite 300
decrypt_batch/10000   memory,sqlite 1
import/1000           memory,sqlite 8
import/100000         memory,sqlite 1
export/100000         memory,sqlite 1
open_store/100000     sqlite        5
"
fi

RESULTS="$OUT/results.jsonl"
START=$(date +%s)
"$NEWT" floor >> "$RESULTS"
while read -r workload stores samples; do
  [[ -z "$workload" ]] && continue
  [[ -n "$ONLY" && ! "$workload" =~ $ONLY ]] && continue
  for store in ${stores//,/ }; do
    for round in $(seq "$ROUNDS"); do
      echo "== $workload $store round $round" >&2
      "$NEWT" run "$FIX" "$workload" "$store" "$samples" >> "$RESULTS"
      "$REF" run "$FIX" "$workload" "$store" "$samples" >> "$RESULTS"
    done
  done
done <<< "$WORKLOADS"
"$NEWT" floor >> "$RESULTS"
rm -rf "$BENCH_TMPDIR"
echo "== done in $(( $(date +%s) - START ))s (after the build); results in $OUT" >&2

python3 "$ROOT/benches/report.py" "$RESULTS" "$FIX" "$OUT"
