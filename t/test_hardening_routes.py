"""Hardening of the route table and of the OpenAI request body.

- update-embeddings attaches documents of the store every workspace
  shares: only a key allowed every workspace may call it; update-pin
  stays with the workspace in the path.
- A chat completions body that is not strict UTF-8, or whose strings
  hold a lone surrogate or U+0000 escape, is refused as OpenAI refuses
  a body it cannot parse; values out of OpenAI's ranges are refused
  naming the parameter, with OpenAI's code.

A gateway with auth on and both OpenAI base paths, a real redis-server,
and the stand-in AnythingLLM, which records every request that reaches
it: a refusal must leave it untouched.
"""

import json
import uuid

import pytest

from lib import helpers
from lib.auth import bearer
from lib.openai import BASES, openai_error


BAD_JSON = "We could not parse the JSON body of your request"


def error_of(r, status):
    """The OpenAI error object of a refusal, its shape checked."""
    err = openai_error(r, status)
    assert set(r.json()) == {"error"}, r.json()
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error", err
    return err


def upload(backend, name, text, workspaces):
    """Puts a document into the stand-in's shared store, attached to the
    given workspaces (directly, not through the gateway); its path."""
    boundary = uuid.uuid4().hex
    body = ("--%s\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"%s\"\r\nContent-Type: text/plain\r\n\r\n%s\r\n"
            "--%s\r\nContent-Disposition: form-data; "
            "name=\"addToWorkspaces\"\r\n\r\n%s\r\n--%s--\r\n"
            % (boundary, name, text, boundary, workspaces,
               boundary)).encode()
    r = backend.api("POST", "/api/v1/document/upload", body=body, headers={
        "Content-Type": "multipart/form-data; boundary=" + boundary})
    assert r.status == 200, r.text
    return r.json()["documents"][0]["location"]


def ws_docpaths(backend, slug):
    r = backend.api("GET", "/api/v1/workspace/%s" % slug)
    assert r.status == 200, r.text
    return [d["docpath"] for d in r.json()["workspace"][0]["documents"]]


# one location for each OpenAI base path (BASES)
LOCATION = """
        location %s/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }
"""

# keys checked on AnythingLLM's API and the OpenAI routes, with a Redis
# timeout that a loaded machine cannot exceed: a slow key lookup must not
# turn a verdict into a 503
GATEWAY = """
    anythingllm_redis  @REDIS@ timeout=3s;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_auth          on;
        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        proxy_http_version        1.1;
        proxy_set_header          Connection "";
        proxy_buffering           off;
        proxy_read_timeout        600s;

        location /api/v1/ {
            proxy_pass  http://anythingllm;
        }
%s
    }
""" % "".join(LOCATION % base for base in BASES)


@pytest.fixture
def gateway(nginx, redis_server, backend):
    return nginx(GATEWAY, redis=redis_server)


# ---------------------------------------------------------------------------
# update-embeddings and update-pin


def test_update_embeddings_refused_to_a_limited_key(gateway, redis_server,
                                                    backend):
    """A documents key held to "sales" cannot attach to sales a document
    of the shared store that only engineering holds: that would let it
    read the document through sales' chat."""
    secret = upload(backend, "payroll.txt", "salaries of everyone",
                    "engineering")
    redis_server.add_key("k-sales", scopes="chat,read,documents",
                         workspaces="sales")
    redis_server.add_key("k-two", scopes="documents",
                         workspaces="sales,support")
    backend.clear()

    for key, path, body in (
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings/",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/Workspace/sales/Update-Embeddings",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"adds": [secret], "deletes": []}),
            # the rule is the route's: the body is not read to judge it
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"deletes": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings", None),
            ("k-two", "/api/v1/workspace/support/update-embeddings",
             {"adds": [secret]})):
        r = gateway.post(path, json=body, headers=bearer(key))
        err = error_of(r, 403)
        assert err["code"] == "workspace_forbidden", err
        assert "every workspace" in err["message"], err
        assert '"%s"' % path.split("/")[4] in err["message"], err
        assert err["param"] is None

    assert backend.requests() == []
    assert ws_docpaths(backend, "sales") == []
    assert ws_docpaths(backend, "support") == []

    line = helpers.wait_until(
        lambda: [l for l in gateway.access_lines()
                 if "update-embeddings" in l.lower()][6:7], timeout=5)[0]
    assert "auth=denied_workspace" in line, line

    # the key still reaches its workspace otherwise
    r = gateway.post("/api/v1/workspace/sales/chat",
                     json={"message": "hi"}, headers=bearer("k-sales"))
    assert r.status == 200, r.text


