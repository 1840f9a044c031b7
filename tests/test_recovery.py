"""Crash recovery: runs outlive their scheduler and their ends are still recorded.

Each run's command runs under a small ``sh`` supervisor that leads the run's
process group, writes ``[exp] exit status N`` into the log when the command
ends and, when the process that started the run is gone by then, records
the end in metadata.json itself (``exp.py _record-end``).  A restarted
``exp run`` adopts runs that still run (the same process: pid and start
time), takes the ends recorded meanwhile, and goes on with what was pending;
``run --resume`` skips what already finished.

Everything is real: ``python exp.py run`` in the background, SIGKILLed with
``os.kill``; experiments are shell one-liners that note each execution in a
marker file and wait for a gate file, so the test decides when each ends.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import EXP_PY, child_env, pid_gone, read_meta, run_exp, try_state, wait_for
from conftest import exp_dirs as dirs_of
from conftest import write_batch as write_config

import exp

PY = sys.executable

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or exp.fcntl is None,
    reason="recovery compares start times from /proc and runs commands in POSIX process groups",
)


# ============================================================================
# Helpers
# ============================================================================


class Marks:
    """Marker and gate files under ``<tmp>/marks``.

    ``gated(name, code)``: a command that appends its run id to ``<name>.runs``,
    waits (at most about a minute) for ``<name>.go`` and exits with ``code``.
    ``quick(name)``: appends to ``<name>.runs`` and exits 0.
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / "marks"
        self.dir.mkdir()

    def gated(self, name: str, code: int = 0) -> str:
        d = self.dir
        return (f'echo "$EXPERIMENT_RUN_ID" >> "{d}/{name}.runs"; '
                f'i=0; while [ ! -e "{d}/{name}.go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; '
                f"exit {code}")

    def quick(self, name: str) -> str:
        return f'echo "$EXPERIMENT_RUN_ID $EXPERIMENT_REPEAT" >> "{self.dir}/{name}.runs"'

    def open(self, name: str) -> None:
        (self.dir / f"{name}.go").touch()

    def runs(self, name: str) -> list[str]:
        try:
            return (self.dir / f"{name}.runs").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []


