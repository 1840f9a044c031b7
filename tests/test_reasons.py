"""Why a run ended: the ``reason`` (exit code, signal, OOM killer) and the ``cause`` seen in its log.

The pure parts (:func:`exp.failure_cause`, :func:`exp.end_reason`,
:func:`exp.signal_name`) get realistic log snippets and exit statuses; the
rest is end to end: real commands run by exp raise, exit 3, get SIGKILLed
from inside (not by exp), or are killed by the kernel's OOM killer in a
small memory cgroup (skipped, with the reason, where one cannot be made),
and metadata.json, the run's entry, the ``[exp] ended`` log line and
``exp ls`` are read back.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import exp
from conftest import posix_only, py_cmd, read_meta, run_exp, wait_for, write_script

CLI_TIMEOUT = 60


def cli(*args, cwd, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_exp(*args, cwd=cwd, timeout=timeout)


def sigkill_reason(pid: int | None) -> str:
    """What exp must record for a SIGKILL of ``pid`` that it did not send and the OOM killer did not either."""
    known = exp.oom_killed({pid}) if pid is not None else None
    assert known is not True, "the kernel log says the OOM killer killed this pid"
    return "signal SIGKILL" if known is False else "signal SIGKILL (killed by the OOM killer?)"


# ============================================================================
# failure_cause: realistic log ends
# ============================================================================

TORCH_OOM = """\
Epoch 1/10:  37%|███▋      | 370/1000 [01:02<01:46,  5.93it/s, loss=2.31]
Traceback (most recent call last):
  File "/home/u/proj/train.py", line 88, in <module>
    main()
  File "/home/u/proj/train.py", line 71, in main
    out = model(batch)
          ^^^^^^^^^^^^
  File "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1511, in _wrapped_call_impl
    return self._call_impl(*args, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB \
of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use.
"""

NCCL_FAILURE = """\
[rank1]:[E ProcessGroupNCCL.cpp:523] Some NCCL operations have failed or timed out.
Traceback (most recent call last):
  File "/home/me/project/train_ddp.py", line 40, in <module>
    dist.all_reduce(t)
  File "/opt/conda/lib/python3.10/site-packages/torch/distributed/c10d_logger.py", line 47, in wrapper
    return func(*args, **kwargs)
torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, \
unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.19.3
ncclUnhandledCudaError: Call to CUDA function failed.
Last error:
Cuda failure 'invalid device ordinal'
"""

CHAINED = """\
loading config
Traceback (most recent call last):
  File "train.py", line 10, in load
    lr = cfg["lr"]
         ~~~^^^^^^
KeyError: 'lr'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "train.py", line 14, in <module>
    load()
  File "train.py", line 12, in load
    raise ValueError("bad lr") from None
ValueError: bad lr
"""


@pytest.mark.parametrize("log", [
    TORCH_OOM,
    "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported\n",
    "Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.cuda.OutOfMemoryError: Allocation on device\n",
    "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)\n",
], ids=["torch-2.x", "cuda-error", "cuda.OutOfMemoryError", "torch-1.x"])
def test_cuda_out_of_memory(log):
    assert exp.failure_cause(log) == "CUDA out of memory"


def test_cuda_out_of_memory_wins_over_everything_after_it():
    log = TORCH_OOM + "loss is nan\nKilled\n" + NCCL_FAILURE + CHAINED
    assert exp.failure_cause(log) == "CUDA out of memory"


def test_a_java_heap_is_not_a_cuda_out_of_memory():
    log = 'Exception in thread "main" java.lang.OutOfMemoryError: Java heap space\n\tat Main.main(Main.java:5)\n'
    assert exp.failure_cause(log) is None


def test_nccl_error_line():
    cause = exp.failure_cause(NCCL_FAILURE)
    assert cause.startswith("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970"), cause
    assert "unhandled cuda error" in cause and len(cause) <= exp.REPORT_LINE_WIDTH


@pytest.mark.parametrize("line, start", [
    ("ncclInternalError: Internal check failed.", "NCCL error: ncclInternalError: Internal check failed."),
    ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for "
     "600000 milliseconds before timing out.", "NCCL error: Watchdog caught collective operation timeout"),
])
def test_other_nccl_failures(line, start):
    assert exp.failure_cause(f"step 3\n{line}\nstep 4\n").startswith(start)


@pytest.mark.parametrize("line", [
    "loss is nan", "step 120 | Loss: NaN | lr 3e-4", "nan loss detected at step 40", "non-finite loss, stopping",
    "Loss is inf", "val_loss=nan", "train_loss: -inf",
    "loss = tensor(nan, device='cuda:0', grad_fn=<NllLossBackward0>)",
    "WARNING: NaN training loss", "Loss became NaN at iteration 12", "the loss is not finite",
])
def test_nan_or_inf_loss(line):
    assert exp.failure_cause(f"step 1 loss 2.3\n{line}\n") == "NaN/inf loss"


@pytest.mark.parametrize("line", [
    "loss: 0.3512", "val_loss=1.2e-3 acc=0.98", "loss of precision in float16 is expected", "nan_count=0 loss 0.4",
    "infinity loop guard: loss 0.2", "grad_norm: inf  loss: 0.7",
])
def test_ordinary_loss_lines_are_not_a_cause(line):
    assert exp.failure_cause(f"{line}\n") is None


def test_nan_loss_wins_over_the_exception_it_caused():
    log = "step 9 loss 1.1\nstep 10 loss nan\n" + "Traceback (most recent call last):\n  File \"t.py\"\n" \
          "FloatingPointError: stopping\n"
    assert exp.failure_cause(log) == "NaN/inf loss"


@pytest.mark.parametrize("line", [
    "Killed",
    "Killed   ",
    "bash: line 1:  5099 Killed                  python3 train.py --lr 0.1",
    "/home/u/run.sh: line 3: 4242 Killed                  python train.py",
    "zsh: killed     python train.py",
])
def test_a_shell_saying_killed(line):
    assert exp.failure_cause(f"epoch 3\n{line}\n") == "Killed"


def test_killed_inside_a_sentence_is_not_a_shell_report():
    assert exp.failure_cause("Killed 3 stale workers\nworker restarted\n") is None


def test_the_last_traceback_block_wins():
    assert exp.failure_cause(CHAINED) == "ValueError: bad lr"
    # Output after the traceback (an atexit handler, another rank) does not hide it.
    assert exp.failure_cause(CHAINED + "wandb: Synced 5 W&B file(s)\n\n") == "ValueError: bad lr"


@pytest.mark.parametrize("final", [
    "KeyboardInterrupt",
    "subprocess.CalledProcessError: Command '['make']' returned non-zero exit status 2.",
    "AssertionError",
    "RuntimeError: Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
])
def test_python_exception_final_lines(final):
    log = f"Traceback (most recent call last):\n  File \"t.py\", line 2, in <module>\n    f()\n{final}\n"
    assert exp.failure_cause(log) == final


def test_a_long_exception_message_is_cut_to_one_report_line():
    message = "x" * 5000
    cause = exp.failure_cause(f"Traceback (most recent call last):\n  File \"t.py\"\nValueError: {message}\n")
    assert cause.startswith("ValueError: xxx") and cause.endswith("\u2026")
    assert len(cause) == exp.REPORT_LINE_WIDTH


def test_only_the_last_64_kb_is_read():
    tail = "ok\n" * (exp.CAUSE_TAIL_BYTES // 3 + 10)
    assert exp.failure_cause(CHAINED + tail) is None
    assert exp.failure_cause(CHAINED + tail[: exp.CAUSE_TAIL_BYTES // 2]) == "ValueError: bad lr"


@pytest.mark.parametrize("log", ["", "\n\n", "epoch 1 loss 0.5\nepoch 2 loss 0.4\ndone\n",
                                 "Traceback (most recent call last):\n  File \"t.py\", line 1\n"])
def test_no_cause(log):
    assert exp.failure_cause(log) is None


def test_progress_bars_and_escape_sequences():
    bar = "".join(f"\r\x1b[32m{p:3d}%|{'#' * (p // 10):10s}|\x1b[0m {p}/100" for p in range(0, 60, 10))
    log = (f"\x1b]0;training\x07{bar}\rTraceback (most recent call last):\r\n"
           "  File \"\x1b[35mtrain.py\x1b[0m\", line \x1b[35m3\x1b[0m, in <module>\r\n"
           "\x1b[1;35mValueError\x1b[0m: \x1b[35mbad lr\x1b[0m\r\n")
    assert exp.failure_cause(log) == "ValueError: bad lr"
    # A bar redrawn over a line that said Killed: the last drawing is what the terminal shows,
    # and each drawing is a line of its own.
    assert exp.failure_cause(" 10%|#\r 20%|##\rKilled\n") == "Killed"
    # Control characters in the message do not reach the cause.
    assert exp.failure_cause("Traceback (most recent call last):\n  x\nValueError: a\x07b\x1b[2Jc\n") == \
        "ValueError: abc"


def test_exps_own_lines_are_ignored():
    log = (CHAINED.replace("ValueError: bad lr", "ValueError: the real one")
           + "[exp] 2025-01-01T00:00:00+00:00 run_0001 ended: exit code 1 (error), duration 1s; "
             "cause: CUDA out of memory\n"
           + "[exp] Traceback (most recent call last):\n[exp] Killed\n")
    assert exp.failure_cause(log) == "ValueError: the real one"


# ============================================================================
# end_reason and signal_name
# ============================================================================

def test_signal_names():
    assert exp.signal_name(9) == "SIGKILL"
    assert exp.signal_name(int(signal.SIGTERM)) == "SIGTERM"
    assert exp.signal_name(int(signal.SIGSEGV)) == "SIGSEGV"
    assert exp.signal_name(255) == "255"  # no such signal: the number


@pytest.mark.parametrize("code, reason", [
    (0, "exit code 0"), (1, "exit code 1"), (3, "exit code 3"), (127, "exit code 127"),
    (137, "exit code 137 (SIGKILL?)"),  # how a shell reports its child's SIGKILL
    (-int(signal.SIGTERM), "signal SIGTERM"), (-int(signal.SIGSEGV), "signal SIGSEGV"),
    (-int(signal.SIGINT), "signal SIGINT"), (None, "exit code unknown"), (exp.EXIT_UNKNOWN, "exit code unknown"),
])
def test_end_reason_from_the_exit_status(code, reason):
    assert exp.end_reason(code) == reason
    assert exp.end_reason(code, signalled=True, pid=os.getpid()) == reason


def test_a_sigkill_exp_sent_is_just_the_signal():
    assert exp.end_reason(-9, signalled=True, pid=os.getpid()) == "signal SIGKILL"


def test_a_sigkill_exp_did_not_send_looks_at_the_kernel_log():
    # This process was not killed by the OOM killer; whether the kernel log can be read decides the note.
    assert exp.end_reason(-9, signalled=False, pid=os.getpid()) == sigkill_reason(os.getpid())
    # Without a pid there is nothing to look for: it cannot be known.
    assert exp.end_reason(-9) == "signal SIGKILL (killed by the OOM killer?)"


# ============================================================================
# End to end: real runs, real files
# ============================================================================

BAD_LR = """
import sys
for i in range(0, 101, 25):
    print(f"\\r{i:3d}%|{'#' * (i // 10):10s}|", end="", flush=True)
print(flush=True)
def configure(lr):
    raise ValueError(f"bad lr {lr}")
configure(sys.argv[1])
"""

SELF_KILL = """
import os, signal
print("working", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def ended_line(log: str) -> str:
    lines = [ln for ln in log.splitlines() if " ended: " in ln and ln.startswith(exp.LOG_MARK)]
    assert len(lines) == 1, lines
    return lines[0]


def check_recorded(e, reason, cause, status="error"):
    m = e.read_metadata()
    assert (m["status"], m["reason"], m["cause"]) == (status, reason, cause), m
    entry = m["runs"][-1]
    assert (entry["status"], entry["reason"], entry["cause"]) == (status, reason, cause), entry
    s = exp.ExperimentDir(e.work_dir).summary()
    assert (s["reason"], s["cause"]) == (reason, cause)
    return m


@posix_only
def test_a_python_exception_is_the_cause(make_exp, tmp_path):
    script = write_script(tmp_path, "bad_lr.py", BAD_LR)
    e = make_exp("bad_lr", py_cmd(script, "0.5"))
    assert e.run() == 1
    check_recorded(e, "exit code 1", "ValueError: bad lr 0.5")
    assert ended_line(e.read_log()).endswith("; cause: ValueError: bad lr 0.5")
    assert "run_0001 ended: exit code 1 (error), duration " in e.read_log()


@posix_only
def test_an_exit_code_without_a_cause(make_exp):
    e = make_exp("three", "echo working; exit 3")
    assert e.run() == 3
    check_recorded(e, "exit code 3", None)
    assert "cause" not in ended_line(e.read_log())


@posix_only
def test_a_finished_run_has_neither(make_exp):
    e = make_exp("fine", "echo 'loss is nan'; echo Killed")  # a cause in the log, but the run finished
    assert e.run() == 0
    m = check_recorded(e, None, None, status="finished")
    assert "reason" in m and "cause" in m


@posix_only
def test_a_sigkill_from_inside_is_a_signal(make_exp, tmp_path):
    script = write_script(tmp_path, "self_kill.py", SELF_KILL)
    e = make_exp("self_kill", f"exec {py_cmd(script)}")  # the python replaces the supervisor's subshell
    handle = e.start()
    assert handle.wait(timeout=60) == -9  # the supervisor passes the signal on
    reason = sigkill_reason(handle.pid)
    assert handle.reason == reason
    check_recorded(e, reason, "Killed")  # the supervisor shell reports it, as shells do
    assert "ended by signal SIGKILL (error)" in ended_line(e.read_log())


@posix_only
def test_a_sigkill_reported_by_a_shell(make_exp, tmp_path):
    script = write_script(tmp_path, "self_kill.py", SELF_KILL)
    e = make_exp("shell_kill", f"{py_cmd(script)}; exit $?")  # the shell waits, says "Killed", exits 137
    # exp's supervisor turns the shell's 128+9 back into the signal.
    handle = e.start()
    assert handle.wait(timeout=60) == -9
    check_recorded(e, sigkill_reason(handle.pid), "Killed")


@posix_only
def test_a_stop_by_exp_keeps_its_reason_and_says_it_in_the_log(make_exp, tmp_path):
    up = tmp_path / "up"
    script = write_script(tmp_path, "s.py", f"import time; open({str(up)!r}, 'w').close(); time.sleep(60)")
    e = make_exp("stopped", py_cmd(script))
    handle = e.start()
    wait_for(up.exists, what="the command to start")
    handle.terminate(grace=5)
    assert handle.reason == "terminated by user"
    m = check_recorded(e, "terminated by user", None, status="killed")
    assert "; terminated by user" in ended_line(e.read_log())
    assert m["exit_code"] == -int(signal.SIGTERM)


@posix_only
def test_the_next_run_starts_without_the_last_ones_reason(make_exp, tmp_path):
    gate = tmp_path / "gate"
    script = write_script(tmp_path, "twice.py", f"""
        import os, sys, time
        marker = {str(tmp_path / "marker")!r}
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError("first time")
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        """)
    e = make_exp("twice", py_cmd(script))
    assert e.run() == 1
    check_recorded(e, "exit code 1", "ValueError: first time")
    handle = e.start()
    try:
        m = wait_for(lambda: (lambda m: m if m.get("current_run_id") == "run_0002" else None)(read_meta(e.work_dir)),
                     what="the second run's start")
        assert (m["status"], m["reason"], m["cause"]) == ("running", None, None)
        assert m["runs"][0]["cause"] == "ValueError: first time"
    finally:
        gate.touch()
    assert handle.wait(timeout=60) == 0
    m = check_recorded(e, None, None, status="finished")
    assert (m["runs"][0]["reason"], m["runs"][0]["cause"]) == ("exit code 1", "ValueError: first time")


# ---------------------------------------------------------------------------- the OOM killer

@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh memory cgroup (v1 or v2) of ``limit`` bytes and no swap; yields its cgroup.procs path."""
    name = f"exp_test_oom_{os.getpid()}_{time.monotonic_ns()}"
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isfile(os.path.join(v1, "memory.limit_in_bytes")):
        path = os.path.join(v1, name)
        limits = [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)]
    else:
        try:
            with open("/sys/fs/cgroup/cgroup.subtree_control", encoding="ascii") as f:
                controllers = f.read().split()
        except OSError as e:
            pytest.skip(f"no memory cgroup to make an OOM kill in: {e}")
        if "memory" not in controllers:
            pytest.skip("no memory cgroup to make an OOM kill in: cgroup v2 without the memory controller")
        path, limits = os.path.join("/sys/fs/cgroup", name), [("memory.max", limit), ("memory.swap.max", 0)]
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup for an OOM kill: {e}")
    try:
        for fname, value in limits:
            if os.path.exists(os.path.join(path, fname)):
                try:
                    with open(os.path.join(path, fname), "w", encoding="ascii") as f:
                        f.write(str(value))
                except OSError as e:
                    if fname in ("memory.limit_in_bytes", "memory.max"):
                        pytest.skip(f"cannot limit a memory cgroup: {e}")
        yield os.path.join(path, "cgroup.procs")
    finally:
        for _ in range(200):  # the killed process may take a moment to leave it
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.02)


HOG = """
print("allocating", flush=True)
held = []
for _ in range(4096):  # 4 GiB at most: a limit that did not apply still ends the test
    held.append(b"x" * (1 << 20))
raise SystemExit(5)
"""


@posix_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OOM killer and memory cgroups are Linux's")
@pytest.mark.skipif(os.geteuid() != 0, reason="making a memory cgroup needs root")
def test_the_oom_killer_is_named(make_exp, tmp_path):
    hog = write_script(tmp_path, "hog.py", HOG)
    with memory_cgroup(96 << 20) as procs:
        e = make_exp("hog", f"echo $$ > {procs} && exec {py_cmd(hog)}")
        handle = e.start()
        code = handle.wait(timeout=120)
    if code == 5:
        pytest.skip("the memory cgroup's limit did not apply: no OOM kill to name")
    assert code == -9, e.read_log()
    known = exp.oom_killed({handle.pid})
    expected = {True: "signal SIGKILL (killed by the OOM killer)", None: "signal SIGKILL (killed by the OOM killer?)"}
    assert known in expected, "the kernel log can be read but does not show the OOM kill"
    assert handle.reason == expected[known]
    check_recorded(e, expected[known], None)
    line = ended_line(e.read_log())
    assert "ended by signal SIGKILL (error); killed by the OOM killer" in line, line


# ---------------------------------------------------------------------------- a batch and exp ls

@posix_only
def test_reasons_in_a_batch_and_in_ls(tmp_path):
    bad_lr = write_script(tmp_path, "bad_lr.py", BAD_LR)
    self_kill = write_script(tmp_path, "self_kill.py", SELF_KILL)
    experiments = [("bad_lr", py_cmd(bad_lr, "0.1")), ("three", "exit 3"), ("self_kill", f"exec {py_cmd(self_kill)}"),
                   ("shell_kill", f"{py_cmd(self_kill)}; exit $?"), ("fine", "echo ok")]
    config = tmp_path / "batch.toml"
    config.write_text('[scheduler]\nbase_experiment_dir = "results"\nmax_concurrent_experiments = 4\n\n' + "".join(
        f"[[experiments]]\nname = {json.dumps(n)}\ncommand = {json.dumps(c)}\n\n" for n, c in experiments),
        encoding="utf-8")
    run = cli("run", config, cwd=tmp_path)
    assert run.returncode != 0, run.stdout + run.stderr

    base = tmp_path / "results"
    metas = {m["name"]: m for m in (read_meta(d) for d in base.iterdir() if (d / "metadata.json").exists())}
    assert set(metas) == {n for n, _ in experiments}
    killed = sigkill_reason(metas["self_kill"]["runs"][0]["pid"])
    shell_killed = sigkill_reason(metas["shell_kill"]["runs"][0]["pid"])
    # Both die of SIGKILL as far as exp's supervisor is concerned, which (as a shell) says "Killed".
    expected = {"bad_lr": ("exit code 1", "ValueError: bad lr 0.1"), "three": ("exit code 3", None),
                "self_kill": (killed, "Killed"), "shell_kill": (shell_killed, "Killed"),
                "fine": (None, None)}
    for name, (reason, cause) in expected.items():
        m = metas[name]
        assert (m["reason"], m["cause"]) == (reason, cause), m
        assert (m["runs"][-1]["reason"], m["runs"][-1]["cause"]) == (reason, cause), m

    js = cli("ls", base, "--json", cwd=tmp_path)
    assert js.returncode == 0, js.stderr
    rows = {r["name"]: r for r in json.loads(js.stdout)}
    assert {n: (r["reason"], r["cause"]) for n, r in rows.items()} == expected

    table = cli("ls", base, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[0].split()
    assert header[-1] == "reason", lines[0]
    by_name = {ln.split()[0]: ln for ln in lines[1:]}
    assert by_name["bad_lr"].endswith("exit code 1: ValueError: bad lr 0.1")
    assert by_name["three"].endswith("exit code 3")
    assert by_name["self_kill"].endswith(f"{killed}: Killed")
    assert by_name["shell_kill"].endswith(f"{shell_killed}: Killed")
    assert by_name["fine"].endswith(" -")

    # Only finished experiments shown: no reason column at all.
    only_fine = cli("ls", base, "--status", "finished", cwd=tmp_path)
    assert only_fine.returncode == 0, only_fine.stderr
    assert "reason" not in only_fine.stdout.splitlines()[0]