def test_update_embeddings_allowed_to_an_instance_key(gateway, redis_server,
                                                      backend):
    doc = upload(backend, "handbook.txt", "the handbook", "engineering")
    redis_server.add_key("k-docs", scopes="documents", workspaces="*")
    redis_server.add_key("k-read", scopes="read", workspaces="*")
    backend.clear()

    # a key allowed every workspace still needs the documents scope
    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"adds": [doc]}, headers=bearer("k-read"))
    assert error_of(r, 403)["code"] == "insufficient_scope"
    assert backend.requests() == []

    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"adds": [doc]}, headers=bearer("k-docs"))
    assert r.status == 200, r.text
    assert [d["docpath"] for d in r.json()["workspace"]["documents"]] \
        == [doc]
    seen = backend.requests()
    assert len(seen) == 1
    assert seen[0]["path"] == "/api/v1/workspace/sales/update-embeddings"
    assert seen[0]["headers"]["authorization"] == \
        "Bearer UPSTREAM-KEY-0001-TEST"
    assert json.loads(seen[0]["body"]) == {"adds": [doc]}
    assert ws_docpaths(backend, "sales") == [doc]

    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"deletes": [doc]}, headers=bearer("k-docs"))
    assert r.status == 200, r.text
    assert ws_docpaths(backend, "sales") == []


def test_update_pin_stays_with_the_workspace(gateway, redis_server, backend):
    """update-pin acts only on a document already in the workspace of the
    path (AnythingLLM looks it up by workspace): the slug is enough."""
    doc = upload(backend, "faq.txt", "questions", "sales")
    redis_server.add_key("k-sales", scopes="documents", workspaces="sales")
    backend.clear()

    body = {"docPath": doc, "pinStatus": True}
    gateway.post("/api/v1/workspace/sales/update-pin", json=body,
                 headers=bearer("k-sales"))
    seen = backend.requests()
    assert [s["path"] for s in seen] == ["/api/v1/workspace/sales/update-pin"]
    assert json.loads(seen[0]["body"]) == body

    backend.clear()
    r = gateway.post("/api/v1/workspace/engineering/update-pin", json=body,
                     headers=bearer("k-sales"))
    err = error_of(r, 403)
    assert err["code"] == "workspace_forbidden"
    assert '"engineering"' in err["message"], err
    assert backend.requests() == []


# ---------------------------------------------------------------------------
# the chat completions body: text


def raw_chat(n, base, raw, key="k-chat"):
    return n.post(base + "/chat/completions", body=raw, headers=dict(
        bearer(key), **{"Content-Type": "application/json"}))


def chat_body(content_json, **extra):
    """A request body whose last user message content is the given JSON
    text (bytes, pasted as they are)."""
    head = json.dumps(dict({"model": "sales"}, **extra))[:-1].encode()
    return (head + b', "messages": [{"role": "user", "content": '
            + content_json + b'}]}')


BAD_TEXT = [
    # (body, what the message says)
    (chat_body(b'"caf\xe9"'), "not valid UTF-8"),             # Latin-1
    (chat_body(b'"a\xff"'), "not valid UTF-8"),
    (chat_body(b'"a\x80b"'), "not valid UTF-8"),
    (chat_body(b'"\xc0\xaf"'), "not valid UTF-8"),            # overlong
    (chat_body(b'"\xe0\x80\xaf"'), "not valid UTF-8"),        # overlong
    (chat_body(b'"\xf0\x80\x80\xaf"'), "not valid UTF-8"),    # overlong
    (chat_body(b'"\xed\xa0\x80"'), "not valid UTF-8"),        # U+D800
    (chat_body(b'"\xed\xa0\xbd\xed\xb8\x80"'), "not valid UTF-8"),
    (chat_body(b'"\xf4\x90\x80\x80"'), "not valid UTF-8"),    # > U+10FFFF
    (chat_body(b'"a\xe2\x82"'), "not valid UTF-8"),           # cut short
    (chat_body(b'"hi"', user="x").replace(b'"x"', b'"\xfe"'),
     "not valid UTF-8"),
    (chat_body(b'"hi"').replace(b'"model"', b'"mod\xe9l"'),
     "not valid UTF-8"),
    (chat_body(b'"a\\ud800b"'), "lone UTF-16 surrogate"),
    (chat_body(b'"a\\uDC00"'), "lone UTF-16 surrogate"),
    (chat_body(b'"\\ud83d\\u0041"'), "lone UTF-16 surrogate"),
    (chat_body(b'"a\\u0000b"'), "\\u0000"),
    (chat_body(b'"a\\uZZZZ"'), "4 hex digits"),
]


