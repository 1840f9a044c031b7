"""Metrics: upd_row/save_row, the CSV format, concurrent writers, value types."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import threading

import pytest

import exp
from conftest import child_env, posix_only, py_cmd, read_meta, write_script


@pytest.fixture
def running_exp(make_exp):
    """An experiment with one finished run, so save_row() has a run to write to."""
    e = make_exp("metrics", "exit 0")
    assert e.run(background=True).wait(timeout=30) == 0
    assert e.current_run_id == "run_0001"
    return e


def text_of(e):
    with open(e.metrics_path, encoding="utf-8", newline="") as f:  # keep \r as written
        return f.read()


def records_of(text):
    return list(csv.reader(io.StringIO(text, newline="")))


class Scalar:
    """Stands in for a numpy/torch scalar: anything with .item()."""

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


class BadTensor:
    def item(self):
        raise ValueError("only one element tensors can be converted to Python scalars")


# ============================================================================
# Value formatting
# ============================================================================


@pytest.mark.parametrize(
    "value, text",
    [
        (1, "1"), (-3, "-3"), (10**20, "100000000000000000000"), (1.5, "1.5"), (0.1, "0.1"),
        (1e-07, "1e-07"), (-2.5e16, "-2.5e+16"), (float("nan"), "nan"), (float("inf"), "inf"),
        (float("-inf"), "-inf"), (True, "True"), (False, "False"), ("a,b", "a,b"), ("", ""),
        (None, ""), (Scalar(2.5), "2.5"), (Scalar(7), "7"), (Scalar(True), "True"),
        (Scalar(float("nan")), "nan"),
    ],
)
def test_format_metric(value, text):
    assert exp.format_metric("k", value) == text


@pytest.mark.parametrize(
    "value, message",
    [
        ([1], r"metric 'loss': cannot store a value of type list; use int, float, bool, str, None"),
        (object(), r"metric 'loss': cannot store a value of type object"),
        ({"a": 1}, r"metric 'loss': cannot store a value of type dict"),
        (Scalar([1, 2]), r"metric 'loss': cannot store a value of type list"),
        (BadTensor(), r"metric 'loss': BadTensor\.item\(\) failed \(only one element tensors .*\); "
                      r"pass a single number, e\.g\. loss\.mean\(\)\.item\(\)"),
        (Scalar(Scalar(1)), r"metric 'loss': \.item\(\) returned Scalar, not a number"),
    ],
)
def test_format_metric_rejects(value, message):
    with pytest.raises(TypeError, match=message):
        exp.format_metric("loss", value)


@pytest.mark.parametrize(
    "text, value",
    [("", None), ("1", 1), ("-3", -3), ("+4", "+4"), ("007", "007"), ("-01", "-01"), ("0", 0), ("0.5", 0.5), ("1.5", 1.5), ("-0.25", -0.25), ("1e-07", 1e-07),
     ("2.5e+16", 2.5e16), (".5", 0.5), ("inf", math.inf), ("-inf", -math.inf), ("True", True),
     ("False", False), ("abc", "abc"), ("1,5", "1,5"), ("1.2.3", "1.2.3"), ("true", "true")],
)
def test_parse_metric(text, value):
    got = exp.parse_metric(text)
    assert got == value and type(got) is type(value)


def test_parse_metric_nan():
    assert math.isnan(exp.parse_metric("nan"))


@pytest.mark.parametrize("value", [0.1, 1 / 3, -1e-300, 1.7976931348623157e308, 123456789.125, 2.0, -0.0])
def test_float_round_trip_is_exact(value):
    back = exp.parse_metric(exp.format_metric("k", value))
    assert back == value and type(back) is float and math.copysign(1, back) == math.copysign(1, value)


# ============================================================================
# upd_row / save_row and the CSV file
# ============================================================================


def test_columns_keep_first_seen_order(running_exp):
    e = running_exp
    e.upd_row(zeta=1, alpha=2)
    e.save_row()
    assert text_of(e) == "zeta,alpha\n1,2\n"
    e.upd_row(alpha=3)
    e.upd_row(zeta=4)
    e.save_row()
    assert text_of(e) == "zeta,alpha\n1,2\n4,3\n"
    assert e.metrics() == [{"zeta": 1, "alpha": 2}, {"zeta": 4, "alpha": 3}]


def test_new_column_rewrites_with_union_header(running_exp):
    e = running_exp
    e.upd_row(step=1, loss=0.5)
    e.save_row()
    e.upd_row(step=2, loss=0.25)
    e.save_row()
    e.upd_row(step=3, acc=0.9, loss=0.125)  # a new column midway
    e.save_row()
    assert text_of(e) == "step,loss,acc\n1,0.5,\n2,0.25,\n3,0.125,0.9\n"
    e.upd_row(step=4, loss=0.0625)  # a row without the new column
    e.save_row()
    assert text_of(e) == "step,loss,acc\n1,0.5,\n2,0.25,\n3,0.125,0.9\n4,0.0625,\n"
    assert e.metrics() == [
        {"step": 1, "loss": 0.5, "acc": None},
        {"step": 2, "loss": 0.25, "acc": None},
        {"step": 3, "loss": 0.125, "acc": 0.9},
        {"step": 4, "loss": 0.0625, "acc": None},
    ]
    assert not [n for n in os.listdir(os.path.dirname(e.metrics_path)) if n.endswith(".tmp")]


def test_known_columns_append_and_rows_are_on_disk_at_once(running_exp):
    e = running_exp
    e.upd_row(step=0, loss=1.0)
    e.save_row()
    inode = os.stat(e.metrics_path).st_ino
    before = text_of(e)
    for step in range(1, 60):
        e.upd_row(loss=1.0 / (step + 1), step=step)
        e.save_row()
        after = text_of(e)  # read straight after save_row returns
        assert after == before + f"{step},{1.0 / (step + 1)!r}\n"
        before = after
    assert os.stat(e.metrics_path).st_ino == inode  # appended, never rewritten
    assert len(e.metrics()) == 60


def test_rows_of_each_run_go_to_their_own_file(running_exp):
    e = running_exp
    e.upd_row(a=1)
    e.save_row()
    assert e.run(background=True).wait(timeout=30) == 0
    assert e.current_run_id == "run_0002"
    e.upd_row(b=2)
    e.save_row()
    assert e.metrics(1) == [{"a": 1}]
    assert e.metrics("run_0002") == e.metrics() == [{"b": 2}]
    assert sorted(os.listdir(os.path.join(e.work_dir, "metrics"))) == ["run_0001.csv", "run_0002.csv"]


def test_value_types_round_trip(running_exp):
    e = running_exp
    tricky = 'a,b "quoted"\nsecond line\r\nthird'
    for i in range(2):  # first row: rewrite path (new header); second row: append path
        e.upd_row(i=7, f=0.25, nan=float("nan"), inf=float("inf"), ninf=float("-inf"), yes=True, no=False,
                  s=tricky, none=None, item_f=Scalar(2.5), item_i=Scalar(3), word="plain")
        e.save_row()
    text = text_of(e)
    row_text = '7,0.25,nan,inf,-inf,True,False,"a,b ""quoted""\nsecond line\r\nthird",,2.5,3,plain\n'
    assert text == "i,f,nan,inf,ninf,yes,no,s,none,item_f,item_i,word\n" + row_text * 2
    rows = e.metrics()
    assert len(rows) == 2
    for row in rows:
        assert math.isnan(row.pop("nan"))
        assert row == {"i": 7, "f": 0.25, "inf": math.inf, "ninf": -math.inf, "yes": True, "no": False,
                       "s": tricky, "none": None, "item_f": 2.5, "item_i": 3, "word": "plain"}
        assert type(row["i"]) is int and row["yes"] is True and row["no"] is False
        assert type(row["item_i"]) is int and type(row["item_f"]) is float


@pytest.mark.parametrize("bad, kind", [([1, 2], "list"), (object(), "object")])
def test_upd_row_rejects_unstorable_values_naming_the_key(running_exp, bad, kind):
    with pytest.raises(TypeError, match=rf"metric 'my_metric': cannot store a value of type {kind}"):
        running_exp.upd_row(my_metric=bad)
    with pytest.raises(ValueError, match=r"metric name 'a\\nb' cannot contain a line break"):
        running_exp.upd_row(**{"a\nb": 1})
    assert not os.path.exists(running_exp.metrics_path)


def test_upd_row_that_raises_adds_nothing_not_even_its_valid_values(running_exp):
    """A script that catches the error must not save half of the call it meant to make."""
    e = running_exp
    with pytest.raises(TypeError, match=r"metric 'bad': cannot store a value of type dict"):
        e.upd_row(step=1, loss=0.5, bad={"x": 1})
    with pytest.raises(ValueError, match="a metric name cannot be empty"):
        e.upd_row(step=1, **{"": 2})
    with pytest.raises(ValueError, match="cannot contain a line break"):
        e.upd_row(loss=0.25, **{"a\nb": 1})
    e.upd_row(step=2)
    e.save_row()
    assert exp.read_metrics(e.metrics_path) == [{"step": 2}]
    assert records_of(text_of(e))[0] == ["step"]


def test_save_row_with_nothing_pending_is_a_noop_with_a_warning(running_exp):
    e = running_exp
    log_before = e.read_log()
    e.save_row()
    assert not os.path.exists(e.metrics_path)
    added = e.read_log()[len(log_before):]
    assert added == "[exp] warning: save_row() called with no values; call upd_row(...) first\n"
    e.upd_row(x=1)
    e.save_row()
    e.save_row()  # the row was consumed: nothing pending again
    assert text_of(e) == "x\n1\n"


def test_save_row_lark_without_settings_keeps_the_row_and_warns_once(running_exp, capfd):
    e = running_exp
    for i in range(3):
        e.upd_row(x=i)
        e.save_row(lark=True)  # no lark_config at all: never an exception in the training loop
    assert e.metrics() == [{"x": 0}, {"x": 1}, {"x": 2}]
    log = e.read_log()
    assert log.count("settings lack app_id, app_secret, app_token, table_id") == 1
    assert exp.lark_pending(e.dir, "run_0001") == 3  # kept for lark-sync
    assert "lark-sync" in capfd.readouterr().err


def test_save_row_before_any_run_says_what_to_do(tmp_path):
    # In a process of its own: the value it leaves unsaved is reported at that process's exit.
    r = subprocess.run([sys.executable, "-c", (
        "import exp\n"
        "e = exp.Experiment(name='norun', command='true')\n"
        "e.upd_row(x=1)\n"
        "try:\n"
        "    e.save_row()\n"
        "except exp.ExpError as err:\n"
        "    print(err)\n")], cwd=str(tmp_path), env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("experiment 'norun' has no run yet: call run() first"), r.stdout
    assert "were not saved at exit: experiment 'norun' has no run to save them in" in r.stderr, r.stderr


def test_read_metrics_missing_file_and_bad_rows(tmp_path):
    assert exp.read_metrics(tmp_path / "missing.csv") == []
    p = tmp_path / "m.csv"
    p.write_text("a,b\n1,2\n3\n4,5,6\n7,8\n")  # rows of the wrong width are skipped
    assert exp.read_metrics(p) == [{"a": 1, "b": 2}, {"a": 7, "b": 8}]
    assert exp.parse_metrics_csv("") == ([], [])


# ============================================================================
# Torn last line
# ============================================================================


@pytest.mark.parametrize("torn", [b"3,0.", b'3,"half a quoted', b"3"])
def test_torn_last_line_is_skipped_and_cut_by_the_next_writer(running_exp, torn):
    e = running_exp
    for s in range(3):
        e.upd_row(step=s, loss=s / 10)
        e.save_row()
    good = text_of(e)
    with open(e.metrics_path, "ab") as f:
        f.write(torn)  # a writer killed mid-row
    expected_rows = [{"step": s, "loss": s / 10} for s in range(3)]
    assert e.metrics() == expected_rows
    assert exp.read_metrics(e.metrics_path) == expected_rows
    # The next writer (say, the resumed script) starts clean.
    nxt = exp.Experiment.load(e.work_dir)
    assert nxt.current_run_id == "run_0001"
    nxt.upd_row(step=3, loss=0.3)
    nxt.save_row()
    assert text_of(e) == good + "3,0.3\n"
    assert nxt.metrics() == expected_rows + [{"step": 3, "loss": 0.3}]


def test_torn_header_is_cut(running_exp):
    e = running_exp
    pathlib.Path(e.metrics_path).write_bytes(b"ste")
    assert e.metrics() == []
    e.upd_row(step=1)
    e.save_row()
    assert text_of(e) == "step\n1\n"


def test_torn_line_from_another_writer_is_cut_while_this_writer_is_open(running_exp):
    # A DataLoader worker killed mid-row while the main process keeps logging.
    e = running_exp
    for s in range(3):
        e.upd_row(step=s, loss=s / 10)
        e.save_row()
    good = text_of(e)
    with open(e.metrics_path, "ab") as f:
        f.write(b"99,0.9")  # no newline: the other writer died here
    e.upd_row(step=3, loss=0.3)
    e.save_row()
    assert text_of(e) == good + "3,0.3\n"
    assert e.metrics()[-1] == {"step": 3, "loss": 0.3}


# ============================================================================
# Concurrent writers
# ============================================================================

WRITER = """
import sys, exp
k, n = int(sys.argv[1]), int(sys.argv[2])
e = exp.load_experiment()
for i in range(n):
    e.upd_row(writer=k, seq=i, val=k * 100000 + i, note=f"w{k},s{i}")
    if i >= n // 2:
        e.upd_row(**{f"p{k}": i})  # each writer brings its own column midway
    e.save_row()
