"""GPU allocation: the pool (nvidia-smi, CUDA_VISIBLE_DEVICES), reservations,
the no-starvation rule and the foreign-memory rule.

A fake ``nvidia-smi`` (a shell script put first on PATH) prints CSV rows from
a file the test controls, so memory use can change while a batch runs; it
also logs every call.  Experiments are a tiny recorder script that writes its
own ``CUDA_VISIBLE_DEVICES`` and start/end times (``time.time()``) to files,
so double booking is checked from what the children themselves saw.  Order is
forced with gate files the test creates, never with sleeps.  Planning rules
are tested on ``plan_next`` directly (pure).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import (EXP_PY, child_env, py_cmd, read_meta, read_state, run_exp, toml_text, try_state,  # noqa: E402
                      wait_for, write_script)

PY = sys.executable
CLI_TIMEOUT = 90
QUERY_ARGS = " ".join(exp.NVIDIA_SMI_QUERY[1:])

posix_batch = pytest.mark.skipif(
    os.name != "posix" or not sys.platform.startswith(("linux", "darwin")),
    reason="the scheduler runs commands in POSIX process groups",
)


# ============================================================================
# Helpers
# ============================================================================


def path_without_nvidia_smi() -> str:
    """This process's PATH less any directory holding a real nvidia-smi."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "nvidia-smi")))


def gpu_rows(n: int, used: dict[int, int] | None = None, total: int = 16000) -> list[tuple]:
    """``n`` GPUs: (index, uuid, memory.used, memory.total, utilization.gpu)."""
    used = used or {}
    return [(i, f"GPU-{i}aaaaaaa-bbbb-cccc-dddd-{i:012d}", used.get(i, 100), total, 5) for i in range(n)]


