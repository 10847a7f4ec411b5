"""The OpenAI side of the gateway as the tests see it: request bodies,
the error object, the stand-in's stream-chat frames to script, and the
checks of a whole chat.completion.chunk stream."""

import json

# the two bases of an "anythingllm_openai on" location
BASES = ("/v1", "/api/v1/openai")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def answer_of(r):
    assert r.status == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------
# errors


def error_of(r):
    """The OpenAI error object of a refusal (asserts its shape)."""
    assert r.headers.get("content-type", "").startswith("application/json"), \
        r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["param"] is None
    return err


def assert_refused(r, status, code, type_="invalid_request_error"):
    assert r.status == status, (r.status, r.text)
    err = error_of(r)
    assert err["code"] == code, err
    assert err["type"] == type_, err
    return err


# ---------------------------------------------------------------------------
# streams


def open_stream(n, text="hello", base="/v1", usage=False, model="sales",
                **kw):
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": text}]}
    if usage:
        body["stream_options"] = {"include_usage": True}
    return n.stream("POST", base + "/chat/completions", json=body, **kw)


def chunk(text, close=False, field="textResponse", id_field="uuid"):
    """A stream-chat frame of the stand-in's script: one piece of text."""
    return {id_field: "u1", "sources": [], "type": "textResponseChunk",
            field: text, "close": close, "error": False}


def finalize(prompt=11, completion=2, **extra):
    f = {"uuid": "u1", "type": "finalizeResponseStream", "close": True,
         "error": False, "chatId": 7, "sources": [],
         "metrics": {"prompt_tokens": prompt,
                     "completion_tokens": completion,
                     "total_tokens": prompt + completion}}
    f.update(extra)
    return f


def abort(error="Premature close"):
    return {"id": "u2", "type": "abort", "textResponse": None,
            "sources": [], "close": True, "error": error}


def frame_bytes(obj):
    return "data: %s\n\n" % json.dumps(obj, separators=(",", ":"))


def content(frames):
    return "".join(f["choices"][0]["delta"].get("content", "")
                   for f in frames
                   if isinstance(f, dict) and f.get("choices"))


def read_all(s, timeout=10):
    try:
        frames = s.json_frames(timeout)
        assert s.done and not s.truncated, "the response did not end well"
        return frames
    finally:
        s.close()


def assert_success(frames, text, usage=None):
    """A complete OpenAI stream carrying "text"."""
    assert frames[-1] == "[DONE]", frames
    chunks = frames[:-1]
    assert all(isinstance(f, dict) for f in chunks), chunks
    ids = {f["id"] for f in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert {f["object"] for f in chunks} == {"chat.completion.chunk"}
    assert len({f["created"] for f in chunks}) == 1
    assert {f["model"] for f in chunks} == {"sales"}
    if usage is not None:
        last = chunks.pop()
        assert last["choices"] == []
        assert last["usage"] == usage
        assert all(f["usage"] is None for f in chunks)
    else:
        assert all("usage" not in f for f in chunks)
    stop = chunks.pop()
    assert stop["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "stop"}]
    assert chunks, "no content chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for f in chunks:
        c = f["choices"][0]
        assert c["index"] == 0 and c["finish_reason"] is None
        assert "role" not in c["delta"] or f is chunks[0]
    assert content(chunks) == text


def assert_failed(frames, text_before="", message=None):
    """A stream that ended in an error frame then [DONE]."""
    assert frames[-1] == "[DONE]", frames
    err = frames[-2]
    assert set(err) == {"error"}, err
    assert isinstance(err["error"]["message"], str)
    assert err["error"]["type"] == "server_error"
    if message is not None:
        assert message in err["error"]["message"], err
    assert content(frames[:-2]) == text_before
    for f in frames[:-2]:
        assert f["choices"][0]["finish_reason"] is None
    return err


def openai_error(r, status):
    """The error object of an answer with this status: JSON, with a
    message and a type."""
    assert r.status == status, (r.status, r.text)
    assert r.headers.get("content-type", "").startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    return err
