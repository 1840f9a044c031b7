"""The Slurm backend, on a real single-node Slurm (``.ci/slurm start`` sets one up).

These tests skip, saying why, only when no Slurm answers here.  CI starts one
before the tests, so there they run.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

import exp
from conftest import EXP_PY, ROOT, child_env, exp_dirs, py_cmd, run_exp, stop_process, try_state, wait_for, \
    write_batch, write_script


def _slurm_up() -> str | None:
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return "no Slurm client (sbatch) on PATH; start one with .ci/slurm start"
    try:
        r = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol failed: {e}"
    if r.returncode != 0 or "State=" not in r.stdout:
        return f"no Slurm controller answers ({(r.stderr or r.stdout).strip()[:200]}); start one with .ci/slurm start"
    return None


WHY = _slurm_up()
ONCE = os.environ.get("EXP_SLURM_TESTS_ONCE") == "1"
needs_slurm = pytest.mark.skipif(WHY is not None or ONCE,
                                 reason=WHY or "Slurm tests run once in CI, with the newest Python")

@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(tmp_path):
    """A test that fails midway must not leave its jobs holding the test cluster's CPUs."""
    yield
    if WHY is None:
        r = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, timeout=30)
        mine = [line.split("|")[0] for line in r.stdout.splitlines() if str(tmp_path) in line]
        if mine:
            subprocess.run(["scancel", *mine], timeout=30)


METRICS = """
import exp, os
e = exp.load_experiment()
for i in range(3):
    e.upd_row(step=i, loss=1.0 / (i + 1))
    e.save_row()
print("job", os.environ.get("SLURM_JOB_ID"), "run", os.environ["EXPERIMENT_RUN_ID"], "gpus", os.environ.get("CUDA_VISIBLE_DEVICES"))
"""


def meta(d) -> dict:
    return json.loads((pathlib.Path(d) / "metadata.json").read_text())


def batch(tmp_path, experiments, **scheduler):
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "b.toml", base, experiments, backend="slurm", **scheduler)
    return base, cfg


def squeue_comments() -> list[str]:
    r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k"], capture_output=True, text=True, timeout=30)
    return r.stdout.split()


def job_state(job_id: str) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return r.stdout.split("JobState=")[1].split()[0]


# ============================================================================
# Without a Slurm: the config and the batch script
# ============================================================================


def test_slurm_options_are_checked(tmp_path):
    text = """
[scheduler]
backend = "slrum"
[scheduler.slurm]
partitoin = "gpu"
cpus_per_task = 0
extra = "--exclusive"
[[experiments]]
name = "a"
command = "true"
[experiments.slurm]
mem = "4 G"
"""
    with pytest.raises(exp.ConfigError) as info:
        exp.parse_config(text, "c.toml", str(tmp_path))
    msg = str(info.value)
    assert "scheduler.backend: expected \"local\" or \"slurm\", got 'slrum'" in msg
    assert "scheduler.slurm: unknown key 'partitoin' (did you mean 'partition'?)" in msg
    assert "scheduler.slurm.cpus_per_task: expected an integer >= 1" in msg
    assert "scheduler.slurm.extra: expected a list of sbatch options" in msg
    assert "experiments[0].slurm.mem: expected a value without spaces" in msg
    text = '[scheduler]\nbackend = "slurm"\n[[experiments]]\nname = "a"\ncommand = "true"\ngpu_ids = [0]\n'
    with pytest.raises(exp.ConfigError, match="gpu_ids names GPUs of this machine"):
        exp.parse_config(text, "c.toml", str(tmp_path))
    ok = exp.parse_config('[scheduler]\nbackend = "slurm"\n[scheduler.slurm]\npartition = "gpu"\n'
                          '[[experiments]]\nname = "a"\ncommand = "true"\ngpus = 8\n[experiments.slurm]\n'
                          'qos = "high"\nextra = ["--exclusive"]\n', "c.toml", str(tmp_path))
    assert ok.scheduler.slurm == {"partition": "gpu"}
    assert ok.experiments[0].slurm == {"qos": "high", "extra": ["--exclusive"]}


