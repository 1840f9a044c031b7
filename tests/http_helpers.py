"""HTTP helpers shared by the dashboard's API and security tests: requests sent exactly as written."""
from __future__ import annotations

import contextlib
import http.client
import json

import exp


class Resp:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers.get('Content-Type')} {self.body[:300]!r}>"


def request(port: int, method: str, target: str, *, headers: dict | None = None, body: bytes | None = None,
            host: str | None = None, timeout: float = 30) -> Resp:
    """One request on its own connection, sent exactly as written; ``host=""`` sends no Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if host != "":
            conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None or method == "POST":
            conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders()
        if body:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) and close before reading it all
        r = conn.getresponse()
        return Resp(r.status, r.headers, r.read())
    finally:
        conn.close()


@contextlib.contextmanager
def serving(base, **kwargs):
    srv = exp.DashboardServer(str(base), host=kwargs.pop("host", "127.0.0.1"), port=kwargs.pop("port", 0), **kwargs)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()