class Sched:
    """``python exp.py run CONFIG [args]`` in the background, output to files."""

    def __init__(self, config: Path, tmp_path: Path, *args: str, n: int = 1) -> None:
        self.out_path = tmp_path / f"sched{n}.out"
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([PY, EXP_PY, "run", str(config), *args], cwd=str(tmp_path),
                                     env=child_env(NO_COLOR="1"), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the scheduler did not exit within {timeout}s; output:\n{self.output()}")
        self._out.close()
        return code

    def crash(self) -> None:
        """SIGKILL the scheduler and reap it (an unreaped zombie would still answer ``kill -0``)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._out.close()


@pytest.fixture
def marks(tmp_path) -> Marks:
    return Marks(tmp_path)


@pytest.fixture
def sched(tmp_path, kill_groups_later):
    """``sched(config, *args)`` starts a scheduler; all are killed after the test, with their runs."""
    started: list[Sched] = []

    def make(config: Path, *args: str) -> Sched:
        s = Sched(config, tmp_path, *args, n=len(started) + 1)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
    # Runs outlive a SIGKILLed scheduler: whatever a failed test left goes too.
    base = tmp_path / "results"
    for meta_path in base.glob("*/metadata.json") if base.is_dir() else []:
        try:
            for r in json.loads(meta_path.read_text(encoding="utf-8")).get("runs") or []:
                if isinstance(r.get("pid"), int) and r.get("ended_at") is None:
                    kill_groups_later.append(r["pid"])
        except (OSError, ValueError):
            pass


def state(base: Path) -> dict:
    return try_state(base) or {}


def in_state(base: Path, group: str, name: str) -> dict | None:
    return next((i for i in state(base).get(group) or [] if i.get("name") == name), None)


def only_dir(base: Path, name: str) -> Path:
    found = dirs_of(base, name)
    assert len(found) == 1, (name, found)
    return found[0]


def last_run(work_dir) -> dict:
    return read_meta(work_dir)["runs"][-1]


def log_text(work_dir, run_id: str = "run_0001") -> str:
    return (Path(work_dir) / "terminal_logs" / f"{run_id}.log").read_text(encoding="utf-8", errors="replace")


def wait_running(base: Path, *names: str) -> dict[str, dict]:
    """Wait until each named task runs with its pid and start time recorded; {name: its metadata run entry}."""
    def check():
        found = {}
        for name in names:
            item = in_state(base, "running", name)
            if not item or not item.get("pid") or not item.get("work_dir"):
                return None
            meta = exp.ExperimentDir(item["work_dir"]).try_read_metadata()[0] or {}
            runs = meta.get("runs") or []
            if not runs or runs[-1].get("pid") != item["pid"] or not runs[-1].get("start_ticks"):
                return None
            found[name] = dict(runs[-1], work_dir=item["work_dir"])
        return found
    return wait_for(check, 30, what=f"{names} running, their pids recorded")


def wait_ended(work_dir, timeout: float = 30) -> dict:
    """Wait until the last run of ``work_dir`` has its end recorded; its entry."""
    return wait_for(lambda: (lambda r: r if r.get("ended_at") else None)(last_run(work_dir)),
                    timeout, what=f"the end of the run in {work_dir}")


# ============================================================================
# The scenario
# ============================================================================


def test_sigkilled_scheduler_restarts_adopts_records_and_continues(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "early", "command": marks.quick("early"), "priority": 10},
        {"name": "fails", "command": marks.gated("fails", 3), "priority": 5},
        {"name": "lives", "command": marks.gated("lives", 0), "priority": 5},
        {"name": "later1", "command": marks.quick("later1")},
        {"name": "later2", "command": marks.quick("later2")},
    ], max_concurrent_experiments=2)
    s1 = sched(cfg)
    running = wait_running(base, "fails", "lives")
    kill_groups_later.extend(r["pid"] for r in running.values())
    wait_for(lambda: in_state(base, "finished", "early"), 30, what="early recorded finished")
    assert [i["name"] for i in state(base)["pending"]] == ["later1", "later2"]
    s1.crash()

    # While no scheduler runs, "fails" ends: its supervisor records the end.
    marks.open("fails")
    fails_dir = running["fails"]["work_dir"]
    run = wait_ended(fails_dir)
    assert (run["status"], run["exit_code"], run["reason"]) == ("error", 3, "exit code 3")
    meta = read_meta(fails_dir)
    assert (meta["status"], meta["exit_code"], meta["reason"], meta["pid"]) == ("error", 3, "exit code 3", None)
    log = log_text(fails_dir)
    assert "[exp] exit status 3" in log and re.search(r"\[exp\] \S+ run_0001 ended: exit code 3 \(error\)", log), log
    assert read_meta(running["lives"]["work_dir"])["status"] == "running"
    wait_for(lambda: pid_gone(running["fails"]["pid"]), 15, what="the supervisor of fails to go")
    # `exp status` of the dead scheduler's state shows the end recorded since, not "running".
    r = subprocess.run([PY, EXP_PY, "status", str(base), "--json"], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    tasks = {t["name"]: t for t in status["tasks"]}
    assert status["scheduler"]["alive"] is False
    assert (tasks["fails"]["status"], tasks["fails"]["exit_code"], tasks["fails"]["reason"]) == (
        "error", 3, "exit code 3"), tasks["fails"]
    assert tasks["fails"]["ended_at"] == run["ended_at"]
    assert tasks["lives"]["status"] == "running"
    r = subprocess.run([PY, EXP_PY, "status", str(base)], capture_output=True, text=True, env=child_env(), timeout=60)
    rows = {line.split()[1]: line.split() for line in r.stdout.splitlines()[2:] if line.strip()}
    assert "not running" in r.stdout and rows["fails"][2] == "error" and rows["lives"][2] == "running", r.stdout

    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restarted scheduler to adopt")
    marks.open("lives")
    assert s2.wait() == 1  # "fails" failed
    out = s2.output()
    assert re.search(r"adopted\s+lives \(pid %d, still running\)" % running["lives"]["pid"], out), out
    assert "1 adopted, 1 ended meanwhile" in out, out
    assert not re.search(r"started\s+(early|fails|lives)\b", out), out  # nothing that ran runs again

    # Each experiment ran exactly once, in exactly one directory.
    for name in ("early", "fails", "lives", "later1", "later2"):
        assert len(marks.runs(name)) == 1, (name, marks.runs(name))
        assert len(read_meta(only_dir(base, name))["runs"]) == 1, name
    assert len([p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 5

    lives = read_meta(running["lives"]["work_dir"])
    assert (lives["status"], lives["exit_code"], lives["runs"][0]["status"]) == ("finished", 0, "finished")
    assert "[exp] exit status 0" in log_text(running["lives"]["work_dir"])
    fails = read_meta(fails_dir)
    assert (fails["status"], fails["exit_code"], fails["reason"]) == ("error", 3, "exit code 3")
    for name in ("early", "later1", "later2"):
        assert read_meta(only_dir(base, name))["status"] == "finished", name

    final = state(base)
    assert final["summary"]["status_indicator"] == "stopped"
    assert sorted(i["name"] for i in final["finished"]) == ["early", "later1", "later2", "lives"]
    assert [(i["name"], i["exit_code"], i["reason"]) for i in final["errors"]] == [("fails", 3, "exit code 3")]
    assert final["pending"] == [] and final["running"] == []


def test_a_live_pid_of_another_process_is_not_adopted(tmp_path, marks, sched, kill_groups_later):
    """The recorded pid now belongs to someone else (start time differs): not adopted, not signalled."""
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "victim", "command": marks.gated("victim")}])
    s1 = sched(cfg)
    run = wait_running(base, "victim")["victim"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    os.killpg(run["pid"], signal.SIGKILL)  # the real run is gone, with its supervisor: nothing records it
    wait_for(lambda: pid_gone(run["pid"]), 15, what="the run to go")

    # Its pid is reused: another process, alive, in a group of its own.
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"], start_new_session=True,
                             stdin=subprocess.DEVNULL)
    try:
        kill_groups_later.append(other.pid)
        work_dir = run["work_dir"]
        meta = read_meta(work_dir)
        assert meta["runs"][-1]["start_ticks"] == run["start_ticks"]
        meta["pid"] = meta["runs"][-1]["pid"] = other.pid  # start_ticks stays the old process's
        (Path(work_dir) / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
        st = state(base)
        st["running"][0]["pid"] = other.pid
        (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps(st), encoding="utf-8")

        s2 = sched(cfg)
        assert s2.wait() == 1
        out = s2.output()
        assert "adopted  victim" not in out and "0 adopted, 1 ended meanwhile" in out, out
        assert other.poll() is None, "exp signalled a process that is not its run"
        meta = read_meta(work_dir)
        assert meta["status"] == "error" and meta["exit_code"] is None, meta
        assert "unknown" in meta["reason"], meta
        assert len(marks.runs("victim")) == 1 and len(meta["runs"]) == 1  # not run again
        assert only_dir(base, "victim")
    finally:
        other.kill()
        other.wait()


def test_a_run_killed_with_its_supervisor_while_no_scheduler_ran(tmp_path, marks, sched, kill_groups_later):
    """No exit status line, no record: recorded error (exit code unknown), not rerun, not left running."""
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "doomed", "command": marks.gated("doomed"), "priority": 1},
        {"name": "after", "command": marks.quick("after")},
    ])
    s1 = sched(cfg)
    run = wait_running(base, "doomed")["doomed"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    os.killpg(run["pid"], signal.SIGKILL)
    wait_for(lambda: pid_gone(run["pid"]), 15, what="the run to go")
    assert read_meta(run["work_dir"])["status"] == "running"  # nobody could record it
    assert "[exp] exit status" not in log_text(run["work_dir"])

    s2 = sched(cfg)
    assert s2.wait() == 1
    out = s2.output()
    assert "0 adopted, 1 ended meanwhile" in out, out
    meta = read_meta(run["work_dir"])
    assert (meta["status"], meta["exit_code"], meta["pid"]) == ("error", None, None), meta
    assert meta["reason"] == "exit code unknown"
    assert meta["runs"][0]["status"] == "error" and meta["runs"][0]["ended_at"]
    assert len(marks.runs("doomed")) == 1 and only_dir(base, "doomed")
    assert len(marks.runs("after")) == 1
    final = state(base)
    assert [i["name"] for i in final["errors"]] == ["doomed"] and final["running"] == []
    assert [i["name"] for i in final["finished"]] == ["after"]


def test_an_adopted_run_stopped_by_exp_is_recorded_as_exp_stopped_it(tmp_path, marks, sched, kill_groups_later):
    """`exp kill` on an adopted run: killed / "terminated by user", not the supervisor's "error", no retry."""
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "hold", "command": marks.gated("hold"),
                                                    "max_retries": 2}],
                       auto_restart_on_error=True)
    s1 = sched(cfg)
    run = wait_running(base, "hold")["hold"]
    running_since = time.time()  # it started before this
    kill_groups_later.append(run["pid"])
    s1.crash()
    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restarted scheduler to adopt")
    killed_after = time.time()  # it ends after this
    r = subprocess.run([PY, EXP_PY, "kill", "hold", "--dir", str(base)], cwd=str(tmp_path),
                       env=child_env(NO_COLOR="1"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr)
    marks.open("hold")  # a new attempt (there must be none) would end at once
    assert s2.wait() == 1
    out = s2.output()
    assert "retrying" not in out, out
    meta = read_meta(run["work_dir"])
    assert (meta["status"], meta["exit_code"], meta["reason"]) == ("killed", -signal.SIGTERM, "terminated by user"), meta
    assert len(meta["runs"]) == 1 and len(marks.runs("hold")) == 1
    # The duration counts from the run's start, not from its adoption.
    assert meta["duration"] == meta["runs"][0]["duration"] >= round(killed_after - running_since, 3) - 0.002
    assert [(i["name"], i["status"]) for i in state(base)["errors"]] == [("hold", "killed")]


def test_an_adopted_run_keeps_its_timeout(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    # Long enough not to expire before the crash; it has mostly passed by the restart.
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "slow", "command": marks.gated("slow"),
                                                    "timeout": 3}])
    s1 = sched(cfg)
    run = wait_running(base, "slow")["slow"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    assert "timeout" not in s1.output(), s1.output()
    s2 = sched(cfg)  # the gate never opens: only the timeout ends it
    assert s2.wait() == 1
    meta = read_meta(run["work_dir"])
    assert (meta["status"], meta["reason"]) == ("error", "timeout"), (meta, s2.output())
    assert "adopted" in s2.output()


# ============================================================================
# run --resume
# ============================================================================


def test_resume_skips_what_finished_and_reruns_what_failed(tmp_path, marks, sched):
    base = tmp_path / "results"
    flag = tmp_path / "fixed"
    # Each fails until the flag exists: "bad" always, "rep" in its 3rd repeat, "sw" at x=4.
    experiments = [
        {"name": "ok", "command": marks.quick("ok")},
        {"name": "bad", "command": marks.quick("bad") + f' && [ -e "{flag}" ]'},
        {"name": "rep", "repeats": 3,
         "command": marks.quick("rep") + f'; [ "$EXPERIMENT_REPEAT" -ne 3 ] || [ -e "{flag}" ]'},
        {"name": "sw_{x}", "command": marks.quick("sw{x}") + f'; [ {{x}} -eq 0 ] || [ -e "{flag}" ]',
         "sweep": {"x": [0, 4]}},
    ]
    cfg = write_config(tmp_path / "c.toml", base, [dict(e) for e in experiments], max_concurrent_experiments=2)
    assert sched(cfg).wait() == 1
    assert [len(marks.runs(n)) for n in ("ok", "bad", "rep", "sw0", "sw4")] == [1, 1, 3, 1, 1]

    flag.touch()
    s = sched(cfg, "--resume")
    assert s.wait() == 0, s.output()
    out = s.output()
    assert "--resume: 4 experiment(s) already finished here are skipped" in out, out
    # The summary counts all 7: the 4 skipped on a line of their own, the 3 that ran again.
    assert "summary: 7 experiment(s)" in out and "finished before (--resume), skipped: 4" in out, out
    assert re.search(r"succeeded first time:\s+3\n", out) and re.search(r"failed:\s+0\n", out), out
    assert [len(marks.runs(n)) for n in ("ok", "bad", "rep", "sw0", "sw4")] == [1, 2, 4, 1, 2]
    assert marks.runs("rep")[-1].split()[1] == "3"  # the repeat that failed is the one that ran again
    assert [len(dirs_of(base, n)) for n in ("ok", "bad", "rep", "sw_0", "sw_4")] == [1, 2, 4, 1, 2]
    assert not re.search(r"started\s+(ok|sw_0)\b", out), out

    # Matched by command too: a changed command is not "finished before".
    experiments[0]["command"] = marks.quick("ok") + " # v2"
    cfg2 = write_config(tmp_path / "c2.toml", base, [dict(e) for e in experiments], max_concurrent_experiments=2)
    s = sched(cfg2, "--resume")
    assert s.wait() == 0, s.output()
    assert "--resume: 6 experiment(s) already finished here are skipped" in s.output(), s.output()
    assert len(marks.runs("ok")) == 2 and len(marks.runs("bad")) == 2 and len(marks.runs("rep")) == 4


def kills_its_scheduler(marks: Marks, name: str, then: str) -> str:
    """A command that SIGKILLs the scheduler that started it at once (before its pid is recorded:
    ``$PPID`` of the command's subshell is exp), then runs ``then``."""
    return f'{marks.quick(name)}; kill -9 $PPID; {then}'


def test_a_run_started_just_before_the_crash_is_adopted_not_run_again(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "rep", "repeats": 3, "command": kills_its_scheduler(marks, "rep", marks.gated("rep_go"))},
    ], max_concurrent_experiments=1)
    s1 = sched(cfg)
    assert s1.wait() == -signal.SIGKILL
    d = only_dir(base, "rep")
    meta = read_meta(d)
    assert meta["status"] == "running" and meta["runs"][0]["pid"] is None  # no pid recorded yet
    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restarted scheduler to adopt")
    assert re.search(r"adopted\s+rep #1/3 \(pid \d+, still running\)", s2.output()), s2.output()
    # While it is adopted the state file says when it started.
    wait_for(lambda: in_state(base, "running", "rep"), 30, what="rep in the state file")
    assert isinstance(in_state(base, "running", "rep")["started_at"], str)
    marks.open("rep_go")
    # The adopted run was repeat 1; repeats 2 and 3 each kill their scheduler in turn.
    assert s2.wait() == -signal.SIGKILL
    assert len(marks.runs("rep")) == 2
    s3 = sched(cfg)
    assert s3.wait() == -signal.SIGKILL, s3.output()
    s4 = sched(cfg)
    assert s4.wait() == 0, s4.output()
    assert "attempt 2" not in s3.output() + s4.output()
    # Three repeats, three runs, three directories: none ran twice.
    assert [r.split()[1] for r in marks.runs("rep")] == ["1", "2", "3"], marks.runs("rep")
    dirs = dirs_of(base, "rep")
    assert len(dirs) == 3 and all(read_meta(x)["status"] == "finished" for x in dirs)
    assert all(len(read_meta(x)["runs"]) == 1 for x in dirs)


