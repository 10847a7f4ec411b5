"""
Streamed chat completions: AnythingLLM's stream-chat frames re-framed
into chat.completion.chunk frames as they arrive, for every frame
pattern of the upstream contract, and the ends a stream can take.
"""

import base64
import json
import socket
import time

import pytest

from lib import helpers
from lib.auth import wait_access_lines
from lib.openai import (BASES, abort, assert_failed, assert_success, chunk,
                        finalize, frame_bytes, open_stream, read_all)
from lib.processes import free_port


# one location for each OpenAI base path (BASES)
LOCATION = """
        location %s/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }
"""

# %(listen)s: a second listen of a test; %(extra)s: a directive a test
# adds to the server
CONF = """
    server {
        listen  127.0.0.1:@PORT@;
        %(listen)s

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        %(extra)s

        proxy_http_version  1.1;
        proxy_set_header    Connection "";
        proxy_buffering     off;
        proxy_read_timeout  %(timeout)s;
%(locations)s
    }
"""


# proxy_buffering on, small buffers, and a client reading at %s a second
BUFFERED_CONF = """
    server {
        listen  127.0.0.1:@PORT@;

        location /v1/ {
            anythingllm_openai        on;
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            proxy_pass                http://anythingllm;
            proxy_http_version        1.1;
            proxy_set_header          Connection "";
            proxy_buffering on; proxy_buffers 4 1k; proxy_buffer_size 1k;
            proxy_max_temp_file_size 1m; proxy_temp_file_write_size 1k;
            limit_rate %s;
            proxy_read_timeout        600s;
        }
    }
"""


def start(nginx, extra="", timeout="600s", listen="", **kw):
    return nginx(CONF % {"listen": listen, "extra": extra, "timeout": timeout,
                         "locations": "".join(LOCATION % base
                                              for base in BASES)}, **kw)


# ---------------------------------------------------------------------------
# the answer


@pytest.mark.parametrize("base", BASES)
def test_stream(nginx, backend, base):
    n = start(nginx)
    s = open_stream(n, "hello there", base=base,
                    headers={"Accept-Encoding": "gzip"})
    assert s.status == 200
    assert s.headers["content-type"] == "text/event-stream"
    assert s.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in s.headers
    assert s.headers["x-accel-buffering"] == "no"
    assert s.raw_headers.count(("Cache-Control", "no-cache")) == 1
    assert "content-encoding" not in s.headers
    assert_success(read_all(s), "Echo: hello there | first: - | turns: 0")

    up = backend.last_request("/api/v1/workspace/")
    assert up["path"] == "/api/v1/workspace/sales/stream-chat"
    assert json.loads(up["body"])["message"] == "hello there"


def test_stream_include_usage(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hello")}, {"frame": chunk(" world")},
        {"frame": chunk("", close=True)},
        {"frame": finalize(prompt=11, completion=2)}])
    frames = read_all(open_stream(n, usage=True))
    assert_success(frames, "Hello world", usage={
        "prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13})
    # the access log line is written after the answer is sent
    assert wait_access_lines(n, 1)[-1].endswith("pt=11 ct=2")


def test_split_frames(nginx, backend):
    """Frames cut anywhere across writes, multi-byte characters too."""
    n = start(nginx)
    text = "".join(frame_bytes(f) for f in (
        chunk("Grüße, "), chunk("naïve ☕ "), chunk("fin"),
        chunk("", close=True), finalize()))
    raw = text.encode()
    cuts = [1, 3, 5, 6, 17, 40, 41, 90, 91, 92, 150, len(raw) - 2]
    events = []
    last = 0
    for c in cuts:
        events.append({"write_b64": base64.b64encode(raw[last:c]).decode()})
        events.append({"sleep": 0.01})
        last = c
    events.append({"write_b64": base64.b64encode(raw[last:]).decode()})
    backend.script(endpoint="stream-chat", events=events)
    assert_success(read_all(open_stream(n)), "Grüße, naïve ☕ fin")


def test_many_frames_per_write(nginx, backend):
    n = start(nginx)
    words = ["w%d " % i for i in range(200)]
    backend.script(endpoint="stream-chat", events=[
        {"frames": [chunk(w) for w in words[:100]]},
        {"frames": [chunk(w) for w in words[100:]]
         + [chunk("", close=True), finalize()]}])
    assert_success(read_all(open_stream(n)), "".join(words))


def test_each_chunk_arrives_before_the_next_is_sent(nginx, backend):
    n = start(nginx)
    half = frame_bytes(chunk(" world"))
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hello")},
        {"wait": "one"},
        {"write": half[:10]},
        {"wait": "two"},
        {"write": half[10:]},
        {"wait": "three"},
        {"frames": [chunk("", close=True), finalize()]}])
    s = open_stream(n)
    try:
        backend.wait_waiting("one")
        f = json.loads(s.next_frame(timeout=3))
        assert f["choices"][0]["delta"] == {"role": "assistant",
                                            "content": "Hello"}
        assert "one" in backend.state()["waiting"]

        backend.release("one")
        backend.wait_waiting("two")
        # half a frame: nothing to say yet
        with pytest.raises(TimeoutError):
            s.next_frame(timeout=0.3)

        backend.release("two")
        backend.wait_waiting("three")
        f = json.loads(s.next_frame(timeout=3))
        assert f["choices"][0]["delta"] == {"content": " world"}
        assert "three" in backend.state()["waiting"]

        backend.release("three")
        frames = s.json_frames()
        assert s.done
    finally:
        s.close()
    assert frames[-1] == "[DONE]"
    assert frames[-2]["choices"][0]["finish_reason"] == "stop"


