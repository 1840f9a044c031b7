"""Queue control of a live scheduler: ``exp status``, ``kill``, ``retry``, ``rm``,
``shutdown``, ``priority``, command files, a second ``exp run`` joining the
queue, and the lock that says which scheduler owns a base directory.

Every test starts ``python exp.py run config.toml`` as a real background
process and steers it with the real CLI (or, for the command-file tests,
with files written into ``<base>/.exp_state/commands/``).  Experiments are
shell one-liners that say when they start and then wait for a marker file,
so a test decides when each one ends.  Nothing inside exp is mocked.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import EXP_PY, child_env, exp_dirs, pid_gone, run_exp, try_state, wait_for  # noqa: E402
from conftest import write_batch as write_config  # noqa: E402  (a batch file whose experiments go to BASE)
from conftest import read_meta as meta  # noqa: E402

PY = sys.executable
CLI_TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    os.name != "posix" or exp.fcntl is None or not sys.platform.startswith(("linux", "darwin")),
    reason="the scheduler runs commands in POSIX process groups and owns its directory with flock",
)


# ============================================================================
# Helpers
# ============================================================================


class Marks:
    """Marker files of the tests' experiments, under ``<tmp>/marks``.

    ``hold(name)`` is a command that writes ``<name>.started`` (its run id and
    CUDA_VISIBLE_DEVICES), appends its name to ``order``, waits (at most about
    a minute) until ``<name>.go`` exists, and exits with ``code``.
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / "marks"
        self.dir.mkdir()

    def path(self, name: str) -> Path:
        return self.dir / name

    def hold(self, name: str, code: int = 0) -> str:
        d = str(self.dir)
        return (f'echo "$EXPERIMENT_RUN_ID $CUDA_VISIBLE_DEVICES" > "{d}/{name}.started"; '
                f'echo {name} >> "{d}/order"; '
                f'i=0; while [ ! -e "{d}/{name}.go" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; '
                f"exit {code}")

    def quick(self, name: str, code: int = 0) -> str:
        """A command that only notes that it ran (appends to ``order``) and exits."""
        return f'echo {name} >> "{self.dir}/order"; exit {code}'

    def release(self, *names: str) -> None:
        for n in names:
            (self.dir / f"{n}.go").touch()

    def started(self, name: str) -> bool:
        return (self.dir / f"{name}.started").exists()

    def wait_started(self, *names: str, sched: Sched | None = None, timeout: float = 30) -> None:
        """Wait until the experiments have started; fail early (with its output) if ``sched`` exits."""
        for n in names:
            deadline = time.monotonic() + timeout
            while not self.started(n):
                if sched is not None and not sched.alive():
                    pytest.fail(f"the scheduler exited ({sched.proc.returncode}) before {n} started; "
                                f"stdout:\n{sched.stdout()}\nstderr:\n{sched.stderr()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out after {timeout}s waiting for experiment {n} to start"
                                + (f"; scheduler stdout:\n{sched.stdout()}\nstderr:\n{sched.stderr()}"
                                   if sched is not None else ""))
                time.sleep(0.01)

    def order(self) -> list[str]:
        try:
            return (self.dir / "order").read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return []


class Sched:
    """``exp.py run CONFIG`` in the background, its output going to files."""

    count = 0

    def __init__(self, config, tmp_path, *args: str, env=None) -> None:
        Sched.count += 1
        n = Sched.count
        self.out_path = Path(tmp_path) / f"sched{n}.stdout"
        self.err_path = Path(tmp_path) / f"sched{n}.stderr"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [PY, EXP_PY, "run", str(config), *args], cwd=str(tmp_path), env=env or child_env(NO_COLOR="1"),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the scheduler did not exit within {timeout}s; stdout:\n{self.stdout()}")
        self._close()
        return code

    def _close(self) -> None:
        self._out.close()
        self._err.close()

    def stop(self) -> None:
        """Teardown: SIGTERM (it stops its experiments), SIGKILL if that is not enough."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()


@pytest.fixture
def start(tmp_path, kill_groups_later):
    """``start(config, *args)`` starts a scheduler; every one is stopped after the test.

    The process groups of experiments it ran (from the state file) are
    SIGKILLed afterwards too, in case a test left one behind.
    """
    started: list[tuple[Sched, Path]] = []

    def make(config, *args: str, env=None) -> Sched:
        s = Sched(config, tmp_path, *args, env=env)
        started.append((s, Path(config)))
        return s

    yield make
    for s, config in started:
        base = exp.load_config(config).base_experiment_dir
        state = try_state(base) or {}
        kill_groups_later.extend(i["pid"] for i in state.get("running") or [] if i.get("pid"))
        s.stop()


@pytest.fixture
def marks(tmp_path):
    return Marks(tmp_path)


def cli(*args, cwd, timeout=CLI_TIMEOUT, env=None) -> subprocess.CompletedProcess:
    return run_exp(*args, cwd=cwd, env=env or child_env(NO_COLOR="1"), timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI call that must have exited 0 without a traceback."""
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def refused(r: subprocess.CompletedProcess) -> str:
    """The stdout of a CLI call the scheduler refused (exit 1, saying why), without a traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def task(base, tid):
    """The state file's entry of task ``tid`` and the group it is in (None, None if absent)."""
    state = try_state(base) or {}
    for group in ("pending", "running", "finished", "errors"):
        for item in state.get(group) or []:
            if item.get("id") == tid:
                return group, item
    return None, None


def wait_task(base, tid, group, timeout=30, **fields):
    """Wait until task ``tid`` is in ``group`` with the given field values; return its entry."""
    def check():
        g, item = task(base, tid)
        return item if g == group and all(item.get(k) == v for k, v in fields.items()) else None
    return wait_for(check, timeout, what=f"task {tid} in {group} with {fields}")


def ids_in_state(base) -> set[int]:
    state = try_state(base) or {}
    return {i["id"] for g in ("pending", "running", "finished", "errors") for i in state.get(g) or []}


def wait_owned(base, sched: Sched, timeout=30) -> None:
    st = exp.StateFile(base)
    wait_for(lambda: st.owned() or not sched.alive(), timeout, what="the scheduler to own its directory")
    assert sched.alive(), (sched.stdout(), sched.stderr())


def holder_scheduler(tmp_path, start, marks) -> tuple[Path, Sched]:
    """A scheduler for ``tmp_path/results`` that runs one held experiment, "holder", and owns the directory."""
    base = tmp_path / "results"
    s = start(write_config(tmp_path / "c.toml", base, [{"name": "holder", "command": marks.hold("holder")}]))
    marks.wait_started("holder", sched=s)
    wait_owned(base, s)
    return base, s