print(f"writer {k} wrote {n} rows", flush=True)
"""


def check_concurrent_csv(text, writers, n, extra_prefix):
    assert text.endswith("\n")
    records = records_of(text)
    header = records[0]
    assert header[:4] == ["writer", "seq", "val", "note"]
    assert sorted(header[4:]) == [f"{extra_prefix}{k}" for k in range(writers)]
    assert all(len(r) == len(header) for r in records[1:]), "a row has the wrong number of fields"
    assert len(records) == writers * n + 1
    assert text.count("\n") == writers * n + 1  # no row was split or merged
    rows = exp.parse_metrics_csv(text)[1]
    assert sorted((r["writer"], r["seq"]) for r in rows) == [(k, i) for k in range(writers) for i in range(n)]
    for r in rows:
        k, i = r["writer"], r["seq"]
        assert r["val"] == k * 100000 + i and r["note"] == f"w{k},s{i}"
        for j in range(writers):
            want = i if (j == k and i >= n // 2) else None
            assert r[f"{extra_prefix}{j}"] == want, r
    for k in range(writers):  # each writer's rows stay in the order it wrote them
        assert [r["seq"] for r in rows if r["writer"] == k] == list(range(n))


@posix_only
def test_concurrent_writer_processes(make_exp, tmp_path):
    script = write_script(tmp_path, "writer.py", WRITER)
    command = " & ".join(py_cmd(script, k, 500) for k in range(4)) + " & wait"
    e = make_exp("concurrent", command)
    assert e.run(background=True).wait(timeout=120) == 0
    log = e.read_log()
    for k in range(4):
        assert f"writer {k} wrote 500 rows" in log, log[-2000:]
    check_concurrent_csv(text_of(e), 4, 500, "p")
    assert not [n for n in os.listdir(os.path.dirname(e.metrics_path)) if n.endswith(".tmp")]


@posix_only
def test_a_writer_that_opens_the_file_just_after_a_rewrite_waits_for_it(tmp_path, monkeypatch):
    """A rewrite renames its new file over the old one.  A writer that opens the
    file right then must wait until the rewriter is done with it: the rewriter's
    header must stay that file's, and the rewriter must not be left holding a
    file that was replaced behind it (whose inode number may even have gone to
    a newer file, so no check after the fact can tell; rows went astray so)."""
    path = tmp_path / "m.csv"
    a, b = exp.MetricsWriter(path), exp.MetricsWriter(path)
    a.write_row({"step": "0", "loss": "1.0"})
    real_replace = os.replace
    threads = []

    def replace_then_let_b_in(src, dst, *args, **kw):
        real_replace(src, dst, *args, **kw)
        if os.fspath(dst) == str(path) and not threads:  # a's new file is in place
            t = threading.Thread(target=b.write_row, args=({"step": "1", "acc": "0.5"},))
            threads.append(t)
            t.start()
            t.join(0.5)
            assert t.is_alive(), "b wrote to the file a was still rewriting"

    monkeypatch.setattr(os, "replace", replace_then_let_b_in)
    a.write_row({"step": "2", "loss": "0.5", "lr": "0.1"})  # a new column: a rewrite
    monkeypatch.setattr(os, "replace", real_replace)
    assert threads
    threads[0].join(10)
    assert not threads[0].is_alive()
    for i in range(3, 6):
        a.write_row({"step": str(i), "loss": "0.25", "lr": "0.1"})
    b.write_row({"step": "6", "acc": "0.75"})
    a.close()
    b.close()
    records = records_of(path.read_text(encoding="utf-8"))
    assert records[0] == ["step", "loss", "lr", "acc"]
    assert all(len(r) == 4 for r in records), records
    rows = exp.read_metrics(path)
    assert [r["step"] for r in rows] == [0, 2, 1, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == [None, 0.1, None, 0.1, 0.1, 0.1, None]
    assert [r["acc"] for r in rows] == [None, None, 0.5, None, None, None, 0.75]
    assert sorted(os.listdir(tmp_path)) == ["m.csv"]


def _writer_threads_once(path, writers, n, shared):
    common = exp.MetricsWriter(path) if shared else None
    errors = []
    start = threading.Barrier(writers)

    def work(k):
        w = common or exp.MetricsWriter(path)
        try:
            start.wait(timeout=10)
            for i in range(n):
                row = {"writer": str(k), "seq": str(i), "val": str(k * 100000 + i), "note": f"w{k},s{i}"}
                if i >= n // 2:
                    row[f"t{k}"] = str(i)
                w.write_row(row)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))
        finally:
            if not shared:
                w.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if common:
        common.close()
    assert errors == []
    with open(path, encoding="utf-8", newline="") as f:
        check_concurrent_csv(f.read(), writers, n, "t")


@posix_only
def test_concurrent_writer_threads_many_rounds(tmp_path):
    """Short rounds of four writers, each adding its own column: many chances
    for one writer's rewrite to meet another's (lost-rows races hid here: one
    showed about once in a thousand rounds, on a loaded machine)."""
    for r in range(150):
        _writer_threads_once(tmp_path / f"r{r}" / "m.csv", 4, 60, shared=False)


@posix_only
@pytest.mark.parametrize("shared", [True, False], ids=["one-writer", "writer-per-thread"])
def test_concurrent_writer_threads(tmp_path, shared):
    _writer_threads_once(tmp_path / "metrics" / "run_0001.csv", 4, 500, shared)


@pytest.mark.parametrize("text", ["10%\r50%", "a\rb\nc\r\nd", "\r", 'say "hi", then\r', "x\r\r\r"])
def test_a_string_cell_with_carriage_returns_survives_the_rewrite_a_new_column_makes(tmp_path, text):
    # The rewrite (and the first row of every file) once used csv.writer, which before
    # Python 3.13 leaves a lone "\r" unquoted: the row was cut or lost on reading.
    w = exp.MetricsWriter(str(tmp_path / "m.csv"))
    w.write_row({"step": "0", "note": text})  # the first row: the file is written whole
    w.write_row({"step": "1", "note": text})  # an append
    w.write_row({"step": "2", "note": "y", "acc": "0.9"})  # a new column: the file is rewritten
    rows = exp.read_metrics(str(tmp_path / "m.csv"))
    assert rows == [{"step": 0, "note": text, "acc": None}, {"step": 1, "note": text, "acc": None},
                    {"step": 2, "note": "y", "acc": 0.9}]
    assert exp.last_metrics_values(str(tmp_path / "m.csv")) == {"step": 2, "note": "y", "acc": 0.9}


# ============================================================================
# Values a script never saved; threads and forked children sharing an experiment
# ============================================================================

UNSAVED_AT_EXIT = """
import exp
e = exp.load_experiment(standalone=True)
e.upd_row(step=0, loss=1.0)
e.save_row()
e.upd_row(test_acc=0.93)  # the script ends without a save_row()
print(e.work_dir)
"""


@posix_only
def test_values_never_saved_are_saved_at_exit_as_a_last_row_with_a_note(run_py, tmp_path):
    r = run_py(UNSAVED_AT_EXIT)
    assert r.returncode == 0, r.stderr
    work = r.stdout.strip()
    path = os.path.join(work, "metrics", "run_0001.csv")
    assert exp.read_metrics(path) == [{"step": 0, "loss": 1.0, "test_acc": None},
                                      {"step": None, "loss": None, "test_acc": 0.93}]
    [note] = r.stderr.splitlines()
    assert note == (f"exp: note: the values given to upd_row() after the last save_row() (test_acc) were saved "
                    f"at exit as a last row of run_0001 ({path}); call save_row() to save them yourself")
    assert read_meta(work)["status"] == "finished"  # saved before the end was recorded


@posix_only
def test_values_never_saved_in_a_run_of_exp_are_saved_at_exit(make_exp, tmp_path):
    script = write_script(tmp_path, "train.py", """
        import exp
        e = exp.load_experiment()
        helper = exp.load_experiment()  # say, in another module: values of both are kept
        for step in range(2):
            e.upd_row(step=step, loss=1.0 / (step + 1))
            e.save_row()
        e.upd_row(test_acc=0.93, test_loss=0.2)
        helper.upd_row(note="done")
    """)
    e = make_exp("unsaved", py_cmd(script))
    assert e.run() == 0
    rows = e.metrics()
    assert rows[:2] == [{"step": 0, "loss": 1.0, "test_acc": None, "test_loss": None, "note": None},
                        {"step": 1, "loss": 0.5, "test_acc": None, "test_loss": None, "note": None}]
    assert sorted(rows[2:], key=str) == sorted(
        [{"step": None, "loss": None, "test_acc": 0.93, "test_loss": 0.2, "note": None},
         {"step": None, "loss": None, "test_acc": None, "test_loss": None, "note": "done"}], key=str)
    log = e.read_log()  # the run's stderr is its log
    assert log.count("note: the values given to upd_row() after the last save_row()") == 2, log
    assert "(test_acc, test_loss) were saved at exit as a last row of run_0001" in log


@posix_only
def test_values_that_cannot_be_saved_at_exit_are_reported(run_py):
    r = run_py("""
        import os, exp
        e = exp.load_experiment(standalone=True)
        e.upd_row(loss=0.5)
        os.makedirs(e.metrics_path)  # a directory where the CSV should go: the save fails
        print(e.work_dir)
    """)
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "upd_row" in ln]
    assert line.startswith("exp: warning: the values given to upd_row() after the last save_row() (loss) "
                           "could not be saved at exit: "), line
    assert "Traceback" not in r.stderr


@posix_only
def test_threads_sharing_an_experiment_write_each_value_once(running_exp):
    """upd_row and save_row from several threads: a value is written exactly once (a save_row
    may write values another thread gave, in the same row), never twice, never dropped."""
    e = running_exp
    threads, n = 4, 400
    errors = []
    start = threading.Barrier(threads)

    def work(k):
        try:
            start.wait(timeout=10)
            for i in range(n):
                e.upd_row(**{f"t{k}": i})
                e.save_row()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert errors == []
    rows = e.metrics()
    for k in range(threads):
        assert [r[f"t{k}"] for r in rows if r[f"t{k}"] is not None] == list(range(n))


FORKED_WORKERS = """
import os, sys, exp
e = exp.load_experiment(standalone=True)
e.upd_row(pending_in_parent=123)
children = []
for k in range(4):
    pid = os.fork()
    if pid == 0:  # a raw fork, ended with sys.exit(): the exit handlers run in the child
        w = exp.load_experiment(standalone=True)  # say, a helper in the worker: the same experiment
        w.upd_row(worker=k)
        w.save_row()
        w.upd_row(worker_unsaved=k)  # the child's own values: saved by the child at its exit
        sys.exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print(e.read_metadata()["status"])
