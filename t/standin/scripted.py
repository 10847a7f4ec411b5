"""Answers scripted through POST /__test/script (format in t/backend.py):
raw writes, frames, pauses, named waits, aborts and resets, or a whole
answer instead of the normal one."""

import base64

from aiohttp import web

from standin.express import express_headers, send_json
from standin.stream import Stream, frame, pause, serve_stream, wait_named


async def run_script(request, sc, stream, slug):
    """Answers as the script says; None when the normal answer follows."""
    if sc.get("delay"):
        await pause(request, sc["delay"])
    status = int(sc.get("status", 200))
    headers = sc.get("headers") or {}
    if "events" in sc:
        if stream:
            s = Stream(request, status, headers)
        else:
            hdrs = {"Content-Type": "application/json; charset=utf-8"}
            hdrs.update(headers)
            s = Stream(request, status, dict(
                {"Cache-Control": None, "Access-Control-Allow-Origin": None,
                 "Connection": None}, **hdrs))

        async def write_body(s):
            for ev in sc["events"]:
                await run_event(request, s, ev)
                if s.ended:
                    break

        return await serve_stream(request, s, slug, write_body)
    if "json" in sc:
        r = send_json(request, sc["json"], status)
    elif "body" in sc:
        raw = str(sc["body"]).encode()
        r = web.Response(status=status, body=raw, headers=express_headers(
            request, {"Content-Type": "text/plain; charset=utf-8"}))
    else:
        return None
    for k, v in headers.items():
        if v is None:
            r.headers.popall(k, None)
        else:
            r.headers[k] = str(v)
    return r


async def run_event(request, s, ev):
    if "write" in ev:
        await s.raw(str(ev["write"]).encode())
    elif "write_b64" in ev:
        await s.raw(base64.b64decode(ev["write_b64"]))
    elif "frame" in ev:
        await s.send(ev["frame"])
    elif "frames" in ev:
        await s.raw(b"".join(frame(f) for f in ev["frames"]))
        s.frames += len(ev["frames"])
    elif "sleep" in ev:
        await pause(request, ev["sleep"])
    elif "wait" in ev:
        await wait_named(request, str(ev["wait"]))
    elif ev.get("close"):
        s.abort()
    elif ev.get("reset"):
        s.abort(rst=True)
