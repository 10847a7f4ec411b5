#!/usr/bin/python3
"""Soak test: minutes of mixed traffic through the whole gateway.

    make soak                       (SOAK_SECONDS=600 by default)
    SOAK_SECONDS=120 t/soak.py      a shorter run
    ALM_ASAN=1 ALM_MODULE=build/asan/... t/soak.py   under ASan

Starts redis-server, the AnythingLLM stand-in and nginx with two workers
and the full gateway configuration (the processes of the pytest
fixtures, t/lib/processes.py, and the gateway of t/lib/gateway.py), then
runs SOAK_THREADS clients for SOAK_SECONDS, each picking at random
among:

    cached       GET /v1/models and /api/v1/workspaces with keys in use
                 all the time (found in the shared cache)
    uncached     a key just written to Redis, used once (looked up) or
                 an unknown one (401)
    limited      a key with rpm 30, far over it (200 or 429)
    chat         OpenAI chat completions on both base paths, non-stream
    stream       the same streamed, read to [DONE]; some fail upstream
                 (an error frame then [DONE])
    leave        streams and non-streams the client leaves half way,
                 by close or by RST
    refused      no key, wrong scope, foreign workspace, bad body,
                 unknown route

Meanwhile, at fixed fractions of the run: nginx reloads (SIGHUP, what
`nginx -s reload` sends) at 10% and 20%; traffic pauses at 30% for the
baseline; Redis is saved, stopped for two seconds and started again at
50% and 75% (its data comes back from the dump, as on a real restart);
the stand-in's in-memory records are dropped every minute so that it
stays fast.

The run fails unless:
  - every answer is one the README documents for that request: the
    status, and for errors the OpenAI shape with the documented type
    and code (and Retry-After on 429 and 503); 503 only while Redis is
    down or reconnecting, or within seconds of a Redis command that a
    worker logged as slower than the timeout (the README's "Redis
    unreachable or slower than timeout");
  - nginx's error log (and stderr) holds no [alert], [emerg], [crit]
    or sanitizer line;
  - the workers' RSS at the end is within 10% of the baseline;
  - the workers' open file descriptors are back to the baseline;
  - the workers of every old generation have exited.

Baseline and end are taken with the traffic paused and every upstream
connection closed (nginx's upstream keepalive_timeout is 4 s).  Both
reloads come before the baseline, so baseline and end measure the same
worker processes: a reload replaces the workers, whose RSS then starts
anew, and comparing across generations would say nothing about leaks.
The Redis restarts come after the baseline, inside the measured span.
"""

import json
import os
import random
import re
import shutil
import socket
import string
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lib import helpers, processes, resp  # noqa: E402
from lib.gateway import GATEWAY  # noqa: E402


SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
THREADS = int(os.environ.get("SOAK_THREADS", "8"))
RSS_GROWTH = 0.10

# a 503 is right while Redis is away and until the workers have
# reconnected (backoff at most 2 s) and a command has timed out, and
# around a Redis command that took longer than the timeout (100 ms), which
# a worker logs ("command timed out ... reconnecting")
REDIS_GRACE = 5.0
REDIS_SLOW_LOG = re.compile(
    r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[error\] .*anythingllm: redis "
    r".*(timed out|lost|failed|refused)")


def redis_trouble_times(error_log):
    """Wall-clock seconds at which a worker logged Redis trouble."""
    out = []
    for line in error_log.splitlines():
        m = REDIS_SLOW_LOG.match(line)
        if m:
            out.append(time.mktime(time.strptime(m.group(1),
                                                  "%Y/%m/%d %H:%M:%S")))
    return out

WORKSPACES = ("sales", "support", "engineering")
BASES = ("/v1", "/api/v1/openai")


def new_key(tag):
    return "sk-soak-%s-%s" % (tag, "".join(
        random.choice(string.ascii_letters + string.digits)
        for _ in range(40)))


KEY_FULL = new_key("full")          # chat,read on every workspace
KEY_SALES = new_key("sales")        # chat,read on sales only
KEY_READ = new_key("read")          # read only
KEY_LIMITED = new_key("limited")    # chat,read, rpm 30