print(e.work_dir)
e.save_row()
"""


@posix_only
def test_forked_children_neither_inherit_pending_values_nor_end_the_run(run_py, tmp_path):
    r = run_py(FORKED_WORKERS)
    assert r.returncode == 0, r.stderr
    status, work = r.stdout.split()
    assert status == "running"  # the children's exits did not end the parent's run
    assert [p.name for p in (tmp_path / "results").iterdir()] == [os.path.basename(work)]
    rows = exp.read_metrics(os.path.join(work, "metrics", "run_0001.csv"))
    assert sorted(r["worker"] for r in rows if r["worker"] is not None) == [0, 1, 2, 3]
    assert sorted(r["worker_unsaved"] for r in rows if r["worker_unsaved"] is not None) == [0, 1, 2, 3]
    assert [r["pending_in_parent"] for r in rows if r["pending_in_parent"] is not None] == [123]
    assert len(rows) == 9
    meta = read_meta(work)
    assert meta["status"] == "finished" and [run["status"] for run in meta["runs"]] == ["finished"]


# ============================================================================
# Values a CSV cannot hold, NUL bytes in a file, MetricsWriter on its own
# ============================================================================


def test_an_int_too_long_for_text_is_a_metric_error_naming_the_key(running_exp):
    with pytest.raises(exp.MetricError, match=r"^metric 'big': an int of about 5001 digits, more than Python "):
        running_exp.upd_row(step=1, big=10**5000)
    running_exp.upd_row(step=1, big=10**300)
    running_exp.save_row()
    assert running_exp.metrics() == [{"step": 1, "big": 10**300}]


def test_a_nul_character_is_refused_naming_the_key(running_exp):
    """No NUL goes into a metrics file: csv before Python 3.11 cannot read one back."""
    e = running_exp
    with pytest.raises(exp.MetricError) as info:
        e.upd_row(step=1, sample="gen\x00text")
    assert isinstance(info.value, TypeError)
    assert str(info.value) == ("metric 'sample': the string holds a NUL character ('\\x00'), which a CSV file "
                               "cannot carry portably; remove it first, e.g. text.replace('\\x00', '')")
    with pytest.raises(exp.ConfigError, match=r"metric name 'a\\x00b' cannot contain a NUL character"):
        e.upd_row(**{"a\x00b": 1})
    with pytest.raises(exp.MetricError, match="metric 'sample': the string holds a NUL"):
        exp.MetricsWriter(e.metrics_path).write_row({"step": 1, "sample": "\x00"})
    e.upd_row(step=1)
    e.save_row()
    assert text_of(e) == "step\n1\n"


NUL_CSV = b'step,sample\n0,gen\x00text\n1,"a\x00,\xef\xb7\x90 b"\n2,plain\n'


@pytest.fixture(params=["native", "pre-3.11 csv"])
def csv_nul(request, monkeypatch):
    """Run on this Python's csv module, and as on Python < 3.11 (whose csv refuses NUL)."""
    if request.param != "native":
        monkeypatch.setattr(exp, "_CSV_READS_NUL", False)
    return request.param


