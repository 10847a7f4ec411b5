"""Revocation in under a second, fleet-wide rate limits, many requests at
once each with its own verdict."""

import json
import os
import subprocess
import threading
import time

from lib import helpers, paths
from lib.auth import access_field, bearer, logged, wait_access_lines
from lib.openai import assert_refused
from lib.processes import key_digest


# keys checked on AnythingLLM's API; %(redis)s: more parameters of
# anythingllm_redis
AUTH = """
    anythingllm_redis      @REDIS@ timeout=%(timeout)s%(redis)s;
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


def auth_nginx(nginx, redis_server, valid="30s", timeout="100ms", redis="",
               **kw):
    return nginx(AUTH % {"valid": valid, "timeout": timeout,
                         "redis": redis}, redis=redis_server, **kw)


def test_revocation_under_one_second(nginx, redis_server, backend):
    redis_server.add_key("k-rev", scopes="read")
    redis_server.add_key("k-stay", scopes="read")
    # a Redis command slower than timeout on a loaded machine makes the
    # worker reconnect and drop its cached keys: room for the load, so
    # that what is measured is the revocation alone
    n = auth_nginx(nginx, redis_server, valid="600s", timeout="2s")
    for _ in range(4):
        assert n.get("/api/v1/auth", headers=bearer("k-rev")).status == 200
        assert n.get("/api/v1/auth", headers=bearer("k-stay")).status == 200
    lines = wait_access_lines(n, 8)
    assert access_field(lines[-1], "auth") == "cached"

    t0 = time.monotonic()
    assert redis_server.revoke("k-rev") == 2        # both workers listen
    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-rev")).status
        == 401, timeout=3, interval=0.01)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed

    # refused by every worker from now on; the other key is still cached
    for _ in range(6):
        assert n.get("/api/v1/auth", headers=bearer("k-rev")).status == 401
        assert n.get("/api/v1/auth", headers=bearer("k-stay")).status == 200
    # two workers write the log: the last two requests' lines may land
    # in either order
    seen = []

    def last_two():
        seen[:] = [access_field(l, "auth") for l in n.access_lines()[-4:]]
        return sorted(seen[-2:]) == ["cached", "denied_unknown"]
    try:
        helpers.wait_until(last_two, timeout=2)
    except AssertionError:
        raise AssertionError("last verdicts: %r\n%s"
                             % (seen, "\n".join(n.access_lines()[-4:])))


def test_revocation_of_a_disabled_change(nginx, redis_server, backend):
    """disable / enable publish the digest too: the cache follows."""
    redis_server.add_key("k-flip", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-flip")).status == 200

    for disabled, status in ((1, 401), (0, 200)):
        redis_server.update_key("k-flip", disabled=disabled)
        redis_server.cmd("PUBLISH", "anythingllm:revocations",
                         key_digest("k-flip"))
        helpers.wait_until(
            lambda: n.get("/api/v1/auth", headers=bearer("k-flip")).status
            == status, timeout=1, interval=0.01)


def test_revocation_of_every_key(nginx, redis_server, backend):
    """"*" on the channel drops every valid key from the cache."""
    for k in ("k-a", "k-b"):
        redis_server.add_key(k, scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    for k in ("k-a", "k-b"):
        assert n.get("/api/v1/auth", headers=bearer(k)).status == 200
    redis_server.cmd("DEL", redis_server.key_name("k-a"),
                     redis_server.key_name("k-b"))
    redis_server.cmd("PUBLISH", "anythingllm:revocations", "*")
    helpers.wait_until(lambda: all(
        n.get("/api/v1/auth", headers=bearer(k)).status == 401
        for k in ("k-a", "k-b")), timeout=1, interval=0.01)


def test_revocation_digest_in_uppercase(nginx, redis_server, backend):
    """Some tools print hex digests in capitals: the same key."""
    redis_server.add_key("k-up", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    for _ in range(4):
        assert n.get("/api/v1/auth", headers=bearer("k-up")).status == 200
    redis_server.cmd("DEL", redis_server.key_name("k-up"))
    redis_server.cmd("PUBLISH", "anythingllm:revocations",
                     key_digest("k-up").upper())
    helpers.wait_until(
        lambda: all(n.get("/api/v1/auth", headers=bearer("k-up")).status
                    == 401 for _ in range(4)), timeout=1, interval=0.01)


def test_subscription_refused_is_logged(nginx, redis_server, backend):
    """A Redis that refuses the revocation channel says so in the log."""
    redis_server.cmd("ACL", "SETUSER", "default", "resetchannels")
    redis_server.add_key("k-a", scopes="read")
    n = auth_nginx(nginx, redis_server)
    assert n.get("/api/v1/auth", headers=bearer("k-a")).status == 200
    helpers.wait_until(
        lambda: "subscriber connection" in n.error_log()
        and "NOPERM" in n.error_log(), timeout=3,
        message="the refused SUBSCRIBE left no trace in the error log")


def test_revocation_garbage_is_ignored(nginx, redis_server, backend):
    redis_server.add_key("k-a", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-a")).status == 200
    redis_server.cmd("PUBLISH", "anythingllm:revocations", "hello")
    redis_server.cmd("PUBLISH", "anythingllm:revocations", "")
    # the workers hear the messages on their own time
    helpers.wait_until(
        lambda: "ignored revocation message of 5 bytes" in n.error_log(),
        timeout=5, message="the message was not heard")
    assert n.get("/api/v1/auth", headers=bearer("k-a")).status == 200


def test_revocation_with_a_prefix(nginx, redis_server, backend):
    redis_server.add_key("k-p", scopes="read", prefix="team1:")
    redis_server.add_key("k-p", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s",
                   redis=" prefix=team1:")
    assert n.get("/api/v1/auth", headers=bearer("k-p")).status == 200
    # the default prefix's channel is not this nginx's
    redis_server.revoke("k-p")
    time.sleep(0.2)
    assert n.get("/api/v1/auth", headers=bearer("k-p")).status == 200
    redis_server.revoke("k-p", prefix="team1:")
    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-p")).status == 401,
        timeout=1, interval=0.01)


# ---------------------------------------------------------------------------
# rate limits


def away_from_minute_end(margin=4):
    """Waits when the wall clock's minute is about to turn: a window must
    not end in the middle of a test."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def test_rate_limit_429_with_retry_after(nginx, redis_server, backend):
    d = redis_server.add_key("k-rpm", scopes="read", rpm=3)
    redis_server.add_key("k-free", scopes="read", rpm=0)
    n = auth_nginx(nginx, redis_server)
    away_from_minute_end()

    for _ in range(3):
        assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 200
    wait_access_lines(n, 3)
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-rpm"))
    assert access_field(line, "auth") == "rate_limited"
    left = 60 - time.time() % 60
    err = assert_refused(r, 429, "rate_limit_exceeded", type_="requests")
    assert "3 requests per minute" in err["message"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60
    assert abs(retry - left) <= 2, (retry, left)

    # the counter of this minute lives in Redis, with an expiry
    minute = int(time.time()) // 60
    name = "anythingllm:rl:%s:%d" % (d, minute)
    assert redis_server.cmd("GET", name) == b"4"
    assert 60 <= redis_server.cmd("TTL", name) <= 120

    # another key is not affected; a key without rpm has no counter
    for _ in range(5):
        assert n.get("/api/v1/auth", headers=bearer("k-free")).status == 200
    assert redis_server.cmd(
        "KEYS", "anythingllm:rl:%s:*" % key_digest("k-free")) == []

    assert len(backend.requests(path="/api/v1/auth")) == 8


def test_rate_limit_shared_by_two_nginx(nginx, redis_server, backend):
    redis_server.add_key("k-fleet", scopes="read", rpm=5)
    n1 = auth_nginx(nginx, redis_server)
    n2 = auth_nginx(nginx, redis_server)
    away_from_minute_end()

    statuses = []
    for i in range(8):
        n = n1 if i % 2 == 0 else n2
        statuses.append(n.get("/api/v1/auth",
                              headers=bearer("k-fleet")).status)
    assert statuses == [200] * 5 + [429] * 3, statuses


def test_rate_limit_passes_while_redis_is_down(nginx, redis_server, backend):
    redis_server.add_key("k-rpm", scopes="read", rpm=1)
    n = auth_nginx(nginx, redis_server, valid="600s")
    away_from_minute_end()
    assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 200
    assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 429
    redis_server.stop()
    for _ in range(3):
        assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 200


def test_rate_limit_while_redis_is_slow(nginx, redis_server, backend):
    """The counter times out: a cached key passes after the timeout."""
    redis_server.add_key("k-rpm", scopes="read", rpm=100)
    n = auth_nginx(nginx, redis_server, timeout="100ms")
    for _ in range(4):
        assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 200
    sleeper = redis_server.sleep(1)
    t0 = time.monotonic()
    assert n.get("/api/v1/auth", headers=bearer("k-rpm")).status == 200
    assert time.monotonic() - t0 < 0.4
    sleeper.join()


# ---------------------------------------------------------------------------
# many at once


def test_rate_200_concurrent_mixed_verdicts(nginx, redis_server, backend):
    """200 requests at once, half with valid keys (of several kinds), half
    with invalid ones: each gets its own verdict."""
    expect = {}
    for i in range(40):
        redis_server.add_key("ok-%d" % i, name="ok-%d" % i, scopes="read",
                             workspaces="sales,support")
        expect["ok-%d" % i] = 200
    for i in range(20):
        redis_server.add_key("chat-%d" % i, scopes="chat",
                             workspaces="sales")
        expect["chat-%d" % i] = 403
    for i in range(20):
        redis_server.add_key("ws-%d" % i, scopes="read",
                             workspaces="engineering")
        expect["ws-%d" % i] = 403
    for i in range(10):
        redis_server.add_key("off-%d" % i, scopes="read", disabled=1)
        expect["off-%d" % i] = 401
    for i in range(10):
        redis_server.add_key("old-%d" % i, scopes="read", expires=1000)
        expect["old-%d" % i] = 401
    for i in range(100):
        expect["bad-%d" % i] = 401
    assert len(expect) == 200

    n = auth_nginx(nginx, redis_server)
    barrier = threading.Barrier(len(expect))
    got = {}

    def one(key):
        barrier.wait(10)
        try:
            r = n.get("/api/v1/workspace/sales", headers=bearer(key),
                      timeout=20)
            got[key] = (r.status, r.body)
        except Exception as e:             # noqa: BLE001
            got[key] = (repr(e), b"")

    threads = [threading.Thread(target=one, args=(k,)) for k in expect]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    wrong = {k: got.get(k) for k in expect
             if got.get(k, (None,))[0] != expect[k]}
    assert not wrong, wrong
    for k, (status, body) in got.items():
        if status == 200:
            assert b'"slug":"sales"' in body, (k, body[:200])

    # and by name: the access log pairs each key id with its verdict
    lines = wait_access_lines(n, 200)
    by_id = {access_field(l, "key_id"): l for l in lines}
    for k, status in expect.items():
        line = by_id[key_digest(k)[:12]]
        assert '" %d ' % status in line, (k, line)
        if k.startswith("ok-"):
            assert access_field(line, "key_name") == k


# ---------------------------------------------------------------------------
# the operators' tool against a running gateway


def keys_tool(redis_server, *args):
    p = subprocess.run(
        [paths.KEYS_TOOL, "--redis",
         redis_server.addr] + list(args),
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items()
             if not k.startswith("ANYTHINGLLM_")})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout) if "--json" in args else p.stdout


