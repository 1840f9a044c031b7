"""``exp ls`` and the small user-facing fixes around it.

What ``ls`` must survive (every kind of bad ``metadata.json`` and metrics
file, a closed pipe, ten thousand directories), what it offers (columns,
best values, sorting, grouping, a directory column, results one level
down), and the config checks and scheduler behaviour that came with it
(names that cannot become directories, the max_retries warning, exit code
127, ``EXPERIMENT_REPEAT``, string metrics kept as written, clean failure
reports).

Everything is real: ``python exp.py ...`` in a subprocess, real files under
``tmp_path``.  Experiment directories that only ``ls`` reads are written by
hand (a ``metadata.json`` and a metrics CSV), which is what a hand-edited or
damaged directory looks like anyway.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import EXP_PY, call_with_timeout, child_env, linux_only, posix_only, py_cmd, tmpfs, write_script  # noqa: E402
from conftest import run_exp as cli  # noqa: E402  (``python exp.py ARGS``; fails the test instead of hanging)

PY = sys.executable
CLI_TIMEOUT = 60
STAMP = "2025-01-01__00-00-{:02d}"


# ============================================================================
# Helpers
# ============================================================================


def ls(base, *args, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return cli("ls", base, *args, timeout=timeout)


def _no_constants(name):
    raise AssertionError(f"ls --json printed the non-JSON constant {name}")


def strict_json(text: str):
    """Parse as strict JSON: NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=_no_constants)