class FakeSmi:
    """A fake ``nvidia-smi`` in its own bin directory.

    It checks that it got exp's query, logs the call, and prints the rows
    last given to :meth:`set` (replaced atomically, so a call never sees half
    a file).  ``exit_code`` other than 0 makes it fail like a broken driver.
    """

    def __init__(self, root: Path, rows: list[tuple], exit_code: int = 0) -> None:
        self.bin = root / "fakebin"
        self.bin.mkdir(parents=True)
        self.csv = root / "smi.csv"
        self.calls_path = root / "smi.calls"
        self.set(rows)
        fail = (f'echo "NVIDIA-SMI has failed because it could not communicate with the driver"; exit {exit_code}'
                if exit_code else "")
        script = self.bin / "nvidia-smi"
        script.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            echo "$*" >> {shlex.quote(str(self.calls_path))}
            if [ "$*" != {shlex.quote(QUERY_ARGS)} ]; then
                echo "fake nvidia-smi: unexpected arguments: $*" >&2
                exit 64
            fi
            {fail}
            exec cat {shlex.quote(str(self.csv))}
            """), encoding="utf-8")
        script.chmod(0o755)

    def set(self, rows: list[tuple]) -> None:
        text = "".join(", ".join(str(c) for c in row) + "\n" for row in rows)
        tmp = self.csv.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.csv)

    def calls(self) -> list[str]:
        try:
            return self.calls_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    @property
    def path(self) -> str:
        return str(self.bin) + os.pathsep + path_without_nvidia_smi()

    def env(self, **overrides) -> dict[str, str]:
        """Environment for ``exp run``: the fake first on PATH, no CUDA_VISIBLE_DEVICES unless given."""
        return child_env(**{"PATH": self.path, "NO_COLOR": "1", "CUDA_VISIBLE_DEVICES": None, **overrides})


@pytest.fixture
def smi(tmp_path):
    """Make a FakeSmi: ``smi(rows, exit_code=0)``."""
    made = []

    def make(rows, exit_code=0):
        assert not made, "one fake nvidia-smi per test"
        made.append(FakeSmi(tmp_path, rows, exit_code))
        return made[0]

    return make


# The experiment: records what it saw at its start (CUDA_VISIBLE_DEVICES,
# time, the fake nvidia-smi's rows), then waits for its gate file
# <gates>/<name>.<repeat> (if a gate directory is given), sleeps HOLD seconds
# and records its end.
RECORDER_PY = """
import json, os, sys, time
out_dir, hold = sys.argv[1], float(sys.argv[2])
gates = sys.argv[3] if len(sys.argv) > 3 else ""
smi_csv = sys.argv[4] if len(sys.argv) > 4 else ""
name, rep = os.environ["EXPERIMENT_NAME"], os.environ["EXPERIMENT_REPEAT"]
rec = {"name": name, "repeat": int(rep), "run_id": os.environ["EXPERIMENT_RUN_ID"],
       "work_dir": os.environ["EXPERIMENT_WORK_DIR"], "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "start": time.time()}
if smi_csv:
    with open(smi_csv) as f:
        rec["smi_at_start"] = f.read()
key = os.path.join(out_dir, f"{name}.{rep}.{rec['run_id']}")

def dump(suffix):
    with open(key + suffix + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(key + suffix + ".tmp", key + suffix)

dump(".start")
if gates:
    gate = os.path.join(gates, f"{name}.{rep}")
    deadline = time.monotonic() + 120
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            sys.exit(5)
        time.sleep(0.02)
time.sleep(hold)
rec["end"] = time.time()
dump(".done")
"""


class Rig:
    """A batch directory: the recorder script, its output and gate directories, the config."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.script = write_script(tmp_path, "recorder.py", RECORDER_PY)
        self.out = tmp_path / "records"
        self.out.mkdir()
        self.gates = tmp_path / "gates"
        self.gates.mkdir()
        self.base = tmp_path / "results"
        self.config = tmp_path / "batch.toml"

    def cmd(self, hold: float = 0.0, gated: bool = False, smi_csv: Path | None = None) -> str:
        args: list[object] = [self.out, hold]
        if gated or smi_csv:
            args.append(self.gates if gated else "")
        if smi_csv:
            args.append(smi_csv)
        return py_cmd(self.script, *args)

    def write(self, scheduler: dict, experiments: list[dict]) -> Path:
        sched = {"base_experiment_dir": str(self.base), "check_interval": 0.1, "kill_timeout": 2, **scheduler}
        self.config.write_text(toml_text(sched, experiments), encoding="utf-8")
        return self.config

    def release(self, name: str, repeat: int = 1) -> None:
        (self.gates / f"{name}.{repeat}").touch()

    def started(self) -> list[dict]:
        return self._read(".start")

    def done(self) -> list[dict]:
        return self._read(".done")

    def started_names(self) -> set[str]:
        return {r["name"] for r in self.started()}

    def _read(self, suffix: str) -> list[dict]:
        out = []
        for p in sorted(self.out.iterdir()):
            if p.name.endswith(suffix):
                out.append(json.loads(p.read_text(encoding="utf-8")))
        return out

    def one(self, name: str) -> dict:
        recs = [r for r in self.done() if r["name"] == name]
        assert len(recs) == 1, (name, recs)
        return recs[0]

    def state(self) -> dict:
        return read_state(self.base)

    def try_state(self) -> dict | None:
        return try_state(self.base)


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def cli(*args, cwd, env, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_exp(*args, cwd=cwd, env=env, timeout=timeout)


@contextlib.contextmanager
def batch_in_background(rig: Rig, env: dict[str, str]):
    """``exp run`` in the background; on the way out it must have ended (else it is stopped)."""
    out = open(rig.root / "sched.out", "wb")
    proc = subprocess.Popen([PY, EXP_PY, "run", str(rig.config)], cwd=str(rig.root), env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # exp stops its runs (SIGKILL after kill_timeout)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()


def sched_output(rig: Rig) -> str:
    return (rig.root / "sched.out").read_text(encoding="utf-8", errors="replace")


def finish(proc: subprocess.Popen, rig: Rig, timeout: float = CLI_TIMEOUT) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"exp run did not end within {timeout}s; output:\n{sched_output(rig)}")


def gpus_of(rec: dict) -> list[int]:
    return [int(g) for g in rec["cvd"].split(",")] if rec.get("cvd") else []


def max_sharing(records: list[dict]) -> dict[int, int]:
    """For each GPU, the most experiments that held it at one moment (from their own timestamps)."""
    events = []
    for r in records:
        for g in gpus_of(r):
            events.append((r["start"], 1, g))
            events.append((r["end"], -1, g))
    events.sort(key=lambda e: (e[0], e[1]))  # at equal times an end comes before a start
    now: dict[int, int] = {}
    most: dict[int, int] = {}
    for _, delta, g in events:
        now[g] = now.get(g, 0) + delta
        most[g] = max(most.get(g, 0), now[g])
    return most


def parse(body: str) -> exp.BatchConfig:
    return exp.parse_config(textwrap.dedent(body), "gpus.toml", root=os.getcwd())


def jobs_of(body: str) -> list[exp.Job]:
    return exp.expand_jobs(parse(body))


def by_name(jobs: list[exp.Job]) -> dict[str, exp.Job]:
    return {j.name: j for j in jobs}


# ============================================================================
# nvidia-smi output and CUDA_VISIBLE_DEVICES (pure)
# ============================================================================


def test_parse_nvidia_smi_rows():
    text = ("0, GPU-aaaa, 100, 16000, 5\n"
            "\n"
            "1, GPU-bbbb, [N/A], 81920, [Not Supported]\n"
            "No devices were found\n"
            "  3 ,GPU-dddd,  2048 , 24576 , 97  \n")
    assert exp.parse_nvidia_smi(text) == [
        {"index": 0, "uuid": "GPU-aaaa", "memory_used": 100.0, "memory_total": 16000.0, "utilization": 5.0},
        {"index": 1, "uuid": "GPU-bbbb", "memory_used": None, "memory_total": 81920.0, "utilization": None},
        {"index": 3, "uuid": "GPU-dddd", "memory_used": 2048.0, "memory_total": 24576.0, "utilization": 97.0},
    ]
    assert exp.parse_nvidia_smi("") == []


def test_visible_gpus_follows_cuda_visible_devices():
    gpus = exp.parse_nvidia_smi("".join(", ".join(map(str, r)) + "\n" for r in gpu_rows(4)))
    idx = lambda cvd: [g["index"] for g in exp.visible_gpus(gpus, cvd)]  # noqa: E731
    assert idx(None) == [0, 1, 2, 3]
    assert idx("1,3") == [1, 3]
    assert idx(" 3 , 1 ") == [3, 1]  # CUDA's order, the one the variable gives
    assert idx("") == []
    assert idx(gpus[2]["uuid"]) == [2]
    assert idx("GPU-1aaa") == [1]  # a UUID prefix, as CUDA takes it
    assert idx("0,-1,2") == [0]  # CUDA ignores everything from the first invalid entry
    assert idx("1,7,2") == [1]


def test_detect_gpus_runs_the_query_once(tmp_path, smi, monkeypatch):
    fake = smi(gpu_rows(4, used={2: 9000}))
    monkeypatch.setenv("PATH", fake.path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = exp.detect_gpus()
    assert [g["index"] for g in found] == [0, 1, 2, 3]
    assert found[2]["memory_used"] == 9000.0 and found[2]["memory_total"] == 16000.0
    assert fake.calls() == [QUERY_ARGS]
    assert [g["index"] for g in exp.detect_gpus({"CUDA_VISIBLE_DEVICES": "1,3"})] == [1, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert [g["index"] for g in exp.detect_gpus()] == [2]


def test_no_or_broken_nvidia_smi_means_no_gpus(tmp_path, smi, monkeypatch):
    monkeypatch.setenv("PATH", path_without_nvidia_smi())
    assert exp.detect_gpus() is None
    settings = parse('[[experiments]]\nname = "a"\ncommand = "true"\n').scheduler
    assert exp.gpu_pool(settings) == []
    fake = smi(gpu_rows(2), exit_code=9)  # "NVIDIA-SMI has failed ..." with a driver gone
    monkeypatch.setenv("PATH", fake.path)
    assert exp.detect_gpus() is None
    assert exp.gpu_pool(settings) == []
    assert len(fake.calls()) == 2


def test_a_configured_pool_is_not_detected(tmp_path, smi, monkeypatch):
    fake = smi(gpu_rows(4))
    monkeypatch.setenv("PATH", fake.path)
    cfg = parse('[scheduler]\ngpus = [2, 0]\n[[experiments]]\nname = "a"\ncommand = "true"\n')
    assert exp.gpu_pool(cfg.scheduler) == [2, 0]
    assert fake.calls() == []
    cfg = parse('[[experiments]]\nname = "a"\ncommand = "true"\n')
    assert exp.gpu_pool(cfg.scheduler) == [0, 1, 2, 3]
    assert exp.gpu_pool(cfg.scheduler, detected=None) == []  # detected already: no GPUs
    assert len(fake.calls()) == 1


def test_check_gpu_requests():
    cfg = parse("""
        [[experiments]]
        name = "two"
        command = "true"
        gpus = 2
        [[experiments]]
        name = "exact"
        command = "true"
        gpu_ids = [1, 3]
        [[experiments]]
        name = "cpu"
        command = "true"
    """)
    exp.check_gpu_requests(cfg, [0, 1, 2, 3])
    exp.check_gpu_requests(cfg, [1, 3])
    with pytest.raises(exp.ConfigError) as info:
        exp.check_gpu_requests(cfg, [0, 1])
    lines = str(info.value).splitlines()
    assert lines[0] == "gpus.toml: 1 problem:"
    assert "experiments[1] (exact): gpu_ids [3] are not in the pool [0, 1]" in lines[1]
    with pytest.raises(exp.ConfigError) as info:
        exp.check_gpu_requests(cfg, [3])
    text = str(info.value)
    assert text.startswith("gpus.toml: 2 problems:")
    assert "experiments[0] (two): gpus = 2 is more than the pool [3] has" in text
    assert "experiments[1] (exact): gpu_ids [1] are not in the pool [3]" in text
    with pytest.raises(exp.ConfigError) as info:
        exp.check_gpu_requests(cfg, [])
    assert "nvidia-smi" in str(info.value)
    cpu_only = parse('[[experiments]]\nname = "cpu"\ncommand = "true"\n')
    exp.check_gpu_requests(cpu_only, [])


def gpu_problems(body: str) -> list[str]:
    with pytest.raises(exp.ConfigError) as info:
        parse(body)
    return [ln.strip() for ln in str(info.value).splitlines()[1:]]


def test_gpu_settings_that_contradict_themselves_are_config_errors():
    assert gpu_problems("""
        [scheduler]
        gpus = [1, 1]
        gpu_free_memory_mb = nan
        [[experiments]]
        name = "a"
        command = "true"
        gpus = 2
        gpu_ids = [1]
        [[experiments]]
        name = "b"
        command = "true"
        gpu_ids = "0,3,0"
    """) == [
        "scheduler.gpus: GPU 1 is listed more than once in [1, 1]",  # CUDA_VISIBLE_DEVICES=1,1 is one GPU
        "scheduler.gpu_free_memory_mb: expected a number of megabytes >= 0, got nan",  # not "seconds"
        "experiments[0]: gpus = 2 but gpu_ids = [1] names 1: give gpu_ids for exact GPUs, or gpus for any free ones",
        "experiments[1].gpu_ids: GPU 0 is listed more than once in '0,3,0'",
    ]
    with pytest.raises(exp.ConfigError, match="more than once"):
        exp.Experiment("x", "true", gpu_ids=[2, 2])
    same = parse('[[experiments]]\nname = "c"\ncommand = "true"\ngpus = 2\ngpu_ids = [0, 1]\n')
    assert same.experiments[0].gpu_ids == [0, 1]  # gpus agreeing with gpu_ids is fine


def test_an_experiment_asking_for_gpus_from_a_pool_set_empty_says_so():
    cfg = parse('[scheduler]\ngpus = []\n[[experiments]]\nname = "g"\ncommand = "true"\ngpus = 1\n')
    with pytest.raises(exp.ConfigError) as info:
        exp.check_gpu_requests(cfg, [])
    assert "gpus = 1 is more than the pool, empty ([scheduler] gpus = []) has" in str(info.value)
    assert "nvidia-smi" not in str(info.value)


# ============================================================================
# Planning: reservations and the no-starvation rule (pure plan_next)
# ============================================================================


def test_a_waiting_multi_gpu_job_keeps_the_free_gpu_from_lower_priority_ones():
    jobs = jobs_of("""
        [[experiments]]
        name = "big"
        command = "true"
        gpus = 2
        priority = 10
        [[experiments]]
        name = "small"
        command = "true"
        gpus = 1
        [[experiments]]
        name = "cpu"
        command = "true"
    """)
    assert [j.name for j in jobs] == ["big", "small", "cpu"]
    # GPU 1 is busy: "big" waits for it; "small" could start on GPU 0 but would delay "big".
    plan = exp.GpuPlan([0, 1], 1, in_use={1: 1})
    picked = exp.plan_next(jobs, running=1, limit=8, now=0.0, gpus=plan)
    assert [j.name for j in picked] == ["cpu"]  # a CPU-only job never delays a GPU one
    assert picked[0].gpus == []
    # Once both are free, "big" takes both and "small" still waits.
    picked = exp.plan_next(jobs, running=0, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1], 1))
    assert [(j.name, j.gpus) for j in picked] == [("big", [0, 1]), ("cpu", [])]


def test_a_lower_priority_job_may_use_gpus_outside_a_waiting_jobs_exact_ids():
    jobs = by_name(jobs_of("""
        [[experiments]]
        name = "exact"
        command = "true"
        gpu_ids = [0, 1]
        priority = 10
        [[experiments]]
        name = "any"
        command = "true"
        gpus = 1
        [[experiments]]
        name = "on0"
        command = "true"
        gpu_ids = [0]
        [[experiments]]
        name = "on2"
        command = "true"
        gpu_ids = [2]
        [[experiments]]
        name = "any2"
        command = "true"
        gpus = 2
    """))
    queue = [jobs[n] for n in ("exact", "any", "on0", "on2", "any2")]
    plan = exp.GpuPlan([0, 1, 2, 3], 1, in_use={1: 1})  # GPU 1 busy: "exact" waits for it
    picked = exp.plan_next(queue, running=1, limit=8, now=0.0, gpus=plan)
    # GPU 0 stays free for "exact"; 2 and 3 are outside its ids.  "any" takes GPU 2, so "on2"
    # finds it taken, and "any2" finds one GPU (3) where it needs two.
    assert [(j.name, j.gpus) for j in picked] == [("any", [2])]
    # Without "any", the exact-id job on GPU 2 starts; "on0" and "any2" wait.
    queue = [jobs[n] for n in ("exact", "on0", "on2", "any2")]
    picked = exp.plan_next(queue, running=1, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2, 3], 1, in_use={1: 1}))
    assert [(j.name, j.gpus) for j in picked] == [("on2", [2])]
    queue = [jobs[n] for n in ("exact", "any2")]
    picked = exp.plan_next(queue, running=1, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2, 3], 1, in_use={1: 1}))
    assert [(j.name, sorted(j.gpus)) for j in picked] == [("any2", [2, 3])]


