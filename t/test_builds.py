"""The module behaves the same whichever nginx carries it: loaded into
Debian's nginx, or compiled into one built from source (ALM_NGINX with
ALM_MODULE empty).  Compiled in, a module of the wrong type loses its
header and body filters: these tests look at what only the filters do
(CORS headers, the filtered workspace list, OpenAI-shaped errors from
upstream failures) and at the filters' place before gzip and chunked."""

import gzip
import json
import os
import subprocess

from lib import helpers
from lib.auth import bearer
from lib.paths import REPO
from lib.processes import COMPILED_IN, MODULE, NGINX_BIN


ORIGIN = "https://app.example"

# keys checked, CORS for every origin, the OpenAI routes under /v1/ and
# AnythingLLM's API under /api/v1/; %s: what a test adds to http {}
CONF = """
    anythingllm_redis  @REDIS@;
    %s

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_auth          on;
        anythingllm_cors          *;
        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        proxy_http_version        1.1;
        proxy_set_header          Connection "";
        proxy_buffering           off;

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            proxy_pass  http://anythingllm;
        }
    }
"""

GATEWAY = CONF % ""

# with gzip on for JSON
GZIP_GATEWAY = CONF % """
    gzip             on;
    gzip_min_length  1;
    gzip_types       application/json;
"""


def nginx_v():
    out = subprocess.run([NGINX_BIN, "-V"], capture_output=True, text=True)
    return out.stdout + out.stderr


def test_the_nginx_under_test_carries_the_module(nginx):
    if COMPILED_IN:
        # this pass must not quietly fall back to a loaded module
        assert "--add-module=%s" % REPO in nginx_v() or \
            "--add-module=%s/" % REPO in nginx_v()
    else:
        assert os.path.isfile(MODULE)
    n = nginx(GATEWAY)
    # a directive of the module is known: the config was accepted
    assert "anythingllm_auth" in open(n.conf_path).read()
    r = n.get("/api/v1/auth")
    assert r.status == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_gateway_filters_run(nginx, redis_server, backend):
    """CORS header, filtered workspace list and OpenAI errors: all three
    come from the module's filters."""
    redis_server.add_key("k-sales", scopes="chat,read", workspaces="sales")
    n = nginx(GATEWAY, redis=redis_server)
    hdrs = dict(bearer("k-sales"), Origin=ORIGIN)

    r = n.get("/api/v1/workspaces", headers=hdrs)
    assert r.status == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]

    r = n.get("/v1/models", headers=hdrs)
    assert r.status == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert [m["id"] for m in r.json()["data"]] == ["sales"]

    # a refusal by the module itself carries CORS as well
    r = n.get("/api/v1/workspaces", headers={"Origin": ORIGIN})
    assert r.status == 401
    assert r.headers["access-control-allow-origin"] == "*"

    # AnythingLLM gone: nginx's own 502 page becomes an OpenAI error
    backend.kill()
    n.allow(r"\[error\]")
    r = n.post("/v1/chat/completions", headers=hdrs, json={
        "model": "sales", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 502
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["type"] == "server_error"
    assert r.headers["access-control-allow-origin"] == "*"


def split_answer(raw):
    """Splits a raw HTTP/1.1 answer into its lower-cased head and its
    body, undoing chunked framing, and checks the framing is exact."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    head = head.decode("latin-1").lower()
    if "transfer-encoding: chunked" not in head:
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        assert len(rest) == length, "body and content-length differ"
        return head, rest
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert rest == b"\r\n", "bytes after the last chunk"
            return head, body
        body += rest[:size]
        assert rest[size:size + 2] == b"\r\n", "bad chunk framing"
        rest = rest[size + 2:]


def test_filters_sit_before_gzip_and_chunked(nginx, redis_server, backend):
    """The filtered list leaves through nginx's chunked encoding (the
    module's body filter runs before it); an answer the module leaves
    alone is still compressed by gzip and still carries CORS."""
    redis_server.add_key("k-sales", scopes="chat,read", workspaces="sales")
    redis_server.add_key("k-all", scopes="chat,read", workspaces="*")
    n = nginx(GZIP_GATEWAY, redis=redis_server)

    def raw(method, path, key, body=b""):
        req = ("%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               "Origin: %s\r\nAccept-Encoding: gzip\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n"
               "Connection: close\r\n\r\n"
               % (method, path, key, ORIGIN, len(body))).encode() + body
        return split_answer(helpers.raw_request("127.0.0.1", n.port, req))

    head, body = raw("GET", "/api/v1/workspaces", "k-sales")
    assert head.startswith("http/1.1 200"), head
    assert "access-control-allow-origin: *" in head
    # the module asked AnythingLLM for plain text and reads it whole;
    # the answer to the client is the filtered JSON, framed by nginx
    assert "content-encoding" not in head
    assert [w["slug"] for w in json.loads(body)["workspaces"]] == ["sales"]

    # a re-framed stream grows and shrinks on the way: nginx's chunked
    # filter frames what the module's body filter wrote
    head, body = raw("POST", "/v1/chat/completions", "k-sales", json.dumps({
        "model": "sales", "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert head.startswith("http/1.1 200"), head
    assert "transfer-encoding: chunked" in head
    assert "access-control-allow-origin: *" in head
    frames = helpers.frames_of(body.decode())
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk"
                          for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "")
                   for c in chunks if c["choices"])

    # a workspace answer passes the module's filters untouched: gzip
    # still compresses it, after the CORS header was added
    r = n.get("/api/v1/workspace/sales", headers=dict(
        bearer("k-all"), Origin=ORIGIN, **{"Accept-Encoding": "gzip"}))
    assert r.status == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.headers["access-control-allow-origin"] == "*"
    got = json.loads(gzip.decompress(r.body))
    assert got["workspace"][0]["slug"] == "sales"


def test_conf_files_check_in_the_repository_after_build():
    """conf/*.conf as their comments say to check them, with the stock
    nginx, from the repository itself (build/run/ is made by the build)."""
    for name in ("minimal.conf", "anythingllm.conf"):
        out = subprocess.run(
            ["/usr/sbin/nginx", "-t", "-p", REPO + "/", "-c",
             "conf/" + name], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "test is successful" in out.stderr


def test_the_module_builds_in_a_directory_named_with_a_dot_s(tmp_path):
    """nginx's configure turns sources into objects with seds that take
    a ".S" anywhere in an absolute path for an assembler suffix: a
    checkout or build directory such as /tmp/tmp.S1x2 must build all
    the same, and its module must load into Debian's nginx."""
    out = tmp_path / "build.S1x2"
    r = subprocess.run([os.path.join(REPO, "scripts", "build-module.sh"),
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    so = out / "ngx_http_anythingllm_module.so"
    assert so.is_file()

    conf = tmp_path / "load.conf"
    conf.write_text("load_module %s;\nerror_log stderr;\npid %s;\n"
                    "events {}\nhttp { anythingllm_redis 127.0.0.1:1; }\n"
                    % (so, tmp_path / "nginx.pid"))
    r = subprocess.run(["/usr/sbin/nginx", "-t", "-p", str(tmp_path) + "/",
                        "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


def test_calls_between_the_module_s_files_bind_inside_it():
    """scripts/build-module.sh (what make build, make run and the tests
    load) links the module so that its files call one another directly;
    a PLT slot for one of its own functions means that the flags were
    lost and every such call pays an indirect jump."""
    so = os.path.join(REPO, "build", "module",
                      "ngx_http_anythingllm_module.so")
    assert os.path.isfile(so)
    assert helpers.own_function_slots(so) == []
