"""The dashboard's JSON API (``exp see``): what each endpoint serves.

A real ``exp.DashboardServer`` on 127.0.0.1 (port 0, in a daemon thread)
serves real directories: experiments run with ``exp.Experiment`` (one in a
dirty git work tree), hand-written directories (also one in the earlier
project's format), and a live ``exp run`` batch for the scheduler's state and
commands.  The client is ``http.client``, so every request goes out exactly as
written.  One server per module serves the read-only catalog; tests that
change files work on their own experiments of a second server.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.parse
import zlib
from datetime import datetime, timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import (EXP_PY, ROOT, call_with_timeout, child_env, pid_gone, posix_only, read_meta, run_exp,  # noqa: E402
                      stop_process, wait_for, write_batch, write_exp)
from http_helpers import Resp, request, serving  # noqa: E402
from test_gpus import FakeSmi, gpu_rows, path_without_nvidia_smi  # noqa: E402



# ============================================================================
# Client helpers
# ============================================================================


def url(path: str, params=None) -> str:
    if not params:
        return path
    return path + "?" + urllib.parse.urlencode(params, doseq=True)


def get(port: int, path: str, params=None, status: int = 200):
    """GET an API endpoint; check the status and the JSON conventions; return the parsed body."""
    r = request(port, "GET", url(path, params))
    assert r.status == status, (path, params, r)
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    body = r.json()
    if status >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
        assert "Traceback" not in r.text
    return body


def post(port: int, path: str, payload, *, origin: str | None = "same") -> Resp:
    headers = {"Content-Type": "application/json"}
    if origin == "same":
        headers["Origin"] = f"http://127.0.0.1:{port}"
    elif origin:
        headers["Origin"] = origin
    return request(port, "POST", path, headers=headers, body=json.dumps(payload).encode())


def ids_of(listing: dict) -> list[str]:
    return [it["id"] for it in listing["items"]]


# ============================================================================
# Building directories
# ============================================================================


def meta(name: str, created: str, status: str = "finished", runs=("run_0001",), **kw) -> dict:
    code = {"finished": 0, "error": 1, "killed": -15}.get(status)
    m = {
        "name": name, "command": f"python train.py --run {name}", "tags": [], "description": None,
        "status": status, "exit_code": code, "pid": None, "hostname": "box", "cwd": "/tmp",
        "created_at": created, "started_at": created, "ended_at": created, "duration": None,
        "current_run_id": runs[-1] if runs else None,
        "runs": [{"id": r, "status": status, "started_at": created, "ended_at": created, "exit_code": code,
                  "duration": None, "reason": None} for r in runs],
        "params": {}, "reason": None, "cause": None,
    }
    m.update(kw)
    return m


def png_bytes() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main",
                    *args], cwd=str(repo), check=True, capture_output=True, timeout=30)


def clean_env(**extra) -> dict:
    return {"PYTHONPATH": ROOT, **extra}


METRICS_A = r"printf 'step,loss,acc\n1,0.9,0.5\n2,0.6,0.65\n3,0.7,0.6\n' > " \
            r'"$EXPERIMENT_WORK_DIR/metrics/$EXPERIMENT_RUN_ID.csv"; echo trained-A'
METRICS_B = r"printf 'step,loss,acc\n1,0.8,0.55\n2,0.5,0.72\n' > " \
            r'"$EXPERIMENT_WORK_DIR/metrics/$EXPERIMENT_RUN_ID.csv"; echo trained-B'


class Catalog:
    """The read-only world of the module's catalog server."""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("the catalog has an experiment in a git work tree; git is not installed")
    root = tmp_path_factory.mktemp("catalog")
    base = root / "results"
    c = Catalog()
    c.base = base
    write_exp(base, "alpha_2020-01-01__00-00-00", meta(
        "alpha", "2020-01-01T00:00:00+00:00", tags=["cnn", "big"], description="ResNet baseline on CIFAR",
        params={"lr": 0.1, "opt": "sgd"}, duration=100.0),
        logs={"run_0001": "alpha log\n"}, metrics={"run_0001": "step,loss,acc\n1,0.5,0.8\n2,0.3,0.9\n3,0.4,0.85\n"})
    write_exp(base, "beta_2020-02-01__00-00-00", meta(
        "beta", "2020-02-01T00:00:00+00:00", status="error", tags=["cnn"], description="Transformer small",
        params={"lr": 0.01, "opt": "adam"}, duration=50.0),
        metrics={"run_0001": "step,loss\n1,0.2\n"})
    write_exp(base, "gamma_2020-03-01__00-00-00", meta(
        "gamma", "2020-03-01T00:00:00+00:00", status="killed", tags=["big"], params={"lr": 1}))
    write_exp(base, "sub/delta_2020-04-01__00-00-00", meta(
        "delta", "2020-04-01T00:00:00+00:00", tags=["small"], params={"lr": 0.001, "opt": "sgd"}, duration=10.0),
        metrics={"run_0001": "step,acc\n1,0.95\n"})
    # The earlier project's format: "timestamp", "return_code", "completed_at", no runs list, lark_config.
    write_exp(base, "old_2019-01-02__03-04-05", {
        "name": "old", "command": "echo old", "tags": ["legacy"], "timestamp": "2019-01-02T03:04:05+00:00",
        "status": "error", "return_code": 2, "completed_at": "2019-01-02T04:00:00+00:00", "pid": None,
        "gpu_ids": [], "current_run_id": "run_0001", "cwd": None, "description": "from the earlier project",
        "lark_config": {"app_id": "cli_x", "app_secret": "SUPERSECRET"},
    }, logs={"run_0001": "old log line\n"}, metrics={"run_0001": "epoch,loss\n1,0.45\n"})
    # Two real runs of "train" in a git work tree: the first clean, the second with an uncommitted change.
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "train.py").write_text("print('v1')\n")
    (repo / "src" / "model.py").write_text("layers = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    a = exp.Experiment(name="train", command=METRICS_A, base_dir=str(base), cwd=str(repo),
                       params={"seed": 1, "wd": 0.1}, env=clean_env())
    assert a.run() == 0
    (repo / "train.py").write_text("print('v2 DIRTY-CHANGE')\n")
    (repo / "untracked_new.py").write_text("x = 1\n")
    # Another cwd than the first run's, so no cached git status is reused.
    b = exp.Experiment(name="train", command=METRICS_B, base_dir=str(base), cwd=str(repo / "src"),
                       params={"seed": 2, "dropout": 0.5}, env=clean_env())
    assert b.run() == 0
    c.a = os.path.relpath(a.work_dir, base)
    c.b = os.path.relpath(b.work_dir, base)
    # Both runs started in the same second: make the first one clearly earlier.
    ma = read_meta(a.work_dir)
    c.b_created = read_meta(b.work_dir)["created_at"]
    ma["created_at"] = (datetime.fromisoformat(c.b_created) - timedelta(hours=1)).isoformat()
    (Path(a.work_dir) / "metadata.json").write_text(json.dumps(ma, indent=2))
    c.alpha, c.beta, c.gamma = "alpha_2020-01-01__00-00-00", "beta_2020-02-01__00-00-00", "gamma_2020-03-01__00-00-00"
    c.delta, c.old = "sub/delta_2020-04-01__00-00-00", "old_2019-01-02__03-04-05"
    c.all = {c.alpha, c.beta, c.gamma, c.delta, c.old, c.a, c.b}
    with serving(base) as srv:
        c.srv = srv
        c.port = srv.port
        yield c


