"""Usage accounting: every chat answer to a key adds its request and
AnythingLLM's token counts to the key's counters of the day in Redis,
on the OpenAI routes and AnythingLLM's own chat routes, stream or not;
native answers pass unchanged."""

import json
import subprocess
import time

from lib import helpers
from lib.auth import bearer
from lib.openai import chunk, finalize, user
from lib.paths import KEYS_TOOL
from lib.processes import key_digest


USAGE = """
    anythingllm_redis      @REDIS@ timeout=2s;
    anythingllm_key_cache  zone=alm_keys:1m valid=30s invalid=5s;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";
        proxy_buffering     off;

        location = /metrics {
            anythingllm_auth  off;
            anythingllm_metrics;
        }

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            proxy_pass  http://anythingllm;
        }
    }
"""


def day_key(key, prefix="anythingllm:"):
    return "%susage:%s:%s" % (prefix, key_digest(key),
                              time.strftime("%Y%m%d", time.gmtime()))


def counters(redis_server, key):
    h = redis_server.hgetall(day_key(key))
    return {k: int(v) for k, v in h.items()}


def wait_counters(redis_server, key, requests):
    """The counters once the log phase has sent the request-th count."""
    return helpers.wait_until(
        lambda: (lambda c: c if c.get("requests") == requests else None)(
            counters(redis_server, key)),
        message="usage never reached %d requests" % requests)


def metrics_of_frames(text):
    """The last metrics with counts among a native stream's frames."""
    found = None
    for line in text.splitlines():
        if line.startswith("data:"):
            frame = json.loads(line[5:])
            if frame.get("metrics", {}).get("prompt_tokens") is not None:
                found = frame["metrics"]
    return found


def add(total, prompt, completion):
    total[0] += prompt
    total[1] += completion


