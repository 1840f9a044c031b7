"""Lark/Feishu: settings, syncing rows through the outbox, summary mode, lark-sync.

Every test talks real HTTP to tests/fake_lark.py, a local server that keeps
the Open API's documented contract (tokens, envelopes, codes, client_token
replays, faults); the training side runs in real child processes.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

import exp
from conftest import EXP_PY, child_env, exp_dirs, posix_only, py_cmd, run_exp, wait_for, write_batch, write_script
from fake_lark import FakeLark

APP_ID, SECRET = "cli_testapp", "s3cr3t-Value-9f8e7d"
APP, TBL = "bascnTestBase01", "tblTestTable01"

TRAIN = """
import exp, sys, time
e = exp.load_experiment()
n = int(sys.argv[1])
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
for i in range(n):
    e.upd_row(step=i, loss=1.0 / (i + 1))
    e.save_row(lark=True)
    if pause:
        time.sleep(pause)
print("saved", n, flush=True)
"""


@pytest.fixture
def lark():
    with FakeLark(apps={APP_ID: SECRET}) as fake:
        fake.add_table(APP, TBL, fields=[("Name", 1), ("step", 2), ("loss", 2)])
        yield fake


def url_of(fake, table=TBL, app=APP) -> str:
    return f"{fake.url}/base/{app}?table={table}&view=vewTestView01"


def full_cfg(fake, **more):
    return {"app_id": APP_ID, "app_secret": SECRET, "url": url_of(fake), **more}


@pytest.fixture
def train(tmp_path):
    return write_script(tmp_path, "train.py", TRAIN)


def steps(fake, table=TBL):
    return [r["fields"].get("step") for r in fake.records(APP, table)]


def run_fg(e, timeout=120):
    h = e.run(background=True)
    return h.wait(timeout=timeout)


# ============================================================================
# Settings: forms, URL parsing, merge order, options, the environment
# ============================================================================


def test_base_and_wiki_urls_are_parsed():
    p = exp.parse_lark_url("https://acme.feishu.cn/base/bascnAbC123?table=tblXyZ&view=vewQ1")
    assert p == {"app_token": "bascnAbC123", "table_id": "tblXyZ", "view_id": "vewQ1", "domain": "feishu"}
    p = exp.parse_lark_url("https://acme.larksuite.com/base/bascnAbC123?table=tblXyZ")
    assert p == {"app_token": "bascnAbC123", "table_id": "tblXyZ", "domain": "lark"}
    p = exp.parse_lark_url("https://acme.feishu.cn/wiki/wikcnNode9?table=tblW&view=vewW")
    assert p == {"wiki_token": "wikcnNode9", "table_id": "tblW", "view_id": "vewW", "domain": "feishu"}
    p = exp.parse_lark_url("http://127.0.0.1:8123/base/bascnX?table=tblY")
    assert p["domain"] == "http://127.0.0.1:8123" and p["app_token"] == "bascnX"
    for bad, words in [("https://acme.feishu.cn/docx/doxcnA", "document or sheet"),
                       ("not a url", "expected a Base URL"), ("https://acme.feishu.cn/drive/home", "expected a Base URL"),
                       ("ftp://acme.feishu.cn/base/x", "expected a Base URL")]:
        with pytest.raises(exp.ConfigError, match=words):
            exp.parse_lark_url(bad)


def test_every_config_form_and_the_merge_order():
    env = {"LARK_APP_ID": "env_id", "LARK_APP_SECRET": "env_secret"}
    # A URL string alone; the app's credentials from the environment.
    s = exp.lark_settings("https://a.feishu.cn/base/bascnA?table=tblA", environ=env)
    assert s == {"app_id": "env_id", "app_secret": "env_secret", "app_token": "bascnA", "table_id": "tblA",
                 "domain": "feishu"}
    # The FEISHU_ names too; LARK_ wins when both are set.
    assert exp.lark_settings(environ={"FEISHU_APP_ID": "f", "FEISHU_APP_SECRET": "g"}) == {"app_id": "f",
                                                                                           "app_secret": "g"}
    assert exp.lark_settings(environ={**env, "FEISHU_APP_ID": "f"})["app_id"] == "env_id"
    # [scheduler] < [[experiments]] < Experiment(lark_config=...) < save_row(lark_config=...)
    scheduler = {"app_id": "sched_id", "app_secret": "sched_secret", "url": "https://a.feishu.cn/base/bascnS?table=tblS",
                 "extra_fields": {"project": "p", "team": "t"}, "flush_timeout": 3}
    experiment_url = "https://a.feishu.cn/base/bascnE?table=tblE"  # [[experiments]] lark_url
    experiment = {"mode": "summary", "extra_fields": {"team": "t2"}}
    constructor = {"table_id": "tblC", "domain": "http://127.0.0.1:9"}
    call = {"auto_create_fields": False, "app_secret": "call_secret"}
    s = exp.lark_settings(scheduler, experiment_url, experiment, constructor, call, environ=env)
    assert s == {"app_id": "sched_id", "app_secret": "call_secret", "app_token": "bascnE", "table_id": "tblC",
                 "domain": "http://127.0.0.1:9", "extra_fields": {"project": "p", "team": "t2"}, "flush_timeout": 3.0,
                 "mode": "summary", "auto_create_fields": False}
    # A later URL replaces the whole address of the layers before it, a wiki URL included.
    s = exp.lark_settings({"app_token": "bascnOld", "table_id": "tblOld"}, "https://a.feishu.cn/wiki/wikN?table=tblW",
                          environ={})
    assert s["wiki_token"] == "wikN" and s["table_id"] == "tblW" and "app_token" not in s
    assert exp.lark_missing(s) == ["app_id", "app_secret"]
    assert exp.lark_missing({}) == ["app_id", "app_secret", "app_token", "table_id"]
    # What may be written down: all but the secret.
    assert exp.lark_public({"app_id": "a", "app_secret": "b", "table_id": "t"}) == {"app_id": "a", "table_id": "t"}


def test_unknown_and_bad_options_are_config_errors_with_a_suggestion(tmp_path, make_exp):
    with pytest.raises(exp.ConfigError, match=r"unknown key 'auto_create_field' \(did you mean 'auto_create_fields'\?\)"):
        make_exp("bad", lark_config={"auto_create_field": False})
    with pytest.raises(exp.ConfigError, match=r"lark_config.mode: expected \"rows\" or \"summary\""):
        make_exp("bad", lark_config={"mode": "row"})
    with pytest.raises(exp.ConfigError, match="lark_config.flush_timeout"):
        make_exp("bad", lark_config={"flush_timeout": -1})
    with pytest.raises(exp.ConfigError, match="lark_config.domain"):
        make_exp("bad", lark_config={"domain": "feishu.cn"})
    with pytest.raises(exp.ConfigError, match="expected a table of settings or a Base URL"):
        make_exp("bad", lark_config=42)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())
    text = """
