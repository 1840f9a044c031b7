"""Edge cases found in review: broken pipes, SIGTERM, the earlier project's directories, odd input."""
import io
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import EXP_PY, child_env, pid_gone, read_meta, wait_for, write_script

import exp


# ---------------------------------------------------------------- the batch's children see their metadata


def test_every_batch_child_finds_its_metadata_at_once(tmp_path):
    # The child looks for metadata.json the moment it starts; it must already be there.
    write_script(tmp_path, "probe.py", """
        import os, sys
        sys.exit(0 if os.path.isfile(os.path.join(os.environ["EXPERIMENT_WORK_DIR"], "metadata.json")) else 7)
    """)
    (tmp_path / "c.toml").write_text(
        "[scheduler]\nmax_concurrent_experiments = 4\n"
        f'[[experiments]]\nname = "p"\ncommand = "exec {sys.executable} -S probe.py"\nrepeats = 40\n')
    r = subprocess.run([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "succeeded first time:    40" in r.stdout


# ---------------------------------------------------------------- a reader that goes away


def test_foreground_run_survives_a_closed_stdout(tmp_path):
    work = tmp_path / "work.txt"
    driver = write_script(tmp_path, "driver.py", f"""
        import exp, sys
        e = exp.Experiment("pipe", "for i in $(seq 1 200); do echo line $i; sleep 0.005; done", base_dir={str(tmp_path / 'res')!r})
        open({str(work)!r}, "w").write(e.work_dir)
        code = e.run()
        sys.stderr.write(f"code={{code}}\\n")
    """)
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env())
    p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert b"code=0" in err
    meta = read_meta(work.read_text())
    assert meta["status"] == "finished" and meta["exit_code"] == 0
    log = open(os.path.join(work.read_text(), "terminal_logs", "run_0001.log")).read()
    assert "line 200" in log  # the whole output still reached the log


def test_batch_survives_a_closed_stdout(tmp_path):
    (tmp_path / "c.toml").write_text(
        "[scheduler]\nmax_concurrent_experiments = 2\n"
        '[[experiments]]\nname = "s"\ncommand = "sleep 0.3"\nrepeats = 4\n')
    p = subprocess.Popen([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=child_env())
    p.stdout.readline()
    p.stdout.close()
    p.wait(timeout=60)
    assert p.returncode == 0, p.stderr.read()
    state = json.loads((tmp_path / "results" / ".exp_state" / "scheduler_state.json").read_text())
    assert state["summary"]["status_indicator"] == "stopped"
    assert state["summary"]["finished"] == 4 and state["running"] == [] and state["pending"] == []


def test_foreground_echo_without_a_byte_stream_keeps_characters_whole(make_exp, monkeypatch):
    # Jupyter's sys.stdout has no .buffer; chunks must not split a character in two.
    e = make_exp("nobuf", f"{sys.executable} -c \"print('\u2588' * 100000)\"")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert e.run() == 0
    text = out.getvalue()
    assert "\ufffd" not in text
    assert "\u2588" * 100000 in text


# ---------------------------------------------------------------- SIGTERM to a foreground run


def test_sigterm_stops_a_foreground_run_like_ctrl_c(tmp_path):
    work, pids = tmp_path / "work.txt", tmp_path / "pids"
    child = write_script(tmp_path, "child.py", f"""
        import os, subprocess, time
        g = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{g.pid}}")
        time.sleep(60)
    """)
    driver = write_script(tmp_path, "driver.py", f"""
        import exp, sys
        e = exp.Experiment("term", sys.executable + " " + {str(child)!r}, base_dir={str(tmp_path / 'res')!r})
        open({str(work)!r}, "w").write(e.work_dir)
        e.run(grace=1)
    """)
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=child_env())
    wait_for(lambda: pids.exists() and pids.read_text().strip(), what="the child's pids")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and b"KeyboardInterrupt" in err
    meta = read_meta(work.read_text())
    assert meta["status"] == "killed" and meta["runs"][0]["status"] == "killed"
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda: pid_gone(pid), timeout=10, what=f"pid {pid} to end")


# ---------------------------------------------------------------- directories of the earlier project


OLD_META = {
    "name": "old", "command": "echo old", "tags": ["legacy"], "timestamp": "2024-01-02T03:04:05+08:00",
    "status": "finished", "pid": None, "gpu_ids": [], "current_run_id": "run_0001", "cwd": None,
    "description": "from the earlier project",
    "lark_config": {"app_id": "cli_x", "app_secret": "SUPERSECRET", "app_token": "bascnTOKEN"},
}