def test_readers_read_nul_bytes_already_in_a_file(tmp_path, csv_nul):
    """A file written by another tool (or before NUL was refused) reads on every Python: the
    readers behind read_metrics, ls, the dashboard, and the rewrite a new column makes."""
    path = tmp_path / "metrics" / "run_0001.csv"
    path.parent.mkdir()
    path.write_bytes(NUL_CSV)
    rows = [{"step": 0, "sample": "gen\x00text"}, {"step": 1, "sample": "a\x00,\ufdd0 b"},
            {"step": 2, "sample": "plain"}]
    assert exp.read_metrics(path) == rows
    assert exp.last_metrics_row(str(path)) == exp.last_metrics_values(str(path)) == rows[-1]
    assert exp.metric_column(str(path), "sample") == [r["sample"] for r in rows]
    assert exp.metrics_stats(str(path))["step"]["final"] == 2
    assert exp.read_metrics_chunk(str(path))["columns"]["sample"] == [r["sample"] for r in rows]
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": 3, "sample": "x"})  # an append
        w.write_row({"step": 4, "acc": 0.5})  # a new column: the file is rewritten
    assert exp.read_metrics(path) == [dict(r, acc=None) for r in rows] + [
        {"step": 3, "sample": "x", "acc": None}, {"step": 4, "sample": None, "acc": 0.5}]