def listing(c: Catalog, *params, status: int = 200):
    return get(c.port, "/api/experiments", list(params), status=status)


# ============================================================================
# /api/health, /api/state
# ============================================================================


def test_health_and_state_without_a_scheduler(catalog):
    h = get(catalog.port, "/api/health")
    assert h["ok"] is True and h["exists"] is True
    assert os.path.realpath(h["base_dir"]) == os.path.realpath(catalog.base)
    assert isinstance(h["version"], str) and h["version"]
    s = get(catalog.port, "/api/state")
    assert s["scheduler"] is None and s["exists"] is True
    assert os.path.realpath(s["base_dir"]) == os.path.realpath(catalog.base)
    for key in ("pending", "running", "finished", "errors"):
        assert s[key] == [], key
    assert s["counts"] == {"pending": 0, "running": 0, "finished": 0, "errors": 0, "total": 0}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d\Z", s["updated_at"]), s["updated_at"]


def test_url_and_port(catalog):
    assert catalog.srv.url == f"http://127.0.0.1:{catalog.port}/"
    assert "token" not in catalog.srv.url


def test_state_of_an_old_format_state_file(tmp_path):
    base = tmp_path / "results"
    (base / ".exp_state").mkdir(parents=True)
    (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps({
        "pending": [], "running": [],
        "finished": [{"id": 1, "name": "a", "command": "true", "status": "finished", "return_code": 0,
                      "completed_at": "2019-01-02T03:04:05+00:00", "work_dir": str(base / "a_2019-01-02__03-04-00")}],
        "errors": [{"id": 2, "name": "b", "command": "false", "status": "error", "returncode": 1,
                    "end_time": "2019-01-02T03:04:06+00:00"}],
        "summary": {"status_indicator": "stopped"},
    }))
    write_exp(base, "a_2019-01-02__03-04-00", meta("a", "2019-01-02T03:04:00+00:00"))
    with serving(base) as srv:
        s = get(srv.port, "/api/state")
    assert s["scheduler"] is not None and s["scheduler"]["alive"] is False
    assert s["scheduler"]["status_indicator"] == "stopped"
    assert s["counts"] == {"pending": 0, "running": 0, "finished": 1, "errors": 1, "total": 2}
    (fin,), (err,) = s["finished"], s["errors"]
    assert (fin["id"], fin["name"], fin["exit_code"], fin["ended_at"]) == (1, "a", 0, "2019-01-02T03:04:05+00:00")
    assert (err["id"], err["name"], err["exit_code"], err["ended_at"]) == (2, "b", 1, "2019-01-02T03:04:06+00:00")
    assert fin["exp_id"] == "a_2019-01-02__03-04-00"  # its dir is inside DIR
    assert err["exp_id"] is None


def test_missing_and_empty_directories(tmp_path):
    for base, exists in ((tmp_path / "missing", False), (tmp_path / "empty", True)):
        if exists:
            base.mkdir()
        with serving(base) as srv:
            h = get(srv.port, "/api/health")
            assert h["exists"] is exists and h["ok"] is True
            s = get(srv.port, "/api/state")
            assert s["exists"] is exists and s["scheduler"] is None and s["counts"]["total"] == 0
            e = get(srv.port, "/api/experiments")
            assert (e["total"], e["items"], e["statuses"]) == (0, [], {})
            get(srv.port, "/api/experiment", {"id": "x_2020-01-01__00-00-00"}, status=404)
            r = request(srv.port, "GET", "/")
            assert r.status == 200 and "text/html" in r.headers.get("Content-Type", "")
        assert not base.exists() or exists  # serving never creates DIR


# ============================================================================
# /api/experiments: filters, sort, pages
# ============================================================================


def test_experiments_lists_everything_with_ids_and_summaries(catalog):
    e = listing(catalog)
    assert e["total"] == 7 and set(ids_of(e)) == catalog.all
    assert e["offset"] == 0 and e["limit"] == 50 and e["scanned"] >= 7
    assert e["statuses"] == {"finished": 4, "error": 2, "killed": 1}
    assert {"acc", "loss", "step", "epoch"} <= set(e["metric_names"]) and e["metric_names"] == sorted(e["metric_names"])
    assert {"lr", "opt", "seed", "wd", "dropout"} <= set(e["param_names"])
    assert e["param_names"] == sorted(e["param_names"])
    assert {"cnn", "big", "small", "legacy"} <= set(e["tags"])
    items = {it["id"]: it for it in e["items"]}
    alpha = items[catalog.alpha]
    assert alpha["name"] == "alpha" and alpha["dir"] == catalog.alpha and alpha["status"] == "finished"
    assert alpha["tags"] == ["cnn", "big"] and alpha["params"] == {"lr": 0.1, "opt": "sgd"}
    assert alpha["last_metrics"] == {"step": 3, "loss": 0.4, "acc": 0.85}
    assert alpha["runs"] == 1 and alpha["duration"] == 100.0 and alpha["dirty"] is False
    assert items[catalog.delta]["name"] == "delta"  # one level below DIR, id with "/"
    # Default order: newest first.
    assert ids_of(e)[:2] == [catalog.b, catalog.a]
    assert ids_of(e)[2:] == [catalog.delta, catalog.gamma, catalog.beta, catalog.alpha, catalog.old]