def test_rate_keys_tool_end_to_end(nginx, redis_server, backend):
    """Keys made and changed with scripts/anythingllm-keys take effect in
    the gateway at once, whatever the cache's TTL."""
    n = auth_nginx(nginx, redis_server, valid="600s")
    info = keys_tool(redis_server, "create", "--json", "--name", "tool key",
                     "--scopes", "chat,read", "--workspaces", "sales",
                     "--rpm", "100")
    key = info["key"]
    assert key_digest(key) == info["digest"]

    def status(path="/api/v1/workspace/sales"):
        return n.get(path, headers=bearer(key)).status

    assert status() == 200
    assert status("/api/v1/workspace/support") == 403
    wait_access_lines(n, 2)
    r, line = logged(n, "GET", "/api/v1/workspace/sales",
                     headers=bearer(key))
    assert access_field(line, "key_name") == "tool key"
    assert access_field(line, "key_id") == info["id"]

    for cmd, want in (("disable", 401), ("enable", 200)):
        keys_tool(redis_server, cmd, info["id"])
        t0 = time.monotonic()
        helpers.wait_until(lambda: status() == want, timeout=2,
                           interval=0.01)
        assert time.monotonic() - t0 < 1, cmd

    keys_tool(redis_server, "set", info["id"], "--workspaces", "support")
    helpers.wait_until(
        lambda: status("/api/v1/workspace/support") == 200, timeout=1,
        interval=0.01)
    assert status() == 403

    keys_tool(redis_server, "revoke", info["id"])
    helpers.wait_until(lambda: status("/api/v1/workspace/support") == 401,
                       timeout=1, interval=0.01)
