"""The foundation under everything else: platform, files, store, backend, and the shape of exp.py.

Real processes, real files: process groups are made with ``start_new_session``,
full disks are small tmpfs mounts.  Nothing inside exp is mocked; a few tests
take ``os.listdir`` or ``os.pidfd_open`` away to watch or force a code path.
"""
from __future__ import annotations

import errno
import inspect
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

from conftest import (EXP_PY, ROOT, tmpfs, call_with_timeout, child_env, fds_under, linux_only, pid_gone, posix_only,
                      py_cmd, read_meta, wait_for, write_exp, write_script)

import exp

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def spawn(tmp_path, source: str, *args: object, name: str = "child.py") -> subprocess.Popen:
    """Start a Python script as the leader of a new session (and process group)."""
    script = write_script(tmp_path, name, source)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], start_new_session=True,
                            stdin=subprocess.DEVNULL, env=child_env())


def reap(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc``'s group if it still runs, and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait(10)


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0].decode(), int(fields[2])


def bytes_env(**extra: str) -> dict[bytes, bytes]:
    """An environment for a Launch: bytes, as Popen takes it on POSIX."""
    return {os.fsencode(k): os.fsencode(v) for k, v in child_env(**extra).items()}


# A child that says it is ready (its handlers are in place), then sleeps.
# argv: ready-file, marker-file, mode (exit: exit on TERM; stay: note TERM and
# go on; ignore: SIG_IGN), and "grandchild" to start one in the same group.
TERM_CHILD = """
    import os, signal, subprocess, sys, time
    ready, marker, mode = sys.argv[1:4]

    def on_term(signum, frame):
        with open(marker, "a") as f:
            f.write("TERM\\n")
        if mode == "exit":
            sys.exit(0)

    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_term)
    if "grandchild" in sys.argv[4:]:
        # Same group; it ignores SIGTERM too, so only SIGKILL ends it.
        g = subprocess.Popen([sys.executable, "-c",
                              "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        with open(ready + ".grandchild", "w") as f:
            f.write(str(g.pid))
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.05)
"""


def start_term_child(tmp_path, tag: str, mode: str, *extra: str):
    ready, marker = tmp_path / f"{tag}.ready", tmp_path / f"{tag}.marker"
    proc = spawn(tmp_path, TERM_CHILD, ready, marker, mode, *extra, name=f"{tag}.py")
    wait_for(ready.exists, what=f"{tag} to be ready")
    return proc, marker


def marker_text(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# ----------------------------------------------------------------------------
# Platform: group_alive
# ----------------------------------------------------------------------------


@posix_only
def test_group_alive_for_a_live_group_then_not_after_it_exits(tmp_path):
    proc, _ = start_term_child(tmp_path, "live", "exit")
    try:
        assert exp.group_alive(proc.pid)
        assert exp.signal_group(proc.pid, 0)
    finally:
        reap(proc)
    assert not exp.group_alive(proc.pid)
    assert not exp.signal_group(proc.pid, 0)


@linux_only
def test_group_of_our_unreaped_zombie_leader_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: pid_gone(proc.pid), what="the leader to exit")
        assert proc_state(proc.pid) == ("Z", proc.pid)  # not reaped: still there as a zombie
        os.killpg(proc.pid, 0)  # which is why killpg alone cannot tell
        assert not exp.group_alive(proc.pid)
    finally:
        assert proc.wait(10) == 0


# The leader L (our child) forks P, which moves to a group of its own in the
# same session and forks M; M joins L's group and exits.  P never reaps M, and
# L exits: L's group holds only zombies, one of them someone else's.
ZOMBIES_ONLY = """
    import os, sys, time
    out = sys.argv[1]
    leader_group = os.getpgrp()
    p = os.fork()
    if p == 0:
        os.setpgid(0, 0)
        m = os.fork()
        if m == 0:
            os.setpgid(0, leader_group)
            os._exit(0)
        os.waitid(os.P_PID, m, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        with open(out + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {m}")
        os.rename(out + ".tmp", out)
        time.sleep(60)
        os._exit(0)
    while not os.path.exists(out):
        time.sleep(0.01)
"""


