"""Edge API-key enforcement: routes and scopes, workspaces, errors, paths.

Real redis-server, real nginx (2 workers) with the module, the stand-in
AnythingLLM recording what reaches it.
"""

import json
import time

import pytest

from lib import helpers
from lib.auth import (access_field, assert_workspace_forbidden, bearer,
                      is_ours, logged, wait_access_lines)
from lib.openai import assert_refused, error_of
from lib.processes import UPSTREAM_KEY, key_digest


# every path behind anythingllm_auth; %(server)s: what a test adds to the
# server (a directive, a location)
AUTH = """
    anythingllm_redis      @REDIS@;
    anythingllm_key_cache zone=alm_keys:1m valid=%(valid)s invalid=%(invalid)s;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;
        %(server)s

        proxy_http_version  1.1;
        proxy_set_header    Connection "";

        location / {
            proxy_pass  http://anythingllm;
        }
    }
"""


def auth_nginx(nginx, redis_server, valid="30s", invalid="5s", server="",
               **kw):
    return nginx(AUTH % {"valid": valid, "invalid": invalid,
                         "server": server}, redis=redis_server, **kw)


ALL_SCOPES = ("chat", "read", "documents", "admin")


# ---------------------------------------------------------------------------
# the route table

# (method, path, body, scope needed or None for "any valid key")
ROUTES = [
    ("POST", "/api/v1/workspace/sales/chat", {"message": "hi"}, "chat"),
    ("POST", "/api/v1/workspace/sales/stream-chat", {"message": "hi"},
     "chat"),
    ("POST", "/api/v1/workspace/sales/thread/new", {}, "chat"),
    ("POST", "/api/v1/workspace/sales/thread/t1/chat", {"message": "x"},
     "chat"),
    ("POST", "/api/v1/workspace/sales/thread/t1/stream-chat",
     {"message": "x"}, "chat"),
    ("POST", "/api/v1/workspace/sales/thread/t1/update", {"name": "n"},
     "chat"),
    ("DELETE", "/api/v1/workspace/sales/thread/t1", None, "chat"),
    ("GET", "/api/v1/workspace/sales", None, "read"),
    ("GET", "/api/v1/workspace/sales/chats", None, "read"),
    ("GET", "/api/v1/workspace/sales/thread/t1/chats", None, "read"),
    ("GET", "/api/v1/workspaces", None, "read"),
    ("GET", "/api/v1/documents", None, "read"),
    ("POST", "/api/v1/document/upload", None, "documents"),
    ("DELETE", "/api/v1/system/remove-documents", {"names": []},
     "documents"),
    ("POST", "/api/v1/workspace/sales/update-embeddings",
     {"adds": [], "deletes": []}, "documents"),
    ("POST", "/api/v1/workspace/new", {"name": "x"}, "admin"),
    ("POST", "/api/v1/workspace/sales/update", {"openAiTemp": 0.5},
     "admin"),
    ("DELETE", "/api/v1/workspace/sales", None, "admin"),
    ("GET", "/api/v1/system", None, "admin"),
    ("GET", "/api/v1/admin/users", None, "admin"),
    ("GET", "/api/v1/users", None, "admin"),
    ("GET", "/", None, "admin"),
    ("GET", "/index.html", None, "admin"),
    ("GET", "/api/v1/auth", None, None),
    ("GET", "/api/v1/openai/models", None, "chat"),
    ("POST", "/api/v1/openai/chat/completions",
     {"model": "sales", "messages": [{"role": "user", "content": "x"}]},
     "chat"),
]


def test_auth_route_table_scopes(nginx, redis_server, backend):
    """Each route is allowed to a key with its scope only, and refused
    with 403 insufficient_scope to a key with any other single scope."""
    for s in ALL_SCOPES:
        redis_server.add_key("key-" + s, name="only-" + s, scopes=s,
                             workspaces="*")
    redis_server.add_key("key-none", name="none", scopes="", workspaces="*")
    n = auth_nginx(nginx, redis_server)

    for method, path, body, need in ROUTES:
        for s in ALL_SCOPES + ("none",):
            backend.reset()
            r = n.request(method, path, json=body,
                          headers=bearer("key-" + s))
            allowed = need is None or need == s
            what = "%s %s with %s" % (method, path, s)
            if allowed:
                assert not is_ours(r), (what, r.status, r.text)
                got = backend.requests()
                assert len(got) == 1, (what, got)
                assert got[0]["path"] == path, (what, got[0]["path"])
            else:
                err = assert_refused(r, 403, "insufficient_scope")
                assert '"%s"' % need in err["message"], (what, err)
                assert backend.requests() == [], what


