"""Hardening of the nginx glue: CORS preflights under nginx's limits,
answers the gateway rewrites never leak through conditional, range or
HEAD requests, and locations without the module pay nothing for it.

Real nginx (2 workers) with the module, real redis-server, the stand-in
AnythingLLM (which answers conditional GETs as Express does).
"""

import json
import os
import re
import subprocess

import pytest

from lib import helpers
from lib.auth import bearer
from lib.openai import openai_error
from lib.processes import UPSTREAM_KEY, free_port


ORIGIN = "https://app.example"

PREFLIGHT = {"Origin": ORIGIN,
             "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}

CONDITIONALS = ("if-none-match", "if-modified-since", "if-match",
                "if-unmodified-since", "if-range", "range")

VALIDATORS = ("etag", "last-modified", "accept-ranges", "content-range")

HTTP_DATE = "Sun, 01 Nov 2026 10:00:00 GMT"


# ---------------------------------------------------------------------------
# item 5: a CORS preflight is subject to limit_req and limit_conn

# %(limit)s and %(extra)s: the limit and a directive a test adds to both
# locations
LIMITED = """
    anythingllm_redis      @REDIS@ timeout=500ms;
    limit_req_zone   $binary_remote_addr zone=preflights:1m rate=1r/m;
    limit_conn_zone  $binary_remote_addr zone=conns:1m;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;
        anythingllm_cors          https://app.example;
        proxy_http_version        1.1;
        proxy_set_header          Connection "";

        location /v1/ {
            anythingllm_openai  on;
            %(limit)s
            %(extra)s
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            %(limit)s
            %(extra)s
            proxy_pass          http://anythingllm;
        }
    }
"""


def limited_nginx(nginx, redis_server, limit, extra=""):
    return nginx(LIMITED % {"limit": limit, "extra": extra},
                 redis=redis_server)


def assert_preflight_answered(r):
    assert r.status == 204, (r.status, r.text)
    assert r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("path", ["/api/v1/workspace/sales/chat",
                                  "/v1/chat/completions"])
@pytest.mark.parametrize("status", [None, 429])
def test_preflight_subject_to_limit_req(nginx, redis_server, backend, path,
                                        status):
    extra = "limit_req_status %d;" % status if status else ""
    n = limited_nginx(nginx, redis_server,
                      "limit_req zone=preflights;", extra)
    refused = status or 503

    # the first one passes, without a key
    r = n.request("OPTIONS", path, headers=PREFLIGHT)
    assert_preflight_answered(r)

    # one a minute, no burst: the second is limit_req's to refuse
    r = n.request("OPTIONS", path, headers=PREFLIGHT)
    assert r.status == refused, (r.status, r.text)
    assert "access-control-allow-methods" not in r.headers
    # the refusal still names the origin, so that the browser shows it
    assert r.headers["access-control-allow-origin"] == ORIGIN
    if path.startswith("/v1/"):
        openai_error(r, refused)

    assert backend.requests() == []
    assert "limiting requests" in n.error_log()


def test_preflight_subject_to_limit_conn(nginx, redis_server, backend):
    redis_server.add_key("k-held", scopes="read", workspaces="*")
    n = limited_nginx(nginx, redis_server, "limit_conn conns 1;")

    # a slow request holds the only connection slot of this client
    # (the stand-in sends its header with the first write)
    backend.script(path="/api/v1/workspaces", times=1, events=[
        {"write": '{"workspaces":'}, {"wait": "held"}, {"write": '[]}'}])
    held = n.stream("GET", "/api/v1/workspaces", headers=bearer("k-held"))
    try:
        assert held.status == 200
        backend.wait_waiting("held")

        for path in ("/api/v1/workspace/sales/chat", "/v1/chat/completions"):
            r = n.request("OPTIONS", path, headers=PREFLIGHT)
            assert r.status == 503, (path, r.status, r.text)
            assert "access-control-allow-methods" not in r.headers
            assert r.headers["access-control-allow-origin"] == ORIGIN

        backend.release("held")
        assert held.read_all() == b'{"workspaces":[]}'
    finally:
        held.close()

    # the slot is free again: the preflight is answered, with no key
    def answered():
        r = n.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
        return r if r.status == 204 else None
    assert_preflight_answered(helpers.wait_until(answered, 5))

    assert "limiting connections" in n.error_log()
    assert [q["path"] for q in backend.requests()] == ["/api/v1/workspaces"]


def test_preflight_without_limits(nginx, redis_server, backend):
    """No limit configured: every preflight is answered, with no key and
    with what the browser needs to send the request (the gateway's own
    Access-Control-* headers are not taken for AnythingLLM's); nothing
    reaches AnythingLLM; a plain OPTIONS is not a preflight."""
    n = limited_nginx(nginx, redis_server, "")
    for path in ("/api/v1/workspaces", "/v1/chat/completions") * 3:
        r = n.request("OPTIONS", path, headers=PREFLIGHT)
        assert_preflight_answered(r)
        assert r.body == b""
        assert "POST" in r.headers["access-control-allow-methods"].split(
            ", ")
        allowed = r.headers["access-control-allow-headers"].split(", ")
        assert "Authorization" in allowed and "Content-Type" in allowed
        assert r.headers["access-control-max-age"] == "86400"
        assert r.header_values("access-control-allow-origin") == [ORIGIN]
    assert backend.requests() == []
    # without Access-Control-Request-Method the key check applies
    r = n.request("OPTIONS", "/api/v1/workspaces",
                  headers={"Origin": ORIGIN})
    openai_error(r, 401)


# ---------------------------------------------------------------------------
# item 7: conditional, range and HEAD requests on rewritten answers

# %(buffering)s: proxy_buffering of both locations; %(listen)s: a second
# listen of the test over HTTP/2
REWRITE = """
    anythingllm_redis      @REDIS@ timeout=500ms;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;
        proxy_http_version        1.1;
        proxy_set_header          Connection "";
        %(listen)s

        location /v1/ {
            anythingllm_openai  on;
            proxy_buffering     %(buffering)s;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            proxy_buffering     %(buffering)s;
            proxy_pass          http://anythingllm;
        }
    }
"""


def rewrite_nginx(nginx, redis_server, buffering="off", listen=""):
    redis_server.add_key("k-sales", scopes="read,chat", workspaces="sales")
    redis_server.add_key("k-all", scopes="read,chat", workspaces="*")
    return nginx(REWRITE % {"buffering": buffering, "listen": listen},
                 redis=redis_server)


def upstream_list(backend):
    """AnythingLLM's own (unfiltered) list and its ETag."""
    r = backend.api("GET", "/api/v1/workspaces")
    assert r.status == 200
    return r.json(), r.headers["etag"]


def every_conditional(etag):
    return {"If-None-Match": etag, "If-Modified-Since": HTTP_DATE,
            "If-Match": etag, "If-Unmodified-Since": HTTP_DATE,
            "If-Range": etag, "Range": "bytes=0-99"}


def test_stand_in_answers_conditional_get_as_express(backend):
    listing, etag = upstream_list(backend)
    assert etag.startswith('W/"')
    r = backend.api("GET", "/api/v1/workspaces",
                    headers={"If-None-Match": etag})
    assert r.status == 304 and r.body == b""
    assert r.headers["etag"] == etag
    r = backend.api("HEAD", "/api/v1/workspaces",
                    headers={"If-None-Match": "*"})
    assert r.status == 304
    # another tag, or no-cache: the whole answer
    r = backend.api("GET", "/api/v1/workspaces",
                    headers={"If-None-Match": 'W/"other"'})
    assert r.status == 200 and r.json() == listing
    r = backend.api("GET", "/api/v1/workspaces",
                    headers={"If-None-Match": etag,
                             "Cache-Control": "no-cache"})
    assert r.status == 200
    # Express has no Last-Modified for JSON: If-Modified-Since alone
    # never makes an answer fresh, and Range is not served
    r = backend.api("GET", "/api/v1/workspaces",
                    headers={"If-Modified-Since": HTTP_DATE,
                             "Range": "bytes=0-9"})
    assert r.status == 200 and r.json() == listing


@pytest.mark.parametrize("buffering", ["off", "on"])
def test_filtered_list_ignores_conditionals(nginx, redis_server, backend,
                                            buffering):
    n = rewrite_nginx(nginx, redis_server, buffering)
    _, etag = upstream_list(backend)

    # what a browser or an HTTP cache sends once it holds the list: the
    # ETag of AnythingLLM's whole list must not earn a 304
    r = n.get("/api/v1/workspaces",
              headers={"If-None-Match": etag, **bearer("k-sales")})
    assert r.status == 200, (r.status, r.headers)
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]
    assert "etag" not in r.headers

    backend.clear()
    r = n.get("/api/v1/workspaces",
              headers=dict(every_conditional(etag), **bearer("k-sales")))
    assert r.status == 200, (r.status, r.text)
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]
    for h in VALIDATORS:
        assert h not in r.headers, (h, r.headers)

    # AnythingLLM was asked for the whole, unconditional answer
    seen = backend.requests()
    assert len(seen) == 1
    for h in CONDITIONALS:
        assert h not in seen[0]["headers"], (h, seen[0]["headers"])
    assert seen[0]["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY

    # each on its own too
    for name, value in every_conditional(etag).items():
        r = n.get("/api/v1/workspaces",
                  headers={name: value, **bearer("k-sales")})
        assert r.status == 200, (name, r.status)
        assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]
        assert "etag" not in r.headers