class Undocumented(Exception):
    """An answer the README does not promise for that request."""


# ---------------------------------------------------------------------------
# what an answer may be


def error_of(r):
    try:
        j = json.loads(r.body)
    except ValueError:
        raise Undocumented("%d with a body that is not JSON: %r"
                           % (r.status, r.body[:200]))
    e = j.get("error") if isinstance(j, dict) else None
    if not isinstance(e, dict) or set(e) != {"message", "type", "param",
                                               "code"} \
            or not isinstance(e["message"], str) or not e["message"]:
        raise Undocumented("%d without the OpenAI error shape: %r"
                           % (r.status, r.body[:200]))
    return e


# status -> (type, codes) of the README's Errors table
ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", {"invalid_api_key"}),
    403: ("invalid_request_error", {"insufficient_scope",
                                    "workspace_forbidden"}),
    404: ("invalid_request_error", {"model_not_found", "unknown_url"}),
    429: ("requests", {"rate_limit_exceeded"}),
    503: ("server_error", {None}),
}


class Run:
    def __init__(self, ngx, redis, backend):
        self.ngx = ngx
        self.redis = redis
        self.backend = backend
        self.lock = threading.Lock()
        self.counts = {}                # (kind, status) -> n
        self.problems = []
        self.redis_down = []            # [start, end] while Redis is away
        self.slow_503 = []              # (start, end, kind), wall clock
        self.stop = threading.Event()
        self.go = threading.Event()     # cleared: clients pause
        self.go.set()
        self.busy = 0                   # clients inside a request
        self.idle = threading.Condition(self.lock)
        self.local = threading.local()
        self.t0 = time.monotonic()

    # bookkeeping

    def count(self, kind, status):
        with self.lock:
            self.counts[(kind, status)] = self.counts.get((kind, status),
                                                          0) + 1

    def problem(self, kind, text):
        with self.lock:
            self.problems.append("%s: %s" % (kind, text))

    def redis_was_down(self, start, end):
        with self.lock:
            spans = list(self.redis_down)
        for a, b in spans:
            if start <= (b if b is not None else time.monotonic()) \
                    + REDIS_GRACE and end >= a:
                return True
        return False

    def expect(self, kind, r, started, ok, errors=()):
        """Checks an answer: ok statuses pass, errors must be documented
        and listed; 503 only around a Redis outage."""
        self.count(kind, r.status)
        if r.status in ok:
            return
        if r.status not in ERRORS or (r.status not in errors
                                      and r.status != 503):
            raise Undocumented("status %d: %r" % (r.status, r.body[:300]))
        e = error_of(r)
        typ, codes = ERRORS[r.status]
        if e["type"] != typ or (codes is not None and e["code"] not in codes):
            raise Undocumented("%d with type %r code %r"
                               % (r.status, e["type"], e["code"]))
        if r.status == 429:
            ra = r.headers.get("retry-after", "")
            if not ra.isdigit() or not 1 <= int(ra) <= 60:
                raise Undocumented("429 with Retry-After %r" % ra)
        if r.status == 503:
            if r.headers.get("retry-after") != "1":
                raise Undocumented("503 without Retry-After: 1")
            if not self.redis_was_down(started, time.monotonic()):
                # slower than the Redis timeout: judged against the
                # error log once the run is over
                with self.lock:
                    self.slow_503.append(
                        (time.time() - (time.monotonic() - started),
                         time.time(), kind))

    # requests

    def req(self, method, path, key=None, **kw):
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = "Bearer " + key
        return self.ngx.request(method, path, headers=headers, timeout=30,
                                **kw)

    def chat_body(self, model, text, stream=False):
        body = {"model": model, "messages": [
            {"role": "user", "content": text}]}
        if stream:
            body["stream"] = True
            if random.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return body

    def redis_conn(self):
        c = getattr(self.local, "redis", None)
        if c is None:
            c = resp.connect(self.redis.host, self.redis.port, timeout=2)
            self.local.redis = c
        return c

    def add_key(self, key, **fields):
        """Writes a key record as anythingllm-keys does; False while Redis
        is away."""
        rec = {"name": "soak", "scopes": "chat,read", "workspaces": "*",
               "rpm": 0, "expires": 0, "disabled": 0}
        rec.update(fields)
        args = []
        for k, v in rec.items():
            args += [k, v]
        try:
            self.redis_conn().cmd("HSET", self.redis.key_name(key), *args)
            return True
        except (resp.Failure, resp.RedisError):
            c = getattr(self.local, "redis", None)
            if c is not None:
                c.close()
            self.local.redis = None
            return False

    # the traffic

    def do_cached(self):
        t = time.monotonic()
        if random.random() < 0.5:
            key = random.choice((KEY_FULL, KEY_SALES))
            r = self.req("GET", random.choice(BASES) + "/models", key)
            self.expect("cached", r, t, {200})
            if r.status == 200:
                ids = [m["id"] for m in r.json()["data"]]
                want = ["sales"] if key == KEY_SALES else list(WORKSPACES)
                if sorted(ids) != sorted(want):
                    raise Undocumented("models %r for %s" % (ids, want))
        else:
            r = self.req("GET", "/api/v1/workspaces", KEY_SALES)
            self.expect("cached", r, t, {200})
            if r.status == 200:
                slugs = [w["slug"] for w in r.json()["workspaces"]]
                if slugs != ["sales"]:
                    raise Undocumented("workspace list %r" % slugs)

    def do_uncached(self):
        t = time.monotonic()
        if random.random() < 0.5:
            key = new_key("new")
            if not self.add_key(key):
                self.count("uncached", "skipped")
                return
            r = self.req("GET", "/v1/models", key)
            self.expect("uncached", r, t, {200})
        else:
            r = self.req("GET", "/v1/models", new_key("unknown"))
            self.expect("uncached", r, t, set(), {401})

    def do_limited(self):
        t = time.monotonic()
        if random.random() < 0.5:
            r = self.req("GET", "/v1/models", KEY_LIMITED)
        else:
            r = self.req("POST", random.choice(BASES) + "/chat/completions",
                         KEY_LIMITED, json=self.chat_body("sales", "limited"))
        self.expect("limited", r, t, {200}, {429})

    def expect_whole(self, what, s, t):
        """A stream request answered with another status than 200: its
        answer read whole and judged as a refusal."""
        s.read_all(30)
        self.expect(what, s.response(), t, set())

    def do_chat(self):
        t = time.monotonic()
        model = random.choice(WORKSPACES)
        text = "soak %d" % random.randrange(1 << 30)
        r = self.req("POST", random.choice(BASES) + "/chat/completions",
                     KEY_FULL, json=self.chat_body(model, text))
        self.expect("chat", r, t, {200})
        if r.status == 200:
            j = r.json()
            content = j["choices"][0]["message"]["content"]
            if j["object"] != "chat.completion" or j["model"] != model \
                    or not content.startswith("Echo: " + text):
                raise Undocumented("completion %r" % r.body[:300])

    def do_stream(self):
        t = time.monotonic()
        model = random.choice(WORKSPACES)
        fail = random.random() < 0.2
        text = ("[fail] " if fail else "") + "soak %d" \
            % random.randrange(1 << 30)
        s = self.ngx.stream("POST", random.choice(BASES) + "/chat/completions",
                            json=self.chat_body(model, text, True),
                            headers={"Authorization": "Bearer " + KEY_FULL},
                            timeout=30)
        try:
            if s.status != 200:
                self.expect_whole("stream", s, t)
                return
            frames = s.frames(30)
        finally:
            s.close()
        self.count("stream", 200)
        if not s.headers.get("content-type", "").startswith(
                "text/event-stream"):
            raise Undocumented("stream as %r" % s.headers.get("content-type"))
        if not frames or frames[-1] != "[DONE]" or "[DONE]" in frames[:-1]:
            raise Undocumented("stream not ending in one [DONE]: %r"
                               % frames[-3:])
        chunks = [json.loads(f) for f in frames[:-1]]
        errors = [c for c in chunks if "error" in c]
        content = "".join(c["choices"][0]["delta"].get("content") or ""
                          for c in chunks if c.get("choices"))
        if fail:
            if len(errors) != 1 or "error" not in chunks[-1] \
                    or chunks[-1]["error"]["type"] != "server_error":
                raise Undocumented("failed stream without one error frame "
                                   "last: %r" % frames[-3:])
        elif errors or not content.startswith("Echo: " + text):
            raise Undocumented("stream %r" % frames[:4])

    def do_leave(self):
        t = time.monotonic()
        stream = random.random() < 0.7
        s = self.ngx.stream(
            "POST", random.choice(BASES) + "/chat/completions",
            json=self.chat_body(random.choice(WORKSPACES), "[slow] leave",
                                stream),
            headers={"Authorization": "Bearer " + KEY_FULL}, timeout=30) \
            if stream else None
        if s is None:
            # a non-stream answer takes 12 s: leave before it comes
            sock = socket.create_connection(("127.0.0.1", self.ngx.port))
            body = json.dumps(self.chat_body("sales", "[slow] leave"))
            sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\n"
                          "Host: soak\r\nAuthorization: Bearer %s\r\n"
                          "Content-Type: application/json\r\n"
                          "Content-Length: %d\r\n\r\n%s"
                          % (KEY_FULL, len(body), body)).encode())
            time.sleep(random.uniform(0.05, 0.5))
            sock.close()
            self.count("leave", "left")
            return
        try:
            if s.status != 200:
                self.expect_whole("leave", s, t)
                return
            self.count("leave", 200)
            for _ in range(random.randint(1, 3)):
                if s.next_frame(10) is None:
                    raise Undocumented("slow stream ended at once: %r"
                                       % s.body[-300:])
        finally:
            if random.random() < 0.5:
                s.reset()
            else:
                s.close()

    def do_refused(self):
        t = time.monotonic()
        base = random.choice(BASES)
        case = random.randrange(5)
        if case == 0:
            r = self.req("GET", base + "/models")
            self.expect("refused", r, t, set(), {401})
        elif case == 1:
            r = self.req("POST", base + "/chat/completions", KEY_READ,
                         json=self.chat_body("sales", "x"))
            self.expect("refused", r, t, set(), {403})
        elif case == 2:
            r = self.req("POST", base + "/chat/completions", KEY_SALES,
                         json=self.chat_body("support", "x"))
            self.expect("refused", r, t, set(), {404})
        elif case == 3:
            r = self.req("POST", base + "/chat/completions", KEY_FULL,
                         body=b'{"model": "sales", "messages": [',
                         headers={"Content-Type": "application/json"})
            self.expect("refused", r, t, set(), {400})
        else:
            r = self.req("GET", base + "/embeddings", KEY_FULL)
            self.expect("refused", r, t, set(), {404})

    MIX = (("cached", 25), ("uncached", 15), ("limited", 10), ("chat", 20),
           ("stream", 15), ("leave", 5), ("refused", 10))

    def client(self):
        kinds = [k for k, w in self.MIX for _ in range(w)]
        while not self.stop.is_set():
            if not self.go.is_set():
                self.go.wait(1)
                continue
            with self.lock:
                self.busy += 1
            kind = random.choice(kinds)
            try:
                getattr(self, "do_" + kind)()
            except Undocumented as e:
                self.problem(kind, str(e))
            except Exception as e:
                self.count(kind, "exception")
                self.problem(kind, "%s: %s" % (type(e).__name__,
                                               traceback.format_exc(-1)))
            finally:
                with self.lock:
                    self.busy -= 1
                    self.idle.notify_all()

    def pause(self):
        self.go.clear()
        with self.lock:
            self.idle.wait_for(lambda: self.busy == 0, 60)

    def resume(self):
        self.go.set()