@linux_only
def test_group_of_zombies_only_is_not_alive(tmp_path, kill_groups_later):
    out = tmp_path / "pids"
    leader = spawn(tmp_path, ZOMBIES_ONLY, out)
    try:
        wait_for(out.exists, what="the helper to set up the zombie")
        keeper, member = map(int, out.read_text().split())
        kill_groups_later.append(keeper)
        wait_for(lambda: pid_gone(leader.pid), what="the leader to exit")
        assert proc_state(member) == ("Z", leader.pid)  # a zombie in the leader's group, not ours
        assert proc_state(keeper)[0] not in ("Z", "X")  # its parent lives, elsewhere
        os.killpg(leader.pid, 0)
        assert not exp.group_alive(leader.pid)
    finally:
        leader.wait(10)
        try:
            os.kill(keeper, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


ORPHAN_MAKER = """
    import subprocess, sys
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(g.pid))
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
"""


@pytest.fixture
def orphaned_group(tmp_path, kill_groups_later):
    """(pgid, grandchild pid): a group whose leader exited and was reaped, its grandchild still running."""
    out = tmp_path / "grandchild"
    leader = spawn(tmp_path, ORPHAN_MAKER, out)
    kill_groups_later.append(leader.pid)
    assert leader.wait(30) == 0
    grandchild = int(out.read_text())
    assert proc_state(grandchild) is not None and proc_state(grandchild)[1] == leader.pid
    return leader.pid, grandchild


@linux_only
def test_group_alive_while_an_orphaned_grandchild_lives(orphaned_group):
    pgid, grandchild = orphaned_group
    assert exp.group_alive(pgid)
    os.kill(grandchild, signal.SIGKILL)
    wait_for(lambda: not exp.group_alive(pgid), what="the group to be gone")


class ListdirCounter:
    """os.listdir that counts listings of /proc itself."""

    def __init__(self, monkeypatch):
        self.proc_listings = 0
        real = os.listdir

        def listdir(path="."):
            if os.fspath(path).rstrip("/") == "/proc":
                self.proc_listings += 1
            return real(path)

        monkeypatch.setattr(os, "listdir", listdir)


@linux_only
def test_group_alive_does_not_scan_proc_while_the_leader_lives(tmp_path, monkeypatch):
    proc, _ = start_term_child(tmp_path, "cheap", "exit")
    try:
        counter = ListdirCounter(monkeypatch)
        assert all(exp.group_alive(proc.pid) for _ in range(100))
        assert counter.proc_listings <= 1
    finally:
        reap(proc)


@linux_only
def test_group_alive_remembers_the_members_it_found(orphaned_group, monkeypatch):
    # The leader is gone: one scan of /proc finds the grandchild, later checks read only its entry.
    pgid, grandchild = orphaned_group
    counter = ListdirCounter(monkeypatch)
    assert all(exp.group_alive(pgid) for _ in range(100))
    assert counter.proc_listings <= 1
    os.kill(grandchild, signal.SIGKILL)
    wait_for(lambda: not exp.group_alive(pgid), what="the group to be gone")


# ----------------------------------------------------------------------------
# Platform: stop_groups
# ----------------------------------------------------------------------------


@posix_only
def test_stop_groups_sends_sigterm_first(tmp_path):
    proc, marker = start_term_child(tmp_path, "polite", "exit")
    try:
        # A long grace: the child leaves on SIGTERM; had it not got one, this would wait a minute.
        assert call_with_timeout(lambda: exp.stop_groups([proc.pid], grace=60), 50, "stop_groups") == []
        assert marker.read_text() == "TERM\n"
        assert proc.wait(10) == 0  # it exited by itself, not by SIGKILL
    finally:
        reap(proc)


@linux_only
def test_stop_groups_kills_what_ignores_sigterm_and_its_grandchild(tmp_path, kill_groups_later):
    proc, _ = start_term_child(tmp_path, "stubborn", "ignore", "grandchild")
    kill_groups_later.append(proc.pid)
    grandchild = int((tmp_path / "stubborn.ready.grandchild").read_text())
    try:
        assert exp.stop_groups([proc.pid], grace=0.2) == []
        assert proc.wait(10) == -signal.SIGKILL
        assert pid_gone(grandchild)
        assert not exp.group_alive(proc.pid)
    finally:
        reap(proc)


@linux_only
def test_stop_groups_stops_several_groups_under_one_grace(tmp_path, kill_groups_later):
    # Each notes SIGTERM and stays: all must get SIGTERM, then all SIGKILL.
    procs = []
    try:
        for i in range(3):
            procs.append(start_term_child(tmp_path, f"g{i}", "stay"))
            kill_groups_later.append(procs[-1][0].pid)
        def idle(seconds):
            # Let every child note its SIGTERM (a loaded machine may be slow to
            # run the handlers), then the grace runs out as usual.
            wait_for(lambda: all(marker_text(m) for _, m in procs), what="every SIGTERM note")
            return False

        assert exp.stop_groups([p.pid for p, _ in procs], grace=0.3, idle=idle) == []
        for p, marker in procs:
            assert p.wait(10) == -signal.SIGKILL
            assert marker.read_text() == "TERM\n"
    finally:
        for p, _ in procs:
            reap(p)


@linux_only
def test_stop_groups_idle_returning_true_ends_the_grace_at_once(tmp_path, kill_groups_later):
    proc, marker = start_term_child(tmp_path, "hurry", "stay")
    kill_groups_later.append(proc.pid)
    calls = []

    def idle(seconds):
        # SIGTERM went out before the first wait; let the child note it (so
        # the marker tells SIGTERM came first), then ask for the kill at once.
        calls.append(seconds)
        wait_for(lambda: marker_text(marker) == "TERM\n", what="the SIGTERM note")
        return True  # a second Ctrl-C

    try:
        # With a 10-minute grace, only idle's True can make this return in time.
        left = call_with_timeout(lambda: exp.stop_groups([proc.pid], grace=600, idle=idle), 60, "stop_groups")
        assert left == []
        assert calls and all(s >= 0 for s in calls)
        assert proc.wait(10) == -signal.SIGKILL  # SIGKILL came, long before the grace ran out
        assert marker_text(marker) == "TERM\n"
    finally:
        reap(proc)


@posix_only
def test_stop_groups_of_groups_already_gone():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait(10)
    assert exp.stop_groups([proc.pid], grace=5) == []
    assert exp.stop_groups([], grace=5) == []


# ----------------------------------------------------------------------------
# Platform: exited_within
# ----------------------------------------------------------------------------


@pytest.fixture(params=["pidfd", "fallback"])
def exited_within_path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("os.pidfd_open needs Linux and Python 3.9+")
    return request.param


@posix_only
def test_exited_within_a_fast_process(exited_within_path):
    proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL)
    try:
        assert exp.exited_within(proc, 30)
        if exited_within_path == "pidfd":
            assert proc.returncode is None  # not reaped there: the caller's wait() gets the code
    finally:
        assert proc.wait(10) == 0
    # An already reaped process has ended, whichever path answers.
    assert exp.exited_within(proc, 1)


