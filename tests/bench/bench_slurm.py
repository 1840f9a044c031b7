"""Benchmark: exp's Slurm backend against plain sbatch on a real Slurm.

    python tests/bench/bench_slurm.py [--jobs 200] [--concurrency 20] [--repeat 1]
    python tests/bench/bench_slurm.py --jobs 40        # a quick run

Needs a Slurm that answers on this machine (``.ci/slurm start`` starts a
single-node one).  Measured in the same run, one after the other:

  baseline  a bash loop of ``sbatch --parsable -o /dev/null --wrap true``, N
            times, then ``squeue -h -j <all ids> -t <live states>`` every
            --baseline-poll seconds (default 0.5, exp's own shortest poll
            interval) until none of the jobs is pending or running.
  exp       ``python exp.py run batch.toml`` on N experiments whose command
            is ``true``, ``[scheduler] backend = "slurm"``, at most
            --concurrency of them submitted at once.  PATH starts with a
            directory of wrappers named sbatch, squeue, scontrol, sacct and
            scancel that write their arguments (one line, with a timestamp)
            to a log and exec the real command, so the Slurm commands exp
            runs are counted from outside exp.

Targets:
  * exp wall time <= 1.5x the baseline's;
  * one squeue per poll for all jobs, never one per job per poll: fewer
    squeue calls than jobs, and no squeue asking about a single job while
    several were in flight (in flight: jobs whose sbatch had answered minus
    those whose exit code exp already asked scontrol for; a heuristic).
    With few jobs (--jobs 10) the run lasts longer than N poll intervals,
    so "fewer squeue calls than jobs" says little there; the lines on the
    intervals between polls say whether polls follow the clock (one per
    0.5 s at most, backing off) or something else, such as submissions;
  * scontrol at most once per job (exp asks it for the exit code of a job
    that ended), plus a few;
  * all N experiments finished: exp exits 0 and ``exp ls --json`` lists N
    experiments with status "finished".

The wrappers cost exp a bash start per Slurm command (a few ms each), which
the baseline does not pay; the figures are printed so this can be weighed.
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
EXP_PY = os.path.join(ROOT, "exp.py")
SLURM_COMMANDS = ("sbatch", "squeue", "scontrol", "sacct", "scancel")
#: exp's shortest interval between polls (SLURM_POLL_MIN in exp.py), for the diagnostics.
POLL_MIN = 0.5
LIVE_STATES = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING"

BASELINE = r"""
set -u
n="$1"; poll="$2"; idfile="$3"
ids=()
for ((i = 0; i < n; i++)); do
  id="$(sbatch --parsable -o /dev/null --wrap true)" || { echo "sbatch failed" >&2; exit 1; }
  id="${id%%;*}"
  ids+=("$id")
  echo "$id" >>"$idfile"
done
list="$(IFS=,; echo "${ids[*]}")"
polls=0
while :; do
  polls=$((polls + 1))
  left="$(squeue -h -j "$list" -t LIVE -o %i)" || { echo "squeue failed" >&2; exit 1; }
  [ -z "$left" ] && break
  sleep "$poll"
