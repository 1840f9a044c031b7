"""A local, test-only fake of the Feishu/Lark Open API (standard library only).

It speaks the subset of the Open API an experiment uploader needs, over real
HTTP on 127.0.0.1, with the documented envelopes, HTTP statuses and error
codes:

* ``POST /open-apis/auth/v3/tenant_access_token/internal`` (flat response)
* ``GET|POST /open-apis/bitable/v1/apps/:app/tables/:table/fields``
* ``GET /open-apis/bitable/v1/apps/:app/tables``
* ``POST .../records``, ``POST .../records/batch_create``,
  ``POST .../records/batch_update``, ``POST .../records/search``,
  ``GET .../records``, ``GET|PUT|DELETE .../records/:record_id``
* ``POST /open-apis/drive/v1/medias/upload_all`` (multipart/form-data)
* ``GET /open-apis/wiki/v2/spaces/get_node``
* ``POST /open-apis/bot/v2/hook/:hook_token`` (custom-bot webhook)

Usage::

    with FakeLark(apps={"cli_app": "sekret"}) as lark:
        lark.add_table("bascnAPP", "tblTABLE", fields=[("Name", 1), ("loss", 2)])
        ...  # point the client at lark.url
        assert lark.records("bascnAPP", "tblTABLE")[0]["fields"]["loss"] == 0.5

Choices where the public documentation is silent (see the module's tests):

* ``page_size`` above the documented maximum (100 for fields, 500 for
  search / list records), below 1 or not an integer -> 1254001 (HTTP 200);
  it is not clamped.  An unknown ``page_token`` -> 1254002 (the docs list a
  bad page_token among the causes of 1254002).
* A value of the wrong type for a field answers the per-type conversion code
  with HTTP 200: 1254060 text, 1254061 number, 1254062 single select,
  1254063 multi select, 1254064 date, 1254065 checkbox, 1254066 user,
  1254067 one-way link, 1254068 url, 1254069 attachment, 1254072 phone;
  1254074 (HTTP 400) two-way link; 1254015 (HTTP 400) location, group chat
  and any write to a read-only field (19, 20, 1001-1005).  Attachment tokens
  not uploaded to the same base -> 1254303 (HTTP 200).  A text cell over
  100,000 characters -> 1254130.  ``null`` in a create is ignored; in an
  update it clears the cell.
* JSON with NaN/Infinity is malformed (1254000, HTTP 200), as for a strict
  JSON parser.  A body that is JSON but of the wrong shape -> 1254001.
* ``client_token`` (create record, batch_create, create field): empty means
  "none"; otherwise it must be a UUIDv4 (1254037, HTTP 400).  Tokens are
  remembered per base for the fake's lifetime.  A replay with the same token,
  same endpoint and same JSON body (compared after parsing) answers the
  original response again (same record ids) and writes nothing; a different
  body or endpoint -> 1255006 (HTTP 400).  Failed requests do not consume the
  token.
* Creating a field whose type is unknown -> 1254001.  Duplicate names are
  compared exactly after stripping.  ``refuse_field_create = True`` ->
  1254302 "Permission denied" (HTTP 403).
* Search records: ``filter`` supports conditions with operators ``is``,
  ``isNot``, ``contains``, ``doesNotContain``, ``isEmpty``, ``isNotEmpty``
  (values compared as strings) under ``and``/``or``; ``sort`` and
  ``field_names`` are honoured.  Search answers text cells (type 1) as lists
  of ``{"type": "text", "text": ...}`` segments, as the real API does; the
  legacy ``GET .../records`` does so only with ``text_field_as_array=true``.
  Create/update responses echo the values as written.
* get_node with an unknown token -> 131005 "not found" (HTTP 400); missing
  ``token`` -> 131002 (HTTP 400).
* Webhook: unknown hook token -> 19001; body over 20 KiB or not a JSON
  object -> ``{"StatusCode": 9499, "StatusMessage": "Bad Request"}`` (the
  legacy shape observed for malformed bodies); missing/unknown ``msg_type``
  or its content missing (text: ``content.text`` string, post:
  ``content.post`` object, interactive: ``card`` object, image:
  ``content.image_key``, share_chat: ``content.share_chat_id``) -> 19002;
  with a secret, ``timestamp`` must be a string of digits -> else 19021.
  Keywords are searched in the decoded JSON text.  Rate limits count
  accepted messages only.
* The token endpoint: unknown app id or wrong secret -> 10014 (HTTP 200);
  a malformed body -> 10003 (HTTP 400).
* Unknown routes -> HTTP 404, ``{"code": 404, "msg": "404 page not found"}``.
* Faults: a queued fault whose ``path`` is None matches any request except
  the token endpoint; with a ``path`` it matches any request whose path
  contains it.  Queued faults take precedence over ``fault_rate``.
  ``fault_rate`` applies to POST/PUT/PATCH/DELETE bitable requests under
  ``/records`` except ``search`` and ``batch_get``; its default kinds are
  ``"429"``, the codes 1254290, 1254291, 1254607, 1255040, 1254002, ``"5xx"``,
  ``"drop"`` and ``"drop_after"`` (``"token"`` and ``"slow"`` can be named;
  a code can be named as ``"1254290"``, ``1254290`` or ``("code", 1254290)``).
  A ``"code"`` fault answers that code with the HTTP status listed in
  ``CODE_STATUS`` (200 for codes not listed); without ``code`` it is 1254290.
  ``"5xx"`` answers 502 (or ``code`` when it is 500-599) with an HTML body.
  In ``requests``, a dropped request has ``status``/``code`` None and
  ``fault`` set; ``drop_after`` also records ``done_code`` (what the work
  answered).
* Time: tokens, webhook timestamps and webhook rate windows use ``now()``,
  real time plus whatever ``advance(seconds)`` added, so tests can jump ahead
  without sleeping.  ``token_reuse_min`` (1800) is the rotation threshold.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import random
import re
import secrets
import socket
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

__all__ = ["FakeLark", "FIELD_TYPES", "CODE_STATUS", "RETRYABLE_KINDS"]

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
HOOK_PREFIX = "/open-apis/bot/v2/hook/"
UPLOAD_PATH = "/open-apis/drive/v1/medias/upload_all"
WIKI_PATH = "/open-apis/wiki/v2/spaces/get_node"
BITABLE_PREFIX = "/open-apis/bitable/v1/apps/"

MAX_UPLOAD = 20971520
WEBHOOK_MAX_BODY = 20 * 1024
TEXT_CELL_MAX = 100000

# type -> ui_type
FIELD_TYPES = {
    1: "Text", 2: "Number", 3: "SingleSelect", 4: "MultiSelect", 5: "DateTime",
    7: "Checkbox", 11: "User", 13: "Phone", 15: "Url", 17: "Attachment",
    18: "SingleLink", 19: "Lookup", 20: "Formula", 21: "DuplexLink",
    22: "Location", 23: "GroupChat", 1001: "CreatedTime", 1002: "ModifiedTime",
    1003: "CreatedUser", 1004: "ModifiedUser", 1005: "AutoNumber",
}
READ_ONLY_TYPES = frozenset({19, 20, 1001, 1002, 1003, 1004, 1005})
WEBHOOK_MSG_TYPES = ("text", "post", "interactive", "share_chat", "image")

# code -> (HTTP status, msg)
CODE_STATUS = {
    1254000: (200, "WrongRequestJson"),
    1254001: (200, "WrongRequestBody"),
    1254002: (200, "Fail"),
    1254014: (200, "FieldNameDuplicated"),
    1254015: (400, "Field types do not match."),
    1254027: (403, "UploadAttachNotAllowed"),
    1254028: (400, "EmptyFieldName"),
    1254036: (400, "Base is copying, please try again later."),
    1254037: (400, "Invalid client token, make sure that it complies with the specification."),
    1254040: (200, "BaseTokenNotFound"),
    1254041: (200, "TableIdNotFound"),
    1254043: (200, "RecordIdNotFound"),
    1254045: (200, "FieldNameNotFound"),
    1254060: (200, "TextFieldConvFail"),
    1254061: (200, "NumberFieldConvFail"),
    1254062: (200, "SingleSelectFieldConvFail"),
    1254063: (200, "MultiSelectFieldConvFail"),
    1254064: (200, "DatetimeFieldConvFail"),
    1254065: (200, "CheckboxFieldConvFail"),
    1254066: (200, "UserFieldConvFail"),
    1254067: (200, "LinkFieldConvFail"),
    1254068: (200, "URLFieldConvFail"),
    1254069: (200, "AttachFieldConvFail"),
    1254072: (200, "Failed to convert phone field, please make sure it is correct."),
    1254074: (400, "DuplexLinkFieldConvFail"),
    1254104: (200, "RecordAddOnceExceedLimit"),
    1254106: (200, "AttachExceedLimit"),
    1254130: (200, "TooLargeCell"),
    1254290: (200, "TooManyRequest"),
    1254291: (200, "Write conflict"),
    1254302: (403, "Permission denied."),
    1254303: (200, "AttachPermNotAllow"),
    1254304: (403, "Permission denied."),
    1254607: (400, "Data not ready, please try again later"),
    1254608: (403, "Same API requests are submitted repeatedly."),
    1255001: (200, "InternalError"),
    1255006: (400, "Client token conflict, please generate a new client token and try again."),
    1255040: (504, "request timeout"),
    1061002: (400, "params error."),
    1061043: (400, "file size beyond limit."),
    1061044: (400, "parent node not exist."),
    1061045: (200, "can retry."),
    1062008: (400, "checksum param Invalid."),
    1062009: (400, "the actual size is inconsistent with the parameter declaration size."),
    131002: (400, "param err"),
    131005: (400, "not found"),
    99991400: (429, "request trigger frequency limit"),
    99991661: (400, "Missing access token for authorization. Please make a request with token attached."),
    99991663: (400, "Invalid access token for authorization. Please make a request with token attached."),
}

FAULT_KINDS = ("429", "code", "5xx", "slow", "drop", "drop_after", "token")
RETRYABLE_KINDS = ("429", "1254290", "1254291", "1254607", "1255040", "1254002",
                   "5xx", "drop", "drop_after")

_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)
_PHONE = re.compile(r"^\+?\d*$")
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _rand(prefix: str, n: int = 14) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


class _Malformed(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Malformed(name)


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity.  Raises _Malformed."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, _Malformed) as exc:
        raise _Malformed(str(exc)) from None


class _Reply:
    """What the handler sends back (or how it fails)."""

    def __init__(self, status: int = 200, body: Any = None, headers: dict | None = None,
                 raw: bytes | None = None, content_type: str = "application/json; charset=utf-8"):
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.raw = raw
        self.content_type = content_type

    @property
    def code(self) -> int | None:
        if isinstance(self.body, dict):
            if "code" in self.body:
                return self.body["code"]
            return self.body.get("StatusCode")
        return None


def _ok(data: Any, msg: str = "success") -> _Reply:
    return _Reply(200, {"code": 0, "msg": msg, "data": data})


def _err(code: int, msg: str | None = None, status: int | None = None, detail: str | None = None) -> _Reply:
    st, default_msg = CODE_STATUS.get(code, (200, "error"))
    body: dict[str, Any] = {"code": code, "msg": msg or default_msg, "data": {}}
    if detail:
        body["error"] = {"message": detail, "log_id": _rand("", 20)}
    return _Reply(status if status is not None else st, body)


class _Fail(Exception):
    def __init__(self, reply: _Reply):
        super().__init__(reply.code)
        self.reply = reply


def _fail(code: int, detail: str | None = None, status: int | None = None) -> _Fail:
    return _Fail(_err(code, detail=detail, status=status))


class _Fault:
    def __init__(self, kind: str, path: str | None, times: int, code: int | None,
                 reset: int, delay: float):
        self.kind = kind
        self.path = path
        self.times = times
        self.code = code
        self.reset = reset
        self.delay = delay


def _parse_kind(kind: Any) -> tuple[str, int | None]:
    if isinstance(kind, tuple):
        return str(kind[0]), (int(kind[1]) if len(kind) > 1 and kind[1] is not None else None)
    if isinstance(kind, int) or (isinstance(kind, str) and kind.isdigit() and len(kind) > 3):
        return "code", int(kind)
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS} or a code")
    return kind, None


class FakeLark:
    """In-process fake Feishu/Lark Open API server.  See the module docstring."""

    def __init__(self, apps: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, token_ttl: int = 7200, batch_limit: int = 500,
                 token_error_status: int = 400, webhook_limits: tuple[int, int] = (5, 100),
                 delay: float = 0.0):
        self.apps: dict[str, str] = dict(apps or {})
        self.token_ttl = token_ttl
        self.token_reuse_min = 1800       # same token returned while >= this many seconds remain
        self.batch_limit = batch_limit
        self.token_error_status = token_error_status
        self.webhook_limits = webhook_limits
        self.delay = delay
        self.refuse_field_create = False
        self.ratelimit_limit = 50         # value of x-ogw-ratelimit-limit on 429

        self.uploads: list[dict] = []
        self.messages: list[tuple[str, Any, float]] = []
        self.requests: list[dict] = []

        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._offset = 0.0
        self._tokens: dict[str, tuple[str, float]] = {}   # token -> (app_id, expires_at)
        self._current: dict[str, str] = {}                # app_id -> latest token
        self._bases: dict[str, dict] = {}                 # app_token -> {"tables": {tid: table}}
        self._client_tokens: dict[tuple[str, str], tuple[str, str, Any]] = {}
        self._wiki: dict[str, dict] = {}
        self._hooks: dict[str, dict] = {}
        self._hook_sent: dict[str, list[float]] = {}
        self._faults: list[_Fault] = []
        self._rate = 0.0
        self._rate_rng = random.Random(0)
        self._rate_kinds: tuple = ()
        self._rate_delay = 1.0
        self._conns: set = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._host = host
        self._port = port

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeLark":
        if self._server is not None:
            return self
        fake = self

        class Handler(_Handler):
            lark = fake

        class Server(ThreadingHTTPServer):
            request_queue_size = 128

        server = Server((self._host, self._port), Handler)
        server.daemon_threads = True
        server.handle_error = lambda request, client_address: None  # type: ignore[assignment]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-lark", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    stop = close

    def __enter__(self) -> "FakeLark":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeLark is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ clock
    def now(self) -> float:
        """The fake's clock: real time plus whatever advance() added."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward (token expiry, webhook timestamps, rate windows)."""
        with self._lock:
            self._offset += seconds

    # ------------------------------------------------------------------ setup
    def add_app(self, app_token: str) -> str:
        with self._lock:
            self._bases.setdefault(app_token, {"tables": {}})
        return app_token

    def add_table(self, app_token: str, table_id: str | None = None,
                  fields: Iterable[tuple] = (), name: str | None = None) -> str:
        """Create a table; the first field is the primary one.  Returns the table id."""
        with self._lock:
            base = self._bases.setdefault(app_token, {"tables": {}})
            table_id = table_id or _rand("tbl", 13)
            if table_id in base["tables"]:
                raise ValueError(f"table {table_id} exists")
            base["tables"][table_id] = {"name": name or table_id, "fields": [], "records": []}
            for spec in fields:
                self.add_field(app_token, table_id, *spec)
        return table_id

    def add_field(self, app_token: str, table_id: str, name: str, type: int,
                  property: dict | None = None) -> str:
        with self._lock:
            table = self._bases[app_token]["tables"][table_id]
            if any(f["field_name"] == name for f in table["fields"]):
                raise ValueError(f"field {name!r} exists")
            field = _new_field(name, int(type), property, primary=not table["fields"])
            table["fields"].append(field)
            return field["field_id"]

    def add_record(self, app_token: str, table_id: str, fields: dict) -> str:
        """Insert a record as is (no validation).  Returns its record id."""
        with self._lock:
            table = self._bases[app_token]["tables"][table_id]
            rid = _rand("rec", 10)
            table["records"].append({"record_id": rid, "fields": copy.deepcopy(fields)})
            return rid

    def add_wiki_node(self, node_token: str, obj_token: str, obj_type: str = "bitable",
                      title: str = "", space_id: str | None = None) -> None:
        with self._lock:
            self._wiki[node_token] = {
                "node_token": node_token, "obj_token": obj_token, "obj_type": obj_type,
                "title": title or node_token, "space_id": space_id or "7" + "".join(
                    secrets.choice("0123456789") for _ in range(18)),
                "node_type": "origin", "parent_node_token": "", "has_child": False,
                "origin_node_token": node_token,
            }

    def add_webhook(self, hook_token: str, secret: str | None = None,
                    keywords: Iterable[str] | None = None) -> str:
        with self._lock:
            self._hooks[hook_token] = {"secret": secret, "keywords": list(keywords or [])}
            self._hook_sent.setdefault(hook_token, [])
        return self.hook_url(hook_token)

    def hook_url(self, hook_token: str) -> str:
        return self.url + HOOK_PREFIX + hook_token

    # ------------------------------------------------------------------ inspection
    def records(self, app_token: str, table_id: str) -> list[dict]:
        with self._lock:
            return copy.deepcopy(self._bases[app_token]["tables"][table_id]["records"])

    def fields(self, app_token: str, table_id: str) -> list[dict]:
        with self._lock:
            return copy.deepcopy(self._bases[app_token]["tables"][table_id]["fields"])

    def count(self, path_suffix: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests
                       if (path_suffix is None or r["path"].endswith(path_suffix))
                       and (method is None or r["method"] == method.upper()))

    # ------------------------------------------------------------------ tokens
    def expire_tokens(self) -> None:
        """Every token issued so far becomes invalid now."""
        with self._lock:
            for tok, (app, _exp) in list(self._tokens.items()):
                self._tokens[tok] = (app, 0.0)
            self._current.clear()

    def valid_token(self, token: str) -> bool:
        with self._lock:
            entry = self._tokens.get(token)
            return entry is not None and entry[1] > self.now()

    # ------------------------------------------------------------------ faults
    def fault(self, kind: str, *, path: str | None = None, times: int = 1, code: int | None = None,
              reset: int = 1, delay: float = 0.0) -> None:
        """Queue a fault for the next `times` matching requests (see the module docstring)."""
        k, c = _parse_kind(kind)
        code = code if code is not None else c
        if k == "code" and code is None:
            code = 1254290
        with self._lock:
            self._faults.append(_Fault(k, path, int(times), code, int(reset), float(delay)))

    def fault_rate(self, rate: float, seed: int = 0, kinds: Iterable = RETRYABLE_KINDS,
                   delay: float = 1.0) -> None:
        """Random faults on a fraction `rate` of bitable record writes; deterministic for a seed."""
        kinds = tuple(kinds)
        for k in kinds:
            _parse_kind(k)
        with self._lock:
            self._rate = float(rate)
            self._rate_rng = random.Random(seed)
            self._rate_kinds = kinds
            self._rate_delay = float(delay)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._rate = 0.0

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.times for f in self._faults)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.path is None:
                    if path == TOKEN_PATH:
                        continue
                elif f.path not in path:
                    continue
                f.times -= 1
                if f.times <= 0:
                    self._faults.remove(f)
                return f
            if (self._rate > 0 and method in ("POST", "PUT", "PATCH", "DELETE")
                    and path.startswith(BITABLE_PREFIX) and "/records" in path
                    and not path.endswith(("/search", "/batch_get"))):
                if self._rate_rng.random() < self._rate:
                    k, c = _parse_kind(self._rate_rng.choice(self._rate_kinds))
                    if k == "code" and c is None:
                        c = 1254290
                    return _Fault(k, None, 1, c, 1, self._rate_delay if k == "slow" else 0.0)
        return None

    # ------------------------------------------------------------------ dispatch
    def _handle(self, method: str, path: str, query: dict[str, str], headers: Any,
                body: bytes) -> _Reply:
        try:
            if path == TOKEN_PATH and method == "POST":
                return self._token(body)
            if path.startswith(HOOK_PREFIX) and method == "POST":
                return self._webhook(path[len(HOOK_PREFIX):], body)
            route = self._route(method, path)
            if route is None:
                return _Reply(404, {"code": 404, "msg": "404 page not found"})
            self._auth(headers)
            func, args = route
            return func(*args, query=query, headers=headers, body=body)
        except _Fail as f:
            return f.reply

    def _route(self, method: str, path: str):
        if path == UPLOAD_PATH and method == "POST":
            return self._upload, ()
        if path == WIKI_PATH and method == "GET":
            return self._get_node, ()
        if not path.startswith(BITABLE_PREFIX):
            return None
        parts = path[len(BITABLE_PREFIX):].split("/")
        if any(p == "" for p in parts):
            return None
        n = len(parts)
        if n == 2 and parts[1] == "tables" and method == "GET":
            return self._list_tables, (parts[0],)
        if n < 4 or parts[1] != "tables":
            return None
        app, tid, kind = parts[0], parts[2], parts[3]
        if kind == "fields" and n == 4:
            if method == "GET":
                return self._list_fields, (app, tid)
            if method == "POST":
                return self._create_field, (app, tid)
            return None
        if kind != "records":
            return None
        if n == 4:
            if method == "POST":
                return self._create_record, (app, tid)
            if method == "GET":
                return self._list_records, (app, tid)
            return None
        if n == 5:
            sub = parts[4]
            if method == "POST" and sub == "batch_create":
                return self._batch_create, (app, tid)
            if method == "POST" and sub == "batch_update":
                return self._batch_update, (app, tid)
            if method == "POST" and sub == "search":
                return self._search, (app, tid)
            if method == "PUT":
                return self._update_record, (app, tid, sub)
            if method == "GET":
                return self._get_record, (app, tid, sub)
            if method == "DELETE":
                return self._delete_record, (app, tid, sub)
        return None

    def _auth(self, headers: Any) -> None:
        auth = (headers.get("Authorization") or "").strip()
        token = ""
        if auth.lower().startswith("bearer"):
            token = auth[6:].strip()
        if not token:
            raise _fail(99991661, status=self.token_error_status)
        if not self.valid_token(token):
            raise _fail(99991663, status=self.token_error_status)

    # ------------------------------------------------------------------ token endpoint
    def _token(self, body: bytes) -> _Reply:
        try:
            req = _parse_json(body)
        except _Malformed:
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("app_id"), str) \
                or not isinstance(req.get("app_secret"), str):
            return _Reply(400, {"code": 10003, "msg": "invalid param"})
        app_id, secret = req["app_id"], req["app_secret"]
        if app_id not in self.apps:
            return _Reply(200, {"code": 10014, "msg": "app id not exists"})
        if not hmac.compare_digest(self.apps[app_id].encode(), secret.encode()):
            return _Reply(200, {"code": 10014, "msg": "app secret invalid"})
        with self._lock:
            now = self.now()
            tok = self._current.get(app_id)
            if tok is not None:
                remaining = self._tokens[tok][1] - now
                if remaining >= self.token_reuse_min:
                    return _Reply(200, {"code": 0, "msg": "ok", "tenant_access_token": tok,
                                        "expire": int(remaining)})
            tok = "t-" + secrets.token_hex(20)
            self._tokens[tok] = (app_id, now + self.token_ttl)
            self._current[app_id] = tok
            return _Reply(200, {"code": 0, "msg": "ok", "tenant_access_token": tok,
                                "expire": int(self.token_ttl)})

    # ------------------------------------------------------------------ bitable helpers
    def _table(self, app: str, tid: str) -> dict:
        base = self._bases.get(app)
        if base is None:
            raise _fail(1254040, f"app_token {app} not found")
        table = base["tables"].get(tid)
        if table is None:
            raise _fail(1254041, f"table_id {tid} not found")
        return table

    def _json_body(self, body: bytes, allow_empty: bool = False) -> dict:
        if allow_empty and not body.strip():
            return {}
        try:
            req = _parse_json(body)
        except _Malformed as exc:
            raise _fail(1254000, f"invalid JSON: {exc}")
        if not isinstance(req, dict):
            raise _fail(1254001, "body must be a JSON object")
        return req

    @staticmethod
    def _page(query: dict, default: int, maximum: int) -> tuple[int, int]:
        raw = query.get("page_size")
        size = default
        if raw not in (None, ""):
            try:
                size = int(raw)
            except ValueError:
                raise _fail(1254001, "page_size must be an integer")
            if size < 1 or size > maximum:
                raise _fail(1254001, f"page_size must be between 1 and {maximum}")
        pt = query.get("page_token")
        start = 0
        if pt:
            m = re.fullmatch(r"pt([0-9]+)", pt)
            if not m:
                raise _fail(1254002, "invalid page_token")
            start = int(m.group(1))
        return start, size

    @staticmethod
    def _paged(items: list, start: int, size: int, key: str = "items") -> dict:
        chunk = items[start:start + size]
        has_more = start + size < len(items)
        data: dict[str, Any] = {"has_more": has_more, "total": len(items), key: chunk}
        if has_more:
            data["page_token"] = f"pt{start + size}"
        return data

    def _client_token(self, app: str, query: dict) -> str | None:
        ct = query.get("client_token")
        if ct is None or ct == "":
            return None
        if not _UUID4.match(ct):
            raise _fail(1254037, "client_token must be a UUIDv4 string")
        return ct

    def _replay(self, app: str, ct: str | None, op: str, req: Any) -> _Reply | None:
        if ct is None:
            return None
        entry = self._client_tokens.get((app, ct))
        if entry is None:
            return None
        old_op, old_body, data = entry
        if old_op != op or old_body != json.dumps(req, sort_keys=True):
            raise _fail(1255006, "client_token was used with a different request")
        return _ok(copy.deepcopy(data))

    def _remember(self, app: str, ct: str | None, op: str, req: Any, data: Any) -> None:
        if ct is not None:
            self._client_tokens[(app, ct)] = (op, json.dumps(req, sort_keys=True), copy.deepcopy(data))

    # ------------------------------------------------------------------ tables / fields
    def _list_tables(self, app: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            base = self._bases.get(app)
            if base is None:
                raise _fail(1254040)
            start, size = self._page(query, 20, 100)
            items = [{"table_id": t, "name": v["name"], "revision": 1}
                     for t, v in base["tables"].items()]
            return _ok(self._paged(items, start, size))

    def _list_fields(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            start, size = self._page(query, 20, 100)
            return _ok(self._paged(copy.deepcopy(table["fields"]), start, size))

    def _create_field(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body)
            ct = self._client_token(app, query)
            replay = self._replay(app, ct, f"field:{tid}", req)
            if replay is not None:
                return replay
            if self.refuse_field_create:
                raise _fail(1254302, "the app may not create fields in this base")
            name = req.get("field_name")
            if not isinstance(name, str):
                raise _fail(1254001, "field_name is required")
            name = name.strip()
            if not name:
                raise _fail(1254028)
            ftype = req.get("type")
            if isinstance(ftype, bool) or not isinstance(ftype, int) or ftype not in FIELD_TYPES:
                raise _fail(1254001, f"unsupported field type {ftype!r}")
            prop = req.get("property")
            if prop is not None and not isinstance(prop, dict):
                raise _fail(1254001, "property must be an object")
            if any(f["field_name"] == name for f in table["fields"]):
                raise _fail(1254014, f"field {name!r} exists")
            field = _new_field(name, ftype, prop, primary=not table["fields"],
                               ui_type=req.get("ui_type"), description=req.get("description"))
            table["fields"].append(field)
            data = {"field": copy.deepcopy(field)}
            self._remember(app, ct, f"field:{tid}", req, data)
            return _ok(data)

    # ------------------------------------------------------------------ record validation
    def _check_fields(self, app: str, table: dict, fields: Any, *, update: bool) -> dict:
        """Validate one record's `fields`; return the cells to store (None = clear)."""
        if not isinstance(fields, dict):
            raise _fail(1254001, "fields must be an object")
        by_name = {f["field_name"]: f for f in table["fields"]}
        out: dict[str, Any] = {}
        for name, value in fields.items():
            field = by_name.get(name)
            if field is None:
                raise _fail(1254045, f"field name {name!r} not found")
            ftype = field["type"]
            if ftype in READ_ONLY_TYPES:
                raise _fail(1254015, f"field {name!r} is read-only")
            if value is None:
                if update:
                    out[name] = None
                continue
            out[name] = self._convert(app, name, ftype, value)
        return out

    def _convert(self, app: str, name: str, ftype: int, v: Any) -> Any:
        def bad(code: int, what: str) -> _Fail:
            return _fail(code, f"field {name!r}: {what}, got {json.dumps(v)[:80]}")

        if ftype == 1:
            if not isinstance(v, str):
                raise bad(1254060, "text needs a string")
            if len(v) > TEXT_CELL_MAX:
                raise bad(1254130, "text cell over 100000 characters")
            return v
        if ftype == 2:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(1254061, "number needs a number")
            return v
        if ftype == 3:
            if not isinstance(v, str):
                raise bad(1254062, "single select needs an option name")
            return v
        if ftype == 4:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > 1000:
                raise bad(1254063, "multi select needs a list of option names")
            return list(v)
        if ftype == 5:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(1254064, "date needs integer epoch milliseconds")
            return v
        if ftype == 7:
            if not isinstance(v, bool):
                raise bad(1254065, "checkbox needs true/false")
            return v
        if ftype == 11:
            if not isinstance(v, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("id"), str) for x in v):
                raise bad(1254066, "user needs [{\"id\": ...}]")
            return [{"id": x["id"]} for x in v]
        if ftype == 13:
            if not isinstance(v, str) or len(v) > 64 or not _PHONE.match(v):
                raise bad(1254072, "phone needs a string matching (\\+)?\\d*")
            return v
        if ftype == 15:
            if not isinstance(v, dict) or not isinstance(v.get("text"), str) \
                    or not isinstance(v.get("link"), str):
                raise bad(1254068, "url needs {\"text\": str, \"link\": str}")
            return {"text": v["text"], "link": v["link"]}
        if ftype == 17:
            if not isinstance(v, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("file_token"), str) for x in v):
                raise bad(1254069, "attachment needs [{\"file_token\": ...}]")
            if len(v) > 100:
                raise bad(1254106, "more than 100 attachments")
            cell = []
            for x in v:
                up = next((u for u in self.uploads if u["file_token"] == x["file_token"]), None)
                if up is None or up["parent_node"] != app:
                    raise bad(1254303, "attachment token was not uploaded to this base")
                cell.append({"file_token": up["file_token"], "name": up["file_name"],
                             "size": up["size"], "type": _mime(up["file_name"]),
                             "url": f"/open-apis/drive/v1/medias/{up['file_token']}/download",
                             "tmp_url": f"/open-apis/drive/v1/medias/batch_get_tmp_download_url"
                                        f"?file_tokens={up['file_token']}"})
            return cell
        if ftype in (18, 21):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(1254067 if ftype == 18 else 1254074, "link needs a list of record ids")
            return list(v)
        if ftype == 22:
            if not isinstance(v, str) or not re.fullmatch(r"\s*-?\d+(\.\d+)?\s*,\s*-?\d+(\.\d+)?\s*", v):
                raise bad(1254015, "location needs \"lng,lat\"")
            return v
        if ftype == 23:
            if not isinstance(v, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("id"), str) for x in v):
                raise bad(1254015, "group chat needs [{\"id\": ...}]")
            return [{"id": x["id"]} for x in v]
        raise bad(1254015, "unsupported field type")

    def _add_options(self, table: dict, cells: dict) -> None:
        for f in table["fields"]:
            if f["type"] not in (3, 4) or cells.get(f["field_name"]) is None:
                continue
            val = cells[f["field_name"]]
            names = [val] if f["type"] == 3 else val
            prop = f["property"] = f["property"] or {}
            opts = prop.setdefault("options", [])
            for n in names:
                if not any(o.get("name") == n for o in opts):
                    opts.append({"name": n, "id": _rand("opt", 7), "color": len(opts) % 55})

    def _insert(self, table: dict, cells: dict) -> dict:
        self._add_options(table, cells)
        rid = _rand("rec", 10)
        table["records"].append({"record_id": rid, "fields": copy.deepcopy(cells)})
        return {"fields": copy.deepcopy(cells), "id": rid, "record_id": rid}

    def _find_record(self, table: dict, rid: str) -> dict:
        for r in table["records"]:
            if r["record_id"] == rid:
                return r
        raise _fail(1254043, f"record {rid} not found")

    # ------------------------------------------------------------------ records
    def _create_record(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body)
            ct = self._client_token(app, query)
            replay = self._replay(app, ct, f"record:{tid}", req)
            if replay is not None:
                return replay
            if "fields" not in req:
                raise _fail(1254001, "fields is required")
            cells = self._check_fields(app, table, req["fields"], update=False)
            data = {"record": self._insert(table, cells)}
            self._remember(app, ct, f"record:{tid}", req, data)
            return _ok(data)

    def _batch_create(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body)
            ct = self._client_token(app, query)
            replay = self._replay(app, ct, f"batch_create:{tid}", req)
            if replay is not None:
                return replay
            recs = req.get("records")
            if not isinstance(recs, list) or not recs:
                raise _fail(1254001, "records must be a non-empty list")
            if len(recs) > self.batch_limit:
                raise _fail(1254104, f"at most {self.batch_limit} records per request")
            checked = []
            for r in recs:
                if not isinstance(r, dict) or "fields" not in r:
                    raise _fail(1254001, "each record needs fields")
                checked.append(self._check_fields(app, table, r["fields"], update=False))
            data = {"records": [self._insert(table, c) for c in checked]}
            self._remember(app, ct, f"batch_create:{tid}", req, data)
            return _ok(data)

    def _apply_update(self, table: dict, rec: dict, cells: dict) -> dict:
        self._add_options(table, {k: v for k, v in cells.items() if v is not None})
        for k, v in cells.items():
            if v is None:
                rec["fields"].pop(k, None)
            else:
                rec["fields"][k] = copy.deepcopy(v)
        return {"fields": copy.deepcopy(rec["fields"]), "id": rec["record_id"],
                "record_id": rec["record_id"]}

    def _update_record(self, app: str, tid: str, rid: str, *, query: dict, headers: Any,
                       body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body)
            rec = self._find_record(table, rid)
            if "fields" not in req:
                raise _fail(1254001, "fields is required")
            cells = self._check_fields(app, table, req["fields"], update=True)
            return _ok({"record": self._apply_update(table, rec, cells)})

    def _batch_update(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body)
            recs = req.get("records")
            if not isinstance(recs, list) or not recs:
                raise _fail(1254001, "records must be a non-empty list")
            if len(recs) > self.batch_limit:
                raise _fail(1254104, f"at most {self.batch_limit} records per request")
            todo = []
            for r in recs:
                if not isinstance(r, dict) or not isinstance(r.get("record_id"), str) \
                        or "fields" not in r:
                    raise _fail(1254001, "each record needs record_id and fields")
                todo.append((self._find_record(table, r["record_id"]),
                             self._check_fields(app, table, r["fields"], update=True)))
            return _ok({"records": [self._apply_update(table, rec, c) for rec, c in todo]})

    def _get_record(self, app: str, tid: str, rid: str, *, query: dict, headers: Any,
                    body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            rec = self._find_record(table, rid)
            return _ok({"record": {"fields": copy.deepcopy(rec["fields"]), "id": rid,
                                   "record_id": rid}})

    def _delete_record(self, app: str, tid: str, rid: str, *, query: dict, headers: Any,
                       body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            rec = self._find_record(table, rid)
            table["records"].remove(rec)
            return _ok({"deleted": True, "record_id": rid})

    def _read_view(self, table: dict, rec: dict, names: list | None, as_array: bool) -> dict:
        types = {f["field_name"]: f["type"] for f in table["fields"]}
        fields = {}
        for k, v in rec["fields"].items():
            if names is not None and k not in names:
                continue
            if as_array and types.get(k) == 1 and isinstance(v, str):
                v = [{"type": "text", "text": v}]
            fields[k] = copy.deepcopy(v)
        return {"fields": fields, "id": rec["record_id"], "record_id": rec["record_id"]}

    def _list_records(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            start, size = self._page(query, 20, 500)
            as_array = query.get("text_field_as_array", "").lower() == "true"
            items = [self._read_view(table, r, None, as_array) for r in table["records"]]
            return _ok(self._paged(items, start, size))

    def _search(self, app: str, tid: str, *, query: dict, headers: Any, body: bytes) -> _Reply:
        with self._lock:
            table = self._table(app, tid)
            req = self._json_body(body, allow_empty=True)
            start, size = self._page(query, 20, 500)
            names = req.get("field_names")
            if names is not None and (not isinstance(names, list)
                                      or not all(isinstance(n, str) for n in names)):
                raise _fail(1254001, "field_names must be a list of strings")
            known = {f["field_name"] for f in table["fields"]}
            for n in names or []:
                if n not in known:
                    raise _fail(1254045, f"field name {n!r} not found")
            recs = list(table["records"])
            flt = req.get("filter")
            if flt:
                recs = [r for r in recs if _match_filter(r["fields"], flt)]
            for s in reversed(req.get("sort") or []):
                if isinstance(s, dict) and isinstance(s.get("field_name"), str):
                    fn = s["field_name"]
                    recs.sort(key=lambda r: _sort_key(r["fields"].get(fn)),
                              reverse=bool(s.get("desc")))
            items = [self._read_view(table, r, names, True) for r in recs]
            return _ok(self._paged(items, start, size))

    # ------------------------------------------------------------------ drive upload
    def _upload(self, *, query: dict, headers: Any, body: bytes) -> _Reply:
        ctype = headers.get("Content-Type") or ""
        m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', ctype)
        if not ctype.lower().startswith("multipart/form-data") or not m:
            raise _fail(1061002, "Content-Type must be multipart/form-data with a boundary")
        parts = _parse_multipart(body, (m.group(1) or m.group(2)).encode("latin-1"))
        if parts is None:
            raise _fail(1061002, "malformed multipart body")
        form = {name: value for name, _fn, value in parts}
        for key in ("file_name", "parent_type", "parent_node", "size", "file"):
            if key not in form:
                raise _fail(1061002, f"{key} is required")
        try:
            file_name = form["file_name"].decode("utf-8")
            parent_type = form["parent_type"].decode("utf-8")
            parent_node = form["parent_node"].decode("utf-8")
            size_text = form["size"].decode("ascii").strip()
        except UnicodeDecodeError:
            raise _fail(1061002, "form fields must be UTF-8 text")
        if not file_name or len(file_name) > 250:
            raise _fail(1061002, "file_name must have 1 to 250 characters")
        if parent_type not in ("bitable_file", "bitable_image"):
            raise _fail(1061002, "parent_type must be bitable_file or bitable_image")
        if not size_text.isdigit():
            raise _fail(1061002, "size must be an integer")
        size = int(size_text)
        with self._lock:
            if parent_node not in self._bases:
                raise _fail(1061044)
        if size > MAX_UPLOAD:
            raise _fail(1061043)
        data = form["file"]
        if size != len(data):
            raise _fail(1062009)
        checksum = form.get("checksum")
        if checksum is not None:
            if checksum.decode("ascii", "replace").strip() != str(zlib.adler32(data) & 0xFFFFFFFF):
                raise _fail(1062008)
        token = _rand("box", 24)
        entry = {"file_token": token, "file_name": file_name, "parent_type": parent_type,
                 "parent_node": parent_node, "size": size, "data": data}
        if "extra" in form:
            entry["extra"] = form["extra"].decode("utf-8", "replace")
        with self._lock:
            self.uploads.append(entry)
        return _ok({"file_token": token})

    # ------------------------------------------------------------------ wiki
    def _get_node(self, *, query: dict, headers: Any, body: bytes) -> _Reply:
        token = query.get("token")
        if not token:
            raise _fail(131002, "token is required")
        obj_type = query.get("obj_type") or "wiki"
        with self._lock:
            if obj_type == "wiki":
                node = self._wiki.get(token)
            else:
                node = next((n for n in self._wiki.values()
                             if n["obj_token"] == token and n["obj_type"] == obj_type), None)
            if node is None:
                raise _fail(131005, f"node {token} not found")
            return _ok({"node": copy.deepcopy(node)})

    # ------------------------------------------------------------------ webhook
    def _webhook(self, hook_token: str, body: bytes) -> _Reply:
        def bad_request() -> _Reply:
            return _Reply(200, {"Extra": None, "StatusCode": 9499, "StatusMessage": "Bad Request"})

        def err(code: int, msg: str) -> _Reply:
            return _Reply(200, {"code": code, "data": {}, "msg": msg})

        with self._lock:
            hook = self._hooks.get(hook_token)
        if hook is None:
            return err(19001, "param invalid: incoming webhook access token invalid")
        if len(body) > WEBHOOK_MAX_BODY:
            return bad_request()
        try:
            msg = _parse_json(body)
        except _Malformed:
            return bad_request()
        if not isinstance(msg, dict):
            return bad_request()
        if not _webhook_content_ok(msg):
            return err(19002, "params error, msg_type need")
        if hook["secret"] is not None:
            ts, sign = msg.get("timestamp"), msg.get("sign")
            ok = isinstance(ts, str) and ts.isdigit() and isinstance(sign, str) \
                and abs(int(ts) - self.now()) <= 3600
            if ok:
                key = f"{ts}\n{hook['secret']}".encode("utf-8")
                want = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
                ok = hmac.compare_digest(want, sign)
            if not ok:
                return err(19021, "sign match fail or timestamp is not within one hour "
                                  "from current time")
        if hook["keywords"]:
            text = body.decode("utf-8") + json.dumps(msg, ensure_ascii=False)
            if not any(k in text for k in hook["keywords"]):
                return err(19024, "Key Words Not Found")
        per_sec, per_min = self.webhook_limits
        with self._lock:
            now = self.now()
            sent = [t for t in self._hook_sent.get(hook_token, []) if now - t < 60]
            self._hook_sent[hook_token] = sent
            if len(sent) >= per_min or sum(1 for t in sent if now - t < 1) >= per_sec:
                return err(11232, "frequency limited")
            sent.append(now)
            self.messages.append((hook_token, msg, time.time()))
        return _Reply(200, {"code": 0, "data": {}, "msg": "success"})


# ---------------------------------------------------------------------- helpers
def _new_field(name: str, ftype: int, prop: dict | None, *, primary: bool,
               ui_type: str | None = None, description: Any = None) -> dict:
    if ftype not in FIELD_TYPES:
        raise ValueError(f"unknown field type {ftype}")
    prop = copy.deepcopy(prop) if prop is not None else None
    if ftype in (3, 4):
        prop = prop or {}
        opts = []
        for i, o in enumerate(prop.get("options") or []):
            o = {"name": o} if isinstance(o, str) else dict(o)
            o.setdefault("id", _rand("opt", 7))
            o.setdefault("color", i % 55)
            opts.append(o)
        prop["options"] = opts
    field = {"field_id": _rand("fld", 10), "field_name": name, "type": ftype, "property": prop,
             "is_primary": primary, "ui_type": ui_type or FIELD_TYPES[ftype], "is_hidden": False}
    if description is not None:
        field["description"] = description
    return field


def _mime(name: str) -> str:
    import mimetypes
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _webhook_content_ok(msg: dict) -> bool:
    mt = msg.get("msg_type")
    if mt not in WEBHOOK_MSG_TYPES:
        return False
    content = msg.get("content")
    if mt == "interactive":
        return isinstance(msg.get("card"), dict)
    if not isinstance(content, dict):
        return False
    if mt == "text":
        return isinstance(content.get("text"), str)
    if mt == "post":
        return isinstance(content.get("post"), dict)
    if mt == "image":
        return isinstance(content.get("image_key"), str)
    return isinstance(content.get("share_chat_id"), str)


def _cell_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return ",".join(_cell_text(x) for x in v)
    if isinstance(v, dict):
        return str(v.get("text", v.get("name", v.get("link", ""))))
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _match_filter(fields: dict, flt: Any) -> bool:
    if not isinstance(flt, dict):
        raise _fail(1254001, "filter must be an object")
    conj = flt.get("conjunction", "and")
    results = []
    for c in flt.get("conditions") or []:
        if not isinstance(c, dict) or not isinstance(c.get("field_name"), str):
            raise _fail(1254001, "bad filter condition")
        cell = _cell_text(fields.get(c["field_name"]))
        vals = [str(x) for x in (c.get("value") or [])]
        op = c.get("operator")
        if op == "is":
            results.append(bool(vals) and cell == vals[0])
        elif op == "isNot":
            results.append(not vals or cell != vals[0])
        elif op == "contains":
            results.append(any(x in cell for x in vals))
        elif op == "doesNotContain":
            results.append(not any(x in cell for x in vals))
        elif op == "isEmpty":
            results.append(cell == "")
        elif op == "isNotEmpty":
            results.append(cell != "")
        else:
            raise _fail(1254001, f"unsupported filter operator {op!r}")
    for child in flt.get("children") or []:
        results.append(_match_filter(fields, child))
    if not results:
        return True
    return all(results) if conj == "and" else any(results)


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, v, "")
    return (2, 0, _cell_text(v))


_DISP_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[str, str | None, bytes]] | None:
    """Parse multipart/form-data into (name, filename, bytes); None if malformed."""
    delim = b"--" + boundary
    if not body.startswith(delim):
        idx = body.find(b"\r\n" + delim)
        if idx < 0:
            return None
        body = body[idx + 2:]
    chunks = body.split(b"\r\n" + delim)
    first = chunks[0]
    if not first.startswith(delim):
        return None
    chunks[0] = first[len(delim):]
    out: list[tuple[str, str | None, bytes]] = []
    closed = False
    for chunk in chunks:
        if chunk.startswith(b"--"):
            closed = True
            break
        if not chunk.startswith(b"\r\n"):
            return None
        head, sep, content = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            return None
        name = filename = None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, val = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            for pm in _DISP_PARAM.finditer(val):
                pval = pm.group(2) if pm.group(2) is not None else pm.group(3).strip()
                if pm.group(2) is not None:
                    pval = re.sub(r"\\(.)", r"\1", pval)
                if pm.group(1).lower() == "name":
                    name = pval
                elif pm.group(1).lower() == "filename":
                    filename = pval
        if name is None:
            return None
        out.append((name, filename, content))
    return out if closed else None


class _Handler(BaseHTTPRequestHandler):
    lark: FakeLark
    protocol_version = "HTTP/1.1"
    server_version = "fake-lark"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        with self.lark._lock:
            self.lark._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.lark._lock:
            self.lark._conns.discard(self.connection)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            data = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _serve(self) -> None:
        lark = self.lark
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()}
        entry = {"method": self.command, "path": path, "query": query, "time": time.time(),
                 "status": None, "code": None, "fault": None, "json": None}
        with lark._lock:
            lark.requests.append(entry)
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        if body and path != UPLOAD_PATH:
            try:
                entry["json"] = _parse_json(body)
            except _Malformed:
                pass
        if lark.delay > 0:
            lark._stopping.wait(lark.delay)
        fault = lark._take_fault(self.command, path)
        reply: _Reply | None = None
        if fault is not None:
            entry["fault"] = fault.kind if fault.kind != "code" else f"code:{fault.code}"
            if fault.delay > 0:
                lark._stopping.wait(fault.delay)
            if fault.kind == "drop":
                self._drop()
                return
            if fault.kind == "429":
                reply = _Reply(429, {"code": 99991400, "msg": "request trigger frequency limit"},
                               headers={"x-ogw-ratelimit-limit": str(lark.ratelimit_limit),
                                        "x-ogw-ratelimit-reset": str(fault.reset)})
            elif fault.kind == "code":
                reply = _err(int(fault.code or 1254290))
            elif fault.kind == "5xx":
                st = fault.code if fault.code and 500 <= fault.code < 600 else 502
                reply = _Reply(st, None, raw=b"<html><body><h1>%d Bad Gateway</h1></body></html>" % st,
                               content_type="text/html")
            elif fault.kind == "token":
                reply = _err(99991663, status=lark.token_error_status)
        if reply is None:
            try:
                reply = lark._handle(self.command, path, query, self.headers, body)
            except Exception as exc:  # a bug in the fake: answer 500 JSON, keep serving
                reply = _Reply(500, {"code": 1255001, "msg": f"fake error: {exc!r}", "data": {}})
        if fault is not None and fault.kind == "drop_after":
            entry["done_code"] = reply.code   # what the work answered; nothing is sent
            self._drop()
            return
        entry["status"] = reply.status
        entry["code"] = reply.code
        self._send(reply)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, reply: _Reply) -> None:
        raw = reply.raw if reply.raw is not None else json.dumps(reply.body).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(raw)))
            self.send_header("X-Tt-Logid", time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(10).upper())
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve  # type: ignore[assignment]
