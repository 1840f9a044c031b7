"""Group-chat notifications: the scheduler's cards, exp.notify(), signing, throttling, trimming.

The webhook is tests/fake_lark.py's: it checks signatures, body size and the
bot's rate limits as the documentation states them.
"""
from __future__ import annotations

import json
import socket
import time

import pytest

import exp
from conftest import child_env, exp_dirs, posix_only, py_cmd, run_exp, write_batch, write_script
from fake_lark import FakeLark

HOOK_SECRET = "hook-s3cret-1234"


@pytest.fixture
def lark():
    with FakeLark() as fake:
        yield fake


def cards(fake, hook="h1"):
    return [body for token, body, _ in fake.messages if token == hook]


def card_text(body) -> str:
    card = body["card"]
    parts = [card["header"]["title"]["content"]]
    parts += [el["text"]["content"] for el in card["elements"] if el.get("text")]
    return "\n".join(parts)


def by_title(fake, hook="h1"):
    return {b["card"]["header"]["title"]["content"]: card_text(b) for b in cards(fake, hook)}


METRICS = """
import exp
e = exp.load_experiment()
e.upd_row(step=7, loss=0.125)
e.save_row()
print("epoch 1 done")
"""


@posix_only
def test_the_scheduler_reports_finish_failure_kill_timeout_and_the_batch_end_signed(lark, tmp_path):
    hook = lark.add_webhook("h1", secret=HOOK_SECRET)
    script = write_script(tmp_path, "m.py", METRICS)
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "b.toml", base, [
        {"name": "good", "command": py_cmd(script)},
        {"name": "oom", "command": "echo 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB'; exit 1"},
        {"name": "slow", "command": "sleep 30", "timeout": "1s"},
        {"name": "shot", "command": "echo going; kill -9 $$"},
    ], max_concurrent_experiments=4, notify={"lark_webhook": hook, "secret": HOOK_SECRET})
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "notification not sent" not in r.stdout + r.stderr
    got = by_title(lark)
    assert set(got) == {"good finished", "oom failed", "slow failed", "shot failed", "batch done: b.toml"}, got
    good = got["good finished"]
    assert "step=7" in good and "loss=0.125" in good and "epoch 1 done" in good
    assert "\nhost: " in good and "\nGPUs: none" in good and "\nduration: " in good
    assert f"path: {exp_dirs(base, 'good')[0]}" in good
    assert "exit code 1; CUDA out of memory" in got["oom failed"]
    assert "CUDA out of memory. Tried to allocate" in got["oom failed"]  # the log's last lines
    assert "timeout" in got["slow failed"]
    assert "SIGKILL" in got["shot failed"]
    assert "4: 1 finished, 3 error" in got["batch done: b.toml"] and "oom" in got["batch done: b.toml"]
    colours = {b["card"]["header"]["title"]["content"]: b["card"]["header"]["template"] for b in cards(lark)}
    assert colours["good finished"] == "green" and colours["oom failed"] == "red"
    # Signed: each body carries a timestamp string and its signature (the fake refused any other).
    for body in cards(lark):
        assert body["sign"] == exp.lark_sign(body["timestamp"], HOOK_SECRET)
    # A stop by the user is reported as killed.


@posix_only
def test_on_chooses_the_events_and_an_experiment_overrides_the_scheduler(lark, tmp_path, monkeypatch):
    a, b = lark.add_webhook("h1"), lark.add_webhook("h2")
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "b.toml", base, [
        {"name": "fine", "command": "true"},
        {"name": "bad", "command": "exit 4"},
        {"name": "mine", "command": "exit 5", "notify": {"lark_webhook": b, "on": ["error", "finished"]}},
    ], notify={"lark_webhook": a, "on": ["error"]})
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=60)
    assert r.returncode == 1
    assert sorted(by_title(lark, "h1")) == ["bad failed"]
    assert sorted(by_title(lark, "h2")) == ["mine failed"]
    # From the environment when the file says nothing.
    cfg2 = write_batch(tmp_path / "c.toml", tmp_path / "r2", [{"name": "envy", "command": "true"}])
    r = run_exp("run", cfg2, cwd=tmp_path, env=child_env(LARK_WEBHOOK=lark.hook_url("h2")), timeout=60)
    assert r.returncode == 0
    assert "envy finished" in by_title(lark, "h2") and "batch done: c.toml" in by_title(lark, "h2")


