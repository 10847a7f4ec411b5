"""
The OpenAI routes of an "anythingllm_openai on" location: models, chat
completions (non-stream here; streams in test_stream.py), validation,
error mapping, conversations and the request sent to AnythingLLM.
"""

import json
import re
import socket
import time

import pytest

from lib import helpers
from lib.auth import wait_access_lines
from lib.openai import BASES, answer_of, assistant, user
from lib.processes import free_port


# one location for each OpenAI base path (BASES); %(key)s, %(timeout)s,
# and %(extra)s: a directive a test adds to both
LOCATION = """
        location %(base)s/ {
            anythingllm_openai        on;
            anythingllm_upstream_key  %(key)s;
            %(extra)s
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
            proxy_buffering           off;
            proxy_read_timeout        %(timeout)s;
        }
"""

# %(redis)s: the anythingllm_redis line of the tests that keep
# conversations or check keys
CONF = """
    %(redis)s

    server {
        listen  127.0.0.1:@PORT@;
%(locations)s
    }
"""

REDIS = "anythingllm_redis  @REDIS@ timeout=500ms;"

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}"
                     r"-[0-9a-f]{12}$")


def start(nginx, redis=False, extra="", key="UPSTREAM-KEY-0001-TEST",
          timeout="600s", **kw):
    locations = "".join(LOCATION % {"base": base, "key": key, "extra": extra,
                                    "timeout": timeout} for base in BASES)
    return nginx(CONF % {"redis": REDIS if redis else "",
                         "locations": locations}, **kw)


def chat(gw, messages, model="sales", base="/v1", headers=None, **kw):
    body = {"model": model, "messages": messages}
    body.update(kw)
    return gw.post(base + "/chat/completions", json=body, headers=headers)


def stream_answer(n, messages, model="sales", base="/v1", headers=None):
    s = n.stream("POST", base + "/chat/completions", headers=headers,
                 json={"model": model, "messages": messages, "stream": True})
    try:
        frames = s.json_frames()
    finally:
        s.close()
    assert frames[-1] == "[DONE]", frames
    return "".join(f["choices"][0]["delta"].get("content", "")
                   for f in frames[:-1] if f.get("choices"))


def upstream_chats(backend):
    return [r for r in backend.requests("/api/v1/workspace/")
            if r["path"].endswith("chat")]


def upstream_body(backend):
    reqs = upstream_chats(backend)
    assert reqs, "AnythingLLM got no chat request"
    return json.loads(reqs[-1]["body"])


def assert_error(r, status, code=None, param=None, type_=None):
    assert r.status == status, (r.status, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


# ---------------------------------------------------------------------------
# models


@pytest.mark.parametrize("base", BASES)
def test_models_list(nginx, backend, base):
    n = start(nginx)
    r = n.get(base + "/models",
              headers={"Authorization": "Bearer client-key",
                       "Accept-Encoding": "gzip"})
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.body)
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sales", "support",
                                               "engineering"]
    for m in body["data"]:
        assert m["object"] == "model"
        assert isinstance(m["created"], int) and m["created"] > 1e9
        assert isinstance(m["owned_by"], str)

    up = backend.last_request("/api/v1/workspaces")
    assert up["method"] == "GET"
    assert up["path"] == "/api/v1/workspaces"
    assert up["headers"]["authorization"] == "Bearer UPSTREAM-KEY-0001-TEST"
    assert "gzip" not in up["headers"].get("accept-encoding", "")


@pytest.mark.parametrize("base", BASES)
def test_model_by_id(nginx, backend, base):
    n = start(nginx)
    r = n.get(base + "/models/support")
    assert r.status == 200, r.text
    m = r.json()
    assert m["id"] == "support" and m["object"] == "model"

    assert_error(n.get(base + "/models/nope"), 404, code="model_not_found")

    # not a slug: refused without asking AnythingLLM
    backend.clear()
    assert_error(n.get(base + "/models/a%20b"), 404, code="model_not_found")
    assert_error(n.get(base + "/models/..."), 404, code="model_not_found")
    assert backend.requests() == []


