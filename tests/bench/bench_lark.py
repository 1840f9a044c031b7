#!/usr/bin/env python3
"""Benchmark: save_row(lark=True) against save_row(), with a Lark API that answers after 1 s.

Not a pytest test (the name does not match test_*.py / *_test.py); run it:

    python3 tests/bench/bench_lark.py                 # 10,000 rows, about a minute
    python3 tests/bench/bench_lark.py --rows 2000     # a smaller run
    python3 tests/bench/bench_lark.py --flush-timeout 120   # let the process finish its sync at exit

A fake Lark Open API (tests/fake_lark.py) runs in this process over real HTTP
on 127.0.0.1 and answers every request after --delay seconds (default 1 s).
Its table already has the columns the rows use (step, loss, acc: numbers),
as a team's pre-made table would.

Two experiments run the same training-like script as their command, launched
by exp (``Experiment.run(background=True)``), so the script gets the
environment a run gets (EXPERIMENT_WORK_DIR, EXPERIMENT_RUN_ID, LARK_APP_ID,
LARK_APP_SECRET; PYTHONPATH = the repo root) and calls ``exp.load_experiment()``.
The script builds each row with upd_row(step, loss, acc) and times only the
``save_row()`` call with time.perf_counter_ns, --rows times, back to back
(--interval adds a sleep between rows, a training step):

  * baseline: ``save_row()`` into its own experiment (same lark_config);
  * lark:     ``save_row(lark=True)`` into another.

Figures and targets:

  1. Added latency per call = percentile(lark) - percentile(baseline), for
     p50 and p99 (raw p50/p99/max of both printed).  Target p99 <= 1 ms.
  2. HTTP requests the fake received for the lark run's rows (every path:
     token, fields, batch_create), from the first row until all arrived.
     Target <= 25 for 10,000 rows (scaled for --rows: 25 * rows / 10,000,
     at least 5).
  3. Seconds from the first save_row(lark=True) until all rows are records
     of the table (polled in this process).  No target; printed.

The script exits right after its loop; its exit flush sends for at most
flush_timeout seconds (default 10, --flush-timeout sets it).  Rows it leaves
in the outbox are sent by nothing else: once it has exited and no request is
in flight (or --sync-after seconds after the first row) this benchmark runs
``python exp.py lark-sync <work_dir>`` and says so; figures 2 and 3 then
include that command, and are printed split into "by the training process"
and "by lark-sync".

Then every record is checked: exactly --rows records, step 0..rows-1 in
order, none duplicated, loss and acc present.

Second figure (skip it with --no-empty-table): the same lark run into a table
that has only its primary column, so exp creates step, loss, acc itself:
its request count.

Exits 0 whatever the verdicts (1 only if a run failed or records are wrong);
the verdict lines say PASS or FAIL.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, TESTS_DIR)

import exp  # noqa: E402  (the local exp.py)
from fake_lark import FakeLark  # noqa: E402

APP_ID, APP_SECRET = "cli_app", "sekret"
APP_TOKEN = "bascnBENCHapp"
TABLE, EMPTY_TABLE = "tblBENCHrows", "tblBENCHempty"
COLUMNS = [("step", 2), ("loss", 2), ("acc", 2)]  # 2: number
P99_TARGET_MS = 1.0
REQUESTS_TARGET_10K = 25
POLL = 0.02

CHILD = r'''
import json, os, sys, time
import exp

mode, n, out, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
e = exp.load_experiment()
values = [(i, 2.5 / (1.0 + i * 0.001) + (i % 7) * 1e-4, min(0.999, i / (n + 1.0))) for i in range(n)]
lat = [0] * n
pc = time.perf_counter_ns
upd, save = e.upd_row, e.save_row
sleep = time.sleep
t_first = time.time()
if mode == "lark":
    for i, (step, loss, acc) in enumerate(values):
        upd(step=step, loss=loss, acc=acc)
        t0 = pc()
        save(lark=True)
        lat[i] = pc() - t0
        if interval:
            sleep(interval)
else:
    for i, (step, loss, acc) in enumerate(values):
        upd(step=step, loss=loss, acc=acc)
        t0 = pc()
        save()
        lat[i] = pc() - t0
        if interval:
            sleep(interval)
t_last = time.time()
with open(out + ".tmp", "w") as f:
    json.dump({"mode": mode, "run_id": e.current_run_id, "t_first": t_first, "t_last": t_last, "lat_ns": lat}, f)
os.replace(out + ".tmp", out)
'''


def pct(sorted_vals: list[int], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def lark_url(fake: FakeLark, table: str) -> str:
    return f"{fake.url}/base/{APP_TOKEN}?table={table}"


def kind(path: str) -> str:
    if path.endswith("/tenant_access_token/internal"):
        return "token"
    if path.endswith("/records/batch_create"):
        return "batch_create"
    if path.endswith("/fields"):
        return "fields"
    return path.rsplit("/", 1)[-1]


def start_run(tmp: str, name: str, mode: str, rows: int, interval: float, lark_config: dict,
              child: str) -> tuple[exp.Experiment, exp.RunHandle, str]:
    out = os.path.join(tmp, f"{name}.json")
    cmd = shlex.join([sys.executable, child, mode, str(rows), out, repr(interval)])
    e = exp.Experiment(name=name, command=cmd, base_dir=os.path.join(tmp, "results"), cwd=tmp,
                       lark_config=lark_config)
    # Bytecode cached, as in a real install, but in the temp dir: never a __pycache__ in the checkout.
    h = e.run(background=True, extra_env={"PYTHONPATH": REPO_ROOT, "PYTHONDONTWRITEBYTECODE": None,
                                          "PYTHONPYCACHEPREFIX": os.path.join(tmp, "pycache")})
    return e, h, out


def read_result(e: exp.Experiment, h: exp.RunHandle, out: str) -> dict:
    code = h.wait()
    if code != 0 or not os.path.exists(out):
        print(f"  the run {e.name} {h.run_id} failed (exit {code}); its log ends:")
        print(e.get_log_tail(30, h.run_id))
        raise SystemExit(1)
    with open(out) as f:
        return json.load(f)


def arrived(fake: FakeLark, table: str, since: int) -> tuple[int, int]:
    """(rows confirmed by batch_create answers for ``table`` since request ``since``, requests in flight)."""
    done: dict[str, int] = {}
    flight = 0
    for r in list(fake.requests[since:]):
        if r["status"] is None:
            flight += r["fault"] is None
            continue
        if r["code"] == 0 and r["path"].endswith(f"/tables/{table}/records/batch_create"):
            recs = (r["json"] or {}).get("records") or []
            done[r["query"].get("client_token") or str(id(r))] = len(recs)
    return sum(done.values()), flight


def lark_run(fake: FakeLark, tmp: str, name: str, table: str, rows: int, interval: float, lark_config: dict,
             child: str, sync_after: float) -> dict:
    """One save_row(lark=True) run into ``table``; polls until every row arrived (lark-sync if needed)."""
    since = len(fake.requests)
    e, h, out = start_run(tmp, name, "lark", rows, interval, lark_config, child)
    t_start = time.time()
    t_child_end = None
    n_child_end = None
    t_sync = None
    sync_proc = None
    n = 0
    t_all = None
    deadline = t_start + sync_after + 600
    while time.time() < deadline:
        n, flight = arrived(fake, table, since)
        now = time.time()
        if n >= rows:
            t_all = now
            break
        if t_child_end is None and h.poll() is not None:
            t_child_end, n_child_end = now, n
        if sync_proc is None and ((t_child_end is not None and not flight) or now - t_start > sync_after):
            # Nothing else sends what the training process left: the documented way.
            t_sync = now
            env = dict(os.environ, LARK_APP_ID=APP_ID, LARK_APP_SECRET=APP_SECRET)
            sync_proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "exp.py"), "lark-sync", e.work_dir],
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if sync_proc is not None and sync_proc.poll() is not None and not flight:
            n, _ = arrived(fake, table, since)
            if n < rows:
                break  # lark-sync is done and rows are still missing
        time.sleep(POLL)
    res = read_result(e, h, out)
    if t_child_end is None:
        t_child_end, n_child_end = time.time(), n
    sync_out = ""
    if sync_proc is not None:
        sync_out = sync_proc.communicate(timeout=600)[0].strip()
    reqs = list(fake.requests[since:])
    log_lark = [ln for ln in e.read_log(h.run_id).splitlines() if "lark:" in ln.lower()]
    return {"e": e, "res": res, "t_start": t_start, "t_all": t_all, "n": n, "t_child_end": t_child_end,
            "n_child_end": n_child_end, "t_sync": t_sync, "sync_out": sync_out, "reqs": reqs, "log": log_lark}


def summarize_requests(reqs: list[dict], t_sync: float | None) -> tuple[int, int, str]:
    child = [r for r in reqs if t_sync is None or r["time"] < t_sync]
    by_kind: dict[str, int] = {}
    for r in reqs:
        k = kind(r["path"])
        by_kind[k] = by_kind.get(k, 0) + 1
    return len(reqs), len(child), ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()))


def batch_sizes(reqs: list[dict], table: str) -> str:
    """Records per batch_create request, in the order they were sent (a replay marked r)."""
    seen: set[str] = set()
    out = []
    for r in reqs:
        if r["path"].endswith(f"/tables/{table}/records/batch_create"):
            tok = r["query"].get("client_token") or ""
            out.append(f"{len((r['json'] or {}).get('records') or [])}{'r' if tok in seen else ''}")
            seen.add(tok)
    return " ".join(out)


def check_records(fake: FakeLark, table: str, rows: int) -> tuple[bool, str]:
    recs = fake.records(APP_TOKEN, table)
    steps = [r["fields"].get("step") for r in recs]
    ok_vals = all(isinstance(r["fields"].get("loss"), (int, float)) and isinstance(r["fields"].get("acc"), (int, float))
                  for r in recs)
    in_order = steps == list(range(rows))
    dups = len(steps) - len(set(steps))
    ok = len(recs) == rows and in_order and dups == 0 and ok_vals
    return ok, (f"{len(recs):,} records (expected {rows:,}), steps 0..{rows - 1} in order: {in_order}, "
                f"duplicated: {dups}, loss/acc numbers in all: {ok_vals}")


def verdict(name: str, ok: bool, detail: str) -> str:
    return f"target {name}: {'PASS' if ok else 'FAIL'} ({detail})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000, help="rows per run (default 10,000)")
    ap.add_argument("--delay", type=float, default=1.0, help="seconds the fake waits before every answer (1.0)")
    ap.add_argument("--interval", type=float, default=0.0, help="seconds of sleep between rows (0: back to back)")
    ap.add_argument("--flush-timeout", type=float, default=None,
                    help="lark_config flush_timeout of the runs (default: exp's default, 10 s)")
    ap.add_argument("--sync-after", type=float, default=120.0,
                    help="run lark-sync this long after the first row at the latest (120 s)")
    ap.add_argument("--no-empty-table", action="store_true", help="skip the run into a table without the columns")
    args = ap.parse_args(argv)
    rows = args.rows
    req_target = max(5, math.ceil(REQUESTS_TARGET_10K * rows / 10_000))

    with tempfile.TemporaryDirectory(prefix="exp-bench-lark-") as tmp, \
            FakeLark(apps={APP_ID: APP_SECRET}, delay=args.delay) as fake:
        fake.add_table(APP_TOKEN, TABLE, fields=COLUMNS)
        fake.add_table(APP_TOKEN, EMPTY_TABLE, fields=[("Name", 1)])
        child = os.path.join(tmp, "train.py")
        with open(child, "w") as f:
            f.write(CHILD)

        def config(table: str) -> dict:
            c = {"app_id": APP_ID, "app_secret": APP_SECRET, "url": lark_url(fake, table)}
            if args.flush_timeout is not None:
                c["flush_timeout"] = args.flush_timeout
            return c

        # 1. Baseline: save_row() into its own experiment, same settings.
        e_b, h_b, out_b = start_run(tmp, "bench_plain", "plain", rows, args.interval, config(TABLE), child)
        base = read_result(e_b, h_b, out_b)
        if len(fake.requests):
            print(f"  note: the baseline run made {len(fake.requests)} request(s) to the fake")

        # 2. save_row(lark=True).
        lk = lark_run(fake, tmp, "bench_lark", TABLE, rows, args.interval, config(TABLE), child, args.sync_after)
        ok_recs, recs_detail = check_records(fake, TABLE, rows)

        # 3. Second figure: a table without the columns.
        empty = None
        if not args.no_empty_table:
            empty = lark_run(fake, tmp, "bench_lark_empty", EMPTY_TABLE, rows, args.interval, config(EMPTY_TABLE),
                             child, args.sync_after)
            empty["check"] = check_records(fake, EMPTY_TABLE, rows)

    b = sorted(base["lat_ns"])
    k = sorted(lk["res"]["lat_ns"])
    us = 1e-3
    b50, b99, k50, k99 = pct(b, 50), pct(b, 99), pct(k, 50), pct(k, 99)
    add50, add99 = (k50 - b50) * us, (k99 - b99) * us
    t_first = lk["res"]["t_first"]
    total, by_child, kinds = summarize_requests(lk["reqs"], lk["t_sync"])

    print(f"save_row(lark=True) benchmark: {rows:,} rows (step, loss, acc), fake Lark answering after "
          f"{args.delay:g} s, interval {args.interval:g} s, flush_timeout "
          f"{'default' if args.flush_timeout is None else f'{args.flush_timeout:g} s'}, Python {sys.version.split()[0]}")
    print(f"  save_row()          : p50 {b50 * us:8.1f} us  p99 {b99 * us:8.1f} us  max {b[-1] * us:9.1f} us"
          f"  mean {sum(b) / len(b) * us:7.1f} us")
    print(f"  save_row(lark=True) : p50 {k50 * us:8.1f} us  p99 {k99 * us:8.1f} us  max {k[-1] * us:9.1f} us"
          f"  mean {sum(k) / len(k) * us:7.1f} us")
    print(f"  added latency       : p50 {add50:+8.1f} us  p99 {add99:+8.1f} us")
    slow = [i for i, v in enumerate(lk["res"]["lat_ns"]) if v > 1_000_000]
    print(f"  lark calls over 1 ms: {len(slow)} of {rows:,} (row numbers: {', '.join(map(str, slow[:12]))}"
          f"{', ...' if len(slow) > 12 else ''}); loop took {lk['res']['t_last'] - t_first:.2f} s "
          f"(baseline {base['t_last'] - base['t_first']:.2f} s)")
    print(f"  HTTP requests, lark run: {total} in all ({kinds}); {by_child} by the training process"
          + (f", {total - by_child} by lark-sync" if lk["t_sync"] else ""))
    print(f"  rows arrived by the time the training process had exited (or all arrived): "
          f"{lk['n_child_end']:,} of {rows:,} ({lk['t_child_end'] - t_first:.1f} s after its first row)")
    print(f"  records per batch_create, in order (r: a replay of a batch already sent): "
          f"{batch_sizes(lk['reqs'], TABLE)}")
    if lk["t_sync"]:
        print(f"  the rest were sent by `python exp.py lark-sync <work_dir>`, started "
              f"{lk['t_sync'] - t_first:.1f} s after the first row: {lk['sync_out']}")
    for ln in lk["log"][-3:]:
        print(f"  run log: {ln[:200]}")
    if lk["t_all"] is not None:
        print(f"  all {rows:,} rows arrived {lk['t_all'] - t_first:.1f} s after the first save_row(lark=True)"
              + (" (including lark-sync)" if lk["t_sync"] else ""))
    else:
        print(f"  NOT all rows arrived: {lk['n']:,} of {rows:,}")
    print(f"  records: {recs_detail}")
    if empty is not None:
        e_total, e_child, e_kinds = summarize_requests(empty["reqs"], empty["t_sync"])
        print(f"  second figure, a table without step/loss/acc: {e_total} requests ({e_kinds}); "
              f"{e_child} by the training process"
              + (f", {e_total - e_child} by lark-sync" if empty["t_sync"] else "")
              + (f"; all rows in {empty['t_all'] - empty['res']['t_first']:.1f} s" if empty["t_all"] else
                 f"; only {empty['n']:,} rows arrived"))
        print(f"    its records: {empty['check'][1]}")
    print(verdict("added p99 latency <= 1 ms", add99 <= P99_TARGET_MS * 1000, f"{add99 / 1000:+.3f} ms"))
    print(verdict(f"HTTP requests <= {req_target} for {rows:,} rows", total <= req_target,
                  f"{total}" + (f", of which {total - by_child} by lark-sync" if lk["t_sync"] else "")))
    print(verdict("all rows arrived exactly once, in order", ok_recs and lk["t_all"] is not None, recs_detail))
    return 0 if ok_recs else 1


if __name__ == "__main__":
    sys.exit(main())
