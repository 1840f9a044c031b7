"""The dashboard's security: paths stay inside DIR, tokens, Host and Origin checks,
POST rules, error bodies, headers, and secrets that never leave the server.

A real ``exp.DashboardServer`` on 127.0.0.1 serves a directory next to files
it must never serve: a secret file, a secret directory and an experiment-like
directory outside DIR, reached through ``..``, absolute paths, encodings,
NUL bytes, backslashes and symlinks.  Requests go out through ``http.client``
exactly as written (no client-side normalisation).  POST rules are checked
against a live ``exp run`` scheduler, so "nothing happens" means a running
experiment really keeps running.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import (EXP_PY, call_with_timeout, child_env, pid_gone, posix_only, read_meta,  # noqa: E402
                      stop_process, wait_for, write_batch)
from conftest import write_exp as write_exp_dir  # noqa: E402
from http_helpers import Resp, request, serving  # noqa: E402



# ============================================================================
# Client helpers
# ============================================================================


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def q(path: str, params) -> str:
    return path + "?" + urllib.parse.urlencode(params, doseq=True)


def assert_json_error(r: Resp, *statuses: int) -> dict:
    if statuses:
        assert r.status in statuses, r
    assert r.status >= 400, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    assert "Traceback" not in r.text, r
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body


def write_exp(base: Path, rel: str, meta: dict, log: str = "log line\n", csv: str = "step,loss\n1,0.5\n") -> Path:
    return write_exp_dir(base, rel, meta, logs={"run_0001": log}, metrics={"run_0001": csv})


def new_meta(name: str, created: str, **kw) -> dict:
    m = {"name": name, "command": f"python train.py --{name}", "tags": [], "status": "finished", "exit_code": 0,
         "created_at": created, "started_at": created, "ended_at": created, "current_run_id": "run_0001",
         "runs": [{"id": "run_0001", "status": "finished", "exit_code": 0, "started_at": created,
                   "ended_at": created}], "params": {}}
    m.update(kw)
    return m


# ============================================================================
# The vault: DIR, and secrets next to it
# ============================================================================

OUTSIDE_SECRETS = ["TOPSECRET-OUTSIDE-123", "TOPSECRET-DIR-456", "TOPSECRET-EXP-789", "TOPSECRET-LOG-000",
                   "TOPSECRET_COL"]
META_SECRETS = ["LARK-SECRET-1", "ENV-TOKEN-2", "WANDB-KEY-3", "TOP-SECRET-4", "PW-SECRET-5", "PARAM-KEY-6"]
E = "e_2026-01-01__00-00-00"
EVIL = "evil_2026-01-01__00-00-00"
OLD = "old_2025-01-02__03-04-05"
NEW = "new_2026-02-01__00-00-00"
F = "f_2026-01-03__00-00-00"
G = "g_2026-01-04__00-00-00"


class Vault:
    pass


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    root = tmp_path_factory.mktemp("vault")
    v = Vault()
    v.root = root
    v.base = base = root / "results"
    (root / "secret.txt").write_text("TOPSECRET-OUTSIDE-123\n")
    (root / "outside_dir").mkdir()
    (root / "outside_dir" / "secret2.txt").write_text("TOPSECRET-DIR-456\n")
    write_exp(root, "outside_exp", new_meta("outside", "2026-01-01T00:00:00+00:00",
                                            description="TOPSECRET-EXP-789"),
              log="TOPSECRET-LOG-000\n", csv="TOPSECRET_COL\n1\n")
    e = write_exp(base, E, new_meta("e", "2026-01-01T00:00:00+00:00"))
    (e / "notes.txt").write_text("inside notes\n")
    os.symlink(root / "secret.txt", e / "leak.txt")                  # absolute file symlink out
    os.symlink("../../secret.txt", e / "leak_rel.txt")               # relative file symlink out
    os.symlink(root / "outside_dir", e / "leakdir")                  # directory symlink out
    os.symlink("notes.txt", e / "inside_link.txt")                   # a symlink that stays inside: fine
    os.symlink(root / "outside_exp" / "terminal_logs" / "run_0001.log", e / "terminal_logs" / "run_0009.log")
    os.symlink(root / "outside_exp" / "metrics" / "run_0001.csv", e / "metrics" / "run_0009.csv")
    os.symlink(root / "outside_exp", base / EVIL)                    # an experiment directory symlinked in
    # An experiment whose current run's log and metrics are symlinks out (read by the listing itself).
    f = write_exp(base, F, new_meta("f", "2026-01-03T00:00:00+00:00", current_run_id="run_0009",
                                    runs=[{"id": "run_0009", "status": "finished"}]))
    os.symlink(root / "outside_exp" / "terminal_logs" / "run_0001.log", f / "terminal_logs" / "run_0009.log")
    os.symlink(root / "outside_exp" / "metrics" / "run_0001.csv", f / "metrics" / "run_0009.csv")
    # An experiment whose metadata.json is a symlink out.
    g = base / G
    (g / "terminal_logs").mkdir(parents=True)
    os.symlink(root / "outside_exp" / "metadata.json", g / "metadata.json")
    # The earlier project's metadata.json, with secrets planted.
    old = write_exp(base, OLD, {
        "name": "old", "command": "python train.py", "tags": ["legacy"], "timestamp": "2025-01-02T03:04:05+00:00",
        "status": "error", "return_code": 2, "completed_at": "2025-01-02T04:00:00+00:00", "pid": None,
        "current_run_id": "run_0001", "cwd": None, "description": "old one",
        "params": {"lr": 0.1, "wandb_api_key": "PARAM-KEY-6"},
        "lark_config": {"app_id": "cli_x", "app_secret": "LARK-SECRET-1", "app_token": "bascnTOKEN"},
        "environment": {"API_TOKEN": "ENV-TOKEN-2", "WANDB_API_KEY": "WANDB-KEY-3", "PATH": "/usr/bin"},
        "app_secret": "TOP-SECRET-4", "db_password": "PW-SECRET-5",
    }, csv="step,loss\n1,0.9\n")
    v.old_meta_bytes = (old / "metadata.json").read_bytes()
    write_exp(base, NEW, new_meta("old", "2026-02-01T00:00:00+00:00", params={"lr": 0.2},
                                  environment={"PATH": "/usr/bin", "HF_TOKEN": "***"}))
    with serving(base) as srv:
        v.srv = srv
        v.port = srv.port
        yield v


def no_secrets(r: Resp, secrets=OUTSIDE_SECRETS) -> None:
    for s in secrets:
        assert s not in r.text, (s, r)
    assert "root:x:0:" not in r.text, r  # /etc/passwd


# ============================================================================
# Paths stay inside DIR
# ============================================================================

# Values are written as they go on the wire (already percent-encoded where it matters);
# {ROOT} is the vault's directory (DIR's parent), {BASE} DIR itself, both encoded.
ID_VECTORS = [
    "..", "../outside_exp", "..%2Foutside_exp", "%2e%2e/outside_exp", "%2E%2E%2Foutside_exp",
    "%252e%252e/outside_exp", "%252e%252e%252foutside_exp", "{ROOT}/outside_exp", "{BASE}/../outside_exp",
    E + "/../../outside_exp", E + "%2F..%2F..%2Foutside_exp", E + "%00", "..%00/outside_exp", "%00",
    "..%5Coutside_exp", "..%5C..%5Coutside_exp", E + "%5C..%5C..%5Coutside_exp", EVIL, EVIL + "/",
    "./" + EVIL, "%2Fetc", "/etc", "~",
]
PATH_VECTORS = [
    "../../secret.txt", "..%2F..%2Fsecret.txt", "%2e%2e/%2e%2e/secret.txt", "%2E%2E%2F%2E%2E%2Fsecret.txt",
    "%252e%252e/%252e%252e/secret.txt", "%252e%252e%252f%252e%252e%252fsecret.txt", "{ROOT}/secret.txt",
    "{BASE}/../secret.txt", "terminal_logs/../../../secret.txt", "notes.txt%00", "notes.txt%00/../../../secret.txt",
    "..%5C..%5Csecret.txt", "terminal_logs%5C..%5C..%5C..%5Csecret.txt", "leak.txt", "leak_rel.txt", "leakdir",
    "leakdir/secret2.txt", "leakdir/", "../..", "../../outside_dir", "{ROOT}/outside_dir", "%2Fetc%2Fpasswd",
    "/etc/passwd", "../../outside_exp/metadata.json", "../" + EVIL + "/metadata.json",
]
RUN_VECTORS = [
    "../../../outside_exp/{kind}/run_0001", "..%2F..%2F..%2Foutside_exp%2F{kind}%2Frun_0001",
    "%2e%2e/%2e%2e/%2e%2e/outside_exp/{kind}/run_0001", "%252e%252e/%252e%252e/%252e%252e/outside_exp/{kind}/run_0001",
    "{ROOT}/outside_exp/{kind}/run_0001", "..%5C..%5C..%5Coutside_exp%5C{kind}%5Crun_0001", "run_0001%00",
    "run_0009", "..", "../run_0001",
]


def fill(vault: Vault, value: str) -> str:
    return (value.replace("{ROOT}", urllib.parse.quote(str(vault.root)))
            .replace("{BASE}", urllib.parse.quote(str(vault.base))))


def id_targets(vault: Vault, vector: str) -> list[str]:
    v = fill(vault, vector)
    return [
        f"/api/experiment?id={v}", f"/api/log?id={v}&tail=50", f"/api/log?id={v}&offset=0",
        f"/api/metrics?id={v}", f"/api/file?id={v}&path=metadata.json", f"/api/file?id={v}&path=terminal_logs",
        f"/api/raw?id={v}&path=metadata.json", f"/api/raw?id={v}&path=terminal_logs/run_0001.log&download=1",
        f"/api/changes?id={v}", f"/api/changes?id={E}&against={v}", f"/api/compare?ids={E},{v}",
        f"/api/compare?ids={v}",
    ]


def check_all(vault, targets) -> None:
    """Every target: 404 JSON error, no secret; failures collected so one report names them all."""
    bad = []
    for target in targets:
        r = request(vault.port, "GET", target)
        leaked = [s for s in OUTSIDE_SECRETS if s in r.text] + (["/etc/passwd"] if "root:x:0:" in r.text else [])
        ok_json = r.headers.get("Content-Type", "").startswith("application/json") and "Traceback" not in r.text
        if leaked or r.status != 404 or not ok_json:
            bad.append(f"{target} -> {r.status} {r.body[:160]!r}" + (f" LEAKS {leaked}" if leaked else ""))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("vector", ID_VECTORS)
def test_traversal_in_experiment_ids_is_404(vault, vector):
    check_all(vault, id_targets(vault, vector))


@pytest.mark.parametrize("vector", PATH_VECTORS)
def test_traversal_in_file_paths_is_404(vault, vector):
    v = fill(vault, vector)
    check_all(vault, [f"/api/file?id={E}&path={v}", f"/api/raw?id={E}&path={v}",
                      f"/api/raw?id={E}&path={v}&download=1"])


@pytest.mark.parametrize("vector", RUN_VECTORS)
def test_traversal_in_run_ids_is_404(vault, vector):
    check_all(vault, [f"/api/{endpoint}?id={E}&run={fill(vault, vector).replace('{kind}', kind)}{extra}"
                      for kind, endpoint, extra in (("terminal_logs", "log", "&tail=50"),
                                                    ("terminal_logs", "log", "&offset=0"),
                                                    ("metrics", "metrics", ""))])


def test_the_vectors_are_live(vault):
    """The same requests inside DIR work: the 404s above are refusals, not broken requests."""
    for target in (f"/api/experiment?id={E}", f"/api/log?id={E}&tail=50", f"/api/metrics?id={E}",
                   f"/api/file?id={E}&path=notes.txt", f"/api/raw?id={E}&path=notes.txt",
                   f"/api/file?id={E}&path=inside_link.txt", f"/api/raw?id={E}&path=terminal_logs/run_0001.log",
                   f"/api/log?id={E}&run=run_0001&tail=5", f"/api/compare?ids={E},{NEW}", f"/api/changes?id={E}",
                   f"/api/file?id={E}&path=terminal_logs"):
        r = request(vault.port, "GET", target)
        assert r.status == 200, (target, r)
    r = request(vault.port, "GET", f"/api/raw?id={E}&path=inside_link.txt")
    assert r.status == 200 and r.body == b"inside notes\n"
    # The files behind the symlinks really hold the secrets (so the checks above can fail).
    assert "TOPSECRET-OUTSIDE-123" in (vault.base / E / "leak.txt").read_text()
    assert "TOPSECRET-LOG-000" in (vault.base / E / "terminal_logs" / "run_0009.log").read_text()


def test_an_experiment_dir_symlinked_from_outside_is_not_listed(vault):
    """DIR/evil -> ../outside_exp: /api/experiment?id=evil is 404, so the list must not show it either."""
    e = request(vault.port, "GET", "/api/experiments?limit=1000")
    assert e.status == 200
    ids = [it["id"] for it in e.json()["items"]]
    assert EVIL not in ids and not any(i.startswith("..") or i.startswith("/") for i in ids), ids
    assert {E, OLD, NEW} <= set(ids)
    no_secrets(e)
    for target in ("/api/experiments?q=TOPSECRET", "/api/experiments?sort=metric:TOPSECRET_COL"):
        no_secrets(request(vault.port, "GET", target))


def test_symlinked_files_of_listed_experiments_are_not_read(vault):
    """F's current run's log and metrics, and G's metadata.json, are symlinks out of DIR."""
    bad = []
    for target in ("/api/experiments?limit=1000", "/api/experiments?name=^f$", f"/api/experiment?id={F}",
                   f"/api/log?id={F}&tail=10", f"/api/log?id={F}&offset=0", f"/api/metrics?id={F}",
                   f"/api/compare?ids={F},{E}", f"/api/changes?id={F}", "/api/experiments?name=^g$",
                   f"/api/experiment?id={G}", f"/api/file?id={G}&path=metadata.json",
                   f"/api/raw?id={G}&path=metadata.json", f"/api/changes?id={G}", f"/api/compare?ids={G},{E}"):
        r = request(vault.port, "GET", target)
        leaked = [s for s in OUTSIDE_SECRETS if s in r.text]
        if leaked or r.status not in (200, 404) or "Traceback" in r.text:
            bad.append(f"{target} -> {r.status} LEAKS {leaked}: {r.body[:200]!r}")
    assert not bad, "\n".join(bad)