def test_a_sweep_point_started_just_before_the_crash_is_not_taken_for_another(tmp_path, marks, sched,
                                                                              kill_groups_later):
    # Two points of one name and one command (the value goes in the environment only); the dead
    # scheduler had started lr=2 only, before its state file said where.  The restart once gave
    # that directory to lr=1 (found first) and ran lr=2 again.
    base = tmp_path / "results"
    cmd = marks.gated("t")
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "t", "command": cmd, "environment": {"LR": "{lr}"}, "sweep": {"lr": [1, 2]}}],
        max_concurrent_experiments=2)
    since = exp.now_iso()
    run = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, env=child_env(EXPERIMENT_RUN_ID="run_0001"))
    kill_groups_later.append(run.pid)
    d = base / "t_2026-01-01__00-00-00"
    (d / "terminal_logs").mkdir(parents=True)
    (d / "terminal_logs" / "run_0001.log").touch()
    ticks = int(Path(f"/proc/{run.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    (d / "metadata.json").write_text(json.dumps({
        "name": "t", "command": cmd, "status": "running", "current_run_id": "run_0001", "created_at": since,
        "params": {"lr": 2}, "runs": [{"id": "run_0001", "pid": run.pid, "started_at": since, "start_ticks": ticks}]}))
    (base / ".exp_state").mkdir()
    (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps({
        "summary": {"status_indicator": "running", "pid": 1, "started_at": since}, "running": [], "finished": [],
        "errors": [], "pending": [{"name": "t", "command": cmd, "params": {"lr": lr}, "repeat": 1,
                                   "status": "pending", "attempt": 0} for lr in (1, 2)]}))
    s = sched(cfg)
    wait_for(lambda: "adopted" in s.output(), 30, what="the restart to adopt lr=2")
    marks.open("t")
    s.wait()  # (the hand-made run has no supervisor to write its exit status: its end is unknown)
    assert run.wait(30) == 0
    assert len(re.findall(r"\] started\s", s.output())) == 1, s.output()  # lr=1 only
    assert sorted(read_meta(x)["params"]["lr"] for x in dirs_of(base, "t")) == [1, 2], s.output()
    assert len(marks.runs("t")) == 2  # lr=2's own run and lr=1's: none twice


def test_a_run_that_ended_after_killing_its_scheduler_is_not_run_again(tmp_path, marks, sched):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "once", "command": kills_its_scheduler(marks, "once", "sleep 0.3")},
        {"name": "next", "command": marks.quick("next")},
    ])
    s1 = sched(cfg)
    assert s1.wait() == -signal.SIGKILL  # reaped: its supervisor sees it gone and records the end
    run = wait_ended(only_dir(base, "once"))
    assert run["status"] == "finished"
    s2 = sched(cfg)
    assert s2.wait() == 0, s2.output()
    out = s2.output()
    assert "1 ended meanwhile" in out and not re.search(r"started\s+once\b", out), out
    assert len(marks.runs("once")) == 1 and len(marks.runs("next")) == 1
    assert len(dirs_of(base, "once")) == 1
    done = in_state(base, "finished", "once")
    assert done["started_at"] and done["ended_at"] and done["duration"] is not None, done


def test_a_prerequisite_that_failed_while_no_scheduler_ran_fails_its_dependents(tmp_path, marks, sched,
                                                                               kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "prep", "command": marks.gated("prep", 2)},
        {"name": "train", "command": marks.quick("train"), "depends_on": ["prep"]},
        {"name": "eval", "command": marks.quick("eval"), "depends_on": ["train"]},
    ])
    s1 = sched(cfg)
    running = wait_running(base, "prep")
    kill_groups_later.append(running["prep"]["pid"])
    s1.crash()
    marks.open("prep")
    wait_ended(running["prep"]["work_dir"])
    s2 = sched(cfg)
    assert s2.wait(60) == 1, s2.output()  # it once waited for "prep" forever
    out = s2.output()
    assert re.search(r"skipped\s+train \(dependency failed: prep\)", out), out
    assert re.search(r"skipped\s+eval \(dependency failed: prep\)", out), out
    assert marks.runs("train") == [] and marks.runs("eval") == []
    errors = {i["name"]: i for i in state(base)["errors"]}
    assert set(errors) == {"prep", "train", "eval"}
    assert errors["prep"]["exit_code"] == 2 and errors["prep"]["ended_at"], errors["prep"]


