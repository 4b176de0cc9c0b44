#!/usr/bin/env python3
"""Turns benches/run.sh's results.jsonl into the comparison table.

usage: report.py RESULTS.jsonl FIXTURE_DIR OUT_DIR
Writes OUT_DIR/results.csv and OUT_DIR/results.md and prints the table.
"""
import csv
import json
import os
import statistics
import sys

results_path, fixtures, out_dir = sys.argv[1:4]
floors = []
samples = {}  # (workload, store, impl) -> [ns]
peaks = {}
for line in open(results_path):
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    if r["impl"] == "floor":
        floors.append(r)
        continue
    key = (r["workload"], r["store"], r["impl"])
    samples.setdefault(key, []).extend(r["samples_ns"])
    if r.get("peak_rss_kib") is not None:
        peaks[key] = max(peaks.get(key, 0), r["peak_rss_kib"])

op = {k: statistics.median(f[k] for f in floors) for k in floors[0] if k != "impl"}


def export_bytes(n):
    # The container's payload is the base64-decoded file body (3/4 of it).
    path = os.path.join(fixtures, f"export-{n}.txt")
    return os.path.getsize(path) * 3 / 4 if os.path.exists(path) else 0


def floor_ns(workload):
    """Unavoidable primitive operations of a workload, times their cost."""
    name, n = workload.split("/")
    n = int(n)
    if name == "keys_query":  # device self-signatures (+ SSK-by-MSK if cross-signed)
        meta = os.path.join(fixtures, f"keys-query-{n}.meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                return json.load(f)["ed25519_verifications"] * op["ed25519_verify_ns"]
        return n * op["ed25519_verify_ns"]
    if name == "keys_claim":  # one-time key signature + 3DH session each
        return n * (op["ed25519_verify_ns"] + op["olm_session_create_ns"])
    if name == "share":  # one Olm encryption per device
        return n * op["olm_encrypt_ns"]
    if name == "missing_sessions":  # no cryptography at all
        return None
    if name == "encrypt_one":
        return op["megolm_encrypt_ns"]
    if name in ("decrypt_one", "open_store"):
        return op["megolm_decrypt_ns"]
    if name == "decrypt_batch":
        return n * op["megolm_decrypt_ns"]
    if name == "import":
        return n * op["megolm_import_ns"] + export_bytes(n) * op["export_container_ns_per_byte"]
    if name == "export":
        return n * op["megolm_export_ns"] + export_bytes(n) * op["export_container_ns_per_byte"]
    return None


def fmt(ns):
    if ns is None:
        return "-"
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"


rows = []
order = []
for (w, s, i) in samples:
    if (w, s) not in order:
        order.append((w, s))
for w, s in order:
    newt = samples.get((w, s, "newt"))
    ref = samples.get((w, s, "reference"))
    nm = statistics.median(newt) if newt else None
    rm = statistics.median(ref) if ref else None
    fl = floor_ns(w)
    ratio = rm / nm if nm and rm else None
    to_floor = nm / fl if nm and fl else None
    ref_to_floor = rm / fl if rm and fl else None
    mem = samples.get((w, "memory", "newt"))
    sqlite_vs_mem = (nm / statistics.median(mem)) if (s == "sqlite" and mem and nm) else None
    target = None
    if ratio is not None:
        target = ratio >= 2 or (
            ref_to_floor is not None and ref_to_floor <= 2 and to_floor is not None and to_floor <= 1.2
        )
    rows.append({
        "workload": w,
        "store": s,
        "newt_median_ns": nm,
        "reference_median_ns": rm,
        "ratio_ref_over_newt": ratio,
        "floor_ns": fl,
        "newt_over_floor": to_floor,
        "reference_over_floor": ref_to_floor,
        "newt_sqlite_over_memory": sqlite_vs_mem,
        "newt_peak_rss_kib": peaks.get((w, s, "newt")),
        "reference_peak_rss_kib": peaks.get((w, s, "reference")),
        "newt_samples": len(newt or []),
        "reference_samples": len(ref or []),
        "target_met": target,
    })

with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    wr.writeheader()
    wr.writerows(rows)
with open(os.path.join(out_dir, "floor.json"), "w") as f:
    json.dump(op, f, indent=1)


def x(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}×"


lines = [
    "| workload | store | newt | reference | ref/newt | floor | newt/floor | ref/floor | sqlite/mem | peak RSS newt / ref | target |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]
for r in rows:
    pk = ""
    if r["newt_peak_rss_kib"] or r["reference_peak_rss_kib"]:
        pk = f"{(r['newt_peak_rss_kib'] or 0) / 1024:.0f} / {(r['reference_peak_rss_kib'] or 0) / 1024:.0f} MiB"
    t = {True: "met", False: "MISSED", None: "-"}[r["target_met"]]
    lines.append(
        f"| {r['workload']} | {r['store']} | {fmt(r['newt_median_ns'])} | {fmt(r['reference_median_ns'])} "
        f"| {x(r['ratio_ref_over_newt'])} | {fmt(r['floor_ns'])} | {x(r['newt_over_floor'], 1)} "
        f"| {x(r['reference_over_floor'], 1)} | {x(r['newt_sqlite_over_memory'])} | {pk} | {t} |"
    )
lines.append("")
lines.append("Per-operation floor costs (vodozemac 0.11, median of the runs' medians): " + ", ".join(
    f"{k.removesuffix('_ns')} {fmt(v) if k.endswith('_ns') else f'{v:.2f} ns/B'}" for k, v in op.items()))
table = "\n".join(lines)
with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table + "\n")
print(table)