def test_every_chat_route_counts_what_anythingllm_reported(
        nginx, redis_server, backend):
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    h = bearer("k-usage")
    total = [0, 0]

    # a thread to chat in (made by a route that counts nothing)
    r = n.post("/api/v1/workspace/sales/thread/new",
               json={"name": "T", "slug": "t1"}, headers=h)
    assert r.status == 200, r.text

    # native chat and stream-chat, of the workspace and of the thread
    for base in ("/api/v1/workspace/sales",
                 "/api/v1/workspace/sales/thread/t1"):
        for call, text in (("chat", "hello there"),
                           ("stream-chat", "tell me more")):
            r = n.post("%s/%s" % (base, call), json={"message": text},
                       headers=h)
            assert r.status == 200, r.text
            m = r.json()["metrics"] if call == "chat" \
                else metrics_of_frames(r.text)
            assert m, r.text
            add(total, m["prompt_tokens"], m["completion_tokens"])

    # OpenAI, whole and stream (with the usage chunk)
    r = n.post("/v1/chat/completions", headers=h,
               json={"model": "sales", "messages": [user("a question")]})
    assert r.status == 200, r.text
    u = r.json()["usage"]
    add(total, u["prompt_tokens"], u["completion_tokens"])
    r = n.post("/v1/chat/completions", headers=h,
               json={"model": "sales", "stream": True,
                     "stream_options": {"include_usage": True},
                     "messages": [user("another question here")]})
    assert r.status == 200, r.text
    u = [json.loads(line[5:]) for line in r.text.splitlines()
         if line.startswith("data:") and "[DONE]" not in line][-1]["usage"]
    add(total, u["prompt_tokens"], u["completion_tokens"])

    assert total[0] > 0 and total[1] > 0
    c = wait_counters(redis_server, "k-usage", 6)
    assert c == {"requests": 6, "prompt_tokens": total[0],
                 "completion_tokens": total[1]}
    ttl = redis_server.cmd("TTL", day_key("k-usage"))
    assert 365 * 86400 < ttl <= 400 * 86400

    # the key tool reads the same counters
    p = subprocess.run([KEYS_TOOL, "--redis", redis_server.addr, "usage",
                        "-", "--days", "1", "--json"], input="k-usage\n",
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    u = json.loads(p.stdout)
    assert u["total"] == {"requests": 6, "prompt_tokens": total[0],
                          "completion_tokens": total[1],
                          "total_tokens": total[0] + total[1]}
    assert u["keys"][0]["name"] == "usage"


def test_native_answers_pass_unchanged(nginx, redis_server, backend):
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    events = [{"frame": chunk("Hello")}, {"frame": chunk(" world")},
              {"frame": chunk("", close=True)},
              {"frame": finalize(prompt=17, completion=4)}]
    backend.script(endpoint="stream-chat", events=events)
    direct = helpers.post(backend.url + "/api/v1/workspace/sales/stream-chat",
                          json={"message": "same"},
                          headers=bearer(backend.api_key))
    backend.script(endpoint="stream-chat", events=events)
    via = n.post("/api/v1/workspace/sales/stream-chat",
                 json={"message": "same"}, headers=bearer("k-usage"))
    assert via.status == 200
    assert via.text == direct.text
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert wait_counters(redis_server, "k-usage", 1) == {
        "requests": 1, "prompt_tokens": 17, "completion_tokens": 4}


def test_refused_and_other_routes_count_nothing(nginx, redis_server, backend):
    redis_server.add_key("k-read", name="reader", scopes="read")
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    r = n.post("/api/v1/workspace/sales/chat", json={"message": "x"},
               headers=bearer("k-read"))
    assert r.status == 403
    assert n.get("/api/v1/workspaces", headers=bearer("k-usage")).status \
        == 200
    r = n.post("/api/v1/workspace/sales/chat", json={"message": "x"},
               headers=bearer("k-usage"))
    assert r.status == 200
    wait_counters(redis_server, "k-usage", 1)
    assert counters(redis_server, "k-read") == {}


def test_redis_failure_never_fails_the_answer(nginx, redis_server, backend):
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    # the key is cached; then Redis refuses every script
    r = n.post("/api/v1/workspace/sales/chat", json={"message": "x"},
               headers=bearer("k-usage"))
    assert r.status == 200
    wait_counters(redis_server, "k-usage", 1)
    redis_server.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.cmd("CONFIG", "SET", "maxmemory", "1")
    try:
        r = n.post("/api/v1/workspace/sales/chat", json={"message": "y"},
                   headers=bearer("k-usage"))
        assert r.status == 200, r.text
        r = n.post("/v1/chat/completions", headers=bearer("k-usage"),
                   json={"model": "sales", "messages": [user("z")]})
        assert r.status == 200, r.text
        # counted as refused in the metrics, while Redis still refuses
        helpers.wait_until(
            lambda: "\nanythingllm_usage_errors_total 2\n"
            in n.get("/metrics").text,
            message="the two refused counts never reached the metrics")
    finally:
        redis_server.cmd("CONFIG", "SET", "maxmemory", "0")
    assert counters(redis_server, "k-usage")["requests"] == 1


def test_a_stream_left_mid_way_counts_what_was_generated(
        nginx, redis_server, backend):
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    h = bearer("k-usage")
    for path in ("/api/v1/workspace/sales/stream-chat",
                 "/v1/chat/completions"):
        backend.script(endpoint="stream-chat", events=[
            {"frame": chunk("one")}, {"frame": chunk(" two")},
            {"frame": chunk(" three")}, {"wait": "never"},
            {"frame": finalize(prompt=50, completion=3)}])
        body = {"message": "x"} if path.startswith("/api") else {
            "model": "sales", "stream": True, "messages": [user("x")]}
        s = helpers.StreamReader("POST", n.url + path, json=body, headers=h)
        s.read_until(b"three")
        s.close()
    # three pieces each; AnythingLLM's counts never came
    c = wait_counters(redis_server, "k-usage", 2)
    assert c == {"requests": 2, "prompt_tokens": 0, "completion_tokens": 6}