def assert_clean(r: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


def ls_json(base, *args, timeout=CLI_TIMEOUT) -> list:
    r = ls(base, "--json", *args, timeout=timeout)
    assert_clean(r)
    return strict_json(r.stdout)


def table(text: str) -> list[list[str]]:
    """The rows of an ``ls`` table, cells split on runs of two or more spaces.

    The footnote for dirty experiments (tests run from a checkout with uncommitted
    changes start dirty experiments) and the `` *`` after their names are left out.
    """
    rows = [re.split(r" {2,}", line.strip()) for line in text.splitlines()
            if line.strip() and not line.startswith("* ")]
    return [[r[0].removesuffix(" *"), *r[1:]] for r in rows]


def table_dicts(text: str) -> list[dict[str, str]]:
    rows = table(text)
    header = rows[0]
    for r in rows[1:]:
        assert len(r) == len(header), (header, r)
    return [dict(zip(header, r)) for r in rows[1:]]


def fake_experiment(base, name: str, second: int = 0, meta: dict | None = None, rows=(), sub: str | None = None,
                    metadata_bytes: bytes | None = None) -> Path:
    """An experiment directory written by hand: metadata.json and metrics/run_0001.csv.

    ``meta`` is merged over a finished run's metadata; ``metadata_bytes``
    replaces the file's content as given.  ``rows`` are dicts of one run's
    metric rows (the CSV's columns are the first row's keys).
    """
    parent = Path(base) / sub if sub else Path(base)
    d = parent / f"{name}_{STAMP.format(second)}"
    (d / "metrics").mkdir(parents=True)
    (d / "terminal_logs").mkdir()
    if metadata_bytes is not None:
        (d / "metadata.json").write_bytes(metadata_bytes)
    else:
        record = {
            "name": name, "status": "finished", "created_at": f"2025-01-01T00:00:{second:02d}+00:00",
            "started_at": f"2025-01-01T00:00:{second:02d}+00:00", "ended_at": None, "duration": 1.0,
            "exit_code": 0, "current_run_id": "run_0001",
            "runs": [{"id": "run_0001", "status": "finished", "exit_code": 0}], "tags": [],
        }
        record.update(meta or {})
        (d / "metadata.json").write_text(json.dumps(record), encoding="utf-8")
    if rows:
        keys = list(rows[0])
        lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]
        (d / "metrics" / "run_0001.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def toml_str(s: str) -> str:
    """A TOML basic string holding ``s`` (every control character escaped)."""
    return json.dumps(s).replace("\x7f", "\\u007f")


def write_toml(path, text: str) -> Path:
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def by_dir(entries: list) -> dict:
    return {e["dir"]: e for e in entries}


# ============================================================================
# 1. ls survives every bad metadata.json
# ============================================================================


def _write_bytes(content: bytes):
    def make(path: Path) -> None:
        path.write_bytes(content)
    return make


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _dangling_symlink(path: Path) -> None:
    os.symlink(path.parent / "nowhere.json", path)


def _oversized(path: Path) -> None:
    with open(path, "wb") as f:  # sparse: costs no disk
        f.truncate(exp.METADATA_MAX_BYTES + 1)


DEPTH = 100_000
UNREADABLE_CASES = {
    "invalid_json": _write_bytes(b'{"name": "x", "status": '),
    "json_list": _write_bytes(b'[{"name": "x", "status": "finished"}]'),
    "json_string": _write_bytes(b'"finished"'),
    "json_null": _write_bytes(b"null"),
    "empty_file": _write_bytes(b""),
    "not_utf8": _write_bytes(b'{"name": "caf\xe9", "status": "finished"}'),
    "utf16": _write_bytes('{"name": "x"}'.encode("utf-16")),
    "deep_list": _write_bytes(b"[" * DEPTH + b"]" * DEPTH),
    "deep_object": _write_bytes(b'{"a":' * DEPTH + b"1" + b"}" * DEPTH),
    # Deep enough to be refused, shallow enough for every Python to parse (3.13 parses far deeper
    # than 3.12: the same file must read the same on both).
    "deep_object_300": _write_bytes(b'{"name": "x", "status": "finished", "a":' + b'{"a":' * 300 + b"1"
                                    + b"}" * 301),
    "huge_int": _write_bytes(b'{"exit_code": 1' + b"0" * 5000 + b"}"),
    "fifo": _fifo,
    "directory": _directory,
    "dangling_symlink": _dangling_symlink,
    "oversized": _oversized,
}


@posix_only
@pytest.mark.parametrize("case", sorted(UNREADABLE_CASES))
def test_ls_shows_an_unreadable_metadata_file_as_unreadable(tmp_path, case):
    base = tmp_path / "results"
    good = fake_experiment(base, "good", 1, rows=[{"loss": 0.5}])
    bad = base / f"bad_{STAMP.format(2)}"
    bad.mkdir(parents=True)
    UNREADABLE_CASES[case](bad / "metadata.json")

    # The table: both rows, no traceback, no hang (a FIFO must not block the open).
    r = ls(base, timeout=30)
    assert_clean(r)
    rows = {row["dir"]: row for row in table_dicts(r.stdout)}
    assert rows[bad.name]["status"] == "unreadable"
    assert rows[bad.name]["name"] == "bad"  # from the directory name
    assert rows[good.name]["status"] == "finished"
    assert rows[good.name]["loss"] == "0.5"

    # --json: strict JSON, the bad one says why.
    entries = by_dir(ls_json(base))
    assert set(entries) == {good.name, bad.name}
    e = entries[bad.name]
    assert e["status"] == "unreadable"
    assert e["name"] == "bad"
    assert isinstance(e["error"], str) and "metadata.json" in e["error"]
    assert e["last_metrics"] == {} and e["runs"] == 0 and e["exit_code"] is None
    assert entries[good.name]["last_metrics"] == {"loss": 0.5}

    # The API: scan finds it, summary() never raises and is strict JSON.
    found = {os.path.basename(d.path): d for d in exp.scan(base)}
    summary = call_with_timeout(found[bad.name].summary, 20, "summary()")
    assert summary["status"] == exp.UNREADABLE
    json.dumps(summary, allow_nan=False)
    with pytest.raises(exp.ExpError):
        call_with_timeout(exp.ExperimentDir(bad).read_metadata, 20, "read_metadata()")
    # Nothing was rewritten or moved by reading.
    assert os.path.lexists(bad / "metadata.json")
    assert [p.name for p in bad.iterdir() if p.name.startswith("metadata.json")] == ["metadata.json"]


NOT_STRICT_CASES = {
    # Python reads these, JSON has no such values: exp never writes them.
    "nan": (b'{"name": "x", "status": "finished", "duration": NaN}', "NaN"),
    "infinity": (b'{"name": "x", "status": "finished", "pid": -Infinity}', "-Infinity"),
    "overflow": (b'{"name": "x", "status": "finished", "exit_code": 1e999}', "1e999"),
    "nested_nan": (b'{"name": "x", "status": "finished", "runs": [{"id": "run_0001", "duration": NaN}]}', "NaN"),
    "nan_in_params": (b'{"name": "x", "status": "finished", "params": {"lr": NaN}}', "NaN"),
    # Wrong types in the fields exp reads back.
    "name": (b'{"name": 5, "status": "finished"}', "'name' is 5, not text"),
    "status": (b'{"name": "x", "status": 7}', "'status' is 7, not text"),
    "started_at": (b'{"name": "x", "started_at": []}', "'started_at' is [], not a time"),
    "duration": (b'{"name": "x", "duration": "long"}', "'duration' is 'long', not a number"),
    "exit_code": (b'{"name": "x", "exit_code": 1.5}', "'exit_code' is 1.5, not a whole number"),
    "pid_bool": (b'{"name": "x", "pid": true}', "'pid' is True, not a whole number"),
    "tags": (b'{"name": "x", "tags": "a,b"}', "'tags' is 'a,b', not a list of text"),
    "mixed_tags": (b'{"name": "x", "tags": ["a", 1]}', "not a list of text"),
    "runs": (b'{"name": "x", "runs": 3}', "'runs' is 3, not a list of objects"),
    "gpu_ids": (b'{"name": "x", "gpu_ids": [0, "1"]}', "not a list of GPU numbers"),
    "params": (b'{"name": "x", "params": [1]}', "'params' is [1], not an object"),
    "long_value": (b'{"name": "x", "status": ["' + b"s" * 200 + b'"]}', "'status' is ['" + "s" * 35),
}


@pytest.mark.parametrize("case", sorted(NOT_STRICT_CASES))
def test_ls_shows_metadata_with_non_json_numbers_or_wrong_types_as_unreadable(tmp_path, case):
    content, said = NOT_STRICT_CASES[case]
    base = tmp_path / "results"
    good = fake_experiment(base, "good", 1, rows=[{"loss": 0.5}])
    bad = fake_experiment(base, "bad", 2, metadata_bytes=content, rows=[{"loss": 0.25}])
    r = ls(base)
    assert_clean(r)
    rows = {row["dir"]: row for row in table_dicts(r.stdout)}
    assert rows[bad.name]["status"] == "unreadable" and rows[bad.name]["name"] == "bad"
    assert rows[good.name]["status"] == "finished" and rows[good.name]["loss"] == "0.5"
    r = ls(base, "--status", "unreadable")
    assert_clean(r)
    assert [row["dir"] for row in table_dicts(r.stdout)] == [bad.name]

    entries = by_dir(ls_json(base))  # strict JSON
    e = entries[bad.name]
    assert e["status"] == "unreadable" and e["name"] == "bad"
    assert str(bad / "metadata.json") in e["error"] and said in e["error"] and "fix or move" in e["error"]
    assert e["exit_code"] is None and e["duration"] is None and e["last_metrics"] == {}
    assert e == json.loads(json.dumps(exp.json_safe(exp.ExperimentDir(bad).summary())))
    # Only the listing is strict: reading it to update it still works, and nothing is moved aside.
    assert isinstance(exp.ExperimentDir(bad).read_metadata(), dict)
    assert (bad / "metadata.json").read_bytes() == content
    assert [p.name for p in bad.iterdir() if p.name.startswith("metadata.json")] == ["metadata.json"]


def test_ls_never_follows_a_current_run_id_out_of_the_directory(tmp_path):
    base = tmp_path / "results"
    outside = tmp_path / "etc"  # what current_run_id tries to reach
    (outside / "metrics").mkdir(parents=True)
    (outside / "metrics" / "x.csv").write_text("loss\n1\n")
    d = fake_experiment(base, "escape", 3, meta={"current_run_id": "../../etc", "status": "finished"})
    (e,) = ls_json(base)
    assert e["dir"] == d.name and e["status"] == "finished"
    assert e["current_run_id"] is None and e["last_metrics"] == {}


def test_ls_reads_fields_written_the_earlier_projects_way(tmp_path):
    base = tmp_path / "results"
    fake_experiment(base, "old", 1, metadata_bytes=json.dumps({
        "name": "old", "status": "finished", "gpu_ids": "0,1", "return_code": 0, "timestamp": "2025-01-02T03:04:05",
        "start_time": 1735787045.5, "end_time": 1735787100.25}).encode())
    (e,) = ls_json(base)
    assert e["status"] == "finished" and e["gpu_ids"] == [0, 1] and e["exit_code"] == 0
    assert e["created_at"] == "2025-01-02T03:04:05" and e["error"] is None


def test_ls_lone_surrogates_in_names_print_as_escapes(tmp_path):
    # Valid JSON can hold a lone surrogate ("\ud800"), which UTF-8 cannot encode.
    base = tmp_path / "results"
    d = fake_experiment(base, "odd", 1, metadata_bytes=(
        b'{"name": "x\\ud800y", "status": "finished", "tags": ["t\\udcff"]}'))
    for env in (child_env(), child_env(PYTHONIOENCODING="utf-8:strict")):
        r = cli("ls", base, env=env)
        assert_clean(r)
        assert "x\\ud800y" in r.stdout
        r = cli("ls", base, "--json", env=env)
        assert_clean(r)
        (e,) = strict_json(r.stdout)
        assert e["name"] == "x\ud800y" and e["tags"] == ["t\udcff"] and e["dir"] == d.name


def test_ls_non_finite_metrics_are_strings_in_json(tmp_path):
    base = tmp_path / "results"
    d = fake_experiment(base, "nf", 1)
    (d / "metrics" / "run_0001.csv").write_text(
        "step,a,b,c,d,note\n1,1.0,2.0,3.0,4.0,x\n2,nan,inf,-inf,1e999,y\n", encoding="utf-8")
    r = ls(base)
    assert_clean(r)
    (row,) = table_dicts(r.stdout)
    assert (row["a"], row["b"], row["c"], row["d"]) == ("nan", "inf", "-inf", "inf")
    assert row["note"] == "y"  # text: shown as written, after the numbers

    r = ls(base, "--json")
    assert_clean(r)
    assert "NaN" not in r.stdout and "Infinity" not in r.stdout
    (e,) = strict_json(r.stdout)
    assert e["last_metrics"] == {"step": 2, "a": "nan", "b": "inf", "c": "-inf", "d": "inf"}
    assert e["last_text"] == {"note": "y"}
    assert exp.ExperimentDir(d).summary()["last_metrics"] == e["last_metrics"]

    # Group and best skip what is not a finite number instead of failing.
    r = ls(base, "--group")
    assert_clean(r)
    r = ls(base, "--best")
    assert_clean(r)
    (row,) = table_dicts(r.stdout)
    assert row["a (best)"] == "1" and row["step (best)"] == "2"
    assert row["note (best)"] == "y"  # text has no best: its last value


def test_ls_survives_odd_metrics_files(tmp_path):
    base = tmp_path / "results"
    fifo = fake_experiment(base, "fifo", 1)
    os.mkfifo(fifo / "metrics" / "run_0001.csv")  # must not block ls
    folder = fake_experiment(base, "folder", 2)
    (folder / "metrics" / "run_0001.csv").mkdir()
    huge = fake_experiment(base, "huge", 3)
    # More digits than int() converts on Python >= 3.11; and one past a float's range.
    (huge / "metrics" / "run_0001.csv").write_text(
        "big,wide,ok\n" + "9" * 5000 + "," + "9" * 400 + ",1\n", encoding="utf-8")
    torn = fake_experiment(base, "torn", 4)
    (torn / "metrics" / "run_0001.csv").write_bytes(b'loss,note\n0.5,"fine"\n0.25,"cut off\n')
    for args in ((), ("--best",), ("--group",), ("--columns", "big:best,wide:max,ok,loss:min"),
                 ("--sort", "wide", "--desc")):
        r = ls(base, *args, timeout=30)
        assert_clean(r)
    entries = {e["name"]: e for e in ls_json(base)}
    assert entries["fifo"]["last_metrics"] == {} and entries["folder"]["last_metrics"] == {}
    assert entries["huge"]["last_metrics"]["ok"] == 1
    assert entries["huge"]["last_metrics"]["wide"] == int("9" * 400)
    if hasattr(sys, "get_int_max_str_digits"):  # Python's limit on int(str) (3.11, and 3.9.14+/3.10.7+)
        assert "big" not in entries["huge"]["last_metrics"]  # too long to be a number: kept as text
    assert entries["torn"]["last_metrics"] == {"loss": 0.5}


@posix_only
def test_ls_status_unreadable_filters_them(tmp_path):
    base = tmp_path / "results"
    good = fake_experiment(base, "good", 1)
    bad = set()
    for i, case in enumerate(sorted(UNREADABLE_CASES)):
        d = base / f"{case}_{STAMP.format(10 + i)}"
        d.mkdir()
        UNREADABLE_CASES[case](d / "metadata.json")
        bad.add(d.name)
    entries = ls_json(base, "--status", "unreadable")
    assert {e["dir"] for e in entries} == bad
    assert all(e["status"] == "unreadable" for e in entries)

    r = ls(base, "--status", "unreadable")
    assert_clean(r)
    rows = table_dicts(r.stdout)
    assert {row["dir"] for row in rows} == bad
    assert good.name not in r.stdout

    assert [e["dir"] for e in ls_json(base, "--status", "finished")] == [good.name]


# ============================================================================
# 2. ls features
# ============================================================================


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Five hand-made experiments: two repeats of "a", an error, one without metrics, one a level down."""
    base = tmp_path_factory.mktemp("listing") / "results"
    fake_experiment(base, "a", 1, meta={"duration": 10.0}, rows=[
        {"loss": 0.5, "acc": 0.7, "val_err": 0.3}, {"loss": 0.2, "acc": 0.9, "val_err": 0.1},
        {"loss": 0.3, "acc": 0.8, "val_err": 0.2}])
    fake_experiment(base, "a", 2, meta={"duration": 20.0}, rows=[
        {"loss": 0.4, "acc": 0.6, "val_err": 0.4}, {"loss": 0.1, "acc": 0.95, "val_err": 0.15}])
    fake_experiment(base, "b", 3, meta={"duration": 5.0, "status": "error", "exit_code": 1}, rows=[
        {"loss": 0.9, "acc": 0.1, "val_err": 0.9}])
    fake_experiment(base, "c", 4, meta={"duration": 1.0})
    fake_experiment(base, "d", 5, meta={"duration": 100.0}, sub="project", rows=[
        {"loss": 0.05, "acc": 0.99, "val_err": 0.01}])
    return base


A1, A2, B, C = (f"{n}_{STAMP.format(s)}" for n, s in (("a", 1), ("a", 2), ("b", 3), ("c", 4)))
D = f"project/d_{STAMP.format(5)}"


def _dirs(r) -> list[str]:
    assert_clean(r)
    return [row["dir"] for row in table_dicts(r.stdout)]


def test_ls_dir_column_and_results_one_level_down(results):
    r = ls(results)
    assert_clean(r)
    assert r.stderr == ""
    rows = table_dicts(r.stdout)
    assert list(rows[0]) == ["name", "status", "started", "duration", "runs", "loss", "acc", "val_err", "dir"]
    # Newest first; the dir column is relative to DIR, so the nested one shows its folder.
    assert [row["dir"] for row in rows] == [D, C, B, A2, A1]
    d = rows[0]
    assert (d["name"], d["status"], d["loss"], d["acc"], d["duration"]) == ("d", "finished", "0.05", "0.99", "1m40s")
    assert rows[1]["loss"] == "-"  # no metrics: a dash
    entries = ls_json(results)
    assert {e["name"] for e in entries} == {"a", "b", "c", "d"}
    nested = next(e for e in entries if e["name"] == "d")
    assert nested["work_dir"] == str(results / D)
    assert nested["dir"] == os.path.basename(D)

    # Listing the nested folder itself works too, relative to it.
    assert _dirs(ls(results / "project")) == [os.path.basename(D)]


def test_ls_columns_with_modes(results):
    r = ls(results, "--columns", "loss:min,acc:best,loss:max,acc:last,val_err")
    assert_clean(r)
    rows = {row["dir"]: row for row in table_dicts(r.stdout)}
    assert list(rows[A1]) == ["name", "status", "started", "duration", "runs", "loss (min)", "acc (best)",
                              "loss (max)", "acc", "val_err", "dir"]
    a1 = rows[A1]
    assert (a1["loss (min)"], a1["acc (best)"], a1["loss (max)"], a1["acc"], a1["val_err"]) == (
        "0.2", "0.9", "0.5", "0.8", "0.2")
    assert rows[C]["loss (min)"] == "-" and rows[C]["acc"] == "-"
    # A metric nobody logged is a column of dashes, not an error.
    r = ls(results, "--columns", "nope")
    assert_clean(r)
    assert {row["nope"] for row in table_dicts(r.stdout)} == {"-"}


@pytest.mark.parametrize("spec", ["loss:median", "loss:", "acc:best,loss:avg", ","])
def test_ls_bad_column_spec_is_a_clear_error(results, spec):
    r = ls(results, "--columns", spec)
    assert_clean(r, rc=2)
    assert r.stdout == ""
    assert r.stderr.startswith("exp: error: --columns")
    if spec != ",":
        assert "last, best, min, max" in r.stderr


def test_ls_best_is_min_for_loss_and_err_and_max_otherwise(results):
    r = ls(results, "--best")
    assert_clean(r)
    rows = {row["dir"]: row for row in table_dicts(r.stdout)}
    assert "loss (best)" in rows[A1] and "acc (best)" in rows[A1] and "val_err (best)" in rows[A1]
    assert (rows[A1]["loss (best)"], rows[A1]["acc (best)"], rows[A1]["val_err (best)"]) == ("0.2", "0.9", "0.1")
    assert (rows[A2]["loss (best)"], rows[A2]["acc (best)"], rows[A2]["val_err (best)"]) == ("0.1", "0.95", "0.15")
    # --best with --columns picks the best of the named ones; an explicit mode wins.
    r = ls(results, "--best", "--columns", "loss,acc:min")
    assert_clean(r)
    a1 = {row["dir"]: row for row in table_dicts(r.stdout)}[A1]
    assert (a1["loss (best)"], a1["acc (min)"]) == ("0.2", "0.7")


def test_ls_sort_by_metric_missing_values_last(results):
    assert _dirs(ls(results, "--sort", "loss")) == [D, A2, A1, B, C]
    assert _dirs(ls(results, "--sort", "loss", "--desc")) == [B, A1, A2, D, C]
    # A column in another mode sorts by what the column shows.
    assert _dirs(ls(results, "--columns", "loss:min", "--sort", "loss")) == [D, A2, A1, B, C]
    assert _dirs(ls(results, "--sort", "acc", "--desc")) == [D, A2, A1, B, C]
    # A metric nobody logged: nothing fails, and a warning says the order is unchanged (a typo?).
    r = ls(results, "--sort", "los")
    assert sorted(_dirs(r)) == sorted([A1, A2, B, C, D])
    assert "no experiment listed has a metric or sweep parameter 'los'" in r.stderr
    r = ls(results, "--desc")
    assert _dirs(r) == _dirs(ls(results)) and "--desc reverses --sort" in r.stderr
    assert ls(results, "--sort", "loss").stderr == ""
    # --json follows the same order.
    assert [e["dir"] for e in ls_json(results, "--sort", "loss", "--desc")] == [
        os.path.basename(x) for x in (B, A1, A2, D, C)]


def test_ls_lists_directories_of_the_same_second_newest_first(tmp_path):
    # Made within one second they share a timestamp and get _2, _3, ... _12: newest first means
    # _12 before _9 (a plain string order put _9 first).
    base = tmp_path / "r"
    stamp = "2026-01-01__00-00-00"
    for n in range(1, 13):
        d = base / (f"e_{stamp}" + (f"_{n}" if n > 1 else ""))
        d.mkdir(parents=True)
        (d / "metadata.json").write_text(json.dumps({"name": "e", "status": "finished",
                                                     "created_at": "2026-01-01T00:00:00+00:00"}))
    order = [os.path.basename(r["work_dir"]) for r in exp.list_experiments(base)]
    assert order == [f"e_{stamp}_{n}" for n in range(12, 1, -1)] + [f"e_{stamp}"], order
    # The dashboard's list too.
    assert [e.id for e in exp.ExperimentIndex(str(base), ttl=0).entries()] == order


def test_ls_sort_puts_infinities_in_order_and_nan_last_like_missing_values(tmp_path):
    base = tmp_path / "results"
    for second, loss in enumerate(["0.5", "nan", "-inf", "0.1", None, "inf"]):
        fake_experiment(base, f"e{second}", second, rows=[{"loss": loss, "acc": 1}])
    order = lambda *args: [row["name"] for row in table_dicts(ls(base, "--sort", "loss", *args).stdout)]
    assert order()[:4] == ["e2", "e3", "e0", "e5"] and set(order()[4:]) == {"e1", "e4"}
    assert order("--desc")[:4] == ["e5", "e0", "e3", "e2"] and set(order("--desc")[4:]) == {"e1", "e4"}
    assert [e["name"] for e in ls_json(base, "--sort", "loss", "--desc")][:4] == ["e5", "e0", "e3", "e2"]


def test_ls_of_one_experiment_directory_lists_it(results):
    one = next(p for p in Path(results).iterdir() if p.name.startswith("b_"))
    r = ls(one)
    assert_clean(r)
    (row,) = table_dicts(r.stdout)
    assert row["name"] == "b" and row["status"] == "error" and row["dir"] == "."
    (e,) = ls_json(one)
    assert e == json.loads(json.dumps(exp.json_safe(exp.ExperimentDir(one).summary())))


def test_ls_sort_by_fields(results):
    names = [row["name"] for row in table_dicts(ls(results, "--sort", "name").stdout)]
    assert names == ["a", "a", "b", "c", "d"]
    names = [row["name"] for row in table_dicts(ls(results, "--sort", "name", "--desc").stdout)]
    assert names == ["d", "c", "b", "a", "a"]
    assert _dirs(ls(results, "--sort", "started")) == [A1, A2, B, C, D]
    assert _dirs(ls(results, "--sort", "started", "--desc")) == [D, C, B, A2, A1]
    assert _dirs(ls(results, "--sort", "duration")) == [C, B, A1, A2, D]
    assert _dirs(ls(results, "--sort", "duration", "--desc")) == [D, A2, A1, B, C]


def test_ls_group_mean_and_std_over_repeats(results):
    r = ls(results, "--group")
    assert_clean(r)
    rows = {row["name"]: row for row in table_dicts(r.stdout)}
    header = list(rows["a"])
    assert header == ["name", "n", "status", "loss (mean ± std)", "acc (mean ± std)", "val_err (mean ± std)"]
    a = rows["a"]
    assert a["n"] == "2" and a["status"] == "2 finished"
    # Last values 0.3 and 0.1: mean 0.2, sample std 0.1414.
    assert a["loss (mean ± std)"] == "0.2 ± 0.14"
    assert a["acc (mean ± std)"] == "0.875 ± 0.11"
    # One member: its value alone, no std.
    assert rows["d"]["n"] == "1" and rows["d"]["loss (mean ± std)"] == "0.05"
    assert rows["b"]["status"] == "1 error" and rows["b"]["loss (mean ± std)"] == "0.9"
    assert rows["c"]["loss (mean ± std)"] == "-"

    r = ls(results, "--group", "--best", "--sort", "loss")
    assert_clean(r)
    grouped = table_dicts(r.stdout)
    assert [g["name"] for g in grouped] == ["d", "a", "b", "c"]
    assert grouped[1]["loss (best) (mean ± std)"] == "0.15 ± 0.071"  # best 0.2 and 0.1

    out = ls_json(results, "--group")
    assert {g["name"]: g["n"] for g in out} == {"a": 2, "b": 1, "c": 1, "d": 1}
    a = next(g for g in out if g["name"] == "a")
    assert a["statuses"] == {"finished": 2}
    assert a["metric_stats"]["loss"]["mean"] == pytest.approx(0.2) and a["metric_stats"]["loss"]["n"] == 2
    assert a["metric_stats"]["loss"]["std"] == pytest.approx(0.1414, abs=1e-3)
    d = next(g for g in out if g["name"] == "d")
    assert d["metric_stats"]["loss"] == {"mean": pytest.approx(0.05), "std": None, "n": 1}


def test_ls_groups_repeats_of_each_sweep_point_apart(tmp_path):
    """Repeats of lr=0.1 and of lr=0.2 share a name; averaging them together would mix the points compared."""
    base = tmp_path / "results"
    for second, lr, loss in ((1, 0.1, 1.0), (2, 0.1, 1.2), (3, 0.2, 2.0), (4, 0.2, 2.4), (5, None, 9.0)):
        fake_experiment(base, "s", second, meta={"params": {"lr": lr}} if lr is not None else None,
                        rows=[{"loss": loss}])
    r = ls(base, "--group")
    assert_clean(r)
    groups = table_dicts(r.stdout)
    assert sorted((g["params"], g["n"], g["loss (mean ± std)"]) for g in groups) == [
        ("-", "1", "9"), ("lr=0.1", "2", "1.1 ± 0.14"), ("lr=0.2", "2", "2.2 ± 0.28")]

    r = ls(base, "--group", "--sort", "lr", "--desc")
    assert_clean(r)
    assert "warning" not in r.stderr
    assert [g["params"] for g in table_dicts(r.stdout)] == ["lr=0.2", "lr=0.1", "-"]  # without lr: last

    out = ls_json(base, "--group", "--sort", "loss")
    assert [(g["params"], g["n"]) for g in out] == [({"lr": 0.1}, 2), ({"lr": 0.2}, 2), ({}, 1)]
    assert out[0]["metric_stats"]["loss"]["mean"] == pytest.approx(1.1)


def test_ls_group_says_over_how_many_members_a_mean_is_when_some_have_no_value(tmp_path):
    """A repeat that diverged (nan, inf) or never logged the metric must not look like a clean mean."""
    base = tmp_path / "results"
    for second, loss in ((1, "nan"), (2, 1.0), (3, "inf"), (4, 3.0)):
        fake_experiment(base, "r", second, rows=[{"loss": loss, "acc": 0.5}])
    r = ls(base, "--group")
    assert_clean(r)
    (g,) = table_dicts(r.stdout)
    assert (g["n"], g["loss (mean ± std)"], g["acc (mean ± std)"]) == ("4", "2 ± 1.4 (2 of 4)", "0.5 ± 0")


def test_ls_shows_each_metrics_last_logged_value_when_the_last_row_lacks_it(tmp_path):
    """A validation loss logged every N steps is empty in most rows: its last value is further up."""
    base = tmp_path / "results"
    rows = [{"step": s, "loss": 1 / (s + 1), "val_loss": 2 / (s + 1) if s % 10 == 0 else None} for s in range(25)]
    fake_experiment(base, "v", 1, rows=rows)
    fake_experiment(base, "w", 2, rows=[{"step": 0, "loss": 0.5, "val_loss": 0.01}])
    r = ls(base)
    assert_clean(r)
    by_name = {row["name"]: row for row in table_dicts(r.stdout)}
    assert (by_name["v"]["step"], by_name["v"]["loss"], by_name["v"]["val_loss"]) == ("24", "0.04", "0.09524")
    (v,) = [e for e in ls_json(base) if e["name"] == "v"]
    assert v["last_metrics"] == {"step": 24, "loss": 0.04, "val_loss": pytest.approx(2 / 21)}

    r = ls(base, "--sort", "val_loss")
    assert_clean(r)
    assert "warning" not in r.stderr
    assert [row["name"] for row in table_dicts(r.stdout)] == ["w", "v"]


def test_last_metrics_values_looks_a_bounded_way_up(tmp_path):
    """Each column's last non-empty cell, found within the last LAST_VALUES_MAX_ROWS rows only (ls and
    the dashboard read it for every experiment), or anywhere in a file of at most 64 KiB;
    last_metrics_row still gives the last row as it is."""
    path = tmp_path / "m.csv"
    n = exp.LAST_VALUES_MAX_ROWS + 10
    quoted = '"a,b"'
    pad = "p" * 40  # over 64 KiB in all: not a small file, which is read whole
    lines = ["step,once,sparse,text,pad"] + [
        f"{s},{'7' if s == 0 else ''},{'0.5' if s == n - 300 else ''},{quoted if s == n - 2 else ''},{pad}"
        for s in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.stat().st_size > 65536
    assert exp.last_metrics_values(str(path)) == {"step": n - 1, "sparse": 0.5, "text": "a,b", "pad": pad}
    assert exp.last_metrics_row(str(path)) == {"step": n - 1, "once": None, "sparse": None, "text": None, "pad": pad}
    # A small file is read whole: a value of the first row is found, however many rows follow.
    path.write_text("step,once\n0,7\n" + "".join(f"{s},\n" for s in range(1, n)), encoding="utf-8")
    assert path.stat().st_size < 65536
    assert exp.last_metrics_values(str(path)) == {"step": n - 1, "once": 7}
    # A torn last row is not a value.
    path.write_text("step,loss\n0,0.5\n1,", encoding="utf-8")
    assert exp.last_metrics_values(str(path)) == {"step": 0, "loss": 0.5}
    assert exp.last_metrics_values(str(tmp_path / "missing.csv")) == {}
    # A column never logged has no value (not its own name, read from the header), in a short file too.
    path.write_text("step,loss,val\n1,0.5,\n", encoding="utf-8")
    assert exp.last_metrics_values(str(path)) == {"step": 1, "loss": 0.5}
    assert exp.last_metrics_row(str(path)) == {"step": 1, "loss": 0.5, "val": None}
    path.write_text("step,loss,val\n1,0.5\n", encoding="utf-8")  # rows narrower than the header: none
    assert exp.last_metrics_values(str(path)) == exp.last_metrics_row(str(path)) == {}
    # Long rows: the wide window holds fewer rows than the one before it; a value found there is kept.
    pad = "x" * 8000
    path.write_text("step,val,never,pad\n" + "".join(f"{i},{'0.7' if i == 800 else ''},,{pad}\n" for i in range(1000)),
                    encoding="utf-8")
    assert exp.last_metrics_values(str(path)) == {"step": 999, "val": 0.7, "pad": pad}


def test_ls_columns_without_a_name_before_the_mode_is_an_error():
    with pytest.raises(exp.ConfigError, match="name the metric before ':'"):
        exp.parse_columns(":best")
    assert exp.parse_columns("loss:best,acc") == [("loss", "best"), ("acc", "last")]


def test_ls_columns_warns_of_a_name_no_experiment_has(results):
    r = ls(results, "--columns", "los,loss:best")
    assert_clean(r)
    assert "no experiment listed has a value for 'los'" in r.stderr and "loss" in r.stderr
    assert "'loss'" not in r.stderr
    r = ls(results, "--columns", "loss,acc:max")
    assert_clean(r)
    assert r.stderr == ""
    r = ls(results, "--group", "--columns", "nosuch")
    assert_clean(r)
    assert "'nosuch'" in r.stderr
    # A group's mean of values that are all NaN shows "-", but they are values: no warning.
    base = results.parent / "all_nan"
    fake_experiment(base, "n", 1, rows=[{"loss": "nan"}])
    r = ls(base, "--group", "--columns", "loss")
    assert_clean(r)
    assert table_dicts(r.stdout)[0]["loss (mean ± std)"] == "-" and r.stderr == ""
    # --json prints whole summaries: the table's columns do not apply, and it says so.
    r = ls(results, "--json", "--columns", "loss")
    assert_clean(r)
    assert "--json prints each experiment's whole summary" in r.stderr
    assert strict_json(r.stdout)
    r = ls(results, "--json", "--group", "--columns", "loss")
    assert_clean(r)
    assert r.stderr == ""


def test_ls_more_than_six_metrics_notes_the_hidden_ones(tmp_path):
    base = tmp_path / "results"
    metrics = {f"m{i}": i for i in range(1, 9)}
    fake_experiment(base, "wide", 1, rows=[metrics])
    r = ls(base)
    assert_clean(r)
    (row,) = table_dicts(r.stdout)
    assert [k for k in row if k.startswith("m")] == ["m1", "m2", "m3", "m4", "m5", "m6"]
    assert "2 more metric(s) not shown (m7, m8)" in r.stderr
    assert "--columns" in r.stderr
    # Named columns, or --json: no note, nothing hidden.
    r = ls(base, "--columns", "m8,m1")
    assert_clean(r)
    assert r.stderr == ""
    assert [k for k in table_dicts(r.stdout)[0] if k.startswith("m")] == ["m8", "m1"]
    r = ls(base, "--json")
    assert_clean(r)
    assert r.stderr == ""
    assert strict_json(r.stdout)[0]["last_metrics"] == metrics
    # Six exactly: no note.
    fake_experiment(base / "six", "six", 2, rows=[{f"s{i}": i for i in range(6)}])
    r = ls(base / "six")
    assert_clean(r)
    assert r.stderr == ""


def test_ls_none_match_and_empty_messages(results, tmp_path):
    r = ls(results, "--status", "killed")
    assert_clean(r)
    assert "match" in r.stdout and "--status killed" in r.stdout
    assert "5 experiment(s)" in r.stdout
    r = ls(results, "--name", "^zzz")
    assert_clean(r)
    assert "match" in r.stdout and "--name ^zzz" in r.stdout
    assert _dirs(ls(results, "--status", "error")) == [B]
    assert ls_json(results, "--status", "killed") == []

    # --status error where nothing failed: "none match", not "no experiments".
    fine = tmp_path / "fine"
    fake_experiment(fine, "ok", 1)
    r = ls(fine, "--status", "error")
    assert_clean(r)
    assert r.stdout.strip() == f"no experiments under {fine} match --status error (1 experiment(s) there)"

    empty = tmp_path / "empty"
    empty.mkdir()
    r = ls(empty, "--status", "error")
    assert_clean(r)
    assert r.stdout.strip() == f"no experiments under {empty}"
    assert ls_json(empty) == []

    r = ls(tmp_path / "missing")
    assert_clean(r, rc=2)
    assert "is not a directory" in r.stderr


# ============================================================================
# 3. ls | head -1
# ============================================================================


def _many(base, n: int) -> None:
    base.mkdir(parents=True)
    for i in range(n):
        d = base / f"e{i:05d}_{STAMP.format(0)}"
        d.mkdir()
        (d / "metadata.json").write_text(
            f'{{"name": "e{i:05d}", "status": "finished", "started_at": "2025-01-01T00:00:00+00:00"}}',
            encoding="ascii")


@posix_only
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("head") is None, reason="needs bash and head")
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["table", "json"])
def test_ls_into_head_has_no_traceback(tmp_path, extra):
    base = tmp_path / "results"
    _many(base, 3000)  # far more than a pipe holds, so head closes it while ls still writes
    line = shlex.join(map(str, [PY, EXP_PY, "ls", base, *extra]))
    r = subprocess.run(["bash", "-c", f"{line} | head -1; exit ${{PIPESTATUS[0]}}"], env=child_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.stderr == ""
    assert r.returncode == 0
    assert r.stdout.count("\n") == 1
    assert r.stdout.startswith("[" if extra else "name")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_to_a_full_disk_is_a_clear_error(tmp_path, unbuffered):
    base = tmp_path / "results"
    _many(base, 300)
    cfg = write_toml(tmp_path / "c.toml", '[[experiments]]\nname = "a"\ncommand = "true"\n')
    for args in (["ls", base], ["ls", base, "--json"], ["ls", base, "--group"], ["run", cfg, "--dry-run"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([PY, EXP_PY, *map(str, args)], stdout=full, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env=child_env(PYTHONUNBUFFERED=unbuffered or None),
                               timeout=120)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr == "exp: error: could not write the output: No space left on device\n", (args, r.stderr)
    assert not (tmp_path / "results" / ".exp_state").exists()


# ============================================================================
# 4. Names and paths that cannot become directories
# ============================================================================

BAD_NAMES = {
    "newline": "run\nname",
    "tab": "run\tname",
    "escape": "run\x1b[31mred",
    "bell": "run\x07",
    "delete": "run\x7fname",
    "c1_control": "run\x85name",
    "bytes_240": "x" * 240,
    "multibyte_240_bytes": "\u00e9" * 120,  # 120 characters, 240 bytes
    "dot": ".",
    "dotdot": "..",
    "hidden": ".hidden",  # a directory ls and the dashboard would skip
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_name_is_a_config_error_before_anything_starts(tmp_path, case):
    name = BAD_NAMES[case]
    marker = tmp_path / "ran"
    cfg = write_toml(tmp_path / "c.toml", f'[scheduler]\nbase_experiment_dir = "results"\n\n[[experiments]]\n'
                                          f'name = {toml_str(name)}\ncommand = "touch {marker}"\n')
    for args in (("run", cfg), ("run", cfg, "--dry-run")):
        r = cli(*args, cwd=tmp_path)
        assert_clean(r, rc=2)
        assert r.stderr.startswith("exp: error:")
        assert "experiments[0].name" in r.stderr
        expected = "bytes long" if "240" in case else "starts with '.'" if name[0] == "." else "control character"
        assert expected in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # no results/, no .exp_state, not run

    with pytest.raises(exp.ConfigError):
        exp.Experiment(name=name, command=f"touch {marker}", base_dir=tmp_path / "api")
    assert not (tmp_path / "api").exists()
    assert not marker.exists()


@pytest.mark.parametrize("where", ["scheduler", "experiment"])
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_a_base_dir_that_cannot_be_made_is_a_config_error_before_anything_starts(tmp_path, where, case):
    (tmp_path / "notes.txt").write_text("not a directory\n")
    base = "notes.txt" if case == "a file" else "notes.txt/results"
    marker = tmp_path / "ran"
    key = f'[scheduler]\nbase_experiment_dir = "{base}"\n\n' if where == "scheduler" else ""
    cfg = write_toml(tmp_path / "c.toml", f'{key}[[experiments]]\nname = "x"\ncommand = "touch {marker}"\n'
                                          + (f'base_dir = "{base}"\n' if where == "experiment" else ""))
    for args in (("run", cfg, "--dry-run"), ("run", cfg)):
        r = cli(*args, cwd=tmp_path)
        assert_clean(r, rc=2)
        assert r.stderr.startswith("exp: error:")
        expected = "is a file, not a directory" if case == "a file" else f"is under {tmp_path / 'notes.txt'}, which is a file"
        assert expected in r.stderr, r.stderr
        assert "1 problem:" in r.stderr, r.stderr  # said once, not once per experiment or table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "notes.txt"]  # nothing made, nothing run
    assert exp.base_dir_problem(str(tmp_path / "new" / "deeper")) is None  # made when needed: fine


def test_a_base_dir_on_a_read_only_file_system_is_a_config_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with tmpfs(ro, "1m"):
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {r.stderr.strip()}")
        cfg = write_toml(tmp_path / "c.toml", '[[experiments]]\nname = "x"\ncommand = "true"\n'
                                              'base_dir = "ro/results"\n')
        r = cli("run", cfg, "--dry-run", cwd=tmp_path)
        assert_clean(r, rc=2)
        assert f"no permission to create {ro}, or it is on a read-only file system" in r.stderr, r.stderr


@pytest.mark.parametrize("text, most", [
    ('[[experiments]]\nname = "a"\ncommand = "true"\nrepeats = 100000000\n', "experiments[0] (a) has repeats = 100000000"),
    ('[[experiments]]\nname = "a"\ncommand = "true"\n\n[[experiments]]\nname = "s{i}"\ncommand = "true"\n'
     'repeats = 11\n[experiments.sweep]\ni = [' + ", ".join(map(str, range(10000))) + ']\n',
     "(s0) has repeats = 11"),
])
def test_a_batch_of_more_experiments_than_the_limit_is_a_config_error(tmp_path, text, most):
    """A typo such as repeats = 100000000 is exit 2 at once, not a scheduler filling memory."""
    cfg = write_toml(tmp_path / "c.toml", text)
    for args in (("run", cfg, "--dry-run"), ("run", cfg)):
        r = cli(*args, cwd=tmp_path)
        assert_clean(r, rc=2)
        assert f"at most {exp.BATCH_MAX_EXPERIMENTS} are allowed in one batch" in r.stderr, r.stderr
        assert most in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
    # At the limit it is fine.
    cfg = write_toml(tmp_path / "ok.toml", '[[experiments]]\nname = "a"\ncommand = "true"\n'
                                           f"repeats = {exp.BATCH_MAX_EXPERIMENTS}\n")
    assert sum(s.repeats for s in exp.load_config(str(cfg)).experiments) == exp.BATCH_MAX_EXPERIMENTS


def test_name_of_the_longest_allowed_length_works(tmp_path):
    longest = "y" * 229
    e = exp.Experiment(name=longest, command="exit 0", base_dir=tmp_path / "api")
    assert os.path.isdir(e.work_dir)
    with pytest.raises(exp.ConfigError, match="use at most 229 bytes"):
        exp.Experiment(name=longest + "y", command="exit 0", base_dir=tmp_path / "api2")
    assert not (tmp_path / "api2").exists()
    # A hundred and more of that name in one second (a big sweep of repeats) still fit: the
    # first 120 of this second and the next two are taken, so the next one is _121 or more.
    many = tmp_path / "many"
    many.mkdir()
    now = time.time()
    for ahead in range(3):
        stamp = time.strftime(exp.TIMESTAMP_FORMAT, time.localtime(now + ahead))
        for n in range(1, 121):
            (many / f"{longest}_{stamp}{'' if n == 1 else f'_{n}'}").mkdir(exist_ok=True)
    d, _ = exp.ExperimentDir.create(str(many), longest)
    assert int(re.search(r"_(\d+)$", d.path).group(1)) > 120
    assert len(os.path.basename(d.path)) <= 255 and os.path.isdir(os.path.join(d.path, "metrics"))


def test_more_of_one_name_in_a_second_than_the_suffix_allows_take_the_next_second(tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "_SAME_SECOND_MAX", 2)
    made = [exp.ExperimentDir.create(str(tmp_path), "n")[0].path for _ in range(5)]
    assert len(set(made)) == 5
    suffixes = [re.search(r"__\d\d-\d\d-\d\d(?:_(\d+))?$", p).group(1) for p in made]
    assert all(n is None or int(n) <= 2 for n in suffixes), suffixes


def test_base_dir_past_path_max_is_a_config_error(tmp_path):
    deep = tmp_path.joinpath(*(["d" * 200] * 21))  # over 4096 bytes; no directory of it exists
    assert len(os.fsencode(str(deep))) > 4096
    cfg = write_toml(tmp_path / "c.toml", f"[scheduler]\nbase_experiment_dir = {toml_str(str(deep))}\n\n"
                                          '[[experiments]]\nname = "ok"\ncommand = "exit 0"\n')
    for args in (("run", cfg), ("run", cfg, "--dry-run")):
        r = cli(*args, cwd=tmp_path)
        assert_clean(r, rc=2)
        assert "longer than" in r.stderr and "experiments[0].name" in r.stderr
    # Per experiment base_dir too.
    cfg2 = write_toml(tmp_path / "c2.toml", '[scheduler]\nbase_experiment_dir = "results"\n\n[[experiments]]\n'
                                            f'name = "ok"\ncommand = "exit 0"\nbase_dir = {toml_str(str(deep))}\n')
    r = cli("run", cfg2, cwd=tmp_path)
    assert_clean(r, rc=2)
    assert "longer than" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "c2.toml"]

    with pytest.raises(exp.ConfigError, match="longer than"):
        exp.Experiment(name="ok", command="exit 0", base_dir=deep)
    # Short enough for the base directory, too long once the experiment's own paths are added.
    target = 4096 - 60
    length, parts = len(os.fsencode(str(tmp_path))), []
    while length + 201 <= target - 2:
        parts.append("e" * 200)
        length += 201
    parts.append("e" * (target - length - 1))
    almost = tmp_path.joinpath(*parts)
    assert len(os.fsencode(str(almost))) == target
    with pytest.raises(exp.ConfigError, match="longer than"):
        exp.Experiment(name="n" * 50, command="exit 0", base_dir=almost)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "c2.toml"]


def test_the_longest_base_dir_the_check_accepts_holds_a_whole_run(tmp_path, make_exp):
    """At the limit the check draws, every file a run makes still fits: metadata rewrites and CSV
    rewrites through temp names (pid and thread id), from the main thread and from another."""
    name = "n" * 100

    def accepted(length: int) -> bool:
        base = str(tmp_path) + "/" + "b" * (length - len(str(tmp_path)) - 1)
        try:
            exp.check_experiment_path(base, name)
        except exp.ConfigError:
            return False
        return True

    lo, hi = len(str(tmp_path)) + 2, 4096
    while lo < hi:  # the longest accepted base path, by bisection
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if accepted(mid) else (lo, mid - 1)
    assert 3000 < lo < 4096 - len(name)
    tail = lo - len(str(tmp_path)) - 1
    parts = ["b" * 200] * (tail // 201) + ["b" * (tail - 201 * (tail // 201) - 1)] if tail % 201 else \
        ["b" * 200] * (tail // 201)
    base = tmp_path.joinpath(*[p for p in parts if p])
    assert len(os.fsencode(str(base))) in (lo, lo - 1)
    script = write_script(tmp_path, "rows.py", """
        import threading, exp
        e = exp.load_experiment()
        e.upd_row(step=0, loss=1.0); e.save_row()
        e.upd_row(step=1, loss=0.5, acc=0.1); e.save_row()  # a new column: the CSV is rewritten
        t = threading.Thread(target=lambda: (e.upd_row(step=2, lr=0.1), e.save_row()))
        t.start(); t.join()
        e.append_log("rows saved")
    """)
    e = make_exp(name, py_cmd(script), base_dir=str(base))
    assert e.run() == 0, e.read_log()[-2000:]
    assert [r["step"] for r in e.metrics()] == [0, 1, 2]
    assert e.read_metadata()["status"] == exp.FINISHED
    assert not [p for p in os.listdir(e.work_dir) if p.endswith(".tmp")]


# ============================================================================
# 5. max_retries without auto_restart_on_error
# ============================================================================

WARNING_RE = re.compile(r"^exp: warning: .*max_retries.*auto_restart_on_error", re.M)


@posix_only
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
def test_max_retries_without_auto_restart_warns(tmp_path, dry_run):
    cfg = write_toml(tmp_path / "c.toml", '[scheduler]\nbase_experiment_dir = "results"\n\n'
                                          '[[experiments]]\nname = "w"\ncommand = "exit 0"\nmax_retries = 2\n')
    r = cli("run", cfg, *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert_clean(r)
    assert WARNING_RE.search(r.stderr), r.stderr
    assert "experiments[0] (w)" in r.stderr
    assert (tmp_path / "results").exists() is not dry_run

    cfg = write_toml(tmp_path / "ok.toml", '[scheduler]\nbase_experiment_dir = "results2"\n'
                                           "auto_restart_on_error = true\n\n"
                                           '[[experiments]]\nname = "w"\ncommand = "exit 0"\nmax_retries = 2\n')
    r = cli("run", cfg, *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert_clean(r)
    assert "warning" not in r.stderr
    assert exp.parse_config(cfg.read_text(), root=str(tmp_path)).warnings == []


# ============================================================================
# 6. Exit code 127 is not retried
# ============================================================================


@posix_only
def test_command_not_found_is_not_retried_but_other_failures_are(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", '[scheduler]\nbase_experiment_dir = "results"\n'
                                          "auto_restart_on_error = true\n\n"
                                          '[[experiments]]\nname = "notfound"\ncommand = "no-such-command-xyz"\n'
                                          "max_retries = 3\n\n"
                                          '[[experiments]]\nname = "three"\ncommand = "exit 3"\nmax_retries = 2\n')
    r = cli("run", cfg, cwd=tmp_path)
    assert_clean(r, rc=1)
    assert re.search(r"not retrying notfound: exit code 127 means the command was not found", r.stdout), r.stdout
    assert "retrying notfound" not in r.stdout.replace("not retrying notfound", "")
    assert r.stdout.count("started  notfound") == 1
    assert r.stdout.count("started  three") == 3
    entries = {e["name"]: e for e in ls_json(tmp_path / "results")}
    assert entries["notfound"]["runs"] == 1 and entries["notfound"]["exit_code"] == 127
    assert entries["three"]["runs"] == 3 and entries["three"]["exit_code"] == 3
    assert entries["notfound"]["status"] == entries["three"]["status"] == "error"


# ============================================================================
# 7. EXPERIMENT_REPEAT
# ============================================================================

WRITE_REPEAT = 'printf %s "$EXPERIMENT_REPEAT" > "$EXPERIMENT_WORK_DIR/repeat.txt"'


@posix_only
def test_experiment_repeat_is_the_one_based_repeat_index(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", '[scheduler]\nbase_experiment_dir = "results"\n'
                                          "max_concurrent_experiments = 3\n\n"
                                          f'[[experiments]]\nname = "rep"\ncommand = {toml_str(WRITE_REPEAT)}\n'
                                          "repeats = 3\n")
    r = cli("run", cfg, cwd=tmp_path)
    assert_clean(r)
    dirs = [d for d in (tmp_path / "results").iterdir() if d.name.startswith("rep_")]
    assert len(dirs) == 3
    assert sorted((d / "repeat.txt").read_text() for d in dirs) == ["1", "2", "3"]


@posix_only
def test_experiment_repeat_is_1_outside_a_batch(make_exp):
    e = make_exp("single", WRITE_REPEAT)
    assert e.run() == 0
    assert Path(e.work_dir, "repeat.txt").read_text() == "1"


# ============================================================================
# 8. String metrics stay as written
# ============================================================================


@posix_only
def test_string_metrics_that_look_like_numbers_round_trip(make_exp, tmp_path, base_dir):
    script = write_script(tmp_path, "train.py", """
        import exp
        e = exp.load_experiment()
        e.upd_row(code="007", plus="+5", n=7, x=1.5, under="1_000", neg=-2, sci=2.5e-05)
        e.save_row()
    """)
    e = make_exp("strings", py_cmd(script))
    assert e.run() == 0
    (row,) = e.metrics()
    assert row == {"code": "007", "plus": "+5", "n": 7, "x": 1.5, "under": "1_000", "neg": -2, "sci": 2.5e-05}
    assert type(row["n"]) is int and type(row["x"]) is float and type(row["code"]) is str
    assert exp.read_metrics(e.metrics_file()) == [row]

    (entry,) = ls_json(base_dir)
    assert entry["last_metrics"] == {"n": 7, "x": 1.5, "neg": -2, "sci": 2.5e-05}  # numbers
    assert entry["last_text"] == {"code": "007", "plus": "+5", "under": "1_000"}  # and text, as written
    r = ls(base_dir)
    assert_clean(r)
    (trow,) = table_dicts(r.stdout)
    assert (trow["code"], trow["plus"], trow["n"], trow["x"]) == ("007", "+5", "7", "1.5")
    # As the README says: plain decimal notation reads as a number, whatever wrote it.
    assert [exp.parse_metric(t) for t in ("1.10", "0.9500", "2e-05", "-0", "True")] == [1.1, 0.95, 2e-05, 0, True]
    assert [exp.parse_metric(t) for t in ("007", "+5", "1_000", "0x1f", " 1")] == ["007", "+5", "1_000", "0x1f", " 1"]


# ============================================================================
# 9. Failure reports echo clean lines; the [exp] line starts its own line
# ============================================================================

NOISY = """
    import sys
    out = sys.stdout
    out.write("\\x1b[31mred error\\x1b[0m\\n")
    out.write("\\x1b]0;evil title\\x07after title\\n")
    out.write("bell\\x07here\\n")
    out.write("\\x1b[2J\\x1b[Hcleared\\r\\n")
    out.write("y" * 5000 + "\\n")
    out.write("last line without newline")
    out.flush()
    sys.exit(4)
