"""Core behaviour of exp: experiment directories, metadata, runs, processes, env, CLI."""
from __future__ import annotations

import ast
import getpass
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

import exp
from conftest import (
    ROOT, call_with_timeout, child_env, linux_only, pid_gone, posix_only, py_cmd, wait_for, write_script,
)

DIR_RE = re.compile(r"(?P<name>.+)_(?P<stamp>\d{4}-\d\d-\d\d__\d\d-\d\d-\d\d)(?:_(?P<n>\d+))?\Z")


def iso(text):
    """Parse an ISO 8601 timestamp and insist that it carries a UTC offset."""
    assert isinstance(text, str), text
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None and value.utcoffset() is not None, text
    return value


# ============================================================================
# Pure helpers
# ============================================================================


@pytest.mark.parametrize(
    "seconds, text",
    [
        (None, "-"),
        (0, "0.0s"),
        (0.4, "0.4s"),
        (12, "12.0s"),
        (59.94, "59.9s"),
        (60, "1m00s"),
        (185, "3m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7380, "2h03m"),
        (90000, "25h00m"),
    ],
)
def test_format_duration(seconds, text):
    assert exp.format_duration(seconds) == text


@pytest.mark.parametrize(
    "value, expected",
    [(3, "run_0003"), ("3", "run_0003"), ("run_0003", "run_0003"), (" run_0012 ", "run_0012"),
     (1, "run_0001"), (12345, "run_12345")],
)
def test_run_id_str(value, expected):
    assert exp.run_id_str(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (0, r"run ids start at 1, got 0"),
        ("run_0000", r"run ids start at 1, got 'run_0000'"),
        ("x", r"run id must be an int or 'run_NNNN', got 'x'"),
        ("run_x", r"run id must be an int or 'run_NNNN', got 'run_x'"),
        (True, r"run id must be an int or 'run_NNNN', got True"),
    ],
)
def test_run_id_str_rejects(value, message):
    with pytest.raises(exp.ConfigError, match=message):
        exp.run_id_str(value)
    assert issubclass(exp.ConfigError, ValueError)


@pytest.mark.parametrize(
    "value, expected",
    [("0,1", [0, 1]), (" 2 , 3 ", [2, 3]), ("5", [5]), ("", []), ([0, 1], [0, 1]), ((3,), [3]),
     ([], []), (None, None)],
)
def test_parse_gpu_ids(value, expected):
    assert exp.parse_gpu_ids(value) == expected


@pytest.mark.parametrize("value", ["a", "0,a", "1.5", [1.5], ["a"], ["0"], [True], [-1], {"0": 1}, 3])
def test_parse_gpu_ids_rejects(value):
    with pytest.raises(exp.ConfigError) as info:
        exp.parse_gpu_ids(value)
    assert str(info.value) == f'gpu_ids: expected a list of integers or "0,1", got {value!r}'


@pytest.mark.parametrize(
    "command, expected",
    [
        ("conda run -n env python train.py", "conda run --no-capture-output -n env python train.py"),
        ("conda  run -n env python t.py", "conda  run --no-capture-output -n env python t.py"),
        ("conda\trun -n e python t.py", "conda\trun --no-capture-output -n e python t.py"),
        ("cd /src && conda run -n e python t.py", "cd /src && conda run --no-capture-output -n e python t.py"),
        ("CUDA_VISIBLE_DEVICES=0 conda run -p /env python t.py",
         "CUDA_VISIBLE_DEVICES=0 conda run --no-capture-output -p /env python t.py"),
        # already streaming: unchanged
        ("conda run --no-capture-output -n env python t.py", "conda run --no-capture-output -n env python t.py"),
        ("conda run -n env --no-capture-output python t.py", "conda run -n env --no-capture-output python t.py"),
        ("conda run --live-stream -n env python t.py", "conda run --live-stream -n env python t.py"),
        # not conda run: unchanged
        ("python train.py", "python train.py"),
        ("conda create -n env python", "conda create -n env python"),
        ("anaconda run x", "anaconda run x"),
        ("my-conda run x", "my-conda run x"),
        ("condarun x", "condarun x"),
        ("conda run", "conda run"),
    ],
)
def test_add_conda_no_capture(command, expected):
    assert exp.add_conda_no_capture(command) == expected


@pytest.mark.parametrize(
    "command, expected",
    [
        ("/opt/conda/bin/conda run -n env python t.py", "/opt/conda/bin/conda run --no-capture-output -n env python t.py"),
        ("~/miniconda3/bin/conda run -n env python t.py",
         "~/miniconda3/bin/conda run --no-capture-output -n env python t.py"),
    ],
)
def test_add_conda_no_capture_conda_given_by_path(command, expected):
    # `conda run` is `conda run` whether conda is found on PATH or named by its path.
    assert exp.add_conda_no_capture(command) == expected


