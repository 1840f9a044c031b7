#!/usr/bin/env python3
"""Benchmark: Experiment.upd_row() + save_row() against a plain csv.writer.

Not a pytest test (the name does not match test_*.py / *_test.py); run it:

    python3 tests/bench/bench_save_row.py            # 100,000 rows, best of 3
    python3 tests/bench/bench_save_row.py --quick    # smoke run

Targets (measured in the same run, so the figures are relative):
  * exp total time <= 3.0x the baseline (csv.writer on an open file, flush per row);
  * exp per-row cost of the last 10% of rows <= 1.2x the first 10% (flat cost,
    i.e. an append does not get dearer as the file grows).

Exits 0 whatever the verdicts; the verdict lines say PASS or FAIL.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

import exp  # noqa: E402  (the local exp.py)

RATIO_TARGET = 3.0
FLAT_TARGET = 1.2


def make_values(n: int) -> list[tuple[int, float, float, float, int]]:
    """The rows, computed up front so neither loop pays for making them."""
    rows = []
    for i in range(n):
        loss = 2.5 / (1.0 + i * 0.001) + (i % 7) * 1e-4
        acc = min(0.999, i / (n + 1.0))
        lr = 3e-4 * 0.5 ** (i // max(1, n // 4))
        rows.append((i, loss, acc, lr, i // 1000))
    return rows


def run_baseline(path: str, values, chunk: int) -> tuple[float, float, float]:
    """csv.writer on a file kept open, flush after every row. Returns (total, first, last)."""
    n = len(values)
    first = last = 0.0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        writerow, flush = w.writerow, f.flush
        writerow(["step", "loss", "acc", "lr", "epoch"])
        flush()
        t0 = time.perf_counter()
        for i, (step, loss, acc, lr, epoch) in enumerate(values):
            if i == chunk:
                first = time.perf_counter() - t0
            elif i == n - chunk:
                t_last = time.perf_counter()
            writerow([step, loss, acc, lr, epoch])
            flush()
        t1 = time.perf_counter()
    last = t1 - t_last
    return t1 - t0, first, last


def run_exp(base_dir: str, values, chunk: int) -> tuple[float, float, float, str]:
    """The real API, as a training script uses it. Returns (total, first, last, csv path)."""
    os.makedirs(base_dir, exist_ok=True)
    e = exp.Experiment(name="bench", command="python train.py", base_dir=base_dir, cwd=base_dir)
    e.current_run_id = "run_0001"  # what load_experiment() sets from EXPERIMENT_RUN_ID
    upd_row, save_row = e.upd_row, e.save_row
    n = len(values)
    first = 0.0
    t0 = time.perf_counter()
    for i, (step, loss, acc, lr, epoch) in enumerate(values):
        if i == chunk:
            first = time.perf_counter() - t0
        elif i == n - chunk:
            t_last = time.perf_counter()
        upd_row(step=step, loss=loss, acc=acc, lr=lr, epoch=epoch)
        save_row()
    t1 = time.perf_counter()
    path = e.metrics_path
    writer = getattr(e, "_writer", None)  # close the CSV so the temp dir can go
    if writer is not None:
        writer.close()
    return t1 - t0, first, t1 - t_last, path


def check_same_content(exp_csv: str, base_csv: str) -> bool:
    with open(exp_csv, encoding="utf-8") as a, open(base_csv, encoding="utf-8") as b:
        return a.read() == b.read()


def verdict(name: str, value: float, target: float, what: str) -> str:
    ok = value <= target
    return f"target {name} <= {target:.1f}x {what}: {'PASS' if ok else 'FAIL'} ({value:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 rows, one repeat (smoke run)")
    ap.add_argument("--rows", type=int, default=None, help="rows per measurement (default 100,000)")
    ap.add_argument("--repeat", type=int, default=None, help="repeats; the best is kept (default 3)")
    args = ap.parse_args(argv)
    n = args.rows or (10_000 if args.quick else 100_000)
    repeat = args.repeat or (1 if args.quick else 3)
    chunk = max(1, n // 10)

    values = make_values(n)
    best_b = best_e = None  # (total, first, last), each the minimum over repeats
    same = True
    with tempfile.TemporaryDirectory(prefix="exp-bench-") as tmp:
        for r in range(repeat):
            # Alternate the two so drift on a busy 2-core machine hits both alike.
            gc.collect()
            base_csv = os.path.join(tmp, f"baseline_{r}.csv")
            b = run_baseline(base_csv, values, chunk)
            gc.collect()
            *e, exp_csv = run_exp(os.path.join(tmp, f"exp_{r}"), values, chunk)
            same = same and check_same_content(exp_csv, base_csv)
            best_b = b if best_b is None else tuple(map(min, best_b, b))
            best_e = tuple(e) if best_e is None else tuple(map(min, best_e, e))
            print(f"  repeat {r + 1}/{repeat}: baseline {b[0]:.3f}s  exp {e[0]:.3f}s")

    (b_tot, b_first, b_last), (e_tot, e_first, e_last) = best_b, best_e
    ratio = e_tot / b_tot
    flat = e_last / e_first
    us = 1e6
    print(f"save_row benchmark: {n:,} rows x 5 columns, best of {repeat}, Python {sys.version.split()[0]}")
    print(f"  files identical (exp CSV == csv.writer CSV): {same}")
    print(f"  csv.writer + flush : {b_tot:8.3f} s  {b_tot / n * us:7.2f} us/row")
    print(f"  exp upd_row+save_row: {e_tot:8.3f} s  {e_tot / n * us:7.2f} us/row")
    print(f"  ratio exp / csv.writer: {ratio:.2f}x")
    print(f"  exp first {chunk:,} rows: {e_first / chunk * us:7.2f} us/row;"
          f" last {chunk:,} rows: {e_last / chunk * us:7.2f} us/row (last/first {flat:.2f}x)")
    print(f"  csv.writer first/last {chunk:,}: {b_first / chunk * us:.2f} / {b_last / chunk * us:.2f} us/row")
    print(verdict("save_row", ratio, RATIO_TARGET, "csv.writer"))
    print(verdict("save_row_flat (last/first)", flat, FLAT_TARGET, "first rows"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
