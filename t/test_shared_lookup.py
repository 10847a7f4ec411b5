"""
The key lookups of one turn of the event loop share one HGETALL: the
requests of a key that arrive before the lookup's command is written to
Redis wait for the same reply.  One that arrives after it was written
asks Redis again, so what it is told is never older than the request:
a key revoked before it arrived is refused.

The key cache is off (valid=0), so every request asks Redis.  To have
requests arrive in one turn, the worker is stopped (SIGSTOP) while
they are sent and continued after: its next turn reads them all.  A
proxy in front of Redis can hold Redis's replies back, so that a lookup
stays written and unanswered while the test goes on.
"""

import contextlib
import http.client
import os
import signal
import threading
import time

from lib import helpers
from lib.auth import bearer
from lib.tcpproxy import TcpProxy


KEY = "sk-shared-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
OTHER = "sk-shared-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

GATEWAY = """
    anythingllm_redis      %s timeout=10s;
    anythingllm_key_cache  zone=alm_keys:1m valid=0 invalid=0;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";

        location / {
            proxy_pass  http://anythingllm;
        }
    }
"""

PATH = "/api/v1/workspace/sales"


class HoldingProxy(TcpProxy):
    """A proxy in front of Redis that passes the gateway's commands on
    at once and holds Redis's replies while held: hold() before,
    release() after."""

    def __init__(self, redis):
        self.go = threading.Event()
        self.go.set()
        super().__init__((redis.host, redis.port))

    def hold(self):
        self.go.clear()

    def release(self):
        self.go.set()

    def closing(self):
        self.go.set()

    def backward(self, s, c):
        while True:
            d = s.recv(65536)
            if not d:
                break
            self.go.wait()
            c.sendall(d)


@contextlib.contextmanager
def held_gateway(nginx, redis):
    """A gateway (one worker) whose Redis is behind a HoldingProxy:
    (nginx, proxy)."""
    redis.add_key(KEY, scopes="read", workspaces="sales")
    proxy = HoldingProxy(redis)
    n = None
    try:
        n = nginx(GATEWAY % proxy.addr, workers=1)
        yield n, proxy
    finally:
        # the gateway goes first: its reconnects would find no proxy
        if n is not None:
            n.stop()
        assert proxy.close() == [], "threads of the proxy outlive it"


def lookups(redis):
    """The HGETALL commands Redis has run since its statistics were
    reset."""
    info = redis.cmd("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_hgetall:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def connections(n, count):
    """count keep-alive connections to the gateway, each past a first
    request (so that the next one is read at once when it comes)."""
    conns = []
    for _ in range(count):
        c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
        c.request("GET", PATH, headers=bearer(KEY))
        r = c.getresponse()
        r.read()
        assert r.status == 200
        conns.append(c)
    return conns


def stopped(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def send_together(n, conns, keys):
    """Sends a request on each connection (with the key of the same
    index) while the worker is stopped: its next turn reads them all."""
    worker, = n.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        # the signal is sent, not yet taken: a request sent before the
        # worker stops would have a turn of its own
        helpers.wait_until(lambda: stopped(worker), 5,
                           message="the worker did not stop")
        for c, key in zip(conns, keys):
            c.request("GET", PATH, headers=bearer(key))
        # what was sent is in the worker's sockets before it goes on
        time.sleep(0.2)
    finally:
        os.kill(worker, signal.SIGCONT)


def answers(conns):
    out = []
    for c in conns:
        r = c.getresponse()
        r.read()
        out.append(r.status)
    return out


def test_the_requests_of_a_turn_share_one_lookup_a_key(nginx, redis_server):
    redis = redis_server
    redis.add_key(KEY, scopes="read", workspaces="sales")
    redis.add_key(OTHER, scopes="read", workspaces="other")
    n = nginx(GATEWAY % "@REDIS@", workers=1)

    conns = connections(n, 40)
    before = lookups(redis)

    # 30 requests of one key, 10 of another: two commands, each reply
    # handed to every request of its key
    keys = [KEY if i % 4 else OTHER for i in range(40)]
    send_together(n, conns, keys)
    statuses = answers(conns)

    assert lookups(redis) - before == 2
    assert statuses == [200 if k == KEY else 403 for k in keys]

    # one at a time, each asks Redis
    before = lookups(redis)
    for c in conns[:5]:
        c.request("GET", PATH, headers=bearer(KEY))
        r = c.getresponse()
        r.read()
        assert r.status == 200
    assert lookups(redis) - before == 5

    for c in conns:
        c.close()


def test_a_request_after_the_lookup_was_written_asks_again(nginx,
                                                          redis_server):
    """Request a's lookup reaches Redis, its reply held back; the key is
    revoked, then b comes: b asks Redis itself and is refused, a is let
    through by the answer Redis gave it before the revocation."""
    redis = redis_server
    with held_gateway(nginx, redis) as (n, proxy):
        a, b = connections(n, 2)

        proxy.hold()
        before = lookups(redis)
        a.request("GET", PATH, headers=bearer(KEY))
        helpers.wait_until(lambda: lookups(redis) == before + 1, 5,
                           message="a's lookup never reached Redis")

        redis.revoke(KEY)
        b.request("GET", PATH, headers=bearer(KEY))
        helpers.wait_until(lambda: lookups(redis) == before + 2, 5,
                           message="b was answered by a's lookup")

        proxy.release()
        statuses = answers([a, b])
        assert statuses == [200, 401]
        a.close()
        b.close()


def test_requests_that_go_away_leave_the_shared_lookup(nginx, redis_server):
    """Ten requests share a lookup whose reply is held back; five of
    their clients go away meanwhile.  The reply reaches the five left,
    and the worker stays up (an ended request's place in the lookup
    would be memory freed with it)."""
    redis = redis_server
    with held_gateway(nginx, redis) as (n, proxy):
        workers = n.worker_pids()
        conns = connections(n, 10)

        proxy.hold()
        before = lookups(redis)
        send_together(n, conns, [KEY] * 10)
        helpers.wait_until(lambda: lookups(redis) == before + 1, 5,
                           message="the shared lookup never reached Redis")

        gone, kept = conns[:5], conns[5:]
        for c in gone:
            c.sock.close()
        # the worker sees them go (a closed client ends its request)
        time.sleep(0.5)

        proxy.release()
        assert answers(kept) == [200] * 5
        assert lookups(redis) == before + 1
        assert n.worker_pids() == workers, "the worker was replaced"
        for c in kept:
            c.close()