def test_agent_path(nginx, backend):
    """Progress frames are dropped; the whole text sent again after its
    chunks is not repeated."""
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": {"uuid": "u1", "type": "statusResponse",
                   "content": "Agent @agent invoked.", "animate": False}},
        {"frame": {"uuid": "u1", "type": "agentThought",
                   "thought": "Thinking."}},
        {"frame": chunk("The ")}, {"frame": chunk("answer.")},
        {"frame": {"uuid": "u1", "type": "textResponse",
                   "textResponse": "The answer.", "sources": [],
                   "close": True, "error": False}},
        {"frame": {"uuid": "u1", "type": "usageMetrics",
                   "metrics": {"prompt_tokens": 30, "completion_tokens": 2,
                               "total_tokens": 32}}},
        {"frame": {"uuid": "u1", "type": "fileDownload",
                   "content": {"filename": "x.txt"}}},
        {"frame": {"uuid": "u1", "type": "finalizeResponseStream",
                   "textResponse": "The answer.", "thoughts": [],
                   "close": True, "error": False, "chatId": 3,
                   "metrics": {}}}])
    assert_success(read_all(open_stream(n, usage=True)), "The answer.",
                   usage={"prompt_tokens": 30, "completion_tokens": 2,
                          "total_tokens": 32})


def test_agent_path_of_the_stand_in(nginx, backend):
    n = start(nginx)
    frames = read_all(open_stream(n, "[agent] plan it"))
    assert_success(frames,
                   "Echo: [agent] plan it | first: - | turns: 0")


def test_whole_text_frames_without_chunks(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": {"uuid": "u1", "type": "textResponse",
                   "textResponse": "All at once.", "sources": [],
                   "close": True, "error": None}},
        {"frame": finalize(textResponse="All at once.")}])
    assert_success(read_all(open_stream(n)), "All at once.")

    backend.script(endpoint="stream-chat", events=[
        {"frame": finalize(textResponse="Only in the end.")}])
    assert_success(read_all(open_stream(n)), "Only in the end.")


def test_query_refusal(nginx, backend):
    n = start(nginx, extra="anythingllm_chat_mode query;")
    frames = read_all(open_stream(n, "anything?"))
    assert_success(frames, "There is no relevant information in this "
                           "workspace to answer your query.")
    up = backend.last_request("/api/v1/workspace/")
    assert json.loads(up["body"])["mode"] == "query"


def test_unknown_types_and_lines(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"write": ": a comment\n\n"},
        {"write": "event: something\nid: 5\n\n"},
        {"frame": {"type": "somethingNew", "textResponse": "not content"}},
        {"frame": chunk("A", field="textChunk", id_field="id")},
        {"write": "data: not json at all\n\n"},
        {"write": "data: [1,2,3]\n\n"},
        {"frame": chunk("B", id_field="id")},
        {"write": "data:{\"type\":\"textResponseChunk\","
                  "\"textResponse\":\"C\"}\r\n\r\n"},
        {"frame": chunk("", close=True)},
        {"frame": finalize()}])
    assert_success(read_all(open_stream(n)), "ABC")


# ---------------------------------------------------------------------------
# ends that are not an answer


