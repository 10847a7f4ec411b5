"""The entry point of every request: test control set apart, then the
request's record, its route, the key check and the body check in the
real server's order; and the listener."""

import asyncio
import json
import signal
import time

from aiohttp import web

from standin import chat, documents, openai_compat, workspaces
from standin.control import control
from standin.express import body_error, cors_preflight, parse_body, \
    send_json, send_status
from standin.routes import Answered, key_ok, match_route
from standin.scripted import run_script
from standin.state import State
from standin.stream import ClientGone

# the handler modules fill the route table as they are imported; no two
# routes match one path, so their order does not matter
HANDLERS = (workspaces, chat, documents, openai_compat)


async def dispatch(request):
    st = request.app["state"]
    handler = request.protocol
    raw_path = request.raw_path.split("?", 1)[0]
    if raw_path.startswith("/__test/"):
        st.conn_kind[handler] = "control"
        return await control(request)
    if st.conn_kind.get(handler) != "data":
        st.conn_kind[handler] = "data"
        st.conn_seq += 1
        st.conn_no[handler] = st.conn_seq
        st.data_conns_ever += 1

    raw = await request.read()
    request["raw_body"] = raw
    record(st, request, raw)

    st.inflight += 1
    try:
        return await answer(request, raw_path, raw)
    except ClientGone:
        return web.Response(status=499)
    finally:
        st.inflight -= 1


def record(st, request, raw):
    """Keeps what arrived, as GET /__test/requests shows it."""
    st.req_seq += 1
    headers = {}
    for k, v in request.headers.items():
        lk = k.lower()
        headers[lk] = headers[lk] + ", " + v if lk in headers else v
    st.requests.append({
        "seq": st.req_seq,
        "time": time.time(),
        "conn": st.conn_no.get(request.protocol),
        "method": request.method,
        "path": request.raw_path,
        "query": request.rel_url.raw_query_string,
        "version": "%d.%d" % tuple(request.version),
        "headers": headers,
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")]
                        for k, v in request.raw_headers],
        "body": raw.decode("utf-8", "replace"),
        "body_len": len(raw),
    })


async def answer(request, raw_path, raw):
    st = request.app["state"]
    if request.method == "OPTIONS":
        return cors_preflight(request)
    if not raw_path.lower().startswith("/api/"):
        return send_status(request, 404)
    fn, params = match_route(request.method, raw_path)
    if fn is None:
        return send_status(request, 404)
    if not key_ok(request):
        return send_json(request, {"error": "No valid api key found."}, 403)

    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if ctype == "application/json" and raw:
        try:
            json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return body_error(request, str(e))

    script = st.take_script(params.get("slug"), None, raw_path)
    if script is not None:
        handled = await run_script(request, script, False,
                                   params.get("slug"))
        if handled is not None:
            return handled

    def body():
        return parse_body(request, raw)

    try:
        return await fn(request, params, body)
    except Answered as a:
        return a.response
    except ValueError:
        return send_status(request, 500)


def build_app(state):
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app["state"] = state
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def serve(args):
    seed = [w.strip() for w in args.workspaces.split(",") if w.strip()]
    state = State(args.api_key, seed, args.keepalive_timeout)
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None,
                           keepalive_timeout=args.keepalive_timeout,
                           handle_signals=False)
    await runner.setup()
    state.server = runner.server
    site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print("listening on %s:%d" % (args.host, port), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
