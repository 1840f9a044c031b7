"""The batch scheduler of exp: config validation, planning, dispatch, retries,
state file, terminal output, signals, and ``exp ls``.

Everything is real: the CLI runs as ``python exp.py run config.toml`` in a
subprocess, experiments are tiny Python scripts or shell one-liners written
into ``tmp_path``, and nothing inside exp is mocked.  Helpers shared with
the other test files come from conftest; the scheduler's own are below.
"""
from __future__ import annotations

import collections
import io
import json
import os
import re
import shlex
import shutil
import signal
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
from conftest import (EXP_PY, child_env, exp_dirs, fds_under, linux_only, pid_gone, read_state,  # noqa: E402
                      run_exp, toml_text, try_state, wait_for, write_config, write_script)
from conftest import py_cmd as py  # noqa: E402  (a shell command line running a script with this Python)
from conftest import read_meta as meta  # noqa: E402

PY = sys.executable
CLI_TIMEOUT = 60

pytestmark = pytest.mark.skipif(
    os.name != "posix" or not sys.platform.startswith(("linux", "darwin")),
    reason="the scheduler runs commands in POSIX process groups",
)

STATE_ITEM_KEYS = {
    "id", "name", "command", "priority", "tags", "gpu_ids", "cwd", "base_dir", "environment",
    "description", "repeats", "max_retries", "attempt", "status", "created_at", "started_at",
    "ended_at", "exit_code", "work_dir", "run_id",
}
STATE_SUMMARY_KEYS = {
    "total", "pending", "running", "finished", "errors", "status_indicator", "pid", "host",
    "config_path", "started_at", "updated_at",
}
ANSI_RE = re.compile(r"\x1b\[")
SGR_RE = re.compile(r"\x1b\[[0-9;]*m")  # colour codes


# ============================================================================
# Helpers
# ============================================================================


def cli_env(**overrides):
    """conftest's child_env, and no NO_COLOR unless a test sets it."""
    return child_env(**{"NO_COLOR": None, **overrides})


def run_cli(*args, cwd, timeout=CLI_TIMEOUT, env=None):
    return run_exp(*args, cwd=cwd, env=env or cli_env(), timeout=timeout)


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_ignored():
    # What a non-interactive shell does to a background job ("exp.py run c.toml &"):
    # the disposition survives exec, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Background:
    """``exp.py run CONFIG`` started with Popen, output going to files.

    SIGINT starts at its default disposition (whatever this test process
    has), or ignored with ``sigint_ignored=True``.
    """

    def __init__(self, config, cwd, tmp_path, env=None, sigint_ignored=False):
        self.out_path = Path(tmp_path) / "sched.stdout"
        self.err_path = Path(tmp_path) / "sched.stderr"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [PY, EXP_PY, "run", str(config)], cwd=str(cwd), env=env or cli_env(),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            preexec_fn=_sigint_ignored if sigint_ignored else _sigint_default,
        )

    @property
    def pid(self):
        return self.proc.pid

    def stdout(self):
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self):
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def the_dir(base, name):
    dirs = exp_dirs(base, name)
    assert len(dirs) == 1, (name, dirs)
    return dirs[0]


def event_lines(stdout, word):
    """Event lines ``[HH:MM:SS] <word> ...`` with the stamp removed."""
    out = []
    for line in stdout.splitlines():
        m = re.match(r"\[\d\d:\d\d:\d\d\] (.*)\Z", line)
        if m and m.group(1).split(" ", 1)[0] == word:
            out.append(m.group(1))
    return out


def assert_clean_error(r, *lines):
    """Exit status 2, every message line on stderr, no traceback, nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("exp: error: "), r.stderr
    assert "Traceback" not in r.stderr
    got = [ln.strip() for ln in r.stderr.splitlines()]
    for line in lines:
        assert line in got, (line, r.stderr)


# Child scripts ---------------------------------------------------------------

INTERVAL_PY = """
import sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
t0 = time.time()
time.sleep(seconds)
t1 = time.time()
with open(path, "w") as f:
    f.write(f"{t0!r} {t1!r}\\n")
"""

FLAKY_PY = """
import os, sys
counter, succeed_on = sys.argv[1], int(sys.argv[2])
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
with open(counter, "w") as f:
    f.write(str(n))
print(f"attempt {n} in {os.environ['EXPERIMENT_RUN_ID']}", flush=True)
sys.exit(0 if n >= succeed_on else 1)
"""

WAIT_MARKER_PY = """
import os, sys, time
started, marker = sys.argv[1], sys.argv[2]
with open(started, "w") as f:
    f.write(os.environ.get("API_TOKEN", "") + "\\n" + os.environ.get("PLAIN", ""))
deadline = time.time() + 30
while not os.path.exists(marker) and time.time() < deadline:
    time.sleep(0.02)
sys.exit(0 if os.path.exists(marker) else 5)
"""

# The child survives SIGTERM ("ignore": it only creates <pidfile>.term) or
# dies of it ("exit"); either way it starts two grandchildren in its process
# group that ignore SIGTERM.  It writes "<pid> <grandchild> <grandchild>" to
# <pidfile> once everyone is set up.
STUBBORN_PY = """
import os, signal, subprocess, sys, time
mode, pidfile = sys.argv[1], sys.argv[2]
def on_term(signum, frame):
    open(pidfile + ".term", "w").close()
if mode == "ignore":
    signal.signal(signal.SIGTERM, on_term)
gc_code = (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "open(sys.argv[1], 'w').close()\\n"
    "time.sleep(40)\\n"
)
ready = [pidfile + f".gc{i}" for i in range(2)]
kids = [subprocess.Popen([sys.executable, "-c", gc_code, r]) for r in ready]
deadline = time.time() + 20
while not all(os.path.exists(r) for r in ready) and time.time() < deadline:
    time.sleep(0.01)
with open(pidfile + ".tmp", "w") as f:
    f.write(" ".join(str(p) for p in [os.getpid()] + [k.pid for k in kids]))
os.replace(pidfile + ".tmp", pidfile)
time.sleep(40)
"""

METRICS_PY = """
import sys, time
import exp
sleep = float(sys.argv[1])
e = exp.load_experiment()
for step in range(1, 4):
    e.upd_row(step=step, loss=1.0 / step, acc=0.5 + step / 10, lr=0.001, extra=7)
    e.save_row()