def test_priority_wins_among_the_startable():
    jobs = jobs_of("""
        [[experiments]]
        name = "low"
        command = "true"
        gpus = 1
        [[experiments]]
        name = "high"
        command = "true"
        gpus = 1
        priority = 5
        [[experiments]]
        name = "low2"
        command = "true"
        gpus = 1
    """)
    assert [j.name for j in jobs] == ["high", "low", "low2"]
    picked = exp.plan_next(jobs, running=3, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2], 1, in_use={0: 1, 2: 1}))
    assert [(j.name, j.gpus) for j in picked] == [("high", [1])]
    picked = exp.plan_next(jobs, running=1, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2], 1, in_use={0: 1}))
    assert [(j.name, j.gpus) for j in picked] == [("high", [1]), ("low", [2])]  # file order among equals
    # The slot limit cuts the plan in dispatch order.
    picked = exp.plan_next(jobs, running=7, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2], 1))
    assert [j.name for j in picked] == ["high"]
    assert exp.plan_next(jobs, running=8, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1, 2], 1)) == []


def test_jobs_blocked_by_a_delay_or_a_dependency_reserve_nothing():
    jobs = by_name(jobs_of("""
        [[experiments]]
        name = "prep"
        command = "true"
        [[experiments]]
        name = "after_prep"
        command = "true"
        gpus = 2
        priority = 10
        depends_on = ["prep"]
        [[experiments]]
        name = "delayed"
        command = "true"
        gpus = 2
        priority = 9
        delay_seconds = 60
        [[experiments]]
        name = "small"
        command = "true"
        gpus = 1
    """))
    queue = [jobs["after_prep"], jobs["delayed"], jobs["small"]]
    for j in queue:
        j.not_before = 60.0 if j.name == "delayed" else 0.0
    picked = exp.plan_next(queue, running=1, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1], 1, in_use={1: 1}))
    assert [(j.name, j.gpus) for j in picked] == [("small", [0])]
    # "prep" succeeded: "after_prep" now waits for GPU 1, and keeps GPU 0 free for itself.
    picked = exp.plan_next(queue, running=1, limit=8, now=0.0, gpus=exp.GpuPlan([0, 1], 1, in_use={1: 1}),
                           succeeded=[jobs["prep"].id])
    assert picked == []