def status_json(base, cwd) -> dict:
    return json.loads(ok(cli("status", base, "--json", cwd=cwd)))


def post_raw(base, name: str, data: bytes) -> Path:
    """Write a command file by hand, atomically (a temp name that is not *.json, then a rename)."""
    d = Path(base) / ".exp_state" / "commands"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (name + ".writing")
    tmp.write_bytes(data)
    os.replace(tmp, d / name)
    return d / name


# ============================================================================
# status
# ============================================================================


def test_status_table_and_json_while_running_and_after(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "bad", "command": marks.quick("bad", 3), "priority": 9},
        {"name": "gpu_job", "command": marks.hold("gpu_job"), "gpus": 1, "priority": 5},
        {"name": "waiting", "command": marks.hold("waiting"), "gpus": 2},
    ], max_concurrent_experiments=2, gpus=[0, 1])
    s = start(cfg)
    marks.wait_started("gpu_job", sched=s)
    wait_task(base, 1, "errors")
    wait_task(base, 2, "running")

    data = status_json(base, tmp_path)
    sched = data["scheduler"]
    assert sched["alive"] is True
    assert sched["pid"] == s.pid
    assert sched["host"] == os.uname().nodename
    tasks = {t["name"]: t for t in data["tasks"]}
    assert set(tasks) == {"bad", "gpu_job", "waiting"}
    assert tasks["gpu_job"]["status"] == "running" and tasks["gpu_job"]["id"] == 2
    assert tasks["gpu_job"]["assigned_gpus"] and len(tasks["gpu_job"]["assigned_gpus"]) == 1
    assert tasks["gpu_job"]["attempt"] == 1
    assert tasks["gpu_job"]["elapsed"] != "-"
    assert tasks["waiting"]["status"] == "pending" and tasks["waiting"]["elapsed"] == "-"
    assert tasks["waiting"]["gpus"] == 2  # waits: one GPU is busy
    assert tasks["bad"]["status"] == "error" and tasks["bad"]["reason"] == "exit code 3"
    for t in data["tasks"]:
        assert {"id", "name", "status", "attempt", "elapsed", "reason", "assigned_gpus"} <= set(t)

    out = ok(cli("status", base, cwd=tmp_path))
    first, header = out.splitlines()[:2]
    assert f"pid {s.pid}" in first and os.uname().nodename in first and "alive" in first
    assert header.split() == ["id", "name", "status", "GPUs", "attempt", "elapsed", "reason"]
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines()[2:] if len(ln.split()) > 2}
    gpu = str(tasks["gpu_job"]["assigned_gpus"][0])
    assert marks.path("gpu_job.started").read_text().split() == ["run_0001", gpu]  # its CUDA_VISIBLE_DEVICES
    assert rows["gpu_job"][:5] == ["2", "gpu_job", "running", gpu, "1"]
    assert rows["waiting"][:5] == ["3", "waiting", "pending", "-", "0"]
    assert rows["bad"][2] == "error" and "exit code 3" in " ".join(rows["bad"])

    # The default directory is ./results.
    assert ok(cli("status", cwd=tmp_path)).splitlines()[0] == first

    marks.release("gpu_job", "waiting")
    assert s.wait() == 1  # "bad" failed
    after = status_json(base, tmp_path)
    assert after["scheduler"]["alive"] is False
    assert after["scheduler"]["pid"] == s.pid
    assert {t["name"]: t["status"] for t in after["tasks"]} == {
        "bad": "error", "gpu_job": "finished", "waiting": "finished"}
    out = ok(cli("status", base, cwd=tmp_path))
    assert "not running" in out.splitlines()[0]


def test_status_of_a_directory_no_scheduler_has_used(tmp_path):
    out = ok(cli("status", tmp_path / "nothing", cwd=tmp_path))
    assert "no scheduler has run" in out
    data = json.loads(ok(cli("status", tmp_path / "nothing", "--json", cwd=tmp_path)))
    assert data["scheduler"]["alive"] is False and data["tasks"] == []


def test_status_shows_an_ended_tasks_measured_duration_not_its_whole_second_times(tmp_path, capsys):
    base = tmp_path / "b"
    (base / ".exp_state").mkdir(parents=True)
    (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps({"finished": [
        {"id": 1, "name": "a", "status": "finished", "started_at": "2026-01-01T00:00:00+00:00",
         "ended_at": "2026-01-01T00:00:02+00:00", "duration": 1.368},
        {"id": 2, "name": "b", "status": "finished", "started_at": "2026-01-01T00:00:05+00:00",
         "ended_at": "2026-01-01T00:00:06+00:00", "duration": 0.0}]}))
    assert exp.main(["status", str(base), "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert [t["elapsed"] for t in tasks] == [exp.format_duration(1.368), exp.format_duration(0.0)]


ODD_VALUES = [5, "x", None, True, 1.5, [], {}, [1, "a"], {"a": 1}, -1, [None], [{}], "9999-99-99"]
TASK_FIELDS = ["id", "name", "status", "assigned_gpus", "gpu_ids", "attempt", "reason", "job", "started_at",
               "ended_at", "duration", "work_dir", "run_id", "pid", "exit_code", "params", "command"]


def test_status_survives_a_state_file_with_wrong_types(tmp_path, capsys):
    # `status` once crashed on {"pending": 5} or a task whose assigned_gpus was 5 (a hand-edited
    # or foreign file): each such field is shown as nothing, never a traceback.
    import random

    rng = random.Random(7)
    states = [{"pending": 5}, {"running": [{"id": 1, "name": "z", "status": "running", "assigned_gpus": 5}]},
              {"summary": [], "finished": "abc"}, {"running": True, "summary": {"pid": [], "gpus": 3}}]
    for _ in range(60):
        st = {}
        for g in ("running", "pending", "errors", "finished"):
            st[g] = rng.choice(ODD_VALUES) if rng.random() < 0.2 else [
                dict({"id": 1, "name": "a", "status": "running"},
                     **{f: rng.choice(ODD_VALUES) for f in rng.sample(TASK_FIELDS, 3)})
                for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.4:
            st["summary"] = rng.choice(ODD_VALUES + [{k: rng.choice(ODD_VALUES) for k in
                                                      ("pid", "host", "started_at", "gpus", "status_indicator")}])
        states.append(st)
    for i, st in enumerate(states):
        base = tmp_path / f"b{i}"
        (base / ".exp_state").mkdir(parents=True)
        (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps(st))
        for extra in ([], ["--json"]):
            assert exp.main(["status", str(base), *extra]) == 0, st
            out = capsys.readouterr().out
            if extra:
                json.loads(out)  # strict JSON still
    r = run_exp("status", tmp_path / "b1")  # as a user runs it
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"^1\s+z\s+running\s+-", r.stdout, re.M), r.stdout


# ============================================================================
# kill, retry, rm
# ============================================================================


def test_kill_a_running_task_and_a_pending_one(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "runner", "command": marks.hold("runner")},
        {"name": "queued", "command": marks.hold("queued")},
        {"name": "last", "command": marks.quick("last")},
    ])
    s = start(cfg)
    marks.wait_started("runner", sched=s)
    pid = wait_task(base, 1, "running")["pid"]
    assert pid

    # A pending one: removed, and it never starts.
    out = ok(cli("kill", "queued", "--dir", base, cwd=tmp_path))
    assert out.strip() == "removed pending 2 queued"
    item = wait_task(base, 2, "errors", status="killed")
    assert item["started_at"] is None and item["attempt"] == 0

    out = ok(cli("kill", "1", "--dir", base, cwd=tmp_path))
    assert out.strip() == "terminating 1 runner"
    item = wait_task(base, 1, "errors", status="killed")
    assert item["reason"] == "terminated by user"
    wait_for(lambda: pid_gone(pid), 15, what="the killed run's process to go")
    m = meta(exp_dirs(base, "runner")[0])
    assert m["status"] == "killed"
    assert m["reason"] == "terminated by user"

    assert s.wait() == 1  # something was killed
    assert not marks.started("queued")
    assert exp_dirs(base, "queued") == []
    assert marks.order() == ["runner", "last"]

    # Killing what already ended says so (the scheduler is gone now: exit 1 either way).
    r = cli("kill", "1", "--dir", base, cwd=tmp_path)
    assert r.returncode == 1 and "no scheduler is running" in r.stderr