def test_unfiltered_list_keeps_conditionals(nginx, redis_server, backend):
    """Nothing is rewritten for a key allowed every workspace: AnythingLLM's
    own answer, 304 included, goes through as it is."""
    n = rewrite_nginx(nginx, redis_server)
    _, etag = upstream_list(backend)
    r = n.get("/api/v1/workspaces",
              headers={"If-None-Match": etag, **bearer("k-all")})
    assert r.status == 304
    assert r.headers["etag"] == etag
    assert backend.last_request("/api/v1/workspaces")["headers"][
        "if-none-match"] == etag


def test_head_on_filtered_list(nginx, redis_server, backend):
    n = rewrite_nginx(nginx, redis_server)
    listing, etag = upstream_list(backend)

    for headers in ({}, {"If-None-Match": etag}, {"Range": "bytes=0-9"}):
        r = n.request("HEAD", "/api/v1/workspaces",
                      headers=dict(headers, **bearer("k-sales")))
        assert r.status == 200, (headers, r.status)
        assert r.body == b""
        # neither AnythingLLM's validators nor the length of its list
        for h in VALIDATORS + ("content-length",):
            assert h not in r.headers, (headers, h, r.headers)
        assert r.headers["content-type"] == "application/json"
        seen = backend.last_request("/api/v1/workspaces")
        assert seen["method"] == "HEAD"
        for h in CONDITIONALS:
            assert h not in seen["headers"]

    # an AnythingLLM that sends Last-Modified too
    backend.script(path="/api/v1/workspaces", times=1, json=listing,
                   headers={"Last-Modified": HTTP_DATE,
                            "Accept-Ranges": "bytes"})
    r = n.request("HEAD", "/api/v1/workspaces", headers=bearer("k-sales"))
    assert r.status == 200
    for h in VALIDATORS + ("content-length",):
        assert h not in r.headers, (h, r.headers)

    # the GET that the HEAD stands for carries none either
    backend.script(path="/api/v1/workspaces", times=1, json=listing,
                   headers={"Last-Modified": HTTP_DATE,
                            "Accept-Ranges": "bytes"})
    r = n.get("/api/v1/workspaces", headers=bearer("k-sales"))
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]
    for h in VALIDATORS:
        assert h not in r.headers, (h, r.headers)