def test_the_batch_script_says_everything_sbatch_needs(tmp_path):
    launch = exp.Launch("python train.py --lr 0.1 'a b'", "/work dir", {}, "/r/x/terminal_logs/run_0002.log", "x",
                        script_path=str(tmp_path / "s.sbatch"), tag="/r/x:run_0002")
    text = exp.slurm_script(launch, {"partition": "gpu", "account": "lab", "qos": "high", "mem": "16G",
                                     "cpus_per_task": 4, "constraint": "a100", "extra": ["--exclusive"]},
                            gpus=2, timeout=5400)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    for want in ("#SBATCH --job-name=x", "#SBATCH --comment=exp:/r/x:run_0002",
                 "#SBATCH --output=/r/x/terminal_logs/run_0002.log", "#SBATCH --open-mode=append",
                 "#SBATCH --gres=gpu:2", "#SBATCH --time=0-01:30:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --mem=16G", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --constraint=a100", "#SBATCH --exclusive"):
        assert want in lines, want
    assert "sh -c 'python train.py --lr 0.1 '\"'\"'a b'\"'\"'' </dev/null" in lines
    assert 'echo "[exp] exit status $code"' in lines
    # A path with a space is quoted (sbatch refuses the whole script over one bad directive).
    assert '#SBATCH --chdir="/work dir"' in lines
    # A command killed by a signal ends the job by that signal (after its exit status line).
    assert any(ln.startswith('if [ "$code" -gt 128 ]') and "kill -$((code - 128)) $$" in ln for ln in lines)
    # An explicit time wins over the timeout; a line break cannot add an #SBATCH line.
    launch.name = "evil\n#SBATCH --uid=0"
    text = exp.slurm_script(launch, {"time": "2:00:00"}, timeout=60)
    assert "#SBATCH --time=2:00:00" in text and "--time=0-00:01:00" not in text
    assert "\n#SBATCH --uid=0" not in text


def test_no_sbatch_is_a_clear_error_for_each_experiment_and_the_rest_go_on(tmp_path):
    bindir = tmp_path / "bin"  # a PATH with a shell but no Slurm client
    bindir.mkdir()
    for tool in ("sh", "true", "echo", "cat"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bindir / tool)
    base, cfg = batch(tmp_path, [{"name": "a", "command": "true"}, {"name": "b", "command": "true"}])
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(PATH=str(bindir)))
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.count("sbatch not found: this machine has no Slurm client") >= 2
    for name in ("a", "b"):
        m = meta(exp_dirs(base, name)[0])
        assert m["status"] == "error" and "sbatch not found" in m["runs"][0]["reason"]


# ============================================================================
# On a real Slurm
# ============================================================================


