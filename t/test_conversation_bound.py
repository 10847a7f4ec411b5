"""
Conversation records in Redis are bounded by anythingllm_conversation_max,
never by traffic: a flood of completions against a Redis with a small
maxmemory keeps the count at the cap, evicts nothing, leaves every key
record and rate-limit counter working; and a Redis that refuses writes
(OOM) costs the clients nothing but the continuation of their sessions,
with no log flood.
"""

import concurrent.futures
import json
import re
import time

from lib import helpers
from lib.auth import bearer
from lib.openai import answer_of, assistant, user
from lib.processes import PREFIX
from lib.resp import RedisError


CAP = 200

# keys checked on the OpenAI routes under /v1/, room for CAP
# conversations kept a day, and a Redis timeout of 500ms
GATEWAY = """
    anythingllm_redis             @REDIS@ timeout=500ms;
    anythingllm_conversation_ttl  24h;
    anythingllm_conversation_max  200;

    server {
        listen  127.0.0.1:@PORT@;

        location /v1/ {
            anythingllm_openai        on;
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            anythingllm_auth          on;
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
            proxy_buffering           off;
        }
    }
"""


def chat(n, messages, key, model="sales"):
    return n.post("/v1/chat/completions", headers=bearer(key),
                  json={"model": model, "messages": messages})


def conv_keys(redis):
    """the <hex> of every conversation record"""
    return redis.cmd("HKEYS", PREFIX + "conv")


def conv_keys_and_index(redis):
    """the <hex> of every conversation record and the number of index
    entries, read in one transaction: the stores of the last answers
    may still be landing (the answers do not wait for them), and one
    between two readings would set them apart"""
    assert redis.cmd("MULTI") == "OK"
    redis.cmd("HKEYS", PREFIX + "conv")
    redis.cmd("ZCARD", PREFIX + "conv:until")
    return redis.cmd("EXEC")


def info(redis, section):
    text = redis.cmd("INFO", section).decode()
    return dict(l.split(":", 1) for l in text.splitlines() if ":" in l)


def oom_errors(redis):
    m = re.search(r"count=(\d+)",
                  info(redis, "errorstats").get("errorstat_OOM", ""))
    return int(m.group(1)) if m else 0


def last_session(backend):
    chats = [r for r in backend.requests("/api/v1/workspace/")
             if r["path"].endswith("chat")]
    return json.loads(chats[-1]["body"])


def flood(n, count, key, threads=6):
    """count single-turn completions; every tenth goes on to a second
    turn.  Returns the statuses."""
    def one(i):
        msgs = [user("flood %d" % i)]
        r = chat(n, msgs, key)
        statuses = [r.status]
        if i % 10 == 0 and r.status == 200:
            msgs += [assistant(answer_of(r)), user("again %d" % i)]
            statuses.append(chat(n, msgs, key).status)
        return statuses
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [s for ss in pool.map(one, range(count)) for s in ss]


def stored_after(redis, backend, call):
    """Runs call(), then waits until its conversation is stored (the
    answer does not wait for the store): a record in the index holds
    the session AnythingLLM was sent.  Returns what call()
    returned."""
    out = call()
    session = last_session(backend)["sessionId"].encode()

    # the whole index (at most the cap): entries stored within the same
    # second share a score and are ordered by their hex digits, so the
    # newest need not be last
    def stored():
        for h in redis.cmd("ZRANGE", PREFIX + "conv:until", 0, -1):
            if redis.cmd("HGET", PREFIX + "conv", h) == session:
                return True
        return False
    helpers.wait_until(stored, 5, message="conversation not stored")
    return out


def logged_once_per_worker(n, reason):
    """Refused stores are logged at warn with Redis's reason, once per
    worker at most (not once per completion), and nothing at error or
    worse: waits for the first line, then gives a flood of lines time
    to show before counting."""
    def failed():
        return [l for l in n.error_log().splitlines()
                if "could not be stored" in l]
    helpers.wait_until(failed, 5, message="no refused store was logged")
    time.sleep(0.3)
    log = n.error_log()
    assert not re.search(r"\[(error|crit|alert|emerg)\]", log), \
        [l for l in log.splitlines() if "[error]" in l][:5]
    lines = failed()
    assert 1 <= len(lines) <= 2, lines[:5]
    assert "[warn]" in lines[0] and reason in lines[0], lines[0]