def test_auth_every_scope_passes_everything(nginx, redis_server, backend):
    redis_server.add_key("key-all", scopes="chat, read,documents ,admin",
                         workspaces="*")
    n = auth_nginx(nginx, redis_server)
    for method, path, body, need in ROUTES:
        r = n.request(method, path, json=body, headers=bearer("key-all"))
        assert not is_ours(r), (method, path, r.status, r.text)


def test_auth_slug_must_be_in_workspaces(nginx, redis_server, backend):
    redis_server.add_key("k-two", scopes="chat,read,documents,admin",
                         workspaces="sales, support")
    n = auth_nginx(nginx, redis_server)

    for slug in ("sales", "support"):
        r = n.post("/api/v1/workspace/%s/chat" % slug,
                   json={"message": "hi"}, headers=bearer("k-two"))
        assert r.status == 200, r.text
        assert r.json()["textResponse"].startswith("Echo: hi")

    backend.clear()
    for method, path, body in (
            ("POST", "/api/v1/workspace/engineering/chat",
             {"message": "hi"}),
            ("POST", "/api/v1/workspace/engineering/thread/t/chat",
             {"message": "hi"}),
            ("GET", "/api/v1/workspace/engineering", None),
            ("GET", "/api/v1/workspace/engineering/chats", None),
            ("POST", "/api/v1/workspace/engineering/update-embeddings",
             {"adds": []}),
            ("DELETE", "/api/v1/workspace/engineering", None),
            ("POST", "/api/v1/workspace/SALES/chat", {"message": "hi"}),
            ("POST", "/api/v1/workspace/sale/chat", {"message": "hi"})):
        r = n.request(method, path, json=body, headers=bearer("k-two"))
        err = assert_refused(r, 403, "workspace_forbidden")
        slug = path.split("/")[4]
        assert slug in err["message"]
    assert backend.requests() == []

    # a key without any workspace reaches none, and no instance-wide
    # route either; its workspace list is empty
    redis_server.add_key("k-none", scopes="chat,read", workspaces="")
    assert_workspace_forbidden(n, "k-none", "sales")
    r = n.get("/api/v1/workspaces", headers=bearer("k-none"))
    assert r.status == 200, r.text
    assert r.json()["workspaces"] == []


def test_auth_workspace_list_filtered(nginx, redis_server, backend):
    redis_server.add_key("k-sales", scopes="read", workspaces="sales")
    redis_server.add_key("k-two", scopes="read",
                         workspaces="engineering,sales")
    redis_server.add_key("k-all", scopes="read", workspaces="*")
    redis_server.add_key("k-empty", scopes="read", workspaces="")
    n = auth_nginx(nginx, redis_server)

    hdrs = {"Accept-Encoding": "gzip, deflate"}

    def slugs(key):
        backend.clear()
        r = n.get("/api/v1/workspaces", headers=dict(hdrs, **bearer(key)))
        assert r.status == 200, r.text
        assert "content-encoding" not in r.headers
        seen = backend.requests()
        assert len(seen) == 1
        return [w["slug"] for w in r.json()["workspaces"]], seen[0]

    got, seen = slugs("k-all")
    assert got == ["sales", "support", "engineering"]
    # an unrestricted key's request goes upstream untouched
    assert seen["headers"].get("accept-encoding") == "gzip, deflate"

    got, seen = slugs("k-sales")
    assert got == ["sales"]
    # the filter reads the answer: AnythingLLM must not compress it
    assert seen["headers"].get("accept-encoding") in (None, "identity")

    got, _ = slugs("k-two")
    assert got == ["sales", "engineering"]

    got, _ = slugs("k-empty")
    assert got == []

    # the trailing-slash spelling is the same route for Express
    r = n.get("/api/v1/workspaces/", headers=bearer("k-sales"))
    assert r.status == 200
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]