@needs_slurm
def test_a_batch_runs_through_slurm_with_metrics_logs_and_gpus(tmp_path):
    script = write_script(tmp_path, "train.py", METRICS)
    base, cfg = batch(tmp_path, [
        {"name": "ok", "command": py_cmd(script), "environment": {"PYTHONPATH": ROOT}, "timeout": "30m"},
        {"name": "gpu", "command": py_cmd(script), "environment": {"PYTHONPATH": ROOT}, "gpus": 1},
        {"name": "fails", "command": "echo about to fail; exit 3"},
    ], max_concurrent_experiments=2, slurm={"partition": "debug"})
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # one failed
    ok, gpu, fails = (exp_dirs(base, n)[0] for n in ("ok", "gpu", "fails"))
    m = meta(ok)
    job = m["runs"][0]["backend"]
    assert m["status"] == "finished" and job["backend"] == "slurm" and job["state"] == "COMPLETED"
    assert m["job_id"] == job["job_id"] and job["node"] == "localhost"
    log = (ok / "terminal_logs" / "run_0001.log").read_text()
    assert f"job {job['job_id']} run run_0001 gpus None" in log and "[exp] exit status 0" in log
    assert [row["step"] for row in exp.read_metrics(ok / "metrics" / "run_0001.csv")] == [0, 1, 2]
    script_text = (ok / "slurm" / "run_0001.sbatch").read_text()
    assert "#SBATCH --partition=debug" in script_text and "#SBATCH --time=0-00:30:00" in script_text
    # gpus = 1: Slurm gave the job a GPU (the test cluster's fake ones) and said which.
    assert "gpus 0" in (gpu / "terminal_logs" / "run_0001.log").read_text() or \
        "gpus 1" in (gpu / "terminal_logs" / "run_0001.log").read_text()
    assert "#SBATCH --gres=gpu:1" in (gpu / "slurm" / "run_0001.sbatch").read_text()
    mf = meta(fails)
    assert mf["status"] == "error" and mf["exit_code"] == 3 and mf["runs"][0]["reason"] == "exit code 3"
    assert mf["runs"][0]["backend"]["state"] == "FAILED"
    assert "about to fail" in (fails / "terminal_logs" / "run_0001.log").read_text()
    assert "failed   fails (exit code 3)" in r.stdout
    # The state file, ls and the dashboard show them like any other.
    state = json.loads((base / ".exp_state" / "scheduler_state.json").read_text())
    done = {t["name"]: t for t in state["finished"] + state["errors"]}
    assert done["ok"]["job"]["job_id"] == job["job_id"] and done["ok"]["job"]["state"] == "COMPLETED"
    status = run_exp("status", base, cwd=tmp_path).stdout
    assert f"{job['job_id']} on localhost (COMPLETED)" in status, status
    listing = json.loads(run_exp("ls", base, "--json", cwd=tmp_path).stdout)
    assert sorted((x["name"], x["status"]) for x in listing) == [("fails", "error"), ("gpu", "finished"),
                                                                  ("ok", "finished")]
    dash = exp.Dashboard(str(base))
    items = json.loads(dash.get_json("/api/experiments", {}))["items"]
    assert sorted((x["name"], x["status"]) for x in items) == [("fails", "error"), ("gpu", "finished"),
                                                                ("ok", "finished")]
    detail = json.loads(dash.get_json("/api/experiment", {"id": [ok.name]}))
    assert job["job_id"] in json.dumps(detail)
    metrics = json.loads(dash.get_json("/api/metrics", {"id": [ok.name], "run": ["run_0001"]}))
    assert "step" in json.dumps(metrics)


@needs_slurm
def test_a_failed_job_is_resubmitted_as_a_retry(tmp_path):
    flag = tmp_path / "second"
    base, cfg = batch(tmp_path, [{"name": "flaky", "max_retries": 1,
                                  "command": f"if [ -e {flag} ]; then echo ok; else touch {flag}; exit 2; fi"}],
                      auto_restart_on_error=True)
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = meta(exp_dirs(base, "flaky")[0])
    assert [x["status"] for x in m["runs"]] == ["error", "finished"]
    ids = [x["backend"]["job_id"] for x in m["runs"]]
    assert len(set(ids)) == 2 and (exp_dirs(base, "flaky")[0] / "slurm" / "run_0002.sbatch").exists()


@needs_slurm
def test_a_bad_partition_is_an_error_for_that_experiment_only(tmp_path):
    base, cfg = batch(tmp_path, [{"name": "lost", "command": "true", "slurm": {"partition": "nosuchpartition"}},
                                 {"name": "fine", "command": "true"},
                                 {"name": "greedy", "command": "true", "gpus": 64}])
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    lost, greedy = meta(exp_dirs(base, "lost")[0]), meta(exp_dirs(base, "greedy")[0])
    assert lost["status"] == "error" and "Slurm refused the job" in lost["runs"][0]["reason"]
    assert "invalid partition" in lost["runs"][0]["reason"].lower()
    assert greedy["status"] == "error" and "Slurm refused the job" in greedy["runs"][0]["reason"]
    assert meta(exp_dirs(base, "fine")[0])["status"] == "finished"


