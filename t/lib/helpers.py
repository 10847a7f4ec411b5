"""
Small clients for the tests: plain HTTP requests, a streaming reader that
keeps the arrival time of every piece, SSE frame parsing, and polling.

    r = request("POST", url, json={...}, headers={...})
    r.status, r.headers (lower-case names), r.body (bytes), r.text, r.json()

    s = StreamReader("POST", url, json={...}, headers={...})
    s.status, s.headers
    s.next_frame(timeout=5)     one SSE frame (its data text), None at end
    s.frames(timeout=10)        every frame until the response ends
    s.read_until(b"...")        decoded body so far, once it holds the bytes
    s.pieces                    [(time, bytes)] body pieces as they arrived
    s.close()                   drop the connection (a client going away)

    frames_of(text)             the data of every frame in an SSE body
    json_frames(text)           those frames parsed (non-JSON kept as text)
    wait_until(fn, timeout)     poll until fn() is true; returns its value
"""

import json as jsonlib
import socket
import subprocess
import time
import urllib.parse


class Response:
    def __init__(self, status, reason, headers, raw_headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return jsonlib.loads(self.body.decode("utf-8"))

    def header_values(self, name):
        name = name.lower()
        return [v for k, v in self.raw_headers if k.lower() == name]

    def __repr__(self):
        return "<Response %d %r>" % (self.status, self.body[:200])


def _target(url):
    u = urllib.parse.urlsplit(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return host, port, path, u.netloc


def _build(method, url, body, json, headers, http10=False):
    host, port, path, netloc = _target(url)
    hdrs = [("Host", netloc)]
    if json is not None:
        body = jsonlib.dumps(json).encode()
        hdrs.append(("Content-Type", "application/json"))
    if isinstance(body, str):
        body = body.encode()
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    names = {k.lower() for k, _ in items}
    hdrs = [(k, v) for k, v in hdrs if k.lower() not in names] + list(items)
    if body is not None and "content-length" not in names \
            and "transfer-encoding" not in names:
        hdrs.append(("Content-Length", str(len(body))))
    if "connection" not in names and not http10:
        hdrs.append(("Connection", "close"))
    version = "HTTP/1.0" if http10 else "HTTP/1.1"
    head = "%s %s %s\r\n" % (method, path, version)
    head += "".join("%s: %s\r\n" % (k, v) for k, v in hdrs) + "\r\n"
    return host, port, head.encode("latin-1") + (body or b"")


class _Conn:
    """A response read incrementally from a socket."""

    def __init__(self, sock, method):
        self.sock = sock
        self.method = method
        self.buf = b""
        self.eof = False
        self.reads = []             # [(time, raw bytes)] as received

    def fill(self, deadline):
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data in time")
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.reads.append((time.monotonic(), data))
        self.buf += data
        return True

    def read_head(self, deadline):
        while b"\r\n\r\n" not in self.buf:
            if not self.fill(deadline):
                raise ConnectionError("connection closed before the head: %r"
                                      % self.buf[:200])
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        raw = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            raw.append((k.strip(), v.strip()))
        headers = {}
        for k, v in raw:
            lk = k.lower()
            headers[lk] = headers[lk] + ", " + v if lk in headers else v
        return status, reason, headers, raw


class StreamReader:
    """Sends one request and reads its answer piece by piece."""

    def __init__(self, method, url, body=None, json=None, headers=None,
                 timeout=10, http10=False):
        host, port, data = _build(method, url, body, json, headers, http10)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(data)
        self.conn = _Conn(self.sock, method)
        self.sent_at = time.monotonic()
        deadline = time.monotonic() + timeout
        self.status, self.reason, self.headers, self.raw_headers = \
            self.conn.read_head(deadline)
        self.head_at = time.monotonic()
        te = self.headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        cl = self.headers.get("content-length")
        self.length = int(cl) if cl is not None and not self.chunked else None
        if method == "HEAD" or self.status in (204, 304):
            self.length = 0
        self.body = b""             # decoded body so far
        self.pieces = []            # [(time, bytes)] decoded pieces
        self.done = False           # the body ended properly
        self.truncated = False      # the connection ended early
        self._chunk_left = 0
        self._sse = b""             # body text not yet split into frames
        self._frames = []           # [(time, data text)] complete frames
        self._frame_pos = 0

    # body decoding

    def _take(self, data):
        if data:
            t = time.monotonic()
            self.body += data
            self.pieces.append((t, data))
            self._sse += data
            self._split_frames(t)

    def _split_frames(self, t):
        text = self._sse.replace(b"\r\n", b"\n")
        while b"\n\n" in text:
            block, text = text.split(b"\n\n", 1)
            data = [line[5:].lstrip(b" ") if line.startswith(b"data:")
                    else None for line in block.split(b"\n")]
            data = [d for d in data if d is not None]
            if data:
                self._frames.append(
                    (t, b"\n".join(data).decode("utf-8", "replace")))
        self._sse = text

    def _decode(self):
        """Moves what the socket buffer allows into the body."""
        c = self.conn
        progressed = False
        while True:
            if self.done:
                return progressed
            if not self.chunked:
                if self.length is not None:
                    take = c.buf[: self.length - len(self.body)]
                    c.buf = c.buf[len(take):]
                    self._take(take)
                    if len(self.body) >= self.length:
                        self.done = True
                    return progressed or bool(take)
                take, c.buf = c.buf, b""
                self._take(take)
                return progressed or bool(take)
            if self._chunk_left > 0:
                take = c.buf[: self._chunk_left]
                if not take:
                    return progressed
                c.buf = c.buf[len(take):]
                self._chunk_left -= len(take)
                self._take(take)
                progressed = True
                if self._chunk_left == 0:
                    self._chunk_left = -1       # CRLF after the data
                continue
            if self._chunk_left == -1:
                if len(c.buf) < 2:
                    return progressed
                c.buf = c.buf[2:]
                self._chunk_left = 0
                continue
            if b"\r\n" not in c.buf:
                return progressed
            line, rest = c.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # last chunk: skip trailers up to the empty line
                if b"\r\n\r\n" not in b"\r\n" + rest:
                    return progressed
                c.buf = (b"\r\n" + rest).split(b"\r\n\r\n", 1)[1]
                self.done = True
                return True
            c.buf = rest
            self._chunk_left = size
            progressed = True

    def _pump(self, deadline):
        """Reads once from the socket; False when the connection ended."""
        if self._decode():
            return True
        if self.done:
            return False
        if not self.conn.fill(deadline):
            self._decode()
            if not self.done and (self.chunked or self.length is not None):
                self.truncated = True
            if not self.chunked and self.length is None:
                self.done = True
            return False
        return True

    # public reading

    def read_some(self, timeout=5):
        """Waits for more body; returns the new bytes (b"" at the end)."""
        before = len(self.body)
        deadline = time.monotonic() + timeout
        while len(self.body) == before:
            if not self._pump(deadline):
                break
        return self.body[before:]

    def read_until(self, needle, timeout=5):
        if isinstance(needle, str):
            needle = needle.encode()
        deadline = time.monotonic() + timeout
        while needle not in self.body:
            if not self._pump(deadline):
                raise AssertionError("stream ended without %r; got %r"
                                     % (needle, self.body[-400:]))
        return self.body

    def read_all(self, timeout=10):
        deadline = time.monotonic() + timeout
        while not self.done and not self.truncated:
            if not self._pump(deadline):
                break
        return self.body

    def next_frame(self, timeout=5, with_time=False):
        deadline = time.monotonic() + timeout
        while self._frame_pos >= len(self._frames):
            if not self._pump(deadline):
                if self._frame_pos >= len(self._frames):
                    return None
        t, data = self._frames[self._frame_pos]
        self._frame_pos += 1
        return (t, data) if with_time else data

    def frames(self, timeout=10, with_time=False):
        out = []
        deadline = time.monotonic() + timeout
        while True:
            f = self.next_frame(max(0.001, deadline - time.monotonic()),
                                with_time)
            if f is None:
                return out
            out.append(f)

    def json_frames(self, timeout=10):
        return [_maybe_json(f) for f in self.frames(timeout)]

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def response(self):
        """What was read so far, as a Response."""
        return Response(self.status, self.reason, self.headers,
                        self.raw_headers, self.body)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def reset(self):
        """Closes with a TCP RST."""
        import struct
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def request(method, url, body=None, json=None, headers=None, timeout=10,
            http10=False):
    """One request on a fresh connection; the whole answer."""
    s = StreamReader(method, url, body=body, json=json, headers=headers,
                     timeout=timeout, http10=http10)
    try:
        s.read_all(timeout)
    finally:
        s.close()
    return s.response()


def get(url, **kw):
    return request("GET", url, **kw)


def post(url, json=None, **kw):
    return request("POST", url, json=json, **kw)


def raw_request(host, port, data, timeout=5):
    """Sends raw bytes and returns every byte received until close."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                d = sock.recv(65536)
            except socket.timeout:
                break
            if not d:
                break
            out += d
        return out
    finally:
        sock.close()


def _maybe_json(text):
    try:
        return jsonlib.loads(text)
    except ValueError:
        return text


def frames_of(text):
    """The data text of every complete SSE frame in a body."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.replace("\r\n", "\n")
    out = []
    for block in text.split("\n\n")[:-1] if "\n\n" in text else []:
        data = [line[5:].lstrip(" ") for line in block.split("\n")
                if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def json_frames(text):
    return [_maybe_json(f) for f in frames_of(text)]


def wait_until(fn, timeout=5.0, interval=0.02, message=None):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met in %.1fs"
                                 % timeout)
        time.sleep(interval)


def own_function_slots(so):
    """The PLT slots of a shared object for functions the module itself
    defines (alm_*, ngx_http_anythingllm_*): each is a call between the
    module's own files that goes through the PLT, as if another object
    could replace the function; built as it should be, there are none."""
    out = subprocess.run(["readelf", "--relocs", "--wide", so],
                         capture_output=True, text=True, check=True)
    plt = [w[4] for w in (line.split() for line in out.stdout.splitlines())
           if len(w) >= 5 and w[2].endswith("_JUMP_SLOT")]
    # nginx's and the libraries' functions always go through the PLT: a
    # reading that finds no slot at all has misread readelf
    assert plt, "no PLT slot read from %s" % so
    return [name for name in plt
            if name.startswith(("alm_", "ngx_http_anythingllm_"))]
