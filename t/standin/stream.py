"""Writing to a client that may go away: paced pauses and named waits
that notice it, and the SSE response with its bookkeeping (streams in
flight, completed, and those whose client left)."""

import asyncio
import json
import socket
import struct
import time

from aiohttp import web

from standin.express import express_headers


class ClientGone(Exception):
    """The client closed its connection while we were answering."""


def client_gone(request):
    t = request.protocol.transport
    return t is None or t.is_closing()


async def pause(request, seconds):
    loop = asyncio.get_running_loop()
    end = loop.time() + max(0.0, float(seconds))
    while True:
        if client_gone(request):
            raise ClientGone()
        left = end - loop.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.02))


async def wait_named(request, name):
    state = request.app["state"]
    ev = state.event(name)
    state.waiting[name] = state.waiting.get(name, 0) + 1
    try:
        while not ev.is_set():
            if client_gone(request):
                raise ClientGone()
            try:
                await asyncio.wait_for(asyncio.shield(ev.wait()), 0.02)
            except asyncio.TimeoutError:
                pass
    finally:
        state.waiting[name] -= 1
        if state.waiting[name] <= 0:
            del state.waiting[name]


async def write(request, resp, data):
    if client_gone(request):
        raise ClientGone()
    try:
        await resp.write(data)
    except ConnectionError:
        raise ClientGone()


def frame(obj):
    if isinstance(obj, str):
        return ("data: %s\n\n" % obj).encode()
    return ("data: %s\n\n" % json.dumps(obj, separators=(",", ":"))).encode()


class Stream:
    """An SSE response as stream-chat sends it, with bookkeeping."""

    def __init__(self, request, status=200, headers=None):
        self.request = request
        self.state = request.app["state"]
        hdrs = express_headers(request)
        hdrs.update({
            "Cache-Control": "no-cache",
            "Content-Type": "text/event-stream",
            "Access-Control-Allow-Origin": "*",
            "Connection": "keep-alive",
        })
        if tuple(request.version) < (1, 1):
            del hdrs["Connection"]
        if headers is not None:
            for k, v in headers.items():
                for old in [h for h in hdrs if h.lower() == k.lower()]:
                    del hdrs[old]
                if v is not None:
                    hdrs[k] = str(v)
        # without a Content-Length aiohttp chunks HTTP/1.1 answers and
        # ends HTTP/1.0 ones by closing, as Node does
        self.resp = web.StreamResponse(status=status, headers=hdrs)
        self.frames = 0
        self.ended = False
        self.started = False

    async def start(self):
        self.state.streams += 1
        self.started = True
        try:
            await self.resp.prepare(self.request)
        except ConnectionError:
            raise ClientGone()

    async def send(self, obj):
        await write(self.request, self.resp, frame(obj))
        self.frames += 1

    async def raw(self, data):
        await write(self.request, self.resp, data)

    def abort(self, rst=False):
        t = self.request.protocol.transport
        if t is not None:
            if rst:
                sock = t.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            t.abort()
        self.ended = True

    async def end(self):
        if not self.ended:
            try:
                await self.resp.write_eof()
            except ConnectionError:
                raise ClientGone()
            self.ended = True

    def gone(self, path, workspace):
        self.state.aborted.append({
            "path": path, "workspace": workspace, "frames": self.frames,
            "time": time.time()})

    def finish(self, completed):
        if not self.started:
            return
        self.state.streams -= 1
        if completed:
            self.state.completed_streams += 1


async def serve_stream(request, s, slug, write_body, on_gone=None):
    """Starts the stream s, lets write_body(s) fill it and ends it unless
    write_body aborted it.  A client that goes away is no error: the
    stream is recorded as aborted, then on_gone() runs."""
    completed = False
    try:
        await s.start()
        await write_body(s)
        if not s.ended:
            await s.end()
            completed = True
    except ClientGone:
        s.gone(request.path, slug)
        if on_gone is not None:
            on_gone()
    finally:
        s.finish(completed)
    return s.resp