def start_scheduler(cfg, tmp_path):
    return subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], cwd=tmp_path, env=child_env(),
                            stdout=open(tmp_path / "sched.out", "ab"), stderr=subprocess.STDOUT)


def running_job(base, name):
    def find():
        dirs = exp_dirs(base, name)
        if not dirs:
            return None
        try:
            m = meta(dirs[0])
        except (OSError, ValueError):  # not written yet
            return None
        runs = m.get("runs") or []
        rec = runs[-1].get("backend") if runs else None
        if rec and job_state(rec["job_id"]) == "RUNNING":
            return rec["job_id"]
        return None

    return wait_for(find, 60, interval=0.2, what=f"{name}'s job to run")


@needs_slurm
def test_kill_timeout_and_what_slurm_itself_ends(tmp_path):
    base, cfg = batch(tmp_path, [{"name": "victim", "command": "sleep 120"},
                                 {"name": "slow", "command": "sleep 120", "timeout": "3s"},
                                 {"name": "outside", "command": "sleep 120"},
                                 {"name": "limited", "command": "sleep 300", "slurm": {"time": "0:05"}}],
                      max_concurrent_experiments=4)
    proc = start_scheduler(cfg, tmp_path)
    try:
        victim = running_job(base, "victim")
        r = run_exp("kill", "victim", "--dir", base, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outside = running_job(base, "outside")
        subprocess.run(["scancel", outside], check=True, timeout=30)  # someone else's scancel
        # Slurm's own time limit: it ends the job (a minute or so: Slurm's granularity).
        assert proc.wait(timeout=240) == 1
    finally:
        stop_process(proc)
    assert job_state(victim) == "CANCELLED"
    mv = meta(exp_dirs(base, "victim")[0])
    assert mv["status"] == "killed" and mv["runs"][0]["reason"] == "terminated by user"
    ms = meta(exp_dirs(base, "slow")[0])
    assert ms["status"] == "error" and ms["runs"][0]["reason"] == "timeout"
    assert job_state(ms["runs"][0]["backend"]["job_id"]) == "CANCELLED"
    assert ms["runs"][0]["duration"] < 60
    mo = meta(exp_dirs(base, "outside")[0])
    assert mo["status"] == "killed" and mo["runs"][0]["reason"] == "cancelled in Slurm"
    ml = meta(exp_dirs(base, "limited")[0])
    assert ml["status"] == "error" and ml["runs"][0]["reason"] == "timeout (Slurm time limit)", ml["runs"]
    assert ml["runs"][0]["backend"]["state"] == "TIMEOUT"


@needs_slurm
@pytest.mark.parametrize("lost_record", ["", "metadata", "state"],
                         ids=["job-id-written", "crash-before-the-metadata-write", "crash-before-the-state-write"])
def test_a_killed_scheduler_restarts_and_adopts_its_jobs_without_submitting_twice(tmp_path, lost_record):
    gate = tmp_path / "go"
    base, cfg = batch(tmp_path, [{"name": "long", "command": f"while [ ! -e {gate} ]; do sleep 0.2; done; echo done"},
                                 {"name": "after", "command": "echo second"}])
    proc = start_scheduler(cfg, tmp_path)
    try:
        job = running_job(base, "long")
        # The state file lags by its write interval: kill once it shows the job running.
        wait_for(lambda: (st := try_state(base)) and any(t["name"] == "long" for t in st["running"]), 30,
                 what="the state file to show long running")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    work = exp_dirs(base, "long")[0]
    if lost_record:  # as if the scheduler died between sbatch and writing the job id down
        m = meta(work)
        del m["runs"][0]["backend"]
        m.pop("job_id", None)
        (work / "metadata.json").write_text(json.dumps(m))
    if lost_record == "state":  # ... and before its state file said the experiment had started
        path = base / ".exp_state" / "scheduler_state.json"
        state = json.loads(path.read_text())
        item = next(t for t in state["running"] if t["name"] == "long")
        state["running"].remove(item)
        item.update(status="pending", work_dir=None, run_id=None, started_at=None, pid=None, job=None)
        state["pending"].insert(0, item)
        path.write_text(json.dumps(state))
    proc = start_scheduler(cfg, tmp_path)
    try:
        wait_for(lambda: "adopted  long (job " + job in (tmp_path / "sched.out").read_text(), 30,
                 what="the restarted scheduler to adopt the job")
        gate.touch()
        assert proc.wait(timeout=90) == 0, (tmp_path / "sched.out").read_text()
    finally:
        stop_process(proc)
    m = meta(work)
    assert m["status"] == "finished" and len(m["runs"]) == 1 and m["runs"][0]["backend"]["job_id"] == job
    assert squeue_comments().count(f"exp:{work}:run_0001") == 1  # submitted once
    assert meta(exp_dirs(base, "after")[0])["status"] == "finished"


@needs_slurm
def test_ctrl_c_cancels_every_submitted_job(tmp_path):
    base, cfg = batch(tmp_path, [{"name": f"s{i}", "command": "sleep 120"} for i in range(3)],
                      max_concurrent_experiments=3)
    proc = start_scheduler(cfg, tmp_path)
    try:
        jobs = [running_job(base, "s0"), running_job(base, "s1")]  # two CPUs: the third waits in the queue
        wait_for(lambda: exp_dirs(base, "s2") and "job_id" in meta(exp_dirs(base, "s2")[0]), 30,
                 what="the third job to be submitted")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 130
    finally:
        stop_process(proc)
    for i in range(3):
        m = meta(exp_dirs(base, f"s{i}")[0])
        assert m["status"] == "killed", m
        assert job_state(m["runs"][0]["backend"]["job_id"]) == "CANCELLED"
    assert all(job_state(j) == "CANCELLED" for j in jobs)


@needs_slurm
def test_a_timeout_counts_the_run_not_the_wait_in_the_queue(tmp_path):
    # Two blockers hold both CPUs of the test cluster for about 6 s; the third job waits in
    # Slurm's queue longer than its timeout, then runs 1 s: it must finish, not time out.
    base, cfg = batch(tmp_path, [{"name": "block", "command": "sleep 6", "repeats": 2},
                                 {"name": "patient", "command": "sleep 1", "timeout": "4s"}],
                      max_concurrent_experiments=3)
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = meta(exp_dirs(base, "patient")[0])
    assert m["status"] == "finished"


@needs_slurm
def test_names_and_directories_with_spaces_and_a_command_killed_by_a_signal(tmp_path):
    base = tmp_path / "My Results"
    cfg = write_batch(tmp_path / "b.toml", base, [
        {"name": "lr 0.1", "command": "echo spaced"},
        {"name": "sigkilled", "command": "kill -9 $$"},
    ], backend="slurm", max_concurrent_experiments=2)
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # sigkilled failed
    assert "Invalid directive" not in r.stdout + r.stderr
    m = meta(exp_dirs(base, "lr 0.1")[0])
    assert m["status"] == "finished", m
    assert "spaced" in (exp_dirs(base, "lr 0.1")[0] / "terminal_logs" / "run_0001.log").read_text()
    k = meta(exp_dirs(base, "sigkilled")[0])
    assert k["status"] == "error" and k["exit_code"] == -9, k
    assert k["runs"][0]["reason"].startswith("signal SIGKILL"), k["runs"][0]


def _adopt_a_job_slurm_forgot(tmp_path, command, strip_status=False):
    """A scheduler killed while its job ran; the job ended, and Slurm forgot it (MinJobAge) before
    the scheduler was started again: its record names a job id Slurm does not know."""
    gate = tmp_path / "go"
    base, cfg = batch(tmp_path, [{"name": "quick", "command": f"while [ ! -e {gate} ]; do sleep 0.2; done; {command}"}])
    proc = start_scheduler(cfg, tmp_path)
    try:
        job = running_job(base, "quick")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    gate.touch()
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED"), 60, what="the job to end")
    work = exp_dirs(base, "quick")[0]
    m = meta(work)
    assert m["status"] == "running"
    unknown = "999999"
    m["job_id"] = unknown
    m["runs"][0]["backend"]["job_id"] = unknown
    (work / "metadata.json").write_text(json.dumps(m))
    assert subprocess.run(["scontrol", "show", "job", unknown], capture_output=True, timeout=30).returncode != 0
    log = work / "terminal_logs" / "run_0001.log"
    assert "[exp] exit status" in log.read_text()
    if strip_status:  # as if the job had been killed before its script could write that line
        log.write_text("".join(ln for ln in log.read_text().splitlines(True) if "exit status" not in ln))
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=60)
    return r, meta(work)


