"""
Every shape of request body that nginx can hand to the module, on the
one route whose body the module reads (chat completions, stream and
non-stream) and on both OpenAI base paths:

    Content-Length; chunked in one chunk, in many small chunks, with
    chunk extensions, with trailers; a body spooled to a temporary file
    (client_body_buffer_size 1k, client_body_in_file_only on); an empty
    body; HTTP/2 without Content-Length; proxy_request_buffering off;
    bodies over the limit.

HTTP/1.1 requests are written byte for byte on raw sockets, each piece
in its own write with a pause, so that nginx reads the body in several
pieces.  Every case checks the answer, the body AnythingLLM received,
and that no worker died: the worker pids are unchanged and the error
log has no alert and no signal line.
"""

import json
import re
import socket
import subprocess
import time

import pytest

from lib import helpers
from lib.openai import BASES
from lib.processes import free_port


UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}"
                     r"-[0-9a-f]{12}$")

# multi-byte UTF-8 text, so that chunk boundaries fall inside characters
TEXT = ("h\u00e9llo w\u00f6rld \u2713 caf\u00e9 "
        "\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9")


# one location for each OpenAI base path (BASES); %(extra)s: a directive
# a test adds to both
LOCATION = """
        location %(base)s/ {
            anythingllm_openai        on;
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            %(extra)s
            proxy_pass                http://anythingllm;
        }
"""

# %(listen)s: a second listen of the tests over HTTP/2
CONF = """
    anythingllm_redis  @REDIS@ timeout=500ms;

    proxy_http_version  1.1;
    proxy_set_header    Connection "";
    proxy_buffering     off;

    server {
        listen  127.0.0.1:@PORT@;
        %(listen)s
%(locations)s
    }
"""


def start(nginx, extra="", listen="", **params):
    locations = "".join(LOCATION % {"base": base, "extra": extra}
                        for base in BASES)
    n = nginx(CONF % {"listen": listen, "locations": locations}, **params)
    n.pids_at_start = n.worker_pids()
    return n


def chat_body(marker, stream, pad=0):
    msg = "%s %s" % (TEXT, marker)
    if pad:
        msg += " " + "p" * pad
    body = {"model": "sales", "messages": [{"role": "user", "content": msg}],
            "stream": stream}
    return json.dumps(body, ensure_ascii=False).encode(), msg


# ---------------------------------------------------------------------------
# HTTP/1.1 on a raw socket


def chunked(body, size, ext=b"", trailers=b""):
    out = []
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
    out.append(b"0%s\r\n%s\r\n" % (ext, trailers))
    return out


def head(path, headers):
    lines = ["POST %s HTTP/1.1" % path, "Host: localhost",
             "Content-Type: application/json", "Connection: close"]
    lines += ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def decode_chunked(data):
    out = b""
    while True:
        line, data = data.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2:]