def test_a_run_that_failed_while_no_scheduler_ran_is_retried_in_its_directory(tmp_path, marks, sched,
                                                                            kill_groups_later):
    base = tmp_path / "results"
    flag = marks.dir / "failed-once"
    cmd = f'if [ -e "{flag}" ]; then {marks.quick("flaky")}; else touch "{flag}"; {marks.gated("flaky", 1)}; fi'
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "flaky", "command": cmd, "max_retries": 1}],
                       auto_restart_on_error=True)
    s1 = sched(cfg)
    running = wait_running(base, "flaky")
    kill_groups_later.append(running["flaky"]["pid"])
    s1.crash()
    marks.open("flaky")
    assert wait_ended(running["flaky"]["work_dir"])["exit_code"] == 1
    s2 = sched(cfg)
    assert s2.wait() == 0, s2.output()
    out = s2.output()
    assert "retrying flaky (attempt 2/2): it failed while no scheduler watched" in out, out
    d = only_dir(base, "flaky")  # the retry goes in the same directory
    assert [r["status"] for r in read_meta(d)["runs"]] == ["error", "finished"]
    assert read_meta(d)["status"] == "finished"


def test_a_run_that_ends_while_its_killed_scheduler_is_an_unreaped_zombie_gets_its_end(tmp_path, marks, sched,
                                                                                       kill_groups_later):
    # kill -0 answers for a zombie: the supervisor once took the dead scheduler for a live one.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "z", "command": marks.gated("z")}])
    s1 = sched(cfg)
    running = wait_running(base, "z")
    kill_groups_later.append(running["z"]["pid"])
    os.kill(s1.pid, signal.SIGKILL)  # and not reaped yet

    def state_of(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    wait_for(lambda: state_of(s1.pid) == "Z", 15, what="the scheduler to be a zombie")
    marks.open("z")
    run = wait_ended(running["z"]["work_dir"])
    assert state_of(s1.pid) == "Z"  # recorded while the zombie was still there
    assert (run["status"], run["exit_code"]) == ("finished", 0) and run["duration"] < 15, run
    assert s1.wait() == -signal.SIGKILL


def test_tasks_a_joining_run_added_are_recovered_from_their_config(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "long", "command": marks.gated("long")},
        {"name": "p1", "command": marks.quick("p1")},
    ], max_concurrent_experiments=2)
    other = write_config(tmp_path / "other.toml", base, [
        {"name": "joined_run", "command": marks.gated("joined_run"), "priority": 5},
        {"name": "joined_wait", "command": marks.quick("joined_wait")},
    ])
    s1 = sched(cfg)
    wait_running(base, "long")
    wait_for(lambda: in_state(base, "finished", "p1"), 30, what="p1 to finish")
    r = subprocess.run([PY, EXP_PY, "run", str(other)], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    running = wait_running(base, "long", "joined_run")
    kill_groups_later.extend(x["pid"] for x in running.values())
    assert in_state(base, "pending", "joined_wait")
    s1.crash()
    s2 = sched(cfg)  # the first config only: the joined tasks come back from other.toml
    wait_for(lambda: len(re.findall(r"\] adopted\s", s2.output())) == 2, 30, what="both runs adopted")
    marks.open("long")
    marks.open("joined_run")
    assert s2.wait() == 0, s2.output()
    out = s2.output()
    assert "recovered 2 task(s) added from other.toml" in out, out
    assert "warning" not in out, out
    for name in ("long", "p1", "joined_run", "joined_wait"):
        assert len(marks.runs(name)) == 1, (name, out)
        assert len(dirs_of(base, name)) == 1, name
    assert sorted(i["name"] for i in state(base)["finished"]) == ["joined_run", "joined_wait", "long", "p1"]


def test_tasks_of_the_dead_scheduler_that_no_config_has_are_named(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "long", "command": marks.gated("long")}])
    other = write_config(tmp_path / "other.toml", base, [{"name": "gone", "command": marks.quick("gone")}])
    s1 = sched(cfg)
    kill_groups_later.extend(x["pid"] for x in wait_running(base, "long").values())
    r = subprocess.run([PY, EXP_PY, "run", str(other)], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: in_state(base, "pending", "gone"), 30, what="the joined task in the state file")
    s1.crash()
    other.unlink()  # its config is gone: nothing can rebuild the task
    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restart to adopt")
    marks.open("long")
    assert s2.wait() == 0, s2.output()
    out = s2.output()
    assert "tasks added from other.toml are not recovered" in out, out
    assert "1 task(s) of the scheduler that died are in no config this one has: gone (pending)" in out, out
    assert marks.runs("gone") == []


def test_an_unreadable_state_file_is_kept_aside_not_overwritten(tmp_path, sched):
    base = tmp_path / "results"
    state_dir = base / ".exp_state"
    state_dir.mkdir(parents=True)
    garbage = b'{"pending": [{"name": "half-written by hand'
    (state_dir / "scheduler_state.json").write_bytes(garbage)
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "a", "command": "true"}])
    s = sched(cfg)
    assert s.wait() == 0, s.output()
    kept = [p for p in state_dir.iterdir() if p.name.startswith("scheduler_state.json.unreadable-")]
    assert len(kept) == 1, sorted(p.name for p in state_dir.iterdir())
    assert kept[0].read_bytes() == garbage
    out = s.output()
    assert "the previous state file cannot be read" in out and kept[0].name in out, out
    assert state(base)["summary"]["finished"] == 1  # and a new state file is written as usual


def test_resume_with_dry_run_and_when_joining_skips_what_finished(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    flag = tmp_path / "fixed"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "ok", "command": marks.quick("ok")},
        {"name": "bad", "command": marks.quick("bad") + f' && [ -e "{flag}" ]'},
    ])
    assert sched(cfg).wait() == 1
    r = subprocess.run([PY, EXP_PY, "run", str(cfg), "--resume", "--dry-run"], capture_output=True, text=True,
                       env=child_env(), timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    plan = r.stdout.splitlines()
    assert [ln.split()[1] for ln in plan[1:-1]] == ["bad"], r.stdout  # "ok" finished: --resume skips it
    assert "1 experiment(s)" in plan[-1] and "--resume skips 1 that finished before: ok (results/ok_" in plan[-1]
    # Joining a running scheduler with --resume skips them too (it was ignored).
    holder = write_config(tmp_path / "h.toml", base, [{"name": "holder", "command": marks.gated("holder")}],
                          max_concurrent_experiments=2)
    s = sched(holder)
    kill_groups_later.extend(x["pid"] for x in wait_running(base, "holder").values())
    flag.touch()
    r = subprocess.run([PY, EXP_PY, "run", str(cfg), "--resume"], capture_output=True, text=True,
                       env=child_env(), timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"queued \d+ bad", r.stdout) and "ok" not in r.stdout.split("added to")[0], r.stdout
    wait_for(lambda: in_state(base, "finished", "bad"), 30, what="bad to run again and finish")
    marks.open("holder")
    assert s.wait() == 0, s.output()
    assert "--resume: 1 experiment(s) already finished here are skipped" in s.output(), s.output()
    assert len(marks.runs("ok")) == 1 and len(marks.runs("bad")) == 2


def test_retry_of_a_task_recovered_as_failed_runs_in_its_directory(tmp_path, marks, sched, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "a", "command": marks.quick("a") + '; [ "$EXPERIMENT_RUN_ID" = run_0002 ]'},
        {"name": "b", "command": marks.gated("b")},
    ], max_concurrent_experiments=2)
    s1 = sched(cfg)
    kill_groups_later.extend(x["pid"] for x in wait_running(base, "b").values())
    wait_for(lambda: in_state(base, "errors", "a"), 30, what="a to fail")
    s1.crash()
    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restart to adopt b")
    r = subprocess.run([PY, EXP_PY, "retry", "a", "--dir", str(base)], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: in_state(base, "finished", "a"), 30, what="the retry of a to finish")
    marks.open("b")
    assert s2.wait() == 0, s2.output()
    (d,) = dirs_of(base, "a")  # the same directory: run_0002 beside run_0001
    assert [r["status"] for r in read_meta(d)["runs"]] == ["error", "finished"]