def test_shared_gpus_least_loaded_first_and_unusable_ones_skipped():
    jobs = jobs_of("""
        [[experiments]]
        name = "a"
        command = "true"
        gpus = 1
        repeats = 4
    """)
    plan = exp.GpuPlan([0, 1, 2], jobs_per_gpu=2, in_use={0: 1}, unusable=[2])
    assert plan.free == {0: 1, 1: 2, 2: 0}
    picked = exp.plan_next(jobs, running=1, limit=8, now=0.0, gpus=plan)
    # GPU 1 has the most room, then 0 and 1 tie (pool order); GPU 2 is someone else's.
    assert [j.gpus for j in picked] == [[1], [0], [1]]
    assert plan.free == {0: 1, 1: 2, 2: 0}  # the plan itself is not consumed


def test_a_pool_of_none_runs_cpu_jobs_only():
    jobs = jobs_of("""
        [[experiments]]
        name = "gpu"
        command = "true"
        gpus = 1
        [[experiments]]
        name = "cpu"
        command = "true"
    """)
    assert [j.name for j in exp.plan_next(jobs, 0, 4, 0.0, None)] == ["cpu"]


# ============================================================================
# End to end with a fake nvidia-smi
# ============================================================================


@posix_batch
def test_no_gpu_is_double_booked_in_a_pool_of_4(rig, smi):
    fake = smi(gpu_rows(4))
    c = rig.cmd(hold=0.15)
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "one", "command": c, "gpus": 1, "repeats": 5},
        {"name": "two", "command": c, "gpus": 2, "repeats": 3, "priority": 1},
        {"name": "ids12", "command": c, "gpu_ids": [1, 2], "repeats": 2},
        {"name": "id3", "command": c, "gpu_ids": [3], "repeats": 2, "priority": 2},
        {"name": "cpu", "command": c, "repeats": 2},
    ])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(fake.calls()) == 1  # detected once, at the start, not per launch
    recs = rig.done()
    assert len(recs) == 14
    assert all(v <= 1 for v in max_sharing(recs).values()), max_sharing(recs)
    for rec in recs:
        gpus = gpus_of(rec)
        want = {"one": 1, "two": 2, "ids12": 2, "id3": 1, "cpu": 0}[rec["name"]]
        assert len(gpus) == want == len(set(gpus)), rec
        assert set(gpus) <= {0, 1, 2, 3}
        if rec["name"] == "ids12":
            assert gpus == [1, 2]
        if rec["name"] == "id3":
            assert gpus == [3]
        if rec["name"] == "cpu":
            assert rec["cvd"] is None  # a CPU-only experiment is given no GPU
        # metadata.json and the state file record the same GPUs.
        assert read_meta(rec["work_dir"])["gpu_ids"] == (gpus or None), rec
    state = rig.state()
    assert state["summary"]["gpus"] == [0, 1, 2, 3]
    assert state["summary"]["gpu_use"] == {"0": 0, "1": 0, "2": 0, "3": 0}
    assigned = {item["work_dir"]: item["assigned_gpus"] for item in state["finished"]}
    assert len(assigned) == 14 and not state["errors"]
    for rec in recs:
        assert assigned[rec["work_dir"]] == gpus_of(rec), rec


