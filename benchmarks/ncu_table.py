"""Per-kernel bytes, time and bandwidth of one decode step, from the CSV that Nsight Compute
writes for ``profile_step.py --ncu-step`` (each kernel replayed alone with cold caches, so the
bytes are DRAM traffic and the times include no overlap):

    ncu --profile-from-start off --clock-control none --csv \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python benchmarks/profile_step.py --ncu-step --batch 1 > ncu.csv
    python benchmarks/ncu_table.py ncu.csv --copy-tbs 4.27
"""

from __future__ import annotations

import argparse
import collections
import csv

UNITS = {"ns": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "nsecond": 1e-9,
         "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
METRICS = {"gpu__time_duration.sum": "s", "dram__bytes_read.sum": "read", "dram__bytes_write.sum": "written"}


def kernel_rows(path: str) -> list[dict]:
    """One dict per kernel name: launches, seconds, bytes read and written (summed over launches)."""
    per = collections.defaultdict(lambda: {"launches": set(), "s": 0.0, "read": 0.0, "written": 0.0})
    with open(path) as f:
        for rec in csv.DictReader(line for line in f if line.startswith('"')):
            key = METRICS.get(rec["Metric Name"])
            if key is None:
                continue
            entry = per[rec["Kernel Name"].split("(")[0][:80]]
            entry["launches"].add(rec["ID"])
            entry[key] += float(rec["Metric Value"].replace(",", "")) * UNITS[rec["Metric Unit"]]
    rows = [{"kernel": k, "launches": len(v["launches"]), "us": v["s"] * 1e6, "MB": (v["read"] + v["written"]) / 1e6}
            for k, v in per.items()]
    return sorted(rows, key=lambda r: -r["us"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--copy-tbs", type=float, default=None, help="measured copy bandwidth, for the last column")
    args = ap.parse_args()
    rows = kernel_rows(args.csv)
    print("| kernel | launches | µs | MB moved | TB/s |" + (" of copy |" if args.copy_tbs else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if args.copy_tbs else ""))
    for r in rows + [{"kernel": "**total**", "launches": sum(r["launches"] for r in rows),
                      "us": sum(r["us"] for r in rows), "MB": sum(r["MB"] for r in rows)}]:
        tbs = r["MB"] / r["us"] if r["us"] else 0.0
        cells = [r["kernel"], r["launches"], f"{r['us']:.1f}", f"{r['MB']:.2f}", f"{tbs:.2f}"]
        if args.copy_tbs:
            cells.append(f"{tbs / args.copy_tbs:.0%}")
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