time.sleep(sleep)
"""


# ============================================================================
# Pure functions: parse_config, expand_jobs, plan_next, next_wakeup
# ============================================================================


def parse(text, root="/proj"):
    return exp.parse_config(textwrap.dedent(text), "x.toml", root)


def jobs_of(text):
    return exp.expand_jobs(parse(text))


def config_error(text, root="/proj"):
    with pytest.raises(exp.ConfigError) as info:
        parse(text, root)
    return str(info.value)


def test_parse_config_defaults_and_relative_paths():
    cfg = parse("""
        [[experiments]]
        name = "a"
        command = "true"

        [[experiments]]
        name = "b"
        command = "true"
        cwd = "sub/dir"
        base_dir = "../elsewhere"
        gpu_ids = "0, 1"
        environment = { N = 1, FLAG = true, S = "x" }
    """)
    assert cfg.base_experiment_dir == "/proj/results"
    assert cfg.max_concurrent_experiments == 1
    assert cfg.kill_timeout == 10.0
    assert cfg.auto_restart_on_error is False
    assert cfg.linger_when_idle is False
    a, b = cfg.experiments
    assert (a.cwd, a.base_dir, a.priority, a.repeats, a.max_retries, a.delay_seconds) == (
        "/proj", "/proj/results", 0, 1, 0, 0.0)
    assert (b.cwd, b.base_dir, b.gpu_ids) == ("/proj/sub/dir", "/elsewhere", [0, 1])
    assert b.environment == {"N": "1", "FLAG": "true", "S": "x"}

    cfg = parse("""
        [scheduler]
        base_experiment_dir = "out"
        [[experiments]]
        name = "a"
        command = "true"
        gpu_ids = [2, 3]
    """, root="/r")
    assert cfg.base_experiment_dir == "/r/out"
    assert cfg.experiments[0].base_dir == "/r/out"
    assert cfg.experiments[0].gpu_ids == [2, 3]


@pytest.mark.parametrize("text, message", [
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     [[experiments]]
     name = "b"
     command = "true"
     max_retires = 2
     """,
     "x.toml: 1 problem:\n  experiments[1]: unknown key 'max_retires' (did you mean 'max_retries'?)"),
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     [[experiments]]
     name = "b"
     command = "true"
     [[experiments]]
     name = "c"
     command = "true"
     gpu_ids = "a"
     """,
     "x.toml: 1 problem:\n  experiments[2].gpu_ids: expected a list of integers or \"0,1\", got 'a'"),
    ("""
     [schedular]
     [[experiments]]
     name = "a"
     command = "true"
     """,
     "x.toml: 1 problem:\n  top level: unknown key 'schedular' (did you mean 'scheduler'?)"),
    ("""
     [scheduler]
     max_concurrent = 2
     [[experiments]]
     name = "a"
     command = "true"
     """,
     "x.toml: 1 problem:\n  scheduler: unknown key 'max_concurrent' (did you mean 'max_concurrent_experiments'?)"),
    ("""
     [[experiments]]
     command = "true"
     """,
     "x.toml: 1 problem:\n  experiments[0]: missing required key 'name'"),
    ("""
     [[experiments]]
     name = "a"
     """,
     "x.toml: 1 problem:\n  experiments[0]: missing required key 'command'"),
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     repeats = 0
     """,
     "x.toml: 1 problem:\n  experiments[0].repeats: expected an integer >= 1, got 0"),
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     max_retries = -1
     """,
     "x.toml: 1 problem:\n  experiments[0].max_retries: expected an integer >= 0, got -1"),
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     delay_seconds = -0.5
     """,
     "x.toml: 1 problem:\n  experiments[0].delay_seconds: expected a number of seconds >= 0, got -0.5"),
    ("""
     [scheduler]
     max_concurrent_experiments = -1
     [[experiments]]
     name = "a"
     command = "true"
     """,
     "x.toml: 1 problem:\n  scheduler.max_concurrent_experiments: expected an integer >= 1, got -1"),
    ("""
     [[experiments]]
     name = "a"
     command = "true"
     priority = "high"
     """,
     "x.toml: 1 problem:\n  experiments[0].priority: expected an integer from -1000000000 to 1000000000, got 'high'"),
])
def test_parse_config_error_messages_verbatim(text, message):
    assert config_error(text) == message


def test_parse_config_reports_every_problem_at_once():
    msg = config_error("""
        [scheduler]
        max_concurrent_experiments = -1
        kill_timeout = "soon"
        [[experiments]]
        name = "a"
        [[experiments]]
        name = "b"
        command = "true"
        max_retires = 2
        [[experiments]]
        name = "c"
        command = "true"
        gpu_ids = "a"
        repeats = 0
    """)
    assert msg.splitlines() == [
        "x.toml: 6 problems:",
        "  scheduler.max_concurrent_experiments: expected an integer >= 1, got -1",
        "  scheduler.kill_timeout: expected a number of seconds >= 0, got 'soon'",
        "  experiments[0]: missing required key 'command'",
        "  experiments[1]: unknown key 'max_retires' (did you mean 'max_retries'?)",
        "  experiments[2].gpu_ids: expected a list of integers or \"0,1\", got 'a'",
        "  experiments[2].repeats: expected an integer >= 1, got 0",
    ]


@pytest.mark.parametrize("text", ["", "[scheduler]\nmax_concurrent_experiments = 2\n", "experiments = []\n"])
def test_parse_config_without_experiments(text):
    msg = config_error(text)
    assert msg.startswith("x.toml: 1 problem:\n  no experiments: add at least one [[experiments]] table")


def test_parse_config_toml_syntax_error_has_line_and_column():
    msg = config_error('[[experiments]]\nname = "a"\ncommand = \n')
    assert msg.startswith("x.toml: TOML syntax error: ")
    assert re.search(r"line 3, column \d+", msg), msg


def test_expand_jobs_priority_then_file_order_and_repeats_together():
    jobs = jobs_of("""
        [[experiments]]
        name = "a"
        command = "true"
        [[experiments]]
        name = "b"
        command = "true"
        priority = 5
        repeats = 2
        [[experiments]]
        name = "c"
        command = "true"
        [[experiments]]
        name = "d"
        command = "true"
        priority = 5
        [[experiments]]
        name = "e"
        command = "true"
        priority = 10
        [[experiments]]
        name = "f"
        command = "true"
        priority = -1
    """)
    assert [(j.name, j.repeat) for j in jobs] == [
        ("e", 1), ("b", 1), ("b", 2), ("d", 1), ("a", 1), ("c", 1), ("f", 1)]
    assert [j.id for j in jobs] == list(range(1, 8))
    assert all(j.status == "pending" and j.attempt == 0 for j in jobs)


FIVE = """
    [[experiments]]
    name = "a"
    command = "true"
    [[experiments]]
    name = "b"
    command = "true"
    [[experiments]]
    name = "c"
    command = "true"
    [[experiments]]
    name = "d"
    command = "true"
    [[experiments]]
    name = "e"
    command = "true"
"""
NOW = 1000.0


@pytest.mark.parametrize("delays, running, limit, expected", [
    ({}, 0, 1, "a"),
    ({}, 0, 2, "ab"),
    ({}, 0, 10, "abcde"),
    ({}, 1, 3, "ab"),
    ({}, 2, 2, ""),
    ({}, 3, 2, ""),            # over the limit (the limit lowered): start nothing
    ({"a": 5}, 0, 2, "bc"),     # a delayed job does not block the ones behind it
    ({"a": 5, "c": 0.1}, 0, 2, "bd"),
    ({"a": 0}, 0, 1, "a"),      # a delay that ends exactly now is over
    ({"a": -3}, 0, 1, "a"),
    ({k: 1 for k in "abcde"}, 0, 3, ""),
    ({"e": 9}, 0, 10, "abcd"),
])
def test_plan_next(delays, running, limit, expected):
    queue = jobs_of(FIVE)
    for j in queue:
        j.not_before = NOW + delays.get(j.name, -100)
    before = list(queue)
    picked = exp.plan_next(queue, running, limit, NOW)
    assert "".join(j.name for j in picked) == expected
    assert queue == before  # pure: the queue is not changed


@pytest.mark.parametrize("delays, expected", [
    ({}, None),
    ({"a": 0}, None),          # startable now: nothing to wait for
    ({"a": -2}, None),
    ({"b": 5}, 5.0),
    ({"b": 5, "d": 2.5, "e": 7}, 2.5),
    ({"a": -1, "c": 0.25}, 0.25),
])
def test_next_wakeup(delays, expected):
    queue = jobs_of(FIVE)
    for j in queue:
        j.not_before = NOW + delays.get(j.name, -100)
    got = exp.next_wakeup(queue, NOW)
    assert got == (None if expected is None else pytest.approx(expected))
    assert exp.next_wakeup([], NOW) is None


# ============================================================================
# CLI: validation, usage, dry run
# ============================================================================


def _marker_experiment(tmp_path, name="ok", **extra):
    marker = tmp_path / f"{name}.ran"
    return dict(name=name, command=f"touch {shlex.quote(str(marker))}", **extra), marker


def test_cli_unknown_key_exact_message_and_nothing_launched(tmp_path):
    good, marker = _marker_experiment(tmp_path)
    cfg = write_config(tmp_path / "c.toml", {"base_experiment_dir": "out"},
                       [good, {"name": "b", "command": "true", "max_retires": 2}])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert_clean_error(r, "experiments[1]: unknown key 'max_retires' (did you mean 'max_retries'?)")
    assert r.stderr.splitlines()[0] == f"exp: error: {cfg}: 1 problem:"
    assert r.stdout == ""
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cli_reports_all_problems_and_launches_nothing(tmp_path):
    good, marker = _marker_experiment(tmp_path)
    cfg = write_config(
        tmp_path / "c.toml",
        {"max_concurrent_experiments": -2},
        [good,
         {"name": "b", "command": "true", "max_retires": 2, "max_retries": -1},
         {"name": "c", "command": "true", "gpu_ids": "a", "repeats": 0, "delay_seconds": -1},
         {"command": "true"},
         {"name": "e"}],
    )
    r = run_cli("run", cfg, cwd=tmp_path)
    assert_clean_error(
        r,
        "scheduler.max_concurrent_experiments: expected an integer >= 1, got -2",
        "experiments[1]: unknown key 'max_retires' (did you mean 'max_retries'?)",
        "experiments[1].max_retries: expected an integer >= 0, got -1",
        "experiments[2].gpu_ids: expected a list of integers or \"0,1\", got 'a'",
        "experiments[2].repeats: expected an integer >= 1, got 0",
        "experiments[2].delay_seconds: expected a number of seconds >= 0, got -1",
        "experiments[3]: missing required key 'name'",
        "experiments[4]: missing required key 'command'",
    )
    assert r.stderr.splitlines()[0] == f"exp: error: {cfg}: 8 problems:"
    assert not marker.exists()
    assert not (tmp_path / "results").exists()