@pytest.fixture
def old_dir(tmp_path):
    d = tmp_path / "res" / "old_2024-01-02__03-04-05"
    (d / "terminal_logs").mkdir(parents=True)
    (d / "metrics").mkdir()
    (d / "terminal_logs" / "run_0001.log").write_text("old log\n")
    (d / "metrics" / "run_0001.csv").write_text("epoch,loss\n1,0.5\n")
    (d / "metadata.json").write_text(json.dumps(OLD_META))
    return d


def test_resume_of_an_old_directory_drops_secrets_and_fills_new_fields(old_dir):
    e = exp.Experiment("old", "echo again", base_dir=old_dir.parent, resume="2024-01-02__03-04-05")
    assert e.work_dir == str(old_dir) and e.tags == ["legacy"] and e.description == "from the earlier project"
    assert e.cwd == str(old_dir)  # the earlier project's default when cwd was unset
    text = (old_dir / "metadata.json").read_text()
    assert "SUPERSECRET" not in text and "lark_config" not in text
    assert e.run() == 0
    meta = read_meta(old_dir)
    assert "SUPERSECRET" not in json.dumps(meta)
    assert meta["current_run_id"] == "run_0002" and meta["status"] == "finished"
    assert meta["created_at"] == "2024-01-02T03:04:05+08:00"
    for key in ("hostname", "user", "python_version", "exp_version", "timestamp_dir"):
        assert meta.get(key), key
    assert e.metrics("run_0001") == [{"epoch": 1, "loss": 0.5}]


def test_load_of_an_old_directory_then_run_drops_secrets(old_dir):
    e = exp.Experiment.load(old_dir)
    assert e.current_run_id == "run_0001" and e.gpu_ids == []
    assert e.run() == 0
    assert "SUPERSECRET" not in (old_dir / "metadata.json").read_text()


def test_resume_keeps_the_environment_but_not_redacted_secrets(make_exp, tmp_path):
    out = tmp_path / "env.json"
    cmd = f"{sys.executable} -c \"import os,json; json.dump({{k: os.environ.get(k) for k in ('LR','API_TOKEN')}}, open({str(out)!r},'w'))\""
    e = make_exp("envkeep", cmd, env={"LR": "0.1", "API_TOKEN": "s3cret"})
    assert e.run() == 0
    assert json.loads(out.read_text()) == {"LR": "0.1", "API_TOKEN": "s3cret"}
    again = exp.Experiment("envkeep", cmd, base_dir=e.base_dir, resume=e.timestamp)
    assert again.run() == 0
    assert json.loads(out.read_text()) == {"LR": "0.1", "API_TOKEN": None}


# ---------------------------------------------------------------- odd input


@pytest.mark.parametrize("name", ["OPENAI_KEY", "SSH_KEY", "AWS_ACCESS_KEY_ID", "DB_PASS", "MYSQL_PWD",
                                  "GITHUB_PAT", "WANDB_API_KEY", "HF_TOKEN", "SESSION_COOKIE"])
def test_secret_looking_names_are_redacted(name):
    assert exp.redact_env({name: "v", "LR": "0.1"}) == {name: "***", "LR": "0.1"}