def test_no_listing_outside_dir(vault):
    d = request(vault.port, "GET", f"/api/experiment?id={E}")
    assert d.status == 200
    no_secrets(d)
    paths = [f["path"] for f in d.json()["files"]]
    assert not any(p.startswith("leakdir/") for p in paths), paths
    listing = request(vault.port, "GET", f"/api/file?id={E}&path=.")
    if listing.status == 200:
        no_secrets(listing)
    state = request(vault.port, "GET", "/api/state")
    assert state.status == 200
    no_secrets(state)


@pytest.mark.parametrize("target", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2e%2e/%2e%2e/secret.txt", "/api/../../secret.txt",
    "/..%2F..%2Fsecret.txt", "//etc/passwd", "/%2Fetc%2Fpasswd", "/static/../../secret.txt", "/exp.py",
    "/results/" + E + "/metadata.json", "/" + E + "/notes.txt", "/api/raw/../../secret.txt",
])
def test_url_paths_serve_no_files(vault, target):
    r = request(vault.port, "GET", target)
    no_secrets(r)
    assert b"import " not in r.body  # not exp.py
    assert r.status in (400, 403, 404), r
    assert_json_error(r)


# ============================================================================
# Token, Host, Origin
# ============================================================================


def test_token_required_everywhere(vault):
    tok = "tok-Abc123_xyz"
    with serving(vault.base, token=tok) as srv:
        port = srv.port
        assert srv.url.endswith(f"?token={tok}")
        for target in ("/", "/index.html", "/api/health", "/api/state", "/api/experiments", f"/api/experiment?id={E}",
                       f"/api/log?id={E}&tail=5", f"/api/raw?id={E}&path=notes.txt", "/api/system", "/api/nope"):
            for headers in ({}, {"X-Exp-Token": "wrong"}, {"Cookie": "exp_token=wrong"},
                            {"Authorization": "Bearer wrong"}, {"X-Exp-Token": ""}):
                r = request(port, "GET", target, headers=headers)
                assert_json_error(r, 401)
                assert tok not in r.text and "inside notes" not in r.text
            r = request(port, "GET", target + ("&" if "?" in target else "?") + "token=wrong")
            assert_json_error(r, 401)
        r = request(port, "POST", "/api/command", headers={"Content-Type": "application/json",
                                                           "Origin": f"http://127.0.0.1:{port}"},
                    body=b'{"action": "kill", "tasks": [1]}')
        assert_json_error(r, 401)
        # ?token= works, and the page sets the cookie.
        page = request(port, "GET", f"/?token={tok}")
        assert page.status == 200 and "text/html" in page.headers.get("Content-Type", "")
        cookies = page.headers.get_all("Set-Cookie") or []
        cookie = next((c for c in cookies if c.startswith("exp_token=")), None)
        assert cookie is not None, cookies
        attrs = [a.strip().lower() for a in cookie.split(";")]
        assert attrs[0] == f"exp_token={tok}".lower()
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs, cookie
        assert request(port, "GET", f"/api/state?token={tok}").status == 200
        assert request(port, "GET", "/api/state", headers={"Cookie": f"exp_token={tok}"}).status == 200
        assert request(port, "GET", "/api/state", headers={"Cookie": f"a=b; exp_token={tok}"}).status == 200
        assert request(port, "GET", "/api/state", headers={"X-Exp-Token": tok}).status == 200
        assert request(port, "GET", "/api/state", headers={"Authorization": f"Bearer {tok}"}).status == 200
        r = request(port, "GET", f"/api/raw?id={E}&path=notes.txt", headers={"X-Exp-Token": tok})
        assert r.status == 200 and r.body == b"inside notes\n"
        # A POST with the token header and no Origin is a script, not a browser: allowed (409: no scheduler).
        r = request(port, "POST", "/api/command", headers={"Content-Type": "application/json", "X-Exp-Token": tok},
                    body=b'{"action": "kill", "tasks": [1]}')
        assert_json_error(r, 409)
        # The token does not open the door to another Host.
        r = request(port, "GET", f"/api/state?token={tok}", host=f"evil.example:{port}")
        assert_json_error(r, 403)


