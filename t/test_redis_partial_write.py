"""
Commands the socket does not take at once: the worker writes a turn's
Redis commands when the turn ends, and what the kernel will not take
(its send buffer full) waits in the worker for the connection's write
event.  Here a proxy in front of Redis stops reading while completions
go on from the key cache, so their conversation stores and usage counts
pile up beyond what the kernel buffers hold; once it reads again every
one of them must reach Redis, and nothing may be logged as an error.

When Redis stays silent past the timeout instead, the connection is
given up with the commands still waiting in the worker: each fails
like an unanswered one (its usage counted as an error), none is sent
later on the next connection, and that connection works.
"""

import contextlib
import threading
import time

from lib import helpers
from lib.auth import bearer
from lib.metrics import scrape, value
from lib.openai import user
from lib.processes import PREFIX
from lib.tcpproxy import TcpProxy


KEY = "sk-partial-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

# the commands wait far longer than the pause below (the second test:
# a timeout longer than the filling of the send queue takes)
GATEWAY = """
    anythingllm_redis  %s timeout=%s;

    server {
        listen  127.0.0.1:@PORT@;

        location = /metrics {
            anythingllm_metrics;
        }

        location /v1/ {
            anythingllm_openai        on;
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            anythingllm_auth          on;
            proxy_pass                http://anythingllm;
        }
    }
"""

# completions a round while Redis is not read: each leaves a conversation
# store and a usage count, over a kilobyte together
ROUND = 50

# the kernel takes no more once its queue has not grown for this many
# rounds; then this many more completions go on
FLAT = 3
MORE = 100


class PausingProxy(TcpProxy):
    """A TCP proxy in front of Redis whose client side can stop being
    read: pause() before, resume() after.  Its accepted connections have
    a small receive buffer, so the kernel holds little of what the
    gateway sends while it is paused.  passed: the bytes the gateway
    sent that went on to Redis."""

    # its receive buffer, and the most it reads at once
    READ = 4096

    def __init__(self, redis):
        self.go = threading.Event()
        self.go.set()
        self.passed = 0
        super().__init__((redis.host, redis.port), rcvbuf=self.READ)

    def pause(self):
        self.go.clear()

    def resume(self):
        self.go.set()

    def closing(self):
        self.go.set()

    def forward(self, c, s):
        while True:
            self.go.wait()
            d = c.recv(self.READ)
            if not d:
                break
            with self.lock:
                self.passed += len(d)
            s.sendall(d)


def queues(port):
    """(bytes waiting in the send queues of the sockets connected to
    port, bytes waiting in the receive queues of those bound to it):
    what the kernel holds on the connections to the proxy."""
    sent, received = 0, 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            w = line.split()
            local = int(w[1].split(":")[1], 16)
            remote = int(w[2].split(":")[1], 16)
            tx, rx = (int(x, 16) for x in w[4].split(":"))
            if remote == port:
                sent += tx
            elif local == port:
                received += rx
    return sent, received


def chat(n, text):
    return n.post("/v1/chat/completions", headers=bearer(KEY),
                  json={"model": "sales", "messages": [user(text)]})


def stored(redis):
    return redis.cmd("HLEN", PREFIX + "conv")


def requests_counted(redis):
    names = redis.cmd("KEYS", PREFIX + "usage:*") or []
    return sum(int(redis.cmd("HGET", k, "requests") or 0) for k in names)


def fill(n, proxy):
    """Completions while the proxy is paused, until the kernel takes no
    more of what the gateway writes to Redis and MORE completions'
    commands wait in the worker; returns the completions made."""

    # the kernel takes what the gateway writes until the send queue
    # (whose buffer grows by itself, up to tcp_wmem's top) is full
    held, top, flat = 0, 0, 0
    while flat < FLAT:
        for i in range(ROUND):
            r = chat(n, "held %d" % (held + i))
            assert r.status == 200, r.text
        held += ROUND
        queued = queues(proxy.port)[0]
        flat = flat + 1 if queued <= top else 0
        top = max(top, queued)
        assert held < 20000, "the send queue never stopped growing"

    # from now on what the worker writes waits in the worker
    for i in range(MORE):
        r = chat(n, "held %d" % (held + i))
        assert r.status == 200, r.text
    return held + MORE