def test_an_old_format_directory_is_served(catalog):
    items = {it["id"]: it for it in listing(catalog)["items"]}
    old = items[catalog.old]
    assert old["created_at"] == "2019-01-02T03:04:05+00:00"
    assert (old["status"], old["exit_code"], old["ended_at"]) == ("error", 2, "2019-01-02T04:00:00+00:00")
    assert old["last_metrics"] == {"epoch": 1, "loss": 0.45} and old["tags"] == ["legacy"]
    d = get(catalog.port, "/api/experiment", {"id": catalog.old})
    assert d["summary"]["exit_code"] == 2 and d["metadata"]["name"] == "old"
    assert "SUPERSECRET" not in json.dumps(d)
    assert "run_0001" in [r["run_id"] for r in d["runs"]], d["runs"]
    log = get(catalog.port, "/api/log", {"id": catalog.old, "tail": 10})
    assert log["text"] == "old log line\n" and log["run_id"] == "run_0001"
    m = get(catalog.port, "/api/metrics", {"id": catalog.old})
    assert m["names"] == ["epoch", "loss"] and m["columns"] == {"epoch": [1], "loss": [0.45]}


@pytest.mark.parametrize("params, expected", [
    ([("name", "^(alpha|beta)$")], {"alpha", "beta"}),
    ([("name", "a$")], {"alpha", "beta", "gamma", "delta"}),
    ([("name", "TRAIN")], set()),  # a regex, case-sensitive
    ([("tags", "cnn")], {"alpha", "beta"}),
    ([("tags", "cnn,big")], {"alpha"}),
    ([("tags", "big")], {"alpha", "gamma"}),
    ([("q", "resnet CIFAR")], {"alpha"}),
    ([("q", "TRAIN")], {"A", "B"}),
    ([("q", "small transformer")], {"beta"}),
    ([("q", "resnet transformer")], set()),
    ([("q", "earlier")], {"old"}),
    ([("status", "error,killed")], {"beta", "gamma", "old"}),
    ([("status", "finished")], {"alpha", "delta", "A", "B"}),
    ([("param", "opt=sgd")], {"alpha", "delta"}),
    ([("param", "lr=0.1")], {"alpha"}),
    ([("param", "lr=1")], {"gamma"}),
    ([("param", "seed=2")], {"B"}),
    ([("param", "lr>=0.01")], {"alpha", "beta", "gamma"}),
    ([("param", "lr>0.01")], {"alpha", "gamma"}),
    ([("param", "lr<0.01")], {"delta"}),
    ([("param", "lr<=0.01")], {"beta", "delta"}),
    ([("param", "lr>=0.01"), ("param", "opt=adam")], {"beta"}),
    ([("since", "2020-01-15T00:00:00+00:00"), ("until", "2020-03-15T00:00:00+00:00")], {"beta", "gamma"}),
    ([("until", "2019-06-01T00:00:00+00:00")], {"old"}),
    ([("since", "2020-05-01T00:00:00+00:00")], {"A", "B"}),
    ([("dirty", "1")], {"B"}),
    ([("tags", "cnn"), ("status", "error")], {"beta"}),
])
def test_experiment_filters(catalog, params, expected):
    names = {"alpha": catalog.alpha, "beta": catalog.beta, "gamma": catalog.gamma, "delta": catalog.delta,
             "old": catalog.old, "A": catalog.a, "B": catalog.b}
    e = listing(catalog, *params)
    assert set(ids_of(e)) == {names[n] for n in expected}, params
    assert e["total"] == len(expected)
    assert e["statuses"] == {"finished": 4, "error": 2, "killed": 1}  # before filters


def test_a_bad_regex_is_a_400_json_error(catalog):
    for bad in ("(", "[a-", "*x"):
        body = listing(catalog, ("name", bad), status=400)
        assert "Traceback" not in body["error"]


NAME_FILTER_REFUSED = [
    ("(.+)+(.+)+(.+)+#", "repeats something that repeats"),
    ("(x+x+)+y", "repeats something that repeats"),
    ("(?:a*)*b", "repeats something that repeats"),
    ("(a|aa)+b", "repeats alternatives"),
    ("(?:foo|bar)*x", "repeats alternatives"),
    ("(?:(?=a+)a)+", "repeats something that repeats"),
    (".*.*.*.*.*.*x", "chains 6 repetitions"),
    (r"\w+\d+\w+\d+x", "chains 4 repetitions"),
    (r"(a)\1", "backreference"),
    ("a" * 501, "longer than 500 characters"),
]
NAME_FILTER_TAKEN = [  # (pattern, names of the filter catalog it keeps)
    (r"lr0\.1", {"bert-lr0.1-seed1"}), ("^bert-", {"bert-lr0.1-seed1", "bert-lr0.01-seed22"}),
    ("seed[0-9]+$", {"bert-lr0.1-seed1", "bert-lr0.01-seed22", "gpt-seed3"}), ("gpt|aaaa", {"gpt-seed3", "a" * 28}),
    ("^bert.*lr.*seed2+", {"bert-lr0.01-seed22"}), ("(?:seed)?[0-9]{2}$", {"bert-lr0.01-seed22"}),
    ("(bert|gpt)-", {"bert-lr0.1-seed1", "bert-lr0.01-seed22", "gpt-seed3"}), ("^(?!bert)", {"gpt-seed3", "a" * 28}),
]


@pytest.fixture(scope="module")
def filter_catalog(tmp_path_factory):
    base = tmp_path_factory.mktemp("names") / "results"
    for i, name in enumerate(("bert-lr0.1-seed1", "bert-lr0.01-seed22", "gpt-seed3", "a" * 28)):
        write_exp(base, f"{name}_2026-01-0{i + 1}__00-00-00", meta(name, f"2026-01-0{i + 1}T00:00:00+00:00"))
    with serving(base) as srv:
        yield srv


@pytest.mark.parametrize("pattern,why", NAME_FILTER_REFUSED)
def test_a_name_filter_that_could_run_long_is_refused_with_a_reason(filter_catalog, pattern, why):
    r = request(filter_catalog.port, "GET", url("/api/experiments", {"name": pattern}), timeout=60)
    assert r.status == 400, (pattern, r)
    assert why in r.json()["error"], r.json()
    assert get(filter_catalog.port, "/api/health")["ok"]
    cli = run_exp("ls", filter_catalog.dashboard.base_dir, "--name", pattern)
    assert cli.returncode == 2 and why in cli.stderr and "Traceback" not in cli.stderr, cli.stderr


@pytest.mark.parametrize("pattern,names", NAME_FILTER_TAKEN)
def test_ordinary_name_filters_still_work(filter_catalog, pattern, names):
    items = get(filter_catalog.port, "/api/experiments", {"name": pattern})["items"]
    assert {e["name"] for e in items} == names, pattern
    cli = run_exp("ls", filter_catalog.dashboard.base_dir, "--name", pattern, "--json")
    assert cli.returncode == 0, cli.stderr
    assert {e["name"] for e in json.loads(cli.stdout)} == names