@posix_only
def test_ls_lists_a_directory_whose_metrics_hold_nul_bytes(make_exp, tmp_path):
    e = make_exp("nul", "exit 0")
    assert e.run() == 0
    pathlib.Path(e.metrics_path).write_bytes(b"step,sample\n0,gen\x00text\n1,x\x00y\n")
    for args in ([], ["--json"]):
        r = subprocess.run([sys.executable, exp.__file__, "ls", e.base_dir, *args], capture_output=True,
                           text=True, env=child_env(), timeout=60)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    [row] = json.loads(r.stdout)
    assert (row["name"], row["status"], row["last_metrics"]) == ("nul", "finished", {"step": 1})


def test_metrics_writer_on_its_own_takes_values_as_upd_row_does(tmp_path):
    path = tmp_path / "m.csv"
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": 1, "loss": 0.5, "ok": True, "note": None, "item": Scalar(2.5)})
        w.write_row({"step": 2, "loss": float("inf"), "ok": False, "note": "a,b"})
        with pytest.raises(exp.MetricError, match=r"metric 'loss': cannot store a value of type list"):
            w.write_row({"step": 3, "loss": [1]})
        with pytest.raises(exp.ConfigError, match="a metric name cannot be empty"):
            w.write_row({"step": 3, "": 1})
    assert path.read_text() == 'step,loss,ok,note,item\n1,0.5,True,,2.5\n2,inf,False,"a,b",\n'