@needs_slurm
def test_a_job_slurm_has_forgotten_ends_as_its_log_says(tmp_path):
    r, m = _adopt_a_job_slurm_forgot(tmp_path, "echo done; exit 3")
    assert "adopted  quick (job 999999" in r.stdout, r.stdout
    assert r.returncode == 1, r.stdout + r.stderr  # it failed (exit 3): not a hang, not a success
    assert m["status"] == "error" and m["exit_code"] == 3, m


@needs_slurm
def test_a_job_slurm_has_forgotten_without_an_exit_status_is_an_error_not_a_hang(tmp_path):
    r, m = _adopt_a_job_slurm_forgot(tmp_path, "true", strip_status=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert m["status"] == "error" and "ended unseen" in m["runs"][0]["reason"], m["runs"]


@needs_slurm
def test_the_state_file_and_metadata_follow_a_job_from_pending_to_running(tmp_path):
    gate = tmp_path / "go"
    base, cfg = batch(tmp_path, [{"name": "block", "command": f"while [ ! -e {gate} ]; do sleep 0.2; done",
                                  "repeats": 2},
                                 {"name": "waits", "command": "sleep 30"}], max_concurrent_experiments=3)
    proc = start_scheduler(cfg, tmp_path)
    try:
        def task_job():
            st = try_state(base)
            item = next((t for t in (st or {}).get("running", []) if t["name"] == "waits"), None)
            return item and item.get("job")
        # Two CPUs held by the blockers: the third job waits in Slurm's queue, and says so.
        wait_for(lambda: (task_job() or {}).get("state") == "PENDING", 30, what="waits shown PENDING")
        gate.touch()
        wait_for(lambda: (task_job() or {}).get("state") == "RUNNING" and task_job().get("node"), 30,
                 what="the state file to show waits RUNNING on its node")
        status = subprocess.run([sys.executable, EXP_PY, "status", str(base)], capture_output=True, text=True,
                                env=child_env(), timeout=30).stdout
        line = next(ln for ln in status.splitlines() if " waits " in ln)
        assert "RUNNING" in line and task_job()["node"] in line, status
        rec = meta(exp_dirs(base, "waits")[0])["runs"][0]["backend"]
        assert rec["state"] == "RUNNING" and rec["node"] == task_job()["node"], rec
    finally:
        subprocess.run([sys.executable, EXP_PY, "shutdown", str(base), "--now"], env=child_env(),
                       capture_output=True, timeout=60)
        stop_process(proc)


@needs_slurm
def test_sbatch_runs_in_a_session_of_its_own_and_a_submission_cut_short_is_found(tmp_path, monkeypatch):
    """Ctrl-C at the terminal must not kill sbatch half-way; and an sbatch that does not answer in time
    may still have submitted the job: exp finds it by its comment instead of leaving it unwatched."""
    real = shutil.which("sbatch")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sessions = tmp_path / "sessions"
    (bindir / "sbatch").write_text(
        "#!/bin/sh\n"
        f"ps -o sid= -p $$ >> {sessions}\n"
        f'{real} "$@"\n'
        "sleep 30\n")  # submitted, but no answer in time
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(exp, "SBATCH_TIMEOUT", 3.0)
    base, cfg = batch(tmp_path, [{"name": "once", "command": "echo ran"}])
    code = exp.Scheduler(exp.load_config(str(cfg)), out=io.StringIO()).run()
    assert code == 0
    m = meta(exp_dirs(base, "once")[0])
    assert m["status"] == "finished", m
    assert squeue_comments().count(f"exp:{exp_dirs(base, 'once')[0]}:run_0001") == 1  # submitted once
    sids = {int(x) for x in sessions.read_text().split()}
    assert os.getsid(0) not in sids, sids


@needs_slurm
def test_after_a_restart_a_timeout_still_counts_the_run_not_the_wait_in_the_queue(tmp_path):
    """A job adopted while it waits in Slurm's queue: the wait before and after the restart is not run time."""
    gate = tmp_path / "go"
    base, cfg = batch(tmp_path, [{"name": "block", "command": f"while [ ! -e {gate} ]; do sleep 0.2; done",
                                  "repeats": 2},
                                 {"name": "patient", "command": "sleep 1", "timeout": "8s"}],
                      max_concurrent_experiments=3)
    proc = start_scheduler(cfg, tmp_path)
    try:
        def submitted():
            try:
                return exp_dirs(base, "patient") and "job_id" in meta(exp_dirs(base, "patient")[0])
            except (OSError, ValueError):  # not written yet
                return False
        wait_for(submitted, 30, what="patient to be submitted (it waits: the blockers hold both CPUs)")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop_process(proc)
    # Longer than its timeout, still in the queue.  (Its end can be seen up to a poll interval late,
    # 5 s at most, hence a timeout well above its 1 s of running.)
    time.sleep(9)
    proc = start_scheduler(cfg, tmp_path)
    try:
        wait_for(lambda: "adopted  patient" in (tmp_path / "sched.out").read_text(), 30,
                 what="the restarted scheduler to adopt patient")
        time.sleep(1)
        gate.touch()
        assert proc.wait(timeout=90) == 0, (tmp_path / "sched.out").read_text()
    finally:
        stop_process(proc)
    m = meta(exp_dirs(base, "patient")[0])
    assert m["status"] == "finished", m["runs"]


def test_a_third_ctrl_c_stops_waiting_for_jobs_whose_end_slurm_never_reports(tmp_path):
    """A Slurm that takes the job and cancels nothing (fake sbatch, squeue and scancel on PATH): Ctrl-C,
    Ctrl-C again (scancel KILL), then a third stops the waiting; the state file keeps the task running."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    scripts = {"sbatch": "echo 4242", "squeue": 'echo "4242|RUNNING|node1|None|2026-01-01T00:00:00|2026-01-01T00:00:01"',
               "scancel": "exit 0", "scontrol": "exit 1", "sacct": "exit 1"}
    for name, body in scripts.items():
        (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bindir / name).chmod(0o755)
    base, cfg = batch(tmp_path, [{"name": "stuck", "command": "sleep 300"}], kill_timeout=1)
    out = tmp_path / "sched.out"
    proc = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], cwd=tmp_path,
                            env=child_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}"),
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "started" in out.read_text(), 30, what="the job to be submitted")
        for i in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
        assert proc.wait(timeout=30) == 130, out.read_text()
    finally:
        stop_process(proc)
    text = out.read_text()
    assert "not waiting any longer for the end of 1 experiment(s) (stuck)" in text, text
    assert "Traceback" not in text
    state = try_state(base)
    assert [t["name"] for t in state["running"]] == ["stuck"] and state["summary"]["status_indicator"] == "stopped"