def test_a_name_filter_over_its_time_gives_up_with_a_400(filter_catalog, monkeypatch):
    monkeypatch.setattr(exp, "NAME_FILTER_SECONDS", -1.0)  # every filter is over its time at the first check
    body = get(filter_catalog.port, "/api/experiments", {"name": "^g", "limit": "7"}, status=400)  # not cached
    assert "took over" in body["error"] and "make it simpler" in body["error"], body
    assert len(get(filter_catalog.port, "/api/experiments")["items"]) == 4  # no name filter: no limit


def test_sort_by_metric_puts_missing_values_last(catalog):
    c = catalog
    missing_acc = {c.beta, c.gamma, c.old}
    up = ids_of(listing(c, ("sort", "metric:acc")))
    assert up[:4] == [c.a, c.b, c.alpha, c.delta] and set(up[4:]) == missing_acc
    down = ids_of(listing(c, ("sort", "-metric:acc")))
    assert down[:4] == [c.delta, c.alpha, c.b, c.a] and set(down[4:]) == missing_acc
    loss = ids_of(listing(c, ("sort", "metric:loss")))
    assert loss[:5] == [c.beta, c.alpha, c.old, c.b, c.a] and set(loss[5:]) == {c.gamma, c.delta}
    lr = ids_of(listing(c, ("sort", "-param:lr")))
    assert lr[:4] == [c.gamma, c.alpha, c.beta, c.delta] and set(lr[4:]) == {c.old, c.a, c.b}


@pytest.mark.parametrize("field", ["name", "status", "created_at", "duration", "runs", "ended_at"])
def test_sort_by_field_both_ways(catalog, field):
    for desc in (False, True):
        items = listing(catalog, ("sort", ("-" if desc else "") + field))["items"]
        values = [it[field] for it in items]
        present = [v for v in values if v is not None]
        assert values[:len(present)] == present, (field, values)  # missing values last, both ways
        assert present == sorted(present, reverse=desc), (field, desc, values)
    if field == "duration":
        assert [it["id"] for it in items][:3] == [catalog.alpha, catalog.beta, catalog.delta]


def test_pagination(catalog):
    full = listing(catalog, ("sort", "name"), ("limit", "1000"))
    assert full["total"] == 7
    pages = []
    for offset in (0, 3, 6, 9):
        p = listing(catalog, ("sort", "name"), ("limit", "3"), ("offset", str(offset)))
        assert (p["total"], p["offset"], p["limit"]) == (7, offset, 3)
        assert len(p["items"]) == max(0, min(3, 7 - offset))
        pages += ids_of(p)
    assert pages == ids_of(full)
    assert [it["name"] for it in full["items"]] == sorted(it["name"] for it in full["items"])
    big = listing(catalog, ("limit", "100000"))
    assert big["limit"] <= 1000 and big["total"] == 7


# ============================================================================
# /api/experiment, /api/changes, /api/compare (git, code.diff)
# ============================================================================


def test_experiment_detail(catalog):
    d = get(catalog.port, "/api/experiment", {"id": catalog.b})
    wd = catalog.base / catalog.b
    assert d["id"] == catalog.b and d["summary"]["id"] == catalog.b and d["summary"]["name"] == "train"
    assert d["metadata"]["command"] == METRICS_B and d["metadata"]["params"] == {"seed": 2, "dropout": 0.5}
    (run,) = d["runs"]
    assert (run["run_id"], run["status"], run["exit_code"]) == ("run_0001", "finished", 0)
    assert run["log"] == "terminal_logs/run_0001.log"
    assert run["log_size"] == (wd / "terminal_logs" / "run_0001.log").stat().st_size > 0
    assert run["metrics"] == "metrics/run_0001.csv"
    assert run["metrics_size"] == (wd / "metrics" / "run_0001.csv").stat().st_size
    files = {f["path"]: f for f in d["files"]}
    assert files["metadata.json"]["type"] == "file" and files["terminal_logs"]["type"] == "dir"
    assert files["terminal_logs/run_0001.log"]["size"] == run["log_size"]
    assert isinstance(files["metadata.json"]["mtime"], (int, float))
    paths = [f["path"] for f in d["files"]]
    assert paths.index("terminal_logs/run_0001.log") == paths.index("terminal_logs") + 1  # depth-first
    assert d["files_truncated"] is False
    assert d["code_diff"] is True and "code.diff" in files
    a = get(catalog.port, "/api/experiment", {"id": catalog.a})
    assert a["code_diff"] is False and "code.diff" not in {f["path"] for f in a["files"]}
    body = get(catalog.port, "/api/experiment", {"id": "nope_2020-01-01__00-00-00"}, status=404)
    assert body == {"error": "not found"}
    r = request(catalog.port, "GET", "/api/experiment")
    assert r.status in (400, 404) and "error" in r.json()


def test_code_diff_saved_and_dirty_marked(catalog):
    diff = (catalog.base / catalog.b / "code.diff").read_text()
    assert "DIRTY-CHANGE" in diff
    assert not (catalog.base / catalog.a / "code.diff").exists()
    items = {it["id"]: it for it in listing(catalog)["items"]}
    assert items[catalog.b]["dirty"] is True and items[catalog.a]["dirty"] is False
    r = run_exp("ls", catalog.base, "--json")
    assert r.returncode == 0, r.stderr
    ls = {e["dir"]: e for e in json.loads(r.stdout)}
    assert ls[os.path.basename(catalog.b)]["dirty"] is True
    assert ls[os.path.basename(catalog.a)]["dirty"] is False
    r = run_exp("ls", catalog.base)
    line_b = next(ln for ln in r.stdout.splitlines() if ln.split()[-1] == catalog.b)
    line_a = next(ln for ln in r.stdout.splitlines() if ln.split()[-1] == catalog.a)
    assert "dirty" in line_b.lower() or "*" in line_b, r.stdout
    assert "dirty" not in line_a.lower() and "*" not in line_a, r.stdout


