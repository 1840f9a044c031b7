"""Timeouts and dependencies of batch experiments.

``timeout`` parsing is tested on parse_duration()/parse_config() directly;
timeouts run real children that ignore or trap SIGTERM, so exp must follow
with SIGKILL after ``kill_timeout``.  Dependencies run real batches through
``python exp.py run`` and check the order from the children's own recorded
start/end times (``time.time()``), and that a dependent of a failure never
ran (its marker file is absent).  No test depends on how fast the machine is.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import child_env, py_cmd, read_meta, read_state, run_exp, toml_text, write_script  # noqa: E402

CLI_TIMEOUT = 90

posix_batch = pytest.mark.skipif(
    os.name != "posix" or not sys.platform.startswith(("linux", "darwin")),
    reason="the scheduler runs commands in POSIX process groups",
)


# ============================================================================
# Helpers
# ============================================================================


def parse(body: str) -> exp.BatchConfig:
    return exp.parse_config(textwrap.dedent(body), "deps.toml", root=os.getcwd())


def problems(body: str) -> list[str]:
    with pytest.raises(exp.ConfigError) as info:
        parse(body)
    lines = str(info.value).splitlines()
    assert re.fullmatch(r"deps\.toml: \d+ problems?:", lines[0]), lines[0]
    return [ln.strip() for ln in lines[1:]]


def cli(*args, cwd, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_exp(*args, cwd=cwd, env=child_env(NO_COLOR="1", CUDA_VISIBLE_DEVICES=None), timeout=timeout)


# Records its start, sleeps HOLD seconds, records its end; exits CODE (0).
RECORDER_PY = """
import json, os, sys, time
out_dir, hold = sys.argv[1], float(sys.argv[2])
code = int(sys.argv[3]) if len(sys.argv) > 3 else 0
name, rep = os.environ["EXPERIMENT_NAME"], os.environ["EXPERIMENT_REPEAT"]
rec = {"name": name, "repeat": int(rep), "run_id": os.environ["EXPERIMENT_RUN_ID"],
       "work_dir": os.environ["EXPERIMENT_WORK_DIR"], "start": time.time()}
key = os.path.join(out_dir, f"{name}.{rep}.{rec['run_id']}")
with open(key + ".start", "w") as f:
    json.dump(rec, f)
time.sleep(hold)
rec["end"] = time.time()
with open(key + ".tmp", "w") as f:
    json.dump(rec, f)