def test_kill_an_ended_task_says_so(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "done", "command": marks.quick("done"), "priority": 1},
        {"name": "runner", "command": marks.hold("runner")},
    ])
    s = start(cfg)
    marks.wait_started("runner", sched=s)
    wait_task(base, 1, "finished")
    out = refused(cli("kill", "done", "--dir", base, cwd=tmp_path))
    assert out.strip() == "1 done is finished; nothing to kill"
    marks.release("runner")
    assert s.wait() == 0


def test_retry_a_failed_task_runs_again_first_in_the_same_directory(tmp_path, start, marks):
    base = tmp_path / "results"
    counter = marks.path("flaky.count")
    # Fails the first time, succeeds the second.
    flaky = (f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"; '
             f'echo flaky >> "{marks.dir}/order"; echo "attempt $n in $EXPERIMENT_RUN_ID"; [ $n -ge 2 ]')
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "flaky", "command": flaky, "priority": 9},
        {"name": "blocker", "command": marks.hold("blocker"), "priority": 5},
        {"name": "later1", "command": marks.quick("later1")},
        {"name": "later2", "command": marks.quick("later2")},
    ])
    s = start(cfg)
    marks.wait_started("blocker", sched=s)
    failed = wait_task(base, 1, "errors", status="error")
    assert failed["reason"] == "exit code 1" and failed["run_id"] == "run_0001"

    # The tasks still waiting now rank above it; the retried one goes first all the same.
    ok(cli("priority", "later1", "50", "--dir", base, cwd=tmp_path))
    ok(cli("priority", "later2", "50", "--dir", base, cwd=tmp_path))
    out = ok(cli("retry", "flaky", "--dir", base, cwd=tmp_path))
    assert out.strip() == "queued 1 flaky again (attempt 2)"
    assert [i["name"] for i in try_state(base)["pending"]] == ["flaky", "later1", "later2"]

    marks.release("blocker")
    assert s.wait() == 0  # the retry succeeded: nothing failed in the end
    assert marks.order() == ["flaky", "blocker", "flaky", "later1", "later2"]
    (d,) = exp_dirs(base, "flaky")  # the same directory, a new run
    m = meta(d)
    assert m["status"] == "finished"
    assert m["current_run_id"] == "run_0002"
    assert [r["id"] for r in m["runs"]] == ["run_0001", "run_0002"]
    assert sorted(p.name for p in (d / "terminal_logs").iterdir()) == ["run_0001.log", "run_0002.log"]
    assert "attempt 2 in run_0002" in (d / "terminal_logs" / "run_0002.log").read_text()
    _, item = task(base, 1)
    assert item["status"] == "finished" and item["attempt"] == 2 and item["run_id"] == "run_0002"


def test_retry_a_killed_task_and_refusals(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "victim", "command": marks.hold("victim")},
        {"name": "blocker", "command": marks.hold("blocker")},
    ], max_concurrent_experiments=2)
    s = start(cfg)
    marks.wait_started("victim", "blocker", sched=s)
    # Running tasks cannot be retried.
    out = refused(cli("retry", "victim", "--dir", base, cwd=tmp_path))
    assert out.strip() == "1 victim is running; only failed or killed tasks can be retried"
    ok(cli("kill", "victim", "--dir", base, cwd=tmp_path))
    wait_task(base, 1, "errors", status="killed")
    (marks.path("victim.started")).unlink()
    out = ok(cli("retry", "1", "--dir", base, cwd=tmp_path))
    assert out.strip() == "queued 1 victim again (attempt 2)"
    marks.wait_started("victim", sched=s)
    assert marks.path("victim.started").read_text().split()[0] == "run_0002"
    marks.release("victim", "blocker")
    assert s.wait() == 0
    assert len(exp_dirs(base, "victim")) == 1


def test_rm_a_pending_task_and_a_finished_record(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "done", "command": marks.quick("done"), "priority": 9},
        {"name": "blocker", "command": marks.hold("blocker"), "priority": 5},
        {"name": "pend", "command": marks.quick("pend")},
        {"name": "keep", "command": marks.quick("keep")},
    ])
    s = start(cfg)
    marks.wait_started("blocker", sched=s)
    wait_task(base, 1, "finished")
    assert ids_in_state(base) == {1, 2, 3, 4}

    out = ok(cli("rm", "pend", "done", "--dir", base, cwd=tmp_path))
    assert out.splitlines() == ["removed 3 pend", "removed 1 done"]
    assert ids_in_state(base) == {2, 4}  # already in the state file when the answer comes
    # A running task is not removed.
    out = refused(cli("rm", "blocker", "--dir", base, cwd=tmp_path))
    assert out.strip() == "2 blocker is running; kill it first"
    # Removed tasks are unknown now.
    r = cli("rm", "pend", "--dir", base, cwd=tmp_path)
    assert r.returncode == 1 and "no task 'pend'" in r.stdout + r.stderr

    marks.release("blocker")
    assert s.wait() == 0
    assert marks.order() == ["done", "blocker", "keep"]
    assert exp_dirs(base, "pend") == []
    assert len(exp_dirs(base, "done")) == 1  # rm drops the record, not the directory
    assert ids_in_state(base) == {2, 4}


