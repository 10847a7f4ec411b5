"""anythingllm_metrics: Prometheus' text format from shared memory, every
worker's counts in one answer, kept across a reload; per-key series
bounded by the zone, the least recently seen keys folded into
key_id="other"."""

import json
import os
import re
import signal

from lib import helpers
from lib.auth import access_field, bearer, wait_access_lines
from lib.metrics import counted, keyed, scrape, value, verdicts
from lib.openai import abort, chunk, finalize, open_stream, user
from lib.paths import REPO
from lib.processes import LOG_FORMAT_MODULE, key_digest


# keys checked everywhere but /metrics, which only localhost may read;
# %(zone)s: an anythingllm_metrics_zone line a test adds
METRICS = """
    anythingllm_redis      @REDIS@ timeout=%(timeout)s;
    anythingllm_key_cache  zone=alm_keys:1m valid=30s invalid=5s;
    %(zone)s

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";

        location = /metrics {
            anythingllm_auth  off;
            allow             127.0.0.1;
            deny              all;
            anythingllm_metrics;
        }

        location /v1/ {
            anythingllm_openai          on;
            anythingllm_max_frame_size  1k;
            proxy_buffering             off;
            proxy_pass                  http://anythingllm;
        }

        location / {
            proxy_pass  http://anythingllm;
        }
    }
"""


def metrics_nginx(nginx, redis_server, zone="", timeout="2s", **kw):
    return nginx(METRICS % {"zone": zone, "timeout": timeout},
                 redis=redis_server, **kw)


def test_counts_of_a_known_workload(nginx, redis_server, backend):
    redis_server.add_key("k-alice", name='alice "A"', scopes="chat,read")
    redis_server.add_key("k-bob", name="bob", scopes="read")
    n = metrics_nginx(nginx, redis_server, workers=2)

    # the answer before any traffic: every family there, at zero
    m = scrape(n)
    assert verdicts(m) == {}
    assert value(m, "anythingllm_key_requests_total",
                 key_id="other", key_name="") == 0

    for _ in range(3):
        assert n.get("/api/v1/auth", headers=bearer("k-alice")).status == 200
    for _ in range(2):
        assert n.get("/api/v1/workspaces",
                     headers=bearer("k-bob")).status == 200
    assert n.get("/api/v1/admin/users",
                 headers=bearer("k-bob")).status == 403
    assert n.get("/api/v1/auth").status == 401
    assert n.get("/api/v1/auth", headers=bearer("k-nobody")).status == 401
    chat = n.post("/v1/chat/completions", headers=bearer("k-alice"),
                  json={"model": "sales", "messages": [user("hi")]})
    assert chat.status == 200, chat.text
    usage = chat.json()["usage"]

    # the log phase runs after the answer is sent: wait for the last one
    m = counted(n, 9, 7)

    assert verdicts(m) == {"redis": 2, "cached": 4, "denied_scope": 1,
                           "denied_missing": 1, "denied_unknown": 1}
    scopes = {dict(k[1])["scope"]: v for k, v in m.items()
              if k[0] == "anythingllm_requests_by_scope_total" and v}
    assert scopes == {"none": 5, "read": 2, "admin": 1, "chat": 1}
    assert value(m, "anythingllm_upstream_responses_total",
                 code="2xx") == 6

    alice = key_digest("k-alice")[:12]
    bob = key_digest("k-bob")[:12]
    assert keyed(m, "anythingllm_key_requests_total") == \
        {alice: 4, bob: 3, "other": 0}
    assert keyed(m, "anythingllm_key_refusals_total") == \
        {alice: 0, bob: 1, "other": 0}
    assert keyed(m, "anythingllm_key_prompt_tokens_total") == \
        {alice: usage["prompt_tokens"], bob: 0, "other": 0}
    assert keyed(m, "anythingllm_key_completion_tokens_total") == \
        {alice: usage["completion_tokens"], bob: 0, "other": 0}
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    # the name is a label value: its quotes escaped
    assert value(m, "anythingllm_key_requests_total", key_id=alice,
                 key_name='alice \\"A\\"') == 4

    # the key cache: a miss for each key's first request, then hits (an
    # unknown key's entry is a hit too); three entries, none pushed out
    assert value(m, "anythingllm_key_cache_misses_total") == 3
    assert value(m, "anythingllm_key_cache_hits_total") == 5
    assert value(m, "anythingllm_key_cache_entries") == 3
    assert value(m, "anythingllm_key_cache_evictions_total") == 0

    # Redis: the three lookups and what the chat stored; each answered
    # one is in the latency histogram, none failed.  The chat's usage
    # and conversation go to Redis after its log phase, together: its
    # record there tells that both are counted
    helpers.wait_until(lambda: redis_server.cmd("HLEN", "anythingllm:conv"),
                       timeout=5, message="the chat's conversation was "
                       "not stored")
    commands = value(scrape(n), "anythingllm_redis_commands_total")
    assert commands >= 3
    helpers.wait_until(lambda: value(
        scrape(n), "anythingllm_redis_latency_seconds_count") == commands,
        timeout=3)
    m = scrape(n)
    assert value(m, "anythingllm_redis_latency_seconds_bucket",
                 le="+Inf") == commands
    for name in ("errors", "timeouts", "reconnects"):
        assert value(m, "anythingllm_redis_%s_total" % name) == 0, name
    assert value(m, "anythingllm_revocations_total") == 0

    # every worker that hears a revocation counts it
    listeners = redis_server.revoke("k-bob")
    assert listeners == 2
    helpers.wait_until(lambda: value(
        scrape(n), "anythingllm_revocations_total") == listeners, timeout=3)


