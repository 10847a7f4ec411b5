"""The real processes a test runs: redis-server, the AnythingLLM
stand-in (t/backend.py) and nginx with the module.

Environment:
    ALM_MODULE     the module .so
                   (default build/module/ngx_http_anythingllm_module.so);
                   empty when ALM_NGINX has the module compiled in: no
                   load_module line then
    ALM_ASAN=1     run nginx with libasan preloaded and scan its reports,
                   leaks included (ALM_LEAKS=0 turns leak checks off;
                   t/lsan.supp lists nginx's own)
    ALM_NGINX      the nginx binary (default /usr/sbin/nginx); one built
                   from source runs the same way: every path it needs
                   is set in the rendered config or under its -p prefix
    ALM_REDIS      the redis-server binary (default /usr/bin/redis-server)
"""

import collections
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

from lib import helpers, paths, resp


UPSTREAM_KEY = "UPSTREAM-KEY-0001-TEST"
PREFIX = "anythingllm:"

NGINX_BIN = os.environ.get("ALM_NGINX", "/usr/sbin/nginx")
REDIS_BIN = os.environ.get("ALM_REDIS", "/usr/bin/redis-server")
MODULE = os.environ.get(
    "ALM_MODULE",
    os.path.join(paths.REPO, "build", "module",
                 "ngx_http_anythingllm_module.so"))
# the module is part of the nginx binary (--add-module)
COMPILED_IN = MODULE == ""
ASAN = os.environ.get("ALM_ASAN") == "1"

BAD_LOG = re.compile(r"\[(alert|emerg|crit)\]|Sanitizer|runtime error:"
                     r"|LeakSanitizer")


# Ports handed out lately: a port is often chosen well before its
# process binds it (a Sentinel group picks five at once), and the kernel
# may offer a port again as soon as the probe socket is closed.
_handed = collections.deque(maxlen=4096)


def free_port():
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in _handed:
            _handed.append(port)
            return port