def test_all_interfaces_get_a_generated_token(vault):
    with serving(vault.base, host="0.0.0.0") as srv:
        m = re.search(r"[?&]token=([^&#\s]+)", srv.url)
        assert m, srv.url
        tok = urllib.parse.unquote(m.group(1))
        assert len(tok) >= 16
        assert_json_error(request(srv.port, "GET", "/api/state"), 401)
        assert_json_error(request(srv.port, "GET", "/"), 401)
        assert request(srv.port, "GET", "/api/state", headers={"X-Exp-Token": tok}).status == 200
        assert request(srv.port, "GET", f"/?token={urllib.parse.quote(tok)}").status == 200
    with serving(vault.base, host="0.0.0.0") as other:  # a new token each time
        assert other.url != srv.url and "token=" in other.url


@posix_only
def test_exp_see_on_all_interfaces_prints_a_token_url(vault, tmp_path):
    err_file = open(tmp_path / "see.stderr", "wb")
    proc = subprocess.Popen([sys.executable, EXP_PY, "see", str(vault.base), "--host", "0.0.0.0", "--port", "0",
                             "--no-browser"], cwd=str(tmp_path), env=child_env(PYTHONUNBUFFERED="1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file)
    try:
        line = call_with_timeout(proc.stdout.readline, 20, "exp see to print its address").decode()
        m = re.search(r"http://[^/\s]+:(\d+)/\?token=([^&#\s]+)", line)
        assert m, line
        port, tok = int(m.group(1)), urllib.parse.unquote(m.group(2))
        assert_json_error(request(port, "GET", "/api/health"), 401)
        assert request(port, "GET", "/api/health", headers={"X-Exp-Token": tok}).status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        err_file.close()
    assert "Traceback" not in (tmp_path / "see.stderr").read_text(errors="replace")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1.nip.io:{port}", "attacker.localhost.example", "", "{port}"])
def test_foreign_host_header_is_403(vault, host):
    for target in ("/", "/api/state", "/api/experiments", f"/api/raw?id={E}&path=notes.txt"):
        r = request(vault.port, "GET", target, host=host.replace("{port}", str(vault.port)))
        assert r.status in (400, 403), (host, target, r)
        assert_json_error(r)
        assert "inside notes" not in r.text


def test_loopback_host_headers_work(vault):
    for host in (f"127.0.0.1:{vault.port}", f"localhost:{vault.port}", "127.0.0.1", "localhost",
                 f"LOCALHOST:{vault.port}"):
        for target in ("/", "/api/state"):
            r = request(vault.port, "GET", target, host=host)
            assert r.status == 200, (host, target, r)


# ============================================================================
# POST: content type, Origin, size, JSON; against a live scheduler
# ============================================================================


@posix_only
def test_forged_posts_change_nothing(tmp_path, kill_groups_later):
    base = tmp_path / "results"
    cfg = write_batch(tmp_path / "cfg.toml", base, [{"name": "sleeper", "command": "sleep 60"}])
    out = open(tmp_path / "sched.out", "wb")
    proc = subprocess.Popen([sys.executable, EXP_PY, "run", str(cfg)], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, env=child_env(NO_COLOR="1"))
    try:
        with serving(base) as srv:
            port = srv.port
            same = f"http://127.0.0.1:{port}"

            def running():
                r = request(port, "GET", "/api/state")
                run = r.json()["running"] if r.status == 200 else []
                return run[0] if run and run[0].get("pid") and run[0].get("work_dir") else None

            job = wait_for(running, timeout=30, what="the sleeper to run")
            kill_groups_later.append(job["pid"])
            wd = Path(job["work_dir"])
            kill = json.dumps({"action": "kill", "tasks": [job["id"]]}).encode()
            forged = [
                ({"Content-Type": "text/plain", "Origin": same}, kill, (403, 415)),
                ({"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}, kill, (403, 415)),
                ({"Content-Type": "application/x-www-form-urlencoded", "Origin": same},
                 f"action=kill&tasks={job['id']}".encode(), (403, 415)),
                ({"Content-Type": "application/x-www-form-urlencoded", "Origin": same}, kill, (403, 415)),
                ({"Content-Type": "multipart/form-data; boundary=xyz", "Origin": same},
                 b'--xyz\r\nContent-Disposition: form-data; name="action"\r\n\r\nkill\r\n--xyz--\r\n', (403, 415)),
                ({"Origin": same}, kill, (403, 415)),  # no Content-Type at all
                ({"Content-Type": "application/json", "Origin": "http://evil.example"}, kill, (403,)),
                ({"Content-Type": "application/json", "Origin": f"http://evil.example:{port}"}, kill, (403,)),
                ({"Content-Type": "application/json", "Origin": "null"}, kill, (403,)),
                ({"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port + 1}"}, kill, (403,)),
                ({"Content-Type": "application/json", "Origin": f"http://localhost:{port}"}, kill, (403,)),
            ]
            for headers, body, statuses in forged:
                r = request(port, "POST", "/api/command", headers=headers, body=body)
                assert_json_error(r, *statuses)
            # Bad bodies with the right headers: 400 / 413, nothing done.
            json_h = {"Content-Type": "application/json", "Origin": same}
            for body in (b"{not json", b"", b"[1, 2]", b'"kill"', b"\xff\xfe{}", b'{"action": "explode"}',
                         b'{"action": 5, "tasks": "x"}', b'{"action": "kill", "tasks": [1], "x": NaN'):
                r = request(port, "POST", "/api/command", headers=json_h, body=body)
                assert_json_error(r, 400)
            big = json.dumps({"action": "kill", "tasks": [job["id"]], "pad": "x" * (1024 * 1024 + 10)}).encode()
            r = request(port, "POST", "/api/command", headers=json_h, body=big)
            assert_json_error(r, 413)
            r = request(port, "POST", "/api/state", headers=json_h, body=kill)
            assert_json_error(r, 404, 405)
            # Nothing happened: the experiment still runs.
            assert not pid_gone(job["pid"])
            assert read_meta(wd)["status"] == "running"
            assert running()["id"] == job["id"]
            # The real thing works (so the refusals above were refusals).
            r = request(port, "POST", "/api/command", headers=json_h, body=kill)
            assert r.status == 200 and r.json()["ok"] is True, r
            wait_for(lambda: read_meta(wd).get("status") == "killed", timeout=20, what="the sleeper to be killed")
            assert proc.wait(30) is not None
    finally:
        stop_process(proc)
        out.close()


def test_post_without_origin_or_token_is_403(vault):
    """No Origin is fine only with a valid token header (api.md); a tokenless server has none to check."""
    r = request(vault.port, "POST", "/api/command", headers={"Content-Type": "application/json"},
                body=b'{"action": "kill", "tasks": [1]}')
    assert_json_error(r, 403)


def test_post_rules_without_a_scheduler(vault):
    same = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{vault.port}"}
    assert_json_error(request(vault.port, "POST", "/api/command", headers=same, body=b"{bad"), 400)
    assert_json_error(request(vault.port, "POST", "/api/command", headers={**same, "Content-Type": "text/plain"},
                              body=b'{"action": "kill", "tasks": [1]}'), 403, 415)
    r = request(vault.port, "POST", "/api/command", headers=same, body=b"x" * (1024 * 1024 + 1))
    assert_json_error(r, 413)
    # A huge Content-Length announced, little sent: refused at once, no hang.
    conn = http.client.HTTPConnection("127.0.0.1", vault.port, timeout=10)
    try:
        conn.putrequest("POST", "/api/command", skip_host=True)
        conn.putheader("Host", f"127.0.0.1:{vault.port}")
        for k, v in same.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(50 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"{")
        resp = conn.getresponse()
        assert resp.status == 413
        assert "error" in json.loads(resp.read())
    finally:
        conn.close()


# ============================================================================
# Error bodies, headers, the page's CSP
# ============================================================================


def test_every_error_is_json_without_traceback(vault):
    p = vault.port
    many = ",".join([E] * 51)
    cases = [
        ("GET", "/api/nope"), ("GET", "/nope"), ("GET", "/api"), ("GET", "/api/"),
        ("GET", "/api/experiments?name=("), ("GET", "/api/experiments?limit=abc"), ("GET", "/api/experiments?offset=x"),
        ("GET", "/api/experiments?since=notadate"), ("GET", "/api/experiments?until=13/45/2026"),
        ("GET", "/api/experiments?param=noequals"), ("GET", "/api/experiments?param=lr>=abc"),
        ("GET", "/api/experiments?sort=metric:"), ("GET", "/api/experiments?sort=-"), ("GET", "/api/experiments?q=%ff"),
        ("GET", "/api/experiments?status=%00"), ("GET", "/api/experiments?name=%ff%fe"),
        ("GET", "/api/experiment"), ("GET", "/api/experiment?id="), ("GET", "/api/experiment?id=%ff"),
        ("GET", f"/api/log?id={E}&tail=abc"), ("GET", f"/api/log?id={E}&tail=-1"),
        ("GET", f"/api/log?id={E}&offset=abc"), ("GET", f"/api/log?id={E}&offset=-5"),
        ("GET", f"/api/log?id={E}&offset=0&max_bytes=abc"), ("GET", f"/api/log?id={E}&tail=99999999999999999999"),
        ("GET", f"/api/log?id={E}&run=run_9999&tail=5"), ("GET", f"/api/metrics?id={E}&offset=abc"),
        ("GET", f"/api/metrics?id={E}&offset=-1"), ("GET", f"/api/metrics?id={E}&max_bytes=-1"),
        ("GET", f"/api/metrics?id={E}&file_id=%00"), ("GET", f"/api/file?id={E}"), ("GET", f"/api/file?id={E}&path="),
        ("GET", f"/api/file?id={E}&path=nope"), ("GET", f"/api/raw?id={E}&path=terminal_logs"),
        ("GET", f"/api/raw?id={E}"), ("GET", "/api/compare"), ("GET", "/api/compare?ids="),
        ("GET", f"/api/compare?ids={many}"), ("GET", "/api/changes"), ("GET", f"/api/changes?id={E}&against=%00"),
        ("GET", "/api/command"), ("PUT", "/api/state"), ("DELETE", "/api/state"), ("PATCH", "/api/command"),
        ("OPTIONS", "/api/command"), ("POST", "/api/experiments"), ("GET", "/api/state?" + "x=1&" * 5000),
    ]
    for method, target in cases:
        headers = {"Origin": f"http://127.0.0.1:{p}", "Content-Type": "application/json"} if method != "GET" else {}
        r = request(p, method, target, headers=headers, body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
        assert "Traceback" not in r.text, (method, target, r)
        assert r.status < 500, (method, target, r)
        assert r.headers.get("Content-Type", "").startswith("application/json"), (method, target, r)
        body = r.json()
        if r.status >= 400:
            assert isinstance(body.get("error"), str) and body["error"], (method, target, r)
    for raw in (b"GARBAGE\r\n\r\n", b"GET /api/state HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
                b"GET " + b"/api/state?" + b"a" * 70000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"):
        answer = raw_exchange(p, raw)
        assert b"Traceback" not in answer, answer[:300]
        if not answer.startswith(b"HTTP/"):  # an HTTP/0.9-style answer (a request line without a version): no head
            assert "error" in json.loads(answer), answer[:300]
            continue
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        assert (400 <= status < 500 or status == 505) and b"Traceback" not in answer, answer[:300]
        assert b"application/json" in head and "error" in json.loads(body), answer[:300]


def test_security_headers(vault):
    p = vault.port
    for target in ("/api/health", "/api/state", "/api/experiments", f"/api/experiment?id={E}",
                   f"/api/log?id={E}&tail=5", f"/api/metrics?id={E}", f"/api/file?id={E}&path=notes.txt",
                   f"/api/changes?id={E}", f"/api/compare?ids={E}", "/api/system", "/api/nope",
                   "/api/experiments?name=("):
        r = request(p, "GET", target)
        assert r.headers.get("X-Content-Type-Options") == "nosniff", (target, r)
        assert "no-store" in (r.headers.get("Cache-Control") or ""), (target, r)
        assert r.headers.get("Content-Type") == "application/json; charset=utf-8", (target, r)
        assert "Access-Control-Allow-Origin" not in r.headers, (target, r)
    r = request(p, "GET", f"/api/raw?id={E}&path=notes.txt")
    assert r.headers.get("X-Content-Type-Options") == "nosniff"
    page = request(p, "GET", "/")
    assert page.status == 200 and page.headers.get("X-Content-Type-Options") == "nosniff"
    assert "Access-Control-Allow-Origin" not in page.headers


def csp_directives(csp: str) -> dict[str, list[str]]:
    out = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            out[words[0].lower()] = words[1:]
    return out


def test_page_csp_has_no_unsafe_inline_script_and_covers_the_page(vault):
    page = request(vault.port, "GET", "/")
    assert page.status == 200
    csp = page.headers.get("Content-Security-Policy")
    assert csp, page.headers
    d = csp_directives(csp)
    script = d.get("script-src", d.get("default-src"))
    assert script is not None, csp
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script and "*" not in script, csp
    assert d.get("default-src") == ["'none'"] and d.get("frame-ancestors") == ["'none'"], csp
    assert d.get("base-uri") == ["'none'"] and d.get("form-action") == ["'none'"], csp
    html = page.body
    scripts = re.findall(rb"<script\b([^>]*)>(.*?)</script\s*>", html, re.S | re.I)
    assert len(scripts) <= 1, "the page must hold at most one inline script"
    for attrs, code in scripts:
        assert b"src=" not in attrs.lower()
        digest = base64.b64encode(hashlib.sha256(code).digest()).decode()
        assert f"'sha256-{digest}'" in script, ("the inline script's hash is not allowed by the CSP", csp)
        assert not re.search(rb"\beval\s*\(|new\s+Function\s*\(", code)
    assert not re.search(rb"<[^>]+\son[a-z]+\s*=", html, re.I), "inline event handlers do not run under the CSP"
    assert b"javascript:" not in html.lower()


# ============================================================================
# Secrets in old metadata.json never leave the server
# ============================================================================


def test_secrets_in_old_metadata_never_served(vault):
    p = vault.port
    assert all(s.encode() in vault.old_meta_bytes for s in META_SECRETS)  # planted
    targets = [
        "/api/state", "/api/experiments", "/api/experiments?q=old", "/api/experiments?sort=param:lr",
        f"/api/experiment?id={OLD}", f"/api/experiment?id={NEW}",
        f"/api/file?id={OLD}&path=metadata.json", f"/api/file?id={OLD}&path=.",
        f"/api/raw?id={OLD}&path=metadata.json", f"/api/raw?id={OLD}&path=metadata.json&download=1",
        f"/api/compare?ids={OLD},{NEW}", f"/api/changes?id={NEW}", f"/api/changes?id={OLD}&against={NEW}",
        f"/api/changes?id={NEW}&against={OLD}", f"/api/log?id={OLD}&tail=10", f"/api/metrics?id={OLD}", "/",
    ]
    # Other spellings of the same file, which a check on the exact name "metadata.json" would miss.
    sneaky = [f"/api/{ep}?id={OLD}&path={path}" for ep in ("raw", "file") for path in (
        "./metadata.json", "terminal_logs/../metadata.json", "metadata.json/", ".//metadata.json",
        "METADATA.JSON", "metadata.json%00", "terminal_logs%2F..%2Fmetadata.json")]
    sneaky += [f"/api/{ep}?id={E}&path=../{OLD}/metadata.json" for ep in ("raw", "file")]
    sneaky += [f"/api/{ep}?id={OLD}/terminal_logs/..&path=metadata.json" for ep in ("raw", "file")]
    sneaky += [f"/api/experiment?id={OLD}/", f"/api/experiment?id=./{OLD}", f"/api/experiment?id=sub/../{OLD}"]
    for target in sneaky:
        r = request(p, "GET", target)
        assert r.status in (200, 404), (target, r)
        for s in META_SECRETS:
            assert s not in r.text, (s, target, r.text[:2000])
    for target in targets:
        r = request(p, "GET", target)
        assert r.status == 200, (target, r)
        for s in META_SECRETS:
            assert s not in r.text, (s, target, r.text[:2000])
        assert "bascnTOKEN" not in r.text, (target, r.text[:2000])
    # Redacted, not dropped wholesale: what is not secret is still there.
    m = request(p, "GET", f"/api/experiment?id={OLD}").json()["metadata"]
    assert "lark_config" not in m
    assert m["environment"]["API_TOKEN"] == "***" and m["environment"]["WANDB_API_KEY"] == "***"
    assert m["environment"]["PATH"] == "/usr/bin" and m["app_secret"] == "***" and m["db_password"] == "***"
    assert m["name"] == "old" and m["command"] == "python train.py"
    f = request(p, "GET", f"/api/file?id={OLD}&path=metadata.json").json()
    assert f["kind"] == "json" and json.loads(f["text"])["environment"]["PATH"] == "/usr/bin"
    ch = request(p, "GET", f"/api/changes?id={NEW}").json()
    assert ch["against"] == OLD  # the old one really was compared
    # The file on disk is left as it was: the server only reads.
    assert (vault.base / OLD / "metadata.json").read_bytes() == vault.old_meta_bytes


def test_secrets_in_an_old_state_file_never_served(tmp_path):
    base = tmp_path / "results"
    (base / ".exp_state").mkdir(parents=True)
    job = {"id": 1, "name": "a", "command": "python train.py", "status": "finished", "return_code": 0,
           "environment": {"API_TOKEN": "STATE-TOKEN-6", "PATH": "/usr/bin"},
           "lark_config": {"app_secret": "STATE-LARK-7"}, "app_secret": "STATE-TOP-8"}
    (base / ".exp_state" / "scheduler_state.json").write_text(json.dumps({
        "pending": [], "running": [], "finished": [job], "errors": [],
        "summary": {"status_indicator": "stopped", "lark_config": {"app_secret": "STATE-LARK-9"}},
    }))
    with serving(base) as srv:
        r = request(srv.port, "GET", "/api/state")
    assert r.status == 200 and r.json()["finished"][0]["name"] == "a"
    for s in ("STATE-TOKEN-6", "STATE-LARK-7", "STATE-TOP-8", "STATE-LARK-9"):
        assert s not in r.text, s


def test_shipped_page_fits_its_csp_and_sends_the_token(vault):
    """api.md: one inline <script>, no inline handlers; the page sends X-Exp-Token and JSON POSTs."""
    shipped = REPO / "exp_ui.html"
    if not shipped.exists():
        pytest.skip("exp_ui.html is not next to exp.py (yet)")
    page = request(vault.port, "GET", "/")
    assert page.status == 200 and page.body == shipped.read_bytes()
    scripts = re.findall(rb"<script\b([^>]*)>(.*?)</script\s*>", page.body, re.S | re.I)
    assert len(scripts) == 1 and b"src" not in scripts[0][0].lower(), [a for a, _ in scripts]
    code = scripts[0][1]
    assert b"X-Exp-Token" in code and b"location.search" in code
    assert b"application/json" in code
    digest = base64.b64encode(hashlib.sha256(code).digest()).decode()
    assert f"'sha256-{digest}'" in page.headers.get("Content-Security-Policy", "")


# ============================================================================
# Secrets on command lines: one rule for option, assignment and header names
# ============================================================================

COMMAND_CASES = [
    # (command as written, as shown); None: shown unchanged
    ("API_TOKEN=hunter2 python3 train.py --token supersecret", "API_TOKEN=*** python3 train.py --token ***"),
    ('python t.py --token "two words" --lr 1', "python t.py --token *** --lr 1"),
    ("python t.py --token 'two words' --lr 1", "python t.py --token *** --lr 1"),
    ("python t.py --token two\\ words --lr 1", "python t.py --token *** --lr 1"),
    ('python t.py --token "say \\"hi\\" now" x', "python t.py --token *** x"),
    ('env HF_TOKEN="a b" python t.py', "env HF_TOKEN=*** python t.py"),
    ("export HF_TOKEN='a b'; python t.py", "export HF_TOKEN=***; python t.py"),
    ('python t.py "HF_TOKEN=abc"', 'python t.py "HF_TOKEN=***"'),
    ("python t.py --private_key abc --openai-key sk-abc --db-pass abc --auth abc",
     "python t.py --private_key *** --openai-key *** --db-pass *** --auth ***"),
    ("python t.py --token=abc --api-key='a b' --dbPassword=\"x y\" -password p",
     "python t.py --token=*** --api-key=*** --dbPassword=*** -password ***"),
    ("python t.py model.api_key=xyz +trainer.hf_token=q lr=0.1", "python t.py model.api_key=*** +trainer.hf_token=*** lr=0.1"),
    ('curl -H "Authorization: Bearer abc123" https://x', 'curl -H "Authorization: Bearer ***" https://x'),
    ("curl -H 'X-Api-Key: k1' -H 'Cookie: s=1' https://x", "curl -H 'X-Api-Key: ***' -H 'Cookie: ***' https://x"),
    ("curl -H Authorization: Bearer abc123 https://x", "curl -H Authorization: Bearer *** https://x"),
    ("http --auth-type bearer --auth abc https://x", "http --auth-type *** --auth *** https://x"),
    ("git clone https://me:pw123@host/repo.git", "git clone https://me:***@host/repo.git"),
    ('python t.py --token "unclosed', "python t.py --token ***"),
    # Not secrets: names that only contain a secret-looking word, flags without a value, the next command.
    ("python t.py --tokenizer gpt2 --max_tokens 5 --max-new-tokens 9 --pad_token_id 0", None),
    ("python t.py --keyframes 4 --key_dim 8 --num_passes 2 --author me --lr=0.1 seed=3", None),
    ("python t.py --use-auth --verbose", None),
    ("python t.py --password; echo hi", None),
    ("python t.py --token *** x HF_TOKEN=***", None),
]


@pytest.mark.parametrize("command,shown", COMMAND_CASES)
def test_command_lines_hide_the_whole_value_of_secret_named_arguments(command, shown):
    import exp

    shown = command if shown is None else shown
    assert exp.redact_command(command) == shown
    assert exp.redact_command(shown) == shown  # redacting again changes nothing


def test_one_secret_name_rule_for_fields_and_command_lines():
    import exp

    secret = ["token", "HF_TOKEN", "accessToken", "api_tokens", "tokens", "apiKey", "OPENAI_KEY", "private-key",
              "dbPass", "db_password", "PGPASSWORD", "auth", "Authorization", "x-auth-token", "github_pat",
              "session_id", "client_secret", "Cookie", "credentials"]
    plain = ["max_tokens", "tokenizer", "token_ids", "pad_token_id", "keyframes", "key_dim", "num_passes",
             "author", "authors", "lr", "seed", "monkey"]
    assert [n for n in secret if not exp.secret_name(n)] == []
    assert [n for n in plain if exp.secret_name(n)] == []
    meta = {"params": {n: "V" for n in secret + plain},
            "command": "python t.py " + " ".join(f"--{n} V" for n in secret + plain)}
    out = exp.redact_secrets(meta)
    assert {n for n, v in out["params"].items() if v == "***"} == set(secret)
    words = out["command"].split()[2:]
    assert {words[i][2:] for i in range(0, len(words), 2) if words[i + 1] == "***"} == set(secret)


# ============================================================================
# A run's log: exp's own opening lines never show the command's secrets
# ============================================================================

LOG_SECRETS = ["hunter2", "supersecret", "two words", "abc123"]


def served_log_texts(port: int, exp_id: str) -> dict[str, str]:
    """Every way the dashboard serves a run's log, by name: the text a client gets."""
    out = {}
    for name, target in (("tail", f"/api/log?id={exp_id}&tail=200"), ("tail1", f"/api/log?id={exp_id}&tail=1"),
                         ("chunk", f"/api/log?id={exp_id}&offset=0"),
                         ("file", f"/api/file?id={exp_id}&path=terminal_logs/run_0001.log")):
        r = request(port, "GET", target)
        assert r.status == 200, (target, r)
        out[name] = r.json()["text"]
    for name, target in (("raw", f"/api/raw?id={exp_id}&path=terminal_logs/run_0001.log"),
                         ("download", f"/api/raw?id={exp_id}&path=terminal_logs/run_0001.log&download=1")):
        r = request(port, "GET", target)
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(r.body), (target, r)
        out[name] = r.text
    # Followed in small steps from offsets inside the secret line: widened to whole lines, never a piece.
    for step in (1, 7, 40):
        texts, offset = [], 0
        while True:
            size = step if offset < 400 else 4 << 20  # in small steps through the opening lines
            a = request(port, "GET", f"/api/log?id={exp_id}&offset={offset}&max_bytes={size}").json()
            assert a["offset"] <= offset < a["next_offset"] or a["eof"], a
            texts.append(a["text"] if a["offset"] == offset else "")
            if a["eof"]:
                break
            offset = a["next_offset"]
        out[f"followed by {step}"] = "".join(texts)
    for offset in range(0, 200, 3):
        out[f"offset {offset}"] = request(port, "GET", f"/api/log?id={exp_id}&offset={offset}&max_bytes=5").json()["text"]
    return out


def test_a_new_run_log_holds_its_command_redacted_and_metadata_keeps_it_whole(tmp_path):
    import exp

    base = tmp_path / "results"
    command = (f"API_TOKEN=hunter2 {sys.executable} -c 'print(\"child output\")' --token supersecret "
               "--api-key \"two words\" --lr 0.1")
    e = exp.Experiment(name="secretive", command=command, base_dir=str(base), cwd=str(tmp_path), env=child_env())
    assert e.run() == 0
    log = (Path(e.dir.path) / "terminal_logs" / "run_0001.log").read_text()
    assert "child output" in log
    assert f"command: API_TOKEN=*** {sys.executable} -c" in log and "--token *** --api-key *** --lr 0.1" in log, log
    for s in LOG_SECRETS:
        assert s not in log, (s, log)
    assert read_meta(e.dir.path)["command"] == command  # reproducible: the whole command, on this machine
    with serving(base) as srv:
        texts = served_log_texts(srv.port, os.path.basename(e.dir.path))
    for name, text in texts.items():
        for s in LOG_SECRETS:
            assert s not in text, (name, s, text)
    assert "child output" in texts["tail"] and "--lr 0.1" in texts["tail"]


OLD_LOG = ("[exp] 2026-01-01T00:00:00+00:00 run_0001 of 'old' starting\n"
           "[exp] command: API_TOKEN=hunter2 python3 train.py --token supersecret --api-key \"two words\" --lr 0.1\n"
           "[exp] cwd: /work\n[exp] work_dir: /results/old\n"
           "step 1 loss 0.5\n")
OLD_STANDALONE_LOG = ("[exp] 2026-01-01T00:00:00+00:00 standalone run run_0001: /usr/bin/python3 train.py "
                      "--password abc123 --lr 0.1 (pid 42); its output is not captured here\n")


@pytest.mark.parametrize("log", [OLD_LOG, OLD_STANDALONE_LOG, OLD_LOG.replace("\n", "\r\n"),
                                 OLD_LOG + "".join(f"line {i} of output é\n" for i in range(3000))],
                         ids=["header", "standalone", "crlf", "long"])
def test_an_old_run_log_is_served_with_its_commands_secrets_hidden(tmp_path, log):
    base = tmp_path / "results"
    d = write_exp(base, OLD, new_meta("old", "2026-01-01T00:00:00+00:00"), log=log)
    raw = (d / "terminal_logs" / "run_0001.log").read_bytes()
    assert all(s.encode() in raw for s in LOG_SECRETS if s in log)  # planted, as an older exp wrote it
    with serving(base) as srv:
        texts = served_log_texts(srv.port, OLD)
    for name, text in texts.items():
        for s in LOG_SECRETS:
            assert s not in text, (name, s, text[:500])
    shown = texts["raw"]
    assert shown == texts["download"] == texts["followed by 1"] == texts["followed by 7"] == texts["followed by 40"]
    assert texts["chunk"] == shown[:len(texts["chunk"])] and texts["file"] == shown[:len(texts["file"])]
    assert texts["tail"] == shown[-len(texts["tail"]):]
    # Only the secrets are gone: the rest of the log is as written.
    if "standalone" in log:
        assert shown == log.replace("abc123", "***")
    else:
        assert shown == log.replace("hunter2", "***").replace("supersecret", "***").replace('"two words"', "***")
    assert (d / "terminal_logs" / "run_0001.log").read_bytes() == raw  # the server only reads


def test_a_childs_own_exp_like_lines_are_left_alone_and_a_long_log_tail_reads_only_its_end(tmp_path):
    base = tmp_path / "results"
    body = "".join(f"output line {i}\n" for i in range(200000))  # ~3.7 MB: its start is out of the tail's reach
    log = OLD_LOG + body + "[exp] command: a child printing --token its-own-text\n"
    write_exp(base, OLD, new_meta("old", "2026-01-01T00:00:00+00:00"), log=log)
    with serving(base) as srv:
        tail = request(srv.port, "GET", f"/api/log?id={OLD}&tail=2").json()
        head = request(srv.port, "GET", f"/api/log?id={OLD}&offset=0&max_bytes=200").json()
    assert tail["text"] == "output line 199999\n[exp] command: a child printing --token its-own-text\n"
    assert tail["next_offset"] == len(log.encode()) and tail["truncated_before"]
    assert "supersecret" not in head["text"] and "--token ***" in head["text"]
