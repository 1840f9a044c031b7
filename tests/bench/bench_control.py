"""Benchmark: queue-control latency, and the scheduler's overhead with a GPU pool.

    python tests/bench/bench_control.py [--quick] [--commands 50] [--n 200] [--repeat 3]

1. Command latency.  A scheduler (`python -m exp run`, check_interval = 30 s)
   has one slot, taken by an experiment that waits for a marker, so it is
   idle-waiting with a second experiment queued.  The script posts --commands
   command files one at a time (StateFile.post_command, `exp priority` of the
   queued task, which each one changes) and measures
   the time from writing each file to its answer appearing next to it.
   Target: median and p95 <= 50 ms (the scheduler wakes on the file; it does
   not sleep a full check_interval).

2. Overhead per experiment with GPUs.  A fake `nvidia-smi` first on PATH
   prints a pool of 4 GPUs; 200 experiments of `true` that ask for `gpus = 1`
   each run 4 at a time through `python -m exp run config.toml`, against
   `xargs -P4 -n1 sh -c` running the same 200 `true` (best of --repeat each,
   interleaved).  Overhead = (exp - xargs) / n.  Target <= 15 ms per
   experiment.  Every experiment's metadata is checked to hold one GPU of the
   pool.  See bench_scheduler.py about slow file creation right after many
   deletions (ext4 without a journal): run it after a few quiet minutes.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import exp  # noqa: E402

GPUS = 4


def settle():
    # Let the writes (and deletions) of the previous measurement reach the disk first.
    os.sync()
    time.sleep(0.2)


def fake_nvidia_smi(tmp):
    """A bin directory whose nvidia-smi prints a pool of GPUS idle 16 GB GPUs."""
    bindir = os.path.join(tmp, "fakebin")
    os.mkdir(bindir)
    rows = "".join(f"{i}, GPU-{i}, 0, 16000, 0\\n" for i in range(GPUS))
    path = os.path.join(bindir, "nvidia-smi")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nprintf '{rows}'\n")
    os.chmod(path, 0o755)
    return bindir


def write_config(path, experiments, **scheduler):
    lines = ["[scheduler]"] + [f"{k} = {json.dumps(v)}" for k, v in scheduler.items()] + [""]
    for e in experiments:
        lines.append("[[experiments]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in e.items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def fresh_dir(tmp):
    d = tempfile.mkdtemp(dir=tmp)
    settle()
    return d


# ---------------------------------------------------------------- latency


def measure_latency(tmp, env, count):
    d = fresh_dir(tmp)
    marker = os.path.join(d, "go")
    started = os.path.join(d, "started")
    hold = (f'touch "{started}"; i=0; while [ ! -e "{marker}" ] && [ $i -lt 1200 ]; '
            f"do sleep 0.1; i=$((i+1)); done")
    cfg = os.path.join(d, "config.toml")
    # One slot: "queued" waits behind the sleeper, so a priority change applies to it (a
    # refused command, say priority of a running task, would be answered as fast).
    write_config(cfg, [{"name": "sleeper", "command": hold}, {"name": "queued", "command": "true"}],
                 check_interval=30, max_concurrent_experiments=1)
    base = os.path.join(d, "results")
    proc = subprocess.Popen([sys.executable, "-m", "exp", "run", cfg], cwd=d, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    st = exp.StateFile(base)
    times = []
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(started) and st.owned()):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the scheduler did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        time.sleep(0.5)  # let it settle into its idle wait
        for _ in range(count):
            time.sleep(random.uniform(0.03, 0.09))  # not in step with the scheduler's polls
            t = time.perf_counter()
            cid = st.post_command("priority", tasks=["queued"], value=1)
            answer = os.path.join(st.commands_dir, cid + exp.RESULT_EXT)
            while not os.path.exists(answer):
                if time.perf_counter() - t > 10:
                    sys.exit("a command was not answered within 10 s")
                time.sleep(0.0005)
            times.append(time.perf_counter() - t)
            res = st.result(cid, 5)
            assert res is not None and res.get("ok"), res
    finally:
        open(marker, "w").close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return times


# ---------------------------------------------------------------- overhead


def time_exp(tmp, env, n, limit):
    d = fresh_dir(tmp)
    cfg = os.path.join(d, "config.toml")
    write_config(cfg, [{"name": f"e{i:03d}", "command": "true", "gpus": 1} for i in range(n)],
                 max_concurrent_experiments=limit)
    settle()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "exp", "run", cfg], cwd=d, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"exp run failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return dt, os.path.join(d, "results")


def check_gpus(results, n):
    """Each experiment ran with exactly one GPU of the pool."""
    rows = exp.list_experiments(results)
    assert len(rows) == n, f"expected {n} experiments, found {len(rows)}"
    used = set()
    for row in rows:
        m = exp.ExperimentDir(row["work_dir"]).read_metadata()
        ids = m.get("gpu_ids")
        assert isinstance(ids, list) and len(ids) == 1 and ids[0] in range(GPUS), (row["work_dir"], ids)
        used.add(ids[0])
    return sorted(used)


def time_xargs(n, limit):
    cmds = "\n".join("true" for _ in range(n)) + "\n"
    settle()
    t = time.perf_counter()
    subprocess.run(["xargs", f"-P{limit}", "-n1", "sh", "-c"], input=cmds.encode(), check=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 commands, 20 experiments, one repetition")
    p.add_argument("--commands", type=int, default=50)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.commands, args.n, args.repeat = 20, 20, 1
    limit = GPUS

    tmp = tempfile.mkdtemp(prefix="exp-bench-control-")
    try:
        bindir = fake_nvidia_smi(tmp)
        # Bytecode cached, as in any real install (the cache goes to the temp dir, not the checkout).
        env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"), PYTHONPATH=ROOT,
                   PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        for var in ("EXPERIMENT_WORK_DIR", "EXPERIMENT_NAME", "EXPERIMENT_RUN_ID", "EXP_STANDALONE"):
            env.pop(var, None)

        lat = measure_latency(tmp, env, args.commands)

        time_exp(tmp, env, 5, limit)  # warm the bytecode cache
        exps, xargs = [], []
        used: list = []
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            xargs.append(time_xargs(args.n, limit))
            dt, results = time_exp(tmp, env, args.n, limit)
            exps.append(dt)
            used = check_gpus(results, args.n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lat_ms = sorted(t * 1000 for t in lat)
    med = statistics.median(lat_ms)
    p95 = lat_ms[min(len(lat_ms) - 1, int(round(0.95 * (len(lat_ms) - 1))))]
    print(f"command latency, scheduler idle-waiting (check_interval 30 s, poll every "
          f"{exp.COMMAND_POLL_INTERVAL * 1000:.0f} ms), {len(lat_ms)} commands (Python {sys.version.split()[0]}):")
    print(f"  median {med:.1f} ms, p95 {p95:.1f} ms, min {lat_ms[0]:.1f} ms, max {lat_ms[-1]:.1f} ms")

    x, e, n = min(xargs), min(exps), args.n
    overhead_ms = (e - x) / n * 1000
    print(f"{n} one-GPU experiments of `true`, {limit} at a time on a fake {GPUS}-GPU pool, best of {args.repeat}:")
    print(f"  xargs -P{limit} -n1 sh -c: {x:.3f} s  ({x / n * 1000:.2f} ms per command)")
    print(f"  python -m exp run:      {e:.3f} s  ({e / n * 1000:.2f} ms per experiment); GPUs used: {used}")
    print(f"  ratio exp / xargs: {e / x:.2f}x; overhead {overhead_ms:.2f} ms per experiment")
    print(f"target command latency <= 50 ms (median): {'PASS' if med <= 50 else 'FAIL'} ({med:.1f} ms)")
    print(f"target command latency <= 50 ms (p95):    {'PASS' if p95 <= 50 else 'FAIL'} ({p95:.1f} ms)")
    print(f"target overhead <= 15 ms per experiment:  {'PASS' if overhead_ms <= 15 else 'FAIL'} "
          f"({overhead_ms:.2f} ms)")


if __name__ == "__main__":
    main()
