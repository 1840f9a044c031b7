"""Never lose data silently: real faults, no mocks.

A full disk is a small tmpfs mounted by the test (skipped, with the reason,
where mounting is refused); corrupt metadata, forked writers, torn CSV files
and ``kill -9`` are made for real too.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import exp
from conftest import (call_with_timeout, child_env, fds_under, tmpfs, linux_only, posix_only, py_cmd, read_meta,
                      wait_for, write_script)

pytestmark = posix_only

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


# ---------------------------------------------------------------------------
# helpers


class Disk:
    """A mounted tmpfs that a test fills up and frees again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Fill the disk, then give back ``leave`` bytes (a multiple of the page size)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            block = b"\0" * (1 << 16)
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)
        if leave:
            os.truncate(self.filler, os.path.getsize(self.filler) - leave)
        assert self.free_bytes() == leave

    def free(self) -> None:
        try:
            os.unlink(self.filler)
        except FileNotFoundError:
            pass


@pytest.fixture
def disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk``, unmounted after the test."""
    with tmpfs(tmp_path / "disk", "2m") as root:
        yield Disk(root)


def tmp_files(root) -> list[str]:
    """Every ``*.tmp`` file under ``root``."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp"))


def csv_records(path) -> list[list[str]]:
    """Every record of a CSV file, checked well-formed: complete, all of the header's width."""
    text = Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count('"') % 2 == 0, f"torn end: {text[-200:]!r}"
    records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    assert records, "no header"
    widths = {len(r) for r in records}
    assert widths == {len(records[0])}, f"records of widths {widths} (header {records[0]})"
    return records


def dirs_of(base, name) -> list[Path]:
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(name + "_"))