"""


@posix_only
def test_failure_report_lines_are_clean_and_the_end_line_starts_its_own_line(tmp_path):
    script = write_script(tmp_path, "noisy.py", NOISY)
    cfg = write_toml(tmp_path / "c.toml", '[scheduler]\nbase_experiment_dir = "results"\n\n'
                                          f'[[experiments]]\nname = "noisy"\ncommand = {toml_str(py_cmd(script))}\n')
    r = subprocess.run([PY, EXP_PY, "run", str(cfg)], cwd=str(tmp_path), env=child_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=CLI_TIMEOUT)
    out = r.stdout.decode("utf-8")
    assert r.returncode == 1, out
    assert b"Traceback" not in r.stderr
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 220
    echoed = [ln.strip() for ln in lines]
    for text in ("red error", "after title", "bellhere", "cleared", "last line without newline"):
        assert text in echoed, (text, lines)
    long_line = next(ln for ln in echoed if ln.startswith("yyyy"))
    assert long_line.endswith("\u2026") and len(long_line) < 5000
    assert "evil title" not in out
    assert "failed   noisy (exit code 4)" in out

    (work_dir,) = (tmp_path / "results").glob("noisy_*")
    log = (work_dir / "terminal_logs" / "run_0001.log").read_text(encoding="utf-8")
    assert "last line without newline\n[exp] " in log
    end_lines = [ln for ln in log.splitlines() if " ended: " in ln]
    assert len(end_lines) == 1 and end_lines[0].startswith("[exp] ")
    assert "exit code 4 (error)" in end_lines[0]
    # The log itself keeps what the command wrote.
    assert "\x1b[31mred error" in log


@pytest.mark.parametrize("raw, shown", [
    ("\x1bc reset", " reset"),                      # ESC c: reset the terminal
    ("\x1b(0lqk\x1b(B text", "lqk text"),           # character sets switched and back
    ("\x1b]0;evil title\x07after", "after"),        # OSC: the window title
    ("\x1bP1;2|data\x1b\\after", "after"),          # DCS with its string
    ("\x1b_apc\x1b\\after", "after"),               # APC with its string
    ("\x9d0;t\x9cafter", "after"),                  # 8-bit OSC
    ("\x9b31mred", "red"),                          # 8-bit CSI
    ("a\u202eevil\u202c b", "aevil b"),              # bidirectional override
    ("x\u2028y\u2029z", "xyz"),                      # line and paragraph separators
    ("\x1b7saved\x1b8", "saved"),                   # save and restore the cursor
    ("caf\u00e9 \u6570\u636e\ttab", "caf\u00e9 \u6570\u636e    tab"),  # text stays
])
def test_clean_line_removes_every_escape_and_invisible_control(raw, shown):
    assert exp.clean_line(raw) == shown


# ============================================================================
# 10. Ten thousand experiments
# ============================================================================


def test_ls_json_lists_ten_thousand_experiments(tmp_path):
    base = tmp_path / "results"
    _many(base, 10_000)
    entries = ls_json(base, timeout=120)
    assert len(entries) == 10_000
    assert {e["name"] for e in entries} == {f"e{i:05d}" for i in range(10_000)}
    assert all(e["status"] == "finished" for e in entries)


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_ls_columns_line_up_with_wide_characters(tmp_path, encoding):
    # Columns were padded by characters: a Chinese name (two terminal columns a character),
    # or its \uXXXX escape on an ASCII stdout, pushed the rest of its row out of line.
    import unicodedata

    base = tmp_path / "results"
    for name in ("实验一", "ok", "mixed实验"):
        exp.Experiment(name=name, command="true", base_dir=str(base), cwd=str(tmp_path))

    def columns(line):  # the terminal column where each field after the first starts
        at, pos, starts = 0, 0, []
        while pos < len(line):
            if line[pos] == " " and pos + 1 < len(line) and line[pos + 1] != " " and line[pos - 1] == " ":
                starts.append(at + 1)
            at += 2 if unicodedata.east_asian_width(line[pos]) in "WF" else 1
            pos += 1
        return starts

    r = subprocess.run([sys.executable, EXP_PY, "ls", str(base)], capture_output=True, timeout=CLI_TIMEOUT,
                       env=child_env(PYTHONIOENCODING=encoding))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode(encoding).splitlines()
    assert len(lines) == 4 and ("\\u5b9e" in r.stdout.decode(encoding)) == (encoding == "ascii"), lines
    assert len({tuple(columns(ln)[:2]) for ln in lines}) == 1, lines  # "status" and "started" line up


# ============================================================================
# A run whose process is gone without a recorded end
# ============================================================================


def ls_by_name(base) -> dict:
    r = ls(base, "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in strict_json(r.stdout)}


@posix_only
def test_a_standalone_script_killed_with_sigkill_is_not_shown_running_for_ever(tmp_path):
    # Its exit handler never ran: metadata.json says running; the process is gone (the OOM killer).
    script = tmp_path / "train.py"
    script.write_text("import exp, time, sys\n"
                      "e = exp.load_experiment(standalone=True)\n"
                      "e.upd_row(step=0); e.save_row()\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(120)\n")
    base = tmp_path / "results"
    env = child_env(PYTHONPATH=str(Path(EXP_PY).parent))
    env.pop("EXPERIMENT_WORK_DIR", None)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        row = ls_by_name(base)["train"]
        assert (row["status"], row["pid"]) == ("running", proc.pid)  # alive: running
    finally:
        proc.kill()
        proc.wait(30)
    row = ls_by_name(base)["train"]
    assert row["status"] == "error", row
    assert row["reason"].startswith("its process is gone and nothing recorded how it ended"), row
    assert exp.read_json(Path(row["work_dir"]) / "metadata.json")["status"] == "running"  # ls only reads
    assert "train" not in (ls(base, "--status", "running").stdout or "")
    assert "train" in ls(base, "--status", "error").stdout


@posix_only
def test_an_end_kept_out_of_metadata_is_taken_from_the_supervisors_exit_status(tmp_path, make_exp):
    # A full disk at the run's end: metadata.json still says running, while the supervisor's
    # "[exp] exit status N" is in the log and the process is long gone.
    shown = {}
    for name, code in (("bad", 3), ("good", 0), ("sig", 137)):
        e = make_exp(name=name, command=f"exit {code}" if code != 137 else "sh -c 'kill -9 $$'")
        e.run()
        path = Path(e.work_dir) / "metadata.json"
        meta = exp.read_json(path)
        meta.update(status="running", ended_at=None, exit_code=None, reason=None, pid=meta["runs"][0]["pid"])
        meta["runs"][-1].update(ended_at=None, status="running")
        path.write_text(json.dumps(meta))
        shown[name] = ls_by_name(e.base_dir)[name]
    assert (shown["bad"]["status"], shown["bad"]["reason"]) == (
        "error", "exit code 3 (its end was not recorded in metadata.json)")
    assert (shown["good"]["status"], shown["good"]["reason"]) == ("finished", None)
    assert (shown["sig"]["status"], shown["sig"]["reason"]) == (
        "error", "signal SIGKILL (its end was not recorded in metadata.json)")


def test_a_run_of_another_machine_or_without_a_pid_stays_running(tmp_path):
    base = tmp_path / "results"
    for name, meta in (("remote", {"hostname": "elsewhere.example", "pid": 4_000_000}),
                       ("nopid", {"hostname": exp._hostname(), "pid": None})):
        d = base / f"{name}_2026-01-01__00-00-00"
        (d / "terminal_logs").mkdir(parents=True)
        (d / "metadata.json").write_text(json.dumps({
            "name": name, "status": "running", "current_run_id": "run_0001", "started_at": "2026-01-01T00:00:00+00:00",
            "runs": [{"id": "run_0001", "pid": meta["pid"], "started_at": "2026-01-01T00:00:00+00:00"}], **meta}))
    rows = ls_by_name(base)
    assert rows["remote"]["status"] == rows["nopid"]["status"] == "running"


@linux_only
def test_a_pid_reused_by_a_later_process_is_not_taken_for_the_run(tmp_path):
    # The recorded pid now belongs to a process that started after the run: the run is gone.
    base = tmp_path / "results"
    d = base / "old_2026-01-01__00-00-00"
    (d / "terminal_logs").mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps({
        "name": "old", "status": "running", "current_run_id": "run_0001", "hostname": exp._hostname(),
        "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00",
        "runs": [{"id": "run_0001", "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00"}]}))
    assert ls_by_name(base)["old"]["status"] == "error"


@pytest.mark.parametrize("tz", ["UTC0", "CST-8"])  # POSIX TZ strings: no tz database needed
def test_ls_orders_and_shows_start_times_written_in_other_time_zones_as_the_instants_they_are(tmp_path, tz):
    # "first" was written on a machine 8 hours ahead, two seconds before "second" (on UTC):
    # compared as text it looked 8 hours newer, and each showed its writer's wall clock.
    base = tmp_path / "results"
    fake_experiment(base, "first", 1, {"started_at": "2026-01-01T18:00:00+08:00"})
    fake_experiment(base, "second", 2, {"started_at": "2026-01-01T10:00:02+00:00"})
    fake_experiment(base, "nostart", 3, {"started_at": None, "created_at": None})
    env = child_env(TZ=tz)
    r = cli("ls", base, env=env)
    assert r.returncode == 0, r.stderr
    rows = table_dicts(r.stdout)
    assert [row["name"] for row in rows] == ["second", "first", "nostart"], r.stdout
    shown = {"UTC0": ("2026-01-01 10:00:00", "2026-01-01 10:00:02"),
             "CST-8": ("2026-01-01 18:00:00", "2026-01-01 18:00:02")}[tz]
    assert (rows[1]["started"], rows[0]["started"]) == shown, r.stdout
    r = cli("ls", base, "--sort", "started", env=env)
    assert [row["name"] for row in table_dicts(r.stdout)] == ["first", "second", "nostart"], r.stdout
    r = cli("ls", base, "--sort", "started", "--desc", env=env)
    assert [row["name"] for row in table_dicts(r.stdout)] == ["second", "first", "nostart"], r.stdout


# ============================================================================
# What a new user's review of `exp ls` found
# ============================================================================


def test_ls_a_metric_named_like_a_column_has_its_own_header_and_json_sort_works(tmp_path):
    # A metric called `dir` (or `status`) used to give the table two `dir` columns, and `--json
    # --sort` (which found the directory column by its name) a KeyError traceback.
    base = tmp_path / "results"
    fake_experiment(base, "x", 1, rows=[{"loss": 0.3, "dir": 2, "status": 7}])
    fake_experiment(base, "y", 2, rows=[{"loss": 0.1, "dir": 1, "status": 8}])
    r = ls(base)
    assert_clean(r)
    rows = table_dicts(r.stdout)
    assert list(rows[0]) == ["name", "status", "started", "duration", "runs", "loss", "dir (last)",
                             "status (last)", "dir"]
    assert {row["name"]: (row["dir (last)"], row["dir"], row["status"]) for row in rows} == {
        "x": ("2", f"x_{STAMP.format(1)}", "finished"), "y": ("1", f"y_{STAMP.format(2)}", "finished")}
    assert [e["name"] for e in ls_json(base, "--sort", "loss")] == ["y", "x"]
    assert [e["name"] for e in ls_json(base, "--sort", "loss", "--desc")] == ["x", "y"]
    # A metric named like a field: --sort takes the metric (what the column shows).
    assert [row["name"] for row in table_dicts(ls(base, "--sort", "dir").stdout)] == ["y", "x"]
    assert [e["name"] for e in ls_json(base, "--sort", "dir", "--desc")] == ["x", "y"]


def test_ls_shows_text_and_true_false_metrics_as_written(tmp_path):
    base = tmp_path / "results"
    long_text = "a very long note " * 10
    fake_experiment(base, "x", 1, rows=[{"loss": 0.5, "code": "007", "phase": "warmup", "ok": False, "note": "-"},
                                        {"loss": 0.3, "code": "007", "phase": "train", "ok": True,
                                         "note": long_text}])
    fake_experiment(base, "y", 2, rows=[{"loss": 0.2, "code": "042", "phase": "eval", "ok": False}])
    r = ls(base, "--columns", "code,phase,ok,loss")
    assert_clean(r)
    assert r.stderr == ""  # no "no experiment listed has a value" for values that are text
    rows = {row["name"]: row for row in table_dicts(r.stdout)}
    assert (rows["x"]["code"], rows["x"]["phase"], rows["x"]["ok"], rows["x"]["loss"]) == ("007", "train", "True", "0.3")
    assert (rows["y"]["code"], rows["y"]["phase"], rows["y"]["ok"]) == ("042", "eval", "False")
    # Without --columns every metric has a column, numbers first; a long text is cut in the table.
    r = ls(base)
    assert_clean(r)
    rows = {row["name"]: row for row in table_dicts(r.stdout)}
    assert list(rows["x"])[5:10] == ["loss", "code", "phase", "ok", "note"]
    assert rows["x"]["note"] == "a very long note a very long note a ver…" == long_text[:39] + "…"
    assert exp.LS_TEXT_CELL_CHARS == 40
    assert rows["y"]["note"] == "-"
    # Sorted as text; --json has them whole under last_text.
    assert [row["name"] for row in table_dicts(ls(base, "--sort", "phase").stdout)] == ["y", "x"]
    entries = {e["name"]: e for e in ls_json(base)}
    assert entries["x"]["last_text"] == {"code": "007", "phase": "train", "ok": True, "note": long_text}
    assert entries["x"]["last_metrics"] == {"loss": 0.3}
    # --group has no mean of text: a dash, and no warning either.
    r = ls(base, "--group", "--columns", "phase,loss")
    assert_clean(r)
    assert r.stderr == ""
    assert {row["name"]: row["phase (mean ± std)"] for row in table_dicts(r.stdout)} == {"x": "-", "y": "-"}
    # A text longer than LAST_TEXT_MAX_CHARS is cut in the summary too (the CSV keeps it whole).
    fake_experiment(base, "z", 3, rows=[{"blob": "b" * 5000}])
    z = next(e for e in ls_json(base) if e["name"] == "z")
    assert z["last_text"]["blob"] == "b" * (exp.LAST_TEXT_MAX_CHARS - 1) + "…"


def test_ls_group_sorts_by_a_metric_not_shown_and_by_every_field(results):
    def names(*args):
        r = ls(results, "--group", *args)
        assert_clean(r)
        return [row["name"] for row in table_dicts(r.stdout)], r.stderr

    # loss is no column here: the groups are still sorted by its mean (d 0.05, a 0.2, b 0.9; c none).
    assert names("--columns", "acc", "--sort", "loss") == (["d", "a", "b", "c"], "")
    assert names("--columns", "acc", "--sort", "loss", "--desc") == (["b", "a", "d", "c"], "")
    # duration: a group's mean (c 1, b 5, a 15, d 100); started: its latest start.
    assert names("--sort", "duration") == (["c", "b", "a", "d"], "")
    assert names("--sort", "started", "--desc") == (["d", "c", "b", "a"], "")
    assert names("--sort", "runs", "--desc")[0][0] == "a"
    order, err = names("--sort", "status")
    assert order[0] == "b" and order[-1] == "a" and err == ""  # "1 error" < "1 finished" < "2 finished"
    # A group has no one directory: said, not silently ignored.
    order, err = names("--sort", "dir")
    assert sorted(order) == ["a", "b", "c", "d"]
    assert "a group has no single directory, so the order is unchanged" in err
    out = ls_json(results, "--group", "--columns", "acc", "--sort", "loss")
    assert [g["name"] for g in out] == ["d", "a", "b", "c"]
    a = next(g for g in out if g["name"] == "a")
    assert a["metric_stats"]["loss"]["mean"] == pytest.approx(0.2) and a["duration"] == pytest.approx(15.0)
    assert a["started_at"] == "2025-01-01T00:00:02+00:00"


def test_ls_counts_a_symlinked_experiment_once(tmp_path):
    base = tmp_path / "results"
    first = fake_experiment(base, "a", 1, rows=[{"loss": 0.1}])
    fake_experiment(base, "a", 2, rows=[{"loss": 0.3}])
    os.symlink(first.name, base / "latest")                       # relative, to one listed anyway
    os.symlink(first, base / "best")                              # absolute, the same one
    elsewhere = fake_experiment(tmp_path / "archive", "old", 3, rows=[{"loss": 0.9}])
    os.symlink(elsewhere, base / "old_link")                       # to one the scan does not reach
    os.symlink(elsewhere, base / "old_link_2")                     # ... twice
    os.symlink(base, base / "loop")                               # back to the base itself
    entries = ls_json(base)
    assert sorted(e["dir"] for e in entries) == sorted([first.name, f"a_{STAMP.format(2)}", "old_link"])
    r = ls(base, "--group", "--columns", "loss")
    assert_clean(r)
    rows = {row["name"]: row for row in table_dicts(r.stdout)}
    assert rows["a"]["n"] == "2" and rows["a"]["loss (mean ± std)"] == "0.2 ± 0.14"
    assert rows["old"]["n"] == "1"


def test_ls_of_a_directory_with_a_metadata_json_of_its_own_lists_the_results_under_it(tmp_path):
    # A project keeps its own metadata.json (a dataset card) beside ./results: `exp ls .` used to
    # take the project for one experiment and list nothing else.
    project = tmp_path / "project"
    fake_experiment(project / "results", "a", 1, rows=[{"loss": 0.5}])
    fake_experiment(project / "results", "b", 2, rows=[{"loss": 0.4}])
    (project / "metadata.json").write_text('{"dataset": "cifar10"}')
    assert sorted(e["name"] for e in ls_json(project)) == ["a", "b"]
    # One experiment's directory is still listed as itself, and so is a bare folder holding
    # nothing but a metadata.json (no experiment under it).
    one = project / "results" / f"a_{STAMP.format(1)}"
    assert [e["name"] for e in ls_json(one)] == ["a"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metadata.json").write_text('{"name": "bare", "status": "finished"}')
    assert [e["name"] for e in ls_json(bare)] == ["bare"]


def _as_nobody(fn):
    """``fn()``'s result, computed in a forked child that cannot read what mode 000 closes (as root,
    it drops to uid/gid 65534 first: root reads anything)."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - sent to the parent
            out = ("error", repr(e))
        with os.fdopen(w, "wb") as f:
            pickle.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