# ============================================================================
# Ends recorded by the supervisor; exit codes through it
# ============================================================================


def gated(gate: Path) -> str:
    """A shell command that waits (at most about a minute) for the file ``gate``."""
    return f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'


def start_orphan(run_py, tmp_path: Path, kill_groups_later: list, command: str, prelude: str = "") -> tuple[str, int]:
    """A background ``Experiment.run`` of ``command`` whose parent (a child Python, after ``prelude``)
    exits at once, leaving the run to its supervisor; its (work_dir, pid)."""
    r = run_py("import json, sys\nimport exp\n" + textwrap.dedent(prelude) + textwrap.dedent(f"""
        e = exp.Experiment("bg", {command!r}, base_dir=sys.argv[1])
        h = e.run(background=True)
        print(json.dumps([e.work_dir, h.pid]))
    """), tmp_path / "results")
    assert r.returncode == 0, r.stderr
    work_dir, pid = json.loads(r.stdout)
    kill_groups_later.append(pid)
    return work_dir, pid


@pytest.mark.parametrize("how, code, reason", [
    ("exit 3", 3, "exit code 3"),
    (f'{PY} -c "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"', -9, "signal SIGKILL"),
])
def test_a_background_run_whose_parent_exits_still_gets_its_end(tmp_path, run_py, kill_groups_later, how, code, reason):
    gate = tmp_path / "go"
    work_dir, pid = start_orphan(run_py, tmp_path, kill_groups_later, f"{gated(gate)}; {how}")
    assert read_meta(work_dir)["status"] == "running"
    gate.touch()
    run = wait_ended(work_dir)
    wait_for(lambda: pid_gone(pid), 15, what="the supervisor to go")
    meta = read_meta(work_dir)
    assert (meta["status"], meta["exit_code"], run["exit_code"]) == ("error", code, code), meta
    assert meta["reason"].startswith(reason), meta
    assert meta["pid"] is None and meta["duration"] >= 0
    log = log_text(work_dir)
    assert f"[exp] exit status {code if code > 0 else 128 - code}" in log, log
    assert re.search(r"\[exp\] \S+ run_0001 ended: ", log), log


def test_an_orphan_end_is_timed_by_the_supervisor_not_by_the_recorder(tmp_path, run_py, kill_groups_later):
    """The recorder is a Python start, slow on a loaded machine (here made 3 s late): the end time and
    duration recorded are the command's, which the supervisor passes along, not the recorder's clock."""
    from datetime import datetime

    gate = tmp_path / "go"
    t0 = time.time()
    work_dir, pid = start_orphan(run_py, tmp_path, kill_groups_later, gated(gate), prelude="""
        recorder = exp.record_end_command
        exp.record_end_command = lambda wd, rid: ["sh", "-c", 'sleep 3; exec "$@"', "sh", *recorder(wd, rid)]
    """)
    gate.touch()
    t_gate = time.time()
    run = wait_ended(work_dir, timeout=60)
    meta = read_meta(work_dir)
    assert (meta["status"], meta["exit_code"]) == ("finished", 0), meta
    # The command ended within a poll of the gate; the recorder ran 3 s later.
    assert 0 <= meta["duration"] <= t_gate - t0 + 1.5, (meta["duration"], t_gate - t0)
    assert datetime.fromisoformat(run["ended_at"]).timestamp() <= t_gate + 1.5, (run["ended_at"], t_gate)
    assert meta["ended_at"] == run["ended_at"]