# ---------------------------------------------------------------------------
# measurements


def proc_status(pid):
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None
    return out


def measure(ngx):
    pids = ngx.worker_pids()
    total = {"pids": pids, "VmRSS": 0, "RssAnon": 0, "RssFile": 0,
             "RssShmem": 0, "fds": 0}
    for pid in pids:
        st = proc_status(pid)
        if st is None:
            continue
        for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "fds"):
            total[k] += st.get(k, 0)
    master = proc_status(ngx.master_pid)
    total["master_fds"] = master["fds"] if master else None
    return total


def quiet(run, ngx, backend, timeout=60):
    """Pauses the clients and waits until no stream or upstream
    connection is left, nor old worker."""
    run.pause()
    try:
        # "open" is counted live; the stream counters restart at a reset
        helpers.wait_until(lambda: backend.connections()["open"] == 0,
                           timeout, interval=0.5)
    except AssertionError:
        raise AssertionError("upstream connections stayed open: %r"
                             % backend.connections())
    helpers.wait_until(lambda: len(ngx.worker_pids()) == 2, timeout,
                       interval=0.5, message="old workers did not exit")
    time.sleep(1)


def show(label, m):
    print("  %-9s workers %s: RSS %d kB (anon %d, file %d, shmem %d), "
          "fds %d; master fds %s"
          % (label, m["pids"], m["VmRSS"], m["RssAnon"], m["RssFile"],
             m["RssShmem"], m["fds"], m["master_fds"]))