def test_dry_run_says_which_directory_a_resume_continues(tmp_path):
    for d, name in (("a_2025-01-01__00-00-00", "a"), ("old/b_x", "b")):
        (tmp_path / "results" / d).mkdir(parents=True)
        (tmp_path / "results" / d / "metadata.json").write_text(f'{{"name": "{name}", "status": "finished"}}')
    cfg = write_config(tmp_path / "c.toml", None, [
        {"name": "a", "command": "true", "resume": "2025-01-01__00-00-00"},
        {"name": "b", "command": "true", "resume": "results/old/b_x"},
        {"name": "c", "command": "true"}])
    r = run_cli("run", cfg, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = [re.split(r"\s{2,}", ln)[1] for ln in r.stdout.splitlines()[1:4]]
    assert names == ["a (resumes a_2025-01-01__00-00-00)", "b (resumes results/old/b_x)", "c"], r.stdout


def test_cli_missing_cwd_and_resume_are_caught_before_anything_starts(tmp_path):
    good, marker = _marker_experiment(tmp_path)
    cfg = write_config(tmp_path / "c.toml", None,
                       [good,
                        {"name": "b", "command": "true", "cwd": "no/such/dir"},
                        {"name": "c", "command": "true", "resume": "2020-01-01__00-00-00"}])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert_clean_error(r, f"experiments[1].cwd: {tmp_path / 'no' / 'such' / 'dir'} is not an existing directory")
    assert r.stderr.splitlines()[0] == f"exp: error: {cfg}: 2 problems:"
    assert "experiments[2].resume: resume='2020-01-01__00-00-00': no experiment directory at " \
        f"{tmp_path / 'results' / 'c_2020-01-01__00-00-00'}" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "results").exists()


def test_cli_toml_syntax_error(tmp_path):
    good, marker = _marker_experiment(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text(None, [good]) + '\n[[experiments]]\nname = "b"\ncommand = "true\n', encoding="utf-8")
    r = run_cli("run", cfg, cwd=tmp_path)
    assert_clean_error(r)
    line = r.stderr.splitlines()[0]
    assert line.startswith(f"exp: error: {cfg}: TOML syntax error: "), line
    assert re.search(r"\(at line 7, column \d+\)", line), line
    assert not marker.exists()
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("text", ["[scheduler]\nmax_concurrent_experiments = 2\n", "experiments = []\n"])
def test_cli_empty_experiment_list(tmp_path, text):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text, encoding="utf-8")
    r = run_cli("run", cfg, cwd=tmp_path)
    assert_clean_error(r, "no experiments: add at least one [[experiments]] table with a name and a command, e.g.")
    assert not (tmp_path / "results").exists()


def test_cli_missing_config_file(tmp_path):
    r = run_cli("run", "nope.toml", cwd=tmp_path)
    assert_clean_error(r)
    assert r.stderr == f"exp: error: config file {tmp_path / 'nope.toml'} does not exist\n"
    r = run_cli("run", tmp_path, cwd=tmp_path)  # a directory
    assert_clean_error(r)
    assert "is a directory" in r.stderr


@pytest.mark.parametrize("args", [[], ["run"], ["frobnicate"], ["run", "--bogus", "c.toml"]])
def test_cli_usage_errors_exit_2(tmp_path, args):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "usage:" in r.stderr


def test_dry_run_prints_plan_and_launches_nothing(tmp_path):
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    marker = tmp_path / "ran"
    touch = f"touch {shlex.quote(str(marker))}"
    cfg = write_config(
        proj / "batch.toml",
        {"base_experiment_dir": "out", "max_concurrent_experiments": 3, "auto_restart_on_error": True,
         "gpus": [0, 1, 2, 3]},
        [
            {"name": "low", "command": touch, "priority": -1},
            {"name": "mid", "command": touch + " && echo mid", "gpu_ids": [0, 1], "repeats": 2},
            {"name": "high", "command": touch, "priority": 7, "cwd": "sub", "base_dir": "other",
             "max_retries": 2, "delay_seconds": 1.5},
            {"name": "mid2", "command": touch, "gpu_ids": "3"},
        ],
    )
    r = run_cli("run", "../proj/batch.toml", "--dry-run", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == ["#", "name", "priority", "command", "cwd", "GPUs", "dir base"]
    rows = [re.split(r"\s{2,}", ln) for ln in lines[1:6]]

    def resolved(p):
        return os.path.normpath(os.path.join(elsewhere, p))

    got = [(n, name, prio, cmd, resolved(cwd), gpus, resolved(base))
           for n, name, prio, cmd, cwd, gpus, base in rows]
    assert got == [
        ("1", "high (retries 2, delay 1.5s)", "7", touch, str(proj / "sub"), "-", str(proj / "other")),
        ("2", "mid (repeat 1/2)", "0", touch + " && echo mid", str(proj), "0,1", str(proj / "out")),
        ("3", "mid (repeat 2/2)", "0", touch + " && echo mid", str(proj), "0,1", str(proj / "out")),
        ("4", "mid2", "0", touch, str(proj), "3", str(proj / "out")),
        ("5", "low", "-1", touch, str(proj), "-", str(proj / "out")),
    ]
    assert lines[6].startswith("5 experiment(s), at most 3 at a time; state: ")
    assert len(lines) == 7
    assert not marker.exists()
    assert not (proj / "out").exists() and not (proj / "other").exists()
    assert sorted(os.listdir(elsewhere)) == []

    # From the config's own directory its paths read as they were written: "." and "out",
    # from below it "..": never "../proj" for the directory one stands in.
    for where, cwd, base in ((proj, ".", "out"), (proj / "sub", "..", "../out")):
        r = run_cli("run", str(cfg), "--dry-run", cwd=where)
        assert r.returncode == 0, r.stderr
        row = re.split(r"\s{2,}", r.stdout.splitlines()[2])
        assert (row[1], row[4], row[6]) == ("mid (repeat 1/2)", cwd, base), r.stdout


# ============================================================================
# Running batches
# ============================================================================


@pytest.mark.skipif(not os.path.exists("/dev/fd"), reason="needs /dev/fd (bash process substitution)")
def test_a_config_from_a_pipe_resolves_paths_against_the_current_directory(tmp_path):
    text = '[[experiments]]\nname = "piped"\ncommand = "pwd > where.txt"\n'
    line = f"{shlex.quote(PY)} {shlex.quote(EXP_PY)} run <(printf %s {shlex.quote(text)})"
    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (d,) = (tmp_path / "results").glob("piped_*")
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path)
    assert exp.ExperimentDir(d).read_metadata()["status"] == exp.FINISHED


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    pwd_py = write_script(proj, "print_cwd.py", """
        import os, sys
        open(sys.argv[1], "w").write(os.getcwd())
    """)
    # The command itself uses a path relative to the config directory.
    cfg = write_config(proj / "batch.toml", {"base_experiment_dir": "out"}, [
        {"name": "here", "command": f"{shlex.quote(PY)} print_cwd.py {shlex.quote(str(tmp_path / 'here.cwd'))}"},
        {"name": "there", "command": f"{shlex.quote(PY)} ../print_cwd.py {shlex.quote(str(tmp_path / 'there.cwd'))}",
         "cwd": "sub", "base_dir": "other"},
    ])
    r = run_cli("run", "../proj/batch.toml", cwd=elsewhere)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (tmp_path / "here.cwd").read_text() == str(proj)
    assert (tmp_path / "there.cwd").read_text() == str(proj / "sub")
    here, there = the_dir(proj / "out", "here"), the_dir(proj / "other", "there")
    assert meta(here)["cwd"] == str(proj) and meta(there)["cwd"] == str(proj / "sub")
    state = read_state(proj / "out")
    assert state["summary"]["config_path"] == str(proj / "batch.toml")
    assert os.listdir(elsewhere) == []
    assert not (elsewhere / "results").exists()