# ============================================================================
# shutdown, priority
# ============================================================================


def test_shutdown_lets_running_tasks_finish_and_starts_nothing(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "a", "command": marks.hold("a")},
        {"name": "b", "command": marks.hold("b")},
        {"name": "c", "command": marks.quick("c")},
    ], max_concurrent_experiments=2)
    s = start(cfg)
    marks.wait_started("a", "b", sched=s)
    assert try_state(base)["summary"]["shutting_down"] is False
    out = ok(cli("shutdown", base, cwd=tmp_path))
    assert out.strip() == "shutting down: 2 running (finishing), 1 pending will not start"
    time.sleep(0.3)
    assert s.alive() and task(base, 1)[0] == "running"
    # The shutdown under way shows: in the state file, `exp status` and the dashboard's /api/state.
    assert try_state(base)["summary"]["shutting_down"] is True
    status = ok(cli("status", base, cwd=tmp_path))
    assert "shutting down: nothing more starts" in status.splitlines()[0], status
    assert json.loads(ok(cli("status", base, "--json", cwd=tmp_path)))["scheduler"]["shutting_down"] is True
    assert exp.Dashboard(base).api_state({})["scheduler"]["shutting_down"] is True
    marks.release("a")
    wait_task(base, 1, "finished")
    assert s.alive()  # b still runs
    assert task(base, 3)[0] == "pending"
    marks.release("b")
    assert s.wait() == 0  # what ran succeeded; what never started is no failure
    # a and b started together: their first lines may come in either order; c never ran.
    assert sorted(marks.order()) == ["a", "b"]
    assert exp_dirs(base, "c") == []
    state = try_state(base)
    assert state["summary"]["status_indicator"] == "stopped"
    assert [i["id"] for i in state["pending"]] == [3]
    assert "shutdown requested" in s.stdout()


def test_shutdown_now_kills_the_running_tasks(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "a", "command": marks.hold("a")},
        {"name": "b", "command": marks.hold("b")},
        {"name": "c", "command": marks.quick("c")},
    ], max_concurrent_experiments=2)
    s = start(cfg)
    marks.wait_started("a", "b", sched=s)
    out = ok(cli("shutdown", base, "--now", cwd=tmp_path))
    assert out.strip() == "shutting down: 2 running (being stopped), 1 pending will not start"
    assert s.wait() == 1  # killed tasks are failures
    for tid, name in ((1, "a"), (2, "b")):
        _, item = task(base, tid)
        assert item["status"] == "killed" and item["reason"] == "terminated by user"
        m = meta(exp_dirs(base, name)[0])
        assert m["status"] == "killed" and m["reason"] == "terminated by user"
    assert not marks.path("a.go").exists() and exp_dirs(base, "c") == []
    # a and b ran side by side, so either may have written its mark first.
    assert sorted(marks.order()) == ["a", "b"]


def test_shutdown_of_an_idle_lingering_scheduler(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "a", "command": marks.quick("a")}],
                       linger_when_idle=True)
    s = start(cfg)
    wait_task(base, 1, "finished")
    wait_for(lambda: (try_state(base) or {}).get("summary", {}).get("status_indicator") == "awaiting_shutdown",
             15, what="the scheduler to linger")
    out = ok(cli("shutdown", base, cwd=tmp_path))
    assert out.strip() == "shutting down: 0 running (finishing), 0 pending will not start"
    assert s.wait() == 0


def test_priority_reorders_pending_tasks(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "blocker", "command": marks.hold("blocker"), "priority": 100},
        {"name": "p1", "command": marks.quick("p1")},
        {"name": "p2", "command": marks.quick("p2")},
        {"name": "p3", "command": marks.quick("p3")},
        {"name": "p4", "command": marks.quick("p4"), "priority": 1},
    ])
    s = start(cfg)
    marks.wait_started("blocker", sched=s)
    wait_task(base, 1, "running")
    assert [i["name"] for i in try_state(base)["pending"]] == ["p4", "p1", "p2", "p3"]
    out = ok(cli("priority", "p3", "10", "--dir", base, cwd=tmp_path))
    assert out.strip() == "priority of 5 p3 is now 10"
    out = ok(cli("priority", "4", "-5", "--dir", base, cwd=tmp_path))  # by id; negative
    assert out.strip() == "priority of 4 p2 is now -5"
    out = refused(cli("priority", "blocker", "3", "--dir", base, cwd=tmp_path))
    assert out.strip() == "1 blocker is running; priority only changes pending tasks"
    # The state file shows a command's effect by the time its answer is out.
    assert [i["name"] for i in try_state(base)["pending"]] == ["p3", "p4", "p1", "p2"]
    _, item = task(base, 5)
    assert item["priority"] == 10
    marks.release("blocker")
    assert s.wait() == 0
    assert marks.order() == ["blocker", "p3", "p4", "p1", "p2"]


def test_priority_needs_an_integer(tmp_path):
    r = cli("priority", "x", "high", "--dir", tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "invalid int value" in r.stderr


# ============================================================================
# Names and ids, unknown tasks
# ============================================================================


def test_a_name_means_all_its_tasks_an_id_one(tmp_path, start, marks):
    base = tmp_path / "results"
    rep = (f'echo "$EXPERIMENT_RUN_ID" > "{marks.dir}/rep_$EXPERIMENT_REPEAT.started"; '
           f'i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done')
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "rep", "command": rep, "repeats": 3},
        {"name": "other", "command": marks.hold("other")},
    ], max_concurrent_experiments=4)
    s = start(cfg)
    marks.wait_started("rep_1", "rep_2", "rep_3", "other", sched=s)
    out = ok(cli("kill", "2", "--dir", base, cwd=tmp_path))
    assert out.strip() == "terminating 2 rep #2/3"
    wait_task(base, 2, "errors", status="killed")
    assert task(base, 1)[0] == "running" and task(base, 3)[0] == "running"

    # One of the three was ended already: said, but the name's kill is done (exit 0).
    out = ok(cli("kill", "rep", "--dir", base, cwd=tmp_path))
    assert out.splitlines() == ["terminating 1 rep #1/3", "2 rep #2/3 is killed; nothing to kill",
                                "terminating 3 rep #3/3"]
    wait_task(base, 1, "errors", status="killed")
    wait_task(base, 3, "errors", status="killed")
    assert task(base, 4)[0] == "running"  # "other" is untouched
    # A name none of whose tasks the action applies to, and an id it does not apply to, fail (exit 1).
    out = refused(cli("kill", "rep", "--dir", base, cwd=tmp_path))
    assert all(line.endswith("is killed; nothing to kill") for line in out.splitlines()), out
    refused(cli("kill", "2", "other", "--dir", base, cwd=tmp_path))
    wait_task(base, 4, "errors", status="killed")  # the one it applied to was still done
    assert s.wait() == 1