def test_record_end_verb_takes_the_times_given_and_older_supervisors_calls(make_exp, tmp_path):
    """``_record-end DIR RUN STATUS [ENDED [STARTED]]``: the times are used as given; without them (a
    supervisor started by an older exp) or unreadable (a `date` without %N), the end is now."""
    from datetime import datetime

    def running_dir(name):
        e = make_exp(name, "exit 0")
        assert e.run() == 0
        meta = read_meta(e.work_dir)
        for entry in (meta, meta["runs"][-1]):  # as if its end had not been recorded
            entry.update(status="running", ended_at=None, exit_code=None, duration=None)
        Path(e.work_dir, "metadata.json").write_text(json.dumps(meta))
        return e.work_dir

    now = time.time()
    cases = [([f"{now - 50:.3f}", f"{now - 100.5:.3f}"], float(f"{now - 50:.3f}"), 50.5),
             ([f"{int(now - 50)}.N"], None, None),
             ([], None, None)]
    for i, (times, ended, duration) in enumerate(cases):
        work_dir = running_dir(f"orphan{i}")
        before = time.time()
        r = subprocess.run([PY, "-I", EXP_PY, "_record-end", work_dir, "run_0001", "3", *times],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        meta = read_meta(work_dir)
        assert (meta["status"], meta["exit_code"]) == ("error", 3), meta
        at = datetime.fromisoformat(meta["ended_at"]).timestamp()
        if ended is not None:
            assert meta["duration"] == duration
            assert at == int(ended)
        else:
            assert int(before) <= at <= time.time()


def test_record_end_verb_keeps_an_end_already_recorded(make_exp, tmp_path):
    e = make_exp("twice", "exit 4")
    assert e.run() == 4
    before = read_meta(e.work_dir)
    r = subprocess.run([PY, "-I", EXP_PY, "_record-end", e.work_dir, "run_0001", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert read_meta(e.work_dir) == before
    assert log_text(e.work_dir).count(" ended: ") == 1


@pytest.mark.parametrize("command, code", [
    ("exit 5", 5),
    ("echo before; exit 5; echo after", 5),
    ("exec sh -c 'exit 7'", 7),
    ('exec python3 -c "import sys; sys.exit(9)"', 9),
    ("true", 0),
])
def test_exit_and_exec_in_the_command(make_exp, command, code):
    e = make_exp("codes", command)
    assert e.run() == code
    meta = read_meta(e.work_dir)
    assert (meta["exit_code"], meta["status"]) == (code, "finished" if code == 0 else "error")
    log = log_text(e.work_dir)
    assert f"[exp] exit status {code}" in log
    assert "after" not in [ln for ln in log.splitlines() if not ln.startswith("[exp]")]


def test_a_command_that_exits_does_not_skip_its_end_line(make_exp):
    e = make_exp("lines", "echo out; exit 2")
    assert e.run() == 2
    lines = [ln for ln in log_text(e.work_dir).splitlines() if ln.strip()]
    assert lines[-3:-1] == ["out", "[exp] exit status 2"]
    assert " ended: exit code 2 (error)" in lines[-1]


def test_terminate_and_kill_by_exp_report_the_signal(make_exp, tmp_path):
    ready = tmp_path / "ready"
    e = make_exp("term", f'exec sh -c \'touch "{ready}"; exec sleep 60\'')
    h = e.start()
    wait_for(ready.exists, 15, what="the command to start")
    assert h.terminate(grace=10) == -signal.SIGTERM
    meta = read_meta(e.work_dir)
    assert (meta["status"], meta["exit_code"]) == ("killed", -signal.SIGTERM)
    assert "[exp] exit status 143" in log_text(e.work_dir)

    ready2 = tmp_path / "ready2"
    stubborn = (f'{PY} -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
                f'open(\'{ready2}\', \'w\').close(); time.sleep(60)"')
    e2 = make_exp("stubborn", stubborn)
    h2 = e2.start()
    wait_for(ready2.exists, 15, what="the stubborn command to start")
    assert h2.terminate(grace=0.5) == -signal.SIGKILL
    meta = read_meta(e2.work_dir)
    assert (meta["status"], meta["exit_code"]) == ("killed", -signal.SIGKILL)

    # kill(): no grace; a command that dies of the SIGTERM sent first may report that.
    e3 = make_exp("killed", "sleep 60")
    h3 = e3.start()
    assert h3.kill() in (-signal.SIGTERM, -signal.SIGKILL)
    meta = read_meta(e3.work_dir)
    assert (meta["status"], meta["exit_code"]) == ("killed", h3.returncode)


def test_resume_after_a_crash_does_not_count_a_recovered_run_twice(tmp_path, marks, sched, kill_groups_later):
    """Repeat 1 ends while the scheduler is dead; `run --resume` must still run repeat 2."""
    base = tmp_path / "results"
    gate = marks.dir / "r.go"
    cfg = write_config(tmp_path / "c.toml", base, [{
        "name": "r", "repeats": 2,
        "command": marks.quick("r") + f'; [ "$EXPERIMENT_REPEAT" -ne 1 ] || while [ ! -e "{gate}" ]; do sleep 0.05; done',
    }])
    s1 = sched(cfg)
    run = wait_running(base, "r")["r"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    marks.open("r")
    assert wait_ended(run["work_dir"])["status"] == "finished"
    s2 = sched(cfg, "--resume")
    assert s2.wait() == 0, s2.output()
    assert [ln.split()[1] for ln in marks.runs("r")] == ["1", "2"], s2.output()
    assert len(dirs_of(base, "r")) == 2
    assert sorted(i["repeat"] for i in state(base)["finished"]) == [1, 2]


def test_an_end_nobody_recorded_is_taken_from_the_exit_status_line(tmp_path, marks, sched, kill_groups_later):
    """The supervisor wrote the exit status line, but its recorder never got to record the end (here it
    waits for the directory's lock and is killed with its group): the restart records that line."""
    import fcntl

    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "three", "command": marks.gated("three", 3)}])
    s1 = sched(cfg)
    run = wait_running(base, "three")["three"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    lock = os.open(run["work_dir"], os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what update_metadata takes
        marks.open("three")
        wait_for(lambda: "[exp] exit status 3" in log_text(run["work_dir"]), 15, what="the status line")
        time.sleep(0.5)  # the recorder starts and waits for the lock
        os.killpg(run["pid"], signal.SIGKILL)
        wait_for(lambda: pid_gone(run["pid"]), 15, what="the supervisor to go")
    finally:
        os.close(lock)
    assert read_meta(run["work_dir"])["status"] == "running"
    s2 = sched(cfg)
    assert s2.wait() == 1
    assert "0 adopted, 1 ended meanwhile" in s2.output(), s2.output()
    meta = read_meta(run["work_dir"])
    assert (meta["status"], meta["exit_code"], meta["reason"]) == ("error", 3, "exit code 3")
    assert len(marks.runs("three")) == 1 and len(meta["runs"]) == 1


def test_a_task_between_attempts_continues_in_its_directory(tmp_path, marks, sched):
    base = tmp_path / "results"
    flag = tmp_path / "fixed"
    cfg = write_config(tmp_path / "c.toml", base, [{
        "name": "flaky", "command": marks.quick("flaky") + f'; [ -e "{flag}" ]', "max_retries": 1,
        "delay_seconds": 2}], auto_restart_on_error=True)
    s1 = sched(cfg)
    wait_for(lambda: (lambda i: i and i.get("attempt") == 1 and i.get("work_dir"))(in_state(base, "pending", "flaky")),
             30, what="the first attempt to fail and the retry to wait")
    s1.crash()
    assert len(marks.runs("flaky")) == 1
    flag.touch()
    s2 = sched(cfg)
    assert s2.wait() == 0, s2.output()
    assert re.search(r"started\s+flaky \(attempt 2/2", s2.output()), s2.output()
    work_dir = only_dir(base, "flaky")
    meta = read_meta(work_dir)
    assert [r["status"] for r in meta["runs"]] == ["error", "finished"] and meta["status"] == "finished"
    assert len(marks.runs("flaky")) == 2


@pytest.mark.parametrize("manager_state", ["alive", "alive_in_a_deleted_directory", "zombie", "gone"])
def test_the_supervisor_records_the_end_itself_only_when_its_starter_is_gone(tmp_path, manager_state):
    # The supervisor asks /proc whether the process that started it still lives: a
    # zombie or a vanished pid means nobody will record the end, a live process
    # (even one whose working directory was removed meanwhile) will.
    flag = tmp_path / "recorded"
    recorder = ["sh", "-c", 'echo "$@" > "$0"', str(flag)]
    cwd = tmp_path / "manager_cwd"
    cwd.mkdir()
    manager = subprocess.Popen(["sleep", "60"], cwd=cwd)
    try:
        if manager_state == "alive_in_a_deleted_directory":
            cwd.rmdir()
        elif manager_state == "zombie":
            manager.kill()
            wait_for(lambda: Path(f"/proc/{manager.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                     10, what="a zombie")
        elif manager_state == "gone":
            manager.kill()
            manager.wait()
        text = exp.supervised_command("exit 3", recorder, manager.pid)
        r = subprocess.run(["sh", "-c", text], capture_output=True, text=True, timeout=30)
        assert r.returncode == 3
        assert r.stdout.strip().endswith("[exp] exit status 3"), r.stdout
        if manager_state.startswith("alive"):
            assert not flag.exists(), flag.read_text()
        else:
            fields = flag.read_text().split()
            assert fields[0] == "3" and abs(float(fields[1]) - time.time()) < 30, fields
    finally:
        manager.kill()
        manager.wait()


def test_a_damaged_state_file_of_a_dead_scheduler_never_stops_the_next_one(tmp_path, capsys):
    # The state file of a scheduler that died is read to take over its queue. A
    # hand-edited or damaged one (a list where a number goes, a number where a list
    # goes) once crashed the new scheduler before it ran anything: now every task of
    # the config runs, once, whatever the old file says.
    import random

    odd = [5, "x", None, True, 1.5, [], {}, [1, "a"], {"a": 1}, -1, [None], [{}], "9999-99-99"]
    fields = ["id", "name", "status", "assigned_gpus", "attempt", "reason", "started_at", "ended_at", "duration",
              "work_dir", "run_id", "pid", "exit_code", "params", "command", "repeat", "config", "job"]
    rng = random.Random(11)
    states = [{"running": [{"name": "a", "command": "true", "repeat": [1], "status": "running"}],
               "summary": {"status_indicator": "running", "started_at": "2020-01-01T00:00:00"}},
              {"running": [{"name": "a", "command": "true", "repeat": 1, "status": "running", "assigned_gpus": 5,
                            "work_dir": str(tmp_path), "run_id": "run_0001", "pid": 1}],
               "summary": {"status_indicator": "running"}},
              {"pending": 7, "running": {"a": 1}, "summary": {"status_indicator": "running"}}]
    for _ in range(40):
        st: dict = {"summary": {"status_indicator": "running", "started_at": rng.choice(odd)}}
        for g in ("running", "pending", "errors", "finished"):
            st[g] = rng.choice(odd) if rng.random() < 0.2 else [
                dict({"name": "a", "command": "true", "repeat": rng.choice([1, 2]),
                      "status": rng.choice(["running", "pending", "finished", "error"])},
                     **{f: rng.choice(odd) for f in rng.sample(fields, 3)})
                for _ in range(rng.randint(0, 2))]
        states.append(st)
    for i, st in enumerate(states):
        base = tmp_path / f"b{i}"
        (base / ".exp_state").mkdir(parents=True)
        (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps(st))
        cfg = write_config(tmp_path / f"c{i}.toml", base, [{"name": "a", "command": "true", "repeats": 2}])
        code = exp.main(["run", str(cfg)])
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err, (st, out)
        assert code in (0, 1), (st, out)
        final = json.loads((base / ".exp_state" / "scheduler_state.json").read_text())
        assert final["summary"]["status_indicator"] == "stopped", st
        assert not final["pending"] and not final["running"], (st, final)
        assert len(final["finished"]) + len(final["errors"]) == 2, (st, final)


def test_resume_over_directories_whose_metadata_has_wrong_types(tmp_path):
    # --resume compares every directory's name, command and sweep values with the
    # config's: a metadata.json with a list for a name once crashed `exp run --resume`.
    base = tmp_path / "results"
    odd = [["a"], {"x": 1}, 5, None, [1, "a"], True]
    for i, value in enumerate(odd):
        d = base / f"a_2020-01-01__00-00-0{i}"
        d.mkdir(parents=True)
        (d / "metadata.json").write_text(json.dumps({"name": value, "command": value, "status": "finished",
                                                     "params": value}))
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "a", "command": "true"}])
    for extra in (["--dry-run"], []):
        r = subprocess.run([PY, EXP_PY, "run", "--resume", *extra, str(cfg)], capture_output=True, text=True,
                           env=child_env(), timeout=60)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert "skips" not in r.stdout, r.stdout  # none of them is this task's
    assert len(dirs_of(base, "a")) == len(odd) + 1  # it ran, in a directory of its own


# ============================================================================
# Repeats, GPUs and half-made starts across a crash
# ============================================================================


def test_resume_reruns_the_repeat_that_failed_not_another(tmp_path, marks, sched):
    # Repeat 1 fails; --resume once took the directories of 2 and 3 (in listing order) for
    # repeats 1 and 2, and ran repeat 3 a second time: seed 1 never succeeded, seed 3 twice.
    base = tmp_path / "results"
    flag = tmp_path / "fixed"
    cfg = write_config(tmp_path / "c.toml", base, [
        {"name": "seeds", "repeats": 3,
         "command": marks.quick("seeds") + f'; [ "$EXPERIMENT_REPEAT" -ne 1 ] || [ -e "{flag}" ]'}])
    assert sched(cfg).wait() == 1
    assert sorted(read_meta(d)["repeat"] for d in dirs_of(base, "seeds")) == [1, 2, 3]
    flag.touch()
    r = subprocess.run([PY, EXP_PY, "run", str(cfg), "--resume", "--dry-run"], cwd=str(tmp_path),
                       env=child_env(NO_COLOR="1"), capture_output=True, text=True, timeout=60)
    assert "seeds #2/3" in r.stdout and "seeds #3/3" in r.stdout and "seeds #1/3" not in r.stdout.split(
        "skips", 1)[1].split("\n", 1)[0], r.stdout
    s = sched(cfg, "--resume")
    assert s.wait() == 0, s.output()
    assert [line.split()[1] for line in marks.runs("seeds")] == ["1", "2", "3", "1"], marks.runs("seeds")
    assert re.search(r"started\s+seeds #1/3", s.output()) and "seeds #3/3" not in s.output().split(
        "--resume:", 1)[1], s.output()


def fake_dead_scheduler(base: Path, since: str, pending: list[dict], running: list[dict] = ()) -> None:
    """The state file of a scheduler of ``base`` that died (not "stopped") while these tasks were queued."""
    (base / ".exp_state").mkdir(parents=True, exist_ok=True)
    (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps({
        "summary": {"status_indicator": "running", "pid": 1, "started_at": since}, "running": list(running),
        "finished": [], "errors": [], "pending": pending}))


def fake_started_dir(base: Path, name: str, command: str, since: str, pid: int | None, **meta) -> Path:
    """A directory the dead scheduler made for ``name``, its run_0001 marked running (pid ``pid``)."""
    d = base / f"{name}_2026-01-01__00-00-0{len(list(base.glob(name + '_*')))}"
    (d / "terminal_logs").mkdir(parents=True)
    (d / "metrics").mkdir()
    (d / "terminal_logs" / "run_0001.log").write_text(f"[exp] {since} run_0001 of {name!r} starting\n")
    entry = {"id": "run_0001", "pid": pid, "started_at": since, "ended_at": None, "status": "running"}
    if pid is not None:
        entry["start_ticks"] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    (d / "metadata.json").write_text(json.dumps({
        "name": name, "command": command, "status": "running", "current_run_id": "run_0001", "created_at": since,
        "params": {}, "hostname": exp._hostname(), "runs": [entry], **meta}))
    return d


def test_a_repeat_started_just_before_the_crash_is_adopted_as_its_own_repeat(tmp_path, marks, sched,
                                                                             kill_groups_later):
    # The dead scheduler had started repeat 2 only, before its state file said where; the
    # restart took that directory for repeat 1 (the first without one) and ran repeat 2 again.
    base = tmp_path / "results"
    cmd = marks.gated("s")
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "s", "command": cmd, "repeats": 2}],
                       max_concurrent_experiments=2)
    since = exp.now_iso()
    run = subprocess.Popen(["sh", "-c", cmd], start_new_session=True,
                           env=child_env(EXPERIMENT_RUN_ID="run_0001", EXPERIMENT_REPEAT="2"))
    kill_groups_later.append(run.pid)
    d = fake_started_dir(base, "s", cmd, since, run.pid, repeat=2)
    fake_dead_scheduler(base, since, [{"name": "s", "command": cmd, "params": {}, "repeat": r,
                                       "status": "pending", "attempt": 0} for r in (1, 2)])
    s = sched(cfg)
    wait_for(lambda: "adopted" in s.output(), 30, what="the restart to adopt repeat 2")
    assert re.search(r"adopted\s+s #2/2 \(pid \d+", s.output()), s.output()
    marks.open("s")
    s.wait()
    assert run.wait(30) == 0
    assert re.findall(r"\] started\s+(s #\d/2)", s.output()) == ["s #1/2"], s.output()
    assert sorted(read_meta(x).get("repeat") for x in dirs_of(base, "s")) == [1, 2]
    assert read_meta(d)["repeat"] == 2 and len(read_meta(d)["runs"]) == 1