def test_redis_timeouts_and_reconnects(nginx, redis_server, backend):
    redis_server.add_key("k-slow")
    n = metrics_nginx(nginx, redis_server, timeout="100ms", workers=1)
    n.allow(r"redis (command|subscriber) connection .* timed out")
    redis_server.sleep(0.5)
    assert n.get("/api/v1/auth", headers=bearer("k-slow")).status == 503
    helpers.wait_until(lambda: value(
        scrape(n), "anythingllm_redis_reconnects_total") >= 1, timeout=3)
    m = scrape(n)
    assert value(m, "anythingllm_redis_timeouts_total") >= 1
    assert verdicts(m) == {"redis_error": 1}
    # once Redis answers again, the key passes
    helpers.wait_until(lambda: n.get(
        "/api/v1/auth", headers=bearer("k-slow")).status == 200, timeout=5)


def test_counts_survive_a_reload(nginx, redis_server, backend):
    redis_server.add_key("k-stay", name="stay")
    n = metrics_nginx(nginx, redis_server, workers=2)
    for _ in range(5):
        assert n.get("/api/v1/auth", headers=bearer("k-stay")).status == 200
    helpers.wait_until(
        lambda: sum(verdicts(scrape(n)).values()) == 5, timeout=3)

    n.reload()
    assert n.get("/api/v1/auth", headers=bearer("k-stay")).status == 200
    m = counted(n, 6, 6)
    stay = key_digest("k-stay")[:12]
    assert keyed(m, "anythingllm_key_requests_total") == \
        {stay: 6, "other": 0}


def test_cache_entries_of_the_zone_in_use(nginx, redis_server, backend):
    for k in ("k-e1", "k-e2"):
        redis_server.add_key(k)
    n = metrics_nginx(nginx, redis_server)
    for k in ("k-e1", "k-e2"):
        assert n.get("/api/v1/auth", headers=bearer(k)).status == 200
    assert value(scrape(n), "anythingllm_key_cache_entries") == 2

    # a reload that resizes the cache makes a new, empty zone: the gauge
    # is of that zone, while the counters go on
    n.reload(conf=n.conf.replace("zone=alm_keys:1m", "zone=alm_keys:2m"))
    m = scrape(n)
    assert value(m, "anythingllm_key_cache_entries") == 0
    assert value(m, "anythingllm_key_cache_misses_total") == 2
    assert n.get("/api/v1/auth", headers=bearer("k-e1")).status == 200
    assert value(scrape(n), "anythingllm_key_cache_entries") == 1