def port_open(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def key_digest(key):
    if isinstance(key, str):
        key = key.encode()
    return hashlib.sha256(key).hexdigest()


def module_available():
    return COMPILED_IN or os.path.exists(MODULE)


def load_module_line():
    """The main-context line that brings the module in, if any."""
    return "" if COMPILED_IN else "load_module %s;" % MODULE


def running(p):
    """For a fixture: starts p (a RedisServer, a Backend), yields it, and
    stops it afterwards."""
    p.start()
    yield p
    p.stop()


def stop_process(proc, timeout=5):
    """terminate(), then kill() when it does not end in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_process(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def read_file(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def worker_pids(master):
    """The live worker processes of an nginx master."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == master and \
                b"worker process" in cmdline and fields[0] != "Z":
            out.append(int(d))
    return sorted(out)


def stack_parts(name):
    """For a stack run outside pytest (t/stack.py, t/soak.py): a fresh
    work folder, its redis/backend/nginx folders, and the RedisServer
    and Backend to start in them."""
    work = tempfile.mkdtemp(prefix="alm-%s-" % name)
    dirs = {}
    for d in ("redis", "backend", "nginx"):
        dirs[d] = os.path.join(work, d)
        os.makedirs(dirs[d])
    return work, dirs, RedisServer(dirs["redis"]), Backend(dirs["backend"])


class Service:
    """A process of its own on 127.0.0.1, in its own folder, logging to
    a file there."""

    def __init__(self, tmpdir, log_name, port=None):
        self.dir = str(tmpdir)
        self.host = "127.0.0.1"
        self.port = port
        self.proc = None
        self.log_path = os.path.join(self.dir, log_name)

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    def stop(self):
        stop_process(self.proc)

    def kill(self):
        """Stops it at once (SIGKILL): its connections drop, its port
        refuses."""
        kill_process(self.proc)

    def log(self):
        return read_file(self.log_path)


# ---------------------------------------------------------------------------
# Redis


class RedisServer(Service):
    def __init__(self, tmpdir, prefix=PREFIX):
        super().__init__(tmpdir, "redis.log", free_port())
        self.unix_path = os.path.join(self.dir, "redis.sock")
        self.prefix = prefix
        self.client = None

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--save", "", "--appendonly", "no",
             "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--unixsocket", self.unix_path,
             "--unixsocketperm", "777", "--enable-debug-command", "yes",
             "--logfile", self.log_path, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.dir)
        deadline = time.monotonic() + 10
        while True:
            try:
                c = resp.connect(self.host, self.port, timeout=1)
                if c.cmd("PING") == "PONG":
                    self.client = c
                    return
                c.close()
            except (resp.Failure, resp.RedisError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: %s" % self.log())
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)

    def _drop_client(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def stop(self):
        self._drop_client()
        super().stop()

    def kill(self):
        self._drop_client()
        super().kill()

    def connect(self):
        return resp.connect(self.host, self.port)

    @contextlib.contextmanager
    def refusing_writes(self):
        """Within: every write that needs memory, a script's first
        included, is refused with OOM (maxmemory 1, noeviction)."""
        self.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
        self.cmd("CONFIG", "SET", "maxmemory", "1")
        try:
            yield
        finally:
            self.cmd("CONFIG", "SET", "maxmemory", "0")

    def cmd(self, *args):
        if self.client is None:
            self.client = self.connect()
        try:
            return self.client.cmd(*args)
        except resp.Failure:
            self._drop_client()
            raise

    def sleep(self, seconds):
        """DEBUG SLEEP in the background: Redis stops answering meanwhile.
        Returns the thread (join() it to wait for the end)."""
        connected = threading.Event()

        def run():
            c = resp.connect(self.host, self.port, timeout=seconds + 10)
            connected.set()
            try:
                c.cmd("DEBUG", "SLEEP", str(seconds))
            finally:
                c.close()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert connected.wait(5), "no connection for DEBUG SLEEP"
        # back only once Redis is asleep: a PING then goes unanswered
        deadline = time.monotonic() + min(seconds, 2.0) / 2
        while time.monotonic() < deadline:
            try:
                p = resp.connect(self.host, self.port, timeout=0.05)
            except resp.Failure:
                break
            try:
                p.cmd("PING")
            except (resp.Failure, OSError):
                break
            finally:
                p.close()
            time.sleep(0.005)
        return t

    def key_name(self, key=None, digest=None, prefix=None):
        return "%skey:%s" % (self.prefix if prefix is None else prefix,
                             digest or key_digest(key))

    def add_key(self, key, name="k", scopes="chat,read", workspaces="*",
                rpm=0, expires=0, disabled=0, prefix=None, **extra):
        """Stores a key as anythingllm-keys would; returns its digest."""
        digest = key_digest(key)
        fields = {"name": name, "scopes": scopes, "workspaces": workspaces,
                  "rpm": rpm, "expires": int(expires), "disabled": disabled,
                  "created": int(time.time())}
        fields.update(extra)
        self.cmd("DEL", self.key_name(digest=digest, prefix=prefix))
        self.cmd("HSET", self.key_name(digest=digest, prefix=prefix),
                 *flat(fields))
        return digest

    def update_key(self, key, prefix=None, **fields):
        return self.cmd("HSET", self.key_name(key, prefix=prefix),
                        *flat(fields))

    def revoke(self, key, prefix=None):
        digest = key_digest(key)
        p = self.prefix if prefix is None else prefix
        self.cmd("DEL", self.key_name(digest=digest, prefix=prefix))
        return self.cmd("PUBLISH", p + "revocations", digest)

    def hgetall(self, name):
        pairs = self.cmd("HGETALL", name) or []
        return {pairs[i].decode(): pairs[i + 1].decode()
                for i in range(0, len(pairs), 2)}

    def subscribe(self, channel):
        """A separate connection subscribed to channel; .reply() reads."""
        c = self.connect()
        c.cmd("SUBSCRIBE", channel)
        return c


def flat(fields):
    """{"a": 1, "b": 2} -> ["a", 1, "b", 2], for HSET."""
    out = []
    for k, v in fields.items():
        out += [k, v]
    return out


# ---------------------------------------------------------------------------
# the AnythingLLM stand-in


class Backend(Service):
    def __init__(self, tmpdir, api_key=UPSTREAM_KEY, workspaces=None,
                 keepalive_timeout=None):
        super().__init__(tmpdir, "backend.log")
        self.api_key = api_key
        self.workspaces = workspaces
        self.keepalive_timeout = keepalive_timeout

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self):
        cmd = [paths.PYTHON, paths.BACKEND, "--host", self.host,
               "--port", str(self.port or 0), "--api-key", self.api_key]
        if self.workspaces is not None:
            cmd += ["--workspaces", self.workspaces]
        if self.keepalive_timeout is not None:
            cmd += ["--keepalive-timeout", str(self.keepalive_timeout)]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        # python and aiohttp start slowly on a loaded machine
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"listening on [\d.]+:(\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError("backend exited: %s" % self.log())
            if time.monotonic() > deadline:
                raise RuntimeError("backend did not start: %s" % self.log())
            time.sleep(0.02)

    def restart(self):
        """Starts again on the same port."""
        self.stop()
        self.start()

    # control API

    def _call(self, method, path, obj=None):
        r = helpers.request(method, self.url + path, json=obj, timeout=10)
        if r.status != 200:
            raise RuntimeError("backend control %s %s: %d %s"
                               % (method, path, r.status, r.text))
        return r.json()

    def reset(self):
        return self._call("POST", "/__test/reset")

    def requests(self, path=None, method=None):
        """Requests received (oldest first); path filters by prefix of the
        path without the query."""
        out = self._call("GET", "/__test/requests")
        if path is not None:
            out = [r for r in out if r["path"].split("?")[0].startswith(path)]
        if method is not None:
            out = [r for r in out if r["method"] == method]
        return out

    def last_request(self, path=None, method=None):
        reqs = self.requests(path, method)
        return reqs[-1] if reqs else None

    def clear(self):
        return self._call("DELETE", "/__test/requests")

    def script(self, events=None, **kw):
        """Scripts the next chat/stream-chat answer; see t/backend.py."""
        sc = dict(kw)
        if events is not None:
            sc["events"] = events
        return self._call("POST", "/__test/script", sc)

    def clear_scripts(self):
        return self._call("DELETE", "/__test/script")

    def release(self, name):
        return self._call("POST", "/__test/release/%s"
                          % urllib.parse.quote(name, safe=""))

    def connections(self):
        """{"open", "accepted", "streams", "inflight", "aborted_streams",
        "aborted", "completed_streams", ...}: "open" and "accepted" count
        connections that carried API requests, not control calls."""
        return self._call("GET", "/__test/connections")

    def state(self):
        return self._call("GET", "/__test/state")

    def wait_waiting(self, name, timeout=5):
        """Waits until a stream sits at {"wait": name}."""
        return helpers.wait_until(
            lambda: name in self.state()["waiting"], timeout,
            message="backend never reached wait %r" % name)

    def wait_connections(self, open=None, streams=None, aborted=None,
                         timeout=5):
        def ok():
            c = self.connections()
            if open is not None and c["open"] != open:
                return None
            if streams is not None and c["streams"] != streams:
                return None
            if aborted is not None and c["aborted_streams"] < aborted:
                return None
            return c
        return helpers.wait_until(ok, timeout, message=(
            "backend connections never reached open=%r streams=%r "
            "aborted=%r: %r" % (open, streams, aborted, self.connections())))

    def api(self, method, path, json=None, key=None, **kw):
        """Direct call to the stand-in with the upstream key."""
        headers = dict(kw.pop("headers", {}) or {})
        headers.setdefault("Authorization",
                           "Bearer %s" % (key or self.api_key))
        return helpers.request(method, self.url + path, json=json,
                               headers=headers, **kw)


