"""A key's rpm counted from leases of the minute's quota: keys with an
rpm of 200 or more take their counts from Redis in leases (INCRBY n),
held in the shared key cache and admitted from without a Redis round
trip; no more than the rpm is admitted in a minute, however many nginx
share the Redis."""

import threading
import time

from lib import helpers
from lib.auth import access_field, bearer, logged, wait_access_lines
from lib.processes import key_digest


AUTH = """
    anythingllm_redis      @REDIS@ timeout=%(timeout)s;
    anythingllm_key_cache  zone=alm_keys:1m valid=%(valid)s;

    server {
        listen  127.0.0.1:@PORT@;

        location /api/v1/ {
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            anythingllm_auth          on;
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
        }
    }
"""


def auth_nginx(nginx, redis_server, valid="600s", timeout="1s", **kw):
    return nginx(AUTH % {"valid": valid, "timeout": timeout},
                 redis=redis_server, **kw)


def away_from_minute_end(margin):
    """Waits when the wall clock's minute is about to turn: a window must
    not end in the middle of a test."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def counter(redis_server, key):
    """The Redis count of the key's current minute (0 when none)."""
    name = "anythingllm:rl:%s:%d" % (key_digest(key), int(time.time()) // 60)
    v = redis_server.cmd("GET", name)
    return int(v) if v is not None else 0


def commands(redis_server, name):
    """How many times Redis ran a command since its statistics were
    reset."""
    info = redis_server.cmd("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith("cmdstat_%s:" % name):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_lease_two_nginx_never_admit_more_than_the_rpm(nginx, redis_server,
                                                       backend):
    """Two nginx (two workers each) share one Redis; requests of a key
    with rpm 300 come from 8 clients at once, to both: no more than 300
    pass in the minute, and the leases leave only a few unused."""
    redis_server.add_key("k-lease", scopes="read", rpm=300)
    n1 = auth_nginx(nginx, redis_server)
    n2 = auth_nginx(nginx, redis_server)
    away_from_minute_end(20)

    statuses = []
    lock = threading.Lock()

    def client(i):
        for j in range(60):
            n = n1 if (i + j) % 2 == 0 else n2
            s = n.get("/api/v1/auth", headers=bearer("k-lease")).status
            with lock:
                statuses.append(s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert len(statuses) == 480
    assert set(statuses) <= {200, 429}, set(statuses)
    passed = statuses.count(200)
    assert passed <= 300, passed
    assert passed >= 290, passed
    # Redis counted every request that passed
    assert counter(redis_server, "k-lease") >= passed


def test_lease_counts_without_a_round_trip_per_request(nginx, redis_server,
                                                       backend):
    """A busy key costs Redis a fetch now and then, not a command per
    request; every request passed is counted in Redis all the same."""
    redis_server.add_key("k-busy", scopes="read", rpm=100000)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(10)
    redis_server.cmd("CONFIG", "RESETSTAT")

    for _ in range(300):
        assert n.get("/api/v1/auth", headers=bearer("k-busy")).status == 200

    asked = commands(redis_server, "incr") + commands(redis_server, "incrby")
    assert asked <= 30, asked
    # what was leased and not yet used is counted too
    assert 300 <= counter(redis_server, "k-busy") <= 300 + 1250


def test_lease_small_limits_count_each_request(nginx, redis_server, backend):
    """Under rpm 200 a key is counted request by request: one INCR each,
    as without leases."""
    redis_server.add_key("k-small", scopes="read", rpm=199)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(5)
    redis_server.cmd("CONFIG", "RESETSTAT")
    for _ in range(10):
        assert n.get("/api/v1/auth", headers=bearer("k-small")).status == 200
    assert commands(redis_server, "incr") == 10
    assert commands(redis_server, "incrby") == 0
    assert counter(redis_server, "k-small") == 10


def test_lease_remaining_requests_header(nginx, redis_server, backend):
    """x-ratelimit-remaining-requests counts down with the requests, as
    the counter of every request would; a count taken while a lease was
    in flight can only make it lower, by less than a lease."""
    redis_server.add_key("k-head", scopes="read", rpm=300)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(10)

    for k in range(1, 41):
        r = n.get("/api/v1/auth", headers=bearer("k-head"))
        assert r.status == 200
        assert r.headers["x-ratelimit-limit-requests"] == "300"
        left = int(r.headers["x-ratelimit-remaining-requests"])
        assert 300 - k - 3 <= left <= 300 - k, (k, left)


def test_lease_spent_minute_is_refused(nginx, redis_server, backend):
    """Once the minute's count reaches the rpm, the key is refused with
    429, Retry-After and no request left."""
    redis_server.add_key("k-spend", scopes="read", rpm=200)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(15)

    statuses = [n.get("/api/v1/auth", headers=bearer("k-spend")).status
                for _ in range(205)]
    assert statuses.count(200) == 200, statuses.count(200)
    assert statuses[-5:] == [429] * 5
    r = n.get("/api/v1/auth", headers=bearer("k-spend"))
    assert r.status == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    wait_access_lines(n, 206)
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-spend"))
    assert access_field(line, "auth") == "rate_limited"


def test_lease_given_back_when_the_key_changes(nginx, redis_server,
                                               backend):
    """A changed key drops its lease at once: what was leased and not
    used goes back to Redis, and the new rpm applies to the next
    request."""
    redis_server.add_key("k-change", scopes="read", rpm=300)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(10)

    for _ in range(10):
        assert n.get("/api/v1/auth", headers=bearer("k-change")).status \
            == 200

    redis_server.update_key("k-change", rpm=5)
    redis_server.cmd("PUBLISH", "anythingllm:revocations",
                     key_digest("k-change"))
    helpers.wait_until(lambda: counter(redis_server, "k-change") == 10,
                       timeout=2, interval=0.02,
                       message="the unused lease was not given back")

    # counted request by request now: the minute already holds 10
    r = n.get("/api/v1/auth", headers=bearer("k-change"))
    assert r.status == 429
    assert "5 requests per minute" in r.text


def test_lease_given_back_when_the_key_is_revoked(nginx, redis_server,
                                                  backend):
    redis_server.add_key("k-gone", scopes="read", rpm=1000)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end(10)

    for _ in range(20):
        assert n.get("/api/v1/auth", headers=bearer("k-gone")).status == 200
    assert counter(redis_server, "k-gone") >= 20

    redis_server.revoke("k-gone")
    helpers.wait_until(lambda: counter(redis_server, "k-gone") == 20,
                       timeout=2, interval=0.02,
                       message="the unused lease was not given back")
    assert n.get("/api/v1/auth", headers=bearer("k-gone")).status == 401


def test_lease_redis_down_mid_lease(nginx, redis_server, backend):
    """Redis goes away while a lease is held: the lease is used, then the
    key passes uncounted, as a cached key does; when Redis is back, the
    key is counted again from one request."""
    redis_server.add_key("k-down", scopes="read", rpm=100000)
    n = auth_nginx(nginx, redis_server, timeout="200ms")
    away_from_minute_end(15)

    for _ in range(50):
        assert n.get("/api/v1/auth", headers=bearer("k-down")).status == 200

    redis_server.stop()
    for _ in range(100):
        r = n.get("/api/v1/auth", headers=bearer("k-down"))
        assert r.status == 200, r.text

    redis_server.start()
    redis_server.add_key("k-down", scopes="read", rpm=100000)

    def counted():
        assert n.get("/api/v1/auth", headers=bearer("k-down")).status == 200
        return counter(redis_server, "k-down") > 0

    helpers.wait_until(counted, timeout=10, interval=0.05,
                       message="the key was never counted again")
