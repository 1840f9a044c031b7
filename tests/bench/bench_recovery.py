"""Benchmark: taking over a big batch from a scheduler that died.

    python tests/bench/bench_recovery.py [--n 10000] [--others 2000] [--repeat 3]

A config of --n experiments, every second one depending on the one before,
and the state file of a scheduler of that batch that was killed: the first of
each pair failed, the second still waits (never started, so recovery looks
for a directory it might have made just before the crash).  The base
directory also holds --others experiment directories of other batches.
`python -m exp run config.toml` takes over: it reads the old state, matches
every task, looks once for directories started but not recorded, and skips
the dependents of the failures; nothing is left to run, so it then exits.

Baseline, in the same run: `python -m exp run --dry-run` of the same config
(start-up, parsing and planning the batch, no state file).  Target: the
take-over grows linearly with the batch: at most 3x the dry run at 10,000
tasks (before, each waiting task scanned the whole base directory and each
failure walked the whole queue: minutes at this size).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup(tmp, n, others):
    base = os.path.join(tmp, "results")
    os.makedirs(os.path.join(base, ".exp_state"))
    lines = ["[scheduler]", f"base_experiment_dir = {json.dumps(base)}", ""]
    for i in range(n):
        lines += ["[[experiments]]", f'name = "e{i}"', 'command = "true"']
        if i % 2:
            lines.append(f'depends_on = ["e{i - 1}"]')
        lines.append("")
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write("\n".join(lines))
    for i in range(others):
        d = os.path.join(base, f"other{i}_2020-01-01__00-00-00")
        os.mkdir(d)
        with open(os.path.join(d, "metadata.json"), "w") as f:
            json.dump({"name": f"other{i}", "command": "true", "status": "finished",
                       "created_at": "2020-01-01T00:00:00", "current_run_id": "run_0001"}, f)
    return cfg, base


def write_dead_state(base, n):
    state = {"pending": [], "running": [], "finished": [], "errors": [],
             "summary": {"status_indicator": "running", "pid": 999999999, "started_at": "2021-01-01T00:00:00"}}
    for i in range(n):
        item = {"id": i, "name": f"e{i}", "command": "true", "repeat": 1, "attempt": 1 - i % 2}
        if i % 2:
            state["pending"].append(dict(item, status="pending"))
        else:
            state["errors"].append(dict(item, status="error", exit_code=1, reason="exit code 1"))
    with open(os.path.join(base, ".exp_state", "scheduler_state.json"), "w") as f:
        json.dump(state, f)


def timed(args, env):
    t = time.perf_counter()
    r = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    elapsed = time.perf_counter() - t
    return elapsed, r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--others", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="exp-bench-recovery-")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        cfg, base = setup(tmp, a.n, a.others)
        dry, take = [], []
        for _ in range(a.repeat):
            t, r = timed([sys.executable, "-m", "exp", "run", "--dry-run", cfg], env)
            assert r.returncode == 0, r.stderr
            dry.append(t)
            write_dead_state(base, a.n)
            t, r = timed([sys.executable, "-m", "exp", "run", cfg], env)
            assert r.returncode == 1, r.stderr  # the failures are failures
            with open(os.path.join(base, ".exp_state", "scheduler_state.json")) as f:
                final = json.load(f)
            assert len(final["errors"]) == a.n and not final["pending"], "not every task was taken over"
            take.append(t)
        d, k = min(dry), min(take)
        print(f"{a.n} tasks ({a.n // 2} failed, {a.n // 2} dependents waiting), {a.others} other directories, "
              f"best of {a.repeat} (Python {sys.version.split()[0]})")
        print(f"  exp run --dry-run (baseline): {d:.3f} s")
        print(f"  exp run taking over:          {k:.3f} s  ({(k - d) / a.n * 1e6:.0f} us per task over the baseline)")
        ratio = k / d
        print(f"target take-over <= 3x the dry run: {'PASS' if ratio <= 3 else 'FAIL'} ({ratio:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
