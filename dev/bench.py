#!/usr/bin/python3
"""Gateway overhead against plain nginx, measured in one run: `make bench`.

A second nginx stands in for AnythingLLM with fixed answers (so the
backend is never the bottleneck), and wrk drives, one after the other:

  plain      proxy_pass only (the baseline)
  key        + anythingllm_upstream_key
  auth       + anythingllm_auth on, a cached key (no Redis round trip)
  openai     POST /v1/chat/completions, non-stream, translated
  stream     POST /v1/chat/completions, stream: true, re-framed

and prints requests per second and the ratio to the baseline.
Environment: BENCH_SECONDS (default 8), BENCH_CONNECTIONS (default 32).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(TOP, "build", "module",
                      "ngx_http_anythingllm_module.so")
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "32"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("bench: nothing listens on %d" % port)


def sse_body():
    frames = []
    for w in ["Hello", " from", " the", " bench", " backend."]:
        frames.append({"uuid": "u1", "sources": [],
                       "type": "textResponseChunk", "textResponse": w,
                       "close": False, "error": False})
    frames.append({"uuid": "u1", "type": "finalizeResponseStream",
                   "close": True, "error": False, "chatId": 1,
                   "metrics": {"prompt_tokens": 10, "completion_tokens": 5,
                               "total_tokens": 15}})
    return "".join("data: %s\n\n" % json.dumps(f) for f in frames)


def nginx_conf(work, name, body):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "logs"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = """%sload_module %s;
worker_processes 1;
error_log logs/error.log error;
pid logs/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %s/tmp;
    proxy_temp_path %s/tmp;
%s
}
""" % (user, MODULE, d, d, body)
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return d, path


def q(s):
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def backend_conf(port):
    """The stand-in AnythingLLM: fixed answers straight from nginx."""
    chat = json.dumps({"id": "x", "type": "textResponse",
                       "textResponse": "Hello from the bench backend.",
                       "sources": [], "close": True, "error": None,
                       "chatId": 1,
                       "metrics": {"prompt_tokens": 10,
                                   "completion_tokens": 5,
                                   "total_tokens": 15}})
    workspaces = json.dumps({"workspaces": [
        {"id": 1, "name": "sales", "slug": "sales",
         "createdAt": "2026-01-01T00:00:00.000Z"}]})

    return """
    server {
        listen 127.0.0.1:%d backlog=4096;
        keepalive_requests 100000;
        location = /api/v1/workspaces {
            default_type application/json;
            return 200 "%s";
        }
        location ~ /stream-chat$ {
            default_type text/event-stream;
            return 200 "%s";
        }
        location ~ /chat$ {
            default_type application/json;
            return 200 "%s";
        }
        location / {
            default_type application/json;
            return 200 "%s";
        }
    }""" % (port, q(workspaces), q(sse_body()), q(chat), q(workspaces))


def gateway_conf(redis_port, be_port, gw_port):
    """One location a case, all proxying to the same backend."""
    proxy = """
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;"""

    return """
    anythingllm_redis 127.0.0.1:%d;
    anythingllm_key_cache zone=keys:10m valid=600s;
    upstream be { server 127.0.0.1:%d; keepalive 64; }
    server {
        listen 127.0.0.1:%d backlog=4096;
        keepalive_requests 100000;
        location /plain/ { rewrite ^/plain(/.*)$ $1 break; %s }
        location /key/ {
            rewrite ^/key(/.*)$ $1 break;
            anythingllm_upstream_key UP;
            %s
        }
        location /api/v1/ {
            anythingllm_upstream_key UP;
            anythingllm_auth on;
            %s
        }
        location /v1/ {
            anythingllm_upstream_key UP;
            anythingllm_auth on;
            anythingllm_openai on;
            %s
        }
    }""" % (redis_port, be_port, gw_port, proxy, proxy, proxy, proxy)


def post_script(work, stream):
    """A wrk Lua script that POSTs a chat completion."""
    body = json.dumps({"model": "sales", "stream": stream,
                       "messages": [{"role": "user",
                                     "content": "Hello"}]})
    path = os.path.join(work, "post.lua") + (".s" if stream else ".n")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n'
                'wrk.body = "%s"\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                % q(body))
    return path


def start_stack(work, procs, redis_port, be_port, gw_port):
    """Redis with one key, the backend and the gateway; returns the
    key.  Each process started goes into procs."""
    rd = subprocess.Popen(["redis-server", "--port", str(redis_port),
                           "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", work],
                          stdout=subprocess.DEVNULL)
    procs.append(rd)
    wait_port(redis_port)

    key = "sk-alm-bench-" + "0123456789abcdef" * 2
    subprocess.run([sys.executable,
                    os.path.join(TOP, "scripts", "anythingllm-keys"),
                    "--redis", "127.0.0.1:%d" % redis_port, "create",
                    "--name", "bench", "--scopes", "chat,read",
                    "--workspaces", "*", "--key-from-stdin"],
                   input=key, text=True, check=True,
                   stdout=subprocess.DEVNULL)

    for name, body in (("backend", backend_conf(be_port)),
                       ("gateway", gateway_conf(redis_port, be_port,
                                                gw_port))):
        d, path = nginx_conf(work, name, body)
        p = subprocess.Popen(["/usr/sbin/nginx", "-p", d, "-c", path,
                              "-g", "daemon off;"])
        procs.append(p)
    wait_port(be_port)
    wait_port(gw_port)
    return key


def measure(work, base, auth):
    """Each case in turn: (name, requests per second, non-2xx count)."""
    runs = [
        ("plain", [base + "/plain/api/v1/workspaces"]),
        ("key", [base + "/key/api/v1/workspaces"]),
        ("auth", ["-H", auth, base + "/api/v1/workspace/sales"]),
        ("openai", ["-H", auth, "-s", post_script(work, False),
                    base + "/v1/chat/completions"]),
        ("stream", ["-H", auth, "-s", post_script(work, True),
                    base + "/v1/chat/completions"]),
    ]

    # warm the key cache and the upstream connections
    subprocess.run(["wrk", "-t1", "-c2", "-d1s", "-H", auth,
                    base + "/api/v1/workspace/sales"],
                   stdout=subprocess.DEVNULL)

    results = []
    for name, args in runs:
        out = subprocess.run(["wrk", "-t2", "-c%d" % CONNS,
                              "-d%ds" % SECONDS] + args,
                             capture_output=True, text=True).stdout
        rps = 0.0
        non2xx = 0
        for line in out.splitlines():
            if line.startswith("Requests/sec:"):
                rps = float(line.split()[1])
            if "Non-2xx" in line:
                non2xx = int(line.split()[-1])
        results.append((name, rps, non2xx))
    return results


def main():
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing (apt-get install wrk)")

    work = tempfile.mkdtemp(prefix="alm-bench-")
    procs = []
    be_port, gw_port, redis_port = free_port(), free_port(), free_port()

    try:
        key = start_stack(work, procs, redis_port, be_port, gw_port)
        results = measure(work, "http://127.0.0.1:%d" % gw_port,
                          "Authorization: Bearer " + key)

        basev = results[0][1] or 1.0
        print("%-8s %12s %8s %8s" % ("case", "req/s", "ratio", "non-2xx"))
        for name, rps, bad in results:
            print("%-8s %12.0f %8.2f %8d" % (name, rps, rps / basev, bad))

        if any(bad for _, _, bad in results):
            sys.exit("bench: some answers were not 2xx")

    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