def test_unknown_task_is_a_clear_message_and_the_scheduler_goes_on(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "alpha", "command": marks.hold("alpha")},
        {"name": "beta", "command": marks.quick("beta")},
    ])
    s = start(cfg)
    marks.wait_started("alpha", sched=s)
    for args in (["kill", "nosuch"], ["retry", "nosuch"], ["rm", "nosuch"], ["priority", "nosuch", "3"],
                 ["kill", "99"]):
        r = cli(*args, "--dir", base, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        text = r.stdout + r.stderr
        assert f"no task '{args[1]}'" in text, (args, text)
        assert "1 alpha" in text and "2 beta" in text, text  # the known tasks are listed
        assert s.alive()
    # Known and unknown together: the known one is acted on, the exit status says something was wrong.
    r = cli("priority", "beta", "7", "--dir", base, cwd=tmp_path)
    assert ok(r).strip() == "priority of 2 beta is now 7"
    r = cli("kill", "beta", "ghost", "--dir", base, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == "removed pending 2 beta"
    assert "no task 'ghost'" in r.stdout
    assert status_json(base, tmp_path)["scheduler"]["alive"] is True
    marks.release("alpha")
    assert s.wait() == 1  # beta was killed before it started
    assert "Traceback" not in s.stdout() + s.stderr()


# ============================================================================
# Command files
# ============================================================================


def test_commands_posted_back_to_back_while_the_scheduler_is_busy_are_all_answered(tmp_path, start, marks):
    base = tmp_path / "results"
    # Many short experiments four at a time keep the scheduler launching and
    # reaping while commands arrive from several processes and threads.
    exps = [{"name": f"q{i:02d}", "command": "true"} for i in range(40)]
    exps.append({"name": "holder", "command": marks.hold("holder"), "priority": 9})
    cfg = write_config(tmp_path / "c.toml", base, exps, max_concurrent_experiments=4)
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    st = exp.StateFile(base)
    posted: list[str] = []
    lock = threading.Lock()

    def poster(k: int) -> None:
        for j in range(10):
            action, args = [("priority", {"tasks": [f"q{(k * 10 + j) % 40:02d}"], "value": j}),
                            ("kill", {"tasks": [f"nosuch{k}_{j}"]}),
                            ("retry", {"tasks": ["holder"]})][j % 3]
            cid = st.post_command(action, **args)
            with lock:
                posted.append(cid)

    threads = [threading.Thread(target=poster, args=(k,)) for k in range(4)]
    clis = [subprocess.Popen([PY, EXP_PY, "priority", f"q{30 + k}", "1", "--dir", str(base)], cwd=str(tmp_path),
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(posted) == 40
    results = {}
    for cid in posted:
        res = st.result(cid, timeout=20)
        assert res is not None, f"command {cid} was not answered"
        results[cid] = res
    # Kills of unknown tasks and retries of the running holder are refused; a priority is
    # set if its task is still pending, else refused too.
    assert all(r["ok"] == r["message"].startswith("priority of") for r in results.values()), results
    assert sum(1 for r in results.values() if r["message"].startswith("no task 'nosuch")) == 12
    assert sum(1 for r in results.values() if r["message"].endswith("only failed or killed tasks can be retried")) == 12
    for p in clis:
        out, err = p.communicate(timeout=30)
        assert p.returncode == (0 if "priority of" in out else 1), (out, err)
        assert "priority of" in out or "priority only changes pending tasks" in out or "is finished" in out, out
    # Nothing left behind: every command answered, every answer collected.
    assert [n for n in os.listdir(st.commands_dir) if not n.startswith(".")] == []
    marks.release("holder")
    assert s.wait() == 0
    assert len(try_state(base)["finished"]) == 41


def test_a_garbage_command_file_is_answered_with_an_error(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "runner", "command": marks.hold("runner")},
                                                   {"name": "next", "command": marks.quick("next")}])
    s = start(cfg)
    marks.wait_started("runner", sched=s)
    st = exp.StateFile(base)
    bad = {
        "garbage": b"this is not JSON {",
        "binary": b"\xff\xfe\x00\x01",
        "array": b"[1, 2, 3]",
        "noaction": b'{"tasks": [1]}',
        "badaction": b'{"action": "explode", "tasks": [1]}',
        "badvalue": b'{"action": "priority", "tasks": ["next"], "value": "high"}',
        "badtasks": b'{"action": "kill", "tasks": {"x": 1}}',
        "noconfig": b'{"action": "add"}',
        "missingconfig": json.dumps({"action": "add", "config": str(tmp_path / "absent.toml")}).encode(),
    }
    for name, data in bad.items():
        post_raw(base, name + ".json", data)
    for name in bad:
        res = st.result(name, timeout=20)
        assert res is not None, f"{name} was not answered"
        assert res["ok"] is False, (name, res)
        assert res["message"], (name, res)
    assert s.alive()
    # The scheduler still works.
    assert ok(cli("kill", "next", "--dir", base, cwd=tmp_path)).strip() == "removed pending 2 next"
    marks.release("runner")
    assert s.wait() == 1
    assert "Traceback" not in s.stdout() + s.stderr()


def test_garbage_answers_say_what_was_wrong(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "runner", "command": marks.hold("runner")}])
    s = start(cfg)
    marks.wait_started("runner", sched=s)
    st = exp.StateFile(base)
    post_raw(base, "g.json", b"{{{{")
    post_raw(base, "a.json", b'{"action": "explode"}')
    post_raw(base, "v.json", b'{"action": "priority", "tasks": ["runner"], "value": 1.5}')
    assert "could not be read" in st.result("g", 20)["message"]
    assert st.result("a", 20)["message"] == "unknown action 'explode'"
    assert "priority must be an integer" in st.result("v", 20)["message"]
    marks.release("runner")
    assert s.wait() == 0