# ---------------------------------------------------------------------------
# nginx

LOG_FORMAT_MODULE = (
    "log_format alm '$remote_addr [$time_local] \"$request\" $status "
    "$body_bytes_sent rt=$request_time ua=\"$upstream_addr\" "
    "us=$upstream_status key_name=\"$anythingllm_key_name\" "
    "key_id=$anythingllm_key_id auth=$anythingllm_auth_result "
    "ws=$anythingllm_workspace pt=$anythingllm_prompt_tokens "
    "ct=$anythingllm_completion_tokens';")

LOG_FORMAT_PLAIN = (
    "log_format alm '$remote_addr [$time_local] \"$request\" $status "
    "$body_bytes_sent rt=$request_time ua=\"$upstream_addr\" "
    "us=$upstream_status';")

# The frame every test's configuration sits in: the test's own text (its
# http-level directives and its server blocks) goes where @CONF@ is.
# "upstream anythingllm" is the stand-in (or the upstream= address).
FRAME = """\
@USER@
@LOAD_MODULE@
worker_processes @WORKERS@;
master_process on;
daemon off;
error_log logs/error.log @LOG_LEVEL@;
pid logs/nginx.pid;
@MAIN@

events {
    worker_connections 1024;
@EVENTS@
}

http {
    @LOG_FORMAT@
    access_log logs/access.log alm;

    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;

    upstream anythingllm {
        server @BACKEND@;
        keepalive 8;
        keepalive_timeout 4s;
    }

@CONF@
}
"""