@pytest.mark.parametrize("status", [206, 304, 203])
@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/workspaces"),
    ("HEAD", "/api/v1/workspaces"),
    # HEAD on an OpenAI route is a 405 before AnythingLLM is asked
    ("GET", "/v1/models")])
def test_unrewritable_answer_is_502(nginx, redis_server, backend, status,
                                    method, path):
    """An AnythingLLM that answers a range or a condition after all: the
    answer the gateway cannot rewrite is never passed on."""
    n = rewrite_nginx(nginx, redis_server)
    listing, etag = upstream_list(backend)

    headers = {"ETag": etag, "Last-Modified": HTTP_DATE}
    if status == 206:
        headers["Content-Range"] = "bytes 0-99/2147"
    backend.script(path="/api/v1/workspaces", times=1, status=status,
                   json=listing, headers=headers)
    r = n.request(method, path, headers=bearer("k-sales"))
    assert r.status == 502, (r.status, r.headers, r.text)
    for h in VALIDATORS:
        assert h not in r.headers, (h, r.headers)
    if method == "GET":
        err = openai_error(r, 502)
        assert err["type"] == "server_error"
        assert "support" not in r.text and "engineering" not in r.text
    else:
        assert r.body == b""
    assert "AnythingLLM answered %d" % status in n.error_log()

    # the connection to AnythingLLM stays usable for the next request
    r = n.get("/api/v1/workspaces", headers=bearer("k-sales"))
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]