@contextlib.contextmanager
def gateway(nginx, redis, timeout):
    """A gateway whose Redis is behind a PausingProxy, the key read once
    (then cached) and a first completion written: (nginx, proxy)."""
    redis.add_key(KEY, scopes="chat", workspaces="*")
    proxy = PausingProxy(redis)
    n = None
    try:
        n = nginx(GATEWAY % (proxy.addr, timeout), workers=1)
        assert chat(n, "warm").status == 200
        helpers.wait_until(lambda: stored(redis) == 1
                           and requests_counted(redis) == 1, 5,
                           message="the first completion not written")
        yield n, proxy
    finally:
        # the gateway goes first: its reconnects would find no proxy
        if n is not None:
            n.stop()
        assert proxy.close() == [], "threads of the proxy outlive it"


def test_what_the_socket_does_not_take_goes_out_on_its_write_event(
        nginx, backend, redis_server):
    redis = redis_server
    with gateway(nginx, redis, "120s") as (n, proxy):
        proxy.pause()
        # a read under way when it paused still goes on: one at most
        before = proxy.passed + proxy.READ

        held = fill(n, proxy)
        in_kernel = sum(queues(proxy.port))

        proxy.resume()
        helpers.wait_until(lambda: stored(redis) == held + 1, 30,
                           message="conversations written late were lost")
        helpers.wait_until(lambda: requests_counted(redis) == held + 1, 30,
                           message="usage written late was lost")

        # more went out after the pause than the kernel held during it:
        # the rest waited in the worker for the write event
        assert proxy.passed - before > in_kernel, (proxy.passed - before,
                                                   in_kernel)

        # and the connection goes on as before
        assert chat(n, "after").status == 200
        helpers.wait_until(lambda: stored(redis) == held + 2, 5,
                           message="a store after the pause was lost")
        assert not [line for line in n.error_log().splitlines()
                    if "[error]" in line or "[alert]" in line]


# longer than fill() takes (5 - 6 s here, under the sanitizers too),
# and waited out by the test
TIMEOUT = 20


def steady(fn, timeout=10):
    """fn()'s value once two reads half a second apart agree."""
    last = fn()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fn()
        if now == last:
            return now
        last = now
    raise AssertionError("still changing after %ds: %r" % (timeout, last))


def test_commands_waiting_in_the_worker_fail_with_their_connection(
        nginx, backend, redis_server):
    redis = redis_server
    with gateway(nginx, redis, "%ds" % TIMEOUT) as (n, proxy):
        workers = n.worker_pids()

        proxy.pause()
        started = time.monotonic()
        held = fill(n, proxy)
        filled = time.monotonic() - started
        assert filled < TIMEOUT, "fill() outlasted the timeout: %.1fs" % (
            filled)
        m = scrape(n)
        assert value(m, "anythingllm_redis_timeouts_total") == 0
        assert value(m, "anythingllm_usage_errors_total") == 0

        # the timeout gives the connection up: every completion made
        # during the pause, in the kernel or still in the worker, has its
        # usage counted as not counted, at once
        helpers.wait_until(
            lambda: value(scrape(n), "anythingllm_usage_errors_total")
            == held, TIMEOUT + 10,
            message="the waiting commands did not all fail")
        m = scrape(n)
        assert value(m, "anythingllm_redis_timeouts_total") == 1
        log = n.error_log()
        assert "command timed out (timeout %d ms), reconnecting" % (
            TIMEOUT * 1000) in log, log[-2000:]

        # some of what the kernel held may still reach Redis once the
        # proxy reads again (sent, though unanswered in time); what
        # waited in the worker went with the connection, and is not
        # sent on the next
        proxy.resume()
        helpers.wait_until(lambda: queues(proxy.port) == (0, 0), 10,
                           message="the proxy does not read again")
        settled = steady(lambda: (stored(redis), requests_counted(redis)))
        assert 1 <= settled[0] <= held + 1 - MORE // 2, (settled, held)
        assert 1 <= settled[1] <= held + 1 - MORE // 2, (settled, held)

        # the next connection works: a completion is written in full
        assert chat(n, "after").status == 200
        helpers.wait_until(lambda: stored(redis) == settled[0] + 1
                           and requests_counted(redis) == settled[1] + 1,
                           5, message="a completion after the timeout "
                                      "was not written")
        m = scrape(n)
        assert value(m, "anythingllm_usage_errors_total") == held
        assert value(m, "anythingllm_redis_reconnects_total") == 1
        assert n.worker_pids() == workers, "a worker was replaced"
