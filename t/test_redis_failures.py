"""Redis trouble: stopped, restarted, slow, unreachable, authenticated.

The lookup never blocks a worker; cached keys keep working while Redis is
away, uncached ones get 503 (or pass with anythingllm_auth_fail_open), and
the workers reconnect by themselves.
"""

import os
import socket
import threading
import time

from lib import helpers
from lib.auth import access_field, bearer, logged, wait_access_lines
from lib.openai import assert_refused
from lib.processes import free_port, key_digest


# every path behind anythingllm_auth; %(http)s: the Redis and key cache
# lines; %(server)s: a directive a test adds to the server
AUTH = """
    %(http)s

    server {
        listen  127.0.0.1:@PORT@;
        %(server)s

        location / {
            anythingllm_auth          on;
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
        }
    }
"""

REDIS_AND_CACHE = """
    anythingllm_redis      @REDIS@ timeout=%(timeout)s%(redis)s;
    anythingllm_key_cache zone=alm_keys:1m valid=%(valid)s invalid=%(invalid)s;
"""


def auth_nginx(nginx, redis_server, valid="30s", invalid="5s",
               timeout="100ms", redis="", server="", http=None, **kw):
    if http is None:
        http = REDIS_AND_CACHE % {"valid": valid, "invalid": invalid,
                                  "timeout": timeout, "redis": redis}
    return nginx(AUTH % {"http": http, "server": server}, redis=redis_server,
                 **kw)


def both_workers(n, fn, tries=40):
    """Calls fn() (a request on a new connection) often enough that both
    workers are very likely to have answered some; returns the results."""
    return [fn() for _ in range(tries)]