def minute_start():
    """Waits until a rate-limit minute has most of itself left."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def test_flood_stays_within_the_cap(nginx, backend, redis_server):
    redis = redis_server
    keys = ["sk-bound-%03d-aaaaaaaaaaaaaaaaaaaaaaaaaaaa" % i
            for i in range(50)]
    for k in keys:
        redis.add_key(k, scopes="chat,read", workspaces="*")
    redis.add_key("sk-limited-aaaaaaaaaaaaaaaaaaaaaaaaaaaa", scopes="chat",
                  workspaces="*", rpm=5)
    records = {redis.key_name(k): redis.hgetall(redis.key_name(k))
               for k in keys}

    n = nginx(GATEWAY)

    # an early conversation, soon pushed out by the flood
    early = [user("early bird")]
    a = answer_of(stored_after(redis, backend,
                               lambda: chat(n, early, keys[0])))
    early += [assistant(a), user("early again")]

    # little room: the capped conversations fit, 2000 records would not
    redis.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    used = int(info(redis, "memory")["used_memory"])
    redis.cmd("CONFIG", "SET", "maxmemory", used + 384 * 1024)

    statuses = flood(n, 2000, keys[1])
    assert statuses == [200] * len(statuses), \
        {s: statuses.count(s) for s in set(statuses)}

    convs, indexed = conv_keys_and_index(redis)
    assert 0 < len(convs) <= CAP, len(convs)
    assert indexed == len(convs)
    for name in ("conv", "conv:until"):
        ttl = redis.cmd("TTL", PREFIX + name)
        assert 86000 < ttl <= 86400, (name, ttl)

    # Redis never refused a write, never evicted anything
    assert oom_errors(redis) == 0
    assert int(info(redis, "stats")["evicted_keys"]) == 0

    # every key record is there, unchanged
    for name, fields in records.items():
        assert redis.hgetall(name) == fields, name

    # the rate limit still counts
    minute_start()
    limited = "sk-limited-aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    got = [chat(n, [user("limited %d" % i)], limited).status
           for i in range(7)]
    assert got == [200] * 5 + [429] * 2, got

    # a recent conversation continues; the early one was dropped and
    # goes on from its transcript
    recent = [user("recent")]
    a = answer_of(stored_after(redis, backend,
                               lambda: chat(n, recent, keys[2])))
    r = chat(n, recent + [assistant(a), user("more")], keys[2])
    assert answer_of(r).endswith("| first: recent | turns: 1")
    r = chat(n, early, keys[0])
    assert answer_of(r).endswith("| turns: 0")
    assert last_session(backend)["message"].startswith(
        "Conversation so far:\nuser: early bird\n")
    assert len(conv_keys(redis)) <= CAP


def test_full_redis_answers_in_transcript_mode(nginx, backend,
                                               redis_server):
    redis = redis_server
    key = "sk-full-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    redis.add_key(key, scopes="chat", workspaces="*")
    n = nginx(GATEWAY)

    first = [user("before full")]
    stored = answer_of(stored_after(redis, backend,
                                    lambda: chat(n, first, key)))

    # Redis full: every write that needs memory is refused
    redis.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis.cmd("CONFIG", "SET", "maxmemory", 1)
    try:
        redis.cmd("SET", "probe", "x")
        raise AssertionError("Redis accepted a write while full")
    except RedisError as e:
        assert str(e).startswith("OOM"), e

    statuses = flood(n, 150, key, threads=4)
    assert statuses == [200] * len(statuses)
    # refused: the stores and the usage counts, sent after the answers
    helpers.wait_until(lambda: oom_errors(redis) >= 150, timeout=5,
                       message="Redis refused fewer than 150 writes")

    # a conversation stored before still continues (reading and
    # deleting need no memory); one never stored goes by transcript
    r = chat(n, first + [assistant(stored), user("after full")], key)
    assert answer_of(r).endswith("| first: before full | turns: 1")
    r = chat(n, [user("unseen"), assistant("Echo: unseen"), user("next")],
             key)
    assert answer_of(r).endswith("| turns: 0")
    assert last_session(backend)["message"].startswith(
        "Conversation so far:")

    redis.cmd("CONFIG", "SET", "maxmemory", 0)

    logged_once_per_worker(n, "OOM")


def test_records_key_of_another_type(nginx, backend, redis_server):
    """Something else written at <prefix>conv (a string): every store
    and lookup is refused (WRONGTYPE), the clients get their answers
    and go on from their transcripts, the key is left as it is, and
    the log says so once per worker, at warn."""
    redis = redis_server
    key = "sk-wrongtype-aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    redis.add_key(key, scopes="chat", workspaces="*")
    redis.cmd("SET", PREFIX + "conv", "not a hash")
    n = nginx(GATEWAY)

    for i in range(5):
        first = [user("wrong type %d" % i)]
        a = answer_of(chat(n, first, key))
        r = chat(n, first + [assistant(a), user("again %d" % i)], key)
        assert r.status == 200
        assert answer_of(r).endswith("| turns: 0")
        assert last_session(backend)["message"].startswith(
            "Conversation so far:\nuser: wrong type %d\n" % i)

    assert redis.cmd("GET", PREFIX + "conv") == b"not a hash"
    assert redis.cmd("ZCARD", PREFIX + "conv:until") == 0

    logged_once_per_worker(n, "WRONGTYPE")