[scheduler]
lark_config = { app_idd = "x", flush_timeout = "soon" }
[[experiments]]
name = "a"
command = "true"
lark_url = "https://x.feishu.cn/docx/abc"
lark_config = { mode = "sumary" }
"""
    with pytest.raises(exp.ConfigError) as info:
        exp.parse_config(text, "c.toml", str(tmp_path))
    msg = str(info.value)
    assert "scheduler.lark_config: unknown key 'app_idd' (did you mean 'app_id'?)" in msg
    assert "scheduler.lark_config.flush_timeout: expected a number of seconds" in msg
    assert "experiments[0].lark_url: Lark URL" in msg and "document or sheet" in msg
    assert "experiments[0].lark_config.mode" in msg
    # save_row(lark_config=...) with a typo: the error comes before the row is written anywhere.
    e = make_exp("typo", "exit 0")
    assert run_fg(e) == 0
    e.upd_row(step=1)
    with pytest.raises(exp.ConfigError, match="did you mean 'extra_fields'"):
        e.save_row(lark=True, lark_config={"extra_field": {}})
    assert e.metrics() == []
    e.save_row()
    assert e.metrics() == [{"step": 1}]


# ============================================================================
# Syncing rows
# ============================================================================


@posix_only
def test_rows_arrive_in_order_in_few_batches_and_the_secret_never_touches_disk(lark, make_exp, train, tmp_path, base_dir):
    e = make_exp("sync", py_cmd(train, 1200), lark_config=full_cfg(lark, extra_fields={"run": "{name}/{run_id}"}))
    assert run_fg(e) == 0
    assert steps(lark) == list(range(1200))
    first = lark.records(APP, TBL)[0]["fields"]
    assert first == {"step": 0, "loss": 1.0, "run": "sync/run_0001"}
    batches = [r for r in lark.requests if r["path"].endswith("/records/batch_create")]
    assert 3 <= len(batches) <= 12
    assert all(len(r["json"]["records"]) <= 500 for r in batches)
    # One column was missing (run): created as text, once.
    made = [r for r in lark.requests if r["path"].endswith("/fields") and r["method"] == "POST"]
    assert [r["json"] for r in made] == [{"field_name": "run", "type": 1}]
    # The secret: in the child's environment only, never in a file exp wrote.
    meta = json.loads((pathlib.Path(e.work_dir) / "metadata.json").read_text())
    assert meta["lark"] == {"app_id": APP_ID, "url": url_of(lark), "extra_fields": {"run": "{name}/{run_id}"}}
    assert_secret_nowhere(base_dir, SECRET)


def assert_secret_nowhere(root, secret):
    hits = []
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            with open(p, "rb") as f:
                if secret.encode() in f.read():
                    hits.append(p)
    assert hits == []


@posix_only
def test_a_batch_file_sends_to_lark_and_no_file_or_answer_shows_the_secret(lark, tmp_path, train):
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "batch.toml", base, [
        {"name": "one", "command": py_cmd(train, 30), "lark_url": url_of(lark)},
        {"name": "two", "command": py_cmd(train, 20), "lark_config": {"extra_fields": {"who": "two"}}},
    ], lark_config={"app_id": APP_ID, "app_secret": SECRET, "url": url_of(lark, table="tblOther")})
    lark.add_table(APP, "tblOther", fields=[("Name", 1), ("step", 2)])
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env())
    assert r.returncode == 0, r.stderr
    # [[experiments]] lark_url overrides the [scheduler] table; the other one keeps it and adds a field.
    assert sorted(steps(lark)) == list(range(30))
    other = lark.records(APP, "tblOther")
    assert sorted(x["fields"]["step"] for x in other) == list(range(20))
    assert {x["fields"]["who"] for x in other} == {"two"}
    assert_secret_nowhere(base, SECRET)
    listing = run_exp("ls", base, "--json", cwd=tmp_path)
    assert listing.returncode == 0 and SECRET not in listing.stdout
    state = run_exp("status", base, "--json", cwd=tmp_path)
    assert SECRET not in state.stdout + state.stderr
    dash = exp.Dashboard(str(base))
    items = json.loads(dash.get_json("/api/experiments", {}))["items"]
    assert len(items) == 2
    answers = [dash.get_json("/api/experiments", {}), dash.get_json("/api/state", {})]
    for x in items:
        answers.append(dash.get_json("/api/experiment", {"id": [x["id"]]}))
        answers.append(dash.get_json("/api/file", {"id": [x["id"]], "path": ["metadata.json"]}))
    assert all(SECRET not in a.decode() for a in answers)
    assert all(APP_ID.encode() in a for a in answers[3::2])  # the file was served, without its secret


@posix_only
def test_incomplete_settings_warn_once_keep_the_rows_and_lark_sync_sends_them(lark, make_exp, train, tmp_path):
    e = make_exp("nosecret", py_cmd(train, 40), lark_config={"app_id": APP_ID, "url": url_of(lark)})
    assert run_fg(e) == 0  # never an exception in the training loop
    log = e.read_log()
    assert log.count("settings lack app_secret") == 1, log
    assert "lark-sync" in log
    assert [r["step"] for r in e.metrics()] == list(range(40))
    assert steps(lark) == []
    # Sent later: the secret from the environment.
    r = run_exp("lark-sync", e.work_dir, env=child_env(LARK_APP_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    assert "nosecret run_0001: sent 40 rows" in r.stdout
    assert steps(lark) == list(range(40))
    r = run_exp("lark-sync", e.work_dir, env=child_env(LARK_APP_SECRET=SECRET))
    assert r.returncode == 0 and "nothing to send" in r.stdout
    assert steps(lark) == list(range(40))  # nothing sent twice


def test_lark_sync_says_what_is_missing_and_rejects_bad_paths(tmp_path, make_exp, train, lark):
    e = make_exp("nosecret", py_cmd(train, 5), lark_config={"app_id": APP_ID, "url": url_of(lark)})
    assert run_fg(e) == 0
    r = run_exp("lark-sync", tmp_path / "results", env=child_env(LARK_APP_SECRET=None, FEISHU_APP_SECRET=None))
    assert r.returncode == 1 and "lack app_secret" in r.stderr and "LARK_APP_SECRET" in r.stderr
    r = run_exp("lark-sync", tmp_path / "missing")
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = run_exp("lark-sync", e.work_dir, "--url", "https://x.feishu.cn/docx/a")
    assert r.returncode == 2 and "document or sheet" in r.stderr
    # A whole results directory, and a table given on the command line.
    lark.add_table(APP, "tblElse", fields=[("Name", 1)])
    r = run_exp("lark-sync", tmp_path / "results", "--url", url_of(lark, table="tblElse"),
                env=child_env(LARK_APP_SECRET=SECRET))
    assert r.returncode == 0, r.stderr
    assert [x["fields"]["step"] for x in lark.records(APP, "tblElse")] == list(range(5))


@posix_only
def test_2000_rows_through_30_percent_failures_and_two_token_expiries_arrive_once_in_order(lark, make_exp, train):
    lark.fault_rate(0.3, seed=7)
    e = make_exp("faulty", py_cmd(train, 2000, 0.004), lark_config=full_cfg(lark, flush_timeout=120))
    h = e.run(background=True)
    wait_for(lambda: len(lark.records(APP, TBL)) >= 300, 60, what="300 rows")
    lark.expire_tokens()
    wait_for(lambda: len(lark.records(APP, TBL)) >= 900, 60, what="900 rows")
    lark.expire_tokens()
    assert h.wait(timeout=240) == 0
    assert steps(lark) == list(range(2000))
    faults = [r for r in lark.requests if r.get("fault")]
    assert len(faults) >= 3, "the fault rate did not bite"
    assert lark.count("/tenant_access_token/internal") >= 3  # fetched again after each expiry
    tokens = [r["query"].get("client_token") for r in lark.requests if r["path"].endswith("batch_create")]
    assert all(tokens)


@posix_only
def test_a_training_process_killed_mid_sync_then_lark_sync_gives_exactly_once(lark, make_exp, train, tmp_path):
    # The first batch is answered slowly: the process is killed while it waits,
    # after the server wrote the rows.  The batch's client_token was recorded
    # first, so lark-sync replays it (no copy) and sends the rest.
    lark.fault("slow", path="batch_create", delay=4.0)
    e = make_exp("killed", py_cmd(train, 900, 0.001), lark_config=full_cfg(lark, flush_timeout=60))
    h = e.run(background=True)
    wait_for(lambda: lark.count("/records/batch_create") >= 1, 60, what="the first batch")
    time.sleep(0.3)
    os.killpg(h.pid, signal.SIGKILL)
    h.wait(timeout=30)
    wait_for(lambda: len(lark.records(APP, TBL)) > 0, 10, what="the slow batch to be written")
    written = steps(lark)
    assert written == list(range(len(written)))
    r = run_exp("lark-sync", e.work_dir, env=child_env(LARK_APP_SECRET=SECRET), timeout=120)
    assert r.returncode == 0, r.stderr
    outbox = [json.loads(x) for x in pathlib.Path(e.work_dir, "lark", "run_0001.outbox.jsonl").read_text().splitlines()
              if x.endswith("}")]
    assert steps(lark) == [row["step"] for row in outbox]
    assert steps(lark) == list(range(len(outbox)))
    replays = [r for r in lark.requests if r["path"].endswith("batch_create")]
    assert replays[0]["query"]["client_token"] == replays[1]["query"]["client_token"]


@posix_only
def test_flush_timeout_leaves_the_rest_with_a_message_and_a_later_run_resumes(lark, make_exp, train, tmp_path):
    lark.delay = 1.5
    e = make_exp("slow", py_cmd(train, 30), lark_config=full_cfg(lark, flush_timeout=1))
    t0 = time.monotonic()
    assert run_fg(e) == 0
    assert time.monotonic() - t0 < 20
    log = e.read_log()
    assert "not sent yet" in log and f"python exp.py lark-sync {e.work_dir}" in log
    lark.delay = 0.0
    # The next run of the same experiment sends the old run's rows as well as its own,
    # even when its first attempts fail (more failures than one request retries).
    lark.fault("code", code=1254290, times=8, path="batch_create")
    again = exp.Experiment(name="slow", command=py_cmd(train, 3), base_dir=e.base_dir, resume=e.work_dir,
                           lark_config=full_cfg(lark, flush_timeout=30), env={"PYTHONPATH": os.path.dirname(EXP_PY)})
    assert run_fg(again) == 0
    got = steps(lark)
    assert sorted(got) == sorted(list(range(30)) + [0, 1, 2])
    assert len(lark.records(APP, TBL)) == 33


# ============================================================================
# Retries and faults, one at a time (the sender's own engine, in this process)
# ============================================================================


@pytest.fixture
def queued(make_exp, train, lark):
    """An experiment whose 20 rows wait in the outbox (its run had no secret)."""
    e = make_exp("queued", py_cmd(train, 20), lark_config={"app_id": APP_ID, "url": url_of(lark)})
    assert run_fg(e) == 0
    return e


def sync_of(e, fake, **more):
    warnings = []
    s = exp.LarkSync(exp.ExperimentDir(e.work_dir), exp.lark_settings(full_cfg(fake, **more), environ={}),
                     warn=warnings.append)
    return s, warnings


@pytest.mark.parametrize("kind, code", [("429", None), ("code", 1254290), ("code", 1254291), ("code", 1254607),
                                        ("code", 1255040), ("code", 1254002), ("code", 1254608), ("code", 1254036),
                                        ("5xx", None), ("drop", None),
                                        ("drop_after", None), ("token", None)])
def test_each_retryable_failure_is_retried_with_the_same_client_token(queued, lark, kind, code):
    lark.fault(kind, path="batch_create", code=code, reset=1)
    s, warnings = sync_of(queued, lark)
    t0 = time.monotonic()
    assert s.drain() == (20, 0)
    if kind == "429":
        assert time.monotonic() - t0 >= 1.0  # waited for x-ogw-ratelimit-reset
    assert steps(lark) == list(range(20))
    calls = [r for r in lark.requests if r["path"].endswith("batch_create")]
    assert len(calls) == 2 and calls[0]["query"]["client_token"] == calls[1]["query"]["client_token"]
    if kind == "token":
        assert lark.count("/tenant_access_token/internal") == 2
    assert warnings == []


def test_a_token_is_refreshed_before_it_expires(queued, lark):
    lark.token_ttl = exp.LARK_TOKEN_MARGIN + 2  # the cached token is near its end at once
    lark.token_reuse_min = 0
    s, _ = sync_of(queued, lark)
    s.fields()
    time.sleep(2.2)
    s.fields(refresh=True)
    assert lark.count("/tenant_access_token/internal") == 2
    assert all(r["status"] == 200 for r in lark.requests)


def test_wrong_credentials_and_a_missing_table_stop_with_a_clear_error_and_keep_the_rows(queued, lark):
    s = exp.LarkSync(exp.ExperimentDir(queued.work_dir),
                     exp.lark_settings(full_cfg(lark, app_secret="wrong"), environ={}))
    with pytest.raises(exp.LarkError, match="rejected the app's credentials"):
        s.drain()
    s2 = exp.LarkSync(exp.ExperimentDir(queued.work_dir),
                      exp.lark_settings({**full_cfg(lark), "url": url_of(lark, table="tblGone")}, environ={}))
    with pytest.raises(exp.LarkError, match="1254041"):
        s2.drain()
    assert exp.lark_pending(exp.ExperimentDir(queued.work_dir), "run_0001") == 20
    assert sync_of(queued, lark)[0].drain() == (20, 0)


def test_a_wiki_url_is_resolved_once(queued, lark):
    lark.add_wiki_node("wikcnTheNode1", obj_token=APP)
    lark.add_wiki_node("wikcnADocPage", obj_token="doxcnX", obj_type="docx")
    settings = exp.lark_settings({"app_id": APP_ID, "app_secret": SECRET,
                                  "url": f"{lark.url}/wiki/wikcnTheNode1?table={TBL}"}, environ={})
    d = exp.ExperimentDir(queued.work_dir)
    assert exp.LarkSync(d, settings).drain() == (20, 0)
    exp.LarkSync(d, settings).fields()
    assert lark.count("/wiki/v2/spaces/get_node") == 1
    bad = exp.lark_settings({"app_id": APP_ID, "app_secret": SECRET,
                             "url": f"{lark.url}/wiki/wikcnADocPage?table={TBL}"}, environ={})
    with pytest.raises(exp.LarkError, match="not a Base"):
        exp.LarkSync(d, bad).fields()


# ============================================================================
# Fields: types, auto-create, pagination
# ============================================================================


def test_values_are_converted_to_each_field_type(lark, make_exp, tmp_path):
    lark.add_table(APP, "tblTypes", fields=[
        ("Name", 1), ("num", 2), ("pick", 3, {"options": [{"name": "a"}]}), ("picks", 4, {"options": []}),
        ("when", 5), ("when_iso", 5), ("when_num", 5), ("ok", 7), ("phone", 13), ("link", 15), ("file", 17),
        ("formula", 20), ("created", 1001), ("count", 2), ("text_num", 1)])
    attach = tmp_path / "curve.png"
    attach.write_bytes(b"\x89PNG fake image bytes")
    script = write_script(tmp_path, "field_types.py", f"""
        import exp, datetime
        e = exp.load_experiment()
        e.upd_row(num="2.5", pick="b", picks="x", when=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                  when_iso="2026-01-02T03:04:05Z", when_num=1767323045, ok=1, phone="+8613800000000",
                  link="https://example.com/run", file={str(attach)!r}, formula=3, created=4, count="many",
                  text_num=0.25, Name="row0")
        e.save_row(lark=True)
    """)
    e = make_exp("types", py_cmd(script), lark_config=full_cfg(lark, url=url_of(lark, table="tblTypes")))
    assert run_fg(e) == 0
    (rec,) = lark.records(APP, "tblTypes")
    f = rec["fields"]
    ms = int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp() * 1000)
    assert f["num"] == 2.5 and f["pick"] == "b" and f["picks"] == ["x"]
    assert f["when"] == f["when_iso"] == f["when_num"] == ms
    assert f["ok"] is True and f["phone"] == "+8613800000000"
    assert f["link"] == {"text": "https://example.com/run", "link": "https://example.com/run"}
    (up,) = lark.uploads
    assert up["data"] == attach.read_bytes() and up["parent_node"] == APP and up["parent_type"] == "bitable_image"
    assert [x["file_token"] for x in f["file"]] == [up["file_token"]]
    assert f["text_num"] == "0.25" and f["Name"] == "row0"
    assert "formula" not in f and "created" not in f and "count" not in f  # the rest of the row still went
    log = e.read_log()
    assert "column 'formula' is read-only" in log and "column 'created' is read-only" in log
    assert "count='many' cannot go into a field of type 2" in log


@posix_only
def test_a_row_lark_refuses_is_left_out_and_the_rest_still_arrive(lark, make_exp, tmp_path):
    lark.add_table(APP, "tblGeo", fields=[("Name", 1), ("step", 2), ("where", 22)])
    script = write_script(tmp_path, "geo.py", """
        import exp
        e = exp.load_experiment()
        for i in range(10):
            e.upd_row(step=i, where="116.39,39.90" if i != 3 else "the office")
            e.save_row(lark=True)
    """)
    e = make_exp("geo", py_cmd(script), lark_config=full_cfg(lark, url=url_of(lark, table="tblGeo")))
    assert run_fg(e) == 0
    got = [r["fields"] for r in lark.records(APP, "tblGeo")]
    assert [r["step"] for r in got] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert all(r["where"] == "116.39,39.90" for r in got)
    assert "Lark refused a row" in e.read_log() and [r["step"] for r in e.metrics()] == list(range(10))


def test_a_cell_lark_refuses_is_left_out_of_its_row(queued, lark):
    # The server refuses the batch naming a number cell: exp narrows it down to the row, then sends
    # that row without its number cells (a text cell stays), and the rest in full.
    lark.add_table(APP, "tblMixed", fields=[("Name", 1), ("step", 1), ("loss", 2)])
    lark.fault("code", code=1254061, path="batch_create", times=5)  # 20 -> 10 -> 5 -> 2 -> 1 row
    s, warnings = sync_of(queued, lark, url=url_of(lark, table="tblMixed"))
    assert s.drain() == (20, 0)
    got = [r["fields"] for r in lark.records(APP, "tblMixed")]
    assert [r["step"] for r in got] == [str(i) for i in range(20)]
    assert "loss" not in got[0] and all("loss" in r for r in got[1:])
    assert any("Lark refused loss='1.0'" in w for w in warnings), warnings


@posix_only
def test_a_rewritten_file_is_uploaded_again(lark, make_exp, tmp_path):
    lark.add_table(APP, "tblPlots", fields=[("Name", 1), ("step", 2), ("plot", 17)])
    script = write_script(tmp_path, "plots.py", """
        import exp, time
        e = exp.load_experiment()
        for i in range(2):
            with open("plot.png", "wb") as f:
                f.write(b"PNG epoch %d" % i)
            e.upd_row(step=i, plot="plot.png")  # a relative path, as savefig writes it
            e.save_row(lark=True)
            time.sleep(1.5)
    """)
    e = make_exp("plots", py_cmd(script), cwd=tmp_path, lark_config=full_cfg(lark, url=url_of(lark, table="tblPlots")))
    assert run_fg(e) == 0
    assert [u["data"] for u in lark.uploads] == [b"PNG epoch 0", b"PNG epoch 1"]
    tokens = [r["fields"]["plot"][0]["file_token"] for r in lark.records(APP, "tblPlots")]
    assert tokens == [u["file_token"] for u in lark.uploads]


@posix_only
def test_an_attachment_over_20_mib_is_left_out_with_a_warning(lark, make_exp, tmp_path):
    lark.add_table(APP, "tblBig", fields=[("Name", 1), ("step", 2), ("ckpt", 17)])
    big = tmp_path / "model.bin"
    with open(big, "wb") as f:
        f.truncate(exp.LARK_UPLOAD_MAX + 1)
    script = write_script(tmp_path, "big.py", f"""
        import exp
        e = exp.load_experiment()
        e.upd_row(step=1, ckpt={str(big)!r})
        e.save_row(lark=True)
    """)
    e = make_exp("big", py_cmd(script), lark_config=full_cfg(lark, url=url_of(lark, table="tblBig")))
    assert run_fg(e) == 0
    assert [r["fields"] for r in lark.records(APP, "tblBig")] == [{"step": 1}]
    assert lark.uploads == [] and "larger than 20 MiB" in e.read_log()


def test_lark_value_rules():
    assert exp.lark_value(3, 2) == 3 and exp.lark_value(True, 2) == 1 and exp.lark_value("1e3", 2) == 1000.0
    for bad in (float("nan"), "abc", [1]):
        with pytest.raises(ValueError):
            exp.lark_value(bad, 2)
    assert exp.lark_value(0.1, 1) == "0.1" and exp.lark_value(float("inf"), 1) == "inf"
    assert exp.lark_value(["a", 2], 4) == ["a", "2"]
    assert exp.lark_value("no", 7) is False and exp.lark_value("TRUE", 7) is True
    with pytest.raises(ValueError):
        exp.lark_value("maybe", 7)
    with pytest.raises(ValueError):
        exp.lark_value("not a link", 15)
    with pytest.raises(ValueError):
        exp.lark_value("12-34", 13)
    assert exp.lark_value("ou_1", 11) == [{"id": "ou_1"}] and exp.lark_value("recA", 21) == ["recA"]
    assert exp.lark_date_ms(1_700_000_000) == 1_700_000_000_000 == exp.lark_date_ms(1_700_000_000_000)
    with pytest.raises(ValueError):
        exp.lark_value(True, 5)
    with pytest.raises(ValueError):
        exp.lark_value("x", 24)  # a type the API does not take
    with pytest.raises(ValueError, match="100,000"):
        exp.lark_value("x" * 100_001, 1)


@pytest.mark.parametrize("how", ["created", "off", "refused"])
def test_a_column_the_table_lacks(lark, make_exp, tmp_path, how):
    script = write_script(tmp_path, "cols.py", """
        import exp
        e = exp.load_experiment()
        for i in range(3):
            e.upd_row(step=i, acc=0.5 + i, phase="warmup", flag=True)
            e.save_row(lark=True)
    """)
    if how == "refused":
        lark.refuse_field_create = True
    e = make_exp("cols", py_cmd(script), lark_config=full_cfg(lark, auto_create_fields=how != "off"))
    assert run_fg(e) == 0
    recs = [r["fields"] for r in lark.records(APP, TBL)]
    assert [r["step"] for r in recs] == [0, 1, 2]
    types = {f["field_name"]: f["type"] for f in lark.fields(APP, TBL)}
    log = e.read_log()
    if how == "created":
        assert types["acc"] == 2 and types["phase"] == 1 and types["flag"] == 1
        assert recs[2] == {"step": 2, "acc": 2.5, "phase": "warmup", "flag": "True"}
    else:
        assert "acc" not in types and recs[2] == {"step": 2}
        for col in ("acc", "phase", "flag"):
            assert log.count(f"column {col!r}") == 1, log  # one warning a column
        assert ("auto_create_fields is false" in log) == (how == "off")


def test_the_fields_list_is_read_page_by_page(queued, lark):
    lark.add_table(APP, "tblWide", fields=[("Name", 1)] + [(f"c{i:03d}", 1) for i in range(230)] + [("step", 2), ("loss", 2)])
    s, _ = sync_of(queued, lark, url=url_of(lark, table="tblWide"))
    assert s.drain() == (20, 0)
    assert lark.count("/fields", method="GET") == 3  # 100 + 100 + 33
    assert not [r for r in lark.requests if r["path"].endswith("/fields") and r["method"] == "POST"]


# ============================================================================
# Summary mode: one record per run
# ============================================================================


@posix_only
def test_summary_mode_keeps_one_record_per_run(lark, make_exp, train, tmp_path):
    e = make_exp("summ", py_cmd(train, 50, 0.01), tags=["base"], params={"lr": 0.1},
                 lark_config=full_cfg(lark, mode="summary"))
    assert run_fg(e) == 0
    wait_for(lambda: any(r["fields"].get("status") == "finished" for r in lark.records(APP, TBL)), 30,
             what="the final update")
    (rec,) = lark.records(APP, TBL)
    f = rec["fields"]
    assert f["name"] == "summ" and f["run"] == "run_0001" and f["status"] == "finished"
    assert f["tags"] == "base" and f["lr"] == 0.1 and f["step"] == 49 and f["loss"] == 1 / 50
    assert isinstance(f["duration"], (int, float)) and f["start"]
    # Created once, however many updates followed (how many depends on how the sends were
    # spaced: on a loaded machine the first may come only after the run ended).
    assert lark.count("/records", method="POST") == 1
    failing = make_exp("summfail", "exit 3", lark_config=full_cfg(lark, mode="summary"))
    assert run_fg(failing) == 3
    wait_for(lambda: any(r["fields"].get("name") == "summfail" for r in lark.records(APP, TBL)), 30,
             what="the failed run's record")
    assert [r["fields"]["status"] for r in lark.records(APP, TBL) if r["fields"]["name"] == "summfail"] == ["error"]


def test_summary_mode_updates_its_one_record_in_place(queued, lark):
    s, _ = sync_of(queued, lark, mode="summary")
    s.summary_update("run_0001")  # created, with the rows' last values
    (rec,) = lark.records(APP, TBL)
    assert rec["fields"]["status"] == "running" and rec["fields"]["step"] == 19
    s.summary_update("run_0001", exp.FINISHED)  # the run's end: the same record
    (after,) = lark.records(APP, TBL)
    assert after["record_id"] == rec["record_id"]
    assert after["fields"]["status"] == "finished" and after["fields"]["step"] == 19
    assert lark.count("/records", method="POST") == 1
    assert lark.count(f"/records/{rec['record_id']}", method="PUT") == 1


# ============================================================================
# The optional live test
# ============================================================================

LIVE = all(os.environ.get(k) for k in ("LARK_APP_ID", "LARK_APP_SECRET", "LARK_TEST_TABLE_URL"))


@pytest.mark.skipif(not LIVE, reason="live Lark test: set LARK_APP_ID, LARK_APP_SECRET and LARK_TEST_TABLE_URL")
def test_live_rows_reach_a_real_table(make_exp, train):  # pragma: no cover - needs a real tenant
    e = make_exp("live", py_cmd(train, 3), lark_config={"url": os.environ["LARK_TEST_TABLE_URL"],
                                                         "extra_fields": {"exp_live_test": "{run_id}"}})
    assert run_fg(e) == 0
    assert "lark:" not in e.read_log()
    d = exp.ExperimentDir(e.work_dir)
    assert exp.lark_pending(d, "run_0001") == 0


# ============================================================================
# What a new user's review of the Lark features found
# ============================================================================


@posix_only
def test_a_secret_in_a_changed_config_is_redacted_in_code_diff(lark, tmp_path):
    # The README lets app_secret sit in lark_config; a batch file with it, changed in the work
    # tree, went into code.diff whole, and the dashboard served it.
    import shutil as sh

    if sh.which("git") is None:
        pytest.skip("needs git: code.diff is `git diff HEAD`")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    write_script(repo, "train.py", "print('hi')\n")  # committed: only the config changes
    hook = lark.hook_url("h1")
    lark.add_webhook("h1", secret="whsec-123456")
    text = ('[scheduler]\nbase_experiment_dir = "results"\n'
            'notify = {{ lark_webhook = "{hook}", secret = "{ws}", on = [] }}\n'
            '[[experiments]]\nname = "t"\ncommand = "{py} train.py"\n'
            'lark_config = {{ app_id = "{app}", app_secret = "{secret}", url = "{url}" }}\n')
    cfg = repo / "batch.toml"
    cfg.write_text(text.format(hook="x", ws="x", py=sys.executable, app=APP_ID, secret="PLACEHOLDER",
                               url=url_of(lark)))
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "start"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    cfg.write_text(text.format(hook=hook, ws="whsec-123456", py=sys.executable, app=APP_ID, secret=SECRET,
                               url=url_of(lark)))
    r = run_exp("run", cfg, cwd=repo, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    (d,) = exp_dirs(repo / "results", "t")
    diff = (d / "code.diff").read_text()
    assert "app_secret" in diff and 'app_secret = "***"' in diff, diff
    assert "# exp: 5 value(s) named like secrets are shown as ***" in diff, diff  # 2 removed, 3 added
    for p in (repo / "results").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert SECRET.encode() not in data and b"whsec-123456" not in data and b"/hook/h1" not in data, p
    detail = exp.read_code_diff(str(d))
    assert SECRET not in detail["text"] and 'app_secret = "***"' in detail["text"]

    # A code.diff saved by an older exp, secret and all: the dashboard serves it redacted too.
    (d / "code.diff").write_text(f'+++ b/batch.toml\n+lark_config = {{ app_secret = "{SECRET}" }}\n')
    dash = exp.Dashboard(str(repo / "results"))
    (item,) = json.loads(dash.get_json("/api/experiments", {}))["items"]
    for path, q in (("/api/file", {"id": [item["id"]], "path": ["code.diff"]}),
                    ("/api/changes", {"id": [item["id"]]})):
        served = dash.get_json(path, q)
        served = served if isinstance(served, bytes) else str(served).encode()
        assert SECRET.encode() not in served and b'app_secret = \\"***\\"' in served, (path, served[:500])
    _, _, _, raw = dash.raw_file({"id": [item["id"]], "path": ["code.diff"]})
    assert raw == b'+++ b/batch.toml\n+lark_config = { app_secret = "***" }\n'


def test_redact_diff_hides_secret_values_and_leaves_code_alone():
    diff = ('--- a/c.yaml\n+++ b/c.yaml\n+token: plainvalue\n+name: keep\n'
            '--- a/t.py\n+++ b/t.py\n+sort_key = lambda x: x[0]\n+api_key = "sk-123"\n+HF_TOKEN=hf_abc\n'
            '+url = "https://user:pw@host/x"\n+key: int = 3\n+hook = "https://x/open-apis/bot/v2/hook/ab-12"\n')
    text, n = exp.redact_diff(diff)
    assert text.splitlines() == [
        "--- a/c.yaml", "+++ b/c.yaml", "+token: ***", "+name: keep", "--- a/t.py", "+++ b/t.py",
        "+sort_key = lambda x: x[0]", '+api_key = "***"', "+HF_TOKEN=***", '+url = "https://user:***@host/x"',
        "+key: int = 3", '+hook = "https://x/open-apis/bot/v2/hook/***"']
    assert n == 5


@posix_only
def test_summary_mode_whose_create_answer_was_lost_still_ends_with_the_final_values(lark, make_exp, train):
    # Lark made the record but every answer of the first create was lost; the retry replays the
    # token, which needs the very same body (else 1255006), and the record must end up updated.
    lark.fault("drop_after", path="/records", times=exp.LARK_ATTEMPTS)
    e = make_exp("sumblip", py_cmd(train, 6, 0.2), lark_config=full_cfg(lark, mode="summary", flush_timeout=5))
    assert run_fg(e) == 0, e.read_log()
    wait_for(lambda: [r["fields"].get("status") for r in lark.records(APP, TBL)] == ["finished"], 30,
             what="the summary record's final status")
    (rec,) = lark.records(APP, TBL)
    assert rec["fields"]["step"] == 5
    assert "1255006" not in e.read_log()
    r = run_exp("lark-sync", e.work_dir, env=child_env(LARK_APP_SECRET=SECRET))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(lark.records(APP, TBL)) == 1


def test_one_call_with_the_network_down_makes_at_most_lark_attempts_requests():
    # The token fetch retried inside each retry of the call: 6 x 6 = 36 requests, 77 s of waits.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: every connection is refused
    sleeps: list[float] = []
    c = exp.LarkClient(f"http://127.0.0.1:{port}", APP_ID, SECRET, sleep=sleeps.append)
    with pytest.raises(exp.LarkError, match="Connection refused"):
        c.list_fields(APP, TBL)
    assert c.requests == exp.LARK_ATTEMPTS and len(sleeps) == exp.LARK_ATTEMPTS - 1


@posix_only
def test_a_rows_own_extra_fields_from_save_row_are_sent_with_it(lark, make_exp, tmp_path):
    lark.add_field(APP, TBL, "phase", 1)
    lark.add_field(APP, TBL, "val", 2)
    script = write_script(tmp_path, "phases.py", """
        import exp
        e = exp.load_experiment()
        for i in range(2):
            e.upd_row(step=i, loss=1.0)
            e.save_row(lark=True)
            e.upd_row(step=i, val=0.5)
            e.save_row(lark=True, lark_config={"extra_fields": {"phase": "eval-{run_id}"}})
    """)
    e = make_exp("phases", py_cmd(script), lark_config=full_cfg(lark, extra_fields={"phase": "train"}))
    assert run_fg(e) == 0, e.read_log()
    wait_for(lambda: len(lark.records(APP, TBL)) == 4, 30, what="4 records")
    got = [(r["fields"].get("step"), r["fields"].get("phase")) for r in lark.records(APP, TBL)]
    assert got == [(0, "train"), (0, "eval-run_0001"), (1, "train"), (1, "eval-run_0001")]
    assert "changed settings other than extra_fields" not in e.read_log()


@posix_only
def test_rows_sent_for_a_run_after_it_died_fill_host_as_its_own_process_did(lark, make_exp, tmp_path):
    lark.add_field(APP, TBL, "who", 1)
    script = write_script(tmp_path, "dies.py", """
        import os, exp
        e = exp.load_experiment()
        for i in range(5):
            e.upd_row(step=i)
            e.save_row(lark=True)
        os._exit(3)  # before its sender sent anything: the process that started it sends the rows
    """)
    e = make_exp("dies", py_cmd(script), lark_config=full_cfg(lark, extra_fields={"who": "{name}@{host}"}))
    assert run_fg(e) == 3
    wait_for(lambda: len(lark.records(APP, TBL)) == 5, 60, what="the 5 rows")
    assert {r["fields"].get("who") for r in lark.records(APP, TBL)} == {f"dies@{exp._hostname()}"}


@posix_only
def test_credentials_lark_refuses_are_one_warning_and_no_wait_at_exit(lark, make_exp, train):
    e = make_exp("badsecret", py_cmd(train, 5, 0.1),
                 lark_config=full_cfg(lark, app_secret="wrong-secret", flush_timeout=60))
    t0 = time.monotonic()
    assert run_fg(e) == 0
    took = time.monotonic() - t0
    log = e.read_log()
    said = [ln for ln in log.splitlines() if "rejected the app's credentials" in ln]
    assert len(said) == 1 and "syncing waits for this to be fixed" in said[0], log
    assert "; retrying" not in log
    assert took < 45, (took, log)  # flush_timeout is 60: it did not wait for what cannot be sent
    assert lark.records(APP, TBL) == []


def test_exp_notify_keeps_within_the_bots_rate_limit(lark, run_py):
    lark.add_webhook("h1")
    r = run_py("import exp\nprint([exp.notify(f'm{i}', webhook=%r) for i in range(8)])" % lark.hook_url("h1"),
               timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([True] * 8) and "not sent" not in r.stderr, r.stderr
    assert [b["content"]["text"] for _, b, _ in lark.messages] == [f"m{i}" for i in range(8)]


def test_notifications_the_batch_could_not_send_by_its_end_are_named(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out: list[str] = []
    n = exp.Notifier(f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/x", report=out.append)
    for i in range(3):
        n.send({"msg_type": "text", "content": {"text": f"m{i}"}})
    left = n.close(timeout=2)
    assert left >= 1
    assert any(f"{left} notification(s) not sent within 2 s at the batch's end: the webhook still failed "
               "(webhook unreachable" in m for m in out), out
