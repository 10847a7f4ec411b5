"""A flood of distinct keys against a small metrics zone: the answer
keeps the zone's number of per-key series, no request is lost from the
per-key counts, and the workers' memory stays flat."""

import asyncio
import time

import pytest

from lib.metrics import counted, keyed, verdicts
from lib.processes import ASAN, PREFIX, flat, key_digest

KEYS = 100000
WARMUP = 20000
CONNECTIONS = 64
# RSS the workers together may gain over the last 80k keys; see the test
RSS_SLACK = 512 * 1024

# the keys are checked by the module and answered by nginx itself
# (empty_gif), so that the flood measures the gateway alone
FLOOD = """
    anythingllm_redis         @REDIS@ timeout=5s;
    anythingllm_key_cache     zone=alm_keys:1m valid=30s invalid=5s;
    anythingllm_metrics_zone  32k;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;
        keepalive_requests        10000;

        location = /metrics {
            anythingllm_auth  off;
            allow             127.0.0.1;
            deny              all;
            anythingllm_metrics;
        }

        location /api/v1/ {
            access_log  off;
            empty_gif;
        }
    }
"""


def flood_key(i):
    return "k-flood-%06d" % i


def store_keys(redis_server, n, batch=5000):
    """n keys as anythingllm-keys stores them, written pipelined."""
    c = redis_server.connect()
    now = int(time.time())
    try:
        for start in range(0, n, batch):
            end = min(start + batch, n)
            for i in range(start, end):
                c.send("HSET", "%skey:%s" % (PREFIX,
                                            key_digest(flood_key(i))),
                       *flat({"name": "flood %d" % i, "scopes": "read",
                              "workspaces": "*", "rpm": 0, "expires": 0,
                              "disabled": 0, "created": now}))
            for i in range(start, end):
                assert c.reply() == 7
    finally:
        c.close()


async def _client(reader, writer, keys, statuses):
    for i in keys:
        writer.write(("GET /api/v1/auth HTTP/1.1\r\n"
                      "Host: localhost\r\n"
                      "Authorization: Bearer %s\r\n\r\n"
                      % flood_key(i)).encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        statuses[status] = statuses.get(status, 0) + 1


class Flood:
    """CONNECTIONS keepalive connections, open from the first run of keys
    to the last: each worker keeps the connections it accepted, and the
    memory it holds for them, from one run to the next.  New connections
    for each run would be shared out between the workers anew, and a
    worker given more of them than before grows its heap for them."""

    def __init__(self, port):
        self.loop = asyncio.new_event_loop()
        self.conns = []

        async def connect():
            for _ in range(CONNECTIONS):
                self.conns.append(
                    await asyncio.open_connection("127.0.0.1", port))
        try:
            self.loop.run_until_complete(connect())
        except BaseException:
            self.close()
            raise

    def run(self, first, last):
        """GET with each key in [first, last) once, over every
        connection at once; {status: count}."""
        statuses = {}

        async def main():
            await asyncio.gather(*(
                _client(r, w, range(first + c, last, CONNECTIONS),
                        statuses)
                for c, (r, w) in enumerate(self.conns)))
        self.loop.run_until_complete(main())
        return statuses

    def close(self):
        async def close_all():
            for _, w in self.conns:
                w.close()
            for _, w in self.conns:
                try:
                    await w.wait_closed()
                except OSError:
                    pass
        self.loop.run_until_complete(close_all())
        self.loop.close()


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def settled(n, total):
    """The answer once every request is counted, each in a key's series
    (the log phase comes after the answer is sent)."""
    return counted(n, total, total, timeout=10)


@pytest.mark.slow
def test_many_keys_bounded_answer_flat_memory(nginx, redis_server):
    store_keys(redis_server, KEYS)
    # nothing is proxied: no stand-in behind it
    n = nginx(FLOOD, redis=redis_server, upstream="127.0.0.1:9",
              workers=2, log_level="warn")
    pids = n.worker_pids()
    flood = Flood(n.port)
    try:
        check_flat_memory(n, pids, flood)
    finally:
        flood.close()


def check_flat_memory(n, pids, flood):
    # warm up: the cache and metrics zones full, every connection made,
    # each worker's pools and Redis buffers at their working size
    assert flood.run(0, WARMUP) == {200: WARMUP}
    m = settled(n, WARMUP)
    per_key = keyed(m, "anythingllm_key_requests_total")
    # 32k holds 64 keys (the README), and the rest is "other"
    assert len(per_key) == 64 + 1
    assert sum(per_key.values()) == WARMUP
    lines = len(n.get("/metrics").text.splitlines())
    before = {pid: rss(pid) for pid in pids}

    assert flood.run(WARMUP, KEYS) == {200: KEYS - WARMUP}
    m = settled(n, KEYS)
    assert verdicts(m) == {"redis": KEYS}

    # the answer: as many series and lines as before; every request of
    # a key in one series, the last keys seen have their own
    per_key = keyed(m, "anythingllm_key_requests_total")
    assert len(per_key) == 64 + 1
    assert sum(per_key.values()) == KEYS
    assert per_key["other"] == KEYS - 64
    assert set(per_key) - {"other"} <= {
        key_digest(flood_key(i))[:12] for i in range(KEYS - 1000, KEYS)}
    for family in ("anythingllm_key_refusals_total",
                   "anythingllm_key_prompt_tokens_total",
                   "anythingllm_key_completion_tokens_total"):
        assert len(keyed(m, family)) == 64 + 1, family
    assert len(n.get("/metrics").text.splitlines()) == lines

    # memory: the zones are shared and of a fixed size (the warm-up
    # touched all their pages), and nothing a request allocates
    # outlives it, so 80k more keys leave the workers' RSS where the
    # warm-up left it.  The slack (the workers together) is what the
    # heap may still settle by, about 150k here; a leak of 8 bytes a
    # request would be 640k and fail
    assert n.worker_pids() == pids
    if ASAN:
        # ASan holds freed memory in its quarantine (256 MB a process by
        # design) and grows its shadow with it, so RSS says nothing of
        # the module in that pass; LeakSanitizer checks it for leaks
        return
    after = {pid: rss(pid) for pid in pids}
    grown = sum(after[pid] - before[pid] for pid in pids)
    assert grown <= RSS_SLACK, (before, after)
