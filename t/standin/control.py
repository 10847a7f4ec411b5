"""Test control under /__test/ (no key needed; endpoints listed in
t/backend.py): reset, the record of requests and connections, the
state, scripts and releases of named waits."""

import json
import re

from aiohttp import web


async def control(request):
    st = request.app["state"]
    path = request.path
    method = request.method
    if path == "/__test/reset" and method == "POST":
        for ev in st.events.values():
            ev.set()            # let old waiters go before forgetting them
        st.reset()
        return web.json_response({"ok": True})
    if path == "/__test/requests":
        if method == "GET":
            return web.json_response(st.requests)
        if method == "DELETE":
            st.requests = []
            return web.json_response({"ok": True})
    if path == "/__test/connections" and method == "GET":
        conns, total = st.data_connections()
        return web.json_response({
            "open": len(conns), "open_total": total, "connections": conns,
            "accepted": st.data_conns_ever, "streams": st.streams,
            "inflight": st.inflight,
            "completed_streams": st.completed_streams,
            "aborted_streams": len(st.aborted), "aborted": st.aborted})
    if path == "/__test/state" and method == "GET":
        conns, total = st.data_connections()
        return web.json_response({
            "open": len(conns), "streams": st.streams,
            "inflight": st.inflight, "waiting": st.waiting,
            "released": sorted(n for n, e in st.events.items()
                               if e.is_set()),
            "scripts": st.scripts, "aborted_streams": len(st.aborted),
            "workspaces": list(st.workspaces)})
    if path == "/__test/script":
        if method == "POST":
            try:
                sc = json.loads(await request.text())
            except ValueError as e:
                return web.json_response({"error": str(e)}, status=400)
            if not isinstance(sc, dict):
                return web.json_response({"error": "want an object"},
                                         status=400)
            sc["times"] = int(sc.get("times", 1))
            st.scripts.append(sc)
            return web.json_response({"ok": True, "pending": len(st.scripts)})
        if method == "DELETE":
            st.scripts = []
            return web.json_response({"ok": True})
    m = re.match(r"^/__test/release/(.+)$", path)
    if m and method == "POST":
        st.event(m.group(1)).set()
        return web.json_response({"ok": True})
    return web.json_response({"error": "unknown control call"}, status=404)