@posix_only
def test_a_failing_webhook_never_affects_the_batch(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_batch(tmp_path / "b.toml", tmp_path / "results", [
        {"name": "x", "command": "true"}, {"name": "y", "command": "true"}],
        notify={"lark_webhook": f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/none"})
    t0 = time.monotonic()
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "notification not sent: webhook unreachable" in r.stdout
    assert time.monotonic() - t0 < 30


def test_a_refused_message_is_reported_with_its_code(lark):
    lark.add_webhook("kw", keywords=["deploy"])
    reports = []
    n = exp.Notifier(lark.hook_url("kw"), report=reports.append)
    n.send({"msg_type": "text", "content": {"text": "no keyword here"}})
    n.close()
    assert n.failed == 1 and "19024" in reports[0]


def test_messages_are_throttled_to_the_bots_limits(lark):
    lark.add_webhook("h1")
    n = exp.Notifier(lark.hook_url("h1"))
    for i in range(12):
        n.send({"msg_type": "text", "content": {"text": f"message {i}"}})
    n.close(timeout=30)
    times = sorted(t for _, _, t in lark.messages)
    assert n.sent == 12 and len(times) == 12  # none refused by the fake's 5-per-second limit
    assert times[-1] - times[0] >= 2.0
    assert [b["content"]["text"] for _, b, _ in lark.messages] == [f"message {i}" for i in range(12)]


def test_a_message_the_bot_rate_limits_or_loses_is_sent_again_and_others_are_not(lark):
    lark.add_webhook("h1", keywords=["exp"])
    reports = []
    n = exp.Notifier(lark.hook_url("h1"), report=reports.append)
    lark.fault("code", path="hook/h1", code=exp.WEBHOOK_RATE_LIMITED)  # limited where it arrives
    n.send({"msg_type": "text", "content": {"text": "exp one"}})
    lark.fault("drop", path="hook/h1")  # the connection lost on the way
    n.send({"msg_type": "text", "content": {"text": "exp two"}})
    n.send({"msg_type": "text", "content": {"text": "no keyword"}})  # refused for good: not retried
    assert n.close(timeout=60) == 0
    assert [b["content"]["text"] for _, b, _ in lark.messages] == ["exp one", "exp two"]
    assert n.sent == 2 and n.failed == 1
    assert len(reports) == 1 and "19024" in reports[0]
    assert lark.count("/hook/h1") == 5  # two tries each for the first two, one for the refused


def test_a_card_over_the_size_limit_is_trimmed_not_refused(lark):
    lark.add_webhook("h1", secret=HOOK_SECRET)
    tail = "\n".join(f"line {i} " + "x" * 200 + " 数据" for i in range(400))
    card = exp.run_card({"name": "huge", "status": exp.ERROR, "reason": "exit code 1", "duration": 3.5,
                         "host": "box", "gpus": [0, 1], "metrics": {f"m{i}": i for i in range(50)},
                         "log_tail": tail, "path": "/r/huge", "attempt": 1, "attempts": 1})
    size = len(json.dumps(card, ensure_ascii=False).encode())
    assert size <= exp.WEBHOOK_MAX_BYTES - 200
    text = card_text(card)
    assert "line 399" in text and "line 0 " not in text  # the end of the log is what is kept
    exp.post_webhook(lark.hook_url("h1"), card, HOOK_SECRET)
    assert len(lark.messages) == 1


@posix_only
def test_exp_notify_from_a_training_script(lark, tmp_path, run_py):
    lark.add_webhook("h1", secret=HOOK_SECRET)
    script = write_script(tmp_path, "talk.py", """
        import exp
        print("sent", exp.notify("loss went below 0.1 <b>*yay*</b>"))
    """)
    cfg = write_batch(tmp_path / "b.toml", tmp_path / "results", [{"name": "talker", "command": py_cmd(script)}],
                      notify={"lark_webhook": lark.hook_url("h1"), "secret": HOOK_SECRET, "on": []})
    r = run_exp("run", cfg, cwd=tmp_path, env=child_env(), timeout=60)
    assert r.returncode == 0
    texts = [b["content"]["text"] for _, b, _ in lark.messages]
    assert texts == ["loss went below 0.1 <b>*yay*</b>"]
    # The webhook and its secret reached the script through its environment only.
    for p in (tmp_path / "results").rglob("*"):
        if p.is_file():
            assert HOOK_SECRET.encode() not in p.read_bytes() and b"/hook/h1" not in p.read_bytes(), p
    # No webhook at all, or one that fails: a warning and False, never an exception that would
    # stop the training.
    r = run_py("import exp\nprint(exp.notify('x'))", env={"LARK_WEBHOOK": None})
    assert r.returncode == 0 and r.stdout.strip() == "False"
    assert "exp: warning: notification not sent: no webhook; pass exp.notify(..., webhook=...) or set " \
           "LARK_WEBHOOK (in a batch: [scheduler] notify = { lark_webhook = ... })" in r.stderr
    r = run_py("import exp\nprint(exp.notify('x', webhook=%r))" % lark.hook_url("nope"))
    assert r.stdout.strip() == "False" and "19001" in r.stderr


def test_the_cause_of_a_failure_is_read_from_the_log():
    assert exp.log_cause("torch.OutOfMemoryError: CUDA out of memory. Tried") == "CUDA out of memory"
    assert exp.log_cause("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:219") == "NCCL error"
    assert exp.log_cause("step 10 loss nan") == "NaN loss"
    assert exp.log_cause("/bin/sh: line 1:  1234 Killed   python train.py") == "Killed"
    assert exp.log_cause("all good") is None


def test_notify_settings_are_checked():
    with pytest.raises(exp.ConfigError) as info:
        exp.parse_config('[scheduler]\nnotify = { lark_webhok = "https://x", on = ["fail"] }\n'
                         '[[experiments]]\nname = "a"\ncommand = "true"\n', "c.toml", "/")
    msg = str(info.value)
    assert "scheduler.notify: unknown key 'lark_webhok' (did you mean 'lark_webhook'?)" in msg
    assert "scheduler.notify.on: expected a list of 'error', 'finished', 'done'" in msg


@posix_only
def test_an_experiment_stopped_with_exp_kill_is_reported_killed(lark, tmp_path):
    import subprocess
    import sys

    from conftest import EXP_PY, stop_process, wait_for

    hook = lark.add_webhook("h1")
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "b.toml", base, [{"name": "sleeper", "command": "sleep 60"}],
                      notify={"lark_webhook": hook})
    proc = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def running():
            r = run_exp("status", base, "--json", cwd=tmp_path)
            return r.returncode == 0 and any(t["status"] == "running" for t in json.loads(r.stdout)["tasks"])

        wait_for(running, 30, interval=0.1, what="the experiment to run")
        r = run_exp("kill", "sleeper", "--dir", base, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=30) == 1
    finally:
        stop_process(proc)
    got = by_title(lark)
    assert "terminated by user" in got["sleeper killed"]
    assert lark.messages[0][1]["card"]["header"]["template"] == "orange"


def test_a_garbled_answer_is_a_failure_not_an_exception(lark):
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/x"
        assert exp.notify("hello", webhook=url) is False
        reports = []
        n = exp.Notifier(url, report=reports.append)
        n.send({"msg_type": "text", "content": {"text": "one"}})
        time.sleep(0.5)
        lark.add_webhook("h1")
        n.webhook = lark.hook_url("h1")  # the thread lives on and sends the next one
        n.send({"msg_type": "text", "content": {"text": "two"}})
        n.close()
        assert n.failed == 1 and n.sent == 1 and len(reports) == 1
    finally:
        srv.close()


def test_exp_notify_trims_a_long_text_to_fit(lark):
    lark.add_webhook("h1", secret=HOOK_SECRET)
    text = 'quote " tab \t newline \n ' * 2000
    assert exp.notify(text, webhook=lark.hook_url("h1"), secret=HOOK_SECRET) is True
    (sent,) = [b["content"]["text"] for _, b, _ in lark.messages]
    assert sent.endswith("…") and text.startswith(sent[:-1].rstrip())
