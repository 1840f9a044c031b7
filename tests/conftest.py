"""Shared fixtures for the exp test suite.

Everything here is real: real child processes started with ``sys.executable``,
real files under ``tmp_path``.  Nothing inside exp is mocked.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)

import exp  # noqa: E402  (must come after the sys.path change)

EXP_PY = os.path.join(ROOT, "exp.py")
assert os.path.abspath(exp.__file__) == EXP_PY, exp.__file__

# Variables that tie a process to an experiment; the suite must not inherit
# them (say, when pytest itself is launched by exp).
CONTEXT_VARS = ("EXPERIMENT_WORK_DIR", "EXPERIMENT_NAME", "EXPERIMENT_RUN_ID", "EXP_STANDALONE")

POSIX = os.name == "posix" and exp.fcntl is not None
posix_only = pytest.mark.skipif(not POSIX, reason="exp runs commands only on POSIX")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


def child_env(**overrides: str | None) -> dict[str, str]:
    """os.environ without experiment context, with the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in CONTEXT_VARS}
    env["PYTHONPATH"] = ROOT
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def py_cmd(script: str | os.PathLike[str], *args: object) -> str:
    """A shell command line that runs ``script`` with this test's Python."""
    return shlex.join([sys.executable, os.fspath(script), *map(str, args)])


def write_script(directory, name: str, source: str) -> pathlib.Path:
    """Write a dedented Python script into ``directory`` and return its path."""
    path = pathlib.Path(directory) / name
    path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    return path


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a child that is still running (exp stops its runs on it), SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def read_meta(work_dir) -> dict:
    """The experiment's metadata.json, parsed."""
    with open(os.path.join(work_dir, "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: no such process, or a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    # The state follows the ")" that closes the command name.
    return stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X")


@pytest.fixture(autouse=True)
def _no_experiment_context(monkeypatch):
    for var in CONTEXT_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves a non-daemon thread running (it would block exit)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=2)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked non-daemon threads: {leaked}"


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The fields follow the ")" that closes the command name (which may hold spaces).
    return stat[stat.rindex(")") + 2:].split()


def _live_children() -> dict[tuple[int, str], str] | None:
    """This process's children that still run: {(pid, start time): command line}.

    Zombies (exited, not yet reaped) do not count.  None where there is no
    /proc (macOS).  The start time tells a new child from an old one whose pid
    was reused.
    """
    me = os.getpid()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    pids: set[int] = set()
    try:
        for tid in tasks:  # one "children" file per thread (Linux >= 3.5)
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                pids.update(int(p) for p in f.read().split())
    except FileNotFoundError:  # a thread that just ended, or no "children" files: scan all of /proc
        pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
    except OSError:
        return None
    found = {}
    for pid in pids:
        fields = _proc_stat_fields(pid)
        # fields[0] is the state, [1] the parent's pid, [19] the start time (stat field 22).
        if fields is None or fields[1] != str(me) or fields[0] in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = "?"
        found[(pid, fields[19])] = cmdline
    return found


@pytest.fixture(autouse=True)
def _no_leaked_processes():
    """Fail a test that leaves a child process of pytest running, and SIGKILL it.

    A child that is still exiting gets about 2 s to become a zombie or go away.
    Skipped where there is no /proc.
    """
    before = _live_children()
    yield
    if before is None:
        return
    deadline = time.monotonic() + 2.0
    while True:
        now = _live_children() or {}
        leaked = {key: cmd for key, cmd in now.items() if key not in before}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid, _ in leaked:
        try:
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():  # its own group (exp's runs): the whole group
                os.killpg(pgid, signal.SIGKILL)
            else:  # never signal pytest's own group
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert not leaked, "test leaked child processes (now killed): " + "; ".join(
        f"pid {pid}: {cmd}" for (pid, _), cmd in sorted(leaked.items()))


@pytest.fixture
def base_dir(tmp_path):
    """Where the test's experiments go (not created: exp must create it)."""
    return tmp_path / "results"


@pytest.fixture
def make_exp(base_dir):
    """Build an Experiment under ``base_dir`` whose children can ``import exp``."""

    def make(name: str = "exp_test", command: str = "exit 0", **kwargs):
        env = dict(kwargs.pop("env", None) or {})
        env.setdefault("PYTHONPATH", ROOT)
        kwargs.setdefault("base_dir", base_dir)
        return exp.Experiment(name=name, command=command, env=env, **kwargs)

    return make