def test_head_on_the_filtered_workspace_list(nginx, backend, redis_server):
    n = auth_nginx(nginx, redis_server, server="proxy_buffering off;")
    redis_server.add_key("sk-sales-read", scopes="read", workspaces="sales")
    r = n.request("HEAD", "/api/v1/workspaces",
                  headers={"Authorization": "Bearer sk-sales-read"})
    assert r.status == 200
    assert r.body == b""


def test_auth_anythingllm_openai_routes_need_every_workspace(
        nginx, redis_server, backend):
    """/api/v1/openai/ passed through names the workspace in the body:
    only a key allowed every workspace may use it."""
    redis_server.add_key("k-all", scopes="chat", workspaces="*")
    redis_server.add_key("k-sales", scopes="chat", workspaces="sales")
    redis_server.add_key("k-read", scopes="read", workspaces="*")
    n = auth_nginx(nginx, redis_server)

    body = {"model": "support",
            "messages": [{"role": "user", "content": "hello"}]}

    r = n.get("/api/v1/openai/models", headers=bearer("k-all"))
    assert r.status == 200, r.text
    r = n.post("/api/v1/openai/chat/completions", json=body,
               headers=bearer("k-all"))
    assert r.status == 200, r.text

    backend.clear()
    for method, path, b in (("GET", "/api/v1/openai/models", None),
                            ("POST", "/api/v1/openai/chat/completions",
                             body)):
        r = n.request(method, path, json=b, headers=bearer("k-sales"))
        err = assert_refused(r, 403, "workspace_forbidden")
        assert "every workspace" in err["message"]
        r = n.request(method, path, json=b, headers=bearer("k-read"))
        assert_refused(r, 403, "insufficient_scope")
    assert backend.requests() == []


# ---------------------------------------------------------------------------
# the key itself


@pytest.mark.parametrize("value", [
    None, "", "Bearer", "Bearer ", "Bearer    ", "Basic a2V5OnNlY3JldA==",
    "Token k-good", "Bearerk-good", "k-good",
])
def test_auth_missing_key(nginx, redis_server, backend, value):
    redis_server.add_key("k-good", scopes="read")
    n = auth_nginx(nginx, redis_server)
    headers = {} if value is None else {"Authorization": value}
    r = n.get("/api/v1/workspaces", headers=headers)
    err = assert_refused(r, 401, "invalid_api_key")
    assert "Bearer" in err["message"]
    assert backend.requests() == []
    line = wait_access_lines(n, 1)[-1]
    assert access_field(line, "auth") == "denied_missing"
    assert access_field(line, "key_id") == "-"


@pytest.mark.parametrize("value", [
    "Bearer k-good", "bearer k-good", "BEARER k-good", "Bearer   k-good  ",
    "Bearer\tk-good",
])
def test_auth_bearer_spellings(nginx, redis_server, backend, value):
    redis_server.add_key("k-good", scopes="read")
    n = auth_nginx(nginx, redis_server)
    r = n.get("/api/v1/workspaces", headers={"Authorization": value})
    assert r.status == 200, r.text


def test_auth_unknown_key_and_negative_cache(nginx, redis_server, backend):
    n = auth_nginx(nginx, redis_server, invalid="2s")
    r = n.get("/api/v1/auth", headers=bearer("k-later"))
    err = assert_refused(r, 401, "invalid_api_key")
    assert err["message"] == "Incorrect API key provided."
    t0 = time.monotonic()

    # created now: the negative answer is kept for "invalid" seconds
    redis_server.add_key("k-later", scopes="read")
    r = n.get("/api/v1/auth", headers=bearer("k-later"))
    assert r.status == 401
    assert access_field(wait_access_lines(n, 2)[-1], "auth") \
        == "denied_unknown"

    def ok():
        return n.get("/api/v1/auth", headers=bearer("k-later")).status == 200
    helpers.wait_until(ok, 5, interval=0.1)
    assert time.monotonic() - t0 >= 1.5
    assert backend.requests(path="/api/v1/auth")