def test_commands_with_no_scheduler_alive(tmp_path, start, marks):
    empty = tmp_path / "empty"
    for args in (["kill", "1", "--dir", empty], ["retry", "x", "--dir", empty], ["rm", "x", "--dir", empty],
                 ["shutdown", empty], ["shutdown", empty, "--now"], ["priority", "x", "1", "--dir", empty]):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("exp: error: no scheduler is running for "), r.stderr
        assert str(empty) in r.stderr
        assert not (empty / ".exp_state" / "commands").exists()  # nothing posted
    # A directory whose scheduler has exited.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "a", "command": "true"}])
    assert start(cfg).wait() == 0
    r = cli("kill", "a", "--dir", base, cwd=tmp_path)
    assert r.returncode == 1 and "no scheduler is running for" in r.stderr
    # The default directory is ./results.
    r = cli("shutdown", cwd=tmp_path)
    assert r.returncode == 1 and "no scheduler is running for" in r.stderr


def test_command_latency_while_idle_waiting(tmp_path, start, marks):
    """Measured and printed, not asserted (the machine may be loaded): post -> answer."""
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "sleeper", "command": marks.hold("sleeper")}],
                       check_interval=30)
    s = start(cfg)
    marks.wait_started("sleeper", sched=s)
    st = exp.StateFile(base)
    path = Path(st.commands_dir)
    times = []
    for _ in range(15):
        time.sleep(0.05)
        t0 = time.perf_counter()
        cid = st.post_command("priority", tasks=["sleeper"], value=1)
        result = path / (cid + exp.RESULT_EXT)
        wait_for(result.exists, 10, interval=0.001, what="the answer")
        times.append(time.perf_counter() - t0)
        assert st.result(cid, 5)["message"].endswith("priority only changes pending tasks")  # it runs
    med, worst = statistics.median(times) * 1000, max(times) * 1000
    print(f"\ncommand latency while idle-waiting (check_interval 30 s): median {med:.1f} ms, max {worst:.1f} ms "
          f"(target <= 50 ms; poll interval {exp.COMMAND_POLL_INTERVAL * 1000:.0f} ms)")
    marks.release("sleeper")
    assert s.wait() == 0


# ============================================================================
# A second `exp run` joins; one owner per directory
# ============================================================================


def start_holder(tmp_path, start, marks):
    """A scheduler over tmp_path/results whose one task, "holder", runs until released: (base, scheduler)."""
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "holder", "command": marks.hold("holder")}],
                       max_concurrent_experiments=4)
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    wait_owned(base, s)
    return base, s


def test_a_second_run_joins_the_running_scheduler(tmp_path, start, marks):
    base, s = start_holder(tmp_path, start, marks)

    sub = tmp_path / "other"
    sub.mkdir()
    # Relative paths of the joining config resolve against its own directory.
    other = write_config(sub / "other.toml", "../results", [
        {"name": "j1", "command": marks.quick("j1")},
        {"name": "j2", "command": marks.quick("j2"), "repeats": 2},
    ])
    r = cli("run", other, cwd=tmp_path)
    out = ok(r)
    assert out.splitlines()[:3] == ["queued 2 j1", "queued 3 j2 #1/2", "queued 4 j2 #2/2"]
    assert "added to the running scheduler" in out
    wait_for(lambda: all(task(base, i)[0] == "finished" for i in (2, 3, 4)), 30, what="the joined tasks to finish")
    assert len(exp_dirs(base, "j1")) == 1 and len(exp_dirs(base, "j2")) == 2

    good = write_config(tmp_path / "good.toml", base, [{"name": "g", "command": marks.hold("g")}])
    bad = write_config(tmp_path / "bad.toml", base, [{"name": "b", "command": marks.hold("b", 3)}])
    waiters = {}
    for name, path in (("good", good), ("bad", bad)):
        waiters[name] = subprocess.Popen([PY, EXP_PY, "run", str(path), "--wait"], cwd=str(tmp_path),
                                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks.wait_started("g", "b", sched=s)
    for p in waiters.values():
        assert p.poll() is None  # --wait follows the tasks to their end
    marks.release("g", "b")
    outs = {}
    for name, p in waiters.items():
        outs[name] = p.communicate(timeout=60)
    assert waiters["good"].returncode == 0, outs["good"]
    assert waiters["bad"].returncode == 1, outs["bad"]
    assert re.search(r"^finished +[56] g$", outs["good"][0], re.M), outs["good"]
    assert re.search(r"^error +[56] b \(exit code 3\)$", outs["bad"][0], re.M), outs["bad"]
    # --dry-run on an owned directory only prints the plan.
    r = cli("run", good, "--dry-run", cwd=tmp_path)
    assert "queued" not in ok(r) and "g" in r.stdout
    assert s.alive()
    marks.release("holder")
    assert s.wait() == 1  # the joined "b" failed
    assert "queued 3 experiment(s)" in s.stdout()


def test_a_waiting_joiner_stops_on_sigint_even_inherited_ignored_and_on_sigterm(tmp_path, start, marks):
    # `exp run --wait` started by a script in the background (SIGINT ignored) kept waiting
    # after SIGINT; SIGTERM killed it without a word.  Either stops the waiting (exit 130);
    # the joined task goes on in the scheduler.
    base, s = start_holder(tmp_path, start, marks)
    for i, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        name = f"w{i}"
        joined = write_config(tmp_path / f"{name}.toml", base, [{"name": name, "command": marks.hold(name)}])
        p = subprocess.Popen([PY, EXP_PY, "run", str(joined), "--wait"], cwd=str(tmp_path), env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            assert p.stdout.readline().startswith(f"queued {i + 2} {name}")
            p.send_signal(sig)  # at once: the line says it is queued, so it can be stopped
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 130, (sig, p.returncode, out, err)
        assert "Traceback" not in err
        marks.wait_started(name, sched=s)
        wait_task(base, i + 2, "running")  # the waiting stopped, not the task (the state file follows)
        marks.release(name)
    wait_for(lambda: all(task(base, i)[0] == "finished" for i in (2, 3)), 30, what="the joined tasks to finish")
    marks.release("holder")
    assert s.wait() == 0


@pytest.mark.parametrize("gap", [0.0, 0.3])
def test_two_runs_started_together_both_run_their_experiments(tmp_path, gap):
    # Both looked, saw no scheduler, and one was refused ("another scheduler is running")
    # although the README says a second `exp run` joins; or the first finished just as
    # the second joined.  Each pair is started at once, or 0.3 s apart (as the first ends).
    for i in range(4):
        base = tmp_path / f"results{i}"
        cfgs = [write_config(tmp_path / f"{n}{i}.toml", base, [{"name": n, "command": "sleep 0.3"}])
                for n in ("a", "b")]
        procs = []
        for cfg in cfgs:
            procs.append(subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], env=child_env(NO_COLOR="1"),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          cwd=str(tmp_path)))
            time.sleep(gap)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        for n in ("a", "b"):
            (d,) = exp_dirs(base, n)
            assert meta(d)["status"] == "finished", outs