# ============================================================================
# A writer killed mid-rewrite
# ============================================================================


@posix_only
def test_the_next_writer_removes_the_temp_file_of_a_writer_killed_mid_rewrite(tmp_path):
    path = tmp_path / "metrics" / "run_0001.csv"
    with exp.MetricsWriter(path) as w:
        w.write_row({"step": 0, "loss": 1.0})
    # A writer killed (SIGKILL) while it rewrites the file for a new column: its temp file stays.
    script = write_script(tmp_path, "killed.py", """
        import sys, time, exp
        real = exp.write_all
        def write_then_hang(fd, data):
            real(fd, data)
            print("in rewrite", flush=True)
            time.sleep(600)
        exp.write_all = write_then_hang
        exp.MetricsWriter(sys.argv[1]).write_row({"step": 1, "loss": 0.5, "acc": 0.9})
    """)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        assert proc.stdout.readline() == "in rewrite\n"
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
    [left] = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
    assert left.startswith(f"run_0001.csv.{proc.pid}.")
    # A temp file whose writer lives (a reused pid, a process on another host) is never removed.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = path.parent / f"run_0001.csv.{sleeper.pid}.1.tmp"
        live.write_text("step\n")
        other = path.parent / f"run_0002.csv.{proc.pid}.1.tmp"  # another file's: not this writer's business
        other.write_text("step\n")
        with exp.MetricsWriter(path) as w:
            w.write_row({"step": 1, "loss": 0.5})
        assert sorted(n for n in os.listdir(path.parent) if n.endswith(".tmp")) == sorted([live.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait(30)
    assert exp.read_metrics(path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