@pytest.fixture
def run_py(tmp_path):
    """Run a tiny Python script (written into tmp_path) in a child process.

    ``run_py(source, *args, env=None, cwd=None, timeout=60, name="child.py")``
    returns the CompletedProcess with text stdout/stderr.  ``env`` entries
    override :func:`child_env` (None removes a variable).
    """

    def run(source: str, *args: object, env: dict | None = None, cwd=None, timeout: float = 60,
            name: str = "child.py") -> subprocess.CompletedProcess:
        script = write_script(tmp_path, name, source)
        return subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            cwd=str(cwd or tmp_path),
            env=child_env(**(env or {})),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def call_with_timeout(fn, timeout: float, what: str = "call"):
    """Run ``fn()`` in a daemon thread; fail the test (instead of hanging) if it takes too long."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = err

    t = threading.Thread(target=target, name=f"timeout-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not return within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def kill_groups_later():
    """Collect process-group ids; SIGKILL whatever is left of them after the test.

    Keeps a failing kill test from leaving stubborn processes behind.
    """
    groups: list[int] = []
    yield groups
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ============================================================================
# Helpers shared by the test files (batch configs, the CLI, the state file)
# ============================================================================


def toml_value(v) -> str:
    """``v`` as a TOML value: a boolean, number, string, array or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def toml_text(scheduler: dict | None = None, experiments=()) -> str:
    """A batch file: a ``[scheduler]`` table (if given) and one ``[[experiments]]`` per dict.

    An experiment's ``sweep`` dict becomes its ``[experiments.sweep]`` table.
    """
    lines = []
    if scheduler:
        lines.append("[scheduler]")
        lines += [f"{k} = {toml_value(v)}" for k, v in scheduler.items()]
        lines.append("")
    for e in experiments:
        sweep = e.get("sweep")
        lines.append("[[experiments]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in e.items() if k != "sweep"]
        if sweep:
            lines.append("[experiments.sweep]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sweep.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(path, scheduler: dict | None = None, experiments=()) -> pathlib.Path:
    """Write :func:`toml_text` to ``path`` (its directory created if need be)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(scheduler, experiments), encoding="utf-8")
    return path


def write_batch(path, base, experiments, **scheduler) -> pathlib.Path:
    """A batch file at ``path`` whose experiments go to ``base``, with ``kill_timeout = 5``."""
    return write_config(path, {"base_experiment_dir": str(base), "kill_timeout": 5, **scheduler}, experiments)


def run_exp(*args, cwd=None, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python exp.py ARGS`` with text output; fails the test instead of hanging.

    ``env`` defaults to :func:`child_env`.
    """
    try:
        return subprocess.run(
            [sys.executable, EXP_PY, *map(str, args)], cwd=str(cwd) if cwd else None, env=env or child_env(),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"exp {' '.join(map(str, args))} did not finish within {timeout}s (a hang?)")


def read_state(base) -> dict:
    """The scheduler's state file under ``base``, parsed."""
    return json.loads((pathlib.Path(base) / ".exp_state" / "scheduler_state.json").read_text(encoding="utf-8"))


def try_state(base) -> dict | None:
    """:func:`read_state`, or None while there is no (complete) state file."""
    try:
        return read_state(base)
    except (OSError, ValueError):
        return None


def write_exp(base, rel: str, meta: dict, logs: dict | None = None, metrics: dict | None = None) -> pathlib.Path:
    """A hand-written experiment directory ``base/rel``: metadata.json, and each run's log and metrics
    CSV given (``{"run_0001": text}``), as another tool, an older exp or the earlier project left it."""
    d = pathlib.Path(base) / rel
    (d / "terminal_logs").mkdir(parents=True)
    (d / "metrics").mkdir()
    (d / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for run, text in (logs or {}).items():
        (d / "terminal_logs" / f"{run}.log").write_bytes(text if isinstance(text, bytes) else text.encode())
    for run, text in (metrics or {}).items():
        (d / "metrics" / f"{run}.csv").write_text(text, encoding="utf-8")
    return d


def exp_dirs(base, name) -> list[pathlib.Path]:
    """Experiment directories of ``name`` under ``base`` (sorted)."""
    pat = re.compile(re.escape(name) + r"_\d{4}-\d\d-\d\d__\d\d-\d\d-\d\d(_\d+)?\Z")
    base = pathlib.Path(base)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and pat.match(p.name))


def fds_under(directory) -> list[str]:
    """This process's open descriptors on files or directories under ``directory``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (another test's thread)
            continue
        if target == str(directory) or target.startswith(str(directory) + os.sep):
            found.append(target)
    return found


@contextlib.contextmanager
def tmpfs(path, size: str):
    """Mount a tmpfs of ``size`` (e.g. ``"2m"``) at the directory ``path`` for a full-disk test.

    We are root here and in CI; where mounting is refused the test is skipped,
    saying why.  A tmpfs that cannot be unmounted afterwards (a file still
    open there) fails the test.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("full-disk tests mount a tmpfs, which needs Linux")
    path = pathlib.Path(path)
    path.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"full-disk test skipped: cannot run mount ({e})")
    if r.returncode != 0:
        pytest.skip(f"full-disk test skipped: mounting a tmpfs was refused ({(r.stderr or r.stdout).strip()})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
            pytest.fail(f"could not unmount {path}: something still holds a file there open")