@posix_batch
def test_jobs_per_gpu_2_shares_each_gpu_between_two_at_most(rig, smi):
    fake = smi(gpu_rows(2))
    c = rig.cmd(hold=0.05, gated=True)
    rig.write({"max_concurrent_experiments": 8, "jobs_per_gpu": 2}, [
        {"name": "w", "command": c, "gpus": 1, "repeats": 5},
    ])
    with batch_in_background(rig, fake.env()) as proc:
        # Four fit (two per GPU); the fifth waits although slots are free.
        wait_for(lambda: len(rig.started()) >= 4, 60, what="four experiments to start")
        state = wait_for(lambda: (s := rig.try_state()) and len(s["running"]) == 4 and s, 30,
                         what="the state file to show four running")
        assert [item["repeat"] for item in state["pending"]] == [5]
        assert state["summary"]["gpu_use"] == {"0": 2, "1": 2}
        first = rig.started()
        assert sorted(gpus_of(r)[0] for r in first) == [0, 0, 1, 1]
        assert len(first) == 4
        # One on GPU 1 ends: the fifth gets GPU 1.
        leaving = next(r for r in first if gpus_of(r) == [1])
        rig.release("w", leaving["repeat"])
        wait_for(lambda: any(r["repeat"] == 5 for r in rig.started()), 60, what="the fifth to start")
        fifth = next(r for r in rig.started() if r["repeat"] == 5)
        assert gpus_of(fifth) == [1]
        for rep in range(1, 6):
            rig.release("w", rep)
        assert finish(proc, rig) == 0, sched_output(rig)
    recs = rig.done()
    assert len(recs) == 5
    assert max_sharing(recs) == {0: 2, 1: 2}