def test_reader_skips_a_torn_line_that_ends_inside_a_character(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes("step,note\n1,h\u00e9llo\n2,h".encode() + b"\xc3")
    assert exp.read_metrics(p) == [{"step": 1, "note": "h\u00e9llo"}]


def test_nul_in_an_environment_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"env\['V'\]: a value cannot contain a NUL character"):
        exp.Experiment("nul", "true", base_dir=tmp_path, env={"V": "a\0b"})
    assert not (tmp_path / "nul").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "c.toml").write_text('[[experiments]]\nname = "n"\ncommand = "true"\n'
                                     'environment = { V = "a\\u0000b", "" = "x" }\n')
    r = subprocess.run([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 2
    assert "experiments[0].environment.V: expected a string, number or boolean value (no NUL)" in r.stderr
    assert "experiments[0].environment: '' is not a valid environment variable name" in r.stderr
    assert not (tmp_path / "results").exists()


def test_nul_in_a_command_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"command cannot contain a NUL character"):
        exp.Experiment("nul", "echo a\0b", base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c.toml").write_text('[[experiments]]\nname = "n"\ncommand = "echo a\\u0000b"\n')
    r = subprocess.run([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 2
    assert "experiments[0].command: command cannot contain a NUL character, got 'echo a\\x00b'" in r.stderr
    assert not (tmp_path / "results").exists()


def test_relative_resume_path_in_a_config_resolves_against_the_config(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    first = exp.Experiment("a", "true", base_dir=proj / "results")
    rel = os.path.relpath(first.work_dir, proj)
    (proj / "c.toml").write_text(f'[[experiments]]\nname = "a"\ncommand = "true"\nresume = "./{rel}"\n')
    r = subprocess.run([sys.executable, EXP_PY, "run", "proj/c.toml"], cwd=tmp_path, capture_output=True,
                       text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert read_meta(first.work_dir)["current_run_id"] == "run_0001"
    assert read_meta(first.work_dir)["status"] == "finished"


def test_ls_survives_odd_metadata(tmp_path):
    good = exp.Experiment("good", "true", base_dir=tmp_path, tags=["baseline"])
    odd = tmp_path / "odd_dir"
    odd.mkdir()
    (odd / "metadata.json").write_text(json.dumps(
        {"name": 5, "duration": "12", "tags": "baseline", "started_at": 1700000000, "current_run_id": "../x"}))
    r = subprocess.run([sys.executable, EXP_PY, "ls", str(tmp_path), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"good", "odd_dir"}
    assert rows["odd_dir"]["tags"] == [] and rows["odd_dir"]["duration"] is None
    r = subprocess.run([sys.executable, EXP_PY, "ls", str(tmp_path), "--tag", "base", "--name", "o"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no experiments")  # "base" is not the tag "baseline"
    assert good.work_dir  # the good one was listed above


@pytest.mark.parametrize("body, status, code", [
    ("import sys; sys.exit(3)", "error", 3),
    ("import sys; sys.exit(0)", "finished", 0),
    ("raise KeyboardInterrupt", "killed", 130),
    ("raise RuntimeError('boom')", "error", 1),
])
def test_standalone_records_how_the_script_ended(run_py, tmp_path, body, status, code):
    r = run_py(f"import exp\ne = exp.load_experiment(standalone=True)\nprint(e.work_dir)\n{body}\n", cwd=tmp_path)
    work = r.stdout.strip().splitlines()[0]
    meta = read_meta(work)
    assert (meta["status"], meta["exit_code"]) == (status, code), r.stderr


# ---------------------------------------------------------------- odd standard streams and locales


def _batch(tmp_path, names=("ok", "f", "ok2")):
    # "f" fails with a line of Chinese in its output; the others succeed.
    body = ["[scheduler]", "max_concurrent_experiments = 1"]
    for n in names:
        cmd = "printf '\\\\344\\\\270\\\\255 boom\\\\n'; exit 3" if n == "f" else "true"
        body += ["[[experiments]]", f'name = "{n}"', f'command = "{cmd}"']
    (tmp_path / "c.toml").write_text("\n".join(body) + "\n", encoding="utf-8")
    return tmp_path / "results"


def _sh(command, cwd, **env):
    """``command`` through sh (where ``>&-`` closes stdout as a user's shell does)."""
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                          env=child_env(**env), timeout=120, encoding="utf-8", errors="replace")


def test_every_command_works_with_stdout_closed(tmp_path):
    # `exp run ... >&-` (a daemon, a cron line) died at its first event line, leaving the
    # state file with finished experiments "pending"; ls/status/--dry-run gave tracebacks.
    base = _batch(tmp_path)
    q = f'"{sys.executable}" "{EXP_PY}"'
    r = _sh(f"{q} run c.toml >&-", tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # 1: "f" failed
    state = json.loads((base / ".exp_state" / "scheduler_state.json").read_text())
    assert state["pending"] == [] and state["running"] == [], state
    assert sorted(i["name"] for g in ("finished", "errors") for i in state[g]) == ["f", "ok", "ok2"]
    for cmd in ("ls results", "ls results --json", "status results", "run c.toml --dry-run"):
        r = _sh(f"{q} {cmd} >&-", tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr)
    # The library's foreground run returns the exit code instead of raising.
    script = write_script(tmp_path, "lib.py", f"""
        import sys, exp
        e = exp.Experiment(name="lib", command="echo hi; exit 4", base_dir={str(tmp_path / 'lib')!r})
        sys.stderr.write(f"code={{e.run()}}\\n")
    """)
    r = _sh(f'"{sys.executable}" "{script}" >&-', tmp_path, PYTHONPATH=os.path.dirname(EXP_PY))
    assert r.returncode == 0 and "code=4" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_text_the_output_encoding_cannot_hold_is_escaped_and_the_output_goes_on(tmp_path):
    # One character that stdout's encoding cannot hold silenced the rest of the batch's
    # output (the summary too), and `exp status` died with a traceback.
    base = _batch(tmp_path, ("ok", "f", "实验"))
    r = subprocess.run([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, capture_output=True,
                       env=child_env(PYTHONIOENCODING="ascii", NO_COLOR="1"), timeout=120)
    out, err = r.stdout.decode("ascii"), r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1 and "Traceback" not in err, err
    assert "\\u4e2d boom" in out  # the failure's log tail, escaped
    assert "finished \\u5b9e\\u9a8c" in out and "summary: 3 experiment(s)" in out, out
    r = subprocess.run([sys.executable, EXP_PY, "status", str(base)], capture_output=True,
                       env=child_env(PYTHONIOENCODING="ascii"), timeout=60)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"\\u5b9e\\u9a8c" in r.stdout and b"finished" in r.stdout


@pytest.mark.parametrize("table, what", [
    ('[[experiments]]\nname = "实验"\ncommand = "true"\n', "name"),
    ('[scheduler]\nbase_experiment_dir = "./结果"\n[[experiments]]\nname = "a"\ncommand = "true"\n', "base_dir"),
    ('[[experiments]]\nname = "c"\ncommand = "echo 错误"\n', "command"),
], ids=["name", "base_dir", "command"])
def test_non_ascii_where_file_names_are_ascii_is_a_config_error(tmp_path, table, what):
    # LC_ALL=C with UTF-8 mode off: Python's file-name encoding is ASCII, so such a name or
    # path cannot be made, nor such a command passed to sh.  It was a traceback (exit 1)
    # or a launch failure midway; it is a config error before anything starts.
    env = dict(LC_ALL="C", LANG=None, LC_CTYPE=None, PYTHONUTF8="0", PYTHONIOENCODING="utf-8")
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"],
                           capture_output=True, text=True, env=child_env(**env))
    assert probe.stdout.strip() == "ascii", probe  # the premise: this locale gives ASCII file names
    (tmp_path / "c.toml").write_text(table, encoding="utf-8")
    r = subprocess.run([sys.executable, EXP_PY, "run", "c.toml"], cwd=tmp_path, capture_output=True,
                       env=child_env(**env), timeout=60, text=True, encoding="utf-8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{what} " in r.stderr and "cannot be passed to the system" in r.stderr and "UTF-8" in r.stderr
    assert r.stderr.count("cannot be passed") == 1, r.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "结果").exists()


STANDALONE_LOOP = """
import os, signal, sys, time
import exp
if sys.argv[1] == "own-handler":
    signal.signal(signal.SIGTERM, lambda *a: (print("own handler", flush=True), sys.exit(0)))
e = exp.load_experiment(standalone=True)
print(e.work_dir, flush=True)
if sys.argv[1] == "fork":
    # A forked worker (a DataLoader's) still dies of SIGTERM; its parent's record stays its own.
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print("worker", os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, flush=True)
    sys.exit(0)
try:
    for step in range(600):
        e.upd_row(step=step)
        e.save_row()
        if step == 0:
            print("saving", flush=True)
        time.sleep(0.05)
finally:
    print("finally ran", flush=True)
"""


@pytest.mark.parametrize("mode", ["default", "own-handler", "fork"])
def test_a_standalone_script_ended_by_sigterm_is_recorded_killed(tmp_path, mode):
    # timeout(1), Slurm and preemption send SIGTERM: the run stayed "running" for ever.
    script = write_script(tmp_path, "loop.py", STANDALONE_LOOP)
    p = subprocess.Popen([sys.executable, str(script), mode], cwd=tmp_path, env=child_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        work = p.stdout.readline().strip()
        if mode != "fork":
            assert p.stdout.readline().strip() == "saving"
            p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    meta = read_meta(work)
    if mode == "default":
        assert p.returncode == 143 and "finally ran" in out, (p.returncode, out, err)
        assert (meta["status"], meta["exit_code"]) == ("killed", 143), meta
        assert exp.read_metrics(os.path.join(work, "metrics", "run_0001.csv"))  # its rows are kept
    elif mode == "own-handler":  # the script's own handler is left alone
        assert p.returncode == 0 and "own handler" in out, (out, err)
        assert meta["status"] == "finished", meta
    else:
        assert p.returncode == 0 and "worker True" in out, (out, err)
        assert meta["status"] == "finished", meta


def test_an_experiment_made_from_a_deleted_directory_is_a_clear_error(run_py, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    r = run_py(f"""
        import os, exp
        os.chdir({str(gone)!r})
        os.rmdir({str(gone)!r})
        try:
            exp.Experiment(name="a", command="true")
        except exp.ConfigError as e:
            print("ConfigError:", e)
        e = exp.Experiment(name="b", command="true", base_dir={str(tmp_path / 'abs')!r}, cwd={str(tmp_path)!r})
        print("code", e.run())
    """)
    assert r.returncode == 0, r.stderr
    assert "ConfigError: the current directory no longer exists" in r.stdout
    assert "code 0" in r.stdout  # with absolute paths it needs no current directory
