#!/usr/bin/env python3
"""Benchmark: the cost of ``import exp`` over a bare interpreter start.

Not a pytest test (the name does not match test_*.py / *_test.py); run it:

    python3 tests/bench/bench_import.py            # 30 alternated runs of each
    python3 tests/bench/bench_import.py --quick    # smoke run

Runs ``python -c pass`` and ``python -c "import exp"`` (cwd = repo root, so the
local exp.py is imported) in fresh subprocesses, alternating, and compares the
minimum and the median wall time.  Target: import overhead <= 15 ms, judged on
min(exp) - min(pass), the least noisy estimate on a busy machine; the medians
are printed too.  Then prints, from ``-X importtime`` (best of a few runs), the
10 modules with the largest cumulative import time among those that
``import exp`` loads and ``pass`` does not, both normally and with ``-S``
(no site, so .pth files cannot preload re/threading and hide their cost).

Bytecode: users normally have a cached ``exp.cpython-3X.pyc``; an environment
with PYTHONDONTWRITEBYTECODE=1 recompiles exp.py (~1,400 lines) on every
import.  The children therefore run with PYTHONDONTWRITEBYTECODE unset and
PYTHONPYCACHEPREFIX pointing at a temporary directory (so nothing is written
into the checkout), after a warm-up run; the target is judged on that.  The
cost without any bytecode cache is printed as information.

Exits 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

TARGET_MS = 15.0
PASS_CODE = "pass"
IMPORT_CODE = "import exp"
NOSITE = ("-S",)


def child_env(pycache_prefix: str | None) -> dict[str, str]:
    """Environment for the children: bytecode cached under ``pycache_prefix``, or never (None)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT
    for k in ("PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME", "EXPERIMENT_WORK_DIR", "EXPERIMENT_RUN_ID",
              "EXPERIMENT_NAME", "EXP_STANDALONE", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"):
        env.pop(k, None)
    if pycache_prefix is None:
        # The stdlib keeps its own __pycache__; only exp.py (no .pyc beside it) is compiled.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = pycache_prefix
    return env


def time_once(code: str, env: dict[str, str], flags: tuple[str, ...] = ()) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO_ROOT, env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def importtime(code: str, env: dict[str, str], runs: int,
               flags: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """{module: (self_us, cumulative_us)} from ``-X importtime``, each the minimum over ``runs``."""
    mods: dict[str, tuple[int, int]] = {}
    for _ in range(runs):
        out = subprocess.run([sys.executable, *flags, "-X", "importtime", "-c", code], cwd=REPO_ROOT, env=env,
                             check=True, capture_output=True, text=True).stderr
        for line in out.splitlines():
            if not line.startswith("import time:") or "[us]" in line:
                continue
            try:
                self_us, cum_us, name = line[len("import time:"):].split("|", 2)
                t = (int(self_us), int(cum_us))
            except ValueError:
                continue
            name = name.strip()
            mods[name] = tuple(map(min, mods[name], t)) if name in mods else t  # type: ignore[assignment]
    return mods


def measure(env: dict[str, str], runs: int, flags: tuple[str, ...] = ()) -> tuple[list[float], list[float]]:
    """Alternated wall times (s) of ``-c pass`` and ``-c "import exp"``, after a warm-up."""
    for code in (PASS_CODE, IMPORT_CODE):  # warm the page cache (and write the .pyc)
        time_once(code, env, flags)
    base: list[float] = []
    withexp: list[float] = []
    for i in range(runs):
        # Alternate (and swap the order every other round) so drift hits both alike.
        order = ((PASS_CODE, base), (IMPORT_CODE, withexp))
        for code, acc in (order if i % 2 == 0 else order[::-1]):
            acc.append(time_once(code, env, flags))
    return base, withexp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 runs of each (smoke run)")
    ap.add_argument("--runs", type=int, default=None, help="runs of each command (default 30)")
    args = ap.parse_args(argv)
    runs = args.runs or (5 if args.quick else 30)
    with tempfile.TemporaryDirectory(prefix="exp-bench-pycache-") as prefix:
        env = child_env(prefix)
        # Sanity: the child imports this checkout's exp.py, not an installed one.
        where = subprocess.run([sys.executable, "-c", "import exp; print(exp.__file__)"], cwd=REPO_ROOT,
                               env=env, check=True, capture_output=True, text=True).stdout.strip()
        if os.path.realpath(where) != os.path.realpath(os.path.join(REPO_ROOT, "exp.py")):
            print(f"warning: child imported {where}, not {REPO_ROOT}/exp.py")
        base, withexp = measure(env, runs)
        it_runs = 2 if args.quick else 5
        base_mods = importtime(PASS_CODE, env, it_runs)
        exp_mods = importtime(IMPORT_CODE, env, it_runs)
        # -S: no site, hence no .pth files; some environments' .pth files import
        # re/threading/... at startup, which would hide what exp pulls in.
        nosite_base, nosite_exp = measure(env, max(3, runs // 3), NOSITE)
        nosite_base_mods = importtime(PASS_CODE, env, it_runs, NOSITE)
        nosite_exp_mods = importtime(IMPORT_CODE, env, it_runs, NOSITE)
    cold_base, cold_exp = measure(child_env(None), max(3, runs // 3))
    stale = [f for f in os.listdir(os.path.join(REPO_ROOT, "__pycache__"))
             if f.startswith("exp.")] if os.path.isdir(os.path.join(REPO_ROOT, "__pycache__")) else []

    ms = 1e3
    b_min, e_min = min(base) * ms, min(withexp) * ms
    b_med, e_med = statistics.median(base) * ms, statistics.median(withexp) * ms
    d_min, d_med = e_min - b_min, e_med - b_med
    c_min = (min(cold_exp) - min(cold_base)) * ms
    c_med = (statistics.median(cold_exp) - statistics.median(cold_base)) * ms
    print(f"import benchmark: {runs} alternated runs each, Python {sys.version.split()[0]} ({sys.executable})")
    print(f"  python -c pass        : min {b_min:7.2f} ms  median {b_med:7.2f} ms")
    print(f"  python -c 'import exp': min {e_min:7.2f} ms  median {e_med:7.2f} ms")
    print(f"  overhead of import exp (bytecode cached): min-min {d_min:6.2f} ms  median-median {d_med:6.2f} ms")
    print(f"  overhead without bytecode cache (exp.py compiled each time, {len(cold_base)} runs):"
          f" min-min {c_min:6.2f} ms  median-median {c_med:6.2f} ms"
          + (f" [note: {REPO_ROOT}/__pycache__ holds {stale}, which may have been used]" if stale else ""))

    s_min = (min(nosite_exp) - min(nosite_base)) * ms
    s_med = (statistics.median(nosite_exp) - statistics.median(nosite_base)) * ms
    print(f"  overhead with -S (no site/.pth preloads, an upper bound: also counts os etc. that site"
          f" always loads; bytecode cached, {len(nosite_base)} runs):"
          f" min-min {s_min:6.2f} ms  median-median {s_med:6.2f} ms")

    for label, bm, em in (("", base_mods, exp_mods), (" -S", nosite_base_mods, nosite_exp_mods)):
        extra = {m: t for m, t in em.items() if m not in bm}
        top = sorted(extra.items(), key=lambda kv: kv[1][1], reverse=True)[:10]
        print(f"  python{label} -X importtime: {len(extra)} modules loaded by 'import exp' beyond 'pass';"
              f" top 10 by cumulative time (min of {it_runs} runs):")
        print(f"    {'cumulative us':>13} {'self us':>8}  module")
        for name, (self_us, cum_us) in top:
            print(f"    {cum_us:13d} {self_us:8d}  {name}")

    ok = d_min <= TARGET_MS
    print(f"target import_overhead <= {TARGET_MS:.0f} ms over 'python -c pass': "
          f"{'PASS' if ok else 'FAIL'} ({d_min:.1f} ms min-min, {d_med:.1f} ms median-median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