@posix_batch
def test_mixed_requests_with_jobs_per_gpu_2_never_exceed_two(rig, smi):
    fake = smi(gpu_rows(2))
    c = rig.cmd(hold=0.1)
    rig.write({"max_concurrent_experiments": 6, "jobs_per_gpu": 2}, [
        {"name": "one", "command": c, "gpus": 1, "repeats": 6},
        {"name": "both", "command": c, "gpus": 2, "repeats": 2},
        {"name": "on0", "command": c, "gpu_ids": [0], "repeats": 2},
    ])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 0, r.stdout + r.stderr
    recs = rig.done()
    assert len(recs) == 10
    assert all(v <= 2 for v in max_sharing(recs).values()), max_sharing(recs)
    assert {tuple(sorted(gpus_of(x))) for x in recs if x["name"] == "both"} == {(0, 1)}
    assert {tuple(gpus_of(x)) for x in recs if x["name"] == "on0"} == {(0,)}


@posix_batch
def test_exact_ids_are_waited_for(rig, smi):
    fake = smi(gpu_rows(2))
    gated = rig.cmd(gated=True)
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "holder", "command": gated, "gpu_ids": [1], "priority": 3},
        {"name": "exact", "command": gated, "gpu_ids": [1], "priority": 2},
        {"name": "any", "command": gated, "gpus": 1, "priority": 1},
    ])
    with batch_in_background(rig, fake.env()) as proc:
        wait_for(lambda: {"holder", "any"} <= rig.started_names(), 60, what="holder and any to start")
        state = wait_for(lambda: (s := rig.try_state()) and len(s["running"]) == 2 and s, 30,
                         what="the state file to show two running")
        # "exact" waits for GPU 1; "any", behind it, was free to take GPU 0 (outside its ids).
        assert [item["name"] for item in state["pending"]] == ["exact"]
        assert "exact" not in rig.started_names()
        assert {item["name"]: item["assigned_gpus"] for item in state["running"]} == {"holder": [1], "any": [0]}
        rig.release("any")
        wait_for(lambda: "any" in {r["name"] for r in rig.done()}, 60, what="any to end")
        # GPU 0 is free now, but "exact" wants GPU 1 and nothing else.
        state = wait_for(lambda: (s := rig.try_state()) and [i["name"] for i in s["finished"]] == ["any"] and s,
                         30, what="the state file to show any finished")
        assert [i["name"] for i in state["running"]] == ["holder"]
        assert [i["name"] for i in state["pending"]] == ["exact"]
        assert "exact" not in rig.started_names()
        rig.release("holder")
        wait_for(lambda: "exact" in rig.started_names(), 60, what="exact to start")
        rig.release("exact")
        assert finish(proc, rig) == 0, sched_output(rig)
    holder, exact_ = rig.one("holder"), rig.one("exact")
    assert gpus_of(exact_) == [1] and gpus_of(holder) == [1]
    assert exact_["start"] > holder["end"]
    assert read_meta(exact_["work_dir"])["gpu_ids"] == [1]


