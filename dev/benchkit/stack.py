"""The processes of a bench run: Redis with the keys, the stand-in
AnythingLLM (an nginx with fixed answers, so the backend is never the
bottleneck), the gateways under test and the key service of the
auth_request case.  Every nginx runs one worker."""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from . import answers

TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# the process helpers the tests use
sys.path.insert(0, os.path.join(TOP, "t"))
from lib import processes  # noqa: E402

UPSTREAM_KEY = "UPSTREAM-BENCH-KEY"

# the locations of a proxied request; streams need proxy_buffering off
PROXY = """
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;"""


free_port = processes.free_port


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if processes.port_open(port):
            return
        time.sleep(0.05)
    sys.exit("bench: nothing listens on %d" % port)


def raise_fd_limit(want):
    """Up to want descriptors (the hard limit bounds it), for this
    process and every process it starts; returns the limit now set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    want = min(want, hard) if hard != resource.RLIM_INFINITY else want
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def q(s):
    """A string for an nginx `return` in double quotes (the answers
    hold no "$", which would start a variable)."""
    assert "$" not in s
    return s.replace("\\", "\\\\").replace('"', '\\"').replace(
        "\n", "\\n")


def backend_conf(port, files):
    """The stand-in AnythingLLM: fixed answers straight from nginx.
    The stream is too long for a `return` string: it is a file, and a
    POST, which nginx does not serve from a file, is sent on to it as
    a GET by error_page."""
    with open(os.path.join(files, "stream.sse"), "w") as f:
        f.write("".join(answers.stream_frames()))
    return """
    server {
        listen 127.0.0.1:%d backlog=4096;
        keepalive_requests 1000000;
        open_file_cache max=16;
        location ~ ^/api/v1/workspace/[^/]+/stream-chat$ {
            error_page 405 =200 /files/stream.sse;
            root %s;
            try_files /stream.sse =404;
        }
        location /files/ {
            internal;
            alias %s/;
            default_type text/event-stream;
        }
        location ~ ^/api/v1/workspace/[^/]+/chat$ {
            default_type application/json;
            return 200 "%s";
        }
        location ~ ^/api/v1/workspace/[^/]+$ {
            default_type application/json;
            return 200 "%s";
        }
        location / {
            default_type application/json;
            return 200 "%s";
        }
    }""" % (port, files, files, q(answers.chat_answer()),
            q(answers.workspace()), q(answers.workspaces()))


def gateway_conf(redis_port, be_port, ks_port, port, valid, extra=""):
    """One location a case, all proxying to the same backend.  The
    key cache zone and the metrics zone are the http level's, so the
    uncached case (valid=0) and the metrics case (extra: the metrics
    zone) have gateways of their own, otherwise identical."""
    return """
    anythingllm_redis 127.0.0.1:%d;
    anythingllm_key_cache zone=keys:10m valid=%s;
    %s
    upstream be { server 127.0.0.1:%d; keepalive 64; }
    upstream keysvc { server 127.0.0.1:%d; keepalive 64; }
    server {
        listen 127.0.0.1:%d backlog=4096;
        keepalive_requests 1000000;
        location /plain/ { rewrite ^/plain(/.*)$ $1 break; %s }
        location /key/ {
            rewrite ^/key(/.*)$ $1 break;
            anythingllm_upstream_key %s;
            %s
        }
        location /api/v1/ {
            anythingllm_upstream_key %s;
            anythingllm_auth on;
            %s
        }
        location /v1/ {
            anythingllm_upstream_key %s;
            anythingllm_auth on;
            anythingllm_openai on;
            %s
        }

        # the way without this module: nginx asks a key service
        location /ar/ {
            rewrite ^/ar(/.*)$ $1 break;
            auth_request /_keycheck;
            proxy_set_header Authorization "Bearer %s";
            %s
        }
        location = /_keycheck {
            internal;
            proxy_pass http://keysvc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $uri;
            proxy_set_header X-Original-Method $request_method;
        }
    }""" % (redis_port, valid, extra, be_port, ks_port, port,
            PROXY, UPSTREAM_KEY, PROXY, UPSTREAM_KEY, PROXY,
            UPSTREAM_KEY, PROXY, UPSTREAM_KEY, PROXY)


class Stack:
    """Processes started for the run, stopped in reverse order."""

    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="alm-bench-")
        self.procs = []

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p):
        processes.stop_process(p, 10)
        if p in self.procs:
            self.procs.remove(p)

    def close(self):
        for p in reversed(list(self.procs)):
            self.stop(p)
        shutil.rmtree(self.work, ignore_errors=True)

    def nginx(self, name, body, connections=4096, nofile=None,
              module=True, workers=1):
        """Starts an nginx with one worker, the module loaded (the
        tests' ALM_NGINX and ALM_MODULE apply); returns its process
        (the master, in the foreground)."""
        d = os.path.join(self.work, name)
        os.makedirs(os.path.join(d, "logs"))
        head = "user root;\n" if os.geteuid() == 0 else ""
        if nofile:
            head += "worker_rlimit_nofile %d;\n" % nofile
        if module:
            head += processes.load_module_line() + "\n"
        conf = """%sworker_processes %d;
error_log logs/error.log error;
pid logs/nginx.pid;
events { worker_connections %d; }
http {
    access_log off;
    client_body_temp_path %s/tmp;
    proxy_temp_path %s/tmp;
%s
}
""" % (head, workers, connections, d, d, body)
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        return self.spawn([processes.NGINX_BIN, "-p", d, "-c", path,
                           "-g", "daemon off;"])

    def redis(self):
        port = free_port()
        self.spawn([processes.REDIS_BIN, "--port", str(port),
                    "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self.work],
                   stdout=subprocess.DEVNULL)
        wait_port(port)
        for key, name, rpm in ((answers.KEY, "bench", 0),
                               (answers.RPM_KEY, "bench-rpm",
                                answers.RPM)):
            out = subprocess.run([sys.executable,
                                  os.path.join(TOP, "scripts",
                                               "anythingllm-keys"),
                                  "--redis", "127.0.0.1:%d" % port,
                                  "create", "--name", name,
                                  "--scopes", "chat,read",
                                  "--workspaces", "*", "--rpm", str(rpm),
                                  "--key-from-stdin"],
                                 input=key, text=True,
                                 capture_output=True)
            if out.returncode != 0:
                sys.exit("bench: creating a key failed: " + out.stderr)
        return port

    def keysvc(self, redis_port):
        port = free_port()
        self.spawn([sys.executable, "-m", "benchkit.keysvc",
                    str(port), "127.0.0.1:%d" % redis_port],
                   cwd=os.path.dirname(os.path.dirname(
                       os.path.abspath(__file__))))
        wait_port(port)
        return port

    def start(self):
        """Redis, the backend, the key service and both gateways;
        returns the ports as a dict."""
        ports = {"redis": self.redis(), "be": free_port(),
                 "gw": free_port(), "nocache": free_port(),
                 "metrics": free_port()}
        ports["keysvc"] = self.keysvc(ports["redis"])
        files = os.path.join(self.work, "answers")
        os.makedirs(files)
        self.nginx("backend", backend_conf(ports["be"], files),
                   module=False)
        for name, valid, extra in (
                ("gw", "600s", ""), ("nocache", "0", ""),
                ("metrics", "600s", "anythingllm_metrics_zone 1m;")):
            self.nginx(name, gateway_conf(ports["redis"], ports["be"],
                                          ports["keysvc"], ports[name],
                                          valid, extra))
        for p in ports.values():
            wait_port(p)
        return ports


worker_pids = processes.worker_pids


def rss_kib(pids):
    """The summed resident memory of pids, in KiB."""
    total = 0
    for pid in pids:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total