def test_models_follow_the_key(nginx, backend, redis_server):
    n = start(nginx, redis=True, extra="anythingllm_auth on;")
    redis_server.add_key("sk-two", scopes="chat", workspaces="sales,support")
    redis_server.add_key("sk-all", scopes="chat", workspaces="*")
    two = {"Authorization": "Bearer sk-two"}

    for base in BASES:
        r = n.get(base + "/models", headers=two)
        assert r.status == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == ["sales", "support"]

        r = n.get(base + "/models",
                  headers={"Authorization": "Bearer sk-all"})
        assert [m["id"] for m in r.json()["data"]] == [
            "sales", "support", "engineering"]

        assert n.get(base + "/models/sales", headers=two).status == 200

        backend.clear()
        assert_error(n.get(base + "/models/engineering", headers=two), 404,
                     code="model_not_found")
        assert backend.requests() == []


def test_models_methods(nginx, backend):
    n = start(nginx)
    assert_error(n.post("/v1/models", json={}), 405)
    assert_error(n.request("DELETE", "/v1/models/sales"), 405)
    assert_error(n.get("/v1/chat/completions"), 405)
    assert_error(n.request("GET", "/v1/models", body="{}"), 400)


@pytest.mark.parametrize("path", [
    "/v1/embeddings", "/v1/completions", "/v1/chat/completions/x",
    "/v1/models/sales/x", "/v1/", "/api/v1/openai/responses"])
def test_unknown_routes(nginx, backend, path):
    n = start(nginx)
    backend.clear()
    assert_error(n.post(path, json={"model": "sales"}), 404,
                 code="unknown_url")
    assert backend.requests() == []


# ---------------------------------------------------------------------------
# chat completions, non-stream


@pytest.mark.parametrize("base", BASES)
def test_chat_completion(nginx, backend, base):
    n = start(nginx)
    t0 = int(time.time())
    r = chat(n, [user("hello there")], base=base,
             headers={"Authorization": "Bearer client-key",
                      "Accept-Encoding": "gzip, br"})
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert re.match(r"^chatcmpl-[0-9a-f]{32}$", body["id"])
    assert body["object"] == "chat.completion"
    assert t0 - 1 <= body["created"] <= time.time() + 1
    assert body["model"] == "sales"
    assert len(body["choices"]) == 1
    c = body["choices"][0]
    assert c["index"] == 0 and c["finish_reason"] == "stop"
    assert c["message"]["role"] == "assistant"
    assert c["message"]["content"] == \
        "Echo: hello there | first: - | turns: 0"
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] == 9
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert isinstance(body["sources"], list)

    up = upstream_chats(backend)[-1]
    assert up["method"] == "POST"
    assert up["path"] == "/api/v1/workspace/sales/chat"
    assert up["headers"]["authorization"] == "Bearer UPSTREAM-KEY-0001-TEST"
    assert up["headers"]["content-type"] == "application/json"
    assert int(up["headers"]["content-length"]) == up["body_len"]
    assert "gzip" not in up["headers"].get("accept-encoding", "")
    sent = json.loads(up["body"])
    assert set(sent) == {"message", "mode", "sessionId"}
    assert sent["message"] == "hello there"
    assert sent["mode"] == "chat"
    assert UUID_RE.match(sent["sessionId"])


def test_chat_sources_and_usage(nginx, backend):
    n = start(nginx)
    backend.script(json={
        "id": "x", "type": "textResponse", "textResponse": "From the docs.",
        "sources": [{"text": "a passage", "title": "doc.txt", "docId": "d1"}],
        "close": True, "error": None, "chatId": 9,
        "metrics": {"prompt_tokens": 79, "completion_tokens": 5,
                    "total_tokens": 84, "duration": 0.2}})
    body = chat(n, [user("q")]).json()
    assert body["choices"][0]["message"]["content"] == "From the docs."
    assert body["usage"] == {"prompt_tokens": 79, "completion_tokens": 5,
                             "total_tokens": 84}
    assert body["sources"] == [{"text": "a passage", "title": "doc.txt",
                                "docId": "d1"}]
    # the access log line is written after the answer is sent
    assert "pt=79 ct=5" in wait_access_lines(n, 1)[-1]


