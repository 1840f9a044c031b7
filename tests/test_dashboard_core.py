"""The dashboard's readers (pure functions over real files), `exp see` as a command, code.diff, and
50 clients polling a live server while a scheduler writes."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request

import pytest

from conftest import EXP_PY, child_env, exp_dirs, linux_only, posix_only, run_exp, write_batch

import exp

pytestmark = posix_only


# ---------------------------------------------------------------------------- helpers


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def make_dir(base, name, stamp="2026-01-01__00-00-00", status="finished", metrics=None, **meta):
    d = base / f"{name}_{stamp}"
    (d / "terminal_logs").mkdir(parents=True)
    (d / "metrics").mkdir()
    created = "20" + stamp[2:10] + "T" + stamp[12:].replace("-", ":") + "+00:00"
    m = {"name": name, "status": status, "created_at": created, "started_at": created,
         "current_run_id": "run_0001", "runs": [{"id": "run_0001", "status": status}], "tags": [], "params": {}}
    m.update(meta)
    (d / "metadata.json").write_text(json.dumps(m))
    (d / "terminal_logs" / "run_0001.log").write_text(f"log of {name}\n")
    if metrics:
        keys = list(metrics[0])
        lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in metrics]
        (d / "metrics" / "run_0001.csv").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def server(tmp_path):
    base = tmp_path / "results"
    base.mkdir()
    srv = exp.DashboardServer(base, port=0).start()
    yield srv, base
    srv.close()


# ---------------------------------------------------------------------------- logs


def test_log_chunks_never_split_a_character_and_add_up_to_the_file(tmp_path):
    text = "aé€😀\n" * 40 + "tail ü"
    path = tmp_path / "run.log"
    path.write_bytes(text.encode("utf-8"))
    for max_bytes in range(1, 13):
        offset, parts = 0, []
        for _ in range(10000):
            c = exp.read_log_chunk(str(path), offset, max_bytes)
            parts.append(c["text"])
            assert "\ufffd" not in c["text"]
            if c["next_offset"] == offset and c["eof"]:
                break
            # max_bytes smaller than one character: no progress is possible, and that is said by eof False
            if c["next_offset"] == offset:
                assert max_bytes < 4
                max_bytes += 1
            offset = c["next_offset"]
        assert "".join(parts) == text, max_bytes


def test_log_chunk_follows_a_growing_log_and_resets_when_it_shrank(tmp_path):
    path = tmp_path / "run.log"
    path.write_bytes(b"one\n")
    c = exp.read_log_chunk(str(path), 0)
    assert (c["text"], c["next_offset"], c["eof"], c["reset"]) == ("one\n", 4, True, False)
    with open(path, "ab") as f:
        f.write(b"two\n\xe2\x82")  # the writer is in the middle of a character
    c = exp.read_log_chunk(str(path), c["next_offset"])
    assert c["text"] == "two\n" and c["next_offset"] == 8
    with open(path, "ab") as f:
        f.write(b"\xac\n")
    c = exp.read_log_chunk(str(path), c["next_offset"])
    assert c["text"] == "€\n"
    path.write_bytes(b"new\n")  # rewritten, shorter than where the reader was
    c = exp.read_log_chunk(str(path), 11)
    assert c["reset"] and c["text"] == "new\n" and c["offset"] == 0
    missing = exp.read_log_chunk(str(tmp_path / "nope.log"), 0)
    assert missing["text"] == "" and missing["eof"]


def test_log_tail_of_a_sparse_gigabyte_log_reads_only_its_end(tmp_path):
    path = tmp_path / "big.log"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        f.seek(0, 2)
        f.write(b"".join(b"line %d\n" % i for i in range(500)))
    tracemalloc.start()
    try:
        t = exp.read_log_tail(str(path), 200)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    lines = t["text"].splitlines()
    assert lines[0] == "line 300" and lines[-1] == "line 499" and len(lines) == 200
    assert t["next_offset"] == os.path.getsize(path) and t["truncated_before"]
    assert peak < 8 << 20, peak


# ---------------------------------------------------------------------------- metrics


def test_metrics_are_read_incrementally_and_a_torn_row_waits(tmp_path):
    path = tmp_path / "run_0001.csv"
    path.write_text("step,loss\n0,1.0\n1,0.5\n")
    first = exp.read_metrics_chunk(str(path))
    assert first["names"] == ["step", "loss"] and first["columns"] == {"step": [0, 1], "loss": [1.0, 0.5]}
    assert first["eof"] and not first["reset"]
    with open(path, "a") as f:
        f.write("2,0.25\n3,0.1")  # the last row is still being written
    nxt = exp.read_metrics_chunk(str(path), first["next_offset"], first["file_id"])
    assert nxt["columns"] == {"step": [2], "loss": [0.25]} and not nxt["reset"]
    with open(path, "a") as f:
        f.write("25\n4,nan\n5,\n")
    nxt = exp.read_metrics_chunk(str(path), nxt["next_offset"], nxt["file_id"])
    assert nxt["columns"] == {"step": [3, 4, 5], "loss": [0.125, None, None]}
    again = exp.read_metrics_chunk(str(path), nxt["next_offset"], nxt["file_id"])
    assert again["rows"] == 0 and again["eof"]


def test_a_new_column_rewrites_the_csv_and_the_reader_starts_again(tmp_path):
    base = tmp_path / "results"
    e = exp.Experiment(name="cols", command="true", base_dir=base)
    e.run()
    csv_path = os.path.join(e.work_dir, "metrics", "run_0001.csv")
    w = exp.MetricsWriter(csv_path)
    w.write_row({"step": "0", "loss": "1.0"})
    w.write_row({"step": "1", "loss": "0.5"})
    first = exp.read_metrics_chunk(csv_path)
    assert first["rows"] == 2
    w.write_row({"step": "2", "loss": "0.4", "acc": "0.9"})  # a new column: exp rewrites the file
    w.close()
    nxt = exp.read_metrics_chunk(csv_path, first["next_offset"], first["file_id"])
    assert nxt["reset"] and nxt["names"] == ["step", "loss", "acc"]
    assert nxt["columns"]["step"] == [0, 1, 2] and nxt["columns"]["acc"] == [None, None, 0.9]


def test_metrics_stats_and_which_way_is_better(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,loss,acc,note\n0,2.0,0.1,x\n1,0.5,0.7,y\n2,1.0,0.6,z\n")
    s = exp.metrics_stats(str(path))
    assert s["loss"] == {"final": 1.0, "min": 0.5, "max": 2.0, "count": 3}
    assert s["acc"]["max"] == 0.7 and "note" not in s
    assert exp.lower_is_better("val_loss") and exp.lower_is_better("error_rate") and not exp.lower_is_better("acc")


# ---------------------------------------------------------------------------- paths and secrets


def test_resolve_inside_refuses_every_way_out(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("s")
    os.symlink(tmp_path / "secret.txt", root / "a" / "out")
    os.symlink(tmp_path, root / "a" / "outdir")
    os.symlink(root / "a" / "b", root / "a" / "in")
    r = os.path.realpath(root)
    assert exp.resolve_inside(r, "a/b") == os.path.join(r, "a", "b")
    assert exp.resolve_inside(r, "a/in") == os.path.join(r, "a", "b")
    for bad in ("../secret.txt", "a/../../secret.txt", "/etc/passwd", "a\\..\\..\\secret.txt", "a/out",
                "a/outdir/secret.txt", "a\x00b", "~/x", "a/b/../../.."):
        assert exp.resolve_inside(r, bad) is None, bad


def test_redact_secrets_at_any_depth():
    meta = {"name": "x", "lark_config": {"app_secret": "S1"}, "app_secret": "S2",
            "environment": {"WANDB_API_KEY": "S3", "PATH": "/bin"},
            "nested": {"list": [{"token": "S4"}, {"password": "S5"}]}, "params": {"lr": 0.1, "api_key": "S6"}}
    out = exp.redact_secrets(meta)
    text = json.dumps(out)
    for s in ("S1", "S2", "S3", "S4", "S5", "S6"):
        assert s not in text
    assert out["environment"]["PATH"] == "/bin" and out["params"]["lr"] == 0.1 and "lark_config" not in out


# ---------------------------------------------------------------------------- the index


def test_the_index_rereads_only_the_experiments_that_changed(tmp_path, monkeypatch):
    base = tmp_path / "results"
    dirs = [make_dir(base, f"e{i}", stamp=f"2026-01-01__00-00-{i:02d}") for i in range(20)]
    (base / "group").mkdir()
    make_dir(base / "group", "nested")
    calls = []
    real = exp.ExperimentDir.summary

    def counting(self):
        calls.append(self.path)
        return real(self)

    monkeypatch.setattr(exp.ExperimentDir, "summary", counting)
    index = exp.ExperimentIndex(str(base), ttl=0, full_every=0)
    rows = index.rows()
    assert len(rows) == 21 and len(calls) == 21
    assert "group/nested_2026-01-01__00-00-00" in {r["id"] for r in rows}
    calls.clear()
    assert len(index.rows()) == 21 and calls == []
    meta = json.loads((dirs[3] / "metadata.json").read_text())
    meta["status"] = "error"
    tmp = dirs[3] / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, dirs[3] / "metadata.json")
    rows = index.rows()
    assert calls == [str(dirs[3])]
    assert next(r for r in rows if r["name"] == "e3")["status"] == "error"
    calls.clear()
    make_dir(base, "late", stamp="2026-01-02__00-00-00")
    import shutil

    shutil.rmtree(dirs[0])
    rows = index.rows()
    assert [os.path.basename(c) for c in calls] == ["late_2026-01-02__00-00-00"]
    assert rows[0]["name"] == "late" and "e0" not in {r["name"] for r in rows}


def test_sort_by_metric_orders_infinities_and_puts_nan_with_the_missing(tmp_path):
    base = tmp_path / "results"
    for i, loss in enumerate([0.5, float("nan"), float("-inf"), 0.1, None, float("inf")]):
        make_dir(base, f"e{i}", stamp=f"2026-01-01__00-00-{i:02d}",
                 metrics=[{"step": 0, "loss": loss}] if loss is not None else [{"step": 0}])
    entries = exp.ExperimentIndex(str(base), ttl=0).entries()
    for sort, first in (("metric:loss", ["e2", "e3", "e0", "e5"]), ("-metric:loss", ["e5", "e0", "e3", "e2"])):
        names = [r["name"] for r in exp.query_experiments(entries, {"sort": [sort]})["items"]]
        assert names[:4] == first and set(names[4:]) == {"e1", "e4"}, (sort, names)


def test_query_filters_sorts_and_pages(tmp_path):
    base = tmp_path / "results"
    for i in range(12):
        make_dir(base, f"run{i}", stamp=f"2026-01-0{1 + i % 3}__00-00-{i:02d}",
                 status="error" if i % 4 == 0 else "finished", tags=["t"] + (["even"] if i % 2 == 0 else []),
                 params={"lr": i / 10, "opt": "adam" if i < 6 else "sgd"},
                 description=f"try number {i}",
                 metrics=[{"step": 0, "loss": 10 - i}] if i != 5 else None)
    entries = exp.ExperimentIndex(str(base), ttl=0).entries()

    def q(**kw):
        return exp.query_experiments(entries, {k: v if isinstance(v, list) else [str(v)] for k, v in kw.items()})

    assert q()["total"] == 12 and q()["scanned"] == 12
    assert {r["name"] for r in q(status="error")["items"]} == {"run0", "run4", "run8"}
    assert {r["name"] for r in q(tags="t,even", name="run1")["items"]} == {"run10"}
    assert {r["name"] for r in q(param=["lr>=0.9"])["items"]} == {"run9", "run10", "run11"}
    assert {r["name"] for r in q(param=["opt=sgd", "lr<0.8"])["items"]} == {"run6", "run7"}
    # Every word, case-insensitive, somewhere in the name or the description.
    assert {r["name"] for r in q(q="NUMBER 1")["items"]} == {"run1", "run10", "run11"}
    assert {r["name"] for r in q(q="Try 7")["items"]} == {"run7"}
    assert q(since="2026-01-03T00:00:00+00:00")["total"] == 4
    assert q(until="2026-01-01T23:59:59+00:00")["total"] == 4
    asc = [r["name"] for r in q(sort="metric:loss", limit=100)["items"]]
    desc = [r["name"] for r in q(sort="-metric:loss", limit=100)["items"]]
    assert asc[0] == "run11" and desc[0] == "run0"
    assert asc[-1] == "run5" and desc[-1] == "run5"  # no loss at all: last whichever the direction
    page = q(sort="name", offset=2, limit=3)
    assert [r["name"] for r in page["items"]] == ["run10", "run11", "run2"] and page["total"] == 12
    assert set(q()["metric_names"]) == {"step", "loss"} and set(q()["param_names"]) == {"lr", "opt"}
    for bad in ({"name": ["(("]}, {"sort": ["bogus"]}, {"param": ["lr>=x"]}, {"since": ["yesterday"]},
                {"limit": ["ten"]}):
        with pytest.raises(exp.DashboardError) as ei:
            exp.query_experiments(entries, bad)
        assert ei.value.status == 400 and str(ei.value)


# ---------------------------------------------------------------------------- code.diff


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def committed_repo(path, name: str, text: str):
    """A git work tree at ``path`` with one file committed."""
    path.mkdir()
    git(path, "init", "-q")
    (path / name).write_text(text)
    git(path, "add", name)
    git(path, "commit", "-q", "-m", "first")
    return path


def test_a_dirty_work_tree_leaves_code_diff_and_ls_marks_it(tmp_path):
    repo = committed_repo(tmp_path / "repo", "train.py", "lr = 0.1\n")
    base = tmp_path / "results"
    clean = exp.Experiment(name="clean", command="true", base_dir=base, cwd=str(repo))
    clean.run()
    assert not os.path.exists(os.path.join(clean.work_dir, "code.diff"))
    exp._GIT_CACHE.clear()
    exp._DIFF_CACHE.clear()
    (repo / "train.py").write_text("lr = 0.2\n")
    (repo / "notes.txt").write_text("untracked\n")
    dirty = exp.Experiment(name="dirty", command="true", base_dir=base, cwd=str(repo))
    dirty.run()
    diff = (exp.ExperimentDir(dirty.work_dir).path + "/code.diff")
    text = open(diff).read()
    assert "-lr = 0.1" in text and "+lr = 0.2" in text and "notes.txt" in text
    got = exp.read_code_diff(dirty.work_dir)
    assert got["untracked"] == ["notes.txt"] and "+lr = 0.2" in got["text"] and not got["truncated"]
    meta = json.loads(open(os.path.join(dirty.work_dir, "metadata.json")).read())
    assert meta["git"]["dirty"] is True and meta["git"]["code_diff"] == "code.diff"
    r = run_exp("ls", base)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("dirty *") for ln in lines) and any(ln.startswith("clean ") for ln in lines)
    assert "uncommitted changes" in r.stdout
    js = json.loads(run_exp("ls", base, "--json").stdout)
    assert {x["name"]: x["dirty"] for x in js} == {"clean": False, "dirty": True}


def test_a_huge_diff_is_cut_with_a_note(tmp_path):
    repo = committed_repo(tmp_path / "repo", "data.txt", "x\n")
    (repo / "data.txt").write_text("".join(f"line {i} " + "y" * 80 + "\n" for i in range(20000)))  # ~1.8 MB
    out = exp.git_code_diff(str(repo))
    assert out is not None and len(out) <= exp.CODE_DIFF_MAX_BYTES + 200
    assert b"# exp: cut at 1048576 bytes" in out
    d = tmp_path / "exp"
    d.mkdir()
    (d / "code.diff").write_bytes(out)
    assert exp.read_code_diff(str(d))["truncated"]


# ---------------------------------------------------------------------------- exp see as a command


def start_see(*args, env=None):
    p = subprocess.Popen([sys.executable, EXP_PY, "see", *map(str, args), "--no-browser"], env=env or child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if "http://" not in line:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"exp see printed no URL: {line!r} {out!r} {err!r}")
    return p, line.split(": ", 1)[1].strip()


def stop(p):
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("exp see did not stop on Ctrl-C")
    return p.returncode, out, err


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


@linux_only
def test_see_started_as_a_script_runs_on_as_an_import_of_it_same_process_same_options(tmp_path):
    """`python exp.py see` would hold the script's parse tree (~25 MB) for the server's life: it
    re-executes itself as an import.  The pid, the interpreter's options and the arguments stay."""
    p = subprocess.Popen([sys.executable, "-X", "utf8", EXP_PY, "see", str(tmp_path), "--port", "0", "--no-browser"],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line.split(": ", 1)[1].strip()
        assert get(url + "api/health")[0] == 200
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        args = _cmdline(p.pid)
        assert args[:3] == [sys.executable, "-X", "utf8"], args
        assert args[3] == "-c" and "import exp" in args[4], args
        assert args[5:] == ["see", str(tmp_path), "--port", "0", "--no-browser"], args
    finally:
        rc, out, err = stop(p)
    assert rc == 0 and "stopped" in out and "Traceback" not in err, (rc, out, err)


@linux_only
@pytest.mark.parametrize("name", ["exp_tool.py", "exp-copy.py", "site.py"])
def test_see_from_a_renamed_copy_of_exp_py(tmp_path, name):
    """A copy under another name re-executes as an import of that name; one whose name is
    no module name (``exp-copy``), or names a module the interpreter loads at start (``site``:
    the import would get that module), runs on as the script."""
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / name).write_bytes(open(EXP_PY, "rb").read())
    (tool / "exp_ui.html").write_bytes(open(os.path.join(os.path.dirname(EXP_PY), "exp_ui.html"), "rb").read())
    base = tmp_path / "results"
    p = subprocess.Popen([sys.executable, str(tool / name), "see", str(base), "--port", "0", "--no-browser"],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = p.stdout.readline()
        assert "http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line.split(": ", 1)[1].strip()
        status, body = get(url + "api/experiments")
        assert status == 200 and body["total"] == 0
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        args = _cmdline(p.pid)
        if name == "exp_tool.py":
            assert args[1] == "-c" and "import exp_tool;" in args[2], args
        else:
            assert args[1] == str(tool / name), args
    finally:
        rc, out, err = stop(p)
    assert rc == 0 and "stopped" in out and "Traceback" not in err, (rc, out, err)


@pytest.mark.parametrize("at_once", [False, True], ids=["serving", "as-the-url-is-printed"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_see_started_as_a_background_job_stops_cleanly_on_sigint_and_sigterm(tmp_path, sig, at_once):
    # A shell without job control starts `exp see ... &` with SIGINT ignored; the dashboard
    # must still stop on it (and on SIGTERM) the clean way, saying so, not hang or die mid-reply;
    # also when signalled the moment its URL is printed.
    p = subprocess.Popen(["sh", "-c", f'"$0" "{EXP_PY}" see "$1" --port 0 --no-browser & echo $!; wait',
                          sys.executable, str(tmp_path)], env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())  # the dashboard's: signal it, not the shell
        line = p.stdout.readline()
        if at_once:
            os.kill(pid, sig)
        assert "http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
        if not at_once:
            assert get(line.split(": ", 1)[1].strip() + "api/health")[0] == 200
        # What such a shell gives its background job (the dashboard has its own handlers by now).
        ign = subprocess.run(["sh", "-c", "grep SigIgn: /proc/self/status & wait"], capture_output=True,
                             text=True).stdout.split()[1]
        assert int(ign, 16) & (1 << (signal.SIGINT - 1)), "this shell does not start background jobs as assumed"
        if not at_once:
            os.kill(pid, sig)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            subprocess.run(["pkill", "-KILL", "-P", str(p.pid)])
            p.kill()
            p.communicate()
    assert p.returncode == 0 and "stopped" in out and "Traceback" not in err, (p.returncode, out, err)


def test_see_on_a_missing_dir_says_so_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    p, url = start_see(tmp_path / "nothing-yet", "--port", "0")
    status, body = get(url + "api/experiments")
    assert status == 200 and body["total"] == 0
    status, body = get(url + "api/state")
    assert status == 200 and body["exists"] is False and body["scheduler"] is None
    rc, out, err = stop(p)
    assert rc == 0 and "stopped" in out and "does not exist yet" in err and "Traceback" not in err


def test_see_takes_the_next_port_when_the_port_is_busy(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        p, url = start_see(tmp_path, "--port", port)
        assert f":{port}/" not in url
        assert get(url + "api/health")[0] == 200
        rc, _, err = stop(p)
        assert rc == 0 and f"port {port} is taken" in err
    finally:
        busy.close()


def test_see_off_loopback_generates_a_token_and_requires_it(tmp_path):
    p, url = start_see(tmp_path, "--host", "0.0.0.0", "--port", "0")
    try:
        assert "?token=" in url
        token = url.split("?token=", 1)[1]
        port = url.split(":")[2].split("/")[0]
        local = f"http://127.0.0.1:{port}/"
        assert get(local + "api/health")[0] == 401
        assert get(local + "api/health", {"X-Exp-Token": token})[0] == 200
        assert get(local + f"api/health?token={token}")[0] == 200
    finally:
        stop(p)


def test_a_missing_page_is_said_and_the_api_still_works(tmp_path):
    srv = exp.DashboardServer(tmp_path, port=0, page_path=str(tmp_path / "no_ui.html")).start()
    try:
        with urllib.request.urlopen(srv.url, timeout=10) as r:
            assert r.status == 200 and b"exp_ui.html was not found" in r.read()
        assert get(srv.url + "api/health")[0] == 200
    finally:
        srv.close()


def test_the_page_is_served_with_a_csp_hash_of_its_one_script(tmp_path):
    page = tmp_path / "ui.html"
    page.write_text("<!doctype html><title>t</title><body><script>document.title = 'ok';</script>")
    srv = exp.DashboardServer(tmp_path, port=0, page_path=str(page)).start()
    try:
        with urllib.request.urlopen(srv.url, timeout=10) as r:
            csp = r.headers["Content-Security-Policy"]
        import base64
        import hashlib

        digest = base64.b64encode(hashlib.sha256(b"document.title = 'ok';").digest()).decode()
        assert f"script-src 'sha256-{digest}'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    finally:
        srv.close()


def test_a_browser_is_opened_only_on_loopback_with_a_display(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    assert exp._wants_browser("127.0.0.1") and not exp._wants_browser("0.0.0.0")
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert sys.platform == "darwin" or not exp._wants_browser("127.0.0.1")


def test_see_rejects_a_bad_port_and_a_bad_token(tmp_path):
    r = run_exp("see", tmp_path, "--port", "70000", "--no-browser")
    assert r.returncode != 0 and "--port" in r.stderr and "Traceback" not in r.stderr
    r = run_exp("see", tmp_path, "--token", "a b", "--no-browser")
    assert r.returncode != 0 and "--token" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- load


def test_fifty_clients_polling_while_a_scheduler_writes(tmp_path):
    base = tmp_path / "results"
    script = tmp_path / "train.py"
    script.write_text("import exp, time\ne = exp.load_experiment()\n"
                      "for i in range(15):\n    e.upd_row(step=i, loss=1 / (i + 1)); e.save_row(); "
                      "print('step', i, flush=True); time.sleep(0.05)\n")
    cfg = write_batch(tmp_path / "cfg.toml", base,
                      [{"name": f"job{i}", "command": f"{sys.executable} {script}"} for i in range(12)],
                      max_concurrent_experiments=3)
    sched = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    srv = exp.DashboardServer(base, port=0).start()
    errors: list[str] = []
    counts = [0]
    stop_at = time.monotonic() + 6
    lock = threading.Lock()

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            while time.monotonic() < stop_at:
                paths = ["/api/state", "/api/experiments?limit=50&sort=-metric:loss"]
                body = None
                for path in paths:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    data = resp.read()
                    body = json.loads(data)
                    if resp.status != 200:
                        errors.append(f"{path}: {resp.status} {data[:200]!r}")
                items = body["items"] if body else []
                if items:
                    conn.request("GET", f"/api/log?id={items[k % len(items)]['id']}&tail=20")
                    resp = conn.getresponse()
                    data = resp.read()
                    json.loads(data)
                    if resp.status != 200:
                        errors.append(f"log: {resp.status} {data[:200]!r}")
                with lock:
                    counts[0] += 1
                time.sleep(1)
        except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
            errors.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(50)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        srv.close()
        try:
            sched.wait(60)
        finally:
            if sched.poll() is None:
                sched.kill()
                sched.wait()
    assert errors == []
    assert counts[0] >= 100  # 50 clients, about one round a second each for 6 s
    assert sched.returncode == 0, sched.stderr.read()
    assert len(exp_dirs(base, "job0")) == 1


def test_what_changed_finds_the_previous_experiment_even_in_the_same_second(tmp_path):
    base = tmp_path / "results"
    make_dir(base, "same", stamp="2026-01-01__00-00-00", params={"lr": 0.1}, command="python a.py")
    d2 = base / "same_2026-01-01__00-00-00_2"
    (d2 / "terminal_logs").mkdir(parents=True)
    (d2 / "metadata.json").write_text(json.dumps({
        "name": "same", "status": "finished", "created_at": "2026-01-01T00:00:00+00:00", "params": {"lr": 0.2},
        "command": "python b.py"}))
    make_dir(base, "same", stamp="2026-01-01__00-00-01", params={"lr": 0.3}, command="python b.py")
    dash = exp.Dashboard(base)
    second = dash.api_changes({"id": ["same_2026-01-01__00-00-00_2"]})
    assert second["against"] == "same_2026-01-01__00-00-00"
    assert second["params"] == [{"key": "lr", "before": 0.1, "after": 0.2}]
    assert second["command"] == {"before": "python a.py", "after": "python b.py"}
    third = dash.api_changes({"id": ["same_2026-01-01__00-00-01"]})
    assert third["against"] == "same_2026-01-01__00-00-00_2" and third["command"] is None
    assert dash.api_changes({"id": ["same_2026-01-01__00-00-00"]})["against"] is None


def test_best_is_the_minimum_for_losses_errors_and_latencies():
    for name in ("loss", "val_error", "ppl", "perplexity", "mse", "test_mae", "rmse", "wer", "cer", "latency_ms"):
        assert exp.lower_is_better(name), name
    for name in ("acc", "f1", "bleu", "reward", "step"):
        assert not exp.lower_is_better(name), name


def test_ended_experiments_are_rechecked_at_full_rescans_and_running_ones_always(tmp_path, monkeypatch):
    base = tmp_path / "results"
    done = make_dir(base, "done", stamp="2026-01-01__00-00-00")
    live = make_dir(base, "live", stamp="2026-01-01__00-00-01", status="running", metrics=[{"step": 0}])
    index = exp.ExperimentIndex(str(base), ttl=0, full_every=3600)
    first = index.snapshot()
    assert {r["name"]: r["status"] for r in index.rows()} == {"done": "finished", "live": "running"}
    assert index.snapshot() is first  # nothing changed: the same snapshot, the same version
    with open(live / "metrics" / "run_0001.csv", "a") as f:
        f.write("1\n")
    snap = index.snapshot()
    assert snap.version == first.version + 1
    assert next(r for r in snap.entries if r.row["name"] == "live").row["last_metrics"] == {"step": 1}
    meta = json.loads((done / "metadata.json").read_text())
    (done / "metadata.json").write_text(json.dumps(dict(meta, status="running")))
    assert index.snapshot() is snap  # an ended one waits for the next full rescan
    index.full_every = 0
    assert {r["name"]: r["status"] for r in index.rows()} == {"done": "running", "live": "running"}
    make_dir(base, "new", stamp="2026-01-02__00-00-00")
    index.full_every = 3600
    assert index.rows()[0]["name"] == "new"  # a new directory shows at once


def test_commands_take_the_pages_words_and_one_task(tmp_path):
    """terminate/remove name kill/rm; {"task": 3} is [3]; the scheduler's answer comes back."""
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "cfg.toml", base, [
        {"name": "sleepy", "command": "sleep 60"}, {"name": "later", "command": "true", "depends_on": ["sleepy"]}])
    sched = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    dash = exp.Dashboard(base)
    try:
        deadline = time.monotonic() + 30
        while not (exp.StateFile(base).owned() and exp_dirs(base, "sleepy")) and time.monotonic() < deadline:
            time.sleep(0.05)
        status, answer = dash.api_command({"action": "remove", "task": "later"})
        assert status == 200 and answer["ok"] and answer["message"] == "removed 2 later", answer
        status, answer = dash.api_command({"action": "terminate", "tasks": ["sleepy"]})
        assert status == 200 and answer["ok"] and "terminating" in answer["message"], answer
        sched.wait(30)
        with pytest.raises(exp.DashboardError) as ei:
            dash.api_command({"action": "explode", "tasks": [1]})
        assert ei.value.status == 400 and "terminate" in str(ei.value)
    finally:
        if sched.poll() is None:
            sched.kill()
            sched.wait()
    meta = json.loads((exp_dirs(base, "sleepy")[0] / "metadata.json").read_text())
    assert meta["status"] == "killed"


def test_secrets_under_any_shape_and_in_command_lines_are_hidden():
    meta = {"token": ["t1", "t2"], "secrets": {"a": "S1"}, "env": {"OPENAI_KEY": "S2", "HOME": "/h"},
            "params": {"OPENAI_KEY": "S3", "keyframes": 4, "hf_pat": "S4"},
            "command": "HF_TOKEN=S5 WANDB_API_KEY=S6 python train.py --lr 0.1 --api-key S7 --token=S8 x=1"}
    out = exp.redact_secrets(meta)
    text = json.dumps(out)
    for s in ("t1", "t2", "S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8"):
        assert s not in text, s
    assert out["params"]["keyframes"] == 4 and out["env"]["HOME"] == "/h"
    assert out["command"] == "HF_TOKEN=*** WANDB_API_KEY=*** python train.py --lr 0.1 --api-key *** --token=*** x=1"


def test_an_empty_host_is_every_interface_and_needs_a_token(tmp_path):
    srv = exp.DashboardServer(tmp_path, host="", port=0)
    try:
        assert srv.token and "?token=" in srv.url
    finally:
        srv.close()


def test_a_nested_metadata_copy_is_served_redacted_and_cross_site_api_calls_are_refused(tmp_path):
    base = tmp_path / "results"
    d = make_dir(base, "n")
    (d / "backup").mkdir()
    (d / "backup" / "metadata.json").write_text(json.dumps({"name": "n", "app_secret": "NESTED-SECRET"}))
    srv = exp.DashboardServer(base, port=0).start()
    try:
        for path in ("api/file?id=" + d.name + "&path=backup/metadata.json",
                     "api/raw?id=" + d.name + "&path=backup/metadata.json"):
            with urllib.request.urlopen(srv.url + path, timeout=10) as r:
                assert b"NESTED-SECRET" not in r.read()
        status, body = get(srv.url + "api/experiments", {"Sec-Fetch-Site": "cross-site"})
        assert status == 403 and "cross-site" in body["error"]
        assert get(srv.url + "api/experiments", {"Sec-Fetch-Site": "same-origin"})[0] == 200
        with urllib.request.urlopen(urllib.request.Request(srv.url, headers={"Sec-Fetch-Site": "cross-site"}),
                                    timeout=10) as r:
            assert r.status == 200  # following a link to the page itself is fine
    finally:
        srv.close()


def test_tiny_windows_still_move_forward(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes("€€€\n".encode())
    c = exp.read_log_chunk(str(log), 0, 1)
    assert c["next_offset"] > 0 and c["text"]
    csv_path = tmp_path / "m.csv"
    big = "x" * (200 << 10)
    csv_path.write_text(f"step,note\n0,{big}\n1,short\n")
    first = exp.read_metrics_chunk(str(csv_path), 0, "", max_bytes=64 << 10)
    assert first["rows"] >= 1 and first["columns"]["note"][0] == big


def test_a_time_range_leaves_out_experiments_without_a_creation_time(tmp_path):
    base = tmp_path / "results"
    make_dir(base, "dated", stamp="2026-01-02__00-00-00")
    d = make_dir(base, "undated", stamp="2026-01-03__00-00-00")
    meta = json.loads((d / "metadata.json").read_text())
    meta.pop("created_at")
    (d / "metadata.json").write_text(json.dumps(meta))
    entries = exp.ExperimentIndex(str(base), ttl=0).entries()
    assert {e.name for e in entries} == {"dated", "undated"}
    for bound in ({"since": ["2025-01-01"]}, {"until": ["2027-01-01"]}):
        assert [i["name"] for i in exp.query_experiments(entries, bound)["items"]] == ["dated"], bound


def test_a_scheduler_starts_while_someone_probes_whether_one_runs(tmp_path):
    import fcntl

    state = exp.StateFile(tmp_path)
    os.makedirs(os.path.dirname(state.lock_path), exist_ok=True)
    fd = os.open(state.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what owned() holds for an instant

    def release():
        time.sleep(0.05)
        os.close(fd)

    t = threading.Thread(target=release)
    t.start()
    try:
        owner = state.acquire()
        assert owner is not None and owner >= 0
        os.close(owner)
    finally:
        t.join()