@posix_only
def test_conda_run_command_is_started_with_no_capture_output(make_exp, tmp_path):
    # A stand-in `conda` on PATH that reports the arguments it was given.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "conda"
    fake.write_text('#!/bin/sh\necho "conda-args: $*"\n')
    fake.chmod(0o755)
    e = make_exp("conda", "conda run -n myenv python -c pass",
                 env={"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert e.run(background=True).wait(timeout=30) == 0
    log = e.read_log()
    assert "conda-args: run --no-capture-output -n myenv python -c pass" in log
    assert "[exp] command: conda run --no-capture-output -n myenv python -c pass" in log
    assert e.read_metadata()["command"] == "conda run -n myenv python -c pass"


# ============================================================================
# Experiment directories
# ============================================================================


def test_directory_layout_and_pending_metadata(base_dir):
    before = datetime.now()
    e = exp.Experiment(name="layout", command="echo hi", base_dir=base_dir)
    after = datetime.now()
    assert base_dir.is_dir()  # created on demand
    work = pathlib.Path(e.work_dir)
    assert work.parent == base_dir
    m = DIR_RE.match(work.name)
    assert m and m.group("name") == "layout" and m.group("n") is None, work.name
    assert e.timestamp == m.group("stamp")
    stamp = datetime.strptime(m.group("stamp"), exp.TIMESTAMP_FORMAT)  # local time
    assert before.replace(microsecond=0) <= stamp <= after
    names = {p.name for p in work.iterdir()}  # nothing else: no lock or temp files left behind
    assert names == {"metadata.json", "metrics", "terminal_logs"}
    assert (work / "terminal_logs").is_dir() and (work / "metrics").is_dir()
    assert list((work / "terminal_logs").iterdir()) == [] and list((work / "metrics").iterdir()) == []
    meta = e.read_metadata()
    assert meta["status"] == "pending" and meta["runs"] == [] and meta["current_run_id"] is None
    assert meta["timestamp_dir"] == e.timestamp


def test_directory_timestamp_is_local_time(run_py, tmp_path):
    # In a zone 5h30 east of UTC the directory name and created_at follow local time.
    r = run_py(
        """
        import json, sys, exp
        e = exp.Experiment(name="tz", command="true", base_dir=sys.argv[1])
        print(json.dumps({"timestamp": e.timestamp, "created_at": e.read_metadata()["created_at"]}))
        """,
        tmp_path / "tzres",
        env={"TZ": "IST-05:30"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tz = timezone(timedelta(hours=5, minutes=30))
    now_there = datetime.now(tz).replace(tzinfo=None)
    stamp = datetime.strptime(out["timestamp"], exp.TIMESTAMP_FORMAT)
    assert abs((now_there - stamp).total_seconds()) < 30
    created = iso(out["created_at"])
    assert created.utcoffset() == timedelta(hours=5, minutes=30)
    assert abs((created.replace(tzinfo=None) - stamp).total_seconds()) <= 2


def test_same_second_collisions_get_numbered_suffixes(base_dir):
    for attempt in range(5):
        name = f"dup{attempt}"
        first_stamp = datetime.now().strftime(exp.TIMESTAMP_FORMAT)
        es = [exp.Experiment(name=name, command="true", base_dir=base_dir) for _ in range(3)]
        if datetime.now().strftime(exp.TIMESTAMP_FORMAT) != first_stamp:
            continue  # the clock ticked over mid-way: try again
        assert [e.timestamp for e in es] == [first_stamp, f"{first_stamp}_2", f"{first_stamp}_3"]
        assert [os.path.basename(e.work_dir) for e in es] == [
            f"{name}_{first_stamp}", f"{name}_{first_stamp}_2", f"{name}_{first_stamp}_3"]
        assert [e.read_metadata()["timestamp_dir"] for e in es] == [e.timestamp for e in es]
        return
    pytest.fail("could not create three experiments within one second")


CREATOR = """
import json, os, sys, time
import exp
base, start, ready = sys.argv[1], sys.argv[2], sys.argv[3]
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.001)
dirs = [exp.Experiment(name="same", command="true", base_dir=base).work_dir for _ in range(5)]
print(json.dumps(dirs))
"""


@posix_only
def test_collisions_across_processes_never_share_a_directory(tmp_path, base_dir):
    script = write_script(tmp_path, "creator.py", CREATOR)
    start = tmp_path / "start"
    procs = []
    for k in range(8):
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(base_dir), str(start), str(tmp_path / f"ready{k}")],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    wait_for(lambda: all((tmp_path / f"ready{k}").exists() for k in range(8)), 30, what="creators to start")
    start.touch()  # all eight go at once
    dirs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        dirs += json.loads(out)
    assert len(dirs) == 40
    assert len(set(dirs)) == 40
    assert sorted(os.listdir(base_dir)) == sorted(os.path.basename(d) for d in dirs)
    for d in dirs:
        m = DIR_RE.match(os.path.basename(d))
        assert m and m.group("name") == "same"
        meta = json.loads(pathlib.Path(d, "metadata.json").read_text())
        assert meta["name"] == "same" and meta["status"] == "pending"
        assert os.path.basename(d) == f"same_{meta['timestamp_dir']}"


# ============================================================================
# Metadata
# ============================================================================


def test_metadata_fields_through_runs(make_exp, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    e = make_exp("fields", "exit 0", tags=["a", "b"], description="first try", gpu_ids=[0, 1], cwd=wd)
    meta = e.read_metadata()
    assert meta["name"] == "fields"
    assert meta["command"] == "exit 0"
    assert meta["tags"] == ["a", "b"]
    assert meta["description"] == "first try"
    assert meta["status"] == "pending"
    assert meta["exit_code"] is None and meta["pid"] is None
    assert meta["hostname"] == socket.gethostname()
    assert meta["user"] == getpass.getuser()
    assert meta["gpu_ids"] == [0, 1]
    assert meta["cwd"] == str(wd)
    created = iso(meta["created_at"])
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 30
    assert meta["started_at"] is None and meta["ended_at"] is None and meta["duration"] is None
    assert meta["current_run_id"] is None and meta["runs"] == []
    assert meta["exp_version"] == exp.__version__
    assert meta["python_version"] == platform.python_version()
    assert meta["python_executable"] == sys.executable
    assert "git" in meta

    assert e.run() == 0
    meta = e.read_metadata()
    assert meta["status"] == "finished" and meta["exit_code"] == 0 and meta["pid"] is None
    started, ended = iso(meta["started_at"]), iso(meta["ended_at"])
    assert created <= started <= ended
    assert isinstance(meta["duration"], float) and 0 <= meta["duration"] < 30
    assert meta["current_run_id"] == "run_0001"
    [r1] = meta["runs"]
    assert r1["id"] == "run_0001" and r1["status"] == "finished" and r1["exit_code"] == 0
    assert r1["started_at"] == meta["started_at"] and r1["ended_at"] == meta["ended_at"]
    assert isinstance(r1["pid"], int) and r1["pid"] > 0

    e.command = "exit 2"
    assert e.run() == 2
    meta = e.read_metadata()
    assert meta["status"] == "error" and meta["exit_code"] == 2 and meta["current_run_id"] == "run_0002"
    assert meta["command"] == "exit 2"
    assert [(r["id"], r["status"], r["exit_code"]) for r in meta["runs"]] == [
        ("run_0001", "finished", 0), ("run_0002", "error", 2)]
    assert meta["runs"][0] == r1  # the first run's entry is left alone
    for r in meta["runs"]:
        assert iso(r["started_at"]) <= iso(r["ended_at"])


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                   env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd)})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_info_clean_then_dirty(tmp_path, make_exp):
    repo = tmp_path / "repo"
    (repo / "clean").mkdir(parents=True)
    (repo / "dirty").mkdir()
    _git(repo, "init", "-q")
    _git(repo, "checkout", "-q", "-b", "exp-branch")
    (repo / "tracked.txt").write_text("one\n")
    _git(repo, "add", "tracked.txt")
    _git(repo, "-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)

    # git_info caches per cwd for a few seconds, so each state uses its own cwd.
    clean = make_exp("git_clean", cwd=repo / "clean").read_metadata()["git"]
    assert clean == {"commit": head, "branch": "exp-branch", "dirty": False}

    (repo / "tracked.txt").write_text("two\n")
    dirty = make_exp("git_dirty", cwd=repo / "dirty").read_metadata()["git"]
    assert dirty == {"commit": head, "branch": "exp-branch", "dirty": True}


def test_git_is_null_outside_a_work_tree(tmp_path, make_exp):
    plain = tmp_path / "plain"
    plain.mkdir()
    if any((p / ".git").exists() for p in [plain, *plain.parents]):
        pytest.skip("tmp_path is inside a git work tree")
    assert make_exp("nogit", cwd=plain).read_metadata()["git"] is None


@posix_only
def test_git_missing_from_path_never_fails(tmp_path, make_exp, monkeypatch):
    repo = tmp_path / "repo2"
    (repo / ".git").mkdir(parents=True)  # looks like a work tree; git itself is missing
    cwd = repo / "sub"
    cwd.mkdir()
    bindir = tmp_path / "bin_without_git"
    bindir.mkdir()
    os.symlink(os.path.realpath("/bin/sh"), bindir / "sh")
    monkeypatch.setenv("PATH", str(bindir))
    e = make_exp("git_missing", "exit 0", cwd=cwd)
    assert e.read_metadata()["git"] is None
    assert e.run(background=True).wait(timeout=30) == 0
    meta = e.read_metadata()
    assert meta["git"] is None and meta["status"] == "finished"


def test_no_secrets_in_metadata(make_exp, tmp_path):
    out = tmp_path / "env.json"
    script = write_script(tmp_path, "dump_env.py", "import json, os, sys\n"
                          "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    e = make_exp("secrets", py_cmd(script, out),
                 env={"API_TOKEN": "s3cret-tok-123", "WANDB_API_KEY": "wandb-key-987", "PLAIN_VAR": "visible"},
                 lark_config={"app_id": "cli_1", "app_secret": "zzz-lark-secret-zzz"})
    texts = [pathlib.Path(e.metadata_path).read_text()]
    assert e.run(background=True).wait(timeout=30) == 0
    texts.append(pathlib.Path(e.metadata_path).read_text())
    for text in texts:
        for secret in ("s3cret-tok-123", "wandb-key-987", "zzz-lark-secret-zzz"):
            assert secret not in text
    assert json.loads(texts[-1])["environment"]["PLAIN_VAR"] == "visible"
    # The child still gets the real values.
    child = json.loads(out.read_text())
    assert child["API_TOKEN"] == "s3cret-tok-123" and child["WANDB_API_KEY"] == "wandb-key-987"


def test_metadata_json_is_json_one_key_per_line():
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    obj = {
        "none": None, "t": True, "f": False, "int": -12, "big": 2**70, "float": 0.1, "level": Level.HIGH,
        "str": 'quote " backslash \\ newline \n tab \t é ✓ \u2028', "empty": [], "list": [1, "a", None],
        "runs": [{"id": "run_0001", "pid": 7}, {"id": "run_0002", "pid": None}], "dict": {"k": [1.5]},
        "path": pathlib.Path("/x/y"), 3: "int key",
    }
    text = exp.dumps_json(obj)
    back = json.loads(text)
    expected = {str(k): v for k, v in obj.items()}
    expected.update(level=3, path="/x/y")
    assert back == expected
    lines = text.rstrip("\n").split("\n")  # not splitlines(): U+2028 is a line break to it
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
    assert lines[1:4] == ['  "none": null,', '  "t": true,', '  "f": false,']
    assert '  "runs": [' in lines and '    {"id": "run_0001", "pid": 7},' in lines  # a run per line
    assert '"str": "quote \\" backslash \\\\ newline \\n tab \\t é ✓' in text  # readable, not \\u-escaped
    assert len(lines) == len(obj) + 2 + 3  # one line per key, plus braces and the runs list's own lines
    # Each value is exactly what json writes for it (a list of objects aside, which gets a line per item).
    entries = {ln.rstrip(",") for ln in lines}
    for k, v in obj.items():
        if k != "runs":
            assert f"  {json.dumps(str(k))}: {json.dumps(v, ensure_ascii=False, default=str)}" in entries


def test_metadata_json_puts_each_object_of_a_list_on_its_own_line():
    import collections

    class Runs(list):
        pass

    for runs in ([{"id": 1}, {"id": 2}], Runs([{"id": 1}, {"id": 2}]),
                 [collections.OrderedDict(id=1), collections.OrderedDict(id=2)]):
        assert exp.dumps_json({"runs": runs}) == '{\n  "runs": [\n    {"id": 1},\n    {"id": 2}\n  ]\n}\n'


@posix_only
def test_metadata_reader_never_sees_torn_json(make_exp):
    e = make_exp("atomic", "exit 0")
    path = e.metadata_path
    stop = threading.Event()
    seen = {"reads": 0, "errors": []}

    def reader():
        while not stop.is_set():
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                obj = json.loads(text)
                assert isinstance(obj, dict) and "status" in obj
            except (ValueError, AssertionError) as err:
                seen["errors"].append(f"{err}: {text[:200]!r}")
            seen["reads"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for _ in range(4):
            handles = [e.run(background=True) for _ in range(3)]  # concurrent runs of one experiment
            assert [h.wait(timeout=30) for h in handles] == [0, 0, 0]
        # How many reads fall during the runs depends on the machine's speed;
        # at least one more, of the final file, happens however slow it is.
        reads_after_runs = seen["reads"]
        wait_for(lambda: seen["reads"] > reads_after_runs, 10, what="a read of the final metadata")
    finally:
        stop.set()
        t.join(5)
    assert seen["errors"] == []
    assert seen["reads"] >= 1
    meta = e.read_metadata()
    # No update was lost between the concurrent runs.
    assert [r["id"] for r in meta["runs"]] == [f"run_{n:04d}" for n in range(1, 13)]
    assert all(r["status"] == "finished" and r["exit_code"] == 0 for r in meta["runs"])
    assert not [n for n in os.listdir(e.work_dir) if n.endswith(".tmp")]


# ============================================================================
# Runs, resume, load, validation
# ============================================================================


def test_repeated_runs_are_numbered(make_exp):
    e = make_exp("numbered", "exit 0")
    assert e.runs() == []
    for n in (1, 2, 3):
        assert e.run() == 0
        assert e.current_run_id == f"run_{n:04d}"
    assert e.runs() == ["run_0001", "run_0002", "run_0003"]
    assert sorted(os.listdir(os.path.join(e.work_dir, "terminal_logs"))) == [
        "run_0001.log", "run_0002.log", "run_0003.log"]
    assert e.log_path(2) == os.path.join(e.work_dir, "terminal_logs", "run_0002.log")
    assert e.metrics_file("run_0003") == os.path.join(e.work_dir, "metrics", "run_0003.csv")


@pytest.mark.parametrize("by", ["timestamp", "path", "pathlib"])
def test_resume_reuses_the_directory(make_exp, base_dir, tmp_path, by):
    wd = tmp_path / "cwd"
    wd.mkdir()
    e = make_exp("resumable", "exit 0", tags=["t1"], gpu_ids=[2], description="desc", cwd=wd)
    assert e.run() == 0
    e.command = "exit 1"
    assert e.run() == 1
    key = {"timestamp": e.timestamp, "path": e.work_dir, "pathlib": pathlib.Path(e.work_dir)}[by]
    r = exp.Experiment("resumable", "exit 0", base_dir, resume=key, env={"PYTHONPATH": ROOT})
    assert r.work_dir == e.work_dir and r.timestamp == e.timestamp
    assert (r.tags, r.gpu_ids, r.cwd, r.description) == (["t1"], [2], str(wd), "desc")
    meta = r.read_metadata()
    assert meta["status"] == "pending" and meta["pid"] is None
    assert meta["created_at"] == e.read_metadata()["created_at"]
    assert r.run() == 0
    assert r.current_run_id == "run_0003"
    meta = r.read_metadata()
    assert [(x["id"], x["status"]) for x in meta["runs"]] == [
        ("run_0001", "finished"), ("run_0002", "error"), ("run_0003", "finished")]
    assert meta["status"] == "finished" and meta["command"] == "exit 0"
    assert os.listdir(base_dir) == [os.path.basename(e.work_dir)]
    assert "CUDA_VISIBLE_DEVICES=2" in r.read_log("run_0003")


def test_resume_overrides_given_fields(make_exp, base_dir, tmp_path):
    e = make_exp("override", tags=["old"], description="old", gpu_ids=[0])
    other = tmp_path / "other"
    other.mkdir()
    r = exp.Experiment("override", "exit 0", base_dir, resume=e.timestamp, tags=["new"],
                       description="new", gpu_ids="3,4", cwd=other)
    meta = r.read_metadata()
    assert (meta["tags"], meta["description"], meta["gpu_ids"], meta["cwd"]) == (["new"], "new", [3, 4], str(other))
    assert exp.Experiment.load(e.work_dir).tags == ["new"]


def test_resume_under_another_name_is_refused(make_exp, base_dir):
    """The directory keeps its name: resuming it as 'other' would rename the experiment in
    metadata.json only."""
    e = make_exp("bg")
    before = pathlib.Path(e.metadata_path).read_bytes()
    with pytest.raises(exp.ConfigError) as info:
        exp.Experiment(name="other", command="exit 0", base_dir=base_dir, resume=e.work_dir)
    assert str(info.value) == (f"resume={e.work_dir!r}: {e.work_dir} holds experiment 'bg', not 'other'; "
                               "pass name='bg' to resume it")
    assert pathlib.Path(e.metadata_path).read_bytes() == before
    assert exp.Experiment(name="bg", command="exit 0", base_dir=base_dir, resume=e.work_dir).name == "bg"


def test_resume_that_does_not_exist(make_exp, base_dir):
    e = make_exp("real")
    with pytest.raises(ValueError) as info:
        exp.Experiment("real", "exit 0", base_dir, resume="1999-01-01__00-00-00")
    msg = str(info.value)
    assert "resume='1999-01-01__00-00-00': no experiment directory at" in msg
    assert os.path.join(str(base_dir), "real_1999-01-01__00-00-00") in msg
    assert f"existing timestamps for 'real': {e.timestamp}" in msg
    with pytest.raises(exp.ConfigError, match=r"no experiment named 'ghost' exists under"):
        exp.Experiment("ghost", "exit 0", base_dir, resume="2001-01-01__00-00-00")
    with pytest.raises(exp.ConfigError, match=r"resume=.*no experiment directory") as info:
        exp.Experiment("real", "exit 0", base_dir, resume=str(base_dir / "nope" / "dir"))
    # A path names one place: not also "<base>/real_<that path>".
    assert f"no experiment directory at {base_dir / 'nope' / 'dir'};" in str(info.value)
    assert os.listdir(base_dir) == [os.path.basename(e.work_dir)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, r"name must be a non-empty string such as 'resnet50_lr3e-4', got ''"),
        ({"name": "   "}, r"name must be a non-empty string"),
        ({"name": None}, r"name must be a non-empty string"),
        ({"name": "a/b"}, r"name 'a/b' cannot contain a path separator; it becomes a directory name"),
        ({"name": ".."}, r"name '\.\.' starts with '\.', which would make a hidden directory"),
        ({"gpu_ids": ["a"]}, r'gpu_ids: expected a list of integers or "0,1", got \[\'a\'\]'),
        ({"gpu_ids": [1.5]}, r'gpu_ids: expected a list of integers or "0,1", got \[1\.5\]'),
        ({"gpu_ids": "a"}, r'gpu_ids: expected a list of integers or "0,1", got \'a\''),
        ({"command": ""}, r"command must be a non-empty shell command string such as 'python train.py'"),
        ({"command": 5}, r"command must be a non-empty shell command string"),
        ({"tags": "baseline"}, r"tags must be a list of strings such as \['baseline', 'lr-sweep'\], got 'baseline'"),
        ({"tags": [1]}, r"tags must be a list of strings"),
        ({"description": 3}, r"description must be a string, got int"),
        ({"env": {"A=B": "x"}}, r"env: 'A=B' is not a valid environment variable name"),
        ({"env": ["A"]}, r"env must be a dict of variable names to strings, got list"),
        ({"cwd": "/nonexistent/dir/for/exp"}, r"cwd '/nonexistent/dir/for/exp' is not an existing directory"),
        ({"resume": ""}, r"resume must be a timestamp such as '2025-09-27__17-16-19' or a directory path"),
    ],
)
def test_bad_arguments_raise_value_error(base_dir, kwargs, message):
    args = {"name": "ok", "command": "exit 0", "base_dir": base_dir, **kwargs}
    with pytest.raises(ValueError, match=message):
        exp.Experiment(**args)
    assert not base_dir.exists()  # nothing was created


def test_bad_extra_env_claims_no_run(make_exp):
    e = make_exp("badenv")
    with pytest.raises(exp.ConfigError, match=r"extra_env: '' is not a valid environment variable name"):
        e.run(extra_env={"": "x"})
    assert e.runs() == [] and e.read_metadata()["status"] == "pending"


def test_command_list_is_shell_joined(make_exp):
    e = make_exp("listcmd", ["echo", "two words", "it's"])
    assert e.command == "echo 'two words' 'it'\"'\"'s'"
    assert e.run() == 0
    assert "two words it's\n" in e.read_log()


def test_load_round_trips_fields(make_exp, tmp_path):
    wd = tmp_path / "loadwd"
    wd.mkdir()
    e = make_exp("loadme", "exit 0", tags=["x", "y"], gpu_ids=[1, 3], cwd=wd, description="round trip")
    assert e.run() == 0
    loaded = exp.Experiment.load(e.work_dir)
    for attr in ("name", "command", "tags", "gpu_ids", "cwd", "description", "work_dir", "base_dir",
                 "timestamp", "created_at", "current_run_id"):
        assert getattr(loaded, attr) == getattr(e, attr), attr
    assert loaded.status == "finished" and loaded.current_run_id == "run_0001"
    assert loaded.runs() == ["run_0001"]
    assert loaded.read_log() == e.read_log()
    assert exp.Experiment.load(pathlib.Path(e.work_dir)).work_dir == e.work_dir
    with pytest.raises(exp.ConfigError, match=r"is not an experiment directory: it has no metadata.json"):
        exp.Experiment.load(tmp_path)


# ============================================================================
# The child's environment
# ============================================================================

DUMP_ENV = "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"


@posix_only
def test_child_environment(make_exp, tmp_path, monkeypatch):
    script = write_script(tmp_path, "dump_env.py", DUMP_ENV)
    out = tmp_path / "env.json"
    monkeypatch.setenv("FOO", "from-parent")
    monkeypatch.setenv("KEEP_ME", "kept")
    monkeypatch.setenv("OVERRIDE_ME", "parent")
    monkeypatch.setenv("EXP_STANDALONE", "1")
    e = make_exp("envtest", py_cmd(script, out), gpu_ids=[0, 1],
                 env={"OVERRIDE_ME": "from-env", "BOTH": "from-env", "GONE_BY_ENV": None})
    monkeypatch.setenv("GONE_BY_ENV", "parent")
    assert e.run(extra_env={"FOO": None, "BOTH": "from-extra", "EXTRA": "e"}) == 0
    env = json.loads(out.read_text())
    assert env["EXPERIMENT_WORK_DIR"] == e.work_dir
    assert env["EXPERIMENT_NAME"] == "envtest"
    assert env["EXPERIMENT_RUN_ID"] == "run_0001"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["KEEP_ME"] == "kept"
    assert env["OVERRIDE_ME"] == "from-env"
    assert env["BOTH"] == "from-extra"  # extra_env wins over env
    assert env["EXTRA"] == "e"
    assert "FOO" not in env  # extra_env None removes
    assert "GONE_BY_ENV" not in env  # env None removes
    assert "EXP_STANDALONE" not in env
    assert env["PYTHONPATH"] == ROOT

    assert e.run() == 0
    env = json.loads(out.read_text())
    assert env["EXPERIMENT_RUN_ID"] == "run_0002"
    assert env["FOO"] == "from-parent" and "EXTRA" not in env  # extra_env is per run


@posix_only
def test_no_gpu_ids_leaves_cuda_visible_devices_alone(make_exp, tmp_path, monkeypatch):
    script = write_script(tmp_path, "dump_env.py", DUMP_ENV)
    out = tmp_path / "env.json"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert make_exp("nogpu", py_cmd(script, out)).run() == 0
    assert json.loads(out.read_text())["CUDA_VISIBLE_DEVICES"] == "7"


# ============================================================================
# Exit codes and the log
# ============================================================================


@posix_only
@pytest.mark.parametrize(
    "command, code, status",
    [("exit 0", 0, "finished"), ("echo out; echo err >&2; exit 1", 1, "error"),
     ("no_such_command_for_exp_tests", 127, "error")],
)
def test_exit_codes_and_status(make_exp, command, code, status):
    e = make_exp("codes", command)
    assert e.run() == code
    meta = e.read_metadata()
    assert (meta["status"], meta["exit_code"]) == (status, code)
    assert (meta["runs"][0]["status"], meta["runs"][0]["exit_code"]) == (status, code)
    log = e.read_log()
    assert f"run_0001 ended: exit code {code} ({status}), duration " in log
    if code == 1:
        assert "out\n" in log and "err\n" in log
    if code == 127:
        assert re.search(r"no_such_command_for_exp_tests: .*not found", log), log


@posix_only
def test_log_has_lifecycle_lines_and_child_output(make_exp, tmp_path, capfd):
    script = write_script(tmp_path, "hello.py", "import sys\nprint('hello stdout')\n"
                          "print('hello stderr', file=sys.stderr)\n")
    wd = tmp_path / "logcwd"
    wd.mkdir()
    e = make_exp("logged", py_cmd(script), cwd=wd)
    assert e.run() == 0
    log = e.read_log()
    lines = log.splitlines()
    mark = exp.LOG_MARK
    assert mark == "[exp]"
    assert re.fullmatch(r"\[exp\] \S+ run_0001 of 'logged' starting", lines[0]), lines[0]
    iso(lines[0].split()[1])
    assert f"{mark} command: {py_cmd(script)}" in lines
    assert f"{mark} cwd: {wd}" in lines
    assert f"{mark} work_dir: {e.work_dir}" in lines
    assert "hello stdout" in lines and "hello stderr" in lines
    assert re.fullmatch(r"\[exp\] \S+ run_0001 ended: exit code 0 \(finished\), duration \d+\.\ds", lines[-1]), lines[-1]
    assert lines.index("hello stdout") < len(lines) - 1
    # Foreground: the same text went to the console.
    assert capfd.readouterr().out == log
    assert e.get_log_tail(1) == lines[-1] + "\n"


@posix_only
def test_carriage_return_progress_bars_kept_byte_for_byte(make_exp, tmp_path, capfdbinary):
    payload = b"epoch 1 [#   ] 10%\r[##  ] 50%\r[####] 100%\r\nnext\x1b[0m line\n"
    script = write_script(tmp_path, "bar.py", f"import sys\nsys.stdout.buffer.write({payload!r})\n")
    e = make_exp("bars", py_cmd(script))
    assert e.run() == 0
    raw = pathlib.Path(e.log_path()).read_bytes()
    assert payload in raw
    assert capfdbinary.readouterr().out == raw  # and so did the console


# ============================================================================
# Foreground streaming, background handles, stopping
# ============================================================================

DRIVER = """
import os, signal, sys
import exp
if not os.environ.get("DRIVER_SIGINT_AS_INHERITED"):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if inherited ignored
name, command, base, grace, where = sys.argv[1:6]
e = exp.Experiment(name=name, command=command, base_dir=base, env={"PYTHONPATH": sys.path[0]})
open(where, "w").write(e.work_dir)
code = e.run(grace=float(grace))
print(f"driver: run returned {code}", file=sys.stderr)
sys.exit(code)
"""


def _start_driver(tmp_path, base_dir, name, command, grace=0.5, sigint_ignored=False, **popen):
    """The driver script running ``command`` in the foreground; ``sigint_ignored``: started as a
    shell starts a background job (SIGINT ignored), the driver leaving that as it is."""
    driver = write_script(tmp_path, "driver.py", DRIVER)
    where = tmp_path / f"{name}.workdir"
    env = child_env()
    if sigint_ignored:
        env["DRIVER_SIGINT_AS_INHERITED"] = "1"
        popen["preexec_fn"] = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen(
        [sys.executable, str(driver), name, command, str(base_dir), str(grace), str(where)],
        env=env, stdin=subprocess.DEVNULL, **popen)
    return proc, where


@posix_only
def test_foreground_output_streams_live(tmp_path, base_dir):
    child = write_script(tmp_path, "slow.py", """
        import time
        print("first")
        time.sleep(1.5)
        print("second")
        raise SystemExit(3)
        """)
    proc, where = _start_driver(tmp_path, base_dir, "stream", py_cmd(child),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(30, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        early = b""
        while b"first\n" not in early:
            line = proc.stdout.readline()
            assert line, f"driver ended before printing 'first': {early!r}"
            early += line
        t_first = time.monotonic()
        assert proc.poll() is None and b"second" not in early
        rest = proc.stdout.read()
        t_end = time.monotonic()
        err = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    assert t_end - t_first > 1.0, "'first' reached the console only when the child ended"
    assert b"second\n" in rest
    assert proc.returncode == 3, err
    assert b"driver: run returned 3" in err
    meta = exp.Experiment.load(where.read_text()).read_metadata()
    assert (meta["status"], meta["exit_code"]) == ("error", 3)


@posix_only
def test_background_handle(make_exp, kill_groups_later):
    e = make_exp("bg", "exec sleep 30")
    t0 = time.monotonic()
    h = e.run(background=True)
    kill_groups_later.append(h.pid)
    assert time.monotonic() - t0 < 5  # returned at once
    assert isinstance(h, exp.RunHandle) and h.run_id == "run_0001"
    assert isinstance(h.pid, int) and not pid_gone(h.pid)
    assert h.poll() is None
    meta = e.read_metadata()
    assert (meta["status"], meta["pid"], meta["current_run_id"]) == ("running", h.pid, "run_0001")
    assert meta["runs"][0]["status"] == "running" and meta["runs"][0]["pid"] == h.pid
    with pytest.raises(subprocess.TimeoutExpired):
        h.wait(timeout=0.1)
    assert h.poll() is None
    code = call_with_timeout(lambda: h.terminate(grace=0.5), 15, "terminate()")
    assert code == -signal.SIGTERM  # sleep dies on SIGTERM, no SIGKILL needed
    assert h.poll() == code and h.wait() == code and h.status == "killed"
    meta = e.read_metadata()
    assert (meta["status"], meta["exit_code"], meta["pid"]) == ("killed", code, None)
    assert (meta["runs"][0]["status"], meta["runs"][0]["exit_code"]) == ("killed", code)
    assert f"run_0001 ended: killed (exit code {code})" in e.read_log()
    assert pid_gone(h.pid)

    e.command = "exit 4"
    h2 = e.run(background=True)
    assert h2.wait(timeout=30) == 4 and h2.poll() == 4 and h2.status == "error"
    assert h2.terminate(grace=0.5) == 4  # already ended: nothing to do
    meta = e.read_metadata()
    assert (meta["status"], meta["current_run_id"]) == ("error", "run_0002")
    assert [r["status"] for r in meta["runs"]] == ["killed", "error"]


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the grandchild inherits the ignore
grandchild = subprocess.Popen(["sleep", "60"])
pids = sys.argv[1]
def on_term(signum, frame):  # the child survives SIGTERM as well, but notes that it came
    open(pids + ".term", "w").close()
signal.signal(signal.SIGTERM, on_term)
with open(pids + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(pids + ".tmp", pids)
print("stubborn child started", flush=True)
while True:
    time.sleep(0.05)
"""


def _read_pids(path):
    wait_for(path.exists, 20, what="the child to start")
    child, grandchild = map(int, path.read_text().split())
    assert not pid_gone(child) and not pid_gone(grandchild)
    return child, grandchild


@posix_only
@linux_only
def test_terminate_kills_sigterm_ignoring_child_and_grandchild(make_exp, tmp_path, kill_groups_later):
    script = write_script(tmp_path, "stubborn.py", STUBBORN)
    pids = tmp_path / "pids"
    e = make_exp("stubborn", "exec " + py_cmd(script, pids))
    h = e.run(background=True)
    kill_groups_later.append(h.pid)
    child, grandchild = _read_pids(pids)
    assert os.getpgid(child) == h.pid  # h.pid leads the run's process group (exp's supervisor)
    code = call_with_timeout(lambda: h.terminate(grace=0.5), 15, "terminate(grace=0.5)")
    assert code == -signal.SIGKILL
    # SIGTERM came first and the child lived to handle it: a SIGKILL sent at
    # once would have beaten the handler.  (No bound on how long it took.)
    assert (tmp_path / "pids.term").exists(), "SIGKILL without a SIGTERM first"
    wait_for(lambda: pid_gone(child) and pid_gone(grandchild), 5, what="child and grandchild to die")
    meta = e.read_metadata()
    assert (meta["status"], meta["exit_code"]) == ("killed", -signal.SIGKILL)
    assert meta["runs"][0]["status"] == "killed"


@posix_only
@linux_only
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "sigint-inherited-as-ignored"])
def test_ctrl_c_in_foreground_kills_the_run(tmp_path, base_dir, kill_groups_later, sigint_ignored):
    script = write_script(tmp_path, "stubborn.py", STUBBORN)
    pids = tmp_path / "pids"
    proc, where = _start_driver(tmp_path, base_dir, "ctrlc", "exec " + py_cmd(script, pids), grace=0.5,
                                sigint_ignored=sigint_ignored, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        child, grandchild = _read_pids(pids)
        kill_groups_later.append(child)  # the child leads its own process group
        # Once the child's first line reaches the driver's stdout, run() is following the log.
        seen = b""
        while b"stubborn child started\n" not in seen:
            line = proc.stdout.readline()
            assert line, f"driver ended early: {seen!r}"
            seen += line
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        out = seen + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err, err
    assert b"driver: run returned" not in err
    assert b"stubborn child started" in out  # followed to the console before the interrupt
    wait_for(lambda: pid_gone(child) and pid_gone(grandchild), 5, what="child and grandchild to die")
    e = exp.Experiment.load(where.read_text())
    meta = e.read_metadata()
    assert meta["status"] == "killed"
    assert meta["runs"][0]["status"] == "killed" and meta["runs"][0]["ended_at"] is not None
    assert "run_0001 ended: killed" in e.read_log()


@posix_only
def test_ten_megabytes_of_stderr_do_not_hang(tmp_path, base_dir):
    script = write_script(tmp_path, "loud.py", """
        import sys
        line = "e" * 1023 + "\\n"
        for _ in range(10 * 1024):
            sys.stderr.write(line)
        print("done")
        """)
    console = tmp_path / "console.txt"
    with open(console, "wb") as out:
        proc, where = _start_driver(tmp_path, base_dir, "loud", py_cmd(script), stdout=out,
                                    stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    e = exp.Experiment.load(where.read_text())
    log_size = os.path.getsize(e.log_path("run_0001"))
    assert log_size >= 10 * 1024 * 1024
    assert console.stat().st_size == log_size  # all of it was followed to the console
    assert e.read_metadata()["status"] == "finished"


# ============================================================================
# load_experiment
# ============================================================================

INSIDE = """
import json, sys, exp
e = exp.load_experiment()
json.dump({"work_dir": e.work_dir, "run": e.current_run_id, "name": e.name,
           "metrics": e.metrics_path}, open(sys.argv[1], "w"))
"""


@posix_only
def test_load_experiment_inside_a_run(make_exp, tmp_path):
    script = write_script(tmp_path, "inside.py", INSIDE)
    out = tmp_path / "inside.json"
    e = make_exp("inside", py_cmd(script, out))
    for n in (1, 2):
        assert e.run() == 0
        got = json.loads(out.read_text())
        assert got == {"work_dir": e.work_dir, "run": f"run_{n:04d}", "name": "inside",
                       "metrics": os.path.join(e.work_dir, "metrics", f"run_{n:04d}.csv")}


def test_load_experiment_takes_the_run_from_the_environment(make_exp, monkeypatch):
    e = make_exp("envrun")
    assert e.run() == 0
    meta = e.read_metadata()
    meta["current_run_id"] = "run_0099"  # a later run changed metadata meanwhile
    pathlib.Path(e.metadata_path).write_text(json.dumps(meta))
    monkeypatch.setenv("EXPERIMENT_WORK_DIR", e.work_dir)
    monkeypatch.setenv("EXPERIMENT_NAME", "envrun")
    monkeypatch.setenv("EXPERIMENT_RUN_ID", "run_0001")
    got = exp.load_experiment()
    assert (got.work_dir, got.current_run_id, got.name) == (e.work_dir, "run_0001", "envrun")
    assert got.metrics_path == os.path.join(e.work_dir, "metrics", "run_0001.csv")

    monkeypatch.setenv("EXPERIMENT_RUN_ID", "garbage")
    with pytest.raises(exp.NoExperimentContext, match=r"EXPERIMENT_RUN_ID='garbage' is not a run id"):
        exp.load_experiment()


def test_load_experiment_outside_exp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exp.NoExperimentContext) as info:
        exp.load_experiment()
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert "EXPERIMENT_WORK_DIR is not set" in msg
    assert "standalone=True" in msg and "EXP_STANDALONE=1" in msg and "Experiment(" in msg
    assert not (tmp_path / "results").exists()

    monkeypatch.setenv("EXPERIMENT_WORK_DIR", str(tmp_path / "moved"))
    with pytest.raises(exp.NoExperimentContext, match=r"has no metadata\.json"):
        exp.load_experiment()


STANDALONE = """
import sys, exp
mode = sys.argv[1]
e = exp.load_experiment(standalone=True) if mode == "arg" else exp.load_experiment()
for step in range(3):
    e.upd_row(step=step, loss=1.0 / (step + 1))
    e.save_row()
print(e.work_dir)
if mode == "raise":
    raise RuntimeError("boom in standalone script")
"""


@posix_only
def test_standalone_called_twice_is_one_experiment(tmp_path):
    """A notebook cell run again, or a helper module that calls it too: one directory, one run."""
    script = write_script(tmp_path, "twice.py", """
        import exp
        a = exp.load_experiment(standalone=True)
        a.upd_row(step=0)
        a.save_row()
        b = exp.load_experiment(standalone=True)
        b.upd_row(step=1)
        b.save_row()
        print(a is b, a.current_run_id, b.work_dir)
    """)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=child_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    same, rid, work = r.stdout.split()
    assert (same, rid) == ("True", "run_0001")
    assert [p.name for p in (tmp_path / "results").iterdir()] == [os.path.basename(work)]
    assert exp.read_metrics(os.path.join(work, "metrics", "run_0001.csv")) == [{"step": 0}, {"step": 1}]
    assert json.loads(pathlib.Path(work, "metadata.json").read_text())["status"] == "finished"


@posix_only
@pytest.mark.parametrize("mode", ["arg", "env", "raise"])
def test_standalone(tmp_path, mode):
    cwd = tmp_path / "sa"
    cwd.mkdir()
    script = write_script(tmp_path, "train_sa.py", STANDALONE)
    env = child_env(EXP_STANDALONE="1" if mode != "arg" else None)
    r = subprocess.run([sys.executable, str(script), mode], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=60)
    [work] = list((cwd / "results").iterdir())
    assert DIR_RE.match(work.name).group("name") == "train_sa"
    assert r.stdout.strip() == str(work)
    meta = json.loads((work / "metadata.json").read_text())
    [run] = meta["runs"]
    assert run["id"] == "run_0001" and meta["current_run_id"] == "run_0001"
    assert meta["name"] == "train_sa" and meta["cwd"] == str(cwd)
    assert exp.read_metrics(work / "metrics" / "run_0001.csv") == [
        {"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 1 / 3}]
    if mode == "raise":
        assert r.returncode == 1 and "boom in standalone script" in r.stderr
        assert (meta["status"], meta["exit_code"], run["status"]) == ("error", 1, "error")
    else:
        assert r.returncode == 0, r.stderr
        assert (meta["status"], meta["exit_code"], run["status"]) == ("finished", 0, "finished")
    iso(meta["ended_at"])
    assert "standalone run run_0001" in (work / "terminal_logs" / "run_0001.log").read_text()


# ============================================================================
# Imports and the command line
# ============================================================================


def _is_stdlib(name):
    if hasattr(sys, "stdlib_module_names"):  # 3.10+
        return name in sys.stdlib_module_names
    if name in sys.builtin_module_names or name == "__future__":
        return True
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    origin = os.path.realpath(spec.origin)
    roots = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    return "site-packages" not in origin and any(origin.startswith(r + os.sep) for r in roots)


def test_exp_imports_only_the_standard_library():
    tree = ast.parse(pathlib.Path(ROOT, "exp.py").read_text(encoding="utf-8"))
    found = []  # (module, inside a function?)

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((child.module.split(".")[0], in_function))
            visit(child, inner)

    visit(tree, False)
    modules = {m for m, _ in found}
    assert {"os", "sys", "re", "subprocess", "json"} <= modules  # the walk sees lazy imports too
    for module, in_function in found:
        if module in ("tomli", "tomllib"):
            # tomli (the Python < 3.11 backport) and tomllib (stdlib since 3.11) are
            # needed only to read a TOML file, so they must be imported lazily.
            assert in_function, f"{module} must be imported lazily, inside a function"
            if module == "tomllib" and sys.version_info >= (3, 11):
                assert _is_stdlib(module)
        else:
            assert _is_stdlib(module), f"exp.py imports non-stdlib module {module!r}"
    assert _is_stdlib("os") and not _is_stdlib("pytest")


def test_import_exp_stays_light():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import exp; "
            "print(exp.__file__); print('\\n'.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-S", "-c", code, ROOT], capture_output=True, text=True,
                       timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == os.path.join(ROOT, "exp.py")
    loaded = set(lines[1:])
    assert "exp" in loaded and "os" in loaded
    heavy = {"http.server", "urllib.request", "concurrent.futures", "subprocess", "json", "datetime", "getpass",
             "re", "enum"}  # re (and the enum it imports) costs ~5 ms: exp's patterns compile at first use
    assert heavy & loaded == set()


def test_patterns_compiled_at_first_use_work_and_become_plain_patterns():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import exp\n"
            "lazy = exp._INT_RE\n"
            "print(exp.parse_metric('12'), exp.parse_metric('007'), exp.parse_metric('-0.5e3'))\n"
            "print(type(exp._INT_RE).__name__, lazy.match('3') is not None, lazy.match('03') is None)\n"
            "print(exp._SECRET_KEY_RE.search('my_api_token') is not None)\n"  # an inline (?i) flag
            "import copy; copy.deepcopy(exp._LazyRe('x'))")
    r = subprocess.run([sys.executable, "-S", "-c", code, ROOT], capture_output=True, text=True,
                       timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["12 007 -500.0", "Pattern True True", "True"]


# POSIX TZ strings (no tz database needed): UTC, +05:30, -03:30, +12:45, -10:00, an offset with
# seconds (as local mean times have), and a zone with a daylight-saving rule.
@pytest.mark.parametrize("tz", ["UTC0", "IST-5:30", "NST+3:30", "CHAST-12:45", "HST+10", "LMT-0:19:32",
                                "EST5EDT,M3.2.0,M11.1.0"])
def test_now_iso_matches_datetime_in_any_time_zone(tz):
    # exp.now_iso builds the ISO 8601 time from the time module; datetime is the reference.
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import exp; from datetime import datetime\n"
            "for _ in range(5):\n"
            "    a = exp.now_iso(); b = datetime.now().astimezone().isoformat(timespec='seconds')\n"
            "    if a == b: break\n"  # a second may tick between the two
            "print(a); print(b)")
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60,
                       env=child_env(TZ=tz))
    assert r.returncode == 0, r.stderr
    ours, reference = r.stdout.split()
    assert ours == reference
    assert ours.endswith({"UTC0": "+00:00", "IST-5:30": "+05:30", "NST+3:30": "-03:30", "CHAST-12:45": "+12:45",
                          "HST+10": "-10:00", "LMT-0:19:32": "+00:19:32"}.get(tz, ("-05:00", "-04:00")))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d(:\d\d)?", ours)


def test_cli_version_and_help():
    v = subprocess.run([sys.executable, os.path.join(ROOT, "exp.py"), "--version"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert v.returncode == 0
    assert v.stdout.strip() == f"exp {exp.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", exp.__version__)
    h = subprocess.run([sys.executable, os.path.join(ROOT, "exp.py"), "--help"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert h.returncode == 0
    assert h.stdout.startswith("usage: exp")
    assert "--version" in h.stdout


def test_paths_the_api_gives_are_text_that_also_joins_like_the_earlier_projects_paths(make_exp, tmp_path):
    # The earlier project returned pathlib.Path: `torch.save(m, e.work_dir / "model.pt")` and
    # `e.get_metrics_file_path().parent` must keep working, and new scripts get plain text.
    script = tmp_path / "train.py"
    script.write_text(
        "import json, os, pathlib, exp\n"
        "e = exp.load_experiment()\n"
        "ckpt = e.work_dir / 'ckpt' / 'model.pt'\n"
        "assert isinstance(ckpt, pathlib.Path), type(ckpt)\n"
        "ckpt.parent.mkdir()\n"
        "ckpt.write_text('weights')\n"
        "assert isinstance(e.work_dir, str) and e.work_dir == os.environ['EXPERIMENT_WORK_DIR']\n"
        "assert e.get_metrics_file_path().parent.name == 'metrics'\n"
        "assert e.get_log_file_path().exists() and e.get_log_file_path().suffix == '.log'\n"
        "assert (e.work_dir + '/x').endswith('/x') and os.path.join(e.work_dir, 'x') == e.work_dir + '/x'\n"
        "assert json.loads(json.dumps({'d': e.work_dir}))['d'] == e.work_dir\n"
        "assert e.metadata_path.name == 'metadata.json' and e.work_dir.replace('/', '|').count('|') > 1\n"
        "print('paths ok')\n")
    e = make_exp(name="paths", command=f"{sys.executable} {script}")
    assert e.run() == 0, e.read_log()
    assert "paths ok" in e.read_log()
    assert (pathlib.Path(e.work_dir) / "ckpt" / "model.pt").read_text() == "weights"
    assert type(e.work_dir) is not pathlib.Path and e.work_dir / "ckpt" == pathlib.Path(e.work_dir, "ckpt")
    import pickle
    assert pickle.loads(pickle.dumps(e.work_dir)) == e.work_dir
