"""Usage accounting: every chat answer to a key adds its request and
AnythingLLM's token counts to the key's counters of the day in Redis,
on the OpenAI routes and AnythingLLM's own chat routes, stream or not;
native answers pass unchanged.  Token limits (a key's tpm and tpd,
fleet-wide through Redis), OpenAI's x-ratelimit-* headers on every answer
to a key with limits, and GET /api/v1/auth showing a key its own record
and the day's use."""

import collections
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time

from lib import helpers, resp
from lib.auth import bearer
from lib.openai import assert_refused, chunk, finalize, user
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


def native_stream(n, key, text="hello"):
    return n.post("/api/v1/workspace/sales/stream-chat",
                  json={"message": text}, headers=bearer(key))


def wait_requests(redis_server, key, count):
    helpers.wait_until(
        lambda: redis_server.hgetall(day_key(key)).get("requests")
        == str(count), message="usage never reached %d" % count)


def counters(redis_server, key, d=None):
    h = redis_server.hgetall(day_key(key, d))
    return {k: int(v) for k, v in h.items()}


def wait_counters(redis_server, key, requests, d=None):
    """The counters once the log phase has sent the request-th count."""
    return helpers.wait_until(
        lambda: (lambda c: c if c.get("requests") == requests else None)(
            counters(redis_server, key, d)),
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


def sleep_until(when):
    time.sleep(max(0.0, when - time.time()))


MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
DAY_NAME = re.compile(r"^anythingllm:usage:([0-9a-f]{64}):(\d{8})$")
MINUTE_NAME = re.compile(r"^anythingllm:tpm:([0-9a-f]{64}):(\d+)$")


class Monitor:
    """Redis MONITOR on a connection of its own: the usage script runs
    Redis is sent, read as the gateway laid them out."""

    def __init__(self, redis_server):
        self.c = redis_server.connect()
        assert self.c.cmd("MONITOR") == "OK"

    def close(self):
        self.c.close()

    def usage_runs(self, answers):
        """The next usage script runs, until they hold answers answers:
        each as (args after the script, entries), an entry (digest,
        minute or None, requests, prompt, completion)."""
        runs, seen = [], 0
        while seen < answers:
            try:
                line = self.c.reply()
            except resp.Failure:
                raise AssertionError("the usage script runs held %d of "
                                     "%d answers: %r"
                                     % (seen, answers, runs))
            args = MONITOR_ARG.findall(line)
            if args[:1] != ["EVAL"] or "HINCRBY" not in args[1]:
                continue
            entries = usage_entries(args[2:])
            runs.append((args[2:], entries))
            seen += sum(e[2] for e in entries)
        assert seen == answers, runs
        return runs


def usage_entries(args):
    """numkeys, KEYS, then the two times to live and four counts an
    entry, the last "1" when the entry's minute counter follows its
    day hash in KEYS"""
    n = int(args[0])
    keys, argv = args[1:1 + n], args[1 + n:]
    assert argv[:2] == ["34560000", "120"], args
    assert len(argv) % 4 == 2, args
    entries, k = [], 0
    for a in range(2, len(argv), 4):
        day = DAY_NAME.match(keys[k])
        assert day, args
        k += 1
        minute = None
        if argv[a + 3] == "1":
            m = MINUTE_NAME.match(keys[k])
            assert m and m.group(1) == day.group(1), args
            assert time.strftime("%Y%m%d", time.gmtime(
                int(m.group(2)) * 60)) == day.group(2), args
            minute = int(m.group(2))
            k += 1
        else:
            assert argv[a + 3] == "0", args
        entries.append((day.group(1), minute, int(argv[a]),
                        int(argv[a + 1]), int(argv[a + 2])))
    assert k == n, args
    return entries


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


def test_a_burst_of_answers_is_counted_exactly(nginx, redis_server,
                                              backend):
    """Answers ending together are counted together, summed per key:
    nothing is lost or counted twice, each key keeps its own counters
    and only a key with a tpm gets a minute counter."""
    keys = {"k-burst-a": {}, "k-burst-b": {"tpm": 10 ** 7},
            "k-burst-c": {}}
    for key, limits in keys.items():
        redis_server.add_key(key, scopes="chat,read", **limits)
    n = nginx(USAGE, redis=redis_server)
    calls = [(key, i) for i in range(16) for key in keys]

    def one(call):
        key, i = call
        if i % 2:
            r = chat(n, key, "question number %d of a burst" % i)
            assert r.status == 200, r.text
            u = r.json()["usage"]
            return key, u["prompt_tokens"], u["completion_tokens"]
        r = native(n, key, "burst %d" % i)
        assert r.status == 200, r.text
        m = r.json()["metrics"]
        return key, m["prompt_tokens"], m["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, calls))

    for key, limits in keys.items():
        mine = [r for r in results if r[0] == key]
        prompt = sum(r[1] for r in mine)
        completion = sum(r[2] for r in mine)
        assert prompt > 0 and completion > 0
        c = wait_counters(redis_server, key, 16)
        assert c == {"requests": 16, "prompt_tokens": prompt,
                     "completion_tokens": completion}, key
        minute = [int(redis_server.cmd("GET", minute_key(key, d)) or 0)
                  for d in (-1, 0)]
        assert sum(minute) == (prompt + completion if limits else 0), key


def test_a_refused_burst_counts_every_answer_as_an_error(
        nginx, redis_server, backend):
    redis_server.add_key("k-refused", scopes="chat,read")
    redis_server.add_key("k-refused-2", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    for key in ("k-refused", "k-refused-2"):
        assert chat(n, key).status == 200
        wait_counters(redis_server, key, 1)
    with redis_server.refusing_writes():
        calls = ["k-refused", "k-refused-2"] * 6
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda k: chat(n, k).status, calls))
        assert statuses == [200] * 12
        helpers.wait_until(
            lambda: "\nanythingllm_usage_errors_total 12\n"
            in n.get("/metrics").text,
            message="the refused answers never all reached the metrics")
    for key in ("k-refused", "k-refused-2"):
        assert counters(redis_server, key)["requests"] == 1


def test_more_keys_in_one_turn_than_a_batch_holds_are_all_counted(
        nginx, redis_server, backend):
    """Answers of 40 keys (two each, a quarter of the keys with a tpm)
    ending in one turn of the event loop: the batch goes to Redis when
    its 32 entries are full, the rest at the end of the turn, and every
    key's counters are exact.  The worker is stopped while AnythingLLM
    ends the answers, so that it reads all of them in one turn."""
    keys = ["k-full-%02d" % i for i in range(40)]
    tpm = set(keys[::4])
    for key in keys:
        redis_server.add_key(key, scopes="chat,read",
                             tpm=10 ** 7 if key in tpm else 0)
    n = nginx(USAGE, redis=redis_server, workers=1)
    calls = keys * 2
    for i in range(len(calls)):
        backend.script(endpoint="stream-chat", times=1, events=[
            {"frame": chunk("held")}, {"wait": "end"},
            {"frame": finalize(prompt=100 + i, completion=1 + i)}])
    monitor = Monitor(redis_server)

    def one(key):
        r = native_stream(n, key)
        assert r.status == 200, r.text
        m = metrics_of_frames(r.text)
        return key, m["prompt_tokens"], m["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        answers = [pool.submit(one, key) for key in calls]
        helpers.wait_until(
            lambda: backend.state()["waiting"].get("end") == len(calls),
            timeout=10, message="the answers never all waited")
        worker, = n.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        try:
            backend.release("end")
            helpers.wait_until(
                lambda: backend.connections()["completed_streams"]
                == len(calls), message="the answers never all ended")
        finally:
            os.kill(worker, signal.SIGCONT)
        results = [a.result() for a in answers]

    runs = monitor.usage_runs(len(calls))
    monitor.close()
    assert max(len(entries) for _, entries in runs) == 32, runs

    for key in keys:
        mine = [r for r in results if r[0] == key]
        prompt = sum(r[1] for r in mine)
        completion = sum(r[2] for r in mine)
        c = wait_counters(redis_server, key, 2)
        assert c == {"requests": 2, "prompt_tokens": prompt,
                     "completion_tokens": completion}, key
        minute = [int(redis_server.cmd("GET", minute_key(key, d)) or 0)
                  for d in (-1, 0)]
        assert sum(minute) == (prompt + completion if key in tpm else 0), key


def test_answers_either_side_of_a_minute_boundary_count_in_their_minute(
        nginx, redis_server, backend):
    """A key's answers that end just before a minute turns count in that
    minute's token counter, those that end just after in the next
    one's, and the day's hash (or the two days' when the minute is
    midnight UTC) holds them all.  Waits for a minute boundary: up to a
    minute."""
    redis_server.add_key("k-turn", scopes="chat,read", tpm=10 ** 7)
    n = nginx(USAGE, redis=redis_server)
    sides = (("before", 30, 5), ("after", 20, 7))
    for wait, prompt, completion in sides:
        backend.script(endpoint="stream-chat", times=4, events=[
            {"frame": chunk("held")}, {"wait": wait},
            {"frame": finalize(prompt=prompt, completion=completion)}])

    def one(_):
        r = native_stream(n, "k-turn")
        assert r.status == 200, r.text
        return metrics_of_frames(r.text), time.time()

    boundary = (int(time.time()) // 60 + 1) * 60
    if boundary - time.time() < 3.5:
        boundary += 60
    sleep_until(boundary - 3)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = {}
        for wait, _, _ in sides:
            answers[wait] = [pool.submit(one, i) for i in range(4)]
            helpers.wait_until(
                lambda: backend.state()["waiting"].get(wait) == 4,
                message="the answers never waited at %s" % wait)
        sleep_until(boundary - 1)
        backend.release("before")
        ended = [a.result()[1] for a in answers["before"]]
        assert max(ended) < boundary, \
            "the answers before the boundary ended after it: %r" % ended
        sleep_until(boundary + 0.1)
        backend.release("after")
        for wait, prompt, completion in sides:
            assert [a.result()[0] for a in answers[wait]] == [{
                "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}] * 4

    minutes = (boundary // 60 - 1, boundary // 60)
    days = collections.defaultdict(
        lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
    for m, (_, prompt, completion) in zip(minutes, sides):
        day = days[time.strftime("%Y%m%d", time.gmtime(m * 60))]
        day["requests"] += 4
        day["prompt_tokens"] += 4 * prompt
        day["completion_tokens"] += 4 * completion

    # a script run counts in the day's hash and the minute's counter
    for d, want in days.items():
        assert wait_counters(redis_server, "k-turn", want["requests"],
                             d) == want, d
    for m, (_, prompt, completion) in zip(minutes, sides):
        assert redis_server.cmd(
            "GET", "anythingllm:tpm:%s:%d" % (key_digest("k-turn"), m)) \
            == b"%d" % (4 * (prompt + completion)), m


def test_a_key_without_a_tpm_sends_no_minute_counter(nginx, redis_server,
                                                    backend):
    """The usage script is sent a key's minute counter only when the key
    has a tpm: MONITOR shows each run's keys and arguments."""
    redis_server.add_key("k-plain", scopes="chat,read")
    redis_server.add_key("k-tpm", scopes="chat,read", tpm=10 ** 7)
    n = nginx(USAGE, redis=redis_server)
    monitor = Monitor(redis_server)
    sent = []
    for key in ("k-plain", "k-tpm", "k-plain"):
        r = chat(n, key)
        assert r.status == 200, r.text
        u = r.json()["usage"]
        sent.append((key, u["prompt_tokens"], u["completion_tokens"]))
        wait_requests(redis_server, key,
                      len([s for s in sent if s[0] == key]))
    runs = monitor.usage_runs(len(sent))
    monitor.close()

    assert len(runs) == len(sent)
    for (args, _), (key, prompt, completion) in zip(runs, sent):
        d = day_key(key)
        counts = ["34560000", "120", "1", str(prompt), str(completion)]
        if key == "k-plain":
            assert args == ["1", d] + counts + ["0"]
        else:
            m = MINUTE_NAME.match(args[2])
            assert m and abs(int(m.group(2)) - time.time() // 60) <= 1
            assert args == ["2", d, args[2]] + counts + ["1"]
    assert redis_server.cmd("KEYS", "anythingllm:tpm:*") == [
        runs[1][0][2].encode()]


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
    with redis_server.refusing_writes():
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


def test_a_stream_whose_end_has_no_counts_counts_its_pieces(
        nginx, redis_server, backend):
    redis_server.add_key("k-usage", name="usage", scopes="chat,read")
    n = nginx(USAGE, redis=redis_server)
    h = bearer("k-usage")
    no_counts = finalize()
    del no_counts["metrics"]
    empty_counts = finalize(metrics={})
    sent = 0
    for end in (no_counts, empty_counts):
        for path in ("/api/v1/workspace/sales/stream-chat",
                     "/v1/chat/completions"):
            backend.script(endpoint="stream-chat", events=[
                {"frame": chunk("one")}, {"frame": chunk(" two")},
                {"frame": chunk(" three", close=True)}, {"frame": end}])
            body = {"message": "x"} if path.startswith("/api") else {
                "model": "sales", "stream": True, "messages": [user("x")]}
            r = n.post(path, json=body, headers=h)
            assert r.status == 200, r.text
            assert "three" in r.text
            sent += 1
    # three pieces each, as for a stream left before its end
    c = wait_counters(redis_server, "k-usage", sent)
    assert c == {"requests": 4, "prompt_tokens": 0, "completion_tokens": 12}


def test_tpm_refuses_once_reached_and_recovers(nginx, redis_server, backend):
    redis_server.add_key("k-tpm", scopes="chat,read", tpm=1000)
    n = nginx(USAGE, redis=redis_server)

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
    n = nginx(USAGE, redis=redis_server)
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
    a = nginx(USAGE, redis=redis_server)
    b = nginx(USAGE, redis=redis_server)
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
    n = nginx(USAGE, redis=redis_server)

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
    n = nginx(USAGE, redis=redis_server)

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


def test_auth_answers_that_are_not_the_echo_pass_as_they_were(
        nginx, redis_server, backend):
    redis_server.add_key("k-me", name="me", scopes="read,chat")
    n = nginx(USAGE, redis=redis_server)
    answers = [
        (200, {"body": "upstream says hi"}),
        (200, {"body": '{"authenticated": tru'}),
        (200, {"json": {"authenticated": False}}),
        (200, {"json": ["authenticated", True]}),
        (403, {"json": {"error": "No valid api key found."}}),
        (200, {"body": ""}),
    ]
    for status, answer in answers:
        backend.script(path="/api/v1/auth", status=status, **answer)
        direct = helpers.get(backend.url + "/api/v1/auth",
                             headers=bearer(backend.api_key))
        backend.script(path="/api/v1/auth", status=status, **answer)
        via = n.get("/api/v1/auth", headers=bearer("k-me"))
        assert via.status == direct.status == status
        assert via.body == direct.body, answer
        assert via.headers["content-length"] == str(len(direct.body))
        assert key_digest("k-me")[:12] not in via.text
    # and the echo itself is enriched again afterwards
    r = n.get("/api/v1/auth", headers=bearer("k-me"))
    assert r.status == 200 and r.json()["name"] == "me"