@posix_only
def test_exited_within_a_slow_process(exited_within_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    try:
        assert not exp.exited_within(proc, 0.05)
        assert proc.poll() is None
        proc.kill()
        assert exp.exited_within(proc, 30)
    finally:
        proc.kill()
        proc.wait(10)


# ----------------------------------------------------------------------------
# Files: read_tail and tail_lines
# ----------------------------------------------------------------------------


def write_bytes(tmp_path, data: bytes, name: str = "f.log") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("trailing", [True, False], ids=["newline-at-end", "no-newline-at-end"])
def test_read_tail_gives_exactly_the_last_lines(tmp_path, trailing):
    lines = [f"line {i}".encode() for i in range(1, 2001)]
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    path = write_bytes(tmp_path, data)
    end = b"\n" if trailing else b""
    for n in (1, 2, 3, 10, 1999):
        assert exp.read_tail(path, n) == b"\n".join(lines[-n:]) + end, n
        assert exp.tail_lines(path, n) == [ln.decode() for ln in lines[-n:]], n
    assert exp.read_tail(path, 2000) == data
    assert exp.read_tail(path, 5000) == data
    assert exp.read_tail(path, 0) == b""
    assert exp.tail_lines(path, 0) == []


def test_tail_of_tiny_and_empty_files(tmp_path):
    assert exp.read_tail(write_bytes(tmp_path, b"", "empty"), 3) == b""
    assert exp.tail_lines(write_bytes(tmp_path, b"", "empty"), 3) == []
    assert exp.read_tail(write_bytes(tmp_path, b"x", "one"), 3) == b"x"
    assert exp.read_tail(write_bytes(tmp_path, b"\n", "nl"), 1) == b"\n"
    assert exp.read_tail(write_bytes(tmp_path, b"a\n\nb\n", "blank"), 2) == b"\nb\n"
    assert exp.tail_lines(write_bytes(tmp_path, b"a\nb\n\n\n", "trailing-blanks"), 2) == ["a", "b"]


def test_tail_lines_keeps_the_last_progress_frame(tmp_path):
    path = write_bytes(tmp_path, b"start\nstep 1/3\rstep 2/3\rstep 3/3\ndone\n")
    assert exp.tail_lines(path, 2) == ["step 3/3", "done"]
    assert exp.tail_lines(path, 10) == ["start", "step 3/3", "done"]


def test_tail_lines_of_crlf_text(tmp_path):
    path = write_bytes(tmp_path, b"one\r\ntwo\r\nthree\r\n")
    assert exp.tail_lines(path, 2) == ["two", "three"]
    assert exp.read_tail(path, 2) == b"two\r\nthree\r\n"


def test_tail_lines_skips_a_prefix_and_reads_further_back(tmp_path):
    body = [f"out {i}" for i in range(5)] + ["[exp] mark"] * 40
    path = write_bytes(tmp_path, ("\n".join(body) + "\n").encode())
    assert exp.tail_lines(path, 3, skip_prefix="[exp]") == ["out 2", "out 3", "out 4"]


def test_read_tail_of_lines_longer_than_a_block(tmp_path):
    long = [bytes([65 + i]) * (200_000 + i) for i in range(4)]  # each several 64 KiB blocks
    data = b"\n".join(long) + b"\n"
    path = write_bytes(tmp_path, data)
    assert exp.read_tail(path, 1) == long[-1] + b"\n"
    assert exp.read_tail(path, 2) == long[-2] + b"\n" + long[-1] + b"\n"
    assert exp.tail_lines(path, 3) == [ln.decode() for ln in long[-3:]]


def test_read_tail_honours_max_bytes(tmp_path):
    lines = [f"line {i:05d}".encode() for i in range(1000)]  # 10 bytes + newline each
    data = b"\n".join(lines) + b"\n"
    path = write_bytes(tmp_path, data)
    got = exp.read_tail(path, 1000, max_bytes=100)
    assert 0 < len(got) <= 100 and data.endswith(got)
    assert got == b"\n".join(lines[-(len(got) // 11):]) + b"\n"  # whole lines only
    assert exp.tail_lines(path, 1000, max_bytes=100) == [ln.decode() for ln in lines[-9:]]
    # A single line longer than max_bytes: its end, never more than asked.
    one = write_bytes(tmp_path, b"x" * 10_000, "one-line")
    assert exp.read_tail(one, 1, max_bytes=500) == b"x" * 500


def sparse_gib(path, tail: bytes) -> None:
    with open(path, "wb") as f:
        f.write(b"first line\n")
    os.truncate(path, 1 << 30)  # a 1 GiB hole: no newline in it
    with open(path, "ab") as f:
        f.write(tail)


def peak_memory(fn):
    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def test_tail_of_a_sparse_gigabyte_file_reads_only_its_end(tmp_path):
    path = str(tmp_path / "huge.log")
    sparse_gib(path, b"\nepoch 1\nepoch 2\rdone 2\nlast line\n")
    for n, expected in ((1, ["last line"]), (3, ["epoch 1", "done 2", "last line"])):
        got, peak = peak_memory(lambda: exp.tail_lines(path, n))
        assert got == expected
        assert peak < 32 << 20, peak
    raw, peak = peak_memory(lambda: exp.read_tail(path, 2))
    assert raw == b"done 2\nlast line\n".replace(b"done 2", b"epoch 2\rdone 2")
    assert peak < 32 << 20, peak
    # More lines than the last max_bytes hold: the whole lines found, bounded memory.
    got, peak = peak_memory(lambda: exp.tail_lines(path, 1000))
    assert got[-3:] == ["epoch 1", "done 2", "last line"] and "first line" not in got
    assert peak < 32 << 20, peak
    got, peak = peak_memory(lambda: exp.read_tail(path, 1000, max_bytes=1 << 20))
    assert len(got) <= 1 << 20 and got.endswith(b"last line\n")
    assert peak < 32 << 20, peak


def test_get_log_tail_of_a_sparse_gigabyte_log(make_exp):
    e = make_exp(command="echo hello")
    h = e.start()
    assert h.wait() == 0
    log = e.log_path()
    with open(log, "ab") as f:
        f.truncate(1 << 30)
        f.write(b"\ntraining 1\ntraining 2\rtraining 3\nfinal\n")
    text, peak = peak_memory(lambda: e.get_log_tail(2))
    assert text == "training 2\rtraining 3\nfinal\n"
    assert peak < 32 << 20, peak
    lines, peak = peak_memory(lambda: exp.tail_lines(log, 3))
    assert lines == ["training 1", "training 3", "final"]
    assert peak < 32 << 20, peak


@posix_only
def test_tail_of_a_fifo_or_a_missing_file_is_empty(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    assert call_with_timeout(lambda: exp.read_tail(fifo, 5), 10, "read_tail of a FIFO") == b""
    assert call_with_timeout(lambda: exp.tail_lines(fifo, 5), 10, "tail_lines of a FIFO") == []
    missing = str(tmp_path / "missing.log")
    assert exp.read_tail(missing, 5) == b""
    assert exp.tail_lines(missing, 5) == []
    assert exp.read_tail(str(tmp_path), 5) == b""  # a directory


# ----------------------------------------------------------------------------
# Files: write_atomic, append_line, read_json_file
# ----------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@posix_only
def test_write_atomic_replaces_content_with_mode_0644(tmp_path, umask_022):
    path = tmp_path / "file.json"
    st = exp.write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert st.st_size == 5
    os.chmod(path, 0o600)
    exp.write_atomic(str(path), b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    exp.write_atomic(path, b"", sync=False)
    assert path.read_bytes() == b""
    assert os.listdir(tmp_path) == ["file.json"]


@posix_only
def test_write_atomic_locked_holds_the_new_files_lock_from_before_it_appears(tmp_path):
    """The lock is taken before the rename: a writer that opens the path at once
    waits for the caller, and the caller's descriptor is the file it wrote."""
    import fcntl

    path = tmp_path / "m.csv"
    path.write_bytes(b"old\n")
    fd = exp.write_atomic_locked(path, b"new\n")
    got = []

    def other_writer():
        with open(path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            got.append(path.read_bytes())
            f.write(b"theirs\n")

    t = threading.Thread(target=other_writer)
    try:
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        t.start()
        t.join(0.5)
        assert t.is_alive(), "another writer got the lock the caller holds"
        os.write(fd, b"mine\n")  # O_APPEND
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    t.join(10)
    assert got == [b"new\nmine\n"]
    assert path.read_bytes() == b"new\nmine\ntheirs\n"
    assert os.listdir(tmp_path) == ["m.csv"]


def test_write_atomic_locked_without_flock_returns_the_new_file_open(tmp_path, monkeypatch):
    """Where there is no flock (Windows, which cannot rename an open file either),
    the new file is reopened after the rename."""
    monkeypatch.setattr(exp, "fcntl", None)
    path = tmp_path / "m.csv"
    path.write_bytes(b"old\n")
    fd = exp.write_atomic_locked(path, b"new\n")
    try:
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        os.write(fd, b"more\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new\nmore\n"
    assert os.listdir(tmp_path) == ["m.csv"]


def test_write_atomic_into_a_missing_directory_raises_storage_error(tmp_path):
    path = tmp_path / "missing" / "file.json"
    with pytest.raises(exp.StorageError) as info:
        exp.write_atomic(path, b"data")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, exp.ExpError) and isinstance(info.value, OSError)
    assert str(path) in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_write_atomic_removes_its_temp_file_on_any_error(tmp_path):
    path = tmp_path / "file.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        exp.write_atomic(path, "text, not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.json"]


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs mounted for the test (we are root here and in CI), unmounted after.

    (The full-disk cases of metadata, state, metrics and batches are in test_durability.py.)
    """
    with tmpfs(tmp_path / "small_fs", "256k") as mnt:
        yield mnt


def fill(directory) -> None:
    """Write a filler file until the file system is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def test_append_line_on_a_full_disk_is_all_or_nothing(small_fs):
    path = small_fs / "run_0001.log"
    path.write_bytes(b"a" * 4090)  # the next append crosses into a page the disk no longer has
    fill(small_fs)
    with pytest.raises(exp.StorageError) as info:
        exp.append_line(str(path), "[exp] " + "y" * 200)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"a" * 4090
    assert fds_under(small_fs) == []


@posix_only
def test_read_json_file_refuses_a_fifo_without_hanging(tmp_path):
    fifo = tmp_path / "metadata.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        call_with_timeout(lambda: exp.read_json_file(str(fifo)), 10, "read_json_file of a FIFO")
    with pytest.raises(exp.MetadataError):
        call_with_timeout(lambda: exp.ExperimentDir(tmp_path).read_metadata(), 10, "read_metadata of a FIFO")


@posix_only
def test_public_readers_refuse_what_is_not_a_file_with_an_exp_error(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(exp.StorageError, match="not a regular file") as info:
            call_with_timeout(lambda: exp.read_metrics(target), 10, "read_metrics")
        assert isinstance(info.value, OSError) and str(target) in str(info.value)
        for reader in (exp.read_json, exp.read_json_file):
            with pytest.raises(exp.MetadataError, match="not a regular file") as info:
                call_with_timeout(lambda: reader(str(target)), 10, reader.__name__)
            assert isinstance(info.value, ValueError)  # as before: callers catching ValueError still do
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(exp.MetadataError, match="bad.json cannot be read"):
        exp.read_json(tmp_path / "bad.json")
    assert exp.read_metrics(tmp_path / "missing.csv") == []
    with pytest.raises(FileNotFoundError):
        exp.read_json(tmp_path / "missing.json")


def test_read_json_file_refuses_what_exp_did_not_write(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"a": 1}')
    assert exp.read_json_file(str(path)) == {"a": 1}
    with pytest.raises(ValueError, match="more than"):
        exp.read_json_file(str(path), max_bytes=4)
    path.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ValueError, match="UTF-8"):
        exp.read_json_file(str(path))
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError):
        exp.read_json_file(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError):
        exp.read_json_file(str(path))
    with pytest.raises(FileNotFoundError):
        exp.read_json_file(str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------
# Backend: LocalBackend, Launch, LocalRun
# ----------------------------------------------------------------------------

WAIT_FOR_GO = """
    import os, sys, time
    print("hello from the child", flush=True)
    print("and from stderr", file=sys.stderr, flush=True)
    deadline = time.time() + 60
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:
        time.sleep(0.01)
"""


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "run_0001.log"
    path.write_text("[exp] header line\n")
    return path


@posix_only
def test_local_backend_starts_a_group_leader_appending_to_its_log(tmp_path, log_file):
    script = write_script(tmp_path, "go.py", WAIT_FOR_GO)
    go = tmp_path / "go"
    launch = exp.Launch(py_cmd(script, go), str(tmp_path), bytes_env(), str(log_file), name="t")
    run = exp.LocalBackend().start(launch)
    try:
        assert run.pid == run.pgid == os.getpgid(run.pid)
        assert os.getsid(run.pid) == run.pid  # a session of its own
        assert run.poll() is None
        assert not run.exited_within(0.01)
        wait_for(lambda: b"and from stderr" in log_file.read_bytes(), what="the child's output")
        go.touch()
        assert run.wait(30) == 0
        assert run.poll() == 0
    finally:
        if run.poll() is None:
            run.terminate(grace=0)
            run.wait(10)
    text = log_file.read_text()
    assert text.startswith("[exp] header line\nhello from the child\n")
    assert "and from stderr\n" in text


@posix_only
def test_local_run_terminate_stops_the_group(tmp_path, log_file, kill_groups_later):
    launch = exp.Launch(py_cmd(write_script(tmp_path, "go.py", WAIT_FOR_GO), tmp_path / "never"), str(tmp_path),
                        bytes_env(), str(log_file))
    run = exp.LocalBackend().start(launch)
    kill_groups_later.append(run.pgid)
    wait_for(lambda: b"hello" in log_file.read_bytes(), what="the child to start")
    run.terminate(grace=10)
    assert not exp.group_alive(run.pgid)
    assert run.wait(10) != 0


@linux_only
def test_a_record_can_be_attached_to_in_the_same_process(tmp_path, log_file, kill_groups_later):
    launch = exp.Launch(py_cmd(write_script(tmp_path, "go.py", WAIT_FOR_GO), tmp_path / "go"), str(tmp_path),
                        bytes_env(), str(log_file))
    run = exp.LocalBackend().start(launch)
    kill_groups_later.append(run.pgid)
    try:
        record = run.record()
        json.dumps(record)  # it goes into a file
        assert record["backend"] == "local" and record["pid"] == run.pid and record["pgid"] == run.pgid
        attached = exp.LocalBackend().attach(record)
        assert attached.proc is None and attached.pid == run.pid and attached.pgid == run.pgid
        assert attached.poll() is None
        assert not attached.exited_within(0.01)
        (tmp_path / "go").touch()
        wait_for(lambda: attached.poll() is not None, what="the attached run to end")
        assert attached.poll() == exp.EXIT_UNKNOWN
        assert attached.wait(5) == exp.EXIT_UNKNOWN
    finally:
        if run.poll() is None:
            run.terminate(grace=0)
    assert run.wait(10) == 0  # the starter still gets the real exit code


@linux_only
def test_attach_tells_a_reused_pid_apart(tmp_path, log_file, kill_groups_later):
    launch = exp.Launch(py_cmd(write_script(tmp_path, "go.py", WAIT_FOR_GO), tmp_path / "go"), str(tmp_path),
                        bytes_env(), str(log_file))
    run = exp.LocalBackend().start(launch)
    kill_groups_later.append(run.pgid)
    try:
        record = run.record()
        assert isinstance(record["start_ticks"], int)
        # The same pid and group, but a process that started at another time: not our run.
        other = dict(record, start_ticks=record["start_ticks"] + 1)
        assert exp.LocalBackend().attach(other).poll() == exp.EXIT_UNKNOWN
        assert exp.LocalBackend().attach(record).poll() is None
    finally:
        run.terminate(grace=0)
        run.wait(10)


@posix_only
def test_attach_refuses_a_record_it_cannot_use():
    backend = exp.LocalBackend()
    with pytest.raises(exp.ExpError, match="not on this machine"):
        backend.attach({"backend": "local", "pid": os.getpid(), "pgid": os.getpid(), "host": "another-host.invalid"})
    for bad in ({"backend": "local", "host": None}, {"pid": None}, {"pid": 0}, {"pid": -3}, {"pid": "123"},
                {"pid": True}):
        with pytest.raises(exp.ExpError, match="without a pid"):
            backend.attach(bad)


@posix_only
def test_a_command_that_cannot_start_raises_exp_error_with_the_cause(tmp_path, log_file):
    missing = tmp_path / "no-such-dir"
    launch = exp.Launch("true", str(missing), bytes_env(), str(log_file))
    with pytest.raises(exp.ExpError) as info:
        exp.LocalBackend().start(launch)
    assert str(missing) in str(info.value)
    assert "FileNotFoundError" in str(info.value) or "No such file" in str(info.value)
    assert log_file.read_text() == "[exp] header line\n"
    # No log to append to: a StorageError (an ExpError too), nothing started.
    launch = exp.Launch("true", str(tmp_path), bytes_env(), str(tmp_path / "missing.log"))
    with pytest.raises(exp.StorageError):
        exp.LocalBackend().start(launch)


@posix_only
def test_local_backend_stop_many_runs(tmp_path, log_file, kill_groups_later):
    script = write_script(tmp_path, "go.py", WAIT_FOR_GO)
    backend = exp.LocalBackend()
    runs = []
    try:
        for i in range(3):
            log = tmp_path / f"run_{i}.log"
            log.write_bytes(b"")
            runs.append(backend.start(exp.Launch(py_cmd(script, tmp_path / "never"), str(tmp_path), bytes_env(),
                                                 str(log))))
            kill_groups_later.append(runs[-1].pgid)
        assert backend.stop(runs, grace=10) == []
        assert all(not exp.group_alive(r.pgid) for r in runs)
    finally:
        for r in runs:
            r.terminate(grace=0)
            r.wait(10)


# ----------------------------------------------------------------------------
# Experiment.start and RunHandle
# ----------------------------------------------------------------------------

READS_ITS_METADATA = """
    import json, os, sys
    work_dir = os.environ["EXPERIMENT_WORK_DIR"]
    with open(os.path.join(work_dir, "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(sys.argv[1], "w") as f:
        json.dump({"status": meta["status"], "current_run_id": meta["current_run_id"],
                   "runs": [[r["id"], r["status"]] for r in meta["runs"]],
                   "env_run": os.environ["EXPERIMENT_RUN_ID"], "repeat": os.environ["EXPERIMENT_REPEAT"]}, f)
"""


@posix_only
def test_metadata_says_running_before_the_command_runs(make_exp, tmp_path):
    script = write_script(tmp_path, "reads.py", READS_ITS_METADATA)
    seen = tmp_path / "seen.json"
    e = make_exp("reader", py_cmd(script, seen))
    for n in (1, 2):
        rid = f"run_{n:04d}"
        h = e.start()
        assert h.run_id == rid and h.pid > 0
        assert h.wait(60) == 0
        assert h.poll() == 0 and h.status == exp.FINISHED
        got = json.loads(seen.read_text())
        assert got["status"] == "running" and got["current_run_id"] == rid and got["env_run"] == rid
        assert got["runs"][-1] == [rid, "running"] and len(got["runs"]) == n
        assert got["repeat"] == "1"
        m = read_meta(e.work_dir)
        assert (m["status"], m["exit_code"], m["current_run_id"], m["pid"]) == ("finished", 0, rid, None)
        assert m["ended_at"] and m["started_at"]
        last = m["runs"][-1]
        assert (last["id"], last["status"], last["exit_code"]) == (rid, "finished", 0) and last["ended_at"]
        assert "return_code" not in m and "completed_at" not in m


SLEEPER = """
    import os, sys, time
    open(sys.argv[1], "w").close()
    time.sleep(60)
"""


@posix_only
def test_terminate_runs_records_every_run_killed(make_exp, tmp_path, kill_groups_later):
    script = write_script(tmp_path, "sleep.py", SLEEPER)
    handles = []
    try:
        for i in range(3):
            e = make_exp(f"victim{i}", py_cmd(script, tmp_path / f"ready{i}"))
            handles.append(e.start())
            kill_groups_later.append(handles[-1].pid)
        for i in range(3):
            wait_for((tmp_path / f"ready{i}").exists, what=f"victim{i} to run")
        assert exp.terminate_runs(handles, grace=10) == []
        for h in handles:
            h.wait(30)
            assert h.status == exp.KILLED
            m = read_meta(h.experiment.work_dir)
            assert m["status"] == "killed" and m["runs"][-1]["status"] == "killed" and m["pid"] is None
            assert "ended: killed" in h.experiment.get_log_tail(1)
    finally:
        for h in handles:
            if h.poll() is None:
                h.kill()


@posix_only
def test_poll_from_another_thread_while_the_background_watcher_waits(make_exp, tmp_path):
    go = tmp_path / "go"
    e = make_exp("polled", py_cmd(write_script(tmp_path, "go.py", WAIT_FOR_GO), go))
    h = e.run(background=True)
    seen: list = []
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            code = h.poll()
            seen.append(code)
            if code is not None:
                return
            stop.wait(0.005)

    t = threading.Thread(target=poller)
    t.start()
    try:
        wait_for(lambda: len(seen) >= 3, what="a few polls")
        assert h.poll() is None
        go.touch()
        t.join(60)
        assert not t.is_alive()
    finally:
        stop.set()
        go.touch()
        t.join(10)
    assert seen[0] is None and seen[-1] == 0 and set(seen) == {None, 0}
    assert h.wait(30) == 0
    m = read_meta(e.work_dir)
    assert m["status"] == "finished" and len(m["runs"]) == 1 and m["runs"][0]["exit_code"] == 0
    assert e.read_log().count("run_0001 ended:") == 1  # recorded once, by whichever got there first


# ----------------------------------------------------------------------------
# The shape of exp.py
# ----------------------------------------------------------------------------

EXP_SOURCE = open(EXP_PY, encoding="utf-8").read()


def test_all_is_complete_and_exists():
    public = set()
    for name, obj in vars(exp).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == "exp":
            public.add(name)
        elif name.isupper():
            public.add(name)
    public.discard("TYPE_CHECKING")  # mypy needs exactly that name
    assert sorted(public - set(exp.__all__)) == []
    assert [n for n in exp.__all__ if not hasattr(exp, n)] == []
    assert len(exp.__all__) == len(set(exp.__all__))


def test_every_error_exp_raises_on_purpose_is_an_exp_error():
    for cls in (exp.ConfigError, exp.NoExperimentContext, exp.UnsupportedPlatformError, exp.StorageError,
                exp.MetadataError):
        assert issubclass(cls, exp.ExpError)
    assert issubclass(exp.ConfigError, ValueError) and issubclass(exp.StorageError, OSError)
    e = exp.StorageError("could not write x: No space left on device", errno.ENOSPC)
    assert e.errno == errno.ENOSPC and str(e) == "could not write x: No space left on device"
    m = exp.MetadataError("bad", "/p/metadata.json", "/p/metadata.json.unreadable-1")
    assert (m.path, m.kept_at, str(m)) == ("/p/metadata.json", "/p/metadata.json.unreadable-1", "bad")


def test_module_docstring_shows_the_batch_path_and_the_state_file():
    doc = exp.__doc__
    for word in ("config.toml", "parse_config", "BatchConfig", "expand_jobs", "Scheduler", "plan_next",
                 "StateFile", ".exp_state/scheduler_state.json", "metadata.json", "terminal_logs/", "metrics/",
                 "LocalBackend", "scan(base)", "summary()"):
        assert word in doc, word


def test_layout_names_are_spelt_once():
    for literal in ('"terminal_logs"', '"metadata.json"', '"metrics"', '".exp_state"', '"scheduler_state.json"',
                    '"code.diff"'):
        definitions = re.findall(r"^[A-Z_]+ = " + re.escape(literal) + "$", EXP_SOURCE, re.M)
        assert len(definitions) == 1, literal
        others = [ln for ln in EXP_SOURCE.splitlines() if literal in ln and not re.match(r"^[A-Z_]+ = ", ln)]
        # Elsewhere only "metrics", and only as a key of the dashboard's JSON answers, never in a path.
        for line in others:
            assert literal == '"metrics"' and "join(" not in line and "/" not in line, line
    assert EXP_SOURCE.count("'metadata.json'") == 0 and EXP_SOURCE.count("'terminal_logs'") == 0
    # Joined paths spelt out elsewhere would bypass the constants.
    assert not re.search(r"""["'](?:terminal_logs|metrics)/""", EXP_SOURCE)


def test_scheduler_touches_no_private_members_of_other_objects():
    source = inspect.getsource(exp.Scheduler)
    assert re.findall(r"\b(?!self\b)\w+\._[a-z]\w*", source) == []
    assert "_start(" not in source and "_defer_write" not in source and "._killed" not in source


def readme_reference_tables() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index("| `[scheduler]` key")
    lines = []
    for line in readme[start:].splitlines():
        if line.startswith("|") or not line.strip():
            lines.append(line)
        else:
            break
    return "\n".join(lines).strip()


def test_readme_reference_tables_are_config_reference():
    # The README's tables are generated: paste exp.config_reference() there after changing a Field.
    assert readme_reference_tables() == exp.config_reference().strip()


def test_config_reference_lists_every_field():
    ref = exp.config_reference()
    for f in exp.SCHEDULER_FIELDS + exp.EXPERIMENT_FIELDS:
        assert f"| `{f.name}` |" in ref, f.name
    assert ref.count("| `lark_url` |") == 2


def test_run_help_lists_every_config_key():
    r = subprocess.run([sys.executable, EXP_PY, "run", "--help"], capture_output=True, text=True, env=child_env(),
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for f in exp.SCHEDULER_FIELDS:
        assert f"[scheduler] {f.name}:" in r.stdout, f.name
    for f in exp.EXPERIMENT_FIELDS:
        assert f"[[experiments]] {f.name}:" in r.stdout, f.name
    # Defaults as the README's tables and a TOML file write them, not as Python reprs.
    assert "(default false)" in r.stdout and '(default "./results")' in r.stdout and "(default 1)" in r.stdout
    assert "False" not in r.stdout and "'./results'" not in r.stdout and "(default 1.0)" not in r.stdout


# ----------------------------------------------------------------------------
# One spelling per field, and directories of the earlier project
# ----------------------------------------------------------------------------


def write_config(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@posix_only
def test_state_file_items_use_exit_code_and_ended_at(tmp_path):
    cfg = write_config(tmp_path / "c.toml", """
[scheduler]
base_experiment_dir = "results"

[[experiments]]
name = "ok"
command = "true"

[[experiments]]
name = "bad"
command = "exit 3"
""")
    assert exp.Scheduler(exp.load_config(cfg), out=io.StringIO()).run() == 1
    state_file = exp.StateFile(tmp_path / "results")
    raw = open(state_file.path, encoding="utf-8").read()
    for old in ("return_code", "completed_at", "returncode", "end_time"):
        assert old not in raw, old
    state = state_file.read()
    items = state["finished"] + state["errors"]
    assert [(j["name"], j["status"], j["exit_code"]) for j in items] == [("ok", "finished", 0), ("bad", "error", 3)]
    assert all(j["ended_at"] for j in items)
    assert state["summary"]["status_indicator"] == exp.SCHEDULER_STOPPED


def test_state_file_read_maps_older_names(tmp_path):
    state_file = exp.StateFile(tmp_path)
    state_file.write_text(json.dumps({
        "pending": [], "running": [],
        "finished": [{"name": "a", "return_code": 0, "completed_at": "2025-01-02T03:04:05"}],
        "errors": [{"name": "b", "returncode": 1, "end_time": "2025-01-02T03:04:06", "start_time": "x"}],
        "summary": {"status_indicator": "stopped"},
    }))
    state = state_file.read()
    assert state["finished"] == [{"name": "a", "exit_code": 0, "ended_at": "2025-01-02T03:04:05"}]
    assert state["errors"] == [{"name": "b", "exit_code": 1, "ended_at": "2025-01-02T03:04:06", "started_at": "x"}]
    assert exp.StateFile(tmp_path / "none").read() is None
    state_file.write_text("[1, 2]")
    with pytest.raises(exp.MetadataError):
        state_file.read()


def test_read_metadata_maps_older_names(tmp_path):
    d = tmp_path / "old_2025-01-02__03-04-05"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({
        "name": "old", "status": "error", "return_code": 2, "completed_at": "2025-01-02T04:00:00",
        "start_time": "2025-01-02T03:04:05"}))
    m = exp.ExperimentDir(d).read_metadata()
    assert (m["exit_code"], m["ended_at"], m["started_at"]) == (2, "2025-01-02T04:00:00", "2025-01-02T03:04:05")
    assert not {"return_code", "completed_at", "start_time"} & set(m)
    s = exp.ExperimentDir(d).summary()
    assert (s["exit_code"], s["ended_at"], s["status"]) == (2, "2025-01-02T04:00:00", "error")
    # Where both spellings are present, the current one wins.
    (d / "metadata.json").write_text(json.dumps({"exit_code": 1, "return_code": 2}))
    assert exp.ExperimentDir(d).read_metadata() == {"exit_code": 1}


@pytest.fixture
def earlier_project_dir(base_dir):
    """A directory as the earlier project left it: no runs, a timestamp, lark_config with a secret."""
    d = base_dir / "old_2025-01-02__03-04-05"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps({
        "name": "old", "command": "echo resumed", "status": "finished", "timestamp": "2025-01-02T03:04:05",
        "lark_config": {"app_id": "cli_x", "app_secret": "s3cr3t-value"},
    }), encoding="utf-8")
    return d


@posix_only
def test_an_earlier_project_directory_with_a_run_keeps_it_in_runs_when_resumed(base_dir):
    # The earlier project kept no `runs` list: its run_0001 files were there, but a resume listed
    # only the new run_0002 (exp ls said 1 run).
    d = write_exp(base_dir, "old_2025-01-02__03-04-05", {
        "name": "old", "command": "echo again", "status": "error", "return_code": 2,
        "start_time": "2025-01-02T03:04:05", "completed_at": "2025-01-02T04:00:00",
        "timestamp": "2025-01-02T03:04:05"}, logs={"run_0001": "first run\n"}, metrics={"run_0001": "step,loss\n1,0.5\n"})
    e = exp.Experiment("old", "echo again", base_dir=base_dir, resume="2025-01-02__03-04-05")
    assert e.run() == 0
    m = read_meta(d)
    assert [r["id"] for r in m["runs"]] == ["run_0001", "run_0002"]
    first = m["runs"][0]
    assert (first["status"], first["exit_code"], first["started_at"], first["ended_at"]) == (
        "error", 2, "2025-01-02T03:04:05", "2025-01-02T04:00:00")
    assert (m["status"], m["current_run_id"]) == ("finished", "run_0002")
    assert exp.ExperimentDir(d).summary()["runs"] == 2
    assert e.runs() == ["run_0001", "run_0002"]


def test_tail_log_and_last_metrics_default_to_the_current_run(base_dir):
    d, _ = exp.ExperimentDir.create(str(base_dir), "t")
    assert d.tail_log() == "" and d.last_metrics() == {}  # no run yet
    for rid, text, rows in (("run_0001", "one\n", "a\n1\n"), ("run_0002", "two\nlines\n", "a\n2\n")):
        Path(d.log_path(rid)).write_text(text)
        Path(d.metrics_path(rid)).write_text(rows)
    assert d.tail_log() == "two\nlines\n" and d.last_metrics() == {"a": 2}  # the newest, by its files
    d.write_metadata({"name": "t", "current_run_id": "run_0001"})
    assert d.tail_log() == "one\n" and d.tail_log(lines=1) == "one\n" and d.last_metrics() == {"a": 1}
    assert d.tail_log("run_0002", 1) == "lines\n"


@posix_only
def test_an_earlier_project_directory_can_be_resumed(earlier_project_dir, base_dir):
    e = exp.Experiment("old", "echo resumed", base_dir=base_dir, resume="2025-01-02__03-04-05",
                       env={"PYTHONPATH": ROOT})
    assert e.work_dir == str(earlier_project_dir)
    text = (earlier_project_dir / "metadata.json").read_text()
    assert "s3cr3t-value" not in text and "lark_config" not in text
    m = json.loads(text)
    assert m["created_at"] == "2025-01-02T03:04:05"
    assert m["status"] == "pending"
    for key in ("exit_code", "ended_at", "started_at", "runs", "hostname", "exp_version", "current_run_id", "cwd"):
        assert key in m, key
    assert m["runs"] == []
    h = e.start()
    assert h.run_id == "run_0001" and h.wait(60) == 0
    m = read_meta(earlier_project_dir)
    assert (m["status"], m["exit_code"], m["created_at"]) == ("finished", 0, "2025-01-02T03:04:05")
    assert [r["id"] for r in m["runs"]] == ["run_0001"]
    assert "resumed" in e.read_log()
    assert "s3cr3t" not in (earlier_project_dir / "metadata.json").read_text()
    s = exp.ExperimentDir(earlier_project_dir).summary()
    assert (s["name"], s["status"], s["created_at"], s["runs"]) == ("old", "finished", "2025-01-02T03:04:05", 1)