# ---------------------------------------------------------------------------


def main():
    if not processes.module_available():
        sys.exit("soak: module not built: %s (run make build)"
                 % processes.MODULE)

    work, dirs, redis, backend = processes.stack_parts("soak")
    ngx = None
    failures = []

    try:
        redis.start()
        backend.start()
        redis.add_key(KEY_FULL, name="full")
        redis.add_key(KEY_SALES, name="sales", workspaces="sales")
        redis.add_key(KEY_READ, name="read", scopes="read")
        redis.add_key(KEY_LIMITED, name="limited", rpm=30)

        ngx = processes.Nginx(dirs["nginx"], GATEWAY,
                              {"log_level": "info", "workers": 2},
                              backend.addr, redis.addr)
        ngx.start()
        first = set(ngx.worker_pids())

        run = Run(ngx, redis, backend)
        clients = [threading.Thread(target=run.client, daemon=True)
                   for _ in range(THREADS)]
        t0 = run.t0 = time.monotonic()
        for c in clients:
            c.start()

        def at(fraction):
            left = t0 + SECONDS * fraction - time.monotonic()
            while left > 0:
                time.sleep(min(left, 60))
                # the stand-in keeps every chat and request: drop them
                backend.reset()
                left = t0 + SECONDS * fraction - time.monotonic()

        def log(text):
            print("soak %6.1fs  %s" % (time.monotonic() - t0, text),
                  flush=True)

        log("traffic: %d clients for %.0f s" % (THREADS, SECONDS))
        generations = [sorted(first)]

        for i, frac in enumerate((0.10, 0.20)):
            at(frac)
            ngx.reload()
            seen = set(p for g in generations for p in g)
            generations.append(sorted(set(ngx.worker_pids()) - seen))
            log("reload %d: new workers %s" % (i + 1, generations[-1]))

        at(0.30)
        quiet(run, ngx, backend)
        base = measure(ngx)
        log("baseline taken")
        run.resume()

        for i, frac in enumerate((0.50, 0.75)):
            at(frac)
            # SAVE blocks Redis for a moment: the outage starts there
            with run.lock:
                run.redis_down.append([time.monotonic(), None])
            redis.cmd("SAVE")
            redis.stop()
            time.sleep(2)
            redis.start()
            with run.lock:
                run.redis_down[-1][1] = time.monotonic()
            log("redis restart %d" % (i + 1))

        at(1.0)
        run.stop.set()
        run.resume()
        for c in clients:
            c.join(60)
        elapsed = time.monotonic() - t0

        # the end: same quiet state as the baseline; fds may need a moment
        # for both Redis connections of each worker to be back
        quiet(run, ngx, backend)
        try:
            helpers.wait_until(lambda: measure(ngx)["fds"] == base["fds"],
                               20, interval=0.5)
        except AssertionError:
            pass
        end = measure(ngx)

        # -- figures
        total = sum(n for (k, s), n in run.counts.items()
                    if isinstance(s, int))
        statuses = {}
        for (k, s), n in run.counts.items():
            statuses[s] = statuses.get(s, 0) + n
        print()
        print("soak: %d answers in %.0f s (%.0f/s), %d clients, "
              "2 reloads, 2 Redis restarts"
              % (total, elapsed, total / elapsed, THREADS))
        print("  by status: " + ", ".join(
            "%s %d" % (s, statuses[s])
            for s in sorted(statuses, key=str)))
        for kind, _ in Run.MIX:
            row = sorted((str(s), n) for (k, s), n in run.counts.items()
                         if k == kind)
            print("  %-9s %s" % (kind, ", ".join("%s %d" % x for x in row)))
        show("baseline", base)
        show("end", end)
        growth = (end["VmRSS"] - base["VmRSS"]) / base["VmRSS"]
        print("  RSS change %+.1f%% (limit +%d%%), fds %d -> %d"
              % (growth * 100, RSS_GROWTH * 100, base["fds"], end["fds"]))

        # -- verdict
        trouble = redis_trouble_times(ngx.error_log())
        explained = 0
        for start, stop, kind in run.slow_503:
            # the logged timeout comes with the 503 or before it (the
            # worker then reconnects, refusing at once meanwhile); log
            # times are whole seconds
            if any(start - REDIS_GRACE - 1 <= t <= stop + 1
                   for t in trouble):
                explained += 1
            else:
                run.problems.append(
                    "%s: 503 at %.1f s with Redis up and no Redis trouble "
                    "logged" % (kind, start - (time.time()
                                               - (time.monotonic() - t0))))
        print("  503 answers: %d while Redis restarted, %d after a Redis "
              "command timed out (logged)"
              % (statuses.get(503, 0) - len(run.slow_503), explained))
        if run.problems:
            failures.append("%d undocumented answers, first ones:\n    %s"
                            % (len(run.problems),
                               "\n    ".join(run.problems[:15])))
        if end["pids"] != base["pids"]:
            failures.append("workers changed after the baseline: %s -> %s"
                            % (base["pids"], end["pids"]))
        if growth > RSS_GROWTH:
            failures.append("worker RSS grew %.1f%%" % (growth * 100))
        if end["fds"] != base["fds"]:
            failures.append("worker fds %d at the baseline, %d at the end"
                            % (base["fds"], end["fds"]))
        old = set(p for g in generations[:-1] for p in g)
        alive = sorted(old & set(ngx.worker_pids()))
        if alive:
            failures.append("old workers still running: %s" % alive)
        bad = ngx.bad_lines()
        if bad:
            failures.append("error log:\n    " + "\n    ".join(bad[:15]))
        levels = {}
        for m in re.finditer(r"\[(\w+)\]", ngx.error_log()):
            levels[m.group(1)] = levels.get(m.group(1), 0) + 1
        other = [l for l in ngx.error_log().splitlines()
                 if "[error]" in l and "anythingllm: redis" not in l]
        print("  error log lines by level: %s; [error] not about Redis: %d"
              % (", ".join("%s %d" % kv for kv in sorted(levels.items())),
                 len(other)))
        for l in other[:5]:
            print("    " + l[:160])

    except Exception:
        failures.append(traceback.format_exc())
    finally:
        if ngx is not None:
            ngx.stop()
            bad = ngx.bad_lines()
            if bad and not any(f.startswith("error log") for f in failures):
                failures.append("error log:\n    " + "\n    ".join(bad[:15]))
        backend.stop()
        redis.stop()

    if failures:
        print("\nsoak FAILED (files kept in %s):\n  %s"
              % (work, "\n  ".join(failures)))
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("\nsoak passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
