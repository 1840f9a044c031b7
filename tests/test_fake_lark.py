"""Contract tests for the fake Feishu/Lark Open API in fake_lark.py.

Real HTTP through urllib against the fake, so the client's tests can trust it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib

import pytest

from fake_lark import FakeLark

APP_ID, SECRET = "cli_app", "sekret"
BASE, TABLE = "bascnAPP", "tblTABLE"
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
TBL = f"/open-apis/bitable/v1/apps/{BASE}/tables/{TABLE}"
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


class Resp:
    def __init__(self, status: int, headers, raw: bytes):
        self.status = status
        self.headers = headers
        self.raw = raw
        try:
            self.json = json.loads(raw.decode("utf-8"))
        except ValueError:
            self.json = None

    @property
    def code(self):
        return self.json.get("code") if isinstance(self.json, dict) else None

    @property
    def data(self):
        return self.json.get("data")


def call(lark, method, path, body=None, *, token=None, raw=None, headers=None, timeout=5.0):
    """One request; answers Resp for any HTTP status, raises on transport errors."""
    hdrs = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        hdrs.setdefault("Content-Type", "application/json; charset=utf-8")
    if token:
        hdrs["Authorization"] = "Bearer " + token
    req = urllib.request.Request(lark.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def get_token(lark, app_id=APP_ID, secret=SECRET):
    r = call(lark, "POST", TOKEN_PATH, {"app_id": app_id, "app_secret": secret})
    assert r.status == 200 and r.code == 0, r.json
    return r.json["tenant_access_token"]


FIELDS = [("Name", 1), ("loss", 2), ("tag", 3, {"options": []}), ("tags", 4), ("when", 5),
          ("done", 7), ("who", 11), ("phone", 13), ("link", 15), ("files", 17), ("rel", 18),
          ("formula", 20), ("duplex", 21), ("place", 22), ("chat", 23), ("created", 1001)]


@pytest.fixture
def lark():
    with FakeLark(apps={APP_ID: SECRET}) as fake:
        fake.add_table(BASE, TABLE, fields=FIELDS)
        fake.tok = get_token(fake)
        yield fake


def bc(lark, records, client_token=None, **kw):
    q = f"?client_token={client_token}" if client_token is not None else ""
    return call(lark, "POST", f"{TBL}/records/batch_create{q}",
                {"records": [{"fields": f} for f in records]}, token=lark.tok, **kw)


def upload(lark, data=b"hello", *, name="a.txt", parent_type="bitable_file", parent_node=BASE,
           size=None, checksum=None, omit=(), content_type=None):
    boundary = "----fakeboundary" + uuid.uuid4().hex
    form = [("file_name", name), ("parent_type", parent_type), ("parent_node", parent_node),
            ("size", str(len(data) if size is None else size))]
    if checksum is not None:
        form.append(("checksum", checksum))
    parts = []
    for k, v in form:
        if k in omit:
            continue
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                     .encode() + v.encode() + b"\r\n")
    if "file" not in omit:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    ctype = content_type or f"multipart/form-data; boundary={boundary}"
    return call(lark, "POST", "/open-apis/drive/v1/medias/upload_all", raw=body,
                headers={"Content-Type": ctype}, token=lark.tok)


# ---------------------------------------------------------------------------- token
def test_token_issue_reuse_and_flat_shape(lark):
    r = call(lark, "POST", TOKEN_PATH, {"app_id": APP_ID, "app_secret": SECRET})
    assert r.status == 200
    assert set(r.json) == {"code", "msg", "tenant_access_token", "expire"}
    assert r.json["tenant_access_token"] == lark.tok and lark.tok.startswith("t-")
    assert 7100 < r.json["expire"] <= 7200
    assert r.headers["X-Tt-Logid"] and r.headers["Content-Type"].startswith("application/json")


def test_token_bad_credentials(lark):
    for app_id, secret in ((APP_ID, "wrong"), ("cli_other", SECRET)):
        r = call(lark, "POST", TOKEN_PATH, {"app_id": app_id, "app_secret": secret})
        assert r.status == 200 and r.code == 10014 and "tenant_access_token" not in r.json
    r = call(lark, "POST", TOKEN_PATH, raw=b"{nope", headers={"Content-Type": "application/json"})
    assert r.code == 10003


def test_token_rotation_when_under_30_minutes(lark):
    t1 = lark.tok
    lark.advance(7200 - 1799)                 # 1799 s left: a new token
    t2 = get_token(lark)
    assert t2 != t1
    assert call(lark, "GET", f"{TBL}/fields", token=t1).code == 0      # both valid
    assert call(lark, "GET", f"{TBL}/fields", token=t2).code == 0
    r = call(lark, "POST", TOKEN_PATH, {"app_id": APP_ID, "app_secret": SECRET})
    assert r.json["tenant_access_token"] == t2 and 7190 < r.json["expire"] <= 7200
    lark.advance(1800)                        # t1 is past its expiry
    r = call(lark, "GET", f"{TBL}/fields", token=t1)
    assert (r.status, r.code) == (400, 99991663)
    assert call(lark, "GET", f"{TBL}/fields", token=t2).code == 0


def test_token_real_time_expiry_with_small_ttl(lark):
    lark.token_ttl = 1
    lark.expire_tokens()
    t = get_token(lark)
    assert call(lark, "GET", f"{TBL}/fields", token=t).code == 0
    assert get_token(lark) != t               # under 1800 s left: always a new one
    time.sleep(1.1)
    assert call(lark, "GET", f"{TBL}/fields", token=t).code == 99991663


def test_expire_tokens_and_bearer_errors(lark):
    r = call(lark, "GET", f"{TBL}/fields")
    assert (r.status, r.code) == (400, 99991661)
    r = call(lark, "GET", f"{TBL}/fields", headers={"Authorization": "Bearer "})
    assert r.code == 99991661
    r = call(lark, "GET", f"{TBL}/fields", token="t-unknown")
    assert (r.status, r.code) == (400, 99991663)
    lark.expire_tokens()
    assert call(lark, "GET", f"{TBL}/fields", token=lark.tok).code == 99991663
    new = get_token(lark)
    assert new != lark.tok and call(lark, "GET", f"{TBL}/fields", token=new).code == 0
    lark.token_error_status = 200
    r = call(lark, "GET", f"{TBL}/fields", token=lark.tok)
    assert (r.status, r.code) == (200, 99991663)


# ---------------------------------------------------------------------------- fields
def test_fields_pagination_45():
    with FakeLark(apps={APP_ID: SECRET}) as lark:
        lark.add_table(BASE, TABLE, fields=[(f"f{i:02d}", 1) for i in range(45)])
        tok = get_token(lark)
        seen, pt, pages = [], None, 0
        while True:
            q = "?page_size=20" + (f"&page_token={pt}" if pt else "")
            r = call(lark, "GET", f"{TBL}/fields{q}", token=tok)
            assert r.code == 0 and r.data["total"] == 45
            pages += 1
            seen += [it["field_name"] for it in r.data["items"]]
            if not r.data["has_more"]:
                assert "page_token" not in r.data
                break
            pt = r.data["page_token"]
        assert pages == 3 and seen == [f"f{i:02d}" for i in range(45)]
        item = call(lark, "GET", f"{TBL}/fields", token=tok).data["items"][0]
        assert {"field_id", "field_name", "type", "property", "is_primary", "ui_type",
                "is_hidden"} <= set(item)
        assert item["is_primary"] is True and item["ui_type"] == "Text"
        r = call(lark, "GET", f"{TBL}/fields", token=tok)
        assert len(r.data["items"]) == 20          # default page size
        assert call(lark, "GET", f"{TBL}/fields?page_size=100", token=tok).data["has_more"] is False
        assert call(lark, "GET", f"{TBL}/fields?page_size=101", token=tok).code == 1254001
        assert call(lark, "GET", f"{TBL}/fields?page_token=zzz", token=tok).code == 1254002


def test_unknown_base_and_table(lark):
    r = call(lark, "GET", "/open-apis/bitable/v1/apps/bascnNOPE/tables/tblX/fields", token=lark.tok)
    assert (r.status, r.code) == (200, 1254040)
    r = call(lark, "GET", f"/open-apis/bitable/v1/apps/{BASE}/tables/tblNOPE/fields", token=lark.tok)
    assert (r.status, r.code) == (200, 1254041)
    r = call(lark, "GET", f"/open-apis/bitable/v1/apps/{BASE}/tables", token=lark.tok)
    assert [t["table_id"] for t in r.data["items"]] == [TABLE]
    assert call(lark, "GET", "/open-apis/nothing/here", token=lark.tok).status == 404


def test_field_create_and_errors(lark):
    r = call(lark, "POST", f"{TBL}/fields", {"field_name": "  acc  ", "type": 2}, token=lark.tok)
    assert r.code == 0
    f = r.data["field"]
    assert f["field_name"] == "acc" and f["type"] == 2 and f["field_id"].startswith("fld")
    assert f["is_primary"] is False
    assert lark.fields(BASE, TABLE)[-1]["field_name"] == "acc"
    r = call(lark, "POST", f"{TBL}/fields", {"field_name": "acc", "type": 1}, token=lark.tok)
    assert r.code == 1254014
    r = call(lark, "POST", f"{TBL}/fields", {"field_name": "   ", "type": 1}, token=lark.tok)
    assert (r.status, r.code) == (400, 1254028)
    r = call(lark, "POST", f"{TBL}/fields", {"field_name": "x", "type": 6}, token=lark.tok)
    assert r.code == 1254001
    r = call(lark, "POST", f"{TBL}/fields", raw=b'{"field_name": ', token=lark.tok)
    assert r.code == 1254000
    n = len(lark.fields(BASE, TABLE))
    lark.refuse_field_create = True
    r = call(lark, "POST", f"{TBL}/fields", {"field_name": "y", "type": 1}, token=lark.tok)
    assert (r.status, r.code) == (403, 1254302)
    assert len(lark.fields(BASE, TABLE)) == n


# ---------------------------------------------------------------------------- records
def test_batch_create_basic(lark):
    r = bc(lark, [{"Name": "a", "loss": 0.5}, {"Name": "b", "loss": 1}])
    assert r.code == 0
    recs = r.data["records"]
    assert [x["fields"]["Name"] for x in recs] == ["a", "b"]
    assert all(x["id"] == x["record_id"] and x["record_id"].startswith("rec") for x in recs)
    stored = lark.records(BASE, TABLE)
    assert [s["record_id"] for s in stored] == [x["record_id"] for x in recs]
    assert stored[0]["fields"] == {"Name": "a", "loss": 0.5}


def test_single_create(lark):
    r = call(lark, "POST", f"{TBL}/records", {"fields": {"Name": "one"}}, token=lark.tok)
    rec = r.data["record"]
    assert r.code == 0 and rec["id"] == rec["record_id"] and rec["fields"] == {"Name": "one"}
    r = call(lark, "POST", f"{TBL}/records", {"fields": {"nope": 1}}, token=lark.tok)
    assert r.code == 1254045
    assert len(lark.records(BASE, TABLE)) == 1


def test_batch_limit_and_atomicity(lark):
    lark.batch_limit = 3
    assert bc(lark, [{"Name": str(i)} for i in range(4)]).code == 1254104
    assert bc(lark, [{"Name": str(i)} for i in range(3)]).code == 0
    r = bc(lark, [{"Name": "ok"}, {"loss": "not a number"}, {"Name": "ok2"}])
    assert r.code == 1254061
    r = bc(lark, [{"Name": "ok"}, {"loss ": 1}])       # exact name match, no stripping
    assert (r.status, r.code) == (200, 1254045)
    assert len(lark.records(BASE, TABLE)) == 3
    assert bc(lark, []).code == 1254001
    r = call(lark, "POST", f"{TBL}/records/batch_create", raw=b'{"records": [{"fields": {"loss": NaN}}]}',
             token=lark.tok)
    assert r.code == 1254000


@pytest.mark.parametrize("name,bad,code,status", [
    ("Name", 5, 1254060, 200),
    ("loss", True, 1254061, 200),
    ("loss", "1.5", 1254061, 200),
    ("tag", ["a"], 1254062, 200),
    ("tags", "a", 1254063, 200),
    ("tags", ["a", 1], 1254063, 200),
    ("when", 1.5e12, 1254064, 200),
    ("when", "2024-01-01", 1254064, 200),
    ("done", 1, 1254065, 200),
    ("who", ["ou_1"], 1254066, 200),
    ("phone", "+86 123", 1254072, 200),
    ("phone", "1" * 65, 1254072, 200),
    ("link", "https://example.com", 1254068, 200),
    ("link", {"link": "https://example.com"}, 1254068, 200),
    ("files", "boxcnX", 1254069, 200),
    ("files", [{"file_token": "boxcnUNKNOWN"}], 1254303, 200),
    ("rel", "recX", 1254067, 200),
    ("duplex", "recX", 1254074, 400),
    ("place", "here", 1254015, 400),
    ("chat", "oc_1", 1254015, 400),
    ("formula", 1, 1254015, 400),
    ("created", 1700000000000, 1254015, 400),
])
def test_type_mismatch(lark, name, bad, code, status):
    r = bc(lark, [{"Name": "ok"}, {name: bad}])
    assert (r.status, r.code) == (status, code), r.json
    assert lark.records(BASE, TABLE) == []


def test_good_values_for_every_writable_type(lark):
    tok = upload(lark, b"ckpt").data["file_token"]
    good = {"Name": "x", "loss": 0.25, "tag": "new-opt", "tags": ["a", "b"], "when": 1700000000000,
            "done": False, "who": [{"id": "ou_1"}], "phone": "+8613800000000",
            "link": {"text": "run", "link": "https://example.com/r"}, "files": [{"file_token": tok}],
            "rel": ["recA"], "duplex": ["recB"], "place": "116.397755,39.903179", "chat": [{"id": "oc_1"}]}
    r = bc(lark, [good])
    assert r.code == 0, r.json
    stored = lark.records(BASE, TABLE)[0]["fields"]
    assert stored["files"][0]["file_token"] == tok and stored["files"][0]["size"] == 4
    opts = {f["field_name"]: f for f in lark.fields(BASE, TABLE)}
    assert [o["name"] for o in opts["tag"]["property"]["options"]] == ["new-opt"]
    assert [o["name"] for o in opts["tags"]["property"]["options"]] == ["a", "b"]
    # an attachment uploaded to another base may not be written here
    lark.add_table("bascnOTHER", "tblO", fields=[("Name", 1)])
    other = upload(lark, b"z", parent_node="bascnOTHER").data["file_token"]
    assert bc(lark, [{"files": [{"file_token": other}]}]).code == 1254303


def test_failed_batch_does_not_add_select_options(lark):
    assert bc(lark, [{"tag": "fresh"}, {"loss": "x"}]).code == 1254061
    tag = [f for f in lark.fields(BASE, TABLE) if f["field_name"] == "tag"][0]
    assert tag["property"]["options"] == []


def test_client_token_validation_replay_and_conflict(lark):
    assert bc(lark, [{"Name": "a"}], client_token="abc").code == 1254037
    r = bc(lark, [{"Name": "a"}], client_token=str(uuid.uuid1()))
    assert (r.status, r.code) == (400, 1254037)
    ct = str(uuid.uuid4())
    r1 = bc(lark, [{"Name": "a"}, {"Name": "b"}], client_token=ct)
    r2 = bc(lark, [{"Name": "a"}, {"Name": "b"}], client_token=ct)
    assert r1.code == r2.code == 0
    assert [x["record_id"] for x in r1.data["records"]] == [x["record_id"] for x in r2.data["records"]]
    assert len(lark.records(BASE, TABLE)) == 2
    r3 = bc(lark, [{"Name": "a"}, {"Name": "c"}], client_token=ct)
    assert (r3.status, r3.code) == (400, 1255006)
    assert len(lark.records(BASE, TABLE)) == 2
    assert bc(lark, [{"Name": "a"}], client_token="").code == 0       # empty = none
    # a failed request does not consume its token
    ct2 = str(uuid.uuid4())
    assert bc(lark, [{"loss": "x"}], client_token=ct2).code == 1254061
    assert bc(lark, [{"loss": 1}], client_token=ct2).code == 0


def test_update_record(lark):
    rid = bc(lark, [{"Name": "a", "loss": 1, "tag": "x"}]).data["records"][0]["record_id"]
    r = call(lark, "PUT", f"{TBL}/records/{rid}", {"fields": {"loss": None, "done": True}},
             token=lark.tok)
    assert r.code == 0 and r.data["record"]["record_id"] == rid
    assert lark.records(BASE, TABLE)[0]["fields"] == {"Name": "a", "tag": "x", "done": True}
    r = call(lark, "PUT", f"{TBL}/records/recNOPE", {"fields": {"Name": "b"}}, token=lark.tok)
    assert r.code == 1254043
    r = call(lark, "PUT", f"{TBL}/records/{rid}", {"fields": {"done": "yes"}}, token=lark.tok)
    assert r.code == 1254065
    r = call(lark, "PUT", f"{TBL}/records/{rid}", {"fields": {"zzz": 1}}, token=lark.tok)
    assert r.code == 1254045
    r = call(lark, "GET", f"{TBL}/records/{rid}", token=lark.tok)
    assert r.data["record"]["fields"]["done"] is True
    assert call(lark, "DELETE", f"{TBL}/records/{rid}", token=lark.tok).data["deleted"] is True
    assert lark.records(BASE, TABLE) == []


def test_search_and_list(lark):
    bc(lark, [{"Name": f"r{i}", "loss": i} for i in range(25)])
    names, pt = [], None
    while True:
        q = "?page_size=10" + (f"&page_token={pt}" if pt else "")
        r = call(lark, "POST", f"{TBL}/records/search{q}", {}, token=lark.tok)
        assert r.code == 0 and r.data["total"] == 25
        names += [it["fields"]["Name"][0]["text"] for it in r.data["items"]]
        if not r.data["has_more"]:
            break
        pt = r.data["page_token"]
    assert names == [f"r{i}" for i in range(25)]
    flt = {"conjunction": "and", "conditions": [{"field_name": "Name", "operator": "is", "value": ["r7"]}]}
    r = call(lark, "POST", f"{TBL}/records/search", {"filter": flt, "field_names": ["loss"]},
             token=lark.tok)
    assert [it["fields"] for it in r.data["items"]] == [{"loss": 7}]
    r = call(lark, "POST", f"{TBL}/records/search?page_size=501", {}, token=lark.tok)
    assert r.code == 1254001
    r = call(lark, "GET", f"{TBL}/records?page_size=500", token=lark.tok)
    assert r.data["items"][0]["fields"]["Name"] == "r0"


# ---------------------------------------------------------------------------- upload
def test_upload_good(lark):
    data = bytes(range(256)) * 4
    r = upload(lark, data, name="ckpt.bin", checksum=str(zlib.adler32(data)))
    assert r.code == 0 and r.data["file_token"].startswith("box")
    up = lark.uploads[-1]
    assert up["file_token"] == r.data["file_token"] and up["data"] == data
    assert (up["file_name"], up["parent_type"], up["parent_node"], up["size"]) == \
        ("ckpt.bin", "bitable_file", BASE, len(data))
    assert upload(lark, b"img", parent_type="bitable_image").code == 0


def test_upload_errors(lark):
    assert upload(lark, omit=("file_name",)).code == 1061002
    assert upload(lark, omit=("file",)).code == 1061002
    assert upload(lark, parent_type="explorer").code == 1061002
    r = upload(lark, parent_node="bascnNOPE")
    assert (r.status, r.code) == (400, 1061044)
    r = upload(lark, b"12345", size=4)
    assert (r.status, r.code) == (400, 1062009)
    r = upload(lark, b"12345", size=20971521)
    assert (r.status, r.code) == (400, 1061043)
    r = upload(lark, b"12345", checksum="123")
    assert (r.status, r.code) == (400, 1062008)
    assert upload(lark, content_type="application/octet-stream").code == 1061002
    assert lark.uploads == []
    r = call(lark, "POST", "/open-apis/drive/v1/medias/upload_all", raw=b"x",
             headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert r.code == 99991661


# ---------------------------------------------------------------------------- wiki
def test_get_node(lark):
    lark.add_wiki_node("wikcnNODE", obj_token=BASE, obj_type="bitable", title="Runs")
    r = call(lark, "GET", "/open-apis/wiki/v2/spaces/get_node?token=wikcnNODE", token=lark.tok)
    node = r.data["node"]
    assert r.code == 0 and (node["node_token"], node["obj_token"], node["obj_type"], node["title"]) == \
        ("wikcnNODE", BASE, "bitable", "Runs") and node["space_id"]
    r = call(lark, "GET", f"/open-apis/wiki/v2/spaces/get_node?token={BASE}&obj_type=bitable",
             token=lark.tok)
    assert r.data["node"]["node_token"] == "wikcnNODE"
    assert call(lark, "GET", "/open-apis/wiki/v2/spaces/get_node?token=wikNOPE",
                token=lark.tok).code == 131005
    assert call(lark, "GET", "/open-apis/wiki/v2/spaces/get_node?token=wikcnNODE").code == 99991661


# ---------------------------------------------------------------------------- webhook
def hook_post(lark, url, body=None, raw=None):
    return call(lark, "POST", url[len(lark.url):], body, raw=raw,
                headers={"Content-Type": "application/json"})


def signed(body, secret, ts=None):
    ts = str(int(time.time())) if ts is None else ts
    key = f"{ts}\n{secret}".encode()
    sign = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
    return dict(body, timestamp=ts, sign=sign)


TEXT = {"msg_type": "text", "content": {"text": "run finished"}}


def test_webhook_plain_and_shapes(lark):
    url = lark.add_webhook("hookA")
    assert url == lark.url + "/open-apis/bot/v2/hook/hookA"
    r = hook_post(lark, url, TEXT)
    assert (r.status, r.json) == (200, {"code": 0, "data": {}, "msg": "success"})
    card = {"msg_type": "interactive", "card": {"elements": [{"tag": "div"}]}}
    assert hook_post(lark, url, card).code == 0
    assert [m[0] for m in lark.messages] == ["hookA", "hookA"] and lark.messages[0][1] == TEXT
    assert hook_post(lark, url + "x", TEXT).code == 19001
    r = hook_post(lark, url, raw=b"not json")
    assert r.json["StatusCode"] == 9499 and r.json["StatusMessage"] == "Bad Request"
    assert hook_post(lark, url, {"msg_type": "video", "content": {}}).code == 19002
    assert hook_post(lark, url, {"msg_type": "interactive", "card": "{}"}).code == 19002
    big = {"msg_type": "text", "content": {"text": "x" * (20 * 1024)}}
    assert hook_post(lark, url, big).json["StatusCode"] == 9499
    assert len(lark.messages) == 2


def test_webhook_sign(lark):
    url = lark.add_webhook("hookS", secret="s3cr3t")
    assert hook_post(lark, url, signed(TEXT, "s3cr3t")).code == 0
    assert hook_post(lark, url, TEXT).code == 19021
    assert hook_post(lark, url, signed(TEXT, "wrong")).code == 19021
    stale = str(int(time.time()) - 3700)
    assert hook_post(lark, url, signed(TEXT, "s3cr3t", ts=stale)).code == 19021
    future = str(int(time.time()) + 3700)
    assert hook_post(lark, url, signed(TEXT, "s3cr3t", ts=future)).code == 19021
    body = signed(TEXT, "s3cr3t")
    body["timestamp"] = int(body["timestamp"])            # must be a string
    assert hook_post(lark, url, body).code == 19021
    assert len(lark.messages) == 1


def test_webhook_keywords(lark):
    url = lark.add_webhook("hookK", keywords=["exp", "实验"])
    assert hook_post(lark, url, {"msg_type": "text", "content": {"text": "exp done"}}).code == 0
    assert hook_post(lark, url, {"msg_type": "text", "content": {"text": "hello"}}).code == 19024
    zh = json.dumps({"msg_type": "text", "content": {"text": "实验结束"}}).encode()  # \u-escaped
    assert hook_post(lark, url, raw=zh).code == 0


def test_webhook_rate_limits(lark):
    url = lark.add_webhook("hookR")
    codes = [hook_post(lark, url, TEXT).code for _ in range(7)]
    assert codes[:5] == [0] * 5 and codes[5:] == [11232, 11232]
    assert len(lark.messages) == 5
    lark.advance(1.01)
    assert hook_post(lark, url, TEXT).code == 0
    lark.webhook_limits = (100, 6)
    lark.advance(1.01)
    assert hook_post(lark, url, TEXT).code == 11232       # 6 in the last minute
    lark.advance(60)
    assert hook_post(lark, url, TEXT).code == 0


# ---------------------------------------------------------------------------- faults
def test_fault_429(lark):
    lark.fault("429", path="batch_create", reset=3)
    assert call(lark, "GET", f"{TBL}/fields", token=lark.tok).code == 0   # path does not match
    r = bc(lark, [{"Name": "a"}])
    assert (r.status, r.code) == (429, 99991400)
    assert r.json["msg"] == "request trigger frequency limit"
    assert r.headers["x-ogw-ratelimit-reset"] == "3" and r.headers["x-ogw-ratelimit-limit"]
    assert lark.records(BASE, TABLE) == []
    assert bc(lark, [{"Name": "a"}]).code == 0


@pytest.mark.parametrize("code,status", [(1254290, 200), (1254291, 200), (1254607, 400),
                                         (1255040, 504), (1254002, 200)])
def test_fault_code(lark, code, status):
    lark.fault("code", code=code, times=2)
    for _ in range(2):
        r = bc(lark, [{"Name": "a"}])
        assert (r.status, r.code) == (status, code) and "msg" in r.json
    assert lark.records(BASE, TABLE) == []
    assert bc(lark, [{"Name": "a"}]).code == 0


def test_fault_5xx_token_and_default_path(lark):
    lark.fault("5xx")
    r = call(lark, "GET", f"{TBL}/fields", token=lark.tok)
    assert r.status == 502 and r.json is None and "json" not in r.headers["Content-Type"]
    lark.fault("5xx", code=500)
    assert call(lark, "GET", f"{TBL}/fields", token=lark.tok).status == 500
    lark.fault("token")
    assert get_token(lark) == lark.tok                      # token endpoint is not matched by path=None
    r = call(lark, "GET", f"{TBL}/fields", token=lark.tok)
    assert (r.status, r.code) == (400, 99991663)
    assert call(lark, "GET", f"{TBL}/fields", token=lark.tok).code == 0
    lark.fault("429", path="tenant_access_token")
    assert call(lark, "POST", TOKEN_PATH, {"app_id": APP_ID, "app_secret": SECRET}).status == 429


def test_fault_drop(lark):
    lark.fault("drop", path="batch_create")
    with pytest.raises(TRANSPORT_ERRORS):
        bc(lark, [{"Name": "a"}])
    assert lark.records(BASE, TABLE) == []
    assert lark.requests[-1]["status"] is None and lark.requests[-1]["fault"] == "drop"
    assert bc(lark, [{"Name": "a"}]).code == 0


def test_fault_drop_after_then_replay(lark):
    ct = str(uuid.uuid4())
    lark.fault("drop_after", path="batch_create")
    with pytest.raises(TRANSPORT_ERRORS):
        bc(lark, [{"Name": "a"}, {"Name": "b"}], client_token=ct)
    written = lark.records(BASE, TABLE)
    assert [r["fields"]["Name"] for r in written] == ["a", "b"]
    r = bc(lark, [{"Name": "a"}, {"Name": "b"}], client_token=ct)     # the retry
    assert r.code == 0
    assert [x["record_id"] for x in r.data["records"]] == [w["record_id"] for w in written]
    assert len(lark.records(BASE, TABLE)) == 2


def test_fault_slow(lark):
    lark.fault("slow", path="batch_create", delay=0.6)
    t0 = time.time()
    with pytest.raises(TRANSPORT_ERRORS):
        bc(lark, [{"Name": "a"}], timeout=0.2)
    assert time.time() - t0 < 0.5
    deadline = time.time() + 3
    while not lark.records(BASE, TABLE) and time.time() < deadline:
        time.sleep(0.05)
    assert len(lark.records(BASE, TABLE)) == 1          # answered normally after the delay
    lark.fault("slow", delay=0.3)
    t0 = time.time()
    assert bc(lark, [{"Name": "b"}]).code == 0 and time.time() - t0 >= 0.3


def test_faults_are_thread_safe(lark):
    lark.fault("code", code=1254291, times=5)
    codes, lock = [], threading.Lock()

    def one():
        c = call(lark, "GET", f"{TBL}/fields", token=lark.tok).code
        with lock:
            codes.append(c)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes).count(1254291) == 5 and codes.count(0) == 15
    assert lark.pending_faults() == 0


def run_writes(seed, n=30):
    with FakeLark(apps={APP_ID: SECRET}) as lark:
        lark.add_table(BASE, TABLE, fields=[("Name", 1)])
        lark.tok = get_token(lark)
        lark.fault_rate(0.4, seed=seed)
        call(lark, "GET", f"{TBL}/fields", token=lark.tok)
        for i in range(n):
            try:
                bc(lark, [{"Name": str(i)}])
            except TRANSPORT_ERRORS:
                pass
        for _ in range(5):
            assert call(lark, "GET", f"{TBL}/fields", token=lark.tok).code == 0   # reads untouched
        return [r["fault"] for r in lark.requests if r["path"].endswith("batch_create")]


def test_fault_rate_is_deterministic():
    a, b, c = run_writes(7), run_writes(7), run_writes(8)
    assert a == b
    assert a != c
    hit = [k for k in a if k]
    assert 4 <= len(hit) <= 22 and len(set(hit)) >= 3


# ---------------------------------------------------------------------------- plumbing
def test_request_log_headers_and_delay(lark):
    n = len(lark.requests)
    r = call(lark, "GET", f"{TBL}/fields?page_size=5", token=lark.tok)
    assert r.headers["X-Tt-Logid"] and r.headers["Content-Type"].startswith("application/json")
    e = lark.requests[n]
    assert (e["method"], e["path"], e["query"], e["status"], e["code"]) == \
        ("GET", f"{TBL}/fields", {"page_size": "5"}, 200, 0)
    assert lark.count("/fields") == 1 and lark.count("/fields", method="POST") == 0
    assert lark.count(TOKEN_PATH) == 1
    r = call(lark, "GET", f"{TBL}/fields", token="t-bad")
    assert r.headers["X-Tt-Logid"] and lark.requests[-1]["code"] == 99991663
    lark.delay = 0.25
    t0 = time.time()
    call(lark, "GET", f"{TBL}/fields", token=lark.tok)
    assert time.time() - t0 >= 0.25