def test_openai_routes_drop_conditionals(nginx, redis_server, backend):
    n = rewrite_nginx(nginx, redis_server)
    _, etag = upstream_list(backend)

    # the models list is AnythingLLM's workspace list, rewritten
    for path in ("/v1/models", "/v1/models/sales"):
        backend.clear()
        r = n.get(path, headers=dict(every_conditional(etag),
                                     **bearer("k-sales")))
        assert r.status == 200, (path, r.status, r.text)
        assert "etag" not in r.headers and "last-modified" not in r.headers
        seen = backend.last_request("/api/v1/workspaces")
        for h in CONDITIONALS:
            assert h not in seen["headers"], (h, seen["headers"])
    assert [m["id"] for m in n.get("/v1/models", headers=bearer(
        "k-sales")).json()["data"]] == ["sales"]

    for stream in (False, True):
        backend.clear()
        r = n.post("/v1/chat/completions",
                   json={"model": "sales", "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]},
                   headers=dict(every_conditional(etag), **bearer("k-sales")))
        assert r.status == 200, (stream, r.status, r.text)
        assert "etag" not in r.headers
        seen = backend.last_request("/api/v1/workspace/sales/")
        assert seen["method"] == "POST"
        for h in CONDITIONALS:
            assert h not in seen["headers"], (h, seen["headers"])


def test_conditionals_dropped_anywhere_in_a_long_header_list(
        nginx, redis_server, backend):
    """nginx keeps request headers in parts of 20: conditionals first,
    last, across part boundaries and repeated are all dropped, and every
    other header reaches AnythingLLM once, in order."""
    n = rewrite_nginx(nginx, redis_server)
    _, etag = upstream_list(backend)

    conds = list(every_conditional(etag).items())
    # element 0 is Host; conditionals in the middle of the first part,
    # last in it, first in the next, Range (which may repeat) twice in a
    # row and as the very last
    at = {1: 0, 19: 1, 20: 2, 21: 3, 39: 4, 40: 5, 41: 5, 50: 5}
    headers = [("Host", "gateway.test")]
    fill = []
    for i in range(1, 51):
        if i in at:
            headers.append(conds[at[i]])
        elif i == 5:
            headers.append(("Connection", "close"))
        elif i == 10:
            headers.append(("Authorization", "Bearer k-sales"))
        else:
            fill.append("X-Fill-%02d" % i)
            headers.append((fill[-1], "v%d" % i))
    assert headers[-1] in conds

    r = n.get("/api/v1/workspaces", headers=headers)
    assert r.status == 200, r.text
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]

    seen = backend.last_request("/api/v1/workspaces")
    names = [k.lower() for k, _ in seen["raw_headers"]]
    for h in CONDITIONALS:
        assert h not in names, (h, names)
    assert [k for k in names if k.startswith("x-fill-")] == \
        [f.lower() for f in fill]
    assert names.count("authorization") == 1
    assert seen["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY
    assert seen["headers"]["x-fill-49"] == "v49"


def test_conditionals_dropped_over_http2(nginx, redis_server, backend):
    """HTTP/2 builds the same header list its own way (cookies are joined
    into one line at its end)."""
    h2 = free_port()
    n = rewrite_nginx(nginx, redis_server,
                      listen="listen  127.0.0.1:%d http2;" % h2)
    _, etag = upstream_list(backend)

    cmd = ["curl", "-sS", "--http2-prior-knowledge", "-D", "-",
           "-H", "Authorization: Bearer k-sales",
           "-H", "Cookie: a=1", "-H", "Cookie: b=2"]
    for name, value in every_conditional(etag).items():
        cmd += ["-H", "%s: %s" % (name, value)]
    for i in range(30):
        cmd += ["-H", "X-Fill-%02d: v%d" % (i, i)]
    cmd.append("http://127.0.0.1:%d/api/v1/workspaces" % h2)
    out = subprocess.run(cmd, capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), head
    assert b"etag" not in head.lower()
    assert [w["slug"] for w in json.loads(body)["workspaces"]] == ["sales"]

    seen = backend.last_request("/api/v1/workspaces")
    names = [k.lower() for k, _ in seen["raw_headers"]]
    for h in CONDITIONALS:
        assert h not in names, (h, names)
    assert [k for k in names if k.startswith("x-fill-")] == \
        ["x-fill-%02d" % i for i in range(30)]
    assert seen["headers"]["cookie"] == "a=1; b=2"
    assert seen["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY


# ---------------------------------------------------------------------------
# item 11: a location without the module costs nothing

COST = """
    server {
        listen  127.0.0.1:@PORT@;

        location /static/ {
            root  @PREFIX@/html;
        }

        location /api/v1/ {
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            proxy_pass                http://anythingllm;
        }
    }
"""

CTX_LINE = "anythingllm request context created"


def connection_lines(log, request_line):
    """The debug lines of the connection that carried request_line."""
    m = re.search(r"\*(\d+) http request line: \"%s\"" % re.escape(
        request_line), log)
    assert m, "no debug line for %r" % request_line
    tag = "*%s " % m.group(1)
    return [line for line in log.splitlines() if tag in line]


def test_location_without_module_makes_no_context(nginx, backend):
    n = nginx(COST, log_level="debug", start=False)
    os.makedirs(os.path.join(n.prefix, "html", "static"))
    with open(os.path.join(n.prefix, "html", "static", "hello.txt"),
              "w") as f:
        f.write("hello\n")
    n.start()

    r = n.get("/static/hello.txt", headers={"Origin": ORIGIN})
    assert r.status == 200 and r.body == b"hello\n"
    r = n.get("/api/v1/auth")
    assert r.status == 200

    # the debug log is written as the requests end: wait for both
    def both_logged():
        log = n.error_log()
        return log if log.count("http request line:") >= 2 and \
            log.count("http close request") >= 2 else None
    log = helpers.wait_until(both_logged, 5)

    static = connection_lines(log, "GET /static/hello.txt HTTP/1.1")
    assert static, "nothing logged for the static request"
    assert not [line for line in static if "anythingllm" in line], static

    module = connection_lines(log, "GET /api/v1/auth HTTP/1.1")
    assert [line for line in module if CTX_LINE in line], module