os.replace(key + ".tmp", key + ".done")
sys.exit(code)
"""


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.script = write_script(tmp_path, "recorder.py", RECORDER_PY)
        self.out = tmp_path / "records"
        self.out.mkdir()
        self.base = tmp_path / "results"
        self.config = tmp_path / "batch.toml"

    def cmd(self, hold: float = 0.0, code: int = 0) -> str:
        return py_cmd(self.script, self.out, hold, code)

    def write(self, scheduler: dict, experiments: list[dict]) -> Path:
        sched = {"base_experiment_dir": str(self.base), "check_interval": 0.1, **scheduler}
        self.config.write_text(toml_text(sched, experiments), encoding="utf-8")
        return self.config

    def run(self, *extra) -> subprocess.CompletedProcess:
        return cli("run", *extra, self.config, cwd=self.root)

    def records(self, suffix: str = ".done") -> list[dict]:
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.out.iterdir())
                if p.name.endswith(suffix)]

    def of(self, name: str) -> list[dict]:
        return [r for r in self.records() if r["name"] == name]

    def one(self, name: str) -> dict:
        recs = self.of(name)
        assert len(recs) == 1, (name, recs)
        return recs[0]

    def started(self, name: str) -> bool:
        return any(r["name"] == name for r in self.records(".start"))

    def state(self) -> dict:
        return read_state(self.base)

    def items(self) -> dict[str, list[dict]]:
        """State file items by name (pending, running, finished and errors together)."""
        state = self.state()
        out: dict[str, list[dict]] = {}
        for key in ("pending", "running", "finished", "errors"):
            for item in state[key]:
                out.setdefault(item["name"], []).append(item)
        return out

    def item(self, name: str) -> dict:
        found = self.items()[name]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


# ============================================================================
# Durations (pure)
# ============================================================================


@pytest.mark.parametrize("value, seconds", [
    ("2h", 7200.0), ("90m", 5400.0), ("30s", 30.0), ("1h30m", 5400.0), ("1h 30m 15s", 5415.0),
    ("0.5s", 0.5), ("1.5h", 5400.0), (".5m", 30.0), ("2H", 7200.0), (" 10 s ", 10.0),
    ("45", 45.0), ("2.5", 2.5), (45, 45.0), (0.25, 0.25),
])
def test_parse_duration(value, seconds):
    assert exp.parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    0, -1, 0.0, "0s", "0", "", "   ", "soon", "2d", "5ms", "1h-30m", "-5s", "1e3", "s", "h30m x",
    True, None, [30], float("nan"), float("inf"), "inf", "nan",
])
def test_parse_duration_rejects(value):
    with pytest.raises(exp.ConfigError) as info:
        exp.parse_duration(value)
    assert str(info.value).startswith('expected a duration such as "2h", "90m", "30s" or a number of seconds > 0, got ')


def test_timeout_in_a_config():
    cfg = parse("""
        [[experiments]]
        name = "a"
        command = "true"
        timeout = "90m"
        [[experiments]]
        name = "b"
        command = "true"
        timeout = 12
        [[experiments]]
        name = "c"
        command = "true"
    """)
    assert [s.timeout for s in cfg.experiments] == [5400.0, 12.0, None]
    assert problems("""
        [[experiments]]
        name = "a"
        command = "true"
        timeout = "2 days"
        [[experiments]]
        name = "b"
        command = "true"
        timeout = 0
    """) == [
        'experiments[0].timeout: expected a duration such as "2h", "90m", "30s" or a number of seconds > 0, '
        "got '2 days'",
        'experiments[1].timeout: expected a duration such as "2h", "90m", "30s" or a number of seconds > 0, got 0',
    ]


def test_next_wakeup_counts_deadlines():
    jobs = exp.expand_jobs(parse('[[experiments]]\nname = "a"\ncommand = "true"\nrepeats = 2\n'))
    assert exp.next_wakeup(jobs, 10.0) is None
    assert exp.next_wakeup(jobs, 10.0, [15.0, 13.5]) == 3.5
    assert exp.next_wakeup(jobs, 10.0, [9.0]) == 0.0  # past: at once
    jobs[1].not_before = 12.0
    assert exp.next_wakeup(jobs, 10.0, [15.0]) == 2.0
    assert exp.next_wakeup([], 10.0, []) is None


# ============================================================================
# Timeouts (real children)
# ============================================================================


@posix_batch
def test_a_timeout_sends_sigterm_then_sigkill_to_a_child_that_ignores_it(rig):
    term = rig.root / "term.txt"
    started = rig.root / "started.txt"
    # The shell traps SIGTERM (writes it down and carries on); its sleeps die of it and are replaced.
    stubborn = (f"trap 'echo TERM >> {shlex.quote(str(term))}' TERM; echo up > {shlex.quote(str(started))}; "
                "while :; do sleep 0.05; done")
    ignoring = f"trap '' TERM; exec {rig.cmd(hold=120)}"  # SIGTERM ignored from the start, even by Python
    rig.write({"max_concurrent_experiments": 3, "kill_timeout": 1}, [
        {"name": "stubborn", "command": stubborn, "timeout": "1s"},
        {"name": "ignoring", "command": ignoring, "timeout": 1.5},
        {"name": "quick", "command": rig.cmd(), "timeout": "300s"},
    ])
    r = rig.run()
    assert r.returncode == 1, r.stdout + r.stderr
    assert started.read_text().strip() == "up"
    assert "TERM" in term.read_text()  # SIGTERM came first, and was survived
    for name in ("stubborn", "ignoring"):
        item = rig.item(name)
        assert item["status"] == "error" and item["reason"] == "timeout", item
        assert item["exit_code"] == -9, item  # it took SIGKILL
        m = read_meta(item["work_dir"])
        assert (m["status"], m["reason"], m["exit_code"]) == ("error", "timeout", -9), m
        assert m["runs"][-1]["reason"] == "timeout"
    assert rig.item("ignoring")["timeout"] == 1.5
    assert not rig.of("ignoring")  # never reached its end
    quick = rig.item("quick")
    assert quick["status"] == "finished" and quick["reason"] is None  # a timeout that never came
    out = r.stdout
    assert re.search(r"timeout\s+stubborn after 1(\.0)?s; stopping it", out), out
    assert re.search(r"stubborn: timeout\b", out), out  # the summary says why
    # ls shows the reason too.
    ls = cli("ls", rig.base, "--json", cwd=rig.root)
    assert ls.returncode == 0, ls.stderr
    reasons = {row["name"]: row.get("reason") for row in json.loads(ls.stdout)}
    assert reasons == {"stubborn": "timeout", "ignoring": "timeout", "quick": None}


@posix_batch
def test_a_timed_out_run_is_retried_when_retries_allow(rig):
    marker = shlex.quote(str(rig.root / "first_attempt"))
    # The first attempt hangs with SIGTERM ignored; the second succeeds at once.
    once = f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; trap '' TERM; sleep 120"
    always = "trap '' TERM; sleep 120"
    rig.write({"max_concurrent_experiments": 2, "kill_timeout": 0.3, "auto_restart_on_error": True}, [
        {"name": "once", "command": once, "timeout": "1s", "max_retries": 2},
        {"name": "always", "command": always, "timeout": "0.5s", "max_retries": 1},
    ])
    r = rig.run()
    assert r.returncode == 1, r.stdout + r.stderr
    once_item, always_item = rig.item("once"), rig.item("always")
    assert (once_item["status"], once_item["attempt"], once_item["reason"]) == ("finished", 2, None), once_item
    m = read_meta(once_item["work_dir"])
    assert [(x["status"], x.get("reason")) for x in m["runs"]] == [("error", "timeout"), ("finished", None)]
    assert m["runs"][1]["exit_code"] == 0
    assert (always_item["status"], always_item["attempt"], always_item["reason"]) == ("error", 2, "timeout")
    m = read_meta(always_item["work_dir"])
    assert [(x["status"], x.get("reason")) for x in m["runs"]] == [("error", "timeout")] * 2
    assert (m["status"], m["reason"]) == ("error", "timeout")
    assert re.search(r"retrying\s+once \(attempt 2/3\)", r.stdout), r.stdout
    assert re.search(r"retrying\s+always \(attempt 2/2\)", r.stdout), r.stdout


# ============================================================================
# Dependencies
# ============================================================================


@posix_batch
def test_dependents_start_after_their_dependencies_finished(rig):
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "eval", "command": rig.cmd(), "depends_on": ["train"], "priority": 9},
        {"name": "train", "command": rig.cmd(hold=0.2), "depends_on": ["prep"], "priority": 5},
        {"name": "prep", "command": rig.cmd(hold=0.3)},
        {"name": "other", "command": rig.cmd(hold=0.1)},
    ])
    r = rig.run()
    assert r.returncode == 0, r.stdout + r.stderr
    prep, train, eval_ = rig.one("prep"), rig.one("train"), rig.one("eval")
    assert train["start"] > prep["end"]
    assert eval_["start"] > train["end"]
    items = rig.items()
    assert items["eval"][0]["deps"] == [items["train"][0]["id"]]
    assert items["train"][0]["depends_on"] == ["prep"]
    assert all(i[0]["status"] == "finished" for i in items.values())


@posix_batch
def test_a_name_stands_for_all_its_repeats_and_sweep_points(rig):
    rig.write({"max_concurrent_experiments": 6}, [
        {"name": "prep", "command": rig.cmd(hold=0.2), "repeats": 2},
        {"name": "cnn_lr{lr}", "command": rig.cmd(hold=0.1) + " {lr}", "depends_on": ["prep"],
         "sweep": {"lr": [1, 2]}},
        {"name": "report", "command": rig.cmd(), "depends_on": ["cnn_lr{lr}"]},
        {"name": "only_one", "command": rig.cmd(), "depends_on": ["cnn_lr1"]},
    ])
    dry = rig.run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "after prep" in dry.stdout and "after cnn_lr{lr}" in dry.stdout, dry.stdout
    r = rig.run()
    assert r.returncode == 0, r.stdout + r.stderr
    preps = rig.of("prep")
    assert len(preps) == 2
    points = rig.of("cnn_lr1") + rig.of("cnn_lr2")
    assert len(points) == 2
    assert min(p["start"] for p in points) > max(p["end"] for p in preps)
    assert rig.one("report")["start"] > max(p["end"] for p in points)
    assert rig.one("only_one")["start"] > rig.one("cnn_lr1")["end"]
    items = rig.items()
    assert sorted(rig.item("report")["deps"]) == sorted([items["cnn_lr1"][0]["id"], items["cnn_lr2"][0]["id"]])
    assert sorted(items["cnn_lr2"][0]["deps"]) == sorted(i["id"] for i in items["prep"])


@posix_batch
def test_a_failed_dependency_fails_its_dependents_without_running_them(rig):
    rig.write({"max_concurrent_experiments": 4}, [
        {"name": "prep", "command": rig.cmd(code=3)},
        {"name": "train", "command": rig.cmd(), "depends_on": ["prep"]},
        {"name": "eval", "command": rig.cmd(), "depends_on": ["train"]},
        {"name": "other", "command": rig.cmd()},
        {"name": "after_other", "command": rig.cmd(), "depends_on": ["other"]},
    ])
    r = rig.run()
    assert r.returncode == 1, r.stdout + r.stderr
    for name in ("train", "eval"):
        assert not rig.started(name), name  # the command never ran
        item = rig.item(name)
        assert item["status"] == "error", item
        assert item["reason"] == "dependency failed: prep", item  # the root cause, also transitively
        assert item["attempt"] == 0 and item["work_dir"] is None and item["exit_code"] is None, item
        assert re.search(rf"skipped\s+{name} \(dependency failed: prep\)", r.stdout), r.stdout
        assert re.search(rf"^\s+{name}: dependency failed: prep\b", r.stdout, re.M), r.stdout  # the summary
    assert rig.item("prep")["reason"] == "exit code 3"
    assert rig.item("other")["status"] == rig.item("after_other")["status"] == "finished"
    assert rig.started("after_other")
    summary = rig.state()["summary"]
    assert (summary["finished"], summary["errors"], summary["pending"]) == (2, 3, 0)
    # No experiment directory was made for what never ran.
    made = sorted(p.name.split("_20")[0] for p in rig.base.iterdir() if not p.name.startswith("."))
    assert made == ["after_other", "other", "prep"]


@posix_batch
def test_one_failed_repeat_fails_the_dependents_of_the_name(rig):
    fail_second = f'if [ "$EXPERIMENT_REPEAT" = 2 ]; then exit 4; fi; exec {rig.cmd()}'
    rig.write({"max_concurrent_experiments": 1}, [
        {"name": "prep", "command": fail_second, "repeats": 3},
        {"name": "train", "command": rig.cmd(), "depends_on": ["prep"]},
    ])
    r = rig.run()
    assert r.returncode == 1, r.stdout + r.stderr
    assert not rig.started("train")
    assert rig.item("train")["reason"] == "dependency failed: prep"
    assert sorted(i["status"] for i in rig.items()["prep"]) == ["error", "finished", "finished"]


@posix_batch
def test_dependents_wait_for_the_last_retry(rig):
    marker = shlex.quote(str(rig.root / "failed_once"))
    flaky = f"if [ -e {marker} ]; then exec {rig.cmd(hold=0.1)}; fi; touch {marker}; exit 3"
    rig.write({"max_concurrent_experiments": 2, "auto_restart_on_error": True}, [
        {"name": "prep", "command": flaky, "max_retries": 1},
        {"name": "train", "command": rig.cmd(), "depends_on": ["prep"]},
    ])
    r = rig.run()
    assert r.returncode == 0, r.stdout + r.stderr
    prep = rig.one("prep")
    assert prep["run_id"] == "run_0002"
    assert rig.one("train")["start"] > prep["end"]
    assert rig.item("prep")["attempt"] == 2


@posix_batch
def test_a_timed_out_dependency_fails_its_dependents(rig):
    rig.write({"max_concurrent_experiments": 2, "kill_timeout": 0.3}, [
        {"name": "slow", "command": "trap '' TERM; sleep 120", "timeout": "0.5s"},
        {"name": "next", "command": rig.cmd(), "depends_on": ["slow"]},
    ])
    r = rig.run()
    assert r.returncode == 1, r.stdout + r.stderr
    assert rig.item("slow")["reason"] == "timeout"
    assert rig.item("next")["reason"] == "dependency failed: slow"
    assert not rig.started("next")


def test_unknown_names_and_cycles_are_config_errors():
    assert problems("""
        [[experiments]]
        name = "prep"
        command = "true"
        [[experiments]]
        name = "train"
        command = "true"
        depends_on = ["prepp", "zzz"]
    """) == [
        "experiments[1].depends_on: no experiment is named 'prepp' (did you mean 'prep'?)",
        "experiments[1].depends_on: no experiment is named 'zzz'",
    ]
    assert problems("""
        [[experiments]]
        name = "a"
        command = "true"
        depends_on = ["c"]
        [[experiments]]
        name = "b"
        command = "true"
        depends_on = ["a"]
        [[experiments]]
        name = "c"
        command = "true"
        depends_on = ["b"]
        [[experiments]]
        name = "d"
        command = "true"
        depends_on = ["a"]
    """) == ["depends_on: a cycle: a -> c -> b -> a; no experiment of it could ever start"]
    assert problems("""
        [[experiments]]
        name = "self"
        command = "true"
        depends_on = ["self"]
    """) == ["depends_on: a cycle: self -> self; no experiment of it could ever start"]
    # Every cycle is named, and cycles are named along with the file's other problems.
    assert problems("""
        [[experiments]]
        name = "a"
        command = "true"
        depends_on = ["b"]
        [[experiments]]
        name = "b"
        command = "true"
        depends_on = ["a"]
        [[experiments]]
        name = "c"
        command = "true"
        depends_on = ["c", "zzz"]
        [[experiments]]
        name = "d"
        command = 5
    """) == ["experiments[3].command: expected a non-empty string, got 5",
             "depends_on: a cycle: a -> b -> a; no experiment of it could ever start",
             "depends_on: a cycle: c -> c; no experiment of it could ever start"]
    # A sweep's points share their table's depends_on: one message, not one per point.
    assert problems("""
        [[experiments]]
        name = "p{x}"
        command = "true"
        depends_on = ["nope"]
        [experiments.sweep]
        x = [1, 2, 3]
    """) == ["experiments[0].depends_on: no experiment is named 'nope'"]
    assert problems("""
        [[experiments]]
        name = "a"
        command = "true"
        depends_on = "b"
        [[experiments]]
        name = "b"
        command = "true"
    """) == ['experiments[0].depends_on: expected a list of experiment names such as ["prep"], got \'b\'']


def test_dependency_ids_in_planning():
    jobs = exp.expand_jobs(parse("""
        [[experiments]]
        name = "train"
        command = "true"
        depends_on = ["prep"]
        priority = 5
        [[experiments]]
        name = "prep"
        command = "true"
        repeats = 2
    """))
    assert [(j.name, j.deps) for j in jobs] == [("train", [2, 3]), ("prep", []), ("prep", [])]
    assert [j.name for j in exp.plan_next(jobs, 0, 8, 0.0)] == ["prep", "prep"]
    assert [j.name for j in exp.plan_next(jobs, 0, 8, 0.0, succeeded=[2])] == ["prep", "prep"]
    assert [j.name for j in exp.plan_next(jobs, 0, 8, 0.0, succeeded=[2, 3])] == ["train", "prep", "prep"]


@posix_batch
def test_config_errors_for_dependencies_exit_2_before_anything_runs(rig):
    for deps, message in ((["prepp"], "no experiment is named 'prepp' (did you mean 'prep'?)"),
                          (["train"], "depends_on: a cycle: prep -> train -> prep")):
        rig.write({}, [
            {"name": "prep", "command": rig.cmd(), "depends_on": deps},
            {"name": "train", "command": rig.cmd(), "depends_on": ["prep"]},
        ])
        for extra in ((), ("--dry-run",)):
            r = rig.run(*extra)
            assert r.returncode == 2, (r.stdout, r.stderr)
            assert r.stderr.startswith("exp: error: ") and message in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and r.stdout == ""
    assert not rig.base.exists() and rig.records(".start") == []


@pytest.mark.parametrize("bad, message", [
    ({"nmae": "prep"}, "experiments[0]: missing required key 'name'"),
    ({"name": 3}, "experiments[0].name: expected a non-empty string, got 3"),
])
def test_a_missing_or_wrong_name_beside_depends_on_is_a_config_error_not_a_traceback(rig, bad, message):
    # check_dependencies took the missing name (None) for one and failed in difflib.
    rig.write({}, [
        {**bad, "command": rig.cmd()},
        {"name": "train", "command": rig.cmd(), "depends_on": ["prep"]},
    ])
    for extra in ((), ("--dry-run",)):
        r = rig.run(*extra)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.startswith("exp: error: ") and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    with pytest.raises(exp.ConfigError, match=re.escape(message)):
        exp.load_config(str(rig.config))


def test_a_delayed_job_starts_when_its_delay_ends_even_if_the_loop_wakes_late(tmp_path):
    # A wake-up that came late (a loaded machine) found the job already due, so no delay
    # "to end", and it waited for the next check_interval (60 s here).  A clock that jumps
    # 0.25 s at every reading makes every wake-up late.
    import io
    import itertools
    import threading

    (tmp_path / "c.toml").write_text(toml_text(
        {"check_interval": 60, "base_experiment_dir": str(tmp_path / "results")},
        [{"name": "late", "command": "true", "delay_seconds": 2}]))
    ticks, lock = itertools.count(), threading.Lock()

    def clock():
        with lock:
            return 1000.0 + 0.25 * next(ticks)

    sched = exp.Scheduler(exp.load_config(str(tmp_path / "c.toml")), out=io.StringIO(), clock=clock)
    assert sched.run() == 0
    [job] = sched.jobs
    assert job.status == exp.FINISHED
    assert job.t_started - job.not_before < 5, (job.t_started, job.not_before)  # not a check_interval late
