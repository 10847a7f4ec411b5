"""The key service of the `auth_request` case: what a site builds to
check these keys without the module, in front of nginx's auth_request.

    python3 -m benchkit.keysvc PORT REDIS_HOST:PORT [PREFIX]

Design, kept as small and as fair as the module's own uncached path:

- one process on one asyncio loop, as the gateway runs one worker;
- nginx keeps its connections open (upstream keepalive), so a check
  costs one small HTTP exchange, never a connect;
- one Redis connection for every check, commands pipelined and their
  replies matched in order, as the module's worker does;
- per check exactly the module's Redis work for a key without a
  limit: SHA-256 of the bearer key, HGETALL <prefix>key:<digest>;
- the same verdict on the record as the module gives for the routes
  the bench sends: enabled, not expired, the route's scope (GET and
  HEAD need "read", chat and stream-chat "chat", the rest "admin"),
  the workspace of /api/v1/workspace/<slug>[/...] in the key's
  "workspaces" ("*" or the comma list);
- 204 lets the request through, 401 and 403 refuse it;
- no cache: a key service that caches would need the revocation
  channel to be correct, which is what the module's cache has.

Plain callbacks, no task per request: the cheapest asyncio allows.
"""

import asyncio
import collections
import hashlib
import sys
import time

OK = b"HTTP/1.1 204 No Content\r\n\r\n"
DENY = {401: b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
        403: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"}


class Redis(asyncio.Protocol):
    """One pipelined connection; each reply goes to the callback of
    the oldest command still waiting."""

    def __init__(self):
        self.transport = None
        self.waiting = collections.deque()
        self.buf = bytearray()

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        sys.exit("keysvc: Redis went away")

    def hgetall(self, key, callback):
        self.waiting.append(callback)
        self.transport.write(b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n"
                             % (len(key), key))

    def data_received(self, data):
        self.buf += data
        while self.buf:
            reply, used = parse_reply(self.buf, 0)
            if used is None:
                return
            del self.buf[:used]
            self.waiting.popleft()(reply)


def parse_reply(buf, at):
    """(reply, end) for the RESP reply at buf[at:], or (None, None)
    when it is not all there yet.  An error reply is an Exception."""
    eol = buf.find(b"\r\n", at)
    if eol < 0:
        return None, None
    kind, line = buf[at:at + 1], bytes(buf[at + 1:eol])
    at = eol + 2
    if kind == b"*":
        items = []
        for _ in range(max(int(line), 0)):
            item, at = parse_reply(buf, at)
            if at is None:
                return None, None
            items.append(item)
        return items, at
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, at
        if len(buf) < at + n + 2:
            return None, None
        return bytes(buf[at:at + n]), at + n + 2
    if kind == b"-":
        return Exception(line.decode()), at
    return line, at


def needed_scope(method, path):
    if method in (b"GET", b"HEAD"):
        return b"read"
    if path.endswith((b"/chat", b"/stream-chat")):
        return b"chat"
    return b"admin"


def verdict(record, method, path):
    """The HTTP status for a key's record (a flat HGETALL list)."""
    if not isinstance(record, list) or not record:
        return 401
    rec = dict(zip(record[0::2], record[1::2]))
    if rec.get(b"disabled", b"0") not in (b"", b"0"):
        return 403
    expires = int(rec.get(b"expires") or 0)
    if expires and expires <= time.time():
        return 401
    scopes = [s.strip() for s in rec.get(b"scopes", b"").lower().split(b",")]
    if needed_scope(method, path) not in scopes:
        return 403
    parts = path.lower().split(b"/")
    if len(parts) > 4 and parts[1:4] == [b"api", b"v1", b"workspace"]:
        ws = rec.get(b"workspaces", b"").strip()
        if ws != b"*" and path.split(b"/")[4] not in [
                w.strip() for w in ws.split(b",")]:
            return 403
    return 204


class Check(asyncio.Protocol):
    """One keep-alive connection from nginx; requests have no body."""

    def __init__(self, redis, prefix):
        self.redis = redis
        self.prefix = prefix
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            self.request(head)

    def request(self, head):
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        auth = fields.get(b"authorization", b"")
        method = fields.get(b"x-original-method", b"GET")
        path = fields.get(b"x-original-uri", b"/")
        if not auth.lower().startswith(b"bearer ") or len(auth) < 8:
            self.transport.write(DENY[401])
            return
        digest = hashlib.sha256(auth[7:].strip()).hexdigest().encode()
        transport = self.transport

        def answer(record):
            status = verdict(record, method, path)
            if not transport.is_closing():
                transport.write(OK if status == 204 else DENY[status])

        self.redis.hgetall(self.prefix + b"key:" + digest, answer)


async def serve(port, redis_addr, prefix):
    loop = asyncio.get_running_loop()
    host, rport = redis_addr.rsplit(":", 1)
    _, redis = await loop.create_connection(Redis, host, int(rport))
    server = await loop.create_server(lambda: Check(redis, prefix),
                                      "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main():
    port, redis_addr = int(sys.argv[1]), sys.argv[2]
    prefix = (sys.argv[3] if len(sys.argv) > 3 else "anythingllm:").encode()
    try:
        asyncio.run(serve(port, redis_addr, prefix))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
