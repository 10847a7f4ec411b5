"""Token limits (a key's tpm and tpd, fleet-wide through Redis), OpenAI's
x-ratelimit-* headers on every answer to a key with limits, and GET
/api/v1/auth showing a key its own record and the day's use."""

import re
import time

from lib import helpers
from lib.auth import bearer
from lib.openai import assert_refused, user
from lib.processes import key_digest
from test_usage import USAGE


# the gateway of the usage tests: its answers are the ones limited
LIMITS = USAGE

DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


def seconds(text):
    """An OpenAI duration ("6m0s", "1s", "59ms") in seconds."""
    m = DURATION.match(text)
    assert m and text, text
    h, mi, s, ms = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000.0


def day():
    return time.strftime("%Y%m%d", time.gmtime())


def minute_key(key, offset=0):
    return "anythingllm:tpm:%s:%d" % (key_digest(key),
                                      int(time.time()) // 60 + offset)


def day_key(key, d=None):
    return "anythingllm:usage:%s:%s" % (key_digest(key), d or day())


def chat(n, key, text="hello"):
    return n.post("/v1/chat/completions", headers=bearer(key),
                  json={"model": "sales", "messages": [user(text)]})


def native(n, key, text="hello"):
    return n.post("/api/v1/workspace/sales/chat", json={"message": text},
                  headers=bearer(key))


def wait_requests(redis_server, key, count):
    helpers.wait_until(
        lambda: redis_server.hgetall(day_key(key)).get("requests")
        == str(count), message="usage never reached %d" % count)


def test_tpm_refuses_once_reached_and_recovers(nginx, redis_server, backend):
    redis_server.add_key("k-tpm", scopes="chat,read", tpm=1000)
    n = nginx(LIMITS, redis=redis_server)

    r = chat(n, "k-tpm")
    assert r.status == 200, r.text
    used = r.json()["usage"]["total_tokens"]
    wait_requests(redis_server, "k-tpm", 1)
    counted = int(redis_server.cmd("GET", minute_key("k-tpm")))
    assert counted == used
    assert 60 < redis_server.cmd("TTL", minute_key("k-tpm")) <= 120

    # the window reaches its limit: every chat route refuses
    redis_server.cmd("SET", minute_key("k-tpm"), 1000, "EX", 120)
    for r in (chat(n, "k-tpm"), native(n, "k-tpm")):
        err = assert_refused(r, 429, "rate_limit_exceeded", "tokens")
        assert "1000 tokens per minute" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    # what is not a chat still passes
    assert n.get("/api/v1/workspaces", headers=bearer("k-tpm")).status == 200
    r = n.get("/v1/models", headers=bearer("k-tpm"))
    assert r.status == 200

    # the window turns: last minute's count no longer applies
    redis_server.cmd("RENAME", minute_key("k-tpm"), minute_key("k-tpm", -1))
    r = native(n, "k-tpm")
    assert r.status == 200, r.text


def test_tpd_refuses_once_reached_and_recovers(nginx, redis_server, backend):
    redis_server.add_key("k-tpd", scopes="chat,read", tpd=500)
    n = nginx(LIMITS, redis=redis_server)
    redis_server.cmd("HSET", day_key("k-tpd"), "requests", 3,
                     "prompt_tokens", 450, "completion_tokens", 49)
    r = chat(n, "k-tpd")
    assert r.status == 200, r.text
    assert r.headers["x-ratelimit-limit-tokens"] == "500"
    assert r.headers["x-ratelimit-remaining-tokens"] == "1"
    wait_requests(redis_server, "k-tpd", 4)

    r = chat(n, "k-tpd")
    err = assert_refused(r, 429, "rate_limit_exceeded", "tokens")
    assert "500 tokens per day" in err["message"]
    retry = int(r.headers["retry-after"])
    now = int(time.time())
    assert abs(retry - (86400 - now % 86400)) <= 2
    assert abs(seconds(r.headers["x-ratelimit-reset-tokens"]) - retry) <= 2

    # the day turns: yesterday's counts no longer apply
    yesterday = time.strftime("%Y%m%d", time.gmtime(time.time() - 86400))
    redis_server.cmd("RENAME", day_key("k-tpd"), day_key("k-tpd", yesterday))
    assert chat(n, "k-tpd").status == 200


def test_two_gateways_share_the_count(nginx, redis_server, backend):
    redis_server.add_key("k-shared", scopes="chat,read", tpm=10 ** 6)
    a = nginx(LIMITS, redis=redis_server)
    b = nginx(LIMITS, redis=redis_server)
    ra = chat(a, "k-shared")
    assert ra.status == 200
    wait_requests(redis_server, "k-shared", 1)
    used = ra.json()["usage"]["total_tokens"]
    rb = chat(b, "k-shared")
    assert rb.status == 200
    assert int(rb.headers["x-ratelimit-remaining-tokens"]) == 10 ** 6 - used

    redis_server.cmd("SET", minute_key("k-shared"), 10 ** 6, "EX", 120)
    assert chat(a, "k-shared").status == 429
    assert chat(b, "k-shared").status == 429


def test_ratelimit_headers(nginx, redis_server, backend):
    redis_server.add_key("k-lim", scopes="chat,read", rpm=5, tpm=100000)
    redis_server.add_key("k-free", scopes="chat,read")
    n = nginx(LIMITS, redis=redis_server)

    r = chat(n, "k-lim")
    assert r.status == 200
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "5"
    assert h["x-ratelimit-remaining-requests"] == "4"
    assert h["x-ratelimit-limit-tokens"] == "100000"
    assert h["x-ratelimit-remaining-tokens"] == "100000"
    now = time.time()
    assert abs(seconds(h["x-ratelimit-reset-requests"])
               - (60 - now % 60)) <= 1.5
    assert abs(seconds(h["x-ratelimit-reset-tokens"])
               - (60 - now % 60)) <= 1.5
    wait_requests(redis_server, "k-lim", 1)
    used = r.json()["usage"]["total_tokens"]

    # any answer: a stream, the native API, a refusal for the rate
    r = n.post("/api/v1/workspace/sales/stream-chat", headers=bearer("k-lim"),
               json={"message": "x"})
    assert r.status == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "3"
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 100000 - used
    assert n.get("/api/v1/workspaces",
                 headers=bearer("k-lim")).headers[
        "x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        n.get("/api/v1/auth", headers=bearer("k-lim"))
    r = n.get("/api/v1/auth", headers=bearer("k-lim"))
    assert_refused(r, 429, "rate_limit_exceeded", "requests")
    assert r.headers["x-ratelimit-remaining-requests"] == "0"

    # a key without limits gets none
    r = chat(n, "k-free")
    assert r.status == 200
    assert not [k for k in r.headers if k.startswith("x-ratelimit")]


def test_reset_formats():
    assert seconds("6m0s") == 360 and seconds("1s") == 1
    assert seconds("59ms") == 0.059 and seconds("1h2m3s") == 3723


def test_auth_shows_the_key_its_own_record_and_use(nginx, redis_server,
                                                   backend):
    redis_server.add_key("k-me", name="me", scopes="read,chat",
                         workspaces="sales, support", rpm=60, tpm=5000,
                         tpd=90000)
    redis_server.add_key("k-other", name="other", scopes="chat")
    n = nginx(LIMITS, redis=redis_server)

    r = n.get("/api/v1/auth", headers=bearer("k-me"))
    assert r.status == 200, r.text
    body = r.json()
    assert body == {
        "authenticated": True, "id": key_digest("k-me")[:12], "name": "me",
        "scopes": ["chat", "read"], "workspaces": ["sales", "support"],
        "limits": {"rpm": 60, "tpm": 5000, "tpd": 90000},
        "usage": {"date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                  "total_tokens": 0}}
    assert r.headers["content-length"] == str(len(r.body))
    assert backend.requests(path="/api/v1/auth")

    r = native(n, "k-me")
    m = r.json()["metrics"]
    wait_requests(redis_server, "k-me", 1)
    body = n.get("/api/v1/auth", headers=bearer("k-me")).json()
    assert body["usage"]["requests"] == 1
    assert body["usage"]["prompt_tokens"] == m["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == m["completion_tokens"]

    # another key sees only its own; no digest, no key in the answer
    r = n.get("/api/v1/auth", headers=bearer("k-other"))
    body = r.json()
    assert body["name"] == "other" and body["workspaces"] == "*"
    assert body["usage"]["requests"] == 0
    assert body["limits"] == {"rpm": 0, "tpm": 0, "tpd": 0}
    assert key_digest("k-me")[:12] not in r.text
    assert key_digest("k-other") not in r.text
    assert "k-other" not in r.text