def test_a_config_from_a_pipe_cannot_join_and_says_so(tmp_path, start, marks):
    base, s = holder_scheduler(tmp_path, start, marks)
    text = f'[scheduler]\nbase_experiment_dir = "{base}"\n[[experiments]]\nname = "piped"\ncommand = "true"\n'
    line = f"{shlex.quote(PY)} {shlex.quote(EXP_PY)} run <(printf %s {shlex.quote(text)})"
    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "save the config to a file" in r.stderr
    assert s.alive() and exp_dirs(base, "piped") == []
    marks.release("holder")
    assert s.wait() == 0


def test_a_joined_experiment_with_a_delay_starts_when_its_delay_ends(tmp_path, start, marks):
    # The running batch has no delays and re-plans only every 30 s: the joined experiment's
    # delay must still wake the scheduler when it ends, not at the next re-plan.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "holder", "command": marks.hold("holder")}],
                       max_concurrent_experiments=2, check_interval=30)
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    wait_owned(base, s)
    other = write_config(tmp_path / "other.toml", base, [
        {"name": "late", "command": marks.hold("late"), "delay_seconds": 1}])
    t0 = time.monotonic()
    assert "queued 2 late" in ok(cli("run", other, cwd=tmp_path))
    marks.wait_started("late", sched=s, timeout=15)
    assert time.monotonic() - t0 >= 1.0  # not before its delay
    marks.release("holder", "late")
    assert s.wait() == 0


def test_a_joining_config_with_too_many_gpus_is_refused(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "holder", "command": marks.hold("holder")}],
                       gpus=[0])
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    # Its own [scheduler] gpus would allow it; the running scheduler's pool does not.
    other = write_config(tmp_path / "o.toml", base, [{"name": "big", "command": "true", "gpus": 2}], gpus=[0, 1])
    r = cli("run", other, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)  # a config error, as everywhere (and as --dry-run says)
    assert "gpus = 2" in r.stderr and r.stderr.startswith("exp: error:"), r.stderr
    assert s.alive() and ids_in_state(base) == {1}
    marks.release("holder")
    assert s.wait() == 0


def test_a_joining_config_asking_for_gpu_ids_outside_the_pool_is_told_whose_pool_it_is(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "holder", "command": marks.hold("holder")}], gpus=[])
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    other = write_config(tmp_path / "o.toml", base, [{"name": "g", "command": "true", "gpu_ids": [0]}], gpus=[0])
    r = cli("run", other, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "gpu_ids [0] are not in the running scheduler's pool, which is empty; a joining file's [scheduler] " \
           "settings do not apply" in r.stderr, r.stderr
    assert s.alive()
    marks.release("holder")
    assert s.wait() == 0


@pytest.mark.parametrize("args", [["status", "F"], ["shutdown", "F"], ["kill", "x", "--dir", "F"],
                                  ["see", "F", "--no-browser"]], ids=lambda a: a[0])
def test_a_file_where_a_base_directory_goes_is_a_usage_error(tmp_path, args):
    f = tmp_path / "notes.txt"
    f.write_text("not a directory")
    r = cli(*[str(f) if a == "F" else a for a in args], cwd=tmp_path, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"exp: error: {f} is not a directory; pass the base directory of your experiments"
    assert f.read_text() == "not a directory"


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_see_with_a_port_out_of_range_is_a_usage_error(tmp_path, port):
    r = cli("see", str(tmp_path), "--port", port, "--no-browser", cwd=tmp_path, timeout=30)
    assert r.returncode == 2 and f"--port must be between 0 and 65535, got {port}" in r.stderr, r.stderr


def test_scheduler_run_in_process_on_an_owned_base_raises(tmp_path, start, marks):
    base, s = holder_scheduler(tmp_path, start, marks)
    wait_task(base, 1, "running")
    other = write_config(tmp_path / "o.toml", base, [{"name": "intruder", "command": marks.quick("intruder")}])
    out = io.StringIO()
    with pytest.raises(exp.ExpError, match="another scheduler is running"):
        exp.Scheduler(exp.load_config(other), out=out).run()
    assert exp_dirs(base, "intruder") == [] and "intruder" not in marks.order()
    assert task(base, 1)[0] == "running" and ids_in_state(base) == {1}
    assert s.alive()
    marks.release("holder")
    assert s.wait() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_lock_is_released_when_the_scheduler_is_sigkilled(tmp_path, start, marks, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "orphan", "command": marks.hold("orphan")}])
    s = start(cfg)
    marks.wait_started("orphan", sched=s)
    pid = wait_task(base, 1, "running")["pid"]
    kill_groups_later.append(pid)
    assert status_json(base, tmp_path)["scheduler"]["alive"] is True
    os.kill(s.pid, signal.SIGKILL)
    s.wait()
    data = status_json(base, tmp_path)
    assert data["scheduler"]["alive"] is False and data["scheduler"]["pid"] == s.pid
    assert "not running" in ok(cli("status", base, cwd=tmp_path)).splitlines()[0]
    r = cli("kill", "orphan", "--dir", base, cwd=tmp_path)
    assert r.returncode == 1 and "no scheduler is running" in r.stderr
    # The experiment survives its scheduler; end it here so that a new
    # scheduler has nothing of the old one's to wait for.
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid), 15, what="the orphan to go")

    # A new scheduler can take the directory.
    new = write_config(tmp_path / "n.toml", base, [{"name": "fresh", "command": marks.quick("fresh")}])
    s2 = start(new)
    code = s2.wait(60)
    assert "another scheduler" not in s2.stderr(), s2.stderr()
    assert "fresh" in marks.order(), (code, s2.stdout(), s2.stderr())
    assert not exp.StateFile(base).owned()


def test_a_command_left_for_an_earlier_scheduler_is_not_acted_on(tmp_path, start, marks):
    # A shutdown posted to a scheduler that ended before acting on it (the
    # client gave up) must not stop the next scheduler of the directory.
    base = tmp_path / "results"
    st = exp.StateFile(base)
    cid = st.post_command("shutdown", tasks=[], now=True)
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "a", "command": marks.quick("a")}])
    s = start(cfg)
    assert s.wait() == 0, s.stdout()
    assert marks.order() == ["a"]
    assert "shutdown requested" not in s.stdout()
    res = st.result(cid, 5)
    assert res is not None and res["ok"] is False and "not done" in res["message"]


def test_a_client_whose_scheduler_ends_without_answering_says_so_and_takes_its_command_back(tmp_path):
    base = tmp_path / "results"
    st = exp.StateFile(base)
    fd = st.acquire()  # an owner that never answers
    assert fd is not None
    try:
        p = subprocess.Popen([PY, EXP_PY, "kill", "x", "--dir", str(base)], cwd=str(tmp_path), env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: st.pending_commands(), 30, what="the command file")
    finally:
        os.close(fd)  # the owner "dies"
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1, (out, err)
    assert "did not answer" in err and "Traceback" not in err
    assert st.pending_commands() == []