@pytest.mark.parametrize("raw,what", BAD_TEXT,
                         ids=[str(i) for i in range(len(BAD_TEXT))])
def test_chat_body_text_refused(gateway, redis_server, backend, raw, what):
    redis_server.add_key("k-chat", scopes="chat", workspaces="sales")
    backend.clear()
    for base in BASES:
        for stream in (False, True):
            body = raw.replace(b'{"model"', b'{"stream": %s, "model"'
                               % (b"true" if stream else b"false"), 1)
            r = raw_chat(gateway, base, body)
            err = error_of(r, 400)
            assert err["message"].startswith(BAD_JSON), err
            assert what in err["message"], err
            assert err["param"] is None and err["code"] is None, err
    assert backend.requests() == []


def test_chat_body_text_accepted_intact(gateway, redis_server, backend):
    """Valid UTF-8 and escape pairs reach AnythingLLM unchanged."""
    redis_server.add_key("k-chat", scopes="chat", workspaces="sales")
    text = "caf\u00e9 \u20ac \U0001f600 \U0010ffff \ud7ff\ue000 \\ud800"
    for base in BASES:
        for raw in (json.dumps(text, ensure_ascii=False).encode(),
                    json.dumps(text, ensure_ascii=True).encode()):
            backend.clear()
            r = raw_chat(gateway, base, chat_body(raw))
            assert r.status == 200, r.text
            sent = [q for q in backend.requests()
                    if q["path"] == "/api/v1/workspace/sales/chat"]
            assert len(sent) == 1
            assert json.loads(sent[0]["body"])["message"] == text


# ---------------------------------------------------------------------------
# the chat completions body: ranges


OUT_OF_RANGE = [
    # (parameter, value, OpenAI's code, message)
    ("temperature", 2.5, "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value "
     "<= 2, but got 2.5 instead."),
    ("temperature", -0.1, "decimal_below_min_value",
     "Invalid 'temperature': decimal below minimum value. Expected a value "
     ">= 0, but got -0.1 instead."),
    ("top_p", 1.5, "decimal_above_max_value", None),
    ("top_p", -1, "decimal_below_min_value", None),
    ("presence_penalty", -2.5, "decimal_below_min_value", None),
    ("presence_penalty", 2.01, "decimal_above_max_value", None),
    ("frequency_penalty", 3, "decimal_above_max_value", None),
    ("frequency_penalty", -7, "decimal_below_min_value", None),
    ("max_tokens", 0, "integer_below_min_value",
     "Invalid 'max_tokens': integer below minimum value. Expected a value "
     ">= 1, but got 0 instead."),
    ("max_tokens", -100, "integer_below_min_value", None),
    ("max_completion_tokens", 0, "integer_below_min_value", None),
    ("stop", ["a", "b", "c", "d", "e"], "array_above_max_length",
     "Invalid 'stop': array too long. Expected an array with maximum "
     "length 4, but got an array with length 5 instead."),
    ("stop", ["a", 5], None, None),
]


@pytest.mark.parametrize("param,value,code,message", OUT_OF_RANGE,
                         ids=["%s=%s" % (p, json.dumps(v))
                              for p, v, _, _ in OUT_OF_RANGE])
def test_chat_values_out_of_range(gateway, redis_server, backend, param,
                                  value, code, message):
    redis_server.add_key("k-chat", scopes="chat", workspaces="sales")
    backend.clear()
    for base in BASES:
        for stream in (False, True):
            body = {"model": "sales", "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}],
                    param: value}
            r = raw_chat(gateway, base, json.dumps(body))
            err = error_of(r, 400)
            assert err["param"] == param, err
            assert err["code"] == code, err
            if message is not None:
                assert err["message"] == message, err
    assert backend.requests() == []


def test_chat_values_at_the_bounds_pass(gateway, redis_server, backend):
    redis_server.add_key("k-chat", scopes="chat", workspaces="sales")
    for base in BASES:
        for extra in ({"temperature": 2, "top_p": 1, "presence_penalty": 2,
                       "frequency_penalty": 2, "max_tokens": 1,
                       "stop": ["a", "b", "c", "d"]},
                      {"temperature": 0, "top_p": 0, "presence_penalty": -2,
                       "frequency_penalty": -2, "max_completion_tokens": 1,
                       "stop": "x"},
                      {"temperature": None, "max_tokens": None,
                       "stop": None}):
            backend.clear()
            body = dict({"model": "sales",
                         "messages": [{"role": "user", "content": "hi"}]},
                        **extra)
            r = raw_chat(gateway, base, json.dumps(body))
            assert r.status == 200, (extra, r.text)
            assert [q["path"] for q in backend.requests()] == \
                ["/api/v1/workspace/sales/chat"]