def toml_config(path, scheduler: dict, experiments: list[dict]) -> Path:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    lines = ["[scheduler]"] + [f"{k} = {value(v)}" for k, v in scheduler.items()]
    for e in experiments:
        lines += ["", "[[experiments]]"] + [f"{k} = {value(v)}" for k, v in e.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def run_batch(cfg) -> tuple[int, str]:
    out = io.StringIO()
    code = exp.Scheduler(exp.load_config(str(cfg)), out=out).run()
    return code, out.getvalue()


# ---------------------------------------------------------------------------
# 1. a full disk


@linux_only
def test_save_row_on_a_full_disk_raises_and_never_leaves_half_a_row(disk, make_exp, tmp_path):
    # A training script run by exp saves rows, the disk fills up, the next
    # rows fail (append path: a cell larger than what is left of the file's
    # last page, so the write is cut short for real; rewrite path: a new
    # column) with a StorageError; space comes back and the kept row goes in.
    sig = tmp_path / "signals"
    sig.mkdir()
    script = write_script(tmp_path, "train.py", """
        import json, os, sys, time
        import exp

        sig = sys.argv[1]

        def say(name, obj=None):
            with open(os.path.join(sig, name + ".part"), "w") as f:
                json.dump(obj, f)
            os.rename(os.path.join(sig, name + ".part"), os.path.join(sig, name))

        def wait(name):
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(sig, name)):
                if time.monotonic() > deadline:
                    sys.exit(9)
                time.sleep(0.01)

        def attempt():
            try:
                e.save_row()
            except exp.StorageError as err:
                return [type(err).__name__, isinstance(err, OSError), isinstance(err, exp.ExpError),
                        err.errno, str(err)]
            return None

        e = exp.load_experiment()
        for i in range(1, 6):
            e.upd_row(step=i, loss=1.0 / i, note=f"row {i}")
            e.save_row()
        say("ready")
        wait("full")  # (nothing is printed: the log is on the full disk too)
        results = {}
        e.upd_row(step=6, loss=0.125, note="x" * 20000)
        results["append"] = attempt()
        results["append_again"] = attempt()  # the row stays pending
        e.upd_row(acc=0.5)  # a new column: the file would be rewritten
        results["rewrite"] = attempt()
        say("failed", results)
        wait("freed")
        e.save_row()  # the pending row, with its new column
        e.upd_row(step=7, loss=0.0625, note="after", acc=0.75)
        e.save_row()
    """)
    e = make_exp("fullcsv", py_cmd(script, sig), base_dir=disk.root / "results")
    handle = e.run(background=True)
    csv_path = Path(e.metrics_path)
    try:
        wait_for(lambda: (sig / "ready").exists(), timeout=60, what="the first rows")
        before = csv_path.read_bytes()
        assert len(before) % PAGE  # room left in the file's last page: the big row is cut short, for real
        disk.fill()
        (sig / "full").touch()
        wait_for(lambda: (sig / "failed").exists() or handle.poll() is not None, timeout=60,
                 what="the rows on a full disk")
        assert (sig / "failed").exists(), e.read_log()
        results = json.loads((sig / "failed").read_text())
        for case in ("append", "append_again", "rewrite"):
            got = results[case]
            assert got is not None, f"{case}: save_row() on a full disk did not raise"
            name, is_oserror, is_experror, code, message = got
            assert (name, is_oserror, is_experror, code) == ("StorageError", True, True, errno.ENOSPC), got
            assert str(csv_path) in message and NO_SPACE in message and "disk is full" in message, message
        # Nothing half-written: the file is exactly what it was, and no temp file was left.
        assert csv_path.read_bytes() == before
        assert len(csv_records(csv_path)) == 6
        assert tmp_files(disk.root) == []
        disk.free()
        (sig / "freed").touch()
        assert handle.wait(timeout=60) == 0, e.read_log()
    finally:
        disk.free()
        (sig / "full").touch()
        (sig / "freed").touch()
        handle.wait(timeout=60)
    records = csv_records(csv_path)
    assert records[0] == ["step", "loss", "note", "acc"]
    expected = [{"step": i, "loss": 1.0 / i, "note": f"row {i}", "acc": None} for i in range(1, 6)]
    expected += [{"step": 6, "loss": 0.125, "note": "x" * 20000, "acc": 0.5},
                 {"step": 7, "loss": 0.0625, "note": "after", "acc": 0.75}]
    assert e.metrics() == expected
    m = read_meta(e.work_dir)
    assert (m["status"], m["exit_code"]) == ("finished", 0)
    assert tmp_files(disk.root) == []


def test_a_metrics_writer_on_a_full_disk_takes_back_the_cut_row(disk):
    # The MetricsWriter itself, in this process: room for part of a row only.
    path = disk.root / "m.csv"
    w = exp.MetricsWriter(path)
    try:
        for i in range(3):
            w.write_row({"step": str(i), "text": "a"})
        before = path.read_bytes()
        assert len(before) % PAGE
        disk.fill()
        with pytest.raises(exp.StorageError) as ei:
            w.write_row({"step": "3", "text": "b" * (3 * PAGE)})  # the rest of the page, then ENOSPC
        assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
        assert path.read_bytes() == before
        with pytest.raises(exp.StorageError):
            w.write_row({"step": "3", "text": "b", "new": "column"})
        assert path.read_bytes() == before and tmp_files(disk.root) == []
        # A reader sees the rows as they were.
        assert exp.read_metrics(path) == [{"step": i, "text": "a"} for i in range(3)]
        disk.free()
        w.write_row({"step": "3", "text": "c"})
        w.write_row({"step": "4", "text": "d", "new": "column"})
    finally:
        w.close()
    assert [r["step"] for r in exp.read_metrics(path)] == [0, 1, 2, 3, 4]
    csv_records(path)


@pytest.mark.parametrize("leave", [0, PAGE], ids=["no-room", "room-for-part"])
def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_no_temp(disk, leave):
    target = disk.root / "data.json"
    old = b'{"old": true}\n'
    target.write_bytes(old)
    disk.fill(leave)
    for write in (lambda: exp.write_atomic(target, b"n" * (4 * PAGE)),
                  lambda: exp.write_json_atomic(target, {"new": "x" * (4 * PAGE)}),
                  lambda: exp.write_atomic_locked(target, b"n" * (4 * PAGE))):
        with pytest.raises(exp.StorageError) as ei:
            write()
        err = ei.value
        assert isinstance(err, OSError) and isinstance(err, exp.ExpError) and err.errno == errno.ENOSPC
        assert str(target) in str(err) and NO_SPACE in str(err), str(err)
        assert target.read_bytes() == old
        assert tmp_files(disk.root) == []
        assert disk.free_bytes() == leave  # the temp file's pages were given back
    disk.free()
    exp.write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n" and tmp_files(disk.root) == []


def test_metadata_and_state_on_a_full_disk_are_never_truncated(disk, make_exp):
    base = disk.root / "results"
    e = make_exp("full", "exit 0", base_dir=base)
    d = exp.ExperimentDir(e.work_dir)
    state = exp.StateFile(base)
    state.write_text(json.dumps({"pending": [], "summary": {"total": 0}}) + "\n")
    meta_before = Path(d.metadata_path).read_bytes()
    state_before = Path(state.path).read_bytes()
    disk.fill()

    def check_unchanged():
        assert Path(d.metadata_path).read_bytes() == meta_before
        assert Path(state.path).read_bytes() == state_before
        assert tmp_files(disk.root) == []

    with pytest.raises(exp.StorageError) as ei:
        d.write_metadata({"status": "x" * 10000})
    assert ei.value.errno == errno.ENOSPC and d.metadata_path in str(ei.value)
    check_unchanged()
    with pytest.raises(exp.StorageError):
        d.update_metadata(lambda m: m.update(note="more"))
    check_unchanged()
    with pytest.raises(exp.StorageError) as ei:
        state.write_text(json.dumps({"pending": [], "summary": {"total": 1}}) + "\n")
    assert state.path in str(ei.value) and NO_SPACE in str(ei.value)
    check_unchanged()
    # A run that cannot even make its log: an ExpError saying why, nothing else touched.
    with pytest.raises(exp.ExpError) as ei:
        e.start()
    assert NO_SPACE in str(ei.value), str(ei.value)
    check_unchanged()
    assert e.runs() == []  # no empty log left to stand for a run that never was
    # A new experiment: its directory can be made, its metadata cannot.
    with pytest.raises(exp.StorageError) as ei:
        make_exp("other", "exit 0", base_dir=base)
    assert NO_SPACE in str(ei.value)
    for other in dirs_of(base, "other"):
        assert not (other / "metadata.json").exists()
    check_unchanged()
    d.close()
    ei = None  # (the traceback holds the half-made Experiment, whose lock closes with it)
    assert fds_under(disk.root) == []
    disk.free()
    assert e.run(background=True).wait(timeout=60) == 0
    m = read_meta(e.work_dir)
    assert (m["status"], m["current_run_id"], [r["id"] for r in m["runs"]]) == ("finished", "run_0001", ["run_0001"])
    assert tmp_files(disk.root) == []


@linux_only
@pytest.mark.parametrize("state_on", ["normal-disk", "full-disk"])
def test_a_batch_run_that_cannot_make_its_log_is_an_error_with_the_reason(disk, tmp_path, state_on, capfd):
    # The batch's experiments go to a full tmpfs; the state file goes either to
    # the normal disk (so it can say why) or to the full tmpfs as well.
    state_base = tmp_path / "state" if state_on == "normal-disk" else disk.root / "results"
    cfg = toml_config(tmp_path / "c.toml", {"base_experiment_dir": state_base},
                      [{"name": "x", "command": "true", "base_dir": disk.root / "results"}])
    disk.fill()
    code, text = call_batch(cfg)
    assert code == 1, text
    assert "Traceback" not in text + capfd.readouterr().err, text
    assert "failed   x" in text and NO_SPACE in text, text
    assert "succeeded first time:    0" in text and "failed:                  1" in text, text
    if state_on == "full-disk":
        assert text.count("warning: cannot write the state file") == 1, text
        assert not (state_base / ".exp_state" / "scheduler_state.json").exists()
    else:
        s = json.loads((state_base / ".exp_state" / "scheduler_state.json").read_text())
        (job,) = s["errors"]
        assert job["status"] == "error" and NO_SPACE in job["error"], job
        assert s["summary"]["status_indicator"] == "stopped"
    for d in dirs_of(disk.root / "results", "x"):
        meta = d / "metadata.json"
        if meta.exists():  # written after all: then it says error
            m = json.loads(meta.read_text())
            assert m["status"] == "error" and NO_SPACE in m["error"], m
        assert list((d / "terminal_logs").iterdir()) == []
    assert tmp_files(disk.root) == []
    assert fds_under(disk.root) == []


def call_batch(cfg):
    return call_with_timeout(lambda: run_batch(cfg), 120, "the batch")


@linux_only
def test_batch_commands_that_fill_the_disk_leave_their_end_unrecorded_and_say_so(disk, tmp_path, capfd):
    # Three commands start (all of them: a barrier), then each fills the disk
    # with dd, so no end can be written: not the [exp] line, not metadata.json.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    q = shlex.quote

    def command(code: int) -> str:
        return (f'touch {q(str(barrier))}/"$EXPERIMENT_NAME-$EXPERIMENT_REPEAT"; i=0; '
                f'while [ "$(ls {q(str(barrier))} | wc -l)" -lt 3 ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; '
                f'dd if=/dev/zero of={q(str(disk.root))}/fill-$$ bs=65536 2>/dev/null; exit {code}')

    state_base = tmp_path / "state"
    cfg = toml_config(tmp_path / "c.toml", {"base_experiment_dir": state_base, "max_concurrent_experiments": 3}, [
        {"name": "ok", "command": command(0), "repeats": 2, "base_dir": disk.root / "results"},
        {"name": "bad", "command": command(3), "base_dir": disk.root / "results"},
    ])
    code, text = call_batch(cfg)
    assert disk.free_bytes() == 0
    assert code == 1, text  # every command ran, but no end is in metadata.json
    assert "Traceback" not in text + capfd.readouterr().err, text
    assert text.count("its end could not be recorded") == 3 + 3, text  # three event lines, three summary lines
    assert len([ln for ln in text.splitlines() if ln.startswith("[") and "finished ok" in ln
                and f"(its end could not be recorded: could not write" in ln and NO_SPACE in ln]) == 2, text
    assert any("failed   bad (exit code 3, its end could not be recorded: could not write" in ln and NO_SPACE in ln
               for ln in text.splitlines()), text
    assert "  succeeded, end not recorded: 2" in text, text
    assert "  failed:                  1" in text and "    bad: exit code 3, its end could not be recorded" in text
    # Each experiment on one line of the summary only: 0 + 0 + 1 + 2 = 3.
    assert "  succeeded first time:    0" in text and "  succeeded after retries: 0" in text, text
    s = json.loads((state_base / ".exp_state" / "scheduler_state.json").read_text())
    assert sorted((j["name"], j["status"], j["exit_code"]) for j in s["finished"] + s["errors"]) == [
        ("bad", "error", 3), ("ok", "finished", 0), ("ok", "finished", 0)]
    assert all(NO_SPACE in j["error"] for j in s["finished"] + s["errors"])
    dirs = dirs_of(disk.root / "results", "ok") + dirs_of(disk.root / "results", "bad")
    assert len(dirs) == 3
    for d in dirs:
        m = json.loads((d / "metadata.json").read_text())
        assert m["status"] == "running" and m["exit_code"] is None, m  # what was last written: the start
        assert [r["status"] for r in m["runs"]] == ["running"]
    assert tmp_files(disk.root) == []
    assert fds_under(disk.root) == []


# ---------------------------------------------------------------------------
# 2. corrupt metadata.json

BAD_METADATA = {
    "not-json": b"{this is not json",
    "truncated": b'{\n  "name": "x",\n  "status": "run',
    "empty": b"",
    "a-list": b'["not", "an", "object"]\n',
    "not-utf8": b'{"name": "\xff\xfe"}',
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.fixture(params=sorted(BAD_METADATA), ids=sorted(BAD_METADATA))
def corrupt(request, make_exp):
    """An experiment whose metadata.json holds garbage; returns (experiment, the garbage)."""
    e = make_exp("corrupt", "exit 0")
    bad = BAD_METADATA[request.param]
    Path(e.metadata_path).write_bytes(bad)
    return e, bad


def test_reading_corrupt_metadata_raises_metadata_error_naming_the_path(corrupt, base_dir):
    e, bad = corrupt
    path = e.metadata_path
    d = exp.ExperimentDir(e.work_dir)
    for read in (d.read_metadata, lambda: exp.Experiment.load(e.work_dir), e.read_metadata,
                 lambda: exp.Experiment("corrupt", "exit 0", base_dir=base_dir, resume=e.timestamp),
                 lambda: exp.Experiment("corrupt", "exit 0", base_dir=base_dir, resume=e.work_dir),
                 lambda: d.update_metadata(lambda m: m.update(x=1))):  # no initial: nothing written
        with pytest.raises(exp.MetadataError) as ei:
            read()
        assert ei.value.path == path and path in str(ei.value), str(ei.value)
        assert ei.value.kept_at is None
    meta, why = d.try_read_metadata()
    assert meta is None and path in why
    summary = d.summary()
    assert summary["status"] == "unreadable" and path in summary["error"]
    assert Path(path).read_bytes() == bad  # never rewritten by a reader
    assert [p.name for p in Path(e.work_dir).iterdir() if p.name.startswith("metadata")] == ["metadata.json"]


def test_update_metadata_keeps_a_corrupt_file_aside_and_says_where(corrupt):
    e, bad = corrupt
    d = exp.ExperimentDir(e.work_dir)
    with pytest.raises(exp.MetadataError) as ei:
        d.update_metadata(lambda m: m.update(note="written"), initial=lambda: {"name": "corrupt", "status": "pending"})
    err = ei.value
    assert err.path == e.metadata_path and err.kept_at is not None
    assert os.path.dirname(err.kept_at) == e.work_dir
    assert os.path.basename(err.kept_at).startswith("metadata.json.unreadable-")
    assert err.kept_at in str(err) and e.metadata_path in str(err), str(err)
    assert Path(err.kept_at).read_bytes() == bad  # byte for byte
    assert read_meta(e.work_dir) == {"name": "corrupt", "status": "pending", "note": "written"}
    assert tmp_files(e.work_dir) == []
    # A second bad file goes to a second place; the first is not overwritten.
    Path(e.metadata_path).write_bytes(b"again{")
    with pytest.raises(exp.MetadataError) as ei2:
        d.update_metadata(lambda m: None, initial=lambda: {"status": "pending"})
    assert ei2.value.kept_at != err.kept_at
    assert Path(ei2.value.kept_at).read_bytes() == b"again{" and Path(err.kept_at).read_bytes() == bad


def test_metadata_corrupted_during_a_run_is_kept_aside_and_the_end_still_recorded(make_exp, capfd):
    # The command itself overwrites metadata.json with garbage; the run's end
    # moves it aside, writes a valid file with the end, and warns.
    e = make_exp("midrun", """printf 'garbage{"' > "$EXPERIMENT_WORK_DIR/metadata.json"; exit 4""")
    handle = e.start()
    assert handle.wait(timeout=60) == 4
    kept = sorted(Path(e.work_dir).glob("metadata.json.unreadable-*"))
    assert len(kept) == 1, kept
    assert kept[0].read_bytes() == b'garbage{"'
    m = read_meta(e.work_dir)
    assert (m["status"], m["exit_code"], m["pid"]) == ("error", 4, None)
    assert m["ended_at"] and m["duration"] is not None and m["name"] == "midrun"
    err = capfd.readouterr().err
    assert "exp: warning:" in err and str(kept[0]) in err, err
    log = e.read_log("run_0001")
    assert f"{exp.LOG_MARK} warning:" in log and str(kept[0]) in log, log
    assert "run_0001 ended: exit code 4 (error)" in log
    assert tmp_files(e.work_dir) == []


def test_a_batch_run_whose_metadata_is_corrupted_keeps_the_old_file(tmp_path, capfd):
    cfg = toml_config(tmp_path / "c.toml", {"base_experiment_dir": tmp_path / "results"}, [
        {"name": "b", "command": """printf 'not json' > "$EXPERIMENT_WORK_DIR/metadata.json" """}])
    code, text = call_batch(cfg)
    assert code == 0 and "Traceback" not in text, text
    (d,) = dirs_of(tmp_path / "results", "b")
    (kept,) = d.glob("metadata.json.unreadable-*")
    assert kept.read_bytes() == b"not json"
    m = read_meta(d)
    assert (m["status"], m["exit_code"]) == ("finished", 0)
    assert str(kept) in capfd.readouterr().err
    assert str(kept) in (d / "terminal_logs" / "run_0001.log").read_text()


WRONG_TYPES = {
    "runs-an-object": {"runs": {"run_0001": {"status": "finished"}}},
    "runs-text": {"runs": "abc"},
    "name-a-number": {"name": 5},
    "tags-an-object": {"tags": {"a": 1}},
}


@pytest.mark.parametrize("change", sorted(WRONG_TYPES), ids=sorted(WRONG_TYPES))
def test_metadata_with_a_wrong_typed_field_is_kept_aside_not_silently_rewritten(make_exp, capfd, change):
    # It parses, so it was once updated in place, and whatever the wrong field held (the run
    # history) was dropped without a word.  `ls` calls such a file unreadable: so does a write.
    e = make_exp("typed", "exit 0")
    assert e.run() == 0
    meta = read_meta(e.work_dir)
    meta.update(WRONG_TYPES[change])
    bad = json.dumps(meta, indent=2).encode()
    Path(e.metadata_path).write_bytes(bad)
    d = exp.ExperimentDir(e.work_dir)
    with pytest.raises(exp.MetadataError):  # no initial: nothing is written
        d.update_metadata(lambda m: m.update(x=1))
    assert Path(e.metadata_path).read_bytes() == bad
    again = exp.Experiment.load(e.work_dir)  # a resume reads it leniently ...
    assert again.run() == 0
    kept = sorted(Path(e.work_dir).glob("metadata.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bad  # ... and its first write keeps it aside
    assert str(kept[0]) in capfd.readouterr().err
    m = read_meta(e.work_dir)
    assert (m["status"], m["current_run_id"]) == ("finished", "run_0002")
    assert exp.ExperimentDir(e.work_dir).summary()["status"] == "finished"


def test_metadata_with_nan_is_written_back_strict(make_exp):
    # An earlier version wrote NaN for a NaN param; `ls` rejects such a file (not strict JSON).
    # The next write keeps every field and writes the non-finite ones as strings.
    e = make_exp("nonfinite", "exit 0", params={"lr": float("nan"), "clip": float("inf"), "wd": 0.5})
    assert e.run() == 0
    text = Path(e.metadata_path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_meta(e.work_dir)["params"] == {"lr": "nan", "clip": "inf", "wd": 0.5}
    Path(e.metadata_path).write_text(text.replace('"nan"', "NaN"))
    assert exp.ExperimentDir(e.work_dir).summary()["status"] == "unreadable"
    assert exp.Experiment.load(e.work_dir).run() == 0
    m = read_meta(e.work_dir)
    assert m["params"] == {"lr": "nan", "clip": "inf", "wd": 0.5} and len(m["runs"]) == 2
    assert exp.ExperimentDir(e.work_dir).summary()["status"] == "finished"
    assert list(Path(e.work_dir).glob("metadata.json.unreadable-*")) == []


# ---------------------------------------------------------------------------
# 3. forked writers


def test_an_experiment_passed_to_spawned_workers_writes_their_rows(run_py):
    # A Dataset holding the experiment, in DataLoader workers started with spawn (the macOS
    # default): the experiment is pickled, which its locks and open writer once made fail.
    r = run_py("""
import multiprocessing as mp, os, pickle, tempfile, exp

def work(e, k):
    for i in range(5):
        e.upd_row(step=i, worker=k)
        e.save_row()

if __name__ == "__main__":
    os.chdir(tempfile.mkdtemp())
    e = exp.load_experiment(standalone=True)
    e.upd_row(step=-1, worker=-1)
    e.save_row()
    e.upd_row(unsaved=1)  # the parent's pending values stay the parent's
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=work, args=(e, k)) for k in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    rows = e.metrics()
    print(len(rows), sorted({r["worker"] for r in rows}), [p.exitcode for p in ps], "unsaved" in rows[-1])
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "16 [-1, 0, 1, 2] [0, 0, 0] False", r.stdout + r.stderr


def test_rows_from_forked_workers_are_all_kept(make_exp, tmp_path):
    # The parent saves rows, then forks (os.fork and multiprocessing's
    # 'fork'); every process saves rows through the inherited Experiment at
    # the same time, each adding a column somewhere (a rewrite of the file
    # under everyone's appends).
    n = 150
    script = write_script(tmp_path, "forks.py", """
        import multiprocessing, os, sys, traceback
        import exp

        n = int(sys.argv[1])
        e = exp.load_experiment()
        for i in range(20):
            e.upd_row(writer="parent", i=i, text=f"p{i}")
            e.save_row()

        def work(name, start, count, new_at):
            for i in range(start, start + count):
                e.upd_row(writer=name, i=i, text=f'{name} "{i}",\\nline')
                if i == new_at:
                    e.upd_row(**{"x_" + name: i})
                e.save_row()

        pids = []
        for k in range(3):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    work(f"fork{k}", 0, n, n * (k + 1) // 8)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=work, args=(f"mp{k}", 0, n, n * (k + 4) // 8)) for k in range(2)]
        for p in procs:
            p.start()
        work("parent", 20, n, 20 + n * 6 // 8)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        for p in procs:
            p.join()
        codes += [p.exitcode for p in procs]
        print("child exit codes", codes)
        sys.exit(1 if any(codes) else 0)
    """)
    e = make_exp("forks", py_cmd(script, n))
    handle = e.start()
    try:
        assert handle.wait(timeout=60) == 0, e.read_log()
    finally:
        if handle.poll() is None:  # hung (a lock never released): fail, do not hang
            handle.kill()
    records = csv_records(e.metrics_file(1))
    writers = ["fork0", "fork1", "fork2", "mp0", "mp1", "parent"]
    assert records[0][:3] == ["writer", "i", "text"] and sorted(records[0][3:]) == ["x_" + w for w in writers]
    rows = e.metrics(1)
    assert len(rows) == len(records) - 1
    by_writer: dict[str, list[int]] = {}
    for r in rows:
        by_writer.setdefault(r["writer"], []).append(r["i"])
        if r["writer"] != "parent" or r["i"] >= 20:
            assert r["text"] == f'{r["writer"]} "{r["i"]}",\nline', r
    expected = {"parent": list(range(20 + n)), **{f"fork{k}": list(range(n)) for k in range(3)},
                **{f"mp{k}": list(range(n)) for k in range(2)}}
    assert by_writer == expected  # nothing lost, nothing twice, each writer's rows in its order
    new_at = {"fork0": n // 8, "fork1": n * 2 // 8, "fork2": n * 3 // 8, "mp0": n * 4 // 8, "mp1": n * 5 // 8,
              "parent": 20 + n * 6 // 8}
    for w in writers:
        assert [(r["writer"], r["i"]) for r in rows if r["x_" + w] is not None] == [(w, new_at[w])]


def test_a_rewrite_seen_by_the_parent_while_a_worker_holds_its_file_releases_the_lock(make_exp, tmp_path):
    # A DataLoader-like worker inherits the parent's open metrics file and
    # keeps it open without writing.  Another worker rewrites the file (a new
    # column); the parent's next row follows the new file, and must unlock
    # the old one first: closing a descriptor that a child shares does not
    # release its flock, and a third worker still on the old file would wait
    # for it forever.
    script = write_script(tmp_path, "holder.py", """
        import os, sys, time
        import exp

        e = exp.load_experiment()

        def row(**kw):
            e.upd_row(**kw)
            e.save_row()

        def child(body):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                code = 0
                try:
                    body(r)
                except BaseException:
                    import traceback
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            os.close(r)
            return pid, w

        def wait_signal(r):
            os.read(r, 1)

        for i in range(5):
            row(who="parent", i=i)
        holder, go_holder = child(wait_signal)  # holds the parent's file open, writes nothing
        def late(r):
            row(who="late", i=0)  # opens the file as it is now
            wait_signal(r)
            row(who="late", i=1)  # after the rewrite: must not wait forever
        late_pid, go_late = child(late)
        time.sleep(0.2)
        rewriter, _ = child(lambda r: row(who="rewriter", i=0, new=1))
        assert os.waitstatus_to_exitcode(os.waitpid(rewriter, 0)[1]) == 0
        row(who="parent", i=5)  # follows the rewritten file
        os.write(go_late, b"x")
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(late_pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                print("DEADLOCK: the late worker is still waiting for the lock")
                os.kill(late_pid, 9)
                os.kill(holder, 9)
                sys.exit(2)
            time.sleep(0.02)
        os.write(go_holder, b"x")
        os.waitpid(holder, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    e = make_exp("holder", py_cmd(script))
    handle = e.start()
    try:
        assert handle.wait(timeout=60) == 0, e.read_log()
    finally:
        if handle.poll() is None:
            handle.kill()
    rows = e.metrics(1)
    assert sorted((r["who"], r["i"]) for r in rows) == sorted(
        [("parent", i) for i in range(6)] + [("late", 0), ("late", 1), ("rewriter", 0)])
    csv_records(e.metrics_file(1))


# ---------------------------------------------------------------------------
# 4. the CSV: big cells, torn ends

BIG_PLAIN = "a" * (1 << 20)
BIG_TRICKY = ('he said "hi", then\n' * 60000)[: 1 << 20] + "\r\nend"  # > 128 KiB, quotes, commas, many lines


def test_string_cells_larger_than_the_csv_default_limit_read_back(make_exp, run_py):
    e = make_exp("bigcells", "exit 0")
    path = e.metrics_file(1)
    rows = [{"step": 1, "text": "small"}, {"step": 2, "text": BIG_PLAIN}, {"step": 3, "text": BIG_TRICKY}]
    with exp.MetricsWriter(path) as w:
        for r in rows:
            w.write_row({k: exp.format_metric(k, v) for k, v in r.items()})
    assert exp.read_metrics(path) == rows
    assert e.metrics(1) == rows
    assert exp.last_metrics_row(path) == rows[-1]
    assert exp.metric_column(path, "text") == [r["text"] for r in rows]
    # The last row holds the plain big cell: the tail reader finds it too.
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": "4", "text": BIG_PLAIN, "more": "1"})  # a new column: the big cells are rewritten
    rows = [dict(r, more=None) for r in rows] + [{"step": 4, "text": BIG_PLAIN, "more": 1}]
    assert exp.read_metrics(path) == rows
    assert exp.last_metrics_row(path) == rows[-1]
    assert exp.ExperimentDir(e.work_dir).last_metrics("run_0001") == rows[-1]
    # In a fresh interpreter (the csv module's field limit starts at 128 KiB there).
    r = run_py("""
        import json, sys
        import exp
        print(json.dumps([exp.read_metrics(sys.argv[1]), exp.last_metrics_row(sys.argv[1])]))
    """, path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [rows, rows[-1]]


GOOD_ROWS = [{"step": 1, "loss": 0.5, "text": "plain"},
             {"step": 2, "loss": 0.25, "text": 'multi\nline "quoted", cell'},
             {"step": 3, "loss": 0.125, "text": "x"}]

TORN_TAILS = {
    "short": b"4,0.0625,par",
    "200KiB": b"4,0.0625," + b"y" * (200 << 10),
    "in-quoted-cell": b'4,0.0625,"line one\nline two\nli',
    "after-a-line-break-in-a-cell": b'4,0.0625,"line one\nline ""two""\n',
    "after-many-lines-in-a-cell": b'4,0.0625,"' + b"z\n" * 300,
    "a-quote-alone": b'4,0.0625,"',
    "200KiB-in-a-quoted-cell": b'4,0.0625,"' + b'q""\n' * (50 << 10),
    # Cut after a line break inside a cell whose last line, alone, reads as a whole row of the
    # header's width with an even number of quotes (a payload of `"y",0,` lines).
    "a-row-like-line-in-a-cell": b'4,0.0625,"x\n""y"",0,\n',
}


def write_good(path) -> bytes:
    with exp.MetricsWriter(path) as w:
        for r in GOOD_ROWS:
            w.write_row({k: exp.format_metric(k, v) for k, v in r.items()})
    return Path(path).read_bytes()


@pytest.mark.parametrize("tail", sorted(TORN_TAILS), ids=sorted(TORN_TAILS))
def test_a_torn_last_record_is_skipped_by_readers_and_cut_by_the_next_writer(tmp_path, tail):
    path = tmp_path / "m.csv"
    good = write_good(path)
    with open(path, "ab") as f:
        f.write(TORN_TAILS[tail])
    assert exp.read_metrics(path) == GOOD_ROWS  # only the torn record is skipped
    assert exp.last_metrics_row(str(path)) == GOOD_ROWS[-1]
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": "5", "loss": "0.03125", "text": "next"})
    assert path.read_bytes() == good + b"5,0.03125,next\n"
    with exp.MetricsWriter(path) as w:  # and the one after that
        w.write_row({"step": "6", "loss": "0.015625", "text": "new column", "acc": "1"})
    rows = exp.read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 5, 6]
    assert rows[:3] == [dict(r, acc=None) for r in GOOD_ROWS]
    assert len(csv_records(path)) == 6


@pytest.mark.parametrize("tail", ["short", "200KiB", "in-quoted-cell", "a-quote-alone", "a-row-like-line-in-a-cell"])
def test_a_writer_already_open_cuts_a_tail_torn_by_another(tmp_path, tail):
    path = tmp_path / "m.csv"
    w = exp.MetricsWriter(path)
    try:
        for r in GOOD_ROWS:
            w.write_row({k: exp.format_metric(k, v) for k, v in r.items()})
        good = path.read_bytes()
        with open(path, "ab") as f:  # another writer, killed mid-row
            f.write(TORN_TAILS[tail])
        w.write_row({"step": "5", "loss": "0.03125", "text": "next"})
    finally:
        w.close()
    assert path.read_bytes() == good + b"5,0.03125,next\n"


def test_last_metrics_row_agrees_with_read_metrics_on_odd_cells(tmp_path):
    rng = random.Random(7)
    pieces = ["a", "b", ",", '"', '""', "\n", "\r\n", " ", "é"]
    for trial in range(150):
        path = tmp_path / f"m{trial}.csv"
        with exp.MetricsWriter(path) as w:
            for step in range(rng.randint(1, 5)):
                n = rng.choice([0, 1, 5, 40, 600])
                w.write_row({"step": str(step), "text": "".join(rng.choice(pieces) for _ in range(n))})
        rows = exp.read_metrics(path)
        assert exp.last_metrics_row(str(path)) == rows[-1], (trial, path.read_text())
        csv_records(path)


def test_last_metrics_values_agrees_with_read_metrics_on_odd_and_sparse_cells(tmp_path):
    """Each column's last non-empty value, as a whole read of the file gives it: multi-line quoted cells,
    columns added later (the file rewritten), columns empty in the last rows or in all, torn tails."""
    rng = random.Random(11)
    pieces = ["a", "b", ",", '"', '""', "\n", "\r\n", " ", "é"]
    for trial in range(200):
        path = tmp_path / f"m{trial}.csv"
        with exp.MetricsWriter(path) as w:
            for step in range(rng.choice([1, 3, 20, 300])):
                row = {"step": str(step)}
                if rng.random() < 0.3:
                    row["text"] = "".join(rng.choice(pieces) for _ in range(rng.choice([0, 1, 5, 40])))
                if step % rng.choice([7, 50, 1000]) == 0:
                    row["sparse"] = str(step * 0.5)
                w.write_row(row)
        if rng.random() < 0.3:  # a writer killed mid-row, inside a quoted cell or not
            with open(path, "a", encoding="utf-8", newline="") as f:
                # The last two: torn inside a cell whose lines look like rows of 2, 3 and 4 cells.
                f.write(rng.choice(['9,"half\nof a cell', "9,1.5", '9,"x""', '9,"half\n8,0.5\n7,0.25,x\n6,1,2,3\n',
                                    '9,"half\n8,0.5\n7,0.25,x\n6,1,2,3']))
        rows = exp.read_metrics(path)
        expected: dict = {}
        for r in reversed(rows):
            for k, v in r.items():
                if v is not None and k not in expected:
                    expected[k] = v
        header = list(rows[0]) if rows else []
        assert exp.last_metrics_values(str(path)) == {k: expected[k] for k in header if k in expected}, (
            trial, path.read_text()[-500:])


def test_last_values_are_not_taken_from_inside_a_cell_torn_at_the_end(tmp_path):
    path = tmp_path / "torn.csv"
    path.write_text('step,loss,s\n0,1.0,x\n1,0.5,"multi\n9,0.001,fake\n8,0.002,fake2\n7,0.3,')
    assert exp.read_metrics(str(path)) == [{"step": 0, "loss": 1.0, "s": "x"}]
    assert exp.last_metrics_values(str(path)) == {"step": 0, "loss": 1.0, "s": "x"}
    assert exp.last_metrics_row(str(path)) == {"step": 0, "loss": 1.0, "s": "x"}


def test_a_value_logged_before_a_cell_of_many_lines_is_found(tmp_path):
    # The look-back is bounded in rows; a cell of 20,000 lines is one row, not 20,000.
    path = tmp_path / "m.csv"
    with exp.MetricsWriter(path) as w:
        for step in range(300):
            w.write_row({"step": str(step), "loss": "0.5", "val_loss": "", "sample": ""})
        w.write_row({"step": "300", "loss": "0.4", "val_loss": "0.123", "sample": "line\n" * 20000})
        w.write_row({"step": "301", "loss": "0.3", "val_loss": "", "sample": ""})
    assert path.stat().st_size > 65536
    assert exp.last_metrics_values(str(path)) == {"step": 301, "loss": 0.3, "val_loss": 0.123,
                                                  "sample": "line\n" * 20000}


@pytest.mark.parametrize("columns", [3, 9000])
def test_last_metrics_row_reads_a_header_of_any_width_up_to_1_mib(tmp_path, columns):
    # 9,000 columns make a header over 64 KiB (read in a second, longer read).
    path = tmp_path / "wide.csv"
    row = {f"metric_{i:05d}": i for i in range(columns)}
    with exp.MetricsWriter(path) as w:
        w.write_row({k: str(v) for k, v in row.items()})
        w.write_row({k: str(v + 1) for k, v in row.items()})
    header = path.read_bytes().split(b"\n", 1)[0]
    assert (len(header) > 65536) == (columns > 3) and len(header) < 1 << 20
    assert exp.last_metrics_row(str(path)) == {k: v + 1 for k, v in row.items()}
    assert exp.last_metrics_row(str(tmp_path / "missing.csv")) == {}
    os.mkfifo(tmp_path / "fifo.csv")
    assert exp.last_metrics_row(str(tmp_path / "fifo.csv")) == {}  # answered at once, not blocked


def test_a_header_over_1_mib_is_refused_with_the_row_and_nothing_is_written(tmp_path):
    # 90,000 names make a header over 1 MiB, more than the readers look at: refused, clearly.
    path = tmp_path / "wide.csv"
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": 1, "loss": 0.5})
        before = path.read_bytes()
        with pytest.raises(exp.MetricError, match="over the 1,048,576-byte limit; the row is not saved"):
            w.write_row({f"metric_{i:05d}": i for i in range(90000)})
        assert path.read_bytes() == before
        w.write_row({"step": 2, "loss": 0.4})  # and the file goes on
    assert exp.read_metrics(str(path)) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert [p.name for p in tmp_path.iterdir()] == ["wide.csv"]


def test_save_row_of_a_header_over_1_mib_raises_and_does_not_keep_the_row(make_exp, tmp_path):
    script = write_script(tmp_path, "wide.py", """
        import exp
        e = exp.load_experiment()
        e.upd_row(step=1)
        e.save_row()
        e.upd_row(**{f"m{i:06d}": i for i in range(150000)})
        try:
            e.save_row()
        except exp.MetricError as err:
            print("refused:", err)
        e.upd_row(step=2)
        e.save_row()  # the refused values are not pending any more: this row goes through
    """)
    e = make_exp("wide", py_cmd(script))
    assert e.run() == 0
    assert "the row is not saved" in e.get_log_tail(50)
    assert e.metrics() == [{"step": 1}, {"step": 2}]


def test_a_writer_appends_rows_of_the_full_width_under_a_header_over_1_mib(tmp_path):
    # A file with a header over 1 MiB (an older exp, another tool): a writer reads all of it, so its
    # rows have the header's width and read back (it used to read 1 MiB of it and write narrower rows).
    path = tmp_path / "wide.csv"
    names = [f"metric_{i:05d}" for i in range(90000)]
    path.write_text(",".join(names) + "\n" + ",".join("1" for _ in names) + "\n", encoding="utf-8")
    with exp.MetricsWriter(path) as w:
        w.write_row({"metric_00000": 2, "metric_00001": 3})  # names near the start: an append
    rows = exp.read_metrics(str(path))
    assert len(rows) == 2 and rows[1]["metric_00000"] == 2 and rows[1]["metric_00001"] == 3
    assert rows[1]["metric_89999"] is None


# ---------------------------------------------------------------------------
# 5. kill -9 at random moments


@linux_only
def test_kill_9_at_random_moments_never_leaves_a_file_the_next_writer_cannot_use(make_exp, tmp_path):
    shared = tmp_path / "shared.csv"
    script = write_script(tmp_path, "writer.py", """
        import os, random, sys
        import exp

        path, seed = sys.argv[1], int(sys.argv[2])
        rng = random.Random(seed)
        d = exp.ExperimentDir(os.environ["EXPERIMENT_WORK_DIR"])
        w = exp.MetricsWriter(path)
        e = exp.load_experiment()
        i = 0
        while True:
            i += 1
            payload = exp.format_metric("p", f"{seed}:{i}" + ('"x",\\n' * rng.choice([0, 1, 50, 3000])))
            row = {"seed": str(seed), "i": str(i), "payload": payload}
            if i % 97 == 0:
                row[f"col{seed}_{i}"] = "1"  # now and then a rewrite
            w.write_row(row)
            e.upd_row(i=i, payload=payload)
            e.save_row()
            if i % 25 == 0:
                d.update_metadata(lambda m: m.update(progress=i))
    """)
    e = make_exp("kill9", "exit 0")
    rng = random.Random(12345)
    for rnd in range(6):
        e.command = "exec " + py_cmd(script, shared, rnd)
        handle = e.start()
        wait_for(lambda: exp.read_metrics(e.metrics_file(handle.run_id)), timeout=60, what="the first row")
        deadline = time.monotonic() + rng.uniform(0.0, 0.3)
        while time.monotonic() < deadline:  # metadata.json parses while the child rewrites it, too
            assert read_meta(e.work_dir)["current_run_id"] == handle.run_id
        os.killpg(handle.pid, signal.SIGKILL)  # the whole run: the writer and its supervisor
        assert handle.wait(timeout=60) == -signal.SIGKILL
        m = read_meta(e.work_dir)  # parses, every time
        assert (m["status"], m["exit_code"], m["current_run_id"]) == ("error", -9, handle.run_id)
        for path in (shared, Path(e.metrics_file(handle.run_id))):
            rows = exp.read_metrics(path)
            assert rows
            for r in rows:  # every row whole: its payload is what its writer made for it
                if r["payload"] == "marker":
                    continue
                seed = r["seed"] if path == shared else rnd
                assert r["payload"].startswith(f"{seed}:{r['i']}"), r["payload"][:50]
                assert r["payload"].count('"x",\n') in (0, 1, 50, 3000), r["payload"][:50]
                assert len(r["payload"]) == len(f"{seed}:{r['i']}") + 5 * r["payload"].count('"x",\n')
            with exp.MetricsWriter(path) as w:
                w.write_row({"seed": "-1", "i": str(rnd), "payload": "marker"} if path == shared
                            else {"i": "-1", "payload": "marker"})
            after = exp.read_metrics(path)
            assert after[:-1] == rows and after[-1]["payload"] == "marker"
            csv_records(path)
    markers = [r["i"] for r in exp.read_metrics(shared) if r["seed"] == -1]
    assert markers == list(range(6))


# ---------------------------------------------------------------------------
# 6. what a review found: a forked worker outliving its killed parent, text that UTF-8 cannot hold,
#    torn rows in the column readers, keeping a file aside on a read-only disk, temp files of
#    killed writers, and metadata updates on a file system with a coarse clock


FORK_OUTLIVES_PARENT = """
    import os, sys, time
    import exp

    e = exp.load_experiment(standalone=True)
    e.upd_row(step=0, who="parent", blob="")
    e.save_row()  # the CSV is open in the parent before the fork
    parent = os.getpid()
    if os.fork() == 0:  # a DataLoader-like worker
        while os.getppid() == parent:  # until the test has killed the parent
            time.sleep(0.01)
        for i in range(5):
            e.upd_row(step=i, who="child")
            e.save_row()
        open("child-done", "w").close()
        os._exit(0)
    print(e.metrics_file(), flush=True)
    big = "x" * 200_000  # long writes: the parent holds the file's lock most of the time
    i = 0
    while True:
        e.upd_row(step=i, who="parent", blob=big)
        e.save_row()
        i += 1
"""


@linux_only
def test_a_forked_worker_outliving_its_killed_parent_goes_on_writing(tmp_path):
    # The child inherited the parent's open CSV.  Had it kept that descriptor, the flock the
    # parent held when SIGKILL came would live on through it, and every writer of the file (the
    # child first) would wait for ever.
    script = write_script(tmp_path, "fork_outlives.py", FORK_OUTLIVES_PARENT)
    for rnd in range(4):
        cwd = tmp_path / f"round{rnd}"
        cwd.mkdir()
        p = subprocess.Popen([sys.executable, str(script)], cwd=cwd, stdout=subprocess.PIPE, text=True,
                             env=child_env(), start_new_session=True)
        try:
            csv_path = p.stdout.readline().strip()
            wait_for(lambda: os.path.getsize(csv_path) > 1_000_000, timeout=30, what="the parent's rows")
            p.kill()  # SIGKILL, most likely inside a write
            p.wait(timeout=30)
            done = cwd / "child-done"
            try:
                wait_for(done.exists, timeout=20, what="the orphaned child's five rows")
            finally:
                os.killpg(p.pid, signal.SIGKILL)  # the child, whatever happened
        finally:
            if p.poll() is None:
                p.kill()
            p.stdout.close()
        rows = exp.read_metrics(csv_path)
        assert [r["step"] for r in rows if r["who"] == "child"] == [0, 1, 2, 3, 4]


def test_text_that_utf8_cannot_hold_is_refused_at_upd_row_and_nothing_is_left_pending(run_py):
    r = run_py("""
        import exp
        e = exp.load_experiment(standalone=True)
        e.upd_row(step=1, name="ok")
        for bad in ({"text": "bad \\udc80 name"}, {"bad\\udcff": 1}):
            try:
                e.upd_row(step=2, **bad)
            except exp.ExpError as err:
                print(type(err).__name__, err)
        e.save_row()
        e.upd_row(step=3, name="after")
        e.save_row()
        print(e.metrics())
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("MetricError metric 'text': the string holds '\\udc80' at position 4, a lone surrogate")
    assert lines[1].startswith("ConfigError metric name 'bad\\udcff' holds '\\udcff' at position 3, a lone surrogate")
    # The refused calls added nothing, not even their valid values (step=2).
    assert lines[2] == "[{'step': 1, 'name': 'ok'}, {'step': 3, 'name': 'after'}]"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("tail", [b"3,0.12", b'3,"a cell\n4,0.001\n5,0.002\n'],
                         ids=["no line break", "inside a quoted cell"])
def test_the_column_readers_skip_a_torn_last_row(tmp_path, tail):
    # A writer killed in the middle of `3,0.1234\n` (or of a quoted cell holding lines that look
    # like rows) leaves a row that is no row: `ls --columns loss:min` and the dashboard's stats
    # must not count it, as read_metrics does not.
    path = tmp_path / "run_0001.csv"
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": 1, "loss": 0.9})
        w.write_row({"step": 2, "loss": 0.5})
    with open(path, "ab") as f:
        f.write(tail)
    assert [r["loss"] for r in exp.read_metrics(str(path))] == [0.9, 0.5]
    assert exp.metric_column(str(path), "loss") == [0.9, 0.5]
    assert exp.metric_column(str(path), "step") == [1, 2]
    stats = exp.metrics_stats(str(path))
    assert stats["loss"] == {"final": 0.5, "min": 0.5, "max": 0.9, "count": 2}
    assert stats["step"]["count"] == 2


@linux_only
def test_an_unreadable_metadata_file_on_a_read_only_disk_is_a_clear_error_and_stays(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with tmpfs(ro, "1m"):
        d = ro / "x_2025-01-01__00-00-00"
        (d / "terminal_logs").mkdir(parents=True)
        (d / "metadata.json").write_bytes(b'{"name": "x", "status": ')  # torn
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {r.stderr.strip()}")
        ed = exp.ExperimentDir(str(d))
        try:
            with pytest.raises(exp.MetadataError) as err:
                ed.update_metadata(lambda m: m.update(status="finished"), initial=lambda: {"name": "x"})
            assert "nor moved aside to write a new one (Read-only file system); nothing was written" in str(err.value)
            assert (d / "metadata.json").read_bytes() == b'{"name": "x", "status": '
            assert sorted(os.listdir(d)) == ["metadata.json", "terminal_logs"]
        finally:
            ed.close()  # the directory's lock descriptor, or the tmpfs could not be unmounted
            subprocess.run(["mount", "-o", "remount,rw", str(ro)], capture_output=True)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_temp_files_of_killed_metadata_and_state_writers_are_removed(make_exp, tmp_path):
    # kill -9 in the middle of write_atomic leaves `<file>.<pid>.<thread>.tmp`; the next run of the
    # experiment (metadata.json) and the next scheduler of the base directory (the state file)
    # remove those whose writer is gone, and keep one a live process is writing.
    e = make_exp("temps", "true")
    assert e.run() == 0
    dead, live = _dead_pid(), os.getpid()
    stale = Path(e.work_dir) / f"metadata.json.{dead}.140234.tmp"
    busy = Path(e.work_dir) / f"metadata.json.{live}.140234.tmp"
    stale.write_text("{half")
    busy.write_text("{half")
    assert e.run() == 0
    assert not stale.exists() and busy.exists()
    busy.unlink()

    base = tmp_path / "batch"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[scheduler]\nbase_experiment_dir = "{base}"\n[[experiments]]\nname = "a"\ncommand = "true"\n')
    state_dir = base / ".exp_state"
    state_dir.mkdir(parents=True)
    stale_state = state_dir / f"scheduler_state.json.{dead}.7.tmp"
    stale_state.write_text("{half")
    r = subprocess.run([sys.executable, str(Path(exp.__file__)), "run", str(cfg)], capture_output=True,
                       text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    assert not stale_state.exists()
    assert not [n for n in os.listdir(state_dir) if n.endswith(".tmp")]


def test_a_metric_named_self_is_logged(run_py):
    r = run_py("""
        import exp
        e = exp.load_experiment(standalone=True)
        e.upd_row(self=1, step=2)
        e.save_row()
        print(e.metrics())
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[{'self': 1, 'step': 2}]"


@linux_only
def test_metadata_updates_from_two_objects_lose_nothing_on_a_coarse_clock(tmp_path):
    # ext4 with 128-byte inodes keeps times to the second, and reuses a freed inode number at
    # once: a cache of metadata.json keyed by (inode, mtime, size) took another writer's file for
    # its own and wrote over that writer's update.
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 to make a file system with one-second timestamps")
    image, mnt = tmp_path / "coarse.img", tmp_path / "coarse"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    r = subprocess.run(["mkfs.ext4", "-q", "-I", "128", "-F", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a loop device was refused here: {r.stderr.strip()}")
    d = mnt / "x_2025-01-01__00-00-00"
    a, b = exp.ExperimentDir(str(d)), exp.ExperimentDir(str(d))
    try:
        d.mkdir()
        a.write_metadata({"name": "x", "a": 0, "b": 0})
        for i in range(1, 201):
            a.update_metadata(lambda m: m.update(a=i))
            b.update_metadata(lambda m: m.update(b=i))  # same size as the file it replaces
            b.update_metadata(lambda m: m.update(b=i))
            a.update_metadata(lambda m: m.update(a=i))
            meta = a.read_metadata()
            assert (meta["a"], meta["b"]) == (i, i), f"round {i}: b's update lost"
    finally:
        a.close()  # their lock descriptors, or the file system could not be unmounted
        b.close()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            pytest.fail(f"could not unmount {mnt}: something still holds a file there open")