@posix_batch
def test_no_starvation_end_to_end(rig, smi):
    """A 2-GPU job waiting for a busy GPU keeps the free one from lower-priority 1-GPU jobs."""
    fake = smi(gpu_rows(2))
    gated = rig.cmd(gated=True)
    quick = rig.cmd(hold=0.05)
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "small", "command": quick, "gpus": 1, "repeats": 2},
        {"name": "big", "command": quick, "gpus": 2, "priority": 5},
        {"name": "holder", "command": gated, "gpus": 1, "priority": 9},
        {"name": "cpu", "command": quick},
    ])
    with batch_in_background(rig, fake.env()) as proc:
        wait_for(lambda: "holder" in rig.started_names(), 60, what="holder to start")
        state = wait_for(lambda: (s := rig.try_state()) and s["running"] and s, 30,
                         what="the state file to show holder running")
        # Launched together with holder (one plan) would be anything else startable: only "cpu" is.
        assert {item["name"] for item in state["running"]} <= {"holder", "cpu"}
        wait_for(lambda: "cpu" in {r["name"] for r in rig.done()}, 60, what="cpu to end")
        state = wait_for(lambda: (s := rig.try_state()) and any(i["name"] == "cpu" for i in s["finished"]) and s,
                         30, what="the state file to show cpu finished")
        assert [item["name"] for item in state["running"]] == ["holder"]
        assert [item["name"] for item in state["pending"]] == ["big", "small", "small"]
        assert not {"big", "small"} & rig.started_names()
        rig.release("holder")
        assert finish(proc, rig) == 0, sched_output(rig)
    holder, big = rig.one("holder"), rig.one("big")
    smalls = [r for r in rig.done() if r["name"] == "small"]
    assert len(smalls) == 2
    assert sorted(gpus_of(big)) == [0, 1]
    assert big["start"] > holder["end"]
    assert all(s["start"] > big["end"] for s in smalls)