class Nginx:
    """One nginx.  conf is the test's text inside http {}: in it
    @PORT@ (this nginx's port), @BACKEND@ (host:port of the stand-in),
    @REDIS@ (host:port of Redis) and @PREFIX@ are filled in.  params:
    workers (2), module (True), main, events, log_format, log_level
    ("debug"), user (True: "user root" when run as root)."""

    def __init__(self, prefix, conf, params, backend_addr, redis_addr):
        self.prefix = str(prefix)
        self.conf = conf
        self.params = dict(params)
        self.backend_addr = backend_addr
        self.redis_addr = redis_addr
        self.port = params.get("port") or free_port()
        self.proc = None
        self.allowed = []
        for d in ("logs", "tmp", "conf"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        self.conf_path = os.path.join(self.prefix, "nginx.conf")
        self.error_path = os.path.join(self.prefix, "logs", "error.log")
        self.access_path = os.path.join(self.prefix, "logs", "access.log")

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    @property
    def workers(self):
        return int(self.params.get("workers", 2))

    def render(self):
        p = self.params
        module = p.get("module", True)
        user = "user root;" if (os.geteuid() == 0 and p.get("user", True)) \
            else ""
        text = FRAME
        for k, v in (
                ("@USER@", user),
                ("@LOAD_MODULE@", load_module_line() if module else ""),
                ("@WORKERS@", str(self.workers)),
                ("@LOG_LEVEL@", p.get("log_level", "debug")),
                ("@MAIN@", p.get("main", "")),
                ("@EVENTS@", p.get("events", "")),
                ("@LOG_FORMAT@", p.get("log_format") or (
                    LOG_FORMAT_MODULE if module else LOG_FORMAT_PLAIN)),
                ("@CONF@", self.conf),
                ("@BACKEND@", self.backend_addr or "127.0.0.1:9"),
                ("@REDIS@", self.redis_addr or "127.0.0.1:9"),
                ("@PORT@", str(self.port)),
                ("@PREFIX@", self.prefix)):
            text = text.replace(k, v)
        with open(self.conf_path, "w") as f:
            f.write(text)
        return text

    def env(self):
        env = dict(os.environ)
        if ASAN:
            lib = subprocess.run(["gcc", "-print-file-name=libasan.so"],
                                 capture_output=True, text=True).stdout.strip()
            env["LD_PRELOAD"] = lib
            env["ASAN_OPTIONS"] = (
                "detect_leaks=%s:abort_on_error=0:log_path=%s"
                % (os.environ.get("ALM_LEAKS", "1"),
                   os.path.join(self.prefix, "logs", "asan")))
            env["LSAN_OPTIONS"] = "suppressions=%s" % os.path.join(
                paths.T, "lsan.supp")
            env["UBSAN_OPTIONS"] = "print_stacktrace=1"
        return env

    def command(self, *extra):
        return [NGINX_BIN, "-p", self.prefix + "/", "-c", self.conf_path,
                "-e", self.error_path] + list(extra)

    def test_config(self):
        """Runs nginx -t on the rendered config: (ok, output)."""
        self.render()
        r = subprocess.run(self.command("-t"), capture_output=True,
                           text=True, env=self.env())
        return r.returncode == 0, r.stdout + r.stderr + self.error_log()

    def start(self, timeout=10):
        self.render()
        with open(os.path.join(self.prefix, "logs", "stderr.log"),
                  "a") as err:
            self.proc = subprocess.Popen(self.command(), env=self.env(),
                                         stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited (%d):\n%s" % (
                    self.proc.returncode, self.error_log()[-4000:]))
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not listen:\n%s"
                                   % self.error_log()[-4000:])
            time.sleep(0.02)
        helpers.wait_until(lambda: len(self.worker_pids()) >= self.workers,
                           timeout, message="nginx workers did not start")
        return self

    @property
    def master_pid(self):
        return self.proc.pid if self.proc else None

    def worker_pids(self):
        if self.proc is None:
            return []
        return worker_pids(self.proc.pid)

    def reload(self, conf=None, timeout=10):
        """Renders the config again (conf, when given, replaces the
        test's text) and sends HUP; returns when the new workers run.
        Raises when nginx refuses the config."""
        if conf is not None:
            self.conf = conf
        old = set(self.worker_pids())
        before = len(self.error_log())
        self.render()
        self.proc.send_signal(signal.SIGHUP)

        def done():
            log = self.error_log()[before:]
            if "[emerg]" in log:
                raise RuntimeError("reload refused:\n" + log[-3000:])
            new = set(self.worker_pids()) - old
            if len(new) < self.workers:
                return False
            # old workers must have stopped accepting
            for pid in old:
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        title = f.read()
                except OSError:
                    continue
                if b"worker process" in title and \
                        b"shutting down" not in title:
                    return False
            return True
        helpers.wait_until(done, timeout, message="reload did not finish")
        return self

    def stop(self, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        stop_process(self.proc)

    def kill_worker(self, sig=signal.SIGKILL):
        pids = self.worker_pids()
        os.kill(pids[0], sig)
        return pids[0]

    def error_log(self):
        return read_file(self.error_path)

    def access_log(self):
        return read_file(self.access_path)

    def access_lines(self):
        return [l for l in self.access_log().splitlines() if l.strip()]

    def asan_log(self):
        out = []
        logs = os.path.join(self.prefix, "logs")
        for name in sorted(os.listdir(logs)):
            if name.startswith("asan"):
                out.append(read_file(os.path.join(logs, name)))
        return "\n".join(out)

    def allow(self, pattern):
        """Lets error-log lines matching this regex pass the final check."""
        self.allowed.append(re.compile(pattern))

    def bad_lines(self):
        lines = self.error_log().splitlines()
        lines += read_file(os.path.join(self.prefix, "logs",
                                        "stderr.log")).splitlines()
        lines += self.asan_log().splitlines()
        return [l for l in lines if BAD_LOG.search(l)
                and not any(a.search(l) for a in self.allowed)]

    # requests through this nginx

    def request(self, method, path, **kw):
        return helpers.request(method, self.url + path, **kw)

    def get(self, path, **kw):
        return helpers.request("GET", self.url + path, **kw)

    def post(self, path, json=None, **kw):
        return helpers.request("POST", self.url + path, json=json, **kw)

    def stream(self, method, path, **kw):
        return helpers.StreamReader(method, self.url + path, **kw)