def test_auth_disabled_key(nginx, redis_server, backend):
    redis_server.add_key("k-off", scopes="read", disabled=1)
    redis_server.add_key("k-odd", scopes="read", disabled="yes")
    n = auth_nginx(nginx, redis_server)
    for key in ("k-off", "k-odd"):
        for _ in range(2):          # from Redis, then from the cache
            r = n.get("/api/v1/auth", headers=bearer(key))
            err = assert_refused(r, 401, "invalid_api_key")
            assert "disabled" in err["message"]
    lines = wait_access_lines(n, 4)
    assert [access_field(l, "auth") for l in lines] == \
        ["denied_disabled"] * 4
    assert backend.requests() == []


def test_auth_expired_key(nginx, redis_server, backend):
    redis_server.add_key("k-old", scopes="read", expires=time.time() - 5)
    redis_server.add_key("k-soon", scopes="read", expires=time.time() + 2)
    n = auth_nginx(nginx, redis_server, valid="600s")

    r = n.get("/api/v1/auth", headers=bearer("k-old"))
    err = assert_refused(r, 401, "invalid_api_key")
    assert "expired" in err["message"]

    # cached while still valid, and refused once its time has come,
    # although the cache entry lives for ten minutes
    wait_access_lines(n, 1)
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-soon"))
    assert r.status == 200
    assert access_field(line, "auth") == "redis"
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-soon"))
    assert r.status == 200
    assert access_field(line, "auth") == "cached"
    time.sleep(max(0, key_expiry_left(redis_server, "k-soon")) + 1.1)
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-soon"))
    err = assert_refused(r, 401, "invalid_api_key")
    assert "expired" in err["message"]
    assert access_field(line, "auth") == "denied_expired"


def key_expiry_left(redis_server, key):
    rec = redis_server.hgetall(redis_server.key_name(key))
    return int(rec["expires"]) - time.time()


def test_auth_malformed_record_is_disabled(nginx, redis_server, backend):
    redis_server.add_key("k-bad-rpm", scopes="read", rpm="lots")
    redis_server.add_key("k-bad-exp", scopes="read")
    redis_server.update_key("k-bad-exp", expires="soon")
    n = auth_nginx(nginx, redis_server)
    for key in ("k-bad-rpm", "k-bad-exp"):
        r = n.get("/api/v1/auth", headers=bearer(key))
        assert_refused(r, 401, "invalid_api_key")
    log = n.error_log()
    assert 'malformed "rpm" field' in log
    assert 'malformed "expires" field' in log
    assert key_digest("k-bad-rpm")[:12] in log


def test_auth_missing_fields_mean_nothing(nginx, redis_server, backend):
    """A record with only a name: no scope, no workspace, no limit."""
    redis_server.cmd("HSET", redis_server.key_name("k-bare"), "name", "b")
    n = auth_nginx(nginx, redis_server)
    assert n.get("/api/v1/auth", headers=bearer("k-bare")).status == 200
    r = n.get("/api/v1/documents", headers=bearer("k-bare"))
    assert_refused(r, 403, "insufficient_scope")


