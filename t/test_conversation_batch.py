"""
Conversations stored together: a worker sends the stores of the
completions it finishes in one turn of its event loop as one script run.
Every conversation of such a batch must be stored under its own digest
with its own session, and the cap must hold even when one batch holds
more stores than the cap.
"""

import concurrent.futures
import json

from lib import helpers
from lib.auth import bearer
from lib.openai import answer_of, assistant, user
from lib.processes import PREFIX


KEY = "sk-batch-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

# one worker, so that concurrent completions finish in the same worker
GATEWAY = """
    anythingllm_redis             @REDIS@ timeout=500ms;
    anythingllm_conversation_max  %d;

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


def chat(n, messages):
    return n.post("/v1/chat/completions", headers=bearer(KEY),
                  json={"model": "sales", "messages": messages})


def together(fn, items, threads=16):
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def sessions_sent(backend):
    """{first message: sessionId} of the chat calls AnythingLLM got."""
    out = {}
    for r in backend.requests("/api/v1/workspace/"):
        if r["path"].endswith("/chat"):
            body = json.loads(r["body"])
            out.setdefault(body["message"], body["sessionId"])
    return out


def records(redis):
    """{<hex>: session id} of every conversation record"""
    flat = redis.cmd("HGETALL", PREFIX + "conv") or []
    return dict(zip(flat[::2], flat[1::2]))


def test_concurrent_completions_each_continue(nginx, backend, redis_server):
    redis = redis_server
    redis.add_key(KEY, scopes="chat", workspaces="*")
    n = nginx(GATEWAY % 10000, workers=1)

    firsts = ["batch %d" % i for i in range(48)]
    answers = together(lambda f: answer_of(chat(n, [user(f)])), firsts)

    sent = sessions_sent(backend)
    assert sorted(sent) == sorted(firsts)
    assert len(set(sent.values())) == len(firsts)

    # every conversation is stored, each with its own session
    helpers.wait_until(lambda: len(records(redis)) == len(firsts), 5,
                       message="conversations not stored")
    assert sorted(records(redis).values()) == sorted(
        s.encode() for s in sent.values())
    assert redis.cmd("ZCARD", PREFIX + "conv:until") == len(firsts)

    # and each goes on in its own session, all at once again
    def second(i):
        msgs = [user(firsts[i]), assistant(answers[i]), user("more")]
        return answer_of(chat(n, msgs))

    seconds = together(second, range(len(firsts)))
    for first, a in zip(firsts, seconds):
        assert a.endswith("| first: %s | turns: 1" % first), a

    assert not [l for l in n.error_log().splitlines()
                if "[error]" in l or "[alert]" in l]


def test_batch_larger_than_the_cap(nginx, backend, redis_server):
    redis = redis_server
    redis.add_key(KEY, scopes="chat", workspaces="*")
    n = nginx(GATEWAY % 3, workers=1)

    firsts = ["capped %d" % i for i in range(40)]
    statuses = together(lambda f: chat(n, [user(f)]).status, firsts)
    assert statuses == [200] * len(firsts)

    # the last of the stores is in: its record and index entry
    helpers.wait_until(
        lambda: redis.cmd("ZCARD", PREFIX + "conv:until") > 0, 5,
        message="conversations not stored")
    chat(n, [user("last one")])
    last = sessions_sent(backend)["last one"].encode()
    helpers.wait_until(lambda: last in records(redis).values(), 5,
                       message="the last conversation not stored")

    stored = records(redis)
    assert 0 < len(stored) <= 3, len(stored)
    assert redis.cmd("ZCARD", PREFIX + "conv:until") == len(stored)