def test_joining_a_scheduler_that_is_shutting_down_is_refused(tmp_path, start, marks):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "holder", "command": marks.hold("holder")},
        {"name": "pend", "command": marks.quick("pend")},
    ])
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    ok(cli("shutdown", base, cwd=tmp_path))
    other = write_config(tmp_path / "o.toml", base, [{"name": "late", "command": marks.quick("late")}])
    r = cli("run", other, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "shutting down" in r.stdout + r.stderr
    marks.release("holder")
    assert s.wait() == 0
    assert marks.order() == ["holder"]  # neither the old pending task nor the new one started


def test_a_join_its_scheduler_never_took_is_sent_again_to_the_next_one(tmp_path):
    # `exp run` joins the scheduler that owns the directory by posting a command. When
    # that scheduler ends without taking it and a new one starts before the joiner
    # looks again, the new one answers "send it again": the joiner once exited 1
    # there, its experiments never run. Now it joins the new scheduler.
    base = tmp_path / "results"
    state = exp.StateFile(base)
    holder = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        os.makedirs({os.path.dirname(state.lock_path)!r}, exist_ok=True)
        fd = os.open({state.lock_path!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    joiner = new_owner = None
    try:
        assert holder.stdout.readline().strip() == "locked"  # a scheduler that will end without answering
        late = write_config(tmp_path / "late.toml", base, [{"name": "late", "command": "true"}])
        joiner = subprocess.Popen([PY, EXP_PY, "run", str(late)], env=child_env(NO_COLOR="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: state.pending_commands(), 30, what="the joiner's command")
        os.kill(joiner.pid, signal.SIGSTOP)  # it looks again only after the next scheduler answered
        holder.kill()
        holder.wait()
        first = write_config(tmp_path / "first.toml", base, [{"name": "first", "command": "sleep 4"}])
        new_owner = subprocess.Popen([PY, EXP_PY, "run", str(first)], env=child_env(NO_COLOR="1"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: not state.pending_commands(), 30, what="the new scheduler to answer the old command")
        os.kill(joiner.pid, signal.SIGCONT)
        out = joiner.communicate(timeout=60)[0]
        assert joiner.returncode == 0, out
        assert "added to the running scheduler" in out, out
        assert new_owner.wait(timeout=60) == 0, new_owner.communicate()[0]
        for name in ("first", "late"):
            (d,) = exp_dirs(base, name)
            assert meta(d)["status"] == "finished", name
    finally:
        for p in (holder, joiner, new_owner):
            if p is not None and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except OSError:
                    pass
                p.kill()
                p.wait()


def test_a_retried_or_joined_task_starts_at_once_with_a_long_check_interval(tmp_path, start, marks):
    # Queued by a command, such tasks were due a moment after the loop read its clock, so
    # they waited for the next check_interval (60 s here) although a slot was free.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "fails", "command": marks.quick("fails", 2)},
        {"name": "holder", "command": marks.hold("holder")}],
        max_concurrent_experiments=3, check_interval=60, linger_when_idle=True)
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    wait_for(lambda: task(base, 1)[0] == "errors", 30, what="fails to fail")
    ok(cli("retry", "fails", "--dir", base, cwd=tmp_path))
    wait_for(lambda: marks.order().count("fails") == 2, 20, what="the retry to run while check_interval is 60 s")
    ok(cli("run", write_config(tmp_path / "j.toml", base, [{"name": "j", "command": marks.quick("j")}]),
           cwd=tmp_path))
    wait_for(lambda: "j" in marks.order(), 20, what="the joined task to run while check_interval is 60 s")
    marks.release("holder")
    ok(cli("shutdown", base, cwd=tmp_path))
    assert s.wait() in (0, 1)


def test_a_joining_file_keeps_its_retries_and_is_told_which_settings_do_not_apply(tmp_path, start, marks):
    # Its tasks said "attempt 1/2" and were never retried (the running scheduler's
    # auto_restart_on_error was false), and its max_concurrent_experiments went unmentioned.
    base, s = start_holder(tmp_path, start, marks)
    joining = write_config(tmp_path / "b.toml", base, [{"name": "b", "command": marks.quick("b", 1),
                                                         "max_retries": 1}],
                           auto_restart_on_error=True, max_concurrent_experiments=5)
    r = cli("run", joining, cwd=tmp_path)
    ok(r)
    assert "[scheduler] kill_timeout, max_concurrent_experiments do not apply" in r.stderr, r.stderr
    assert "auto_restart_on_error" not in r.stderr.split("do not apply")[0], r.stderr
    wait_for(lambda: (task(base, 2)[0] == "errors" and task(base, 2)[1]["attempt"] == 2) or None, 30,
             what="b to fail twice")
    assert marks.order().count("b") == 2
    assert "retrying b (attempt 2/2)" in s.stdout()
    marks.release("holder")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a child's ignored signals from /proc")
def test_a_hangup_does_not_end_the_batch_and_is_not_passed_on_as_ignored(tmp_path, start, marks):
    # A dropped SSH connection (SIGHUP) killed the scheduler: what was pending never started.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "holder", "command": marks.hold("holder"), "priority": 1},
        {"name": "after", "command": f'sh -c \'grep SigIgn /proc/$$/status\' > "{marks.dir}/after.sigign"'}],
        max_concurrent_experiments=1)
    s = start(cfg)
    marks.wait_started("holder", sched=s)
    os.kill(s.pid, signal.SIGHUP)
    marks.release("holder")
    assert s.wait() == 0, (s.stdout(), s.stderr())
    ignored = int((marks.dir / "after.sigign").read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGHUP - 1)), hex(ignored)


def test_running_the_same_file_again_while_its_scheduler_runs_is_refused_unless_again(tmp_path, start, marks):
    # "Run the same exp run config.toml again" is how a crash is recovered; with the scheduler
    # in fact alive (another terminal) it silently queued the whole batch a second time.
    base, s = start_holder(tmp_path, start, marks)
    r = cli("run", tmp_path / "c.toml", cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"(pid {s.pid}) was started from this same file" in r.stderr and "--again" in r.stderr, r.stderr
    assert ids_in_state(base) == {1}
    out = ok(cli("run", tmp_path / "c.toml", "--again", cwd=tmp_path))
    assert "queued 2 holder" in out, out
    wait_for(lambda: ids_in_state(base) == {1, 2}, 30, what="the second holder in the queue")
    marks.release("holder")
