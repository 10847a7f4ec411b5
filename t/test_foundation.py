"""The first slice: the module loads into the stock nginx, its
configurations check, the upstream key replaces whatever the client
sent, and streams pass through unbuffered."""

import glob
import os
import re
import shutil
import subprocess

import pytest

from lib.paths import REPO
from lib.processes import (ASAN, COMPILED_IN, MODULE, NGINX_BIN,
                           UPSTREAM_KEY)


# the upstream key set on every AnythingLLM route
CONF = """
    server {
        listen  127.0.0.1:@PORT@;

        location /api/v1/ {
            anythingllm_upstream_key UPSTREAM-KEY-0001-TEST;
            proxy_pass http://anythingllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
"""


def frame(obj):
    import json
    return {"write": "data: " + json.dumps(obj) + "\n\n"}


def chunk(text, close=False):
    return frame({"uuid": "u1", "sources": [], "type": "textResponseChunk",
                  "textResponse": text, "close": close, "error": False})


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "conf",
                                                         "*.conf"))))
def test_each_conf_file_passes_nginx_t(name, tmp_path):
    # the files name the module and their logs relative to the prefix
    prefix = tmp_path / "prefix"
    (prefix / "build" / "module").mkdir(parents=True)
    (prefix / "build" / "run").mkdir(parents=True)
    (prefix / "conf").mkdir()
    with open(os.path.join(REPO, "conf", name)) as f:
        text = f.read()
    if COMPILED_IN:
        # an nginx with the module compiled in refuses to load it again
        text = re.sub(r"(?m)^load_module .*ngx_http_anythingllm_module"
                      r"\.so;$", "", text)
    else:
        shutil.copy(MODULE, prefix / "build" / "module")
    with open(prefix / "conf" / name, "w") as f:
        f.write(text)

    env = dict(os.environ)
    if ASAN:
        env["LD_PRELOAD"] = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"], capture_output=True,
            text=True).stdout.strip()
        env["ASAN_OPTIONS"] = "detect_leaks=0"

    out = subprocess.run([NGINX_BIN, "-t", "-p", str(prefix), "-c",
                          "conf/" + name, "-e", str(tmp_path / "err.log")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
    assert "Sanitizer" not in out.stderr


def test_conf_files_exist():
    names = [os.path.basename(p) for p in
             glob.glob(os.path.join(REPO, "conf", "*.conf"))]
    assert "anythingllm.conf" in names and "minimal.conf" in names


@pytest.mark.parametrize("directive,message", [
    ("anythingllm_redis localhost:6379;", "IPv4 literal or a unix socket"),
    ("anythingllm_redis 127.0.0.1:0;", "invalid redis port"),
    ("anythingllm_redis 127.0.0.1:6379 bogus=1;", "invalid parameter"),
    ("anythingllm_key_cache valid=5s;", "must have \"zone\" parameter"),
    ("anythingllm_key_cache zone=k:1k;", "is too small"),
    ("anythingllm_chat_mode sometimes;", "invalid value"),
])
def test_bad_directives_are_refused_at_config_time(nginx, directive,
                                                   message):
    n = nginx(directive + CONF, start=False)
    n.allow(r"\[emerg\]")
    ok, out = n.test_config()
    assert not ok
    assert message in out


def test_upstream_key_replaces_client_key(nginx, backend):
    n = nginx(CONF)
    r = n.get("/api/v1/workspaces",
              headers={"Authorization": "Bearer client-secret-123"})
    assert r.status == 200
    assert [w["slug"] for w in r.json()["workspaces"]]

    seen = backend.last_request("/api/v1/workspaces")
    assert seen["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY
    for req in backend.requests():
        assert "client-secret-123" not in repr(req)


def test_upstream_key_added_when_client_sent_none(nginx, backend):
    n = nginx(CONF)
    r = n.get("/api/v1/auth")
    assert r.status == 200
    assert r.json() == {"authenticated": True}
    seen = backend.last_request("/api/v1/auth")
    assert seen["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY


def test_without_the_module_the_backend_refuses(nginx, backend):
    # the proof that the key above came from the module
    n = nginx("""
    server {
        listen  127.0.0.1:@PORT@;

        location /api/v1/ {
            proxy_pass http://anythingllm;
        }
    }
""")
    r = n.get("/api/v1/workspaces",
              headers={"Authorization": "Bearer client-secret-123"})
    assert r.status == 403
    assert r.json() == {"error": "No valid api key found."}


def test_upstream_key_per_location(nginx, backend):
    n = nginx("""
    server {
        listen  127.0.0.1:@PORT@;

        location /api/v1/ {
            anythingllm_upstream_key UPSTREAM-KEY-0001-TEST;
            proxy_pass http://anythingllm;
        }

        location /api/v1/auth {
            anythingllm_upstream_key WRONG-KEY;
            proxy_pass http://anythingllm;
        }
    }
""")
    assert n.get("/api/v1/workspaces").status == 200
    r = n.get("/api/v1/auth")
    assert r.status == 403
    assert backend.last_request("/api/v1/auth")["headers"][
        "authorization"] == "Bearer WRONG-KEY"


def test_post_body_passes_with_injected_key(nginx, backend):
    n = nginx(CONF)
    r = n.post("/api/v1/workspace/sales/chat",
               json={"message": "hi there", "mode": "chat",
                     "sessionId": "s1"},
               headers={"Authorization": "Bearer whatever"})
    assert r.status == 200, r.text
    assert r.json()["textResponse"].startswith("Echo: hi there")


def test_stream_reaches_client_frame_by_frame(nginx, backend):
    n = nginx(CONF)
    backend.script([
        chunk("one "), {"wait": "a"},
        chunk("two "), {"wait": "b"},
        chunk("three", close=True),
    ])
    s = n.stream("POST", "/api/v1/workspace/sales/stream-chat",
                 json={"message": "count", "mode": "chat"})
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")

    import json
    f1 = s.next_frame(timeout=5)
    assert json.loads(f1)["textResponse"] == "one "
    # the backend is still holding the rest: this frame was not buffered
    backend.wait_waiting("a")
    backend.release("a")

    f2 = s.next_frame(timeout=5)
    assert json.loads(f2)["textResponse"] == "two "
    backend.wait_waiting("b")
    backend.release("b")

    f3 = s.next_frame(timeout=5)
    assert json.loads(f3)["close"] is True
    s.read_all()
    assert s.done
    s.close()


def test_auth_without_upstream_key_is_refused(nginx):
    # the client's key would otherwise travel on to AnythingLLM
    n = nginx("""
    anythingllm_redis  127.0.0.1:9;

    server {
        listen  127.0.0.1:@PORT@;

        location /api/v1/ {
            anythingllm_auth on;
            proxy_pass http://anythingllm;
        }
    }
""", start=False)
    n.allow(r"\[emerg\]")
    ok, out = n.test_config()
    assert not ok
    assert "needs \"anythingllm_upstream_key\"" in out


def test_cors_headers_are_not_doubled(nginx, backend):
    # the backend sends Access-Control-Allow-Origin of its own on streams
    n = nginx("anythingllm_cors  https://app.example;" + CONF)
    backend.script([chunk("hi", close=True)],
                   headers={"Access-Control-Allow-Origin": "*"})
    s = n.stream("POST", "/api/v1/workspace/sales/stream-chat",
                 json={"message": "x"})
    origins = [v for k, v in s.raw_headers
               if k.lower() == "access-control-allow-origin"]
    assert origins == ["https://app.example"]
    s.read_all()
    s.close()

    r = n.get("/api/v1/workspaces")
    assert r.header_values("access-control-allow-origin") == [
        "https://app.example"]


def test_readme_lists_every_directive_and_variable():
    import re
    with open(os.path.join(REPO, "ngx_anythingllm_module",
                           "ngx_http_anythingllm_module.c")) as f:
        src = f.read()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    names = set(re.findall(r'ngx_string\("(anythingllm_\w+)"\)', src))
    directives = {n for n in names if "`" + n + " " in readme}
    variables = {n for n in names if "`$" + n + "`" in readme}
    assert len(names) >= 17, names
    # each is documented, as a directive (with its syntax) or a variable
    assert names - directives - variables == set()