def test_request_headers_rewritten(nginx, backend):
    """Without anythingllm_upstream_key the client's Authorization is
    removed from the list: the other headers are still found and set."""
    n = nginx("""
    server {
        listen  127.0.0.1:@PORT@;

        location /v1/ {
            anythingllm_openai        on;
            proxy_set_header Authorization "Bearer UPSTREAM-KEY-0001-TEST";
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
            proxy_buffering           off;
            proxy_read_timeout        60s;
        }
    }
""")
    body = json.dumps({"model": "sales", "messages": [user("hi")]})
    r = n.post("/v1/chat/completions", body=body, headers=[
        ("Authorization", "Bearer client-key"),
        ("Content-Type", "text/plain"),
        ("Accept-Encoding", "gzip"),
        ("X-Other", "kept")])
    assert answer_of(r) == "Echo: hi | first: - | turns: 0"
    up = upstream_chats(backend)[-1]
    h = up["headers"]
    assert h["content-type"] == "application/json"
    assert h["accept-encoding"] == "identity"
    assert h["authorization"] == "Bearer UPSTREAM-KEY-0001-TEST"
    assert h["x-other"] == "kept"
    assert int(h["content-length"]) == up["body_len"]


def test_chat_body_in_pieces_and_chunked(nginx, backend):
    n = start(nginx)
    body = json.dumps({"model": "support",
                       "messages": [user("x" * 40000 + " end")]}).encode()
    # a body larger than client_body_buffer_size lands in a temp file
    r = n.post("/v1/chat/completions", body=body,
               headers={"Content-Type": "application/json"})
    assert r.status == 200, r.text
    assert upstream_body(backend)["message"].endswith(" end")

    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]),
                                           body[i:i + 1000])
                       for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    r = n.post("/v1/chat/completions", body=chunked,
               headers={"Content-Type": "application/json",
                        "Transfer-Encoding": "chunked"})
    assert r.status == 200, r.text
    up = upstream_chats(backend)[-1]
    assert "transfer-encoding" not in up["headers"]
    assert int(up["headers"]["content-length"]) == up["body_len"]


def test_chat_body_too_large(nginx, backend):
    n = start(nginx, extra="client_max_body_size 1k;")
    big = {"model": "sales", "messages": [user("x" * 4000)]}
    assert_error(n.post("/v1/chat/completions", json=big), 413)
    chunked = json.dumps(big).encode()
    r = n.post("/v1/chat/completions",
               body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked),
               headers={"Content-Type": "application/json",
                        "Transfer-Encoding": "chunked"})
    assert_error(r, 413)
    assert upstream_chats(backend) == []