def test_abort_before_any_chunk(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": abort("The model failed to respond.")}])
    frames = read_all(open_stream(n))
    assert len(frames) == 2
    assert_failed(frames, "", "The model failed to respond.")


def test_abort_of_the_stand_in(nginx, backend):
    n = start(nginx)
    assert_failed(read_all(open_stream(n, "[error]")), "",
                  "The model failed to respond.")
    assert_failed(read_all(open_stream(n, "[fail] one two three")),
                  "Echo: [fail]", "Premature close")


def test_abort_after_chunks(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": chunk("lo")},
        {"frame": abort("Premature close")}])
    assert_failed(read_all(open_stream(n, usage=True)), "Hello",
                  "Premature close")


def test_abort_then_finalize(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": abort("Premature close")},
        {"frame": finalize()}, {"frame": chunk("late")}])
    frames = read_all(open_stream(n))
    assert_failed(frames, "Hel", "Premature close")
    assert frames.count("[DONE]") == 1


def test_end_without_finalize(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": chunk("lo")}])
    assert_failed(read_all(open_stream(n)), "Hello", "ended")


def test_end_after_close_without_finalize(nginx, backend):
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": chunk("lo", close=True)}])
    assert_success(read_all(open_stream(n)), "Hello")


@pytest.mark.parametrize("how", ["close", "reset"])
def test_premature_close(nginx, backend, how):
    """The backend drops the connection mid-stream: the client still gets
    a well-formed end."""
    n = start(nginx)
    n.allow(r"upstream prematurely closed|recv\(\) failed")
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": chunk("lo")},
        {"sleep": 0.05}, {how: True}])
    assert_failed(read_all(open_stream(n)), "Hello", "broke")


def test_upstream_timeout_mid_stream(nginx, backend):
    n = start(nginx, timeout="1s")
    n.allow(r"upstream timed out")
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"wait": "never"}])
    t0 = time.monotonic()
    assert_failed(read_all(open_stream(n)), "Hel", "broke")
    assert 0.8 < time.monotonic() - t0 < 3


def test_oversized_frame(nginx, backend):
    n = start(nginx, extra="anythingllm_max_frame_size 1k;")
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("ok ")}, {"frame": chunk("x" * 3000)},
        {"wait": "after-big"}, {"frame": chunk("", close=True)},
        {"frame": finalize()}])
    s = open_stream(n)
    # the stream ends at once: it does not wait for the backend's end
    frames = read_all(s, timeout=3)
    assert_failed(frames, "ok ", "larger")
    backend.release("after-big")

    # a frame under the bound, split into many small writes, is fine
    big = frame_bytes(chunk("y" * 900))
    backend.script(endpoint="stream-chat", events=[
        {"write": big[i:i + 50]} for i in range(0, len(big), 50)]
        + [{"frames": [chunk("", close=True), finalize()]}])
    assert_success(read_all(open_stream(n)), "y" * 900)


def test_stream_errors_before_the_stream(nginx, backend):
    n = start(nginx)
    s = open_stream(n, model="nope")
    assert s.status == 404
    assert s.headers["content-type"] == "application/json"
    body = json.loads(s.read_all())
    s.close()
    assert body["error"]["code"] == "model_not_found"

    backend.script(endpoint="stream-chat", status=500, json=abort("boom"))
    s = open_stream(n)
    assert s.status == 502
    assert "boom" in json.loads(s.read_all())["error"]["message"]
    s.close()


# ---------------------------------------------------------------------------
# the client side


def test_client_abort_closes_upstream(nginx, backend):
    n = start(nginx)
    s = open_stream(n, "[slow] tell me a story")
    assert json.loads(s.next_frame(timeout=3))["choices"]
    assert backend.connections()["streams"] == 1
    assert backend.connections()["open"] == 1
    t0 = time.monotonic()
    s.close()
    backend.wait_connections(streams=0, open=0, aborted=1, timeout=1)
    assert time.monotonic() - t0 < 1


def test_client_reset_closes_upstream(nginx, backend):
    n = start(nginx)
    s = open_stream(n, "[slow] tell me a story")
    s.next_frame(timeout=3)
    s.reset()
    backend.wait_connections(streams=0, open=0, aborted=1, timeout=1)


def slow_read(n, text="x", pause=1.5, port=None):
    """A stream read by a client that first lets it pile up."""
    body = json.dumps({"model": "sales", "stream": True,
                       "messages": [{"role": "user", "content": text}]})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port or n.port))
    sock.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  "Content-Type: application/json\r\nConnection: close\r\n"
                  "Content-Length: %d\r\n\r\n%s" % (len(body), body))
                 .encode())
    time.sleep(pause)
    data = b""
    sock.settimeout(10)
    while True:
        d = sock.recv(65536)
        if not d:
            break
        data += d
    sock.close()
    head, _, raw = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    text = b""
    while raw:
        size, _, rest = raw.partition(b"\r\n")
        size = int(size, 16)
        if size == 0:
            return helpers.json_frames(text)
        text += rest[:size]
        raw = rest[size + 2:]
    raise AssertionError("the chunked body did not end")