def test_auth_key_never_upstream_nor_logged(nginx, redis_server, backend):
    secret = "sk-alm-Secret0123456789abcdefSECRET"
    redis_server.add_key(secret, name="team", scopes="chat,read",
                         workspaces="sales")
    wrong = "sk-alm-Wrong0123456789abcdefWRONG"
    n = auth_nginx(nginx, redis_server, log_level="info")

    r = n.post("/api/v1/workspace/sales/chat", json={"message": "hi"},
               headers=bearer(secret))
    assert r.status == 200
    r = n.get("/api/v1/workspaces", headers=bearer(secret))
    assert r.status == 200
    r = n.get("/api/v1/workspace/support", headers=bearer(secret))
    assert r.status == 403
    r = n.get("/api/v1/auth", headers=bearer(wrong))
    assert r.status == 401

    for req in backend.requests():
        assert req["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY
        assert secret not in json.dumps(req)

    n.stop()
    logs = n.access_log() + n.error_log()
    for k in (secret, wrong):
        assert k not in logs
        assert k[7:20] not in logs
    assert key_digest(secret)[:12] in n.access_log()
    assert key_digest(wrong)[:12] in n.access_log()
    assert key_digest(secret) not in logs


def test_auth_variables_in_access_log(nginx, redis_server, backend):
    d = redis_server.add_key("k-log", name="log team", scopes="chat",
                             workspaces="sales")
    n = auth_nginx(nginx, redis_server)
    lines = [
        logged(n, "POST", "/api/v1/workspace/sales/chat",
               json={"message": "a"}, headers=bearer("k-log"))[1],
        logged(n, "POST", "/api/v1/workspace/sales/chat",
               json={"message": "b"}, headers=bearer("k-log"))[1],
        logged(n, "GET", "/api/v1/workspace/sales",
               headers=bearer("k-log"))[1],
        logged(n, "POST", "/api/v1/workspace/support/chat",
               json={"message": "c"}, headers=bearer("k-log"))[1],
        logged(n, "GET", "/api/v1/auth")[1],
        logged(n, "GET", "/api/v1/auth", headers=bearer("k-nobody"))[1],
    ]
    got = [(access_field(l, "auth"), access_field(l, "key_name"),
            access_field(l, "key_id"), access_field(l, "ws"))
           for l in lines]
    assert got == [
        ("redis", "log team", d[:12], "sales"),
        ("cached", "log team", d[:12], "sales"),
        ("denied_scope", "log team", d[:12], "sales"),
        ("denied_workspace", "log team", d[:12], "support"),
        ("denied_missing", "-", "-", "-"),
        ("denied_unknown", "-", key_digest("k-nobody")[:12], "-"),
    ]


def test_auth_off_elsewhere(nginx, redis_server, backend):
    n = auth_nginx(nginx, redis_server, server="""
        location /api/v1/auth {
            anythingllm_auth  off;
            proxy_pass        http://anythingllm;
        }""")
    r = n.get("/api/v1/auth", headers=bearer(UPSTREAM_KEY))
    assert r.status == 200
    r = n.get("/api/v1/documents", headers=bearer(UPSTREAM_KEY))
    assert_refused(r, 401, "invalid_api_key")


def test_auth_errors_carry_cors(nginx, redis_server, backend):
    n = auth_nginx(nginx, redis_server,
                   server="anythingllm_cors https://app.example;")
    r = n.get("/api/v1/workspaces", headers={"Origin": "https://app.example"})
    assert r.status == 401
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    # a preflight needs no key
    r = n.request("OPTIONS", "/api/v1/workspaces", headers={
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status == 204
    assert backend.requests() == []


def test_auth_request_body_discarded_on_refusal(nginx, redis_server,
                                                backend):
    """A refused POST keeps the connection usable (its body is read)."""
    n = auth_nginx(nginx, redis_server)
    body = json.dumps({"message": "x" * 20000}).encode()
    req = (b"POST /api/v1/workspace/sales/chat HTTP/1.1\r\nHost: x\r\n"
           b"Authorization: Bearer nope\r\nContent-Type: application/json"
           b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    req2 = b"GET /api/v1/auth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = helpers.raw_request("127.0.0.1", n.port, req + req2)
    assert out.count(b"HTTP/1.1 401") == 2, out[:600]


# ---------------------------------------------------------------------------
# the path judged is the path sent


def raw(n, method, target, key, body=b""):
    data = ("%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (method, target, key, len(body))
            ).encode() + body
    out = helpers.raw_request("127.0.0.1", n.port, data)
    head = out.split(b"\r\n", 1)[0].decode()
    status = int(head.split()[1])
    return status, out.split(b"\r\n\r\n", 1)[1]


TRICKS_DENIED = [
    "/api/v1/workspace/support/chat",
    "/api/v1/workspace/sales/..%2fsupport/chat",
    "/api/v1/workspace/sales/%2e%2e/support/chat",
    "/api/v1/workspace/sales/%2E%2E%2Fsupport/chat",
    "/api/v1/workspace/sales/chat/../../support/chat",
    "/api/v1/workspace/sales/./../support/chat",
    "/api/v1/workspace/./support/chat",
    "/api/v1/workspace/%73upport/chat",
    "//api/v1/workspace/support/chat",
    "/api/v1//workspace/support/chat",
    "/api/v1/workspace//support/chat",
    "/api//v1/workspace/support/chat",
    "/api/v1/workspace/support%2fchat",
    "/api/v1/x/../workspace/support/chat",
    "/api/v1/workspace/sales/../support/chat?x=/sales/",
]

# allowed, and what AnythingLLM must receive
TRICKS_ALLOWED = [
    ("/api/v1/workspace/sales/chat", "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/sal%65s/chat", "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/support/../sales/chat",
     "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/support%2f..%2fsales/chat",
     "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/support/%2e%2e/sales/chat",
     "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/sales%2fchat", "/api/v1/workspace/sales/chat"),
    ("//api//v1//workspace//sales//chat", "/api/v1/workspace/sales/chat"),
    ("/api/v1/workspace/./sales/./chat", "/api/v1/workspace/sales/chat"),
]


def test_auth_path_tricks(nginx, redis_server, backend):
    redis_server.add_key("k-sales", scopes="chat", workspaces="sales")
    n = auth_nginx(nginx, redis_server)
    body = b'{"message":"hi"}'

    for target in TRICKS_DENIED:
        backend.clear()
        status, out = raw(n, "POST", target, "k-sales", body)
        assert status in (400, 403), (target, status, out)
        assert backend.requests() == [], target

    for target, sent in TRICKS_ALLOWED:
        backend.clear()
        status, out = raw(n, "POST", target, "k-sales", body)
        assert status == 200, (target, status, out)
        seen = backend.requests()
        assert [r["path"] for r in seen] == [sent], (target, seen)

    # the query string is passed on as it came
    backend.clear()
    status, _ = raw(n, "GET", "/api/v1/workspace/sales/chats?limit=%2e%2e",
                    "k-sales")
    assert status == 403        # chats need "read"
    redis_server.add_key("k-read", scopes="read", workspaces="sales")
    status, _ = raw(n, "GET", "/api/v1/workspace/sales/chats?limit=%32",
                    "k-read")
    assert status == 200
    assert backend.requests()[-1]["path"] == \
        "/api/v1/workspace/sales/chats?limit=%32"

    # nothing about another workspace ever reached AnythingLLM
    assert not [r for r in backend.requests() if "support" in r["path"]]


def test_auth_path_malformed(nginx, redis_server, backend):
    redis_server.add_key("k-all", scopes="chat,read,documents,admin",
                         workspaces="*")
    n = auth_nginx(nginx, redis_server,
                   server="merge_slashes off;")
    for target in ("/api/v1//workspace/sales/chat",
                   "/api/v1/workspace//chat",
                   "/api/v1/workspace/sa%20les/chat",
                   "/api/v1/workspace/sa%22les/chat",
                   "/api/v1/workspace/sales%09/chat",
                   "/api/v1/",
                   "/api/v1/workspace/sales/thread/a%2fb%2f/chat"):
        backend.clear()
        status, out = raw(n, "POST", target, "k-all", b'{"message":"x"}')
        assert status == 400, (target, status, out)
        err = json.loads(out)["error"]
        assert err["code"] == "invalid_path", (target, err)
        assert backend.requests() == [], target


def test_auth_openai_locations_need_chat(nginx, redis_server, backend):
    """In an anythingllm_openai location every route needs "chat" only;
    the workspace (the body's model) is judged by the OpenAI handler."""
    redis_server.add_key("k-chat", scopes="chat", workspaces="sales")
    redis_server.add_key("k-read", scopes="read,documents,admin",
                         workspaces="*")
    n = auth_nginx(nginx, redis_server, server="""
        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }""")
    hi = {"model": "sales", "messages": [{"role": "user", "content": "hi"}]}

    r = n.get("/v1/models", headers=bearer("k-read"))
    err = assert_refused(r, 403, "insufficient_scope")
    assert '"chat"' in err["message"]
    r = n.post("/v1/chat/completions", headers=bearer("k-read"), json=hi)
    assert_refused(r, 403, "insufficient_scope")

    r = n.get("/v1/models", headers=bearer("k-chat"))
    assert r.status == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["sales"]
    r = n.post("/v1/chat/completions", headers=bearer("k-chat"), json=hi)
    assert r.status == 200, r.text
    r = n.get("/v1/models")
    assert_refused(r, 401, "invalid_api_key")


def test_auth_instance_wide_routes_need_every_workspace(nginx, redis_server,
                                                        backend):
    # an upload names its workspaces in form fields and documents are
    # shared by every workspace: a key held to some workspaces may not
    # act on the whole instance
    redis_server.add_key("k-docs-sales", scopes="documents,read,admin",
                         workspaces="sales")
    redis_server.add_key("k-docs-all", scopes="documents,read,admin",
                         workspaces="*")
    n = auth_nginx(nginx, redis_server)
    form = ("--b\r\nContent-Disposition: form-data; name=\"addToWorkspaces\""
            "\r\n\r\nsupport\r\n--b\r\nContent-Disposition: form-data; "
            "name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain"
            "\r\n\r\nhello\r\n--b--\r\n")
    ctype = {"Content-Type": "multipart/form-data; boundary=b"}

    cases = [
        ("POST", "/api/v1/document/upload", form, ctype),
        ("GET", "/api/v1/documents", None, {}),
        ("DELETE", "/api/v1/system/remove-documents",
         '{"names":["x"]}', {"Content-Type": "application/json"}),
        ("POST", "/api/v1/workspace/new", '{"name":"x"}',
         {"Content-Type": "application/json"}),
    ]
    for method, path, body, hdrs in cases:
        backend.clear()
        r = n.request(method, path, body=body,
                      headers=dict(hdrs, **bearer("k-docs-sales")))
        assert r.status == 403, (path, r.status, r.text)
        assert error_of(r)["code"] == "workspace_forbidden"
        assert backend.requests() == [], path

        r = n.request(method, path, body=body,
                      headers=dict(hdrs, **bearer("k-docs-all")))
        assert r.status == 200, (path, r.status, r.text)
        assert len(backend.requests()) == 1, path

    # the key's own workspace stays open to it
    r = n.get("/api/v1/workspace/sales", headers=bearer("k-docs-sales"))
    assert r.status == 200


def test_auth_survives_an_internal_redirect(nginx, redis_server, backend):
    # error_page sends the request to another URI after the upstream key
    # replaced the client's: it is judged again with the client's key,
    # for its new route, and counted once against the rate limit
    redis_server.add_key("k-read", scopes="read", workspaces="*", rpm=3)
    n = nginx("""
    anythingllm_redis      @REDIS@ timeout=100ms;
    anythingllm_key_cache  zone=alm_keys:1m valid=30s invalid=5s;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        location / {
            proxy_pass              http://anythingllm;
            proxy_intercept_errors  on;
            error_page 404 = /api/v1/workspaces;
        }

        location /api/v1/sub/ {
            proxy_pass              http://anythingllm;
            proxy_intercept_errors  on;
            error_page 404 = /api/v1/admin/users;
        }
    }
""", redis=redis_server)
    r = n.get("/api/v1/no-such-route", headers=bearer("k-read"))
    assert r.status == 200, r.text
    assert [w["slug"] for w in r.json()["workspaces"]]
    seen = [q["path"] for q in backend.requests()]
    assert seen == ["/api/v1/no-such-route", "/api/v1/workspaces"]
    for q in backend.requests():
        assert "k-read" not in repr(q)

    # the new route needs "admin", which this key lacks
    backend.clear()
    r = n.get("/api/v1/sub/missing", headers=bearer("k-read"))
    assert_refused(r, 403, "insufficient_scope")
    assert [q["path"] for q in backend.requests()] == ["/api/v1/sub/missing"]

    # one count per client request: 3 allowed in the minute, then 429
    # (two of the three are spent above)
    assert n.get("/api/v1/no-such-route",
                 headers=bearer("k-read")).status == 200
    r = n.get("/api/v1/no-such-route", headers=bearer("k-read"))
    assert_refused(r, 429, "rate_limit_exceeded", type_="requests")