def test_many_keys_fold_into_other(nginx, redis_server, backend):
    keys = ["k-many-%03d" % i for i in range(120)]
    for k in keys:
        redis_server.add_key(k, name=k)
    n = metrics_nginx(nginx, redis_server,
                      zone="anythingllm_metrics_zone 32k;", workers=2)
    for k in keys:
        assert n.get("/api/v1/auth", headers=bearer(k)).status == 200
    m = counted(n, len(keys), len(keys))

    per_key = keyed(m, "anythingllm_key_requests_total")
    # bounded by the zone (the README: 32k holds 64 keys), none lost
    assert len(per_key) - 1 == 64, len(per_key)
    assert sum(per_key.values()) == len(keys)
    assert per_key["other"] == len(keys) - (len(per_key) - 1)
    # the least recently seen went first: the last key is still its own
    assert per_key[key_digest(keys[-1])[:12]] == 1

    # a folded key seen again comes back as its own series
    assert n.get("/api/v1/auth", headers=bearer(keys[0])).status == 200
    helpers.wait_until(
        lambda: key_digest(keys[0])[:12] in keyed(
            scrape(n), "anythingllm_key_requests_total"), timeout=3)


def test_only_get_and_head(nginx, redis_server, backend):
    n = metrics_nginx(nginx, redis_server)
    assert n.post("/metrics", json={}).status == 405
    r = n.request("HEAD", "/metrics")
    assert r.status == 200 and r.body == b""


def test_streams_by_how_they_end(nginx, redis_server, backend):
    redis_server.add_key("k-stream", scopes="chat")
    n = metrics_nginx(nginx, redis_server, workers=2,
                      log_format=LOG_FORMAT_MODULE.replace(
                          "';", " ft=$anythingllm_first_token_ms';"))
    key = bearer("k-stream")
    scripts = [
        [chunk("Hel"), chunk("lo", close=True), finalize()],   # complete
        [chunk("Hel"), abort()],                               # abort
        [chunk("Hel"), chunk("lo")],                           # cut
        [chunk("ok "), chunk("x" * 3000), chunk("", close=True),
         finalize()],                                          # oversized
    ]
    for frames in scripts:
        backend.script(endpoint="stream-chat",
                       events=[{"frame": f} for f in frames])
        s = open_stream(n, headers=key)
        s.read_all()
        assert s.done, s.text
        s.close()

    # a stream ends (and leaves the gauge) when its request goes, after
    # its answer's end reached the client
    ended = "anythingllm_streams_ended_total"
    helpers.wait_until(lambda: sum(
        v for k, v in scrape(n).items() if k[0] == ended) == 4, timeout=10,
        message="the four streams never all ended")

    # a client that leaves mid-way; the stream counts as open until then
    s = open_stream(n, "[slow] tell me a story", headers=key)
    s.next_frame(timeout=3)
    assert value(scrape(n), "anythingllm_streams_open") == 1
    s.close()

    # nginx notices the client left when it next writes to it
    helpers.wait_until(lambda: sum(
        v for k, v in scrape(n).items() if k[0] == ended) == 5, timeout=10)
    m = scrape(n)
    assert {dict(k[1])["cause"]: v for k, v in m.items()
            if k[0] == ended} == {"complete": 1, "upstream_abort": 1,
                                  "upstream_cut": 1, "oversized_frame": 1,
                                  "client_gone": 1}
    assert value(m, "anythingllm_streams_open") == 0
    assert value(m, "anythingllm_stream_duration_seconds_count") == 5
    # every one of them sent some text first
    assert value(m, "anythingllm_first_token_seconds_count") == 5
    assert keyed(m, "anythingllm_key_requests_total") == \
        {key_digest("k-stream")[:12]: 5, "other": 0}

    lines = wait_access_lines(n, 5)
    firsts = [access_field(l, "ft") for l in lines
              if "/v1/chat/completions" in l]
    assert len(firsts) == 5 and all(f.isdigit() for f in firsts), firsts


def held_streams(n, backend, count, name):
    """count chat streams through n, each held by the stand-in after its
    first frame until backend.release(name)."""
    backend.script(endpoint="stream-chat", times=count, events=[
        {"frame": chunk("held")}, {"wait": name},
        {"frame": chunk("", close=True)}, {"frame": finalize()}])
    streams = [open_stream(n, headers=bearer("k-held"))
               for _ in range(count)]
    for s in streams:
        assert s.next_frame(timeout=3) is not None
    helpers.wait_until(
        lambda: backend.state()["waiting"].get(name) == count, timeout=5,
        message="the streams never all waited at %r" % name)
    return streams


def end_streams(backend, name, streams):
    """Lets the held streams end, reads each to its end and closes it
    (or an exiting worker lingers 5 s on the connection it closes)."""
    backend.release(name)
    for s in streams:
        s.read_all()
        assert s.done, s.text
        s.close()


def streams_open(n):
    return value(scrape(n), "anythingllm_streams_open")