def test_gpus_of_a_run_adopted_from_its_directory_are_not_given_out_again(tmp_path, marks, sched,
                                                                          kill_groups_later):
    # Adopted from its directory (the state file did not list it as running yet), its GPU
    # counted as free: the next task was started on it while it still ran.
    base = tmp_path / "results"
    cmd = marks.quick("g") + f'; echo "$EXPERIMENT_REPEAT $CUDA_VISIBLE_DEVICES" >> "{tmp_path}/cvd"; ' \
        + marks.gated("g_go").split("; ", 1)[1]
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "g", "command": cmd, "repeats": 2, "gpus": 1}],
                       max_concurrent_experiments=2, gpus=[0], check_interval=0.2)
    since = exp.now_iso()
    run = subprocess.Popen(["sh", "-c", marks.gated("held")], start_new_session=True, env=child_env())
    kill_groups_later.append(run.pid)
    fake_started_dir(base, "g", cmd, since, run.pid, repeat=1, gpu_ids=[0])
    fake_dead_scheduler(base, since, [{"name": "g", "command": cmd, "params": {}, "repeat": r,
                                       "status": "pending", "attempt": 0, "assigned_gpus": []} for r in (1, 2)])
    s = sched(cfg)
    wait_for(lambda: "adopted" in s.output(), 30, what="the restart to adopt repeat 1")
    time.sleep(1.5)  # several plans (check_interval 0.2): repeat 2 must not start on GPU 0 meanwhile
    assert "started" not in s.output(), s.output()
    marks.open("held")
    marks.open("g_go")
    assert run.wait(30) == 0
    s.wait()
    assert re.search(r"started\s+g #2/2 \(attempt 1/1, GPUs 0\)", s.output()), s.output()
    assert (tmp_path / "cvd").read_text().split("\n")[0] == "2 0"


