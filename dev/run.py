#!/usr/bin/python3
"""A local gateway in the foreground: `make run`.

Starts redis-server (the embedded default), nginx with the module on
127.0.0.1:8080 in front of ANYTHINGLLM_URL (default
http://127.0.0.1:3001) and, when nothing answers there, the stand-in
backend from the tests.  Creates a demo key, prints it with a curl
example, and stops everything it started on Ctrl-C.

Environment:
  ANYTHINGLLM_URL       where AnythingLLM listens
  ANYTHINGLLM_API_KEY   AnythingLLM's own API key (the upstream key)
  GATEWAY_LISTEN        default 127.0.0.1:8080
  REDIS_PORT            default: 6379 when free, else a free port
  ALM_RUN_DIR           where logs and state go (default build/run)
"""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.environ.get("ALM_RUN_DIR") or os.path.join(TOP, "build", "run")
MODULE = os.path.join(TOP, "build", "module",
                      "ngx_http_anythingllm_module.so")
KEYS_TOOL = os.path.join(TOP, "scripts", "anythingllm-keys")


def port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, proc, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("run: %s exited with code %d" % (what, proc.returncode))
        if port_open(host, port):
            return
        time.sleep(0.05)
    sys.exit("run: %s did not start listening on %s:%d" % (what, host, port))


def render_conf(listen, upstream, upstream_key, redis_port):
    with open(os.path.join(TOP, "conf", "anythingllm.conf")) as f:
        text = f.read()

    paths = {
        "build/module/ngx_http_anythingllm_module.so": MODULE,
        "build/run/": RUN + "/",
    }
    for old, new in paths.items():
        text = text.replace(old, new)

    text = text.replace("worker_processes  auto;", "worker_processes  2;")
    text = text.replace("server     127.0.0.1:3001;",
                        "server     %s;" % upstream)
    text = text.replace("listen  127.0.0.1:8080;", "listen  %s;" % listen)
    text = text.replace("anythingllm_redis      127.0.0.1:6379",
                        "anythingllm_redis      127.0.0.1:%d" % redis_port)
    text = text.replace("CHANGE-ME-ANYTHINGLLM-API-KEY", upstream_key)

    if os.geteuid() == 0:
        text = "user root;\n" + text

    path = os.path.join(RUN, "nginx.conf")
    write_private(path, text)
    return path


def write_private(path, text):
    """Writes a file that holds a secret (the upstream key): created
    0600, so that no other user can read it at any moment, whatever the
    umask; O_EXCL and O_NOFOLLOW refuse a file or link put there first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def main():
    url = urllib.parse.urlsplit(
        os.environ.get("ANYTHINGLLM_URL", "http://127.0.0.1:3001"))
    if url.scheme != "http" or not url.hostname:
        sys.exit("run: ANYTHINGLLM_URL must look like http://host:port")
    be_host, be_port = url.hostname, url.port or 80

    listen = os.environ.get("GATEWAY_LISTEN", "127.0.0.1:8080")
    gw_host, gw_port = listen.rsplit(":", 1)
    gw_port = int(gw_port)

    if port_open(gw_host, gw_port):
        sys.exit("run: %s is already in use (set GATEWAY_LISTEN)" % listen)

    if os.path.isdir(RUN):
        shutil.rmtree(RUN)
    # logs and state of this run: for its user only
    os.makedirs(RUN, mode=0o700)

    procs = []

    def stop(*_):
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGQUIT if name == "nginx"
                              else signal.SIGTERM)
        for name, p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        print("\nrun: stopped " + ", ".join(n for n, _ in procs))
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    # Redis, private to this run
    redis_port = int(os.environ.get("REDIS_PORT", "0"))
    if not redis_port:
        redis_port = 6379 if not port_open("127.0.0.1", 6379) else free_port()
    redis_dir = os.path.join(RUN, "redis")
    os.makedirs(redis_dir)
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", redis_dir,
         "--logfile", os.path.join(RUN, "redis.log")])
    procs.append(("redis-server", redis))
    wait_port("127.0.0.1", redis_port, redis, "redis-server")

    # AnythingLLM, or the stand-in when nothing answers there
    upstream_key = os.environ.get("ANYTHINGLLM_API_KEY", "")
    if port_open(be_host, be_port):
        backend_note = "AnythingLLM at %s:%d" % (be_host, be_port)
        if not upstream_key:
            print("run: warning: ANYTHINGLLM_API_KEY is not set; AnythingLLM "
                  "will refuse the gateway's calls with 403")
            upstream_key = "unset-ANYTHINGLLM_API_KEY"
    else:
        if not upstream_key:
            upstream_key = "DEMO-" + secrets.token_hex(12).upper()
        backend = subprocess.Popen(
            [sys.executable, os.path.join(TOP, "t", "backend.py"),
             "--host", be_host, "--port", str(be_port),
             "--api-key", upstream_key],
            stdout=open(os.path.join(RUN, "backend.log"), "w"),
            stderr=subprocess.STDOUT)
        procs.append(("stand-in backend", backend))
        wait_port(be_host, be_port, backend, "the stand-in backend")
        backend_note = ("the stand-in backend at %s:%d (nothing answered "
                        "there)" % (be_host, be_port))

    conf = render_conf(listen, "%s:%d" % (be_host, be_port), upstream_key,
                       redis_port)

    nginx = subprocess.Popen(
        ["/usr/sbin/nginx", "-p", RUN, "-c", conf, "-e",
         os.path.join(RUN, "error.log"), "-g", "daemon off;"])
    procs.append(("nginx", nginx))
    wait_port(gw_host, gw_port, nginx, "nginx")

    out = subprocess.run(
        [sys.executable, KEYS_TOOL, "--redis", "127.0.0.1:%d" % redis_port,
         "create", "--name", "demo", "--scopes", "chat,read",
         "--workspaces", "*"],
        capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        stop()
    m = re.search(r"(sk-alm-[A-Za-z0-9_-]+)", out.stdout)
    key = m.group(1) if m else out.stdout.strip().splitlines()[0]

    base = "http://%s" % listen
    print("""
ngx_anythingllm is running on %(base)s in front of %(backend)s
redis-server on 127.0.0.1:%(redis)d, logs in %(run)s

demo key (scopes chat,read, every workspace):

    %(key)s

try:
    curl -H "Authorization: Bearer %(key)s" %(base)s/api/v1/workspaces
    curl -H "Authorization: Bearer %(key)s" %(base)s/v1/models
    curl -N -H "Authorization: Bearer %(key)s" \\
         -H "Content-Type: application/json" %(base)s/v1/chat/completions \\
         -d '{"model":"sales","stream":true,
              "messages":[{"role":"user","content":"Hello"}]}'

more keys: scripts/anythingllm-keys --redis 127.0.0.1:%(redis)d --help
Ctrl-C stops everything.""" % {"base": base, "backend": backend_note,
                              "redis": redis_port, "run": RUN, "key": key})
    sys.stdout.flush()

    while True:
        for name, p in procs:
            if p.poll() is not None:
                print("run: %s exited (code %d)" % (name, p.returncode),
                      file=sys.stderr)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
