"""The two ends of the memory case's slow streams.

    python3 -m benchkit.slowstream backend PORT
    python3 -m benchkit.slowstream client PORT PATH STREAMS [KEY BODY]

The backend answers every request as AnythingLLM's stream-chat starts
one: the headers and the first token's frame, chunked, then nothing
more until the client goes; a generation that takes its time.

The client opens STREAMS connections (a few hundred connecting at a
time), POSTs BODY to PATH on each and waits until each holds its first
frame: every stream is then open at the gateway, its upstream
connection too.  It prints "ready N" (N streams that got there) and
holds them until a line comes on stdin, then closes them all.
"""

import asyncio
import sys

from . import answers

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


def first_chunk():
    frame = answers.stream_frames()[0].encode()
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class Slow(asyncio.Protocol):
    """Reads one request, answers its start, then holds."""

    def __init__(self):
        self.buf = b""
        self.sent = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.sent:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) >= end + 4 + length:
            self.sent = True
            self.transport.write(HEAD + first_chunk())


async def backend(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Slow, "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


async def open_stream(port, request):
    """A connection that holds its first frame, or None."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        seen = b""
        while head.startswith(b"HTTP/1.1 200") and b"data:" not in seen:
            data = await reader.read(4096)
            if not data:
                break
            seen += data
        if b"data:" in seen:
            return writer
        writer.close()
    except (OSError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        pass
    return None


async def one_stream(port, request, gate, state, hold):
    async with gate:
        writer = await open_stream(port, request)
    state["settled"] += 1
    if writer is None:
        return
    state["ready"] += 1
    await hold.wait()
    writer.close()


async def client(port, path, streams, key, body):
    head = "POST %s HTTP/1.1\r\nHost: bench\r\n" % path
    if key:
        head += "Authorization: Bearer %s\r\n" % key
    head += ("Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(body))
    request = head.encode() + body.encode()
    gate = asyncio.Semaphore(256)
    hold = asyncio.Event()
    state = {"settled": 0, "ready": 0}
    tasks = [asyncio.create_task(one_stream(port, request, gate, state,
                                            hold))
             for _ in range(streams)]
    while state["settled"] < streams:
        await asyncio.sleep(0.2)
    print("ready %d" % state["ready"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None,
                                                     sys.stdin.readline)
    hold.set()
    await asyncio.gather(*tasks)


def main():
    if sys.argv[1] == "backend":
        asyncio.run(backend(int(sys.argv[2])))
    else:
        key = sys.argv[5] if len(sys.argv) > 5 else ""
        body = sys.argv[6] if len(sys.argv) > 6 else ""
        asyncio.run(client(int(sys.argv[2]), sys.argv[3],
                           int(sys.argv[4]), key, body))


if __name__ == "__main__":
    main()