@posix_batch
def test_cuda_visible_devices_restricts_the_detected_pool(rig, smi):
    fake = smi(gpu_rows(4))
    c = rig.cmd(hold=0.05)
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "one", "command": c, "gpus": 1, "repeats": 4},
        {"name": "two", "command": c, "gpus": 2},
    ])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env(CUDA_VISIBLE_DEVICES="1,3"))
    assert r.returncode == 0, r.stdout + r.stderr
    recs = rig.done()
    assert len(recs) == 5
    assert all(set(gpus_of(x)) <= {1, 3} for x in recs), [x["cvd"] for x in recs]
    assert sorted(gpus_of(rig.one("two"))) == [1, 3]
    assert all(v <= 1 for v in max_sharing(recs).values())
    assert rig.state()["summary"]["gpus"] == [1, 3]
    # An id outside the visible ones is a config error, before anything starts.
    rig.write({}, [{"name": "zero", "command": c, "gpu_ids": [0]}])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env(CUDA_VISIBLE_DEVICES="1,3"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "gpu_ids [0] are not in the pool [1, 3]" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(rig.done()) == 5


@posix_batch
def test_without_nvidia_smi_cpu_experiments_run_and_gpu_ones_are_config_errors(rig):
    env = child_env(PATH=path_without_nvidia_smi(), NO_COLOR="1", CUDA_VISIBLE_DEVICES=None)
    c = rig.cmd()
    rig.write({"max_concurrent_experiments": 2}, [{"name": "cpu", "command": c, "repeats": 2}])
    r = cli("run", rig.config, cwd=rig.root, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(rig.done()) == 2
    assert all(x["cvd"] is None for x in rig.done())
    assert rig.state()["summary"]["gpus"] == []
    for how in ({"gpus": 1}, {"gpu_ids": [0]}):
        rig.write({}, [{"name": "cpu2", "command": c}, {"name": "needs_gpu", "command": c, **how}])
        for args in (("run", rig.config), ("run", "--dry-run", rig.config)):
            r = cli(*args, cwd=rig.root, env=env)
            assert r.returncode == 2, (how, r.stdout, r.stderr)
            assert r.stderr.startswith("exp: error: "), r.stderr
            assert "experiments[1] (needs_gpu)" in r.stderr and "nvidia-smi" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and r.stdout == ""
    assert "cpu2" not in {x["name"] for x in rig.done()}  # nothing started


@posix_batch
def test_a_failing_nvidia_smi_is_no_gpus(rig, smi):
    fake = smi(gpu_rows(2), exit_code=9)
    rig.write({}, [{"name": "cpu", "command": rig.cmd()}])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert rig.state()["summary"]["gpus"] == []
    rig.write({}, [{"name": "g", "command": rig.cmd(), "gpus": 1}])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 2 and "gpus = 1 is more than" in r.stderr, r.stderr


@posix_batch
def test_asking_for_more_than_the_pool_or_ids_outside_it_is_exit_2(rig, smi):
    fake = smi(gpu_rows(2))
    c = rig.cmd()
    rig.write({}, [
        {"name": "ok", "command": c, "gpus": 2},
        {"name": "three", "command": c, "gpus": 3},
        {"name": "outside", "command": c, "gpu_ids": [1, 2]},
    ])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln.strip() for ln in r.stderr.splitlines()]
    assert lines[0] == f"exp: error: {rig.config}: 2 problems:", r.stderr
    assert any(ln.startswith("experiments[1] (three): gpus = 3 is more than the pool [0, 1] has") for ln in lines)
    assert any(ln.startswith("experiments[2] (outside): gpu_ids [2] are not in the pool [0, 1]") for ln in lines)
    assert not rig.base.exists() and rig.done() == []
    # A configured pool is the pool, whatever nvidia-smi says.
    rig.write({"gpus": [0]}, [{"name": "ok", "command": c, "gpus": 2}])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 2 and "gpus = 2 is more than the pool [0] has" in r.stderr, r.stderr
    # In-process too: the Scheduler checks the pool it is given.
    cfg = exp.load_config(rig.config)
    with pytest.raises(exp.ConfigError, match=r"more than the pool \[0\]"):
        exp.Scheduler(cfg, gpus=[0])


@posix_batch
def test_a_configured_pool_needs_no_nvidia_smi(rig):
    env = child_env(PATH=path_without_nvidia_smi(), NO_COLOR="1", CUDA_VISIBLE_DEVICES=None)
    c = rig.cmd(hold=0.05)
    rig.write({"gpus": [5, 7], "max_concurrent_experiments": 3}, [
        {"name": "one", "command": c, "gpus": 1, "repeats": 3},
        {"name": "seven", "command": c, "gpu_ids": [7]},
    ])
    r = cli("run", rig.config, cwd=rig.root, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = rig.done()
    assert all(set(gpus_of(x)) <= {5, 7} and len(gpus_of(x)) == 1 for x in recs)
    assert all(v <= 1 for v in max_sharing(recs).values())


# ============================================================================
# Foreign memory: gpu_free_memory_mb
# ============================================================================


@posix_batch
def test_a_gpu_used_by_others_is_busy_until_its_memory_is_freed(rig, smi):
    fake = smi(gpu_rows(2, used={0: 15500}))  # 500 MB free on GPU 0: someone else is on it
    gated = rig.cmd(gated=True, smi_csv=rig.root / "smi.csv")
    rig.write({"max_concurrent_experiments": 4, "gpu_free_memory_mb": 1000, "check_interval": 0.05}, [
        {"name": "first", "command": gated, "gpus": 1, "priority": 1},
        {"name": "second", "command": gated, "gpus": 1},
    ])
    with batch_in_background(rig, fake.env()) as proc:
        wait_for(lambda: "first" in rig.started_names(), 60, what="first to start")
        first = next(r for r in rig.started() if r["name"] == "first")
        assert gpus_of(first) == [1]
        # exp keeps asking nvidia-smi while "second" waits; GPU 0 stays someone else's.
        seen = len(fake.calls())
        wait_for(lambda: len(fake.calls()) >= seen + 3, 60, what="nvidia-smi to be asked again")
        assert "second" not in rig.started_names()
        # The state file catches up within its write interval (longer on a loaded machine).
        wait_for(lambda: (s := rig.try_state()) and [i["name"] for i in s["pending"]] == ["second"], 30,
                 what="the state file to show only second pending")
        assert "second" not in rig.started_names()
        # The other user leaves: GPU 0 is used again.
        fake.set(gpu_rows(2))
        wait_for(lambda: "second" in rig.started_names(), 60, what="second to start on GPU 0")
        second = next(r for r in rig.started() if r["name"] == "second")
        assert gpus_of(second) == [0]
        assert "15500" not in second["smi_at_start"]  # it started after the memory was freed
        rig.release("first")
        rig.release("second")
        assert finish(proc, rig) == 0, sched_output(rig)
    assert read_meta(second["work_dir"])["gpu_ids"] == [0]


@posix_batch
def test_memory_on_a_gpu_exp_already_uses_is_taken_as_its_own(rig, smi):
    fake = smi(gpu_rows(1))
    gated = rig.cmd(gated=True, smi_csv=rig.root / "smi.csv")
    rig.write({"max_concurrent_experiments": 3, "jobs_per_gpu": 2, "gpu_free_memory_mb": 1000,
               "check_interval": 0.05}, [
        {"name": "first", "command": gated, "gpus": 1, "priority": 1},
        {"name": "opener", "command": gated},
        {"name": "second", "command": gated, "gpus": 1, "depends_on": ["opener"]},
    ])
    with batch_in_background(rig, fake.env()) as proc:
        wait_for(lambda: {"first", "opener"} <= rig.started_names(), 60, what="first and opener to start")
        fake.set(gpu_rows(1, used={0: 15900}))  # "first" itself fills GPU 0
        rig.release("opener")  # now "second" may start, and nvidia-smi says GPU 0 is full
        wait_for(lambda: "second" in rig.started_names(), 60, what="second to share GPU 0")
        second = next(r for r in rig.started() if r["name"] == "second")
        assert "15900" in second["smi_at_start"]
        assert gpus_of(second) == [0]
        rig.release("first")
        rig.release("second")
        assert finish(proc, rig) == 0, sched_output(rig)


@posix_batch
def test_without_gpu_free_memory_mb_nvidia_smi_is_asked_once(rig, smi):
    fake = smi(gpu_rows(1, used={0: 15900}))
    c = rig.cmd()
    rig.write({"max_concurrent_experiments": 1}, [{"name": "a", "command": c, "gpus": 1, "repeats": 3}])
    r = cli("run", rig.config, cwd=rig.root, env=fake.env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(rig.done()) == 3  # a full GPU is still used: the memory rule is opt-in
    assert len(fake.calls()) == 1