def raw_exchange(port, pieces, pause=0.01, timeout=15):
    """Writes each piece separately, then reads the answer until the
    server closes: (status, headers, decoded body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        for p in pieces:
            sock.sendall(p)
            if pause:
                time.sleep(pause)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = sock.recv(65536)
            if not d:
                break
            data += d
    finally:
        sock.close()
    assert b"\r\n\r\n" in data, "no answer: %r" % data[:300]
    top, body = data.split(b"\r\n\r\n", 1)
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        body = decode_chunked(body)
    return status, headers, body


# ---------------------------------------------------------------------------
# checks


def answer_text(status, headers, body, stream):
    assert status == 200, (status, body[:500])
    if not stream:
        assert headers["content-type"].startswith("application/json")
        return json.loads(body)["choices"][0]["message"]["content"]
    assert headers["content-type"].startswith("text/event-stream")
    frames = [f[len("data: "):] for f in body.decode().split("\n\n")
              if f.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames
    return "".join(json.loads(f)["choices"][0]["delta"].get("content", "")
                   for f in frames[:-1] if json.loads(f).get("choices"))


def check_answer(n, backend, status, headers, body, stream, msg):
    """The answer is the echo of msg, and AnythingLLM got the translated
    request: the message, a new session, a body of the length it was
    told, no chunked framing."""
    text = answer_text(status, headers, body, stream)
    assert text == "Echo: %s | first: - | turns: 0" % msg, text
    chats = [r for r in n.backend.requests("/api/v1/workspace/")
             if r["path"].endswith("chat")]
    assert chats, "AnythingLLM got no chat request"
    up = chats[-1]
    assert up["path"] == ("/api/v1/workspace/sales/stream-chat" if stream
                          else "/api/v1/workspace/sales/chat")
    sent = json.loads(up["body"])
    assert sent["message"] == msg
    assert sent["mode"] == "chat"
    assert UUID_RE.match(sent["sessionId"])
    assert "transfer-encoding" not in up["headers"]
    assert int(up["headers"]["content-length"]) == up["body_len"]


def check_error(status, headers, body, want):
    assert status == want, (status, body[:500])
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["message"]
    return err


def check_workers(n):
    """No worker died: same pids as at the start, nothing in the log."""
    time.sleep(0.2)
    assert n.worker_pids() == n.pids_at_start
    log = n.error_log()
    assert "[alert]" not in log
    assert not re.search(r"signal \d+|core dumped", log), \
        [l for l in log.splitlines() if "signal" in l][:5]


# ---------------------------------------------------------------------------
# HTTP/1.1: Content-Length and chunked, in memory


def shape_pieces(shape, path, body):
    if shape == "content-length":
        data = head(path, [("Content-Length", str(len(body)))]) + body
        # head and body in pieces that end mid-character
        return [data[i:i + 50] for i in range(0, len(data), 50)]
    te = [("Transfer-Encoding", "chunked")]
    if shape == "one-chunk":
        return [head(path, te) + b"".join(chunked(body, len(body)))]
    if shape == "small-chunks":
        return [head(path, te)] + chunked(body, 7)
    if shape == "extensions":
        return [head(path, te)] + chunked(body, 40, ext=b';name="va;l"')
    if shape == "trailers":
        return [head(path, te + [("Trailer", "X-Checksum")])] + chunked(
            body, 64, trailers=b"X-Checksum: 1234\r\nX-Other: z\r\n")
    raise ValueError(shape)


SHAPES = ("content-length", "one-chunk", "small-chunks", "extensions",
          "trailers")


@pytest.mark.parametrize("shape", SHAPES)
def test_body_in_memory(nginx, backend, shape):
    n = start(nginx)
    for base in BASES:
        for stream in (False, True):
            marker = "%s %s %s" % (shape, base, stream)
            body, msg = chat_body(marker, stream)
            status, headers, out = raw_exchange(
                n.port, shape_pieces(shape, base + "/chat/completions",
                                     body))
            check_answer(n, backend, status, headers, out, stream, msg)
    check_workers(n)


def test_chunked_body_on_kept_alive_connection(nginx, backend):
    """Two chunked requests on one connection: the first body is read
    exactly to its end, the second request is intact."""
    n = start(nginx)
    bodies = [chat_body("keepalive %d" % i, False) for i in range(2)]
    data = b""
    for i, (body, _) in enumerate(bodies):
        h = head("/v1/chat/completions", [("Transfer-Encoding", "chunked")])
        if i == 0:
            h = h.replace(b"Connection: close", b"Connection: keep-alive")
        data += h + b"".join(chunked(body, 13))
    status, headers, out = raw_exchange(n.port, [data])
    # the first answer has a Content-Length; the second follows it
    first = json.loads(out[:int(headers["content-length"])])
    assert first["choices"][0]["message"]["content"] == \
        "Echo: %s | first: - | turns: 0" % bodies[0][1]
    rest = out[int(headers["content-length"]):]
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
    assert ("Echo: %s | first: - | turns: 0" % bodies[1][1]).encode() \
        in rest
    check_workers(n)


# ---------------------------------------------------------------------------
# bodies in a temporary file


FILE_SHAPES = ("content-length", "small-chunks", "trailers")


@pytest.mark.parametrize("extra", [
    "client_body_buffer_size 1k;",
    "client_body_in_file_only on;",
    "client_body_in_file_only clean; client_body_buffer_size 1k;",
])
def test_body_in_temp_file(nginx, backend, extra):
    n = start(nginx, extra=extra)
    for base in BASES:
        for stream in (False, True):
            for shape in FILE_SHAPES:
                marker = "file %s %s %s" % (shape, base, stream)
                # larger than the 1k buffer, mostly
                body, msg = chat_body(marker, stream, pad=5000)
                pieces = shape_pieces(shape, base + "/chat/completions",
                                      body)
                if shape == "small-chunks":
                    # 7-byte chunks of 5k would take long: bigger ones
                    pieces = [pieces[0]] + chunked(body, 500)
                status, headers, out = raw_exchange(n.port, pieces,
                                                    pause=0.002)
                check_answer(n, backend, status, headers, out, stream, msg)
            # a small body, in the file too under in_file_only
            body, msg = chat_body("small %s %s" % (base, stream), stream)
            status, headers, out = raw_exchange(
                n.port, shape_pieces("one-chunk", base + "/chat/completions",
                                     body))
            check_answer(n, backend, status, headers, out, stream, msg)
    check_workers(n)


# ---------------------------------------------------------------------------
# empty bodies


@pytest.mark.parametrize("extra", ["", "client_body_in_file_only on;"])
def test_empty_body(nginx, backend, extra):
    n = start(nginx, extra=extra)
    for base in BASES:
        path = base + "/chat/completions"
        for pieces in (
                [head(path, [("Content-Length", "0")])],
                [head(path, [("Transfer-Encoding", "chunked")]),
                 b"0\r\n\r\n"],
                [head(path, [("Transfer-Encoding", "chunked")]),
                 b"0\r\nX-Trailer: t\r\n\r\n"],
                [head(path, [])]):
            status, headers, out = raw_exchange(n.port, pieces)
            err = check_error(status, headers, out, 400)
            assert "empty" in err["message"], err
    assert [r for r in backend.requests("/api/v1/workspace/")] == []
    check_workers(n)


# ---------------------------------------------------------------------------
# over the limit


def test_chunked_and_file_bodies_over_the_limit(nginx, backend):
    n = start(nginx, extra="client_max_body_size 2k; "
                           "client_body_buffer_size 1k;")
    for base in BASES:
        path = base + "/chat/completions"
        body, _ = chat_body("too big", False, pad=4000)
        for pieces in (
                [head(path, [("Transfer-Encoding", "chunked")])]
                + chunked(body, 300),
                [head(path, [("Content-Length", str(len(body)))]), body]):
            status, headers, out = raw_exchange(n.port, pieces)
            check_error(status, headers, out, 413)
        # just under the limit still passes, from the file
        body, msg = chat_body("fits", False, pad=1500)
        assert 1024 < len(body) < 2048
        status, headers, out = raw_exchange(
            n.port, [head(path, [("Transfer-Encoding", "chunked")])]
            + chunked(body, 300))
        check_answer(n, backend, status, headers, out, False, msg)
    assert len([r for r in backend.requests("/api/v1/workspace/")]) == 2
    check_workers(n)


def test_unlimited_body_size_still_bounded(nginx, backend):
    """client_max_body_size 0 does not let a chat body of any size into
    memory: above 64m it is refused before it is read."""
    n = start(nginx, extra="client_max_body_size 0;")
    status, headers, out = raw_exchange(n.port, [head(
        "/v1/chat/completions",
        [("Content-Length", str(64 * 1024 * 1024 + 1))]) + b'{"model"'])
    check_error(status, headers, out, 413)
    body, msg = chat_body("unlimited", False, pad=100000)
    status, headers, out = raw_exchange(n.port, [head(
        "/v1/chat/completions", [("Transfer-Encoding", "chunked")])]
        + chunked(body, 30000))
    check_answer(n, backend, status, headers, out, False, msg)
    check_workers(n)


# ---------------------------------------------------------------------------
# proxy_request_buffering off: the module reads the whole body first,
# and the proxy then sends the translated body


@pytest.mark.parametrize("shape", ["content-length", "small-chunks"])
def test_proxy_request_buffering_off(nginx, backend, shape):
    n = start(nginx, extra="proxy_request_buffering off; "
                           "client_body_buffer_size 1k;")
    for base in BASES:
        for stream in (False, True):
            for pad in (0, 3000):
                body, msg = chat_body("unbuffered %s %s %s"
                                      % (base, stream, pad), stream, pad)
                status, headers, out = raw_exchange(
                    n.port, shape_pieces(shape, base + "/chat/completions",
                                         body))
                check_answer(n, backend, status, headers, out, stream, msg)
    check_workers(n)


# ---------------------------------------------------------------------------
# HTTP/2 without Content-Length


def curl_h2(port, path, body, timeout=20):
    """POST over HTTP/2 (prior knowledge) with the body from a pipe:
    curl cannot know the length and sends none."""
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-X", "POST", "-T", "-",
         "-H", "Content-Type: application/json", "-H", "Expect:",
         "-D", "-", "--max-time", str(timeout),
         "http://127.0.0.1:%d%s" % (port, path)],
        input=body, capture_output=True, timeout=timeout + 5)
    assert out.returncode == 0, out.stderr
    top, _, rest = out.stdout.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/2 "), lines[0]
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


@pytest.mark.parametrize("extra", ["", "client_body_buffer_size 1k;"])
def test_http2_without_content_length(nginx, backend, extra):
    h2 = free_port()
    n = start(nginx, extra=extra, listen="listen  127.0.0.1:%d http2;" % h2)
    for base in BASES:
        for stream in (False, True):
            for pad in (0, 40000):
                body, msg = chat_body("h2 %s %s %s" % (base, stream, pad),
                                      stream, pad)
                status, headers, out = curl_h2(
                    h2, base + "/chat/completions", body)
                check_answer(n, backend, status, headers, out, stream, msg)
        # an empty HTTP/2 body
        status, headers, out = curl_h2(h2, base + "/chat/completions", b"")
        err = check_error(status, headers, out, 400)
        assert "empty" in err["message"], err
    # every request was HTTP/2, and came without a length; a line is
    # written after its answer is sent
    def h2_lines():
        return [l for l in n.access_lines() if "HTTP/2.0" in l]
    helpers.wait_until(lambda: len(h2_lines()) >= 10, timeout=5,
                       message="not every HTTP/2 request was logged")
    assert len(h2_lines()) == 10, n.access_lines()
    log = n.error_log()
    assert 'http2 header: ":method: POST"' in log
    assert 'http2 header: "content-length' not in log
    check_workers(n)


def test_models_refuse_a_body_in_any_framing(nginx, backend):
    """The models routes read no body: one sent anyway, chunked or
    not, is refused, and the worker lives."""
    n = start(nginx)
    for base in BASES:
        for path in (base + "/models", base + "/models/sales"):
            for extra, body in (
                    ([("Transfer-Encoding", "chunked")],
                     b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
                    ([("Content-Length", "5")], b"hello")):
                data = head(path, extra).replace(b"POST ", b"GET ", 1)
                status, headers, out = raw_exchange(n.port, [data, body])
                check_error(status, headers, out, 400)
    check_workers(n)