def test_streams_of_a_killed_worker_leave_the_gauge(nginx, redis_server,
                                                    backend):
    """A worker killed with streams open never ends them: once it is
    gone, the gauge no longer counts them, and counts the new worker's
    own streams."""
    redis_server.add_key("k-held", scopes="chat")
    n = metrics_nginx(nginx, redis_server, workers=1)
    n.allow(r"worker process \d+ exited on signal 9")

    streams = held_streams(n, backend, 3, "killed")
    assert streams_open(n) == 3

    old, = n.worker_pids()
    os.kill(old, signal.SIGKILL)
    helpers.wait_until(lambda: n.worker_pids() not in ([], [old]),
                       timeout=5, message="no worker started in its place")
    for s in streams:
        s.close()
    assert streams_open(n) == 0

    # the new worker counts its own
    again = held_streams(n, backend, 1, "again")
    assert streams_open(n) == 1
    end_streams(backend, "again", again)
    helpers.wait_until(lambda: streams_open(n) == 0, timeout=5)
    backend.release("killed")


def test_streams_of_old_workers_count_until_they_end(nginx, redis_server,
                                                     backend):
    """After a reload, the old worker (shutting down, with the same
    worker number as the new one) still answers its streams: they are
    counted until they end, beside the new worker's, in the zone that
    carried over."""
    redis_server.add_key("k-held", scopes="chat")
    n = metrics_nginx(nginx, redis_server, workers=1)

    streams = held_streams(n, backend, 2, "before")
    assert streams_open(n) == 2
    old, = n.worker_pids()

    n.reload()
    assert old in n.worker_pids()
    assert streams_open(n) == 2
    new = held_streams(n, backend, 1, "after")
    assert streams_open(n) == 3

    end_streams(backend, "before", streams)
    helpers.wait_until(lambda: old not in n.worker_pids(), timeout=5,
                       message="the old worker did not exit")
    assert streams_open(n) == 1

    end_streams(backend, "after", new)
    helpers.wait_until(lambda: streams_open(n) == 0, timeout=5)


def test_key_names_as_label_values(nginx, redis_server, backend):
    # cut to 64 bytes, here in the middle of the "é": that byte is a "?"
    redis_server.add_key("k-long", name="x" * 63 + "é")
    redis_server.add_key("k-line", name="a\\b\nc")
    n = metrics_nginx(nginx, redis_server)
    for k in ("k-long", "k-line"):
        assert n.get("/api/v1/auth", headers=bearer(k)).status == 200
    m = counted(n, 2, 2)
    assert value(m, "anythingllm_key_requests_total",
                 key_id=key_digest("k-long")[:12],
                 key_name="x" * 63 + "?") == 1
    assert value(m, "anythingllm_key_requests_total",
                 key_id=key_digest("k-line")[:12],
                 key_name="a\\\\b\\nc") == 1


def test_json_access_log_of_the_example(nginx, redis_server, backend):
    """conf/metrics.conf's log_format: one JSON object per request, with
    every variable of the module."""
    with open(os.path.join(REPO, "conf", "metrics.conf")) as f:
        conf = f.read()
    fmt = re.search(r"(?ms)^    log_format  anythingllm_json .*?';$",
                    conf).group(0)
    redis_server.add_key("k-json", name="json", scopes="chat")
    n = metrics_nginx(nginx, redis_server, log_format=fmt.replace(
        "anythingllm_json", "alm"))
    chat = n.post("/v1/chat/completions", headers=bearer("k-json"),
                  json={"model": "sales", "messages": [user("hi")]})
    assert chat.status == 200, chat.text
    line = json.loads(wait_access_lines(n, 1)[-1])
    usage = chat.json()["usage"]
    assert line["key_id"] == key_digest("k-json")[:12]
    assert line["key_name"] == "json"
    assert line["auth_result"] == "redis"
    assert line["workspace"] == "sales"
    assert line["prompt_tokens"] == str(usage["prompt_tokens"])
    assert line["completion_tokens"] == str(usage["completion_tokens"])
    assert line["first_token_ms"].isdigit()
    # every variable the README lists
    with open(os.path.join(REPO, "README.md")) as f:
        documented = set(re.findall(r"`\$(anythingllm_\w+)`", f.read()))
    assert set(re.findall(r"\$(anythingllm_\w+)", fmt)) == documented