def test_changes_since_the_previous_experiment_of_the_same_name(catalog):
    ch = get(catalog.port, "/api/changes", {"id": catalog.b})
    assert ch["id"] == catalog.b and ch["against"] == catalog.a and ch["against_name"] == "train"
    params = {p["key"]: (p["before"], p["after"]) for p in ch["params"]}
    assert params == {"seed": (1, 2), "wd": (0.1, None), "dropout": (None, 0.5)}
    assert ch["command"] == {"before": METRICS_A, "after": METRICS_B}
    assert ch["git"]["before"]["dirty"] is False and ch["git"]["after"]["dirty"] is True
    assert ch["git"]["before"]["commit"] == ch["git"]["after"]["commit"] and ch["git"]["after"]["commit"]
    metrics = {m["name"]: m for m in ch["metrics"]}
    assert (metrics["loss"]["before"], metrics["loss"]["after"]) == (0.7, 0.5)
    assert metrics["loss"]["delta"] == pytest.approx(-0.2)
    assert metrics["acc"]["delta"] == pytest.approx(0.12)
    assert "DIRTY-CHANGE" in ch["code_diff"] and ch["code_diff_truncated"] is False
    assert isinstance(ch["untracked"], list)
    first = get(catalog.port, "/api/changes", {"id": catalog.a})
    assert first["against"] is None and first["code_diff"] is None
    vs = get(catalog.port, "/api/changes", {"id": catalog.beta, "against": catalog.alpha})
    assert vs["against"] == catalog.alpha and vs["against_name"] == "alpha"
    assert {p["key"]: (p["before"], p["after"]) for p in vs["params"]} == {"lr": (0.1, 0.01), "opt": ("sgd", "adam")}
    vm = {m["name"]: m for m in vs["metrics"]}
    assert (vm["loss"]["before"], vm["loss"]["after"]) == (0.4, 0.2) and vm["loss"]["delta"] == pytest.approx(-0.2)
    assert vm["acc"]["after"] is None and vm["acc"]["delta"] is None
    assert vs["command"]["before"] != vs["command"]["after"]
    same = get(catalog.port, "/api/changes", {"id": catalog.alpha, "against": catalog.alpha})
    assert same["params"] == [] and same["command"] is None
    get(catalog.port, "/api/changes", {"id": catalog.alpha, "against": "nope_2020-01-01__00-00-00"}, status=404)


def test_compare(catalog):
    c = catalog
    cmp = get(c.port, "/api/compare", {"ids": f"{c.a},{c.b},{c.beta}"})
    assert [e["id"] for e in cmp["experiments"]] == [c.a, c.b, c.beta]
    assert [e["name"] for e in cmp["experiments"]] == ["train", "train", "beta"]
    assert {"seed", "wd", "dropout", "lr", "opt"} <= set(cmp["param_keys"])
    assert {"seed", "wd", "dropout"} <= set(cmp["differing_params"])
    loss, acc = cmp["metrics"]["loss"], cmp["metrics"]["acc"]
    assert loss[c.a] == {"final": 0.7, "best": 0.6, "min": 0.6, "max": 0.9, "count": 3}
    assert acc[c.a] == {"final": 0.6, "best": 0.65, "min": 0.5, "max": 0.65, "count": 3}
    assert (loss[c.b]["final"], loss[c.b]["best"], acc[c.b]["best"]) == (0.5, 0.5, 0.72)
    assert loss[c.beta]["final"] == 0.2
    assert acc.get(c.beta, {}).get("final") is None
    assert cmp["lower_is_better"]["loss"] is True and cmp["lower_is_better"]["acc"] is False
    assert {"loss", "acc"} <= set(cmp["metric_names"])
    same = get(c.port, "/api/compare", {"ids": f"{c.alpha},{c.delta}"})
    assert "opt" not in same["differing_params"] and "lr" in same["differing_params"]
    # One unknown id: a 404, or (the page's Compare) listed as missing beside the others.
    gone = "nope_2020-01-01__00-00-00"
    get(c.port, "/api/compare", {"ids": f"{c.a},{gone}"}, status=404)
    part = get(c.port, "/api/compare", {"ids": f"{c.a},{gone}", "skip_missing": "1"})
    assert [e["id"] for e in part["experiments"]] == [c.a]
    assert part["missing"] == [{"id": gone, "error": "not found"}] and cmp["missing"] == []
    assert part["metrics"]["loss"][c.a] == loss[c.a]


def test_compare_final_is_the_last_value_logged_even_nan(tmp_path):
    """A run that diverged ends in nan: Compare's "final" says so (as `exp ls` does); min, max, best and
    count are of the finite values."""
    base = tmp_path / "results"
    write_exp(base, "div_2020-01-01__00-00-00", meta("div", "2020-01-01T00:00:00+00:00"),
              metrics={"run_0001": "step,loss,acc,all_nan\n0,1.0,0.1,nan\n1,0.5,0.2,nan\n2,inf,0.3,nan\n"
                                    "3,nan,0.4,nan\n"})
    d = exp.Dashboard(base)
    cmp = d.api_compare({"ids": ["div_2020-01-01__00-00-00"]})
    s = cmp["metrics"]
    assert s["loss"]["div_2020-01-01__00-00-00"] == {"final": "nan", "min": 0.5, "max": 1.0, "count": 2, "best": 0.5}
    assert s["acc"]["div_2020-01-01__00-00-00"]["final"] == 0.4
    assert s["all_nan"]["div_2020-01-01__00-00-00"] == {"final": "nan", "min": None, "max": None, "count": 0,
                                                        "best": None}
    row = exp.ExperimentDir(base / "div_2020-01-01__00-00-00").summary()
    assert row["last_metrics"]["loss"] == "nan"  # what `exp ls --json` says of the same run
    json.dumps(cmp, allow_nan=False)  # strict JSON


# ============================================================================
# /api/log, /api/metrics, /api/file, /api/raw on files that change
# ============================================================================