def test_a_run_left_by_a_crash_is_adopted_by_its_config_even_after_another_batch_ran_between(
        tmp_path, marks, sched, kill_groups_later):
    # Scheduler 1 (c.toml) dies while "long" runs; scheduler 2 runs another config in the same base
    # directory and ends; then c.toml runs again, as scheduler 2's warning said.  "long" was still
    # running: it must be adopted, not started a second time beside itself.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "long", "command": marks.gated("long")},
                                                   {"name": "short", "command": marks.quick("short")}],
                       max_concurrent_experiments=2, check_interval=0.2)
    other = write_config(tmp_path / "other.toml", base, [{"name": "other", "command": marks.quick("other")}])
    s1 = sched(cfg)
    wait_for(lambda: marks.runs("short") and [t["name"] for t in (try_state(base) or {}).get("running", [])]
             == ["long"], 30, what="the state file to say that long runs")
    s1.crash()
    s2 = sched(other)
    assert s2.wait() == 0, s2.output()
    out = s2.output()
    assert "1 task(s) of the scheduler that died are in no config this one has: long (running)" in out, out
    assert "1 still running: they go on, listed as running here, and a scheduler of their config adopts " \
           "them rather than start them again" in out, out
    state = json.loads((base / ".exp_state" / "scheduler_state.json").read_text())
    assert state["summary"]["status_indicator"] == "stopped"
    assert [(t["name"], t.get("orphan")) for t in state["running"]] == [("long", True)]
    r = run_exp("status", base)
    assert "long" in r.stdout, r.stdout

    s3 = sched(cfg)
    wait_for(lambda: "adopted  long" in s3.output(), 30, what="scheduler 3 to adopt long")
    marks.open("long")
    assert s3.wait() == 0, s3.output()
    assert len(marks.runs("long")) == 1, s3.output()  # never a second copy
    assert len(dirs_of(base, "long")) == 1
    assert read_meta(dirs_of(base, "long")[0])["status"] == "finished"
    state = json.loads((base / ".exp_state" / "scheduler_state.json").read_text())
    assert not [t for t in state["running"] if t.get("orphan")]


def test_a_still_running_run_of_an_edited_task_keeps_its_gpus(tmp_path, marks, sched, kill_groups_later):
    # The config was edited after the crash: the old run is "in no config", but it still holds its
    # GPU, which was given to the new task at once.
    base = tmp_path / "results"
    since = exp.now_iso()
    old_cmd = marks.gated("old")
    run = subprocess.Popen(["sh", "-c", old_cmd], start_new_session=True, env=child_env())
    kill_groups_later.append(run.pid)
    d = fake_started_dir(base, "train", old_cmd, since, run.pid, gpu_ids=[0])
    fake_dead_scheduler(base, since, [], running=[{
        "name": "train", "command": old_cmd, "params": {}, "repeat": 1, "status": "running", "attempt": 1,
        "work_dir": str(d), "run_id": "run_0001", "pid": run.pid, "assigned_gpus": [0]}])
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "train", "command": marks.quick("new"), "gpus": 1}],
                       gpus=[0], check_interval=0.2)
    s = sched(cfg)
    wait_for(lambda: "in no config" in s.output(), 30, what="the warning about the old run")
    assert "GPUs 0 stay taken until they end" in s.output(), s.output()
    time.sleep(1.5)  # several plans: the new task must wait for GPU 0
    assert marks.runs("new") == [] and "started" not in s.output(), s.output()
    marks.open("old")
    assert run.wait(30) == 0
    assert s.wait() == 0, s.output()
    assert len(marks.runs("new")) == 1


def test_a_directory_whose_command_never_started_is_reused_not_left_running(tmp_path, marks, sched):
    # Killed between marking the run "running" and starting its command: the directory stayed
    # "running" for ever and the task ran again in a new one.
    base = tmp_path / "results"
    cmd = marks.quick("n")
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "n", "command": cmd}])
    since = exp.now_iso()
    d = fake_started_dir(base, "n", cmd, since, None, repeat=1)
    fake_dead_scheduler(base, since, [{"name": "n", "command": cmd, "params": {}, "repeat": 1,
                                       "status": "running", "attempt": 1}])
    s = sched(cfg)
    assert s.wait() == 0, s.output()
    assert dirs_of(base, "n") == [d]
    meta = read_meta(d)
    assert meta["status"] == "finished" and [r["id"] for r in meta["runs"]] == ["run_0001", "run_0002"]
    first = meta["runs"][0]
    assert (first["status"], first["reason"]) == ("killed", "never started: the scheduler was killed while starting it")
    assert len(marks.runs("n")) == 1 and "attempt 1/1" in s.output(), s.output()


def test_an_adopted_run_that_needs_sigkill_is_recorded_killed(tmp_path, marks, sched, kill_groups_later):
    # A run that ignores SIGTERM, adopted after a crash, then stopped: its supervisor dies with it
    # (SIGKILL), so nobody knows its exit status; that ended in an internal error and an end
    # "that could not be recorded".
    base = tmp_path / "results"
    cmd = marks.quick("stubborn") + "; trap '' TERM; while true; do sleep 0.1; done"
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "stubborn", "command": cmd}], kill_timeout=1)
    s1 = sched(cfg)
    run = wait_running(base, "stubborn")["stubborn"]
    kill_groups_later.append(run["pid"])
    s1.crash()
    s2 = sched(cfg)
    wait_for(lambda: "adopted" in s2.output(), 30, what="the restarted scheduler to adopt")
    os.kill(s2.pid, signal.SIGINT)
    assert s2.wait() == 130
    out = s2.output()
    assert "could not be recorded" not in out and "Error" not in out, out
    meta = read_meta(run["work_dir"])
    assert (meta["status"], meta["reason"]) == ("killed", "terminated by user"), meta
    assert pid_gone(run["pid"])


def test_empty_directories_the_dead_scheduler_made_are_removed(tmp_path, marks, sched):
    # Killed between making a directory and writing its metadata.json: the empty directory was
    # left for ever, invisible to `exp ls`.
    base = tmp_path / "results"
    cmd = marks.quick("e")
    cfg = write_config(tmp_path / "c.toml", base, [{"name": "e", "command": cmd}])
    old = base / "e_2020-01-01__00-00-00"
    for d in (old, base / "e_2026-01-01__00-00-01", base / "e_2026-01-01__00-00-02", base / "other_2026-01-01__00-00-00"):
        (d / "terminal_logs").mkdir(parents=True)
        (d / "metrics").mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # made before the dead scheduler started
    (base / "e_2026-01-01__00-00-02" / "terminal_logs" / "note.txt").write_text("keep me")
    since = exp.now_iso()
    time.sleep(1.1)  # the new directories are made after the dead scheduler started (to the second)
    for d in (base / "e_2026-01-01__00-00-01", base / "e_2026-01-01__00-00-02", base / "other_2026-01-01__00-00-00"):
        os.utime(d)
    fake_dead_scheduler(base, since, [{"name": "e", "command": cmd, "params": {}, "repeat": 1,
                                       "status": "running", "attempt": 1}])
    s = sched(cfg)
    assert s.wait() == 0, s.output()
    assert "removed results/e_2026-01-01__00-00-01: made just before the crash, empty" in s.output(), s.output()
    assert not (base / "e_2026-01-01__00-00-01").exists()
    # Kept: one that holds a file, one made earlier, one of a name no task has.
    assert (base / "e_2026-01-01__00-00-02" / "terminal_logs" / "note.txt").exists()
    assert old.exists() and (base / "other_2026-01-01__00-00-00").exists()
    assert len(marks.runs("e")) == 1