done
echo "polls=$polls"
""".replace("LIVE", LIVE_STATES)

WRAPPER = """#!/bin/bash
printf '%s %s %s\\n' "$EPOCHREALTIME" {name} "$*" >>{log}
exec {real} "$@"
"""
# sbatch also notes when it has answered (before exp can read the job id), so a
# poll can be compared with the jobs exp knew about at that moment.
SBATCH_WRAPPER = """#!/bin/bash
printf '%s %s %s\\n' "$EPOCHREALTIME" {name} "$*" >>{log}
out="$({real} "$@")"; rc=$?
printf '%s sbatch-done %s\\n' "$EPOCHREALTIME" "$out" >>{log}
[ -n "$out" ] && printf '%s\\n' "$out"
exit $rc
"""


def slurm_up():
    for c in ("sbatch", "squeue", "scontrol"):
        if not shutil.which(c):
            return f"no {c} on PATH (start a Slurm with .ci/slurm start)"
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"squeue failed: {e}"
    if r.returncode != 0:
        return f"no Slurm controller answers: {(r.stderr or r.stdout).strip()[:200]} (start one with .ci/slurm start)"
    return None


def queue_len():
    r = subprocess.run(["squeue", "-h", "-t", LIVE_STATES, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return len(r.stdout.split())


def wait_queue_empty(limit=120.0):
    """Jobs of others (or of an earlier measurement) would slow the next one down: wait for them."""
    deadline = time.monotonic() + limit
    n = queue_len()
    while n and time.monotonic() < deadline:
        time.sleep(0.5)
        n = queue_len()
    return n


def scancel(ids):
    ids = [i for i in ids if i]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def run_baseline(tmp, n, poll, timeout):
    script = os.path.join(tmp, "baseline.sh")
    idfile = os.path.join(tmp, "baseline.ids")
    with open(script, "w") as f:
        f.write(BASELINE)
    open(idfile, "w").close()
    t = time.perf_counter()
    try:
        r = subprocess.run(["bash", script, str(n), str(poll), idfile], capture_output=True, text=True,
                           timeout=timeout, cwd=tmp)
    except subprocess.TimeoutExpired:
        scancel(open(idfile).read().split())
        sys.exit(f"baseline did not finish within {timeout} s")
    dt = time.perf_counter() - t
    if r.returncode != 0:
        scancel(open(idfile).read().split())
        sys.exit(f"baseline failed ({r.returncode}): {r.stderr[-2000:]}")
    polls = int(r.stdout.split("polls=")[-1].split()[0])
    return dt, polls


def make_wrappers(tmp, log):
    wrap = os.path.join(tmp, "bin")
    os.makedirs(wrap)
    for name in SLURM_COMMANDS:
        real = shutil.which(name)
        if real is None:  # e.g. no sacct: leave it absent, as exp would find it
            continue
        path = os.path.join(wrap, name)
        with open(path, "w") as f:
            text = SBATCH_WRAPPER if name == "sbatch" else WRAPPER
            f.write(text.format(name=name, log=_sh_quote(log), real=_sh_quote(real)))
        os.chmod(path, 0o755)
    return wrap


def _sh_quote(s):
    return "'" + s.replace("'", "'\"'\"'") + "'"


def write_config(path, base, n, concurrency):
    lines = ["[scheduler]", 'backend = "slurm"', f"max_concurrent_experiments = {concurrency}",
             f"base_experiment_dir = {json.dumps(base)}", ""]
    for i in range(n):
        lines += ["[[experiments]]", f'name = "t{i:04d}"', 'command = "true"', ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def run_exp(tmp, n, concurrency, timeout):
    log = os.path.join(tmp, "slurm-commands.log")
    open(log, "w").close()
    wrap = make_wrappers(tmp, log)
    base = os.path.join(tmp, "results")
    cfg = os.path.join(tmp, "batch.toml")
    write_config(cfg, base, n, concurrency)
    env = dict(os.environ, PATH=wrap + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
    t0 = time.time()
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, EXP_PY, "run", cfg], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=tmp, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # exp cancels its jobs on SIGTERM
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        sys.exit(f"exp run did not finish within {timeout} s")
    dt = time.perf_counter() - t
    calls = parse_log(log)
    ls = subprocess.run([sys.executable, EXP_PY, "ls", base, "--json"], capture_output=True, text=True,
                        env=env, timeout=120)
    try:
        rows = json.loads(ls.stdout) if ls.returncode == 0 else []
    except ValueError:
        rows = []
    if isinstance(rows, dict):  # tolerate a wrapping object
        rows = rows.get("experiments") or []
    return {"wall": dt, "t0": t0, "rc": proc.returncode, "stderr": err, "calls": calls, "rows": rows,
            "ls_rc": ls.returncode, "ls_err": ls.stderr}


def parse_log(path):
    calls = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) < 2:
                continue
            try:
                ts = float(parts[0].replace(",", "."))
            except ValueError:
                continue
            calls.append((ts, parts[1], parts[2].split() if len(parts) > 2 else []))
    calls.sort(key=lambda c: c[0])
    return calls


def squeue_ids(argv):
    """The job ids an ``squeue -j LIST`` asked about; None for an squeue without -j."""
    for i, a in enumerate(argv):
        if a in ("-j", "--jobs") and i + 1 < len(argv):
            return [x for x in argv[i + 1].split(",") if x]
        if a.startswith("--jobs="):
            return [x for x in a.split("=", 1)[1].split(",") if x]
    return None


def analyse(calls):
    counts = {c: 0 for c in SLURM_COMMANDS}
    submitted = ended = 0
    polls = 0
    other_squeue = 0
    sizes = []
    single_while_many = 0
    short_polls = 0  # asked about fewer jobs than were in flight (heuristic)
    poll_times = []
    last_submit = None
    early_after_submit = 0  # polls sooner than exp's shortest interval, right after a submission
    for ts, cmd, argv in calls:
        if cmd == "sbatch-done":  # exp has the job id from here on
            submitted += 1
            last_submit = ts
            continue
        counts[cmd] = counts.get(cmd, 0) + 1
        if cmd == "scontrol" and "job" in argv:
            ended += 1
        elif cmd == "squeue":
            ids = squeue_ids(argv)
            if ids is None:
                other_squeue += 1
                continue
            polls += 1
            if (poll_times and ts - poll_times[-1] < 0.9 * POLL_MIN and last_submit is not None
                    and ts - last_submit < 0.2):
                early_after_submit += 1
            poll_times.append(ts)
            sizes.append(len(ids))
            in_flight = submitted - ended
            if len(ids) == 1 and in_flight > 1:
                single_while_many += 1
            if len(ids) < in_flight:
                short_polls += 1
    gaps = [b - a for a, b in zip(poll_times, poll_times[1:])]
    return {"counts": counts, "polls": polls, "other_squeue": other_squeue, "sizes": sizes,
            "single_while_many": single_while_many, "early_after_submit": early_after_submit,
            "short_polls": short_polls, "gaps": gaps,
            "first": calls[0][0] if calls else None,
            "first_sbatch": next((c[0] for c in calls if c[1] == "sbatch"), None),
            "last_sbatch": next((c[0] for c in reversed(calls) if c[1] == "sbatch"), None),
            "last": calls[-1][0] if calls else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="experiments / jobs (default 200)")
    p.add_argument("--concurrency", type=int, default=20, help="max_concurrent_experiments (default 20)")
    p.add_argument("--repeat", type=int, default=1, help="measurements of each, interleaved; best counts")
    p.add_argument("--baseline-poll", type=float, default=0.5, help="seconds between the baseline's squeue calls")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each measurement")
    args = p.parse_args()
    n = args.jobs

    why = slurm_up()
    if why:
        sys.exit(f"SKIP: {why}")
    if wait_queue_empty():
        print(f"note: {queue_len()} jobs of others are in the queue; the figures include their effect")

    base_times, base_polls, exp_runs = [], [], []
    tmps = []
    try:
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            tmp = tempfile.mkdtemp(prefix="exp-bench-slurm-base-")
            tmps.append(tmp)
            dt, bp = run_baseline(tmp, n, args.baseline_poll, args.timeout)
            base_times.append(dt)
            base_polls.append(bp)
            wait_queue_empty()
            tmp = tempfile.mkdtemp(prefix="exp-bench-slurm-exp-")
            tmps.append(tmp)
            exp_runs.append(run_exp(tmp, n, args.concurrency, args.timeout))
            wait_queue_empty()
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)

    b = min(base_times)
    best = min(exp_runs, key=lambda r: r["wall"])
    a = analyse(best["calls"])
    counts = a["counts"]
    e = best["wall"]
    ratio = e / b
    sizes = a["sizes"]
    gaps = sorted(a["gaps"])

    print(f"{n} `true` jobs through Slurm, exp at concurrency {args.concurrency}, best of {args.repeat} "
          f"(Python {sys.version.split()[0]})")
    print(f"  baseline (bash: sbatch --wrap true x{n}, squeue every {args.baseline_poll:g} s until drained): "
          f"{b:.2f} s  ({b / n * 1000:.1f} ms per job; {base_polls[base_times.index(b)]} squeue polls)")
    print(f"  python exp.py run (backend slurm):  {e:.2f} s  ({e / n * 1000:.1f} ms per job)")
    if a["first_sbatch"] is not None:
        print(f"    exp start to first sbatch {a['first_sbatch'] - best['t0']:.2f} s; first to last sbatch "
              f"{a['last_sbatch'] - a['first_sbatch']:.2f} s; last sbatch to exp exit "
              f"{best['t0'] + e - a['last_sbatch']:.2f} s")
    print(f"  ratio exp / baseline: {ratio:.2f}x")
    total = sum(counts.values())
    print(f"  Slurm commands exp ran: {total} ({total / n:.2f} per job): "
          + ", ".join(f"{c} {counts.get(c, 0)}" for c in SLURM_COMMANDS))
    print(f"  polls (squeue -j): {a['polls']} for {n} jobs ({a['polls'] / n:.2f} per job); other squeue calls "
          f"(no -j): {a['other_squeue']}")
    if sizes:
        print(f"  job ids per poll: max {max(sizes)}, mean {sum(sizes) / len(sizes):.1f}, min {min(sizes)} "
              f"(concurrency {args.concurrency})")
    if gaps:
        print(f"  seconds between polls: median {gaps[len(gaps) // 2]:.2f}, max {gaps[-1]:.2f}; "
              f"{sum(g < 0.9 * POLL_MIN for g in gaps)} of {len(gaps)} sooner than {POLL_MIN:g} s (exp's shortest "
              f"interval), {a['early_after_submit']} of them within 0.2 s after an sbatch answered")
        floor = e / POLL_MIN
        print(f"  polls if one every {POLL_MIN:g} s throughout: about {floor:.0f}; exp made {a['polls']} "
              f"({a['polls'] / max(floor, 1):.2f}x)")
    print(f"  polls about one job while several were in flight: {a['single_while_many']}; polls about fewer "
          f"jobs than in flight (heuristic): {a['short_polls']}")
    rows = best["rows"]
    finished = sum(1 for r in rows if isinstance(r, dict) and r.get("status") == "finished")
    print(f"  exp exit code {best['rc']}; exp ls --json: {len(rows)} experiments, {finished} finished")
    if best["rc"] != 0:
        print("  exp stderr: " + best["stderr"][-1500:].replace("\n", "\n    "))
    if best["ls_rc"] != 0:
        print("  exp ls stderr: " + best["ls_err"][-1500:])

    checks = [
        (f"exp <= 1.5x baseline wall time ({ratio:.2f}x)", ratio <= 1.5),
        (f"one squeue per poll for all jobs: squeue calls {counts.get('squeue', 0)} < jobs {n}",
         counts.get("squeue", 0) < n),
        (f"no poll asked about a single job while several were in flight ({a['single_while_many']})",
         a["single_while_many"] == 0),
        (f"scontrol calls {counts.get('scontrol', 0)} <= jobs + 5 ({n + 5})", counts.get("scontrol", 0) <= n + 5),
        (f"sacct calls {counts.get('sacct', 0)} < jobs {n}", counts.get("sacct", 0) < n),
        (f"all {n} experiments finished (exit {best['rc']}, {finished} finished of {len(rows)} listed)",
         best["rc"] == 0 and finished == n and len(rows) == n),
    ]
    for text, ok in checks:
        print(f"target {text}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