class Scratch:
    pass


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    base = tmp_path_factory.mktemp("scratch") / "results"
    s = Scratch()
    s.base = base
    s.logs = "logs_2026-05-01__00-00-00"
    s.metrics = "metrics_2026-05-02__00-00-00"
    s.files = "files_2026-05-03__00-00-00"
    write_exp(base, s.logs, meta("logs", "2026-05-01T00:00:00+00:00", runs=("run_0001", "run_0002")),
              logs={"run_0001": "", "run_0002": ""})
    write_exp(base, s.metrics, meta("metrics", "2026-05-02T00:00:00+00:00", runs=("run_0002", "run_0003", "run_0001")))
    d = write_exp(base, s.files, meta("files", "2026-05-03T00:00:00+00:00"), logs={"run_0001": "file log\n"})
    s.content = {
        "notes.txt": "hello\nworld \u2713\n".encode(),
        "cfg.json": b'{"a": 1, "b": [1, 2]}\n',
        "data.csv": b"x,y\n1,2\n",
        "blob.bin": bytes(range(256)) * 4,
        "pic.png": png_bytes(),
        "page.html": b"<html><body><script>alert(1)</script></body></html>",
        "vec.svg": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><circle r="1"/></svg>',
        "big.txt": (b"a" * 99 + b"\n") * (300 * 1024 // 100 + 1),
        "sub/inner.txt": b"inner\n",
    }
    for rel, data in s.content.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    with serving(base) as srv:
        s.port = srv.port
        yield s


def test_log_tail(scratch):
    log = scratch.base / scratch.logs / "terminal_logs"
    (log / "run_0001.log").write_text("".join(f"line {i}\n" for i in range(1, 21)))
    (log / "run_0002.log").write_text("current run\n")
    t = get(scratch.port, "/api/log", {"id": scratch.logs, "run": "run_0001", "tail": 5})
    assert t["text"] == "".join(f"line {i}\n" for i in range(16, 21)) and t["truncated_before"] is True
    assert t["run_id"] == "run_0001" and t["size"] == (log / "run_0001.log").stat().st_size
    assert t["next_offset"] == t["size"] and t["offset"] == t["size"] - len(t["text"].encode())
    t = get(scratch.port, "/api/log", {"id": scratch.logs, "run": "run_0001", "tail": 100})
    assert t["text"].startswith("line 1\n") and t["truncated_before"] is False and t["offset"] == 0
    cur = get(scratch.port, "/api/log", {"id": scratch.logs, "tail": 10})  # the current run by default
    assert (cur["run_id"], cur["text"]) == ("run_0002", "current run\n")


def test_log_follow_offset_utf8_and_reset(scratch):
    path = scratch.base / scratch.logs / "terminal_logs" / "run_0002.log"
    q = {"id": scratch.logs, "run": "run_0002"}
    path.write_bytes("h\u00e9llo \u20acuro\n".encode())  # "h\u00e9llo " is 7 bytes, then a 3-byte euro sign
    r = get(scratch.port, "/api/log", {**q, "offset": 0, "max_bytes": 8})
    assert r["text"] == "h\u00e9llo " and r["offset"] == 0 and r["next_offset"] == 7 and r["eof"] is False
    assert r["size"] == len("h\u00e9llo \u20acuro\n".encode())
    r = get(scratch.port, "/api/log", {**q, "offset": r["next_offset"]})
    assert r["text"] == "\u20acuro\n" and r["eof"] is True and r["next_offset"] == r["size"]
    # The file grows: only the new bytes come.
    with open(path, "ab") as f:
        f.write("more \u2713\n".encode())
    r2 = get(scratch.port, "/api/log", {**q, "offset": r["next_offset"]})
    assert r2["text"] == "more \u2713\n" and r2["offset"] == r["next_offset"] and r2["eof"] is True
    # A character half written at the end is held back until it is complete.
    with open(path, "ab") as f:
        f.write(b"x\xe2\x82")
    r3 = get(scratch.port, "/api/log", {**q, "offset": r2["next_offset"]})
    assert r3["text"] == "x" and r3["next_offset"] == r2["next_offset"] + 1, r3
    with open(path, "ab") as f:
        f.write(b"\xac!\n")
    r4 = get(scratch.port, "/api/log", {**q, "offset": r3["next_offset"]})
    assert r4["text"] == "\u20ac!\n" and r4["next_offset"] == path.stat().st_size
    # Invalid bytes are replaced, not an error.
    with open(path, "ab") as f:
        f.write(b"bad \xff\xfe end\n")
    r5 = get(scratch.port, "/api/log", {**q, "offset": r4["next_offset"]})
    assert r5["text"].startswith("bad ") and r5["text"].endswith(" end\n") and "\ufffd" in r5["text"]
    # The log shrank (rewritten): reset, from 0.
    path.write_text("new\n")
    r6 = get(scratch.port, "/api/log", {**q, "offset": r5["next_offset"]})
    assert r6.get("reset") is True and r6["text"] == "new\n" and r6["offset"] == 0 and r6["next_offset"] == 4


def test_metrics_incremental_partial_line_and_header_change(scratch):
    path = scratch.base / scratch.metrics / "metrics" / "run_0001.csv"
    q = {"id": scratch.metrics, "run": "run_0001"}
    head = "step,loss,note\n1,0.5,warmup\n2,nan,\n"
    path.write_text(head + "3,0.3,")  # the last line is being written
    m = get(scratch.port, "/api/metrics", q)
    assert m["run_id"] == "run_0001" and m["reset"] is False and m["file_id"]
    assert m["names"] == ["step", "loss", "note"] and m["rows"] == 2
    assert m["columns"] == {"step": [1, 2], "loss": [0.5, None], "note": ["warmup", None]}
    assert m["next_offset"] == len(head.encode()) and m["size"] == path.stat().st_size
    with open(path, "a") as f:
        f.write("\n4,inf,done\n")
    m2 = get(scratch.port, "/api/metrics", {**q, "offset": m["next_offset"], "file_id": m["file_id"]})
    assert m2["reset"] is False and m2["file_id"] == m["file_id"] and m2["offset"] == m["next_offset"]
    assert m2["rows"] == 2 and m2["columns"] == {"step": [3, 4], "loss": [0.3, None], "note": [None, "done"]}
    assert m2["next_offset"] == path.stat().st_size and m2["eof"] is True
    m3 = get(scratch.port, "/api/metrics", {**q, "offset": m2["next_offset"], "file_id": m2["file_id"]})
    assert m3["rows"] == 0 and m3["eof"] is True and m3["reset"] is False
    assert all(v == [] for v in m3["columns"].values())
    # exp rewrites the file with a new header when a row brings a new column.
    with exp.MetricsWriter(str(path)) as w:
        w.write_row({"step": "5", "loss": "0.1", "note": "", "acc": "0.9"})
    assert path.read_text().startswith("step,loss,note,acc\n")
    m4 = get(scratch.port, "/api/metrics", {**q, "offset": m2["next_offset"], "file_id": m2["file_id"]})
    assert m4["reset"] is True and m4["file_id"] != m2["file_id"]
    assert m4["offset"] in (0, len(b"step,loss,note,acc\n"))  # read from the start (the header's end, or 0)
    assert m4["names"] == ["step", "loss", "note", "acc"]
    assert m4["columns"]["step"] == [1, 2, 3, 4, 5] and m4["columns"]["acc"] == [None, None, None, None, 0.9]
    m5 = get(scratch.port, "/api/metrics", {**q, "offset": m4["next_offset"], "file_id": m4["file_id"]})
    assert m5["reset"] is False and m5["rows"] == 0 and m5["eof"] is True


def test_metrics_in_chunks_and_without_a_file(scratch):
    path = scratch.base / scratch.metrics / "metrics" / "run_0003.csv"
    n = 40000  # about 500 KB
    path.write_text("step,loss\n" + "".join(f"{i},{i / 1000}\n" for i in range(n)))
    q = {"id": scratch.metrics, "run": "run_0003", "max_bytes": 65536}
    steps, offset, file_id, calls = [], 0, "", 0
    while True:
        m = get(scratch.port, "/api/metrics", {**q, "offset": offset, "file_id": file_id} if file_id else q)
        calls += 1
        assert m["reset"] is False and m["names"] == ["step", "loss"]
        assert m["offset"] == offset or (offset == 0 and m["offset"] == len(b"step,loss\n"))
        assert m["rows"] == len(m["columns"]["step"]) and (m["rows"] > 0 or m["eof"])
        assert m["next_offset"] - offset <= 65536 + 64  # (the header may come on top)
        steps += m["columns"]["step"]
        offset, file_id = m["next_offset"], m["file_id"]
        if m["eof"]:
            break
        assert calls < 200
    assert steps == list(range(n)) and calls > 5 and offset == path.stat().st_size
    none = get(scratch.port, "/api/metrics", {"id": scratch.metrics, "run": "run_0002"})
    assert (none["names"], none["columns"], none["rows"], none["next_offset"], none["eof"], none["file_id"]) == \
        ([], {}, 0, 0, True, "")


@pytest.mark.parametrize("rel, kind", [
    ("notes.txt", "text"), ("cfg.json", "json"), ("data.csv", "csv"), ("blob.bin", "binary"), ("pic.png", "image"),
])
def test_file_kinds(scratch, rel, kind):
    f = get(scratch.port, "/api/file", {"id": scratch.files, "path": rel})
    data = scratch.content[rel]
    assert (f["path"], f["type"], f["kind"], f["size"]) == (rel, "file", kind, len(data))
    assert isinstance(f["mtime"], (int, float)) and f["truncated"] is False
    if kind in ("text", "json", "csv"):
        assert f["text"] == data.decode()
    else:
        assert f["text"] is None
    assert f["raw_url"].startswith("/api/raw?")
    raw = request(scratch.port, "GET", f["raw_url"])
    assert raw.status == 200 and raw.body == data


def test_file_dir_and_256k_cap(scratch):
    d = get(scratch.port, "/api/file", {"id": scratch.files, "path": "sub"})
    assert d["type"] == "dir" and d["kind"] == "dir"
    assert d["entries"] == [{"name": "inner.txt", "type": "file", "size": 6}]
    root = get(scratch.port, "/api/file", {"id": scratch.files, "path": "terminal_logs"})
    assert [e["name"] for e in root["entries"]] == ["run_0001.log"]
    big = get(scratch.port, "/api/file", {"id": scratch.files, "path": "big.txt"})
    assert big["kind"] == "text" and big["truncated"] is True
    assert big["size"] == len(scratch.content["big.txt"]) and len(big["text"]) == 256 * 1024
    assert scratch.content["big.txt"].decode().startswith(big["text"])
    get(scratch.port, "/api/file", {"id": scratch.files, "path": "nope.txt"}, status=404)


def test_raw_content_types(scratch):
    def raw(rel, **extra):
        r = request(scratch.port, "GET", url("/api/raw", {"id": scratch.files, "path": rel, **extra}))
        assert r.status == 200 and r.body == scratch.content[rel], (rel, r)
        assert r.headers.get("X-Content-Type-Options") == "nosniff"
        return r.headers.get("Content-Type", ""), r.headers.get("Content-Disposition", "") or ""

    ctype, disp = raw("pic.png")
    assert ctype == "image/png" and "attachment" not in disp
    ctype, disp = raw("pic.png", download=1)
    assert "attachment" in disp
    for rel in ("page.html", "vec.svg", "notes.txt", "blob.bin"):
        ctype, disp = raw(rel)
        assert ctype.split(";")[0] == "application/octet-stream" and "attachment" in disp, (rel, ctype, disp)
    r = request(scratch.port, "GET", url("/api/raw", {"id": scratch.files, "path": "terminal_logs/run_0001.log",
                                                      "download": 1}))
    assert r.status == 200 and r.body == b"file log\n" and "attachment" in r.headers.get("Content-Disposition", "")


# ============================================================================
# A live scheduler: /api/state, /api/system, POST /api/command
# ============================================================================


@posix_only
def test_live_scheduler_state_system_and_kill(tmp_path, monkeypatch, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "cfg.toml", base, [
        {"name": "sleeper", "command": "sleep 60", "priority": 10, "gpu_ids": [1], "tags": ["nap"]},
        {"name": "waiter", "command": "sleep 60"},
    ], max_concurrent_experiments=1, gpus=[0, 1])
    fake = FakeSmi(tmp_path, gpu_rows(2, used={1: 5000}))
    monkeypatch.setenv("PATH", fake.path)
    out = open(tmp_path / "sched.out", "wb")
    proc = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, env=child_env(NO_COLOR="1"))
    try:
        with serving(base) as srv:
            port = srv.port

            def running_with_pid():
                s = get(port, "/api/state")
                run = s["running"]
                return s if run and run[0].get("pid") and run[0].get("exp_id") else None

            s = wait_for(running_with_pid, timeout=30, what="the sleeper to run")
            for job in s["running"]:
                kill_groups_later.append(job["pid"])
            sch = s["scheduler"]
            assert sch["alive"] is True and sch["pid"] == proc.pid and sch["status_indicator"] == "running"
            assert os.path.realpath(sch["config_path"]) == os.path.realpath(cfg)
            assert sch["max_concurrent_experiments"] == 1 and sch["gpus"] == [0, 1]
            assert {g: n for g, n in sch["gpu_use"].items() if n} == {"1": 1}
            assert s["counts"] == {"pending": 1, "running": 1, "finished": 0, "errors": 0, "total": 2}
            (job,), (waiting,) = s["running"], s["pending"]
            assert (job["name"], job["status"], job["run_id"], job["assigned_gpus"]) == \
                ("sleeper", "running", "run_0001", [1])
            assert job["tags"] == ["nap"] and job["command"] == "sleep 60" and job["priority"] == 10
            wd = Path(job["work_dir"])
            assert job["exp_id"] == os.path.relpath(wd, base) and wd.parent == base
            assert (waiting["name"], waiting["status"]) == ("waiter", "pending")
            assert isinstance(job["id"], int) and isinstance(waiting["id"], int)
            # /api/system with the fake nvidia-smi: the GPUs and who holds them.
            sysinfo = get(port, "/api/system")
            assert sysinfo["gpu_error"] is None
            gpus = {g["index"]: g for g in sysinfo["gpus"]}
            assert sorted(gpus) == [0, 1]
            assert gpus[1]["uuid"] == gpu_rows(2)[1][1]
            assert (gpus[1]["memory_used"], gpus[1]["memory_total"], gpus[1]["utilization"]) == (5000, 16000, 5)
            assert [(h["task"], h["name"], h["exp_id"]) for h in gpus[1]["holders"]] == \
                [(job["id"], "sleeper", job["exp_id"])]
            assert gpus[0]["holders"] == []
            # Kill the running experiment through the API.
            r = post(port, "/api/command", {"action": "kill", "tasks": [job["id"]]})
            assert r.status == 200, r
            assert r.json()["ok"] is True and isinstance(r.json()["message"], str)
            wait_for(lambda: read_meta(wd).get("status") == "killed", timeout=20, what="sleeper to be killed")
            assert read_meta(wd)["reason"] == "terminated by user"
            wait_for(lambda: pid_gone(job["pid"]), timeout=10, what="the sleeper's process to end")

            def waiter_running():
                st = get(port, "/api/state")
                return st if [j["name"] for j in st["running"]] == ["waiter"] and st["running"][0].get("pid") else None

            st = wait_for(waiter_running, timeout=20, what="the waiter to start")
            kill_groups_later.append(st["running"][0]["pid"])
            assert [j["name"] for j in st["errors"] + st["finished"]] == ["sleeper"]
            assert (st["errors"] + st["finished"])[0]["status"] == "killed"
            r = post(port, "/api/command", {"action": "shutdown", "now": True})
            assert r.status == 200 and r.json()["ok"] is True, r
            assert proc.wait(30) is not None
            st = get(port, "/api/state")
            assert st["scheduler"]["alive"] is False
            r = post(port, "/api/command", {"action": "kill", "tasks": ["waiter"]})
            assert r.status == 409 and "error" in r.json() and "Traceback" not in r.text, r
    finally:
        stop_process(proc)
        out.close()