@pytest.mark.parametrize("body,param", [
    ("not json", None),
    ("[1, 2]", None),
    ({"messages": [user("hi")]}, "model"),
    ({"model": 7, "messages": [user("hi")]}, "model"),
    ({"model": "../admin", "messages": [user("hi")]}, "model"),
    ({"model": "sales/x", "messages": [user("hi")]}, "model"),
    ({"model": "sales"}, "messages"),
    ({"model": "sales", "messages": []}, "messages"),
    ({"model": "sales", "messages": [assistant("hi")]}, "messages"),
    ({"model": "sales", "messages": [{"role": "user", "content": 5}]},
     "messages"),
    ({"model": "sales", "messages": [{"role": "wizard", "content": "x"}]},
     "messages"),
    ({"model": "sales", "messages": [user("hi")], "stream": "yes"},
     "stream"),
    ({"model": "sales", "messages": [user("hi")], "n": 2}, "n"),
    ({"model": "sales", "messages": [user("hi")],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": "sales", "messages": [user("hi")], "temperature": "hot"},
     "temperature"),
])
def test_chat_validation(nginx, backend, body, param):
    n = start(nginx)
    raw = body if isinstance(body, str) else json.dumps(body)
    for base in BASES:
        r = n.post(base + "/chat/completions", body=raw,
                   headers={"Content-Type": "application/json"})
        assert_error(r, 400, param=param, type_="invalid_request_error")
    assert upstream_chats(backend) == []


def test_chat_ignored_parameters(nginx, backend):
    n = start(nginx)
    r = chat(n, [user("hi")], temperature=0.2, max_tokens=50, top_p=1,
             n=1, user="u-1", seed=3, stop=["\n"], tools=[],
             stream_options=None, presence_penalty=0)
    assert r.status == 200, r.text
    assert set(upstream_body(backend)) == {"message", "mode", "sessionId"}


def test_chat_unknown_workspace(nginx, backend):
    n = start(nginx)
    for base in BASES:
        err = assert_error(chat(n, [user("hi")], model="nope", base=base),
                           404, code="model_not_found")
        assert "nope" in err["message"]
    # AnythingLLM was asked: it is the one that knows its workspaces
    assert upstream_chats(backend)[-1]["path"] == \
        "/api/v1/workspace/nope/chat"

    backend.clear()
    for model in ("..", ".", "..."):
        assert_error(chat(n, [user("hi")], model=model), 404,
                     code="model_not_found")
    assert backend.requests() == []


def test_chat_workspace_of_the_key(nginx, backend, redis_server):
    n = start(nginx, redis=True, extra="anythingllm_auth on;")
    redis_server.add_key("sk-sales", scopes="chat", workspaces="sales")
    h = {"Authorization": "Bearer sk-sales"}
    assert answer_of(chat(n, [user("hi")], headers=h))
    backend.clear()
    for base in BASES:
        assert_error(chat(n, [user("hi")], model="support", base=base,
                          headers=h), 404, code="model_not_found")
    assert backend.requests() == []


def test_chat_abort_answer(nginx, backend):
    n = start(nginx)
    err = assert_error(chat(n, [user("[empty]")]), 502, type_="server_error")
    assert "No text completion" in err["message"]
    assert_error(chat(n, [user("[error]")]), 502, type_="server_error")


def every_route_502(n, base):
    """A chat, the models and a stream on base all answer 502; returns
    the chat's error and the stream (to close)."""
    err = assert_error(chat(n, [user("hi")], base=base), 502,
                       type_="server_error")
    assert_error(n.get(base + "/models"), 502, type_="server_error")
    s = n.stream("POST", base + "/chat/completions",
                 json={"model": "sales", "stream": True,
                       "messages": [user("hi")]})
    assert s.status == 502
    return err, s


def test_wrong_upstream_key(nginx, backend):
    n = start(nginx, key="WRONG-KEY")
    for base in BASES:
        err, s = every_route_502(n, base)
        assert "upstream key" in err["message"]
        assert "upstream key" in json.loads(s.read_all())["error"]["message"]
        s.close()


def test_backend_down(nginx, backend):
    n = start(nginx, upstream="127.0.0.1:%d" % free_port())
    n.allow(r"connect\(\) failed")
    for base in BASES:
        err, s = every_route_502(n, base)
        assert "AnythingLLM" in err["message"]
        assert s.headers["content-type"] == "application/json"
        s.close()


def test_backend_timeout(nginx, backend):
    n = start(nginx, timeout="1s")
    n.allow(r"upstream timed out")
    backend.script(delay=3, endpoint="chat")
    t0 = time.monotonic()
    err = assert_error(chat(n, [user("hi")]), 504, type_="server_error")
    assert "in time" in err["message"]
    assert time.monotonic() - t0 < 2.5
    backend.script(delay=3, path="/api/v1/workspaces")
    assert_error(n.get("/v1/models"), 504)


def test_backend_error_answers(nginx, backend):
    n = start(nginx)
    backend.script(status=500, json={"id": "x", "type": "abort",
                                     "textResponse": None, "sources": [],
                                     "close": True,
                                     "error": "the model is on fire"})
    err = assert_error(chat(n, [user("hi")]), 502, type_="server_error")
    assert "the model is on fire" in err["message"]

    backend.script(status=400, json={"id": "x", "type": "abort",
                                     "textResponse": None, "sources": [],
                                     "close": True,
                                     "error": "foo is not a valid mode."})
    assert_error(chat(n, [user("hi")]), 400, type_="invalid_request_error")

    backend.script(status=200, body="<html>not json</html>")
    assert_error(chat(n, [user("hi")]), 502)

    backend.script(status=200, body="{\"workspaces\": 5}",
                   path="/api/v1/workspaces")
    assert_error(n.get("/v1/models"), 502)


def test_response_too_large(nginx, backend):
    n = start(nginx, extra="anythingllm_max_response_size 2k;")
    assert answer_of(chat(n, [user("[big:100]")])) == "x" * 100
    err = assert_error(chat(n, [user("[big:5000]")]), 502)
    assert "larger" in err["message"]


def test_chat_mode(nginx, backend):
    n = start(nginx, extra="anythingllm_chat_mode query;")
    r = chat(n, [user("anything in the docs?")])
    assert upstream_body(backend)["mode"] == "query"
    # no document: AnythingLLM's refusal is the answer
    assert "no relevant information" in answer_of(r)


def test_chat_mode_automatic(nginx, backend):
    n = start(nginx, extra="anythingllm_chat_mode automatic;")
    assert answer_of(chat(n, [user("@agent do it")])).startswith("Echo:")
    assert upstream_body(backend)["mode"] == "automatic"


def test_image_parts_become_attachments(nginx, backend):
    n = start(nginx)
    png = "data:image/png;base64,iVBORw0KGgo="
    r = chat(n, [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": png}}]}])
    assert "attachments: 1" in answer_of(r)
    sent = upstream_body(backend)
    assert sent["message"] == "what is this?"
    assert sent["attachments"] == [{"name": "image-1.png",
                                    "mime": "image/png",
                                    "contentString": png}]

    assert_error(chat(n, [{"role": "user", "content": [
        {"type": "image_url",
         "image_url": {"url": "https://example.com/a.png"}}]}]), 400,
        param="messages")


# ---------------------------------------------------------------------------
# system messages, unseen history, conversations


def test_system_message_is_not_sent(nginx, backend):
    n = start(nginx, redis=True)
    msgs = [{"role": "system", "content": "You are a pirate."},
            user("hello")]
    assert answer_of(chat(n, msgs)) == "Echo: hello | first: - | turns: 0"
    first = upstream_body(backend)
    assert first["message"] == "hello"
    assert "pirate" not in json.dumps(first)

    # no earlier turn: nothing to continue, every such request is new
    chat(n, msgs)
    assert upstream_body(backend)["sessionId"] != first["sessionId"]


def test_unseen_history_is_sent_as_transcript(nginx, backend):
    n = start(nginx, redis=True)
    msgs = [{"role": "system", "content": "Be brief."},
            user("my name is Ada"), assistant("Hello Ada."),
            {"role": "developer", "content": "no tools"},
            user("what is my name?")]
    r = chat(n, msgs)
    sent = upstream_body(backend)
    assert sent["message"] == (
        "Conversation so far:\nuser: my name is Ada\n"
        "assistant: Hello Ada.\n\nuser: what is my name?")
    assert "Be brief" not in sent["message"]
    assert UUID_RE.match(sent["sessionId"])
    # a new session: AnythingLLM had no history for it
    assert answer_of(r).endswith("| first: - | turns: 0")


def conversation(n, backend, first, turns, base="/v1", headers=None,
                 model="sales", stream_turns=()):
    msgs = [user(first)]
    sessions = []
    answers = []
    for i in range(turns):
        if i in stream_turns:
            a = stream_answer(n, msgs, model=model, base=base,
                              headers=headers)
        else:
            a = answer_of(chat(n, msgs, model=model, base=base,
                               headers=headers))
        sent = upstream_body(backend)
        sessions.append(sent["sessionId"])
        answers.append((sent["message"], a))
        msgs += [assistant(a), user("turn %d of %s" % (i + 2, first))]
        if i + 1 < turns:
            stored(n, sent["sessionId"])
    return sessions, answers


def stored(n, session):
    """Waits until the conversation of session is in Redis: the answer
    does not wait for its store, and a next turn that reaches the other
    worker first would start over."""
    session = session.encode()

    def found():
        return session in (n.redis.cmd("HVALS", "anythingllm:conv") or [])
    helpers.wait_until(found, 5, message="conversation not stored")


@pytest.mark.parametrize("stream_turns", [(), (0, 1, 2), (1,)])
def test_conversation_continues(nginx, backend, stream_turns):
    n = start(nginx, redis=True)
    sessions, answers = conversation(n, backend, "I like tea", 3,
                                     stream_turns=stream_turns)
    assert len(set(sessions)) == 1
    # each turn sends only its new message; the session holds the rest
    assert [m for m, _ in answers] == [
        "I like tea", "turn 2 of I like tea", "turn 3 of I like tea"]
    # the third answer depends on the first turn
    assert answers[2][1] == ("Echo: turn 3 of I like tea | first: I like "
                             "tea | turns: 2")
    # the third turn's record replaces the second's; the answer does not
    # wait for it
    stored(n, sessions[2])
    for name in ("anythingllm:conv", "anythingllm:conv:until"):
        ttl = n.redis.cmd("TTL", name)
        assert 86000 < ttl <= 86400, (name, ttl)


def first_turn_stored(n, backend, messages):
    """Sends the first turn and waits for its record; returns the
    answer, the session and the record's <hex> in Redis."""
    a = answer_of(chat(n, messages))
    session = upstream_body(backend)["sessionId"]
    stored(n, session)
    flat = n.redis.cmd("HGETALL", "anythingllm:conv")
    hexes = [h for h, v in zip(flat[::2], flat[1::2])
             if v == session.encode()]
    assert len(hexes) == 1
    return a, session, hexes[0]


def test_conversation_past_its_time_is_not_continued(nginx, backend):
    """A record is continued only before the time its index entry
    gives, whatever is left of the keys' own TTL; one past its time
    is taken out and the turn goes on from its transcript."""
    n = start(nginx, redis=True)
    first = [user("stale tea")]
    a, session, h = first_turn_stored(n, backend, first)
    at = float(n.redis.cmd("ZSCORE", "anythingllm:conv:until", h))
    assert 86000 < at - time.time() <= 86401

    # its time passes: a second ago
    n.redis.cmd("ZADD", "anythingllm:conv:until", "XX", int(time.time()) - 1,
                h)
    r = chat(n, first + [assistant(a), user("more tea")])
    sent = upstream_body(backend)
    assert sent["sessionId"] != session
    assert sent["message"].startswith("Conversation so far:\nuser: stale tea")
    assert answer_of(r).endswith("| turns: 0")
    assert n.redis.cmd("HGET", "anythingllm:conv", h) is None
    assert n.redis.cmd("ZSCORE", "anythingllm:conv:until", h) is None


def test_conversation_of_the_earlier_layout_is_left_alone(nginx, backend):
    """A record in the layout of earlier builds (a string a
    conversation, indexed by <prefix>convs) is neither continued nor
    touched: the turn goes on from its transcript."""
    n = start(nginx, redis=True)
    first = [user("old tea")]
    a, session, h = first_turn_stored(n, backend, first)

    # the record moved to the earlier layout, as an earlier build
    # would have written it
    n.redis.cmd("HDEL", "anythingllm:conv", h)
    n.redis.cmd("ZREM", "anythingllm:conv:until", h)
    old = b"anythingllm:conv:" + h
    n.redis.cmd("SET", old, session, "EX", 86400)
    n.redis.cmd("ZADD", "anythingllm:convs", int(time.time()), h)

    r = chat(n, first + [assistant(a), user("more old tea")])
    assert upstream_body(backend)["sessionId"] != session
    assert answer_of(r).endswith("| turns: 0")
    assert n.redis.cmd("GET", old) == session.encode()
    assert n.redis.cmd("ZSCORE", "anythingllm:convs", h) is not None


def test_conversations_stay_apart(nginx, backend):
    n = start(nginx, redis=True)
    a = [user("alpha")]
    b = [user("bravo")]
    for i in range(3):
        ra = answer_of(chat(n, a))
        sa = upstream_body(backend)["sessionId"]
        rb = answer_of(chat(n, b))
        sb = upstream_body(backend)["sessionId"]
        assert sa != sb
        assert "first: %s" % ("-" if i == 0 else "alpha") in ra
        assert "first: %s" % ("-" if i == 0 else "bravo") in rb
        a += [assistant(ra), user("a%d" % i)]
        b += [assistant(rb), user("b%d" % i)]
        # the next turns go on only from what is stored by then
        stored(n, sa)
        stored(n, sb)


def test_alike_conversations_fork(nginx, backend):
    """Two conversations with the same first turn (same question, same
    answer) may share it, but never what follows."""
    n = start(nginx, redis=True)
    # the same first turn stored twice: the second store replaces the
    # first, and neither comes after a lookup of the turns below
    a1 = answer_of(chat(n, [user("same")]))
    stored(n, upstream_body(backend)["sessionId"])
    b1 = answer_of(chat(n, [user("same")]))
    stored(n, upstream_body(backend)["sessionId"])
    assert a1 == b1
    ra = answer_of(chat(n, [user("same"), assistant(a1), user("A says")]))
    sa = upstream_body(backend)["sessionId"]
    rb = answer_of(chat(n, [user("same"), assistant(b1), user("B says")]))
    sb = upstream_body(backend)["sessionId"]
    assert sa != sb
    assert "first: same | turns: 1" in ra
    # B continued the other session of that same first turn, or started
    # anew with a transcript: never the session A went on with
    assert "turns: 2" not in rb
    r = backend.api("GET", "/api/v1/workspace/sales/chats?apiSessionId="
                    + sb)
    prompts = [h["content"] for h in r.json()["history"]
               if h["role"] == "user"]
    assert prompts[-1] == "B says" or prompts[-1].endswith("\nuser: B says")
    assert "A says" not in r.text
    # A's second turn is stored before its third
    stored(n, sa)
    ra = answer_of(chat(n, [user("same"), assistant(a1), user("A says"),
                            assistant(ra), user("A again")]))
    assert "turns: 2" in ra and upstream_body(backend)["sessionId"] == sa


def test_conversation_edited_answer_starts_anew(nginx, backend):
    n = start(nginx, redis=True)
    a1 = answer_of(chat(n, [user("q1")]))
    s1 = upstream_body(backend)["sessionId"]
    chat(n, [user("q1"), assistant(a1 + " (edited)"), user("q2")])
    sent = upstream_body(backend)
    assert sent["sessionId"] != s1
    assert sent["message"].startswith("Conversation so far:")


def test_conversations_of_models_and_keys_apart(nginx, backend,
                                                redis_server):
    n = start(nginx, redis=True, extra="anythingllm_auth on;")
    redis_server.add_key("sk-one", scopes="chat", workspaces="*")
    redis_server.add_key("sk-two", scopes="chat", workspaces="*")
    one = {"Authorization": "Bearer sk-one"}
    two = {"Authorization": "Bearer sk-two"}
    a = answer_of(chat(n, [user("hi")], headers=one))
    s1 = upstream_body(backend)["sessionId"]
    stored(n, s1)
    msgs = [user("hi"), assistant(a), user("more")]

    chat(n, msgs, headers=two)
    assert upstream_body(backend)["sessionId"] != s1
    chat(n, msgs, model="support", headers=one)
    assert upstream_body(backend)["sessionId"] != s1
    r = chat(n, msgs, headers=one)
    assert upstream_body(backend)["sessionId"] == s1
    assert "first: hi | turns: 1" in answer_of(r)


def test_conversation_without_redis(nginx, backend, redis_server):
    n = start(nginx, redis=True)
    a = answer_of(chat(n, [user("q1")]))
    redis_server.kill()
    r = chat(n, [user("q1"), assistant(a), user("q2")])
    sent = upstream_body(backend)
    assert sent["message"].startswith("Conversation so far:\nuser: q1\n")
    assert "turns: 0" in answer_of(r)


def test_conversation_lookup_left_by_client(nginx, backend, redis_server):
    """A client that leaves while its conversation lookup waits on a
    slow Redis leaves nothing behind."""
    n = start(nginx, redis=True)
    a = answer_of(chat(n, [user("q1")]))
    msgs = [user("q1"), assistant(a), user("q2")]
    t = redis_server.sleep(1)
    conns = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", n.port))
        body = json.dumps({"model": "sales", "messages": msgs}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conns.append(sock)
    time.sleep(0.2)
    for sock in conns:
        sock.close()
    t.join()
    time.sleep(0.3)
    # the gateway still answers, and nothing went upstream for them
    assert answer_of(chat(n, [user("after")]))
    assert [json.loads(r["body"])["message"] for r in
            upstream_chats(backend)] == ["q1", "after"]


def test_tokens_in_access_log(nginx, backend):
    n = start(nginx)
    # each line is written after its answer is sent: the first one is
    # there before the stream starts, so that they come in this order
    answer_of(chat(n, [user("count me")]))
    wait_access_lines(n, 1)
    stream_answer(n, [user("count me too")])
    lines = [l for l in wait_access_lines(n, 2) if "chat/completions" in l]
    assert re.search(r"ws=sales pt=\d+ ct=9$", lines[0]), lines[0]
    assert re.search(r"ws=sales pt=\d+ ct=10$", lines[1]), lines[1]


def test_nginx_errors_are_openai_shaped(nginx, backend):
    n = start(nginx, extra="client_max_body_size 100;")
    r = n.post("/v1/chat/completions",
               json={"model": "sales", "messages": [user("x" * 200)]})
    assert_error(r, 413)