def test_slow_reader_gets_everything(nginx, backend):
    """A client slower than AnythingLLM (here: limit_rate, and a pause
    before reading): the gateway stops reading from AnythingLLM while
    its output waits, and loses nothing."""
    port = free_port()
    # a listener with a small send buffer: the client's slowness shows
    n = start(nginx, listen="listen  127.0.0.1:%d sndbuf=4k;" % port)
    words = ["%04d%s " % (i, "z" * 300) for i in range(400)]
    backend.script(endpoint="stream-chat", events=[
        {"frames": [chunk(w) for w in words[i:i + 50]]}
        for i in range(0, 400, 50)]
        + [{"frames": [chunk("", close=True), finalize()]}])
    assert_success(slow_read(n, port=port), "".join(words))


def test_two_streams_at_once(nginx, backend):
    n = start(nginx, workers=1)
    a = open_stream(n, "[slow] first")
    b = open_stream(n, "second one")
    fb = read_all(b)
    assert_success(fb, "Echo: second one | first: - | turns: 0")
    a.close()
    backend.wait_connections(streams=0, timeout=2)


def test_with_proxy_buffering_on(nginx, backend):
    """Not the recommended setup, but the answers stay right: complete,
    or ended with an error frame when the backend breaks off."""
    n = nginx(BUFFERED_CONF % "600k")
    n.allow(r"upstream prematurely closed|an upstream response is buffered")
    words = ["%04d%s " % (i, "q" * 300) for i in range(600)]
    for reader in (lambda: read_all(open_stream(n)),
                   lambda: slow_read(n, pause=0.5)):
        backend.script(endpoint="stream-chat", events=[
            {"frames": [chunk(w) for w in words[i:i + 100]]}
            for i in range(0, 600, 100)]
            + [{"frames": [chunk("", close=True), finalize()]}])
        assert_success(reader(), "".join(words))

    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("Hel")}, {"frame": chunk("lo")}, {"sleep": 0.05},
        {"close": True}])
    assert_failed(read_all(open_stream(n)), "Hello", "broke")


def test_whole_answer_with_proxy_buffering_on(nginx, backend):
    """A non-stream answer larger than the proxy buffers, read whole by
    nginx before the copy filter has handed all of it over: the upstream
    connection is gone by then, and the answer is still complete."""
    n = nginx(BUFFERED_CONF % "200k")
    n.allow(r"an upstream response is buffered")
    text = "".join("%04d%s " % (i, "w" * 100) for i in range(1500))
    r = n.post("/v1/chat/completions", json={
        "model": "sales", "messages": [{"role": "user", "content": text}]})
    assert r.status == 200, r.text[:300]
    answer = r.json()["choices"][0]["message"]["content"]
    assert text in answer


def test_headers_go_out_before_the_first_content(nginx, backend):
    # AnythingLLM answers 200 at once, then works (retrieval, an agent
    # reporting progress): the client must see the response start
    n = start(nginx)
    backend.script(endpoint="stream-chat", events=[
        {"frame": {"uuid": "u1", "type": "statusResponse",
                   "textResponse": "searching", "close": False}},
        {"wait": "thinking"},
        {"frame": chunk("hi", close=True)}, {"frame": finalize()}])
    t0 = time.monotonic()
    s = open_stream(n, timeout=3)
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")
    assert time.monotonic() - t0 < 2
    backend.wait_waiting("thinking")
    backend.release("thinking")
    assert_success(read_all(s), "hi")


def test_failed_stream_closes_the_upstream(nginx, backend):
    # once the answer has failed, AnythingLLM is not left generating
    n = start(nginx, extra="anythingllm_max_frame_size 1k;")
    backend.script(endpoint="stream-chat", events=[
        {"frame": chunk("ok ")}, {"frame": chunk("x" * 3000)},
        {"wait": "never"}, {"frame": finalize()}])
    s = open_stream(n)
    frames = s.json_frames(3)
    assert s.done and not s.truncated
    assert_failed(frames, "ok ", "larger")
    # the client keeps its connection open: it is nginx that lets go
    backend.wait_connections(streams=0, timeout=1)
    assert backend.connections()["aborted_streams"] >= 1
    s.close()