def test_command_without_a_scheduler_is_409(catalog):
    r = post(catalog.port, "/api/command", {"action": "kill", "tasks": [1]})
    assert r.status == 409, r
    assert r.json()["error"] and "Traceback" not in r.text


@pytest.mark.parametrize("value", [99999999999999999999999999999999, 10**9 + 1, -(10**9) - 1, 1e23, 2.5, "7", True,
                                   None])
def test_a_priority_outside_its_range_is_refused_by_the_api_and_the_config(catalog, value, tmp_path):
    r = post(catalog.port, "/api/command", {"action": "priority", "tasks": [1], "value": value})
    assert r.status == 400, r
    assert r.json()["error"] == f"priority needs a value that is an integer from -1000000000 to 1000000000, got {value!r}"
    toml = f'[[experiments]]\nname = "a"\ncommand = "true"\npriority = {json.dumps(value)}\n'
    if value is None:
        return  # TOML has no null
    with pytest.raises(exp.ConfigError) as ei:
        exp.parse_config(toml, root=str(tmp_path))
    assert "an integer from -1000000000 to 1000000000" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("value", [10**9, -(10**9), 0, 7])
def test_a_priority_inside_its_range_is_taken(catalog, value, tmp_path):
    r = post(catalog.port, "/api/command", {"action": "priority", "tasks": [1], "value": value})
    assert r.status == 409, r  # taken, and then: no scheduler runs
    cfg = exp.parse_config(f'[[experiments]]\nname = "a"\ncommand = "true"\npriority = {value}\n', root=str(tmp_path))
    assert cfg.experiments[0].priority == value