def test_a_batch_started_in_a_directory_since_removed_runs_and_shows_whole_paths(tmp_path):
    # Event lines show paths relative to where `exp run` started; with that directory gone
    # (removed by a clean-up script, say) they show them whole, and the batch is unaffected.
    base = tmp_path / "out"
    cfg = write_config(tmp_path / "c.toml", {"base_experiment_dir": str(base)},
                       [{"name": f"e{i}", "command": "true"} for i in range(3)])
    gone = tmp_path / "gone"
    gone.mkdir()
    r = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3" run "$4"', "sh",
                        str(gone), PY, EXP_PY, str(cfg)],
                       env=cli_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert not gone.exists()
    started = event_lines(r.stdout, "started")
    assert len(started) == 3 and len(event_lines(r.stdout, "finished")) == 3, r.stdout
    for i in range(3):
        d = exp_dirs(base, f"e{i}")
        assert len(d) == 1 and meta(d[0])["status"] == "finished"
        assert any(line.endswith(f"-> {d[0]}") for line in started), (d[0], started)


def test_concurrency_limit_is_reached_and_never_exceeded(tmp_path):
    script = write_script(tmp_path, "interval.py", INTERVAL_PY)
    (tmp_path / "iv").mkdir()
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2}, [
        {"name": f"p{i}", "command": py(script, tmp_path / "iv" / f"p{i}", 0.3)} for i in range(6)
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    intervals = []
    for i in range(6):
        a, b = map(float, (tmp_path / "iv" / f"p{i}").read_text().split())
        intervals.append((a, b))
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 2, intervals
    assert len(event_lines(r.stdout, "started")) == 6
    assert len(event_lines(r.stdout, "finished")) == 6


def test_priority_order_and_stability(tmp_path):
    order = tmp_path / "order.txt"
    names_prios = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 10), ("f", -3), ("g", 0)]
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 1}, [
        {"name": n, "command": f"echo {n} >> {shlex.quote(str(order))}", "priority": p} for n, p in names_prios
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert order.read_text().split() == ["e", "b", "d", "a", "c", "g", "f"]
    assert [ln.split()[1] for ln in event_lines(r.stdout, "started")] == ["e", "b", "d", "a", "c", "g", "f"]


def test_repeats_are_separate_experiments(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2}, [
        {"name": "rep", "command": "echo run $EXPERIMENT_WORK_DIR", "repeats": 3, "tags": ["r"]},
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    dirs = exp_dirs(tmp_path / "results", "rep")
    assert len(dirs) == 3
    for d in dirs:
        m = meta(d)
        assert m["name"] == "rep" and m["status"] == "finished" and m["tags"] == ["r"]
        assert [run["id"] for run in m["runs"]] == ["run_0001"]
        assert os.listdir(d / "terminal_logs") == ["run_0001.log"]
    state = read_state(tmp_path / "results")
    assert state["summary"]["total"] == 3 and state["summary"]["finished"] == 3
    assert sorted(j["repeat"] for j in state["finished"]) == [1, 2, 3]
    assert sorted(j["work_dir"] for j in state["finished"]) == [str(d) for d in dirs]
    assert sorted(ln.split()[1:3] for ln in event_lines(r.stdout, "started")) == [
        ["rep", "#1/3"], ["rep", "#2/3"], ["rep", "#3/3"]]


def test_retry_until_success_in_the_same_directory(tmp_path):
    script = write_script(tmp_path, "flaky.py", FLAKY_PY)
    counter = tmp_path / "count"
    cfg = write_config(tmp_path / "c.toml", {"auto_restart_on_error": True}, [
        {"name": "flaky", "command": py(script, counter, 3), "max_retries": 2},
        {"name": "steady", "command": "echo ok"},
    ])
    r = run_cli("run", cfg, cwd=tmp_path, env=cli_env(TERM="xterm"))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert counter.read_text() == "3"
    d = the_dir(tmp_path / "results", "flaky")
    assert sorted(os.listdir(d / "terminal_logs")) == ["run_0001.log", "run_0002.log", "run_0003.log"]
    for n in (1, 2, 3):
        assert f"attempt {n} in run_000{n}" in (d / "terminal_logs" / f"run_000{n}.log").read_text()
    m = meta(d)
    assert m["status"] == "finished" and m["exit_code"] == 0 and m["current_run_id"] == "run_0003"
    assert [(x["id"], x["status"], x["exit_code"]) for x in m["runs"]] == [
        ("run_0001", "error", 1), ("run_0002", "error", 1), ("run_0003", "finished", 0)]
    state = read_state(tmp_path / "results")
    (job,) = [j for j in state["finished"] if j["name"] == "flaky"]
    assert (job["attempt"], job["status"], job["exit_code"], job["run_id"], job["work_dir"]) == (
        3, "finished", 0, "run_0003", str(d))
    assert state["errors"] == []
    out = r.stdout
    assert not ANSI_RE.search(out)  # captured (not a TTY): plain lines even with TERM=xterm
    assert [ln.split(" (")[0] for ln in event_lines(out, "failed")] == ["failed   flaky"] * 2
    assert event_lines(out, "retrying") == ["retrying flaky (attempt 2/3)", "retrying flaky (attempt 3/3)"]
    started = [ln for ln in event_lines(out, "started") if " flaky " in ln]
    assert [re.search(r"\(attempt (\d/\d),", ln).group(1) for ln in started] == ["1/3", "2/3", "3/3"]
    assert "  succeeded first time:    1" in out.splitlines()
    assert "  succeeded after retries: 1 (flaky x3)" in out.splitlines()
    assert "  failed:                  0" in out.splitlines()


def test_retries_exhausted_exit_1(tmp_path):
    script = write_script(tmp_path, "flaky.py", FLAKY_PY)
    counter = tmp_path / "count"
    cfg = write_config(tmp_path / "c.toml", {"auto_restart_on_error": True}, [
        {"name": "doomed", "command": py(script, counter, 99), "max_retries": 1},
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert counter.read_text() == "2"
    d = the_dir(tmp_path / "results", "doomed")
    assert sorted(os.listdir(d / "terminal_logs")) == ["run_0001.log", "run_0002.log"]
    assert meta(d)["status"] == "error"
    assert event_lines(r.stdout, "retrying") == ["retrying doomed (attempt 2/2)"]
    state = read_state(tmp_path / "results")
    assert [(j["name"], j["attempt"], j["status"], j["exit_code"]) for j in state["errors"]] == [
        ("doomed", 2, "error", 1)]


def test_no_retry_without_auto_restart_on_error(tmp_path):
    script = write_script(tmp_path, "flaky.py", FLAKY_PY)
    counter = tmp_path / "count"
    cfg = write_config(tmp_path / "c.toml", {}, [  # auto_restart_on_error defaults to false
        {"name": "flaky", "command": py(script, counter, 2), "max_retries": 2},
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert counter.read_text() == "1"
    d = the_dir(tmp_path / "results", "flaky")
    assert os.listdir(d / "terminal_logs") == ["run_0001.log"]
    assert meta(d)["status"] == "error"
    assert event_lines(r.stdout, "retrying") == []
    lines = r.stdout.splitlines()
    assert "  succeeded after retries: 0" in lines
    assert "  failed:                  1" in lines
    fail = [ln for ln in lines if ln.startswith("    flaky: exit code 1  ")]
    assert len(fail) == 1 and os.path.samefile(tmp_path / fail[0].split("  ")[-1], d)


def test_started_line_attempt_count_without_auto_restart(tmp_path):
    # auto_restart_on_error is off, so max_retries is ignored and there is only
    # ever one attempt: "attempt 1/3" would promise two more that never come.
    cfg = write_config(tmp_path / "c.toml", {"auto_restart_on_error": False}, [
        {"name": "once", "command": "exit 1", "max_retries": 2},
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (started,) = event_lines(r.stdout, "started")
    assert started.startswith("started  once (attempt 1/1, GPUs -) -> "), started


def test_delay_does_not_block_other_slots(tmp_path):
    script = write_script(tmp_path, "interval.py", INTERVAL_PY)
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2}, [
        {"name": "A", "command": py(script, tmp_path / "A", 0.05), "delay_seconds": 1.0, "priority": 5},
        {"name": "B", "command": py(script, tmp_path / "B", 0)},
    ])
    t0 = time.time()
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    a0, a1 = map(float, (tmp_path / "A").read_text().split())
    b0, b1 = map(float, (tmp_path / "B").read_text().split())
    # Ordering only, no bound on how fast anything starts: B (lower priority,
    # no delay) starts first and is done before the delayed A starts.
    starts = [ln.split()[1] for ln in event_lines(r.stdout, "started")]
    assert starts == ["B", "A"], "A's delay held back B"
    assert b0 <= b1 < a0, "B should finish before the delayed A starts"
    # A lower bound that load cannot break: t0 precedes the moment the
    # scheduler starts counting A's delay, so a slow machine only widens it.
    assert a0 - t0 >= 1.0, "A starts only after its delay"


def test_terminal_lines_and_failure_tail(tmp_path):
    cmd = "for i in $(seq -w 1 15); do echo line $i; done; echo oops >&2; exit 3"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 1, "gpus": [0, 1]}, [
        {"name": "good", "command": "sleep 0.1", "gpu_ids": "0,1", "priority": 1},
        {"name": "noisy", "command": cmd},
    ])
    r = run_cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout
    assert not ANSI_RE.search(out), repr(out)
    good, noisy = the_dir(tmp_path / "results", "good"), the_dir(tmp_path / "results", "noisy")
    s1, s2 = event_lines(out, "started")
    m = re.fullmatch(r"started  good \(attempt 1/1, GPUs 0,1\) -> (\S+)", s1)
    assert m and os.path.samefile(tmp_path / m.group(1), good), s1
    m = re.fullmatch(r"started  noisy \(attempt 1/1, GPUs -\) -> (\S+)", s2)
    assert m and os.path.samefile(tmp_path / m.group(1), noisy), s2
    (fin,) = event_lines(out, "finished")
    assert re.fullmatch(r"finished good in \d+\.\ds", fin), fin
    (failed,) = event_lines(out, "failed")
    assert re.fullmatch(r"failed   noisy \(exit code 3\) after \d+\.\ds", failed), failed
    lines = out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.endswith(failed)))
    expected_tail = [f"      line {n:02d}" for n in range(7, 16)] + ["      oops"]
    assert lines[i + 1:i + 11] == expected_tail
    assert "line 06" not in out and "[exp]" not in out
    assert lines[i + 11] == ""  # then the summary
    assert re.fullmatch(r"summary: 2 experiment\(s\) in \d+\.\ds", lines[i + 12]), lines[i + 12]
    assert lines[i + 13:i + 17] == [
        "  succeeded first time:    1",
        "  succeeded after retries: 0",
        "  failed:                  1",
        f"    noisy: exit code 3  {os.path.relpath(noisy, tmp_path)}",
    ]
    assert lines[i + 17].startswith("  state: ")


def _read_pty(fd, chunks):
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


def run_on_pty(cfg, cwd, env):
    """`exp run cfg` with its stdout on a pseudo-terminal: (exit code, what the terminal got, stderr)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, EXP_PY, "run", str(cfg)], cwd=str(cwd), env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    reader = threading.Thread(target=_read_pty, args=(master, chunks), daemon=True)
    reader.start()
    try:
        code = proc.wait(CLI_TIMEOUT)
        err = proc.stderr.read().decode("utf-8", "replace")
        reader.join(10)
    finally:
        os.close(master)
        proc.stderr.close()
    return code, b"".join(chunks).decode("utf-8", "replace"), err


@pytest.mark.parametrize("no_color", [True, False])
def test_tty_colours_follow_no_color(tmp_path, no_color):
    cfg = write_config(tmp_path / "c.toml", {}, [{"name": "one", "command": "true"}])
    code, out, err = run_on_pty(cfg, tmp_path, cli_env(TERM="xterm", NO_COLOR="1" if no_color else None))
    assert code == 0, err
    assert "started " in out and "finished" in out and "summary: 1 experiment(s)" in out
    if no_color:
        assert not SGR_RE.search(out), repr(out)
    else:
        assert SGR_RE.search(out), repr(out)  # the control: colours do appear on a TTY


def test_tty_progress_line_counts_what_is_done_and_failed(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 1}, [
        {"name": "good", "command": "true", "priority": 3},
        {"name": "bad", "command": "exit 3", "priority": 2},
        {"name": "slow", "command": "sleep 0.5", "priority": 1}])
    code, out, err = run_on_pty(cfg, tmp_path, cli_env(TERM="xterm", NO_COLOR="1"))
    assert code == 1, err
    assert "[0/3 done] running: good | failed: 0 |" in out, repr(out)
    assert "[2/3 done] running: slow | failed: 1 |" in out, repr(out)
    assert "[1/3 done] running: bad | failed: 0 |" in out, repr(out)


def test_a_dumb_terminal_gets_event_lines_without_colour_or_a_progress_line(tmp_path):
    # TERM=dumb (an editor's shell buffer) shows "\r\x1b[K" as text: no line redrawn in place.
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 1}, [
        {"name": "good", "command": "true"}, {"name": "slow", "command": "sleep 0.3"}])
    code, out, err = run_on_pty(cfg, tmp_path, cli_env(TERM="dumb"))
    assert code == 0, err
    assert "started  good" in out and "finished slow" in out and "summary: 2 experiment(s)" in out, repr(out)
    assert "\x1b" not in out and "done] running:" not in out, repr(out)


# ============================================================================
# State file
# ============================================================================


def test_state_file_while_running_and_after(tmp_path):
    script = write_script(tmp_path, "waiter.py", WAIT_MARKER_PY)
    started, marker = tmp_path / "waiter.started", tmp_path / "go"
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 1, "gpus": [0, 1]}, [
        {"name": "waiter", "command": py(script, started, marker), "priority": 3, "tags": ["t1", "t2"],
         "description": "waits", "gpu_ids": [1], "max_retries": 4,
         "environment": {"API_TOKEN": "hunter2", "PLAIN": "visible"}},
        {"name": "after", "command": "true", "repeats": 2},
    ])
    bg = Background(cfg, tmp_path, tmp_path)
    try:
        wait_for(started.exists, what="the waiter to start")
        assert started.read_text() == "hunter2\nvisible"  # the child gets the real value

        def running_state():
            s = try_state(base)
            return s if s and s["running"] and s["running"][0]["work_dir"] and s["running"][0]["pid"] else None

        s = wait_for(running_state, what="the state file to show the running job")
        assert set(s) == {"pending", "running", "finished", "errors", "summary"}
        summ = s["summary"]
        assert STATE_SUMMARY_KEYS <= set(summ)
        assert summ["status_indicator"] == "running"
        assert (summ["total"], summ["pending"], summ["running"], summ["finished"], summ["errors"]) == (3, 2, 1, 0, 0)
        assert summ["pid"] == bg.pid
        assert summ["config_path"] == str(cfg)
        assert summ["host"] == os.uname().nodename
        (job,) = s["running"]
        assert STATE_ITEM_KEYS <= set(job)
        wd = the_dir(base, "waiter")
        assert job == {**job, "id": 1, "name": "waiter", "command": py(script, started, marker), "priority": 3,
                       "tags": ["t1", "t2"], "gpu_ids": [1], "cwd": str(tmp_path), "base_dir": str(base),
                       "environment": {"API_TOKEN": "***", "PLAIN": "visible"}, "description": "waits",
                       "repeats": 1, "max_retries": 4, "attempt": 1, "status": "running",
                       "ended_at": None, "exit_code": None, "work_dir": str(wd), "run_id": "run_0001"}
        assert job["created_at"] and job["started_at"]
        # The pid (leader of the run's process group) reaches metadata.json too,
        # once the run has lasted exp.PID_RECORD_DELAY.
        pid = wait_for(lambda: meta(wd)["pid"], what="the run's pid in metadata.json")
        assert job["pid"] == pid == meta(wd)["runs"][0]["pid"] and os.getpgid(pid) == pid
        assert [(p["name"], p["status"], p["attempt"], p["work_dir"]) for p in s["pending"]] == [
            ("after", "pending", 0, None), ("after", "pending", 0, None)]
        assert "hunter2" not in (base / ".exp_state" / "scheduler_state.json").read_text()
        assert meta(wd)["environment"] == {"API_TOKEN": "***", "PLAIN": "visible"}
        marker.touch()
        assert bg.wait(30) == 0, bg.stderr()
    finally:
        bg.kill()
    s = read_state(base)
    summ = s["summary"]
    assert summ["status_indicator"] == "stopped"
    assert (summ["total"], summ["pending"], summ["running"], summ["finished"], summ["errors"]) == (3, 0, 0, 3, 0)
    assert summ["updated_at"] >= summ["started_at"]
    assert s["pending"] == [] and s["running"] == [] and s["errors"] == []
    assert [(j["id"], j["name"], j["status"], j["exit_code"], j["attempt"]) for j in s["finished"]] == [
        (1, "waiter", "finished", 0, 1), (2, "after", "finished", 0, 1), (3, "after", "finished", 0, 1)]
    assert meta(wd)["pid"] is None and meta(wd)["runs"][0]["pid"] == pid
    for j in s["finished"]:
        assert j["pid"] is None  # a pid only while running: it may be reused after
        assert STATE_ITEM_KEYS <= set(j)
        assert j["ended_at"] and j["started_at"] and j["work_dir"] and j["run_id"] == "run_0001"
    assert "hunter2" not in json.dumps(s)


def test_state_file_is_always_valid_json(tmp_path):
    base = tmp_path / "results"
    state_path = base / ".exp_state" / "scheduler_state.json"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 4}, [
        {"name": f"q{i:02d}", "command": "sleep 0.03", "environment": {"SECRET_X": "s"}} for i in range(30)
    ])
    stop = threading.Event()
    stats = {"reads": 0, "bad": [], "versions": set(), "vanished": 0, "seen": False, "max_running": 0}

    def reader():
        while not stop.is_set():
            try:
                with open(state_path, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                if stats["seen"]:
                    stats["vanished"] += 1
                continue
            stats["seen"] = True
            stats["reads"] += 1
            try:
                data = json.loads(text)
            except ValueError as e:
                stats["bad"].append((str(e), text[-200:]))
                continue
            stats["versions"].add(text)
            stats["max_running"] = max(stats["max_running"], data["summary"]["running"])

    t = threading.Thread(target=reader, name="state-reader")
    t.start()
    try:
        r = run_cli("run", cfg, cwd=tmp_path)
        # However slow the machine, the reader gets at least one read of the
        # final file in before it stops (how many it got during the run
        # depends on speed, so nothing below counts them).
        reads_at_exit = stats["reads"]
        wait_for(lambda: stats["reads"] > reads_at_exit, timeout=10, what="a read of the final state file")
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert stats["bad"] == []
    assert stats["vanished"] == 0
    assert stats["reads"] >= 1 and len(stats["versions"]) >= 1, stats["reads"]
    assert stats["max_running"] <= 4
    s = read_state(base)
    assert s["summary"]["finished"] == 30 and s["summary"]["status_indicator"] == "stopped"
    assert all(j["environment"] == {"SECRET_X": "***"} for j in s["finished"])


# ---------------------------------------------------------------- metadata writes of batch runs


@pytest.mark.parametrize("delay, command, writes", [(30.0, "true", 2), (0.0, "sleep 0.3", 3)])
def test_metadata_writes_per_batch_run(tmp_path, monkeypatch, delay, command, writes):
    # Each rewrite of metadata.json makes a file and drops one.  A batch run
    # that ends within PID_RECORD_DELAY is recorded in two writes (start,
    # before the command runs; end, with the pid in its runs entry); a longer
    # one gets a third, its pid.
    monkeypatch.setattr(exp, "PID_RECORD_DELAY", delay)
    writes_by_dir = collections.Counter()
    real_write = exp.write_json_atomic

    def counting_write(path, obj, **kwargs):
        if os.path.basename(path) == "metadata.json":
            writes_by_dir[os.path.dirname(path)] += 1
        return real_write(path, obj, **kwargs)

    monkeypatch.setattr(exp, "write_json_atomic", counting_write)
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2},
                       [{"name": "t", "command": command, "repeats": 3}])
    assert exp.Scheduler(exp.load_config(cfg), out=io.StringIO()).run() == 0
    assert len(writes_by_dir) == 3 and set(writes_by_dir.values()) == {writes}, writes_by_dir
    for d in writes_by_dir:
        m = meta(d)
        (run,) = m["runs"]
        assert (m["status"], m["exit_code"], m["pid"], run["status"]) == ("finished", 0, None, "finished")
        assert isinstance(run["pid"], int) and run["pid"] > 0


def test_a_batch_command_starts_only_after_its_metadata_says_running(tmp_path, monkeypatch):
    # The command may read metadata.json the moment it starts; what it finds
    # must already describe this run.  Observed at the Popen call itself (the
    # real Popen still runs), where a race with a fast child cannot hide it.
    seen = []
    real_popen = subprocess.Popen

    def observing_popen(*args, **kwargs):
        env = kwargs.get("env") or {}
        if b"EXPERIMENT_WORK_DIR" in env:
            m = meta(env[b"EXPERIMENT_WORK_DIR"].decode())
            seen.append((m["status"], m["current_run_id"], env[b"EXPERIMENT_RUN_ID"].decode(),
                         m["runs"][-1]["id"], m["runs"][-1]["status"]))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", observing_popen)
    marker = tmp_path / "failed-once"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2, "auto_restart_on_error": True}, [
        {"name": "ok", "command": "true", "repeats": 2},
        {"name": "flaky", "command": f"test -e {marker} || {{ touch {marker}; exit 1; }}", "max_retries": 1},
    ])
    assert exp.Scheduler(exp.load_config(cfg), out=io.StringIO()).run() == 0
    assert sorted(seen) == [("running", "run_0001", "run_0001", "run_0001", "running")] * 3 + [
        ("running", "run_0002", "run_0002", "run_0002", "running")]


# The full-disk cases of a batch (no room for a run's log; no room for its end)
# are in test_durability.py, on a real tmpfs.


@linux_only
def test_a_start_that_fails_after_its_first_write_ends_as_an_error(tmp_path, monkeypatch):
    # Popen failing with something else than OSError (here: no memory for it)
    # after metadata.json already says running must still record the end.
    real_popen = subprocess.Popen

    def failing_popen(*args, **kwargs):
        if b"EXPERIMENT_WORK_DIR" in (kwargs.get("env") or {}):
            raise MemoryError("cannot allocate")
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", failing_popen)
    cfg = write_config(tmp_path / "c.toml", {}, [{"name": "x", "command": "true"}])
    out = io.StringIO()
    sched = exp.Scheduler(exp.load_config(cfg), out=out)
    assert sched.run() == 1
    assert fds_under(tmp_path) == []  # (sched, holding the Experiment, is still alive)
    (d,) = exp_dirs(tmp_path / "results", "x")
    m = meta(d)
    assert (m["status"], m["exit_code"], m["pid"]) == ("error", 127, None)
    assert [(r["id"], r["status"], r["exit_code"]) for r in m["runs"]] == [("run_0001", "error", 127)]
    log = (d / "terminal_logs" / "run_0001.log").read_text()
    assert "could not start 'true' in" in log and "MemoryError: cannot allocate" in log
    assert "run_0001 ended: exit code 127 (error)" in log
    assert "could not start 'true'" in out.getvalue()


def test_state_file_that_cannot_be_written_is_reported_once_and_the_batch_goes_on(tmp_path):
    # A file where the state directory should be: every state write fails
    # until the first experiment removes it; the experiments run regardless.
    base = tmp_path / "results"
    base.mkdir()
    blocker = base / ".exp_state"
    blocker.write_text("in the way")
    cfg = write_config(tmp_path / "c.toml", {}, [
        {"name": "unblock", "command": f"sleep 0.3; rm {shlex.quote(str(blocker))}; sleep 0.3", "priority": 1},
        {"name": "after", "command": "true"},
    ])
    out = io.StringIO()
    assert exp.Scheduler(exp.load_config(cfg), out=out).run() == 0
    text = out.getvalue()
    assert text.count("warning: cannot write the state file") == 1, text
    assert text.count("is written again") == 1, text
    assert text.index("warning: cannot write") < text.index("is written again") < text.index("summary:")
    s = read_state(base)
    assert s["summary"]["finished"] == 2 and s["summary"]["status_indicator"] == "stopped"
    assert [p.name for p in (base / ".exp_state").iterdir()] == ["scheduler_state.json"]  # no temp file left


def test_a_state_file_slow_to_write_is_written_less_often(tmp_path, monkeypatch):
    # A batch of thousands has a state file of megabytes: after each write the scheduler waits
    # at least STATE_WRITE_SHARE times what it took, so the file cannot take over the main loop.
    # Here every write takes at least 50 ms.
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2}, [
        {"name": f"q{i:02d}", "command": "sleep 0.05"} for i in range(40)])
    starts = []
    write_text = exp.StateFile.write_text

    def slow(self, text):
        starts.append(time.monotonic())
        time.sleep(0.05)
        write_text(self, text)

    monkeypatch.setattr(exp.StateFile, "write_text", slow)
    assert exp.Scheduler(exp.load_config(cfg), out=io.StringIO()).run() == 0
    # The last write (the batch's end) is made at once, whenever it comes.
    gaps = [b - a for a, b in zip(starts, starts[1:-1])]
    assert gaps, starts
    assert min(gaps) >= exp.STATE_WRITE_SHARE * 0.05, gaps
    assert exp.STATE_WRITE_SHARE * 0.05 < exp.STATE_WRITE_MAX_INTERVAL
    s = read_state(base)
    assert s["summary"]["finished"] == 40 and s["summary"]["status_indicator"] == "stopped"


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_exited_within(monkeypatch, pidfd):
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("os.pidfd_open needs Linux and Python 3.9+")
    quick = subprocess.Popen(["true"])
    assert exp.exited_within(quick, 10)
    assert quick.wait(5) == 0
    slow = subprocess.Popen(["sleep", "10"])
    try:
        t = time.monotonic()
        assert not exp.exited_within(slow, 0.2)
        assert time.monotonic() - t >= 0.15
        slow.kill()
        t = time.monotonic()
        assert exp.exited_within(slow, 10)
        assert time.monotonic() - t < 5
    finally:
        slow.kill()
        slow.wait(5)


# ============================================================================
# Signals and linger
# ============================================================================


def _pids(pidfile):
    return [int(x) for x in Path(pidfile).read_text().split()]


@linux_only
@pytest.mark.parametrize("sig, sigint_ignored", [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False),
], ids=["SIGINT", "SIGINT-inherited-as-ignored", "SIGTERM"])
def test_signal_stops_everything(tmp_path, sig, sigint_ignored):
    script = write_script(tmp_path, "stubborn.py", STUBBORN_PY)
    never = tmp_path / "never.ran"
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 2, "kill_timeout": 1}, [
        {"name": "stubborn", "command": "exec " + py(script, "ignore", tmp_path / "stubborn.pids"), "priority": 2},
        {"name": "leader", "command": "exec " + py(script, "exit", tmp_path / "leader.pids"), "priority": 1},
        {"name": "never", "command": f"touch {shlex.quote(str(never))}"},
    ])
    bg = Background(cfg, tmp_path, tmp_path, sigint_ignored=sigint_ignored)
    pids = []
    try:
        wait_for(lambda: (tmp_path / "stubborn.pids").exists() and (tmp_path / "leader.pids").exists(),
                 what="children to start")
        pids = _pids(tmp_path / "stubborn.pids") + _pids(tmp_path / "leader.pids")
        assert len(pids) == 6
        t0 = time.monotonic()
        os.kill(bg.pid, sig)
        rc = bg.wait(30)
        elapsed = time.monotonic() - t0
        assert rc == 130, (bg.stdout(), bg.stderr())
        # SIGTERM first, SIGKILL only later: the stubborn child lived to handle
        # the SIGTERM (a SIGKILL sent with it would have beaten the handler) ...
        assert (tmp_path / "stubborn.pids.term").exists(), "no SIGTERM before the SIGKILL"
        # ... and SIGKILL did come, all of them ignore SIGTERM yet are gone,
        # well before the default kill_timeout (10 s) would have run out.
        assert elapsed < 10, elapsed
        wait_for(lambda: all(pid_gone(p) for p in pids), timeout=5,
                 what=f"all of {pids} to be gone ({[p for p in pids if not pid_gone(p)]} remain)")
    finally:
        bg.kill()
        kill_pids(pids)
    assert not never.exists()
    assert exp_dirs(base, "never") == []
    for name in ("stubborn", "leader"):
        m = meta(the_dir(base, name))
        assert m["status"] == "killed", (name, m["status"])
        assert m["runs"][-1]["status"] == "killed"
    s = read_state(base)
    summ = s["summary"]
    assert summ["status_indicator"] == "stopped"
    assert (summ["total"], summ["pending"], summ["running"], summ["finished"], summ["errors"]) == (3, 1, 0, 0, 2)
    assert [(j["name"], j["status"]) for j in s["pending"]] == [("never", "pending")]
    assert sorted((j["name"], j["status"]) for j in s["errors"]) == [("leader", "killed"), ("stubborn", "killed")]
    out = bg.stdout()
    assert "Traceback" not in bg.stderr()
    assert re.search(r"interrupted: stopping 2 running experiment\(s\) \(SIGKILL after 1\.0s", out), out
    assert sorted(ln.split()[1] for ln in event_lines(out, "killed")) == ["leader", "stubborn"]
    assert re.search(r"^summary: 3 experiment\(s\) in \S+ \(interrupted\)$", out, re.M), out
    assert "  not started:             1" in out.splitlines()
    assert "  failed:                  2" in out.splitlines()


CHECKPOINT_PY = """
import signal, sys, time
out = sys.argv[1]
def on_term(signum, frame):
    open(out + ".term", "w").close()
    time.sleep(0.5)  # saving a checkpoint
    open(out + ".saved", "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(out + ".ready", "w").close()
time.sleep(30)
"""


def test_kill_timeout_grace_covers_the_whole_process_group(tmp_path):
    # A compound command keeps the shell as the group leader (as with
    # "cd src && python train.py").  The shell dies of SIGTERM at once; the
    # training script behind it saves a checkpoint on SIGTERM and needs 0.5 s.
    # kill_timeout = 5 promises it that time before any SIGKILL.
    script = write_script(tmp_path, "ckpt.py", CHECKPOINT_PY)
    out = tmp_path / "ckpt"
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"kill_timeout": 5}, [
        {"name": "train", "command": py(script, out) + "; echo after"},
    ])
    bg = Background(cfg, tmp_path, tmp_path)
    try:
        wait_for(Path(f"{out}.ready").exists, what="the child to start")
        os.kill(bg.pid, signal.SIGTERM)
        rc = bg.wait(30)
    finally:
        bg.kill()
    assert rc == 130, (bg.stdout(), bg.stderr())
    assert Path(f"{out}.term").exists()
    assert Path(f"{out}.saved").exists(), "SIGKILL came before kill_timeout: the checkpoint was cut short"
    assert meta(the_dir(base, "train"))["status"] == "killed"


@linux_only
def test_second_ctrl_c_kills_at_once(tmp_path):
    script = write_script(tmp_path, "stubborn.py", STUBBORN_PY)
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"kill_timeout": 30}, [
        {"name": "stubborn", "command": "exec " + py(script, "ignore", tmp_path / "s.pids")},
    ])
    bg = Background(cfg, tmp_path, tmp_path)
    pids = []
    try:
        wait_for((tmp_path / "s.pids").exists, what="the child to start")
        pids = _pids(tmp_path / "s.pids")
        t0 = time.monotonic()
        os.kill(bg.pid, signal.SIGINT)
        wait_for(lambda: "interrupted: stopping 1 running" in bg.stdout(), what="the first Ctrl-C to be handled")
        time.sleep(0.2)
        assert bg.proc.poll() is None, "SIGTERM is ignored and kill_timeout is 30 s: still waiting"
        assert not any(pid_gone(p) for p in pids)
        os.kill(bg.pid, signal.SIGINT)
        rc = bg.wait(20)
        elapsed = time.monotonic() - t0
        assert rc == 130, (bg.stdout(), bg.stderr())
        assert elapsed < 10, elapsed
        wait_for(lambda: all(pid_gone(p) for p in pids), timeout=5, what="all processes to be gone")
    finally:
        bg.kill()
        kill_pids(pids)
    assert meta(the_dir(base, "stubborn"))["status"] == "killed"
    assert read_state(base)["summary"]["status_indicator"] == "stopped"


def test_interrupt_during_a_busy_batch_never_hangs(tmp_path):
    # With many short experiments the scheduler's main thread spends most of
    # its time launching (creating directories, starting processes), so the
    # signal usually lands in the middle of a launch.  Whatever it interrupts,
    # the scheduler must stop within kill_timeout and keep its books straight.
    base = tmp_path / "results"
    n = 600
    cfg = write_config(tmp_path / "c.toml", {"max_concurrent_experiments": 4, "kill_timeout": 1}, [
        {"name": f"q{i:03d}", "command": "true"} for i in range(n)
    ])
    for trial in range(3):
        shutil.rmtree(base, ignore_errors=True)
        bg = Background(cfg, tmp_path, tmp_path)
        try:
            wait_for(lambda: bg.stdout().count(" started ") >= 20 + 10 * trial or bg.proc.poll() is not None,
                     what="the batch to get going")
            assert bg.proc.poll() is None, "the batch ended before it could be interrupted"
            os.kill(bg.pid, signal.SIGINT)
            try:
                rc = bg.proc.wait(6)
            except subprocess.TimeoutExpired:
                state = try_state(base)
                pytest.fail(f"trial {trial}: the scheduler hangs after SIGINT; running in its last state: "
                            f"{[(j['name'], j['work_dir']) for j in (state or {}).get('running', [])]}; "
                            f"output tail: {bg.stdout()[-600:]!r}")
        finally:
            bg.kill()
        assert rc == 130, (trial, bg.stdout()[-2000:], bg.stderr())
        s = read_state(base)
        summ = s["summary"]
        assert summ["status_indicator"] == "stopped" and summ["running"] == 0
        assert summ["pending"] + summ["finished"] + summ["errors"] == summ["total"] == n, summ
        started = {ln.split()[1] for ln in event_lines(bg.stdout(), "started")}
        assert {j["name"] for j in s["finished"] + s["errors"]} == started
        assert all(j["status"] == "pending" and j["attempt"] == 0 for j in s["pending"])
        assert len(os.listdir(base)) - 1 == len(started)  # one directory per started experiment, plus .exp_state


@pytest.mark.parametrize("fail", [False, True], ids=["all-ok", "one-failed"])
def test_linger_when_idle(tmp_path, fail):
    base = tmp_path / "results"
    cfg = write_config(tmp_path / "c.toml", {"linger_when_idle": True, "check_interval": 0.2}, [
        {"name": "one", "command": "exit 1" if fail else "true"},
    ])
    bg = Background(cfg, tmp_path, tmp_path)
    try:
        wait_for(lambda: (try_state(base) or {}).get("summary", {}).get("status_indicator") == "awaiting_shutdown",
                 what="awaiting_shutdown")
        s = read_state(base)
        assert s["summary"]["finished" if not fail else "errors"] == 1 and s["summary"]["running"] == 0
        time.sleep(0.5)
        assert bg.proc.poll() is None, "linger_when_idle keeps the scheduler alive"
        assert "all experiments done; waiting (linger_when_idle); press Ctrl-C to exit" in bg.stdout()
        os.kill(bg.pid, signal.SIGINT)
        rc = bg.wait(15)
    finally:
        bg.kill()
    assert rc == (1 if fail else 0), (bg.stdout(), bg.stderr())
    assert read_state(base)["summary"]["status_indicator"] == "stopped"
    out = bg.stdout()
    assert "(interrupted)" not in out
    assert "Traceback" not in bg.stderr()


# ============================================================================
# exp ls
# ============================================================================


@pytest.fixture(scope="module")
def ls_base(tmp_path_factory):
    """zeta (oldest: 1 s before the others start), then alpha, then beta (fails twice)."""
    tmp = tmp_path_factory.mktemp("ls")
    script = write_script(tmp, "metrics.py", METRICS_PY)
    env = {"PYTHONPATH": str(REPO)}
    cfg = write_config(tmp / "c.toml", {"auto_restart_on_error": True}, [
        {"name": "zeta", "command": py(script, 1.05), "priority": 3, "tags": ["sweep", "old"], "environment": env},
        {"name": "alpha", "command": py(script, 0), "priority": 2, "tags": ["sweep"], "environment": env},
        {"name": "beta", "command": "echo nope; exit 1", "priority": 1, "tags": ["base"], "max_retries": 1},
    ])
    r = run_cli("run", cfg, cwd=tmp)
    assert r.returncode == 1, (r.stdout, r.stderr)
    return tmp / "results"


def ls_json(base, *args, cwd=None):
    r = run_cli("ls", base, "--json", *args, cwd=cwd or base)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ls_table(ls_base):
    r = run_cli("ls", ls_base, cwd=ls_base)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    # Every metric gets a column of its own (no silent cut to four), then the directory, then
    # why the failed one ended.
    assert header == ["name", "status", "started", "duration", "runs", "step", "loss", "acc", "lr", "extra", "dir",
                      "reason"]
    rows = [re.split(r"\s{2,}", ln) for ln in lines[1:]]
    assert [row[0] for row in rows] == ["beta", "alpha", "zeta"]  # newest first
    assert [row[1] for row in rows] == ["error", "finished", "finished"]
    assert [row[4] for row in rows] == ["2", "1", "1"]
    for row in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[2]), row
        assert re.fullmatch(r"\d+\.\ds", row[3]), row
        assert re.fullmatch(rf"{row[0]}_\d{{4}}-\d\d-\d\d__\d\d-\d\d-\d\d(_\d+)?", row[10]), row
    assert [row[11] for row in rows] == ["exit code 1", "-", "-"]
    assert float(rows[2][3][:-1]) >= 1.0
    assert rows[0][5:10] == ["-"] * 5
    assert rows[2][5:10] == ["3", "0.3333", "0.8", "0.001", "7"]


def test_ls_json_and_filters(ls_base):
    rows = ls_json(ls_base)
    assert [r["name"] for r in rows] == ["beta", "alpha", "zeta"]
    zeta = rows[2]
    assert zeta["last_metrics"] == {"step": 3, "loss": pytest.approx(1 / 3), "acc": pytest.approx(0.8),
                                    "lr": 0.001, "extra": 7}
    assert zeta["runs"] == 1 and zeta["status"] == "finished" and zeta["tags"] == ["sweep", "old"]
    assert rows[0]["runs"] == 2 and rows[0]["last_metrics"] == {}
    assert rows[2]["started_at"] < rows[1]["started_at"]
    assert [r["name"] for r in ls_json(ls_base, "--status", "finished")] == ["alpha", "zeta"]
    assert [r["name"] for r in ls_json(ls_base, "--status", "error")] == ["beta"]
    assert ls_json(ls_base, "--status", "killed") == []
    assert [r["name"] for r in ls_json(ls_base, "--tag", "sweep")] == ["alpha", "zeta"]
    assert [r["name"] for r in ls_json(ls_base, "--tag", "old")] == ["zeta"]
    assert [r["name"] for r in ls_json(ls_base, "--name", "^[ab]")] == ["beta", "alpha"]
    assert [r["name"] for r in ls_json(ls_base, "--name", "et", "--tag", "base")] == ["beta"]
    assert [r["name"] for r in ls_json(ls_base, "--name", "z", "--status", "error")] == []


def test_ls_default_dir_and_empty(ls_base, tmp_path):
    r = run_cli("ls", cwd=ls_base.parent)  # ./results by default
    assert r.returncode == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:]] == ["beta", "alpha", "zeta"]
    r = run_cli("ls", ls_base, "--tag", "nothing", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == f"no experiments under {ls_base} match --tag nothing (3 experiment(s) there)\n"


def test_ls_errors(ls_base, tmp_path):
    r = run_cli("ls", ls_base, "--name", "(", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "invalid regular expression '('" in r.stderr
    r = run_cli("ls", ls_base, "--status", "bogus", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("ls", tmp_path / "missing", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == (f"exp: error: {tmp_path / 'missing'} is not a directory; "
                        "pass the base directory of your experiments\n")
    assert r.stdout == ""