@linux_only
def test_ls_shows_an_experiment_directory_it_may_not_read_and_says_when_the_base_is_unreadable(tmp_path):
    import tempfile

    top = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR", "/tmp")))  # reachable by uid 65534
    try:
        os.chmod(top, 0o755)
        base = top / "results"
        fake_experiment(base, "a", 1, rows=[{"loss": 0.5}])
        closed = fake_experiment(base, "b", 2, rows=[{"loss": 0.4}])
        for p in (top, *top.rglob("*")):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(closed, 0)

        def listing():
            import contextlib
            import io as io_mod
            out, err = io_mod.StringIO(), io_mod.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = exp.main(["ls", str(base), "--json"])
            return code, out.getvalue(), err.getvalue()

        code, out, err = _as_nobody(listing)
        assert code == 0, err
        entries = {e["name"]: e for e in strict_json(out)}
        assert entries["a"]["status"] == "finished"
        assert entries["b"]["status"] == "unreadable" and "Permission denied" in entries["b"]["error"]
        os.chmod(closed, 0o755)
        os.chmod(base, 0)
        code, out, err = _as_nobody(listing)
        assert (code, out) == (1, "") and f"exp: error: cannot list {base}: Permission denied" in err
    finally:
        for p in (top, *top.rglob("*")) if os.access(top, os.R_OK) else ():
            pass
        subprocess.run(["chmod", "-R", "u+rwx", str(top)], check=False)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("name, lower", [
    ("loss", True), ("val_loss", True), ("valLoss", True), ("top1_err", True), ("train_error_rate", True),
    ("perplexity", True), ("val_ppl", True), ("valPpl", True), ("nll", True), ("test/mse", True), ("rmse2", True),
    ("eval_WER", True), ("latency_ms", True),
    ("acc", False), ("answer_acc", False), ("cancer_auc", False), ("power", False), ("apple_score", False),
    ("f1", False), ("tower_acc", False)])
def test_best_direction_matches_abbreviations_only_as_words(name, lower):
    assert exp.lower_is_better(name) is lower


def test_a_dangling_metadata_symlink_says_so(tmp_path):
    base = tmp_path / "results"
    d = base / f"x_{STAMP.format(1)}"
    (d / "terminal_logs").mkdir(parents=True)
    os.symlink(tmp_path / "gone.json", d / "metadata.json")
    (e,) = ls_json(base)
    assert e["status"] == "unreadable"
    assert "is a symbolic link to" in e["error"] and "which does not exist" in e["error"]


def test_a_column_spec_with_a_colon_in_the_metric_name_says_how(results):
    r = ls(results, "--columns", "val:loss")
    assert_clean(r, rc=2)
    assert "(a metric whose name has a ':' takes its mode too: val:loss:last)" in r.stderr
    r = ls(results, "--columns", "val:loss:last")
    assert_clean(r)
    assert "val:loss" in r.stdout.splitlines()[0]