def test_system_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_without_nvidia_smi())
    base = tmp_path / "results"
    base.mkdir()
    with serving(base) as srv:
        s = get(srv.port, "/api/system")
    assert s["gpus"] == [] and "nvidia-smi" in s["gpu_error"]
    assert s["cpus"] == os.cpu_count() and len(s["load"]) == 3
    assert s["memory"]["total"] >= s["memory"]["available"] > 0
    assert os.path.realpath(s["disk"]["path"]) == os.path.realpath(base)
    assert s["disk"]["total"] >= s["disk"]["free"] > 0
    assert s["hostname"] == socket.gethostname() or s["hostname"] == os.uname().nodename


# ============================================================================
# The command line: exp see
# ============================================================================


@posix_only
def test_exp_see_cli_on_a_missing_dir_and_a_busy_port(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    missing = tmp_path / "nothing_here"
    err_file = open(tmp_path / "see.stderr", "wb")
    proc = subprocess.Popen([sys.executable, EXP_PY, "see", str(missing), "--port", str(port), "--no-browser"],
                            cwd=str(tmp_path), env=child_env(PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=err_file)
    try:
        line = call_with_timeout(proc.stdout.readline, 20, "exp see to print its address").decode()
        m = re.search(r"exp dashboard\b.*: http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        got = int(m.group(1))
        assert port < got <= port + 50  # the busy port was skipped
        assert get(got, "/api/health")["exists"] is False
        assert get(got, "/api/experiments")["total"] == 0
        assert not missing.exists()
    finally:
        busy.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("exp see did not stop on SIGINT")
        finally:
            err_file.close()
    err = (tmp_path / "see.stderr").read_text(errors="replace")
    assert "Traceback" not in err, err


@posix_only
def test_the_listing_shows_a_run_whose_process_died_without_a_word_as_ended(tmp_path):
    # The index keeps a row until its files change; a standalone script killed with SIGKILL
    # changes none, so the row said "running" for as long as the server ran.
    script = tmp_path / "train.py"
    script.write_text("import exp, time\n"
                      "e = exp.load_experiment(standalone=True)\n"
                      "e.upd_row(step=0); e.save_row()\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(120)\n")
    env = child_env(PYTHONPATH=str(ROOT))
    env.pop("EXPERIMENT_WORK_DIR", None)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with serving(tmp_path / "results") as srv:
            (row,) = get(srv.port, "/api/experiments")["items"]
            assert row["status"] == "running"
            proc.kill()
            proc.wait(30)

            def ended():
                (r,) = get(srv.port, "/api/experiments")["items"]
                return r if r["status"] != "running" else None
            row = wait_for(ended, 30, what="the listing to notice the process is gone")
            assert row["status"] == "error" and "its process is gone" in row["reason"], row
    finally:
        proc.kill()
        proc.wait(30)