def test_redis_stopped_cached_keys_work_uncached_get_503(
        nginx, redis_server, backend):
    redis_server.add_key("k-cached", scopes="read")
    redis_server.add_key("k-fresh", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-cached")).status == 200
    wait_access_lines(n, 1)

    redis_server.stop()

    for r, line in both_workers(n, lambda: logged(
            n, "GET", "/api/v1/auth", headers=bearer("k-cached")), tries=10):
        assert r.status == 200, r.text
        assert access_field(line, "auth") == "cached"

    t0 = time.monotonic()
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-fresh"))
    assert time.monotonic() - t0 < 0.5
    err = assert_refused(r, 503, None, type_="server_error")
    assert "unreachable" in err["message"]
    assert r.headers["retry-after"] == "1"
    assert access_field(line, "auth") == "redis_error"

    # back without any reload: each worker reconnects by itself
    redis_server.start()
    redis_server.add_key("k-fresh", scopes="read")
    t0 = time.monotonic()
    helpers.wait_until(
        lambda: all(r.status == 200 for r in both_workers(
            n, lambda: n.get("/api/v1/auth", headers=bearer("k-fresh")),
            tries=6)),
        timeout=6, interval=0.05)
    assert time.monotonic() - t0 < 4
    assert "lost" in n.error_log()


def test_redis_fail_open(nginx, redis_server, backend):
    redis_server.add_key("k-cached", scopes="read", workspaces="sales")
    n = auth_nginx(nginx, redis_server,
                   server="anythingllm_auth_fail_open on;")
    assert n.get("/api/v1/workspaces",
                 headers=bearer("k-cached")).status == 200
    redis_server.stop()

    # an uncached key passes with every right
    backend.clear()
    wait_access_lines(n, 1)
    r, line = logged(n, "DELETE", "/api/v1/workspace/engineering",
                     headers=bearer("k-anything"))
    assert r.status == 200, r.text
    assert access_field(line, "auth") == "fail_open"
    assert len(backend.requests()) == 1
    # a cached key keeps its own rights
    r = n.get("/api/v1/workspace/support", headers=bearer("k-cached"))
    assert_refused(r, 403, "workspace_forbidden")
    r = n.get("/api/v1/workspaces", headers=bearer("k-cached"))
    assert [w["slug"] for w in r.json()["workspaces"]] == ["sales"]
    # a missing key is still refused
    r = n.get("/api/v1/auth")
    assert_refused(r, 401, "invalid_api_key")


def test_redis_error_reply_never_fails_open(nginx, redis_server, backend):
    # Redis answers, with an error: no reason to let the key through
    redis_server.cmd("SET", "anythingllm:key:" + key_digest("k-odd"), "x")
    n = auth_nginx(nginx, redis_server,
                   server="anythingllm_auth_fail_open on;")
    backend.clear()
    r, line = logged(n, "GET", "/api/v1/auth", headers=bearer("k-odd"))
    assert_refused(r, 503, None, type_="server_error")
    assert access_field(line, "auth") == "redis_error"
    assert backend.requests() == []
    assert "WRONGTYPE" in n.error_log()



def test_redis_slow_hits_the_timeout(nginx, redis_server, backend):
    redis_server.add_key("k-1", scopes="read")
    redis_server.add_key("k-2", scopes="read")
    n = auth_nginx(nginx, redis_server, timeout="150ms")

    # both workers connected and working
    for r in both_workers(n, lambda: n.get(
            "/api/v1/auth", headers=bearer("k-1")), tries=4):
        assert r.status == 200

    sleeper = redis_server.sleep(1.5)
    times = []
    for i in range(4):
        t0 = time.monotonic()
        r = n.get("/api/v1/auth", headers=bearer("k-slow-%d" % i))
        times.append(time.monotonic() - t0)
        assert_refused(r, 503, None, type_="server_error")
    # none waits much longer than the timeout
    assert max(times) < 0.45, times
    assert max(times) >= 0.14, times
    assert "command timed out (timeout 150 ms)" in n.error_log()

    # the cached key kept working all along
    assert n.get("/api/v1/auth", headers=bearer("k-1")).status == 200

    sleeper.join()
    helpers.wait_until(lambda: all(
        n.get("/api/v1/auth", headers=bearer("k-2")).status == 200
        for _ in range(4)), timeout=5, interval=0.05)


def test_redis_clients_leaving_while_waiting(nginx, redis_server, backend):
    """Clients that disconnect while their lookup is pending: the reply
    comes later to a request that is gone.  No alert, no crash, no leak
    (under ASan), and the worker goes on serving."""
    redis_server.add_key("k-ok", scopes="read")
    n = auth_nginx(nginx, redis_server, timeout="3s")
    for _ in range(4):
        assert n.get("/api/v1/auth", headers=bearer("k-ok")).status == 200

    sleeper = redis_server.sleep(1.0)
    socks = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", n.port))
        s.sendall(("GET /api/v1/auth HTTP/1.1\r\nHost: x\r\n"
                   "Authorization: Bearer k-gone-%d\r\n\r\n" % i).encode())
        socks.append(s)
    # some wait in the access phase, then leave: half close, half reset
    time.sleep(0.3)
    for i, s in enumerate(socks):
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    # one more that stays: it gets its verdict once Redis answers
    waiting = helpers.StreamReader("GET", n.url + "/api/v1/auth",
                                   headers=bearer("k-ok-later"))
    sleeper.join()
    waiting.read_all(5)
    assert waiting.status == 401
    waiting.close()

    for _ in range(6):
        assert n.get("/api/v1/auth", headers=bearer("k-ok")).status == 200
    lines = n.access_lines()
    assert sum(1 for l in lines if '" 499 ' in l) >= 50, lines[-5:]
    assert len(n.worker_pids()) == 2


def test_redis_killed_with_requests_in_flight(nginx, redis_server, backend):
    redis_server.add_key("k-ok", scopes="read")
    n = auth_nginx(nginx, redis_server, timeout="3s", valid="1s")
    # Redis busy, then killed: the command is sent, its reply never read
    sleeper = redis_server.connect()
    sleeper.send("DEBUG", "SLEEP", "2")
    time.sleep(0.05)
    results = []

    def one(i):
        try:
            r = n.get("/api/v1/auth", headers=bearer("k-%d" % i))
            results.append(r.status)
        except Exception as e:             # noqa: BLE001
            results.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    redis_server.kill()
    for t in threads:
        t.join(10)
    assert results == [503] * 30, results
    sleeper.close()
    redis_server.start()
    redis_server.add_key("k-ok", scopes="read")
    helpers.wait_until(lambda: all(
        n.get("/api/v1/auth", headers=bearer("k-ok")).status == 200
        for _ in range(4)), timeout=6, interval=0.1)


def test_redis_restart_without_data_drops_cached_keys(
        nginx, redis_server, backend):
    """A revocation published while a subscriber was away is lost: on
    reconnecting, the workers drop the valid keys of the cache.  Here Redis
    comes back empty (no persistence): the cached key stops working once
    Redis is back, though the cache would keep it for ten minutes."""
    redis_server.add_key("k-gone", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-gone")).status == 200
    redis_server.stop()
    assert n.get("/api/v1/auth", headers=bearer("k-gone")).status == 200
    redis_server.start()

    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-gone")).status
        == 401, timeout=5, interval=0.05)
    assert "valid keys dropped from the cache" in n.error_log()


def test_redis_lost_again_after_a_flush_keeps_the_flushed_keys(
        nginx, redis_server, backend):
    """On subscribing again the workers flush the valid keys: each is
    looked up again.  When that lookup cannot reach Redis (in a failover,
    one worker may be subscribed to the new primary while the other is
    still looking for it), the key is judged by what the cache held, as
    a cached key is while Redis is away."""
    redis_server.add_key("k-kept", scopes="read")
    redis_server.add_key("k-never", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-kept")).status == 200
    assert redis_server.cmd("CLIENT", "KILL", "TYPE", "pubsub") == 2
    helpers.wait_until(
        lambda: n.error_log().count("valid keys dropped from the cache")
        == 2, timeout=5, interval=0.05)

    redis_server.stop()
    statuses = both_workers(n, lambda: n.get(
        "/api/v1/auth", headers=bearer("k-kept")).status)
    assert set(statuses) == {200}, statuses
    assert "judged by its entry from before the cache was flushed" \
        in n.error_log()
    # a key the cache never held gets 503 as before
    assert n.get("/api/v1/auth", headers=bearer("k-never")).status == 503

    # Redis is back without data: the flushed key is looked up again
    redis_server.start()
    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-kept")).status
        == 401, timeout=5, interval=0.05)


def test_redis_revocation_of_every_key_drops_the_flushed_keys(
        nginx, redis_server, backend):
    """"*" on the revocations channel leaves nothing to judge a key by,
    not even the entries a flush kept."""
    redis_server.add_key("k-all", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-all")).status == 200
    assert redis_server.cmd("CLIENT", "KILL", "TYPE", "pubsub") == 2
    helpers.wait_until(
        lambda: n.error_log().count("valid keys dropped from the cache")
        == 2, timeout=5, interval=0.05)
    helpers.wait_until(
        lambda: redis_server.cmd("PUBSUB", "NUMSUB",
                                 "anythingllm:revocations")[1] == 2,
        timeout=5, interval=0.05)
    redis_server.cmd("PUBLISH", "anythingllm:revocations", "*")
    helpers.wait_until(
        lambda: "revocation of every key" in n.error_log(), timeout=5,
        interval=0.05)

    redis_server.stop()
    statuses = both_workers(n, lambda: n.get(
        "/api/v1/auth", headers=bearer("k-all")).status)
    assert set(statuses) == {503}, statuses


def test_redis_revocations_survive_a_dropped_subscriber(
        nginx, redis_server, backend):
    """CLIENT KILL drops every connection of the workers; they come back
    and revocations reach them again."""
    redis_server.add_key("k-a", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-a")).status == 200
    assert redis_server.cmd("CLIENT", "KILL", "TYPE", "pubsub") == 2
    assert redis_server.cmd("CLIENT", "KILL", "TYPE", "normal",
                            "SKIPME", "yes") == 2

    def subscribers():
        return redis_server.cmd("PUBSUB", "NUMSUB",
                                "anythingllm:revocations")[1] == 2
    helpers.wait_until(subscribers, timeout=5, interval=0.05)
    redis_server.add_key("k-b", scopes="read")
    assert n.get("/api/v1/auth", headers=bearer("k-b")).status == 200
    t0 = time.monotonic()
    redis_server.revoke("k-b")
    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-b")).status == 401,
        timeout=2, interval=0.02)
    assert time.monotonic() - t0 < 1


def test_redis_password_and_db(nginx, redis_server, backend):
    redis_server.cmd("CONFIG", "SET", "requirepass", "s3cret pass")
    redis_server.cmd("SELECT", "3")
    redis_server.add_key("k-db3", scopes="read")
    redis_server.cmd("SELECT", "0")
    redis_server.add_key("k-db0", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s",
                   redis=' db=3 "password=s3cret pass"')
    assert n.get("/api/v1/auth", headers=bearer("k-db3")).status == 200
    assert n.get("/api/v1/auth", headers=bearer("k-db0")).status == 401
    # revocations reach an authenticated subscriber
    redis_server.cmd("SELECT", "3")
    redis_server.revoke("k-db3")
    helpers.wait_until(
        lambda: n.get("/api/v1/auth", headers=bearer("k-db3")).status
        == 401, timeout=2, interval=0.02)
    assert "s3cret" not in n.error_log()


def test_redis_wrong_password(nginx, redis_server, backend):
    redis_server.cmd("CONFIG", "SET", "requirepass", "right")
    n = auth_nginx(nginx, redis_server, redis=" password=wrong")
    r = n.get("/api/v1/auth", headers=bearer("k"))
    assert_refused(r, 503, None, type_="server_error")
    helpers.wait_until(lambda: "AUTH failed" in n.error_log(), timeout=3)
    assert "wrong" not in n.error_log()


def test_redis_unix_socket(nginx, redis_server, backend):
    redis_server.add_key("k-unix", scopes="read")
    http = """
    anythingllm_redis      unix:%s;
    anythingllm_key_cache  zone=alm_keys:1m;
""" % redis_server.unix_path
    n = auth_nginx(nginx, redis_server, http=http)
    assert n.get("/api/v1/auth", headers=bearer("k-unix")).status == 200
    assert n.get("/api/v1/auth", headers=bearer("k-other")).status == 401


def test_redis_default_cache_zone(nginx, redis_server, backend):
    """Without anythingllm_key_cache a 10m zone is made: a key once seen
    keeps working while Redis is away."""
    redis_server.add_key("k-1", scopes="read")
    http = "anythingllm_redis @REDIS@;"
    n = auth_nginx(nginx, redis_server, http=http)
    assert n.get("/api/v1/auth", headers=bearer("k-1")).status == 200
    redis_server.stop()
    for _ in range(4):
        assert n.get("/api/v1/auth", headers=bearer("k-1")).status == 200


def test_redis_unreachable_from_the_start(nginx, redis_server, backend):
    port = free_port()
    http = """
    anythingllm_redis      127.0.0.1:%d timeout=50ms;
    anythingllm_key_cache  zone=alm_keys:1m;
""" % port
    n = auth_nginx(nginx, None, http=http)
    t0 = time.monotonic()
    for _ in range(5):
        r = n.get("/api/v1/auth", headers=bearer("k"))
        assert_refused(r, 503, None, type_="server_error")
    assert time.monotonic() - t0 < 1
    # failures are reported once as errors, then at "info"
    time.sleep(1)
    errors = [l for l in n.error_log().splitlines()
              if "[error]" in l and "anythingllm: redis" in l]
    assert 2 <= len(errors) <= 4, errors


def test_redis_reload_and_quit_are_not_held(nginx, redis_server, backend):
    """Reconnect timers do not hold a graceful shutdown; a reload keeps
    the cache (the zone is reused)."""
    redis_server.add_key("k-1", scopes="read")
    n = auth_nginx(nginx, redis_server, valid="600s")
    assert n.get("/api/v1/auth", headers=bearer("k-1")).status == 200
    redis_server.stop()
    time.sleep(0.5)
    t0 = time.monotonic()
    n.reload()
    old_gone = helpers.wait_until(
        lambda: len(n.worker_pids()) == 2, timeout=5, interval=0.05)
    assert old_gone and time.monotonic() - t0 < 3
    # the new workers never reached Redis; the key is in the kept zone
    r = n.get("/api/v1/auth", headers=bearer("k-1"))
    assert r.status == 200
    assert access_field(wait_access_lines(n, 2)[-1], "auth") == "cached"
    t0 = time.monotonic()
    n.stop()
    assert time.monotonic() - t0 < 3


def test_redis_only_used_where_configured(nginx, redis_server, backend):
    """No anythingllm_auth or anythingllm_openai anywhere: the workers open
    no connection to Redis."""
    n = nginx("""
    anythingllm_redis  @REDIS@;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;

        location / {
            proxy_pass  http://anythingllm;
        }
    }
""", redis=redis_server)
    n.get("/api/v1/auth", headers=bearer("x"))
    clients = redis_server.cmd("CLIENT", "LIST").decode().splitlines()
    assert len(clients) == 1, clients
    n2 = auth_nginx(nginx, redis_server)
    helpers.wait_until(lambda: len(redis_server.cmd(
        "CLIENT", "LIST").decode().splitlines()) == 5, timeout=3)
    assert "anythingllm:revocations" in \
        [c.decode() for c in redis_server.cmd("PUBSUB", "CHANNELS")]
    del n2


def test_redis_config_errors(nginx, redis_server):
    for http, msg in (
            ("anythingllm_redis localhost:6379;", "must be an IPv4 literal"),
            ("anythingllm_redis 127.0.0.1;", "use ip:port"),
            ("anythingllm_redis 127.0.0.1:0;", "invalid redis port"),
            ("anythingllm_redis 127.0.0.1:6379 timeout=0;",
             "invalid parameter"),
            ("anythingllm_redis 127.0.0.1:6379 bogus=1;",
             "invalid parameter"),
            ("anythingllm_key_cache zone=x:1k;", "is too small"),
            ("anythingllm_key_cache valid=1s;", "must have \"zone\""),
            ("anythingllm_key_cache zone=x:1m;\n"
             "    anythingllm_key_cache zone=y:1m;", "is duplicate")):
        n = auth_nginx(nginx, None, http=http, start=False)
        ok, out = n.test_config()
        assert not ok, http
        assert msg in out, (http, out)
        n.allowed.append(__import__("re").compile("emerg"))
    n = auth_nginx(nginx, None, http="anythingllm_redis 127.0.0.1:6399 db=2 "
                   "timeout=1s prefix=x:;", start=False)
    ok, out = n.test_config()
    assert ok, out
    assert os.path.exists(n.conf_path)


def test_redis_cache_full_evicts_least_recently_used(
        nginx, redis_server, backend):
    """A full zone makes room by dropping the least recently used entries
    (no [crit] "no memory"); what was used recently stays."""
    keys = ["k-lru-%d" % i for i in range(400)]
    for k in keys:
        redis_server.add_key(k, scopes="read")
    redis_server.add_key("k-hot", scopes="read")
    http = """
    anythingllm_redis      @REDIS@;
    anythingllm_key_cache  zone=alm_small:32k valid=600s;
"""
    n = auth_nginx(nginx, redis_server, http=http)
    for i, k in enumerate(keys):
        assert n.get("/api/v1/auth", headers=bearer(k)).status == 200
        if i % 10 == 0:
            assert n.get("/api/v1/auth",
                         headers=bearer("k-hot")).status == 200
    redis_server.stop()

    def status(k):
        return n.get("/api/v1/auth", headers=bearer(k)).status

    assert status("k-hot") == 200
    assert [status(k) for k in keys[-10:]] == [200] * 10
    assert [status(k) for k in keys[:10]] == [503] * 10
    assert "no memory" not in n.error_log()
