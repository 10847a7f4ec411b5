#!/usr/bin/python3
"""
A stand-in for the AnythingLLM server, used by the tests of ngx_anythingllm.

It follows the upstream contract (AnythingLLM server v1.16 line): the
developer API under /api/v1
with the upstream key check, workspaces, chats (plain and streamed), threads,
documents and AnythingLLM's own OpenAI-like endpoints, all in memory.  The
answers are deterministic so that tests can prove what reached the model:

    Echo: <message> | first: <first earlier user message or -> | turns: <N>

with " | attachments: N" appended when the request carried attachments.

Behaviour worth knowing, copied from the real server (Express):
  * routes match case-insensitively and accept one trailing slash;
  * route parameters are percent-decoded, the path is matched undecoded;
  * an unknown route gives 404 "Not Found" (text/plain) without a key check;
  * OPTIONS on any path is a CORS preflight answered with 204;
  * JSON and text answers carry a weak ETag, and a GET or HEAD whose
    If-None-Match names it (or "*") gets 304 without a body;
  * responses to a request with an Origin header reflect that origin;
  * idle keep-alive connections are closed after 5 s (Node's default).

Test control lives under /__test/ and needs no key:

    POST   /__test/reset              back to the seed state, drop records
    GET    /__test/requests           every request received, oldest first
    DELETE /__test/requests           forget them
    GET    /__test/connections        open connections, streams in flight,
                                      streams whose client went away
    GET    /__test/state              the above plus waits and scripts
    POST   /__test/script             script the next chat or stream-chat
    DELETE /__test/script             drop pending scripts
    POST   /__test/release/<name>     let {"wait": name} events go on

A script is a JSON object:

    {"events": [...],          raw answer, written event by event:
         {"write": "text"}       one TCP write of these bytes (UTF-8)
         {"write_b64": "..."}    one TCP write of raw bytes
         {"frame": {...}}        one "data: <json>\n\n" write ("frame" may
                                 also be a string, written after "data: ")
         {"frames": [...]}       several frames in one write
         {"sleep": seconds}
         {"wait": "name"}        until POST /__test/release/name
         {"close": true}         abort the connection (no chunked end)
         {"reset": true}         abort with a TCP RST
     "status": 200, "headers": {...},
     "json": {...} | "body": "text"   a whole answer instead of events
     "delay": seconds            before anything is sent
     "workspace": "slug"         only for this workspace
     "endpoint": "chat" | "stream-chat" | "any"     (default "any")
     "path": "/api/v1/..."       instead: any route whose path starts so
     "times": 1                  how many requests it serves (0: forever)
    }

A script with only "delay" delays the normal answer.  Releases are sticky
until the next reset.

Magic words in a chat message, for clients that cannot script:
    [slow]    40 words, one every 0.3 s
    [fail]    two chunks, then an abort frame "Premature close"
    [error]   the model fails before any output
    [empty]   the model returns nothing
    [agent]   the agent path (also a message starting with "@agent")
    [big:N]   the answer is one chunk of N "x"
"""

import argparse
import asyncio
import base64
import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import json
import re
import signal
import socket
import struct
import sys
import time
import uuid as uuidlib

from aiohttp import web


VALID_CHAT_MODES = ("automatic", "chat", "query")

DEFAULT_PROMPT = (
    "Given the following conversation, relevant context, and a follow up "
    "question, reply with an answer to the current question the user is "
    "asking. Return only your response to the question given the above "
    "information following the users instructions as needed."
)

DEFAULT_REFUSAL = (
    "There is no relevant information in this workspace to answer your query."
)

SLOW_WORDS = 40
SLOW_INTERVAL = 0.3


class ClientGone(Exception):
    """The client closed its connection while we were answering."""


# ---------------------------------------------------------------------------
# small helpers copying JavaScript semantics


def js_str(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        if v == int(v):
            return str(int(v))
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join("" if x is None else js_str(x) for x in v)
    if isinstance(v, dict):
        return "[object Object]"
    return str(v)


def js_truthy(v):
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, str):
        return v != ""
    return True


def js_has_length(v):
    return isinstance(v, (str, list)) and len(v) > 0


def js_parse_int(v):
    m = re.match(r"\s*([+-]?\d+)", js_str(v))
    return int(m.group(1)) if m else None


def iso_now():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (
        now.microsecond // 1000)


SLUG_CHAR_MAP = {
    "+": " plus ", "!": " bang ", "@": " at ", "*": " splat ",
    ".": " dot ", ":": "", "~": "", "(": "", ")": "", "'": "", '"': "",
    "|": "", "$": "dollar", "%": "percent", "&": "and", "<": "less",
    ">": "greater",
}


def slugify(text):
    out = []
    for ch in text:
        ch = SLUG_CHAR_MAP.get(ch, ch)
        out.append(re.sub(r"[^A-Za-z0-9_\s$*+~.()'\"!\-:@]+", "", ch))
    s = "".join(out).strip()
    s = re.sub(r"\s+", "-", s)
    return s.lower()


def words(text):
    return len(str(text).split())


def etag_for(body):
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return 'W/"%x-%s"' % (len(body), digest)


# ---------------------------------------------------------------------------
# state


class State:
    def __init__(self, api_key, seed, keepalive):
        self.api_key = api_key
        self.seed = seed
        self.keepalive = keepalive
        self.server = None          # aiohttp's low-level Server
        self.conn_kind = {}         # RequestHandler -> "data" | "control"
        self.conn_no = {}           # RequestHandler -> connection number
        self.conn_seq = 0
        self.data_conns_ever = 0
        self.reset()

    def reset(self):
        self.workspaces = {}        # slug -> workspace dict (insertion order)
        self.ws_seq = 0
        self.chats = []             # chat records
        self.chat_seq = 0
        self.threads = {}           # (ws slug, thread slug) -> thread
        self.thread_seq = 0
        self.documents = {}         # docpath -> document
        self.ws_docs = {}           # ws slug -> [docpath]
        self.wsdoc_seq = 0
        self.requests = []
        self.req_seq = 0
        self.scripts = []
        self.events = {}            # name -> asyncio.Event
        self.waiting = {}           # name -> count of waiters
        self.streams = 0            # stream responses in flight
        self.inflight = 0           # data requests being answered
        self.completed_streams = 0
        self.aborted = []           # streams whose client went away
        for name in self.seed:
            self.new_workspace(name, {})

    # workspaces

    def new_workspace(self, name, fields):
        slug = slugify(name) or str(uuidlib.uuid4())
        if slug in self.workspaces:
            seed = 10000000 + (self.ws_seq * 7919 + 12345) % 90000000
            slug = slugify("%s-%d" % (name, seed))
        self.ws_seq += 1
        now = iso_now()
        ws = {
            "id": self.ws_seq,
            "name": str(name)[:255],
            "slug": slug,
            "vectorTag": None,
            "createdAt": now,
            "openAiTemp": None,
            "openAiHistory": 20,
            "lastUpdatedAt": now,
            "openAiPrompt": DEFAULT_PROMPT,
            "similarityThreshold": 0.25,
            "chatProvider": None,
            "chatModel": None,
            "topN": 4,
            "chatMode": "automatic",
            "pfpFilename": None,
            "agentProvider": None,
            "agentModel": None,
            "queryRefusalResponse": None,
            "vectorSearchMode": "default",
            "router_id": None,
        }
        ws.update(validate_fields(fields))
        ws["slug"] = slug
        self.workspaces[slug] = ws
        self.ws_docs[slug] = []
        return ws

    def ws_documents(self, slug):
        out = []
        for i, path in enumerate(self.ws_docs.get(slug, [])):
            doc = self.documents.get(path)
            if doc is None:
                continue
            out.append(doc["wsdoc"][slug])
        return out

    def ws_threads(self, slug, with_name):
        out = []
        for (s, _), th in self.threads.items():
            if s != slug:
                continue
            item = {"user_id": th["user_id"], "slug": th["slug"]}
            if with_name:
                item["name"] = th["name"]
            out.append(item)
        return out

    def ws_full(self, slug, kind):
        ws = dict(self.workspaces[slug])
        ws["documents"] = self.ws_documents(slug)
        ws["threads"] = self.ws_threads(slug, kind == "list")
        if kind == "get":
            ws["contextWindow"] = 8192
            ws["currentContextTokenCount"] = 0
        return ws

    def attach(self, slug, path):
        if slug not in self.workspaces or path not in self.documents:
            return
        if path in self.ws_docs[slug]:
            return
        doc = self.documents[path]
        self.wsdoc_seq += 1
        now = iso_now()
        meta = {k: doc[k] for k in ("id", "url", "title", "docAuthor",
                                    "description", "docSource", "chunkSource",
                                    "published", "wordCount",
                                    "token_count_estimate")}
        doc["wsdoc"][slug] = {
            "id": self.wsdoc_seq,
            "docId": doc["id"],
            "filename": doc["name"],
            "docpath": path,
            "workspaceId": self.workspaces[slug]["id"],
            "metadata": json.dumps(meta),
            "pinned": False,
            "watched": False,
            "createdAt": now,
            "lastUpdatedAt": now,
        }
        self.ws_docs[slug].append(path)

    def detach(self, slug, path):
        if path in self.ws_docs.get(slug, []):
            self.ws_docs[slug].remove(path)
            self.documents[path]["wsdoc"].pop(slug, None)

    # chats

    def history(self, slug, thread, session):
        ws = self.workspaces[slug]
        recs = [c for c in self.chats
                if c["workspace"] == slug and c["thread"] == thread
                and c["session"] == session and c["include"]]
        limit = ws.get("openAiHistory")
        if limit is None:
            limit = 20
        limit = int(limit) or 20
        return recs[-limit:]

    def add_chat(self, slug, thread, session, prompt, text, sources, metrics,
                 mode, attachments, include=True):
        self.chat_seq += 1
        rec = {
            "id": self.chat_seq, "workspace": slug, "thread": thread,
            "session": session, "prompt": prompt, "text": text,
            "sources": sources, "metrics": metrics, "type": mode,
            "attachments": attachments, "include": include,
            "sentAt": int(time.time()),
        }
        self.chats.append(rec)
        return rec

    # test control

    def event(self, name):
        ev = self.events.get(name)
        if ev is None:
            ev = self.events[name] = asyncio.Event()
        return ev

    def take_script(self, slug, endpoint, path):
        for sc in self.scripts:
            if "path" in sc:
                if endpoint is not None:
                    continue
                if not path.lower().startswith(str(sc["path"]).lower()):
                    continue
            else:
                if endpoint is None:
                    continue
                want = sc.get("endpoint", "any")
                if want not in ("any", endpoint):
                    continue
            if sc.get("workspace") is not None and sc["workspace"] != slug:
                continue
            if sc["times"] > 0:
                sc["times"] -= 1
                if sc["times"] == 0:
                    self.scripts.remove(sc)
            return sc
        return None

    def data_connections(self):
        live = self.server.connections if self.server else []
        for h in list(self.conn_kind):
            if h not in live:
                del self.conn_kind[h]
                self.conn_no.pop(h, None)
        out = []
        for h in live:
            if self.conn_kind.get(h) == "control":
                continue
            t = h.transport
            peer = t.get_extra_info("peername") if t else None
            out.append({"conn": self.conn_no.get(h),
                        "peer": "%s:%d" % peer[:2] if peer else None})
        return out, len(live)


WRITABLE = {
    "name": lambda v: str(v)[:255] if (v and isinstance(v, str))
    else "My Workspace",
    "openAiTemp": lambda v: _num(v, float, None, lo=0, bad=None),
    "openAiHistory": lambda v: _num(v, int, 20, lo=0, clamp=True),
    "lastUpdatedAt": lambda v: iso_now(),
    "openAiPrompt": lambda v: str(v) if (v and isinstance(v, str)) else None,
    "similarityThreshold": lambda v: _num(v, float, 0.25, lo=0.0, hi=1.0,
                                          clamp=True),
    "chatProvider": lambda v: str(v) if (v and isinstance(v, str)
                                         and v != "none") else None,
    "chatModel": lambda v: str(v) if (v and isinstance(v, str)) else None,
    "topN": lambda v: _num(v, int, 4, lo=1, clamp=True),
    "chatMode": lambda v: v if v in VALID_CHAT_MODES else "automatic",
    "agentProvider": lambda v: str(v) if (v and isinstance(v, str)
                                          and v != "none") else None,
    "agentModel": lambda v: str(v) if (v and isinstance(v, str)) else None,
    "queryRefusalResponse": lambda v: str(v) if (v and isinstance(v, str))
    else None,
    "vectorSearchMode": lambda v: v if v in ("default", "rerank")
    else "default",
    "router_id": lambda v: None if v in (None, "", "none")
    else _num(v, int, None),
}


def _num(v, kind, default, lo=None, hi=None, clamp=False, bad="default"):
    if v is None:
        return default
    try:
        if kind is int:
            n = js_parse_int(v)
            if n is None:
                raise ValueError
        else:
            n = float(v)
    except (TypeError, ValueError):
        return default if bad == "default" else bad
    if lo is not None and n < lo:
        return lo if clamp else (default if bad == "default" else bad)
    if hi is not None and n > hi:
        return hi
    return n


def validate_fields(fields):
    out = {}
    if not isinstance(fields, dict):
        return out
    for k, v in fields.items():
        if k in WRITABLE:
            out[k] = WRITABLE[k](v)
    return out


# ---------------------------------------------------------------------------
# responses shaped like Express's


def _express_headers(request, extra=None):
    h = {"X-Powered-By": "Express"}
    origin = request.headers.get("Origin")
    if origin:
        h["Access-Control-Allow-Origin"] = origin
        h["Vary"] = "Origin"
    keepalive = request.app["state"].keepalive
    h["Keep-Alive"] = "timeout=%d" % max(1, int(keepalive))
    if extra:
        h.update(extra)
    return h


def _fresh(request, status, headers):
    """Express's req.fresh (the "fresh" package): the client's copy,
    named by If-None-Match or If-Modified-Since, is still current."""
    if request.method not in ("GET", "HEAD"):
        return False
    if not (200 <= status < 300 or status == 304):
        return False
    none_match = request.headers.get("If-None-Match")
    since = request.headers.get("If-Modified-Since")
    if not none_match and not since:
        return False
    if re.search(r"(?:^|,)\s*?no-cache\s*?(?:,|$)",
                 request.headers.get("Cache-Control", "")):
        return False
    if none_match and none_match != "*":
        etag = headers.get("ETag")
        if not etag:
            return False
        tags = [t.strip() for t in none_match.split(",")]
        if not any(t == etag or "W/" + t == etag or t == "W/" + etag
                   for t in tags):
            return False
    if since:
        last = headers.get("Last-Modified")
        try:
            stale = not last or not (
                email.utils.parsedate_to_datetime(last)
                <= email.utils.parsedate_to_datetime(since))
        except (TypeError, ValueError):
            stale = True
        if stale:
            return False
    return True


def _express_send(request, status, body, headers):
    """res.send(): a weak ETag, and 304 without a body when the client's
    copy is fresh (GET and HEAD only, as Express does)."""
    headers["ETag"] = etag_for(body)
    if _fresh(request, status, headers):
        for k in ("Content-Type", "Content-Length", "Transfer-Encoding"):
            headers.pop(k, None)
        return web.Response(status=304, headers=headers)
    return web.Response(status=status, body=body, headers=headers)


def send_json(request, obj, status=200):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _express_send(request, status, body, _express_headers(
        request, {"Content-Type": "application/json; charset=utf-8"}))


def send_status(request, status):
    text = {200: "OK", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found",
            500: "Internal Server Error"}.get(status, str(status))
    body = text.encode()
    return _express_send(request, status, body, _express_headers(
        request, {"Content-Type": "text/plain; charset=utf-8"}))


def send_empty(request, status):
    return web.Response(status=status, body=b"",
                        headers=_express_headers(request))


def abort_shape(error):
    return {"id": str(uuidlib.uuid4()), "type": "abort", "textResponse": None,
            "sources": [], "close": True, "error": error}


class BadBody(ValueError):
    pass


def parse_body(request, raw):
    """The body as Express's body parsers plus reqBody() would see it."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
    if not raw:
        return {}
    if ctype == "application/json":
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadBody(str(e))
    if ctype == "text/plain":
        # reqBody() runs JSON.parse inside the handler: a failure there is
        # an exception of the handler
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(str(e))
    return {}


def body_error(request, msg):
    body = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset="
            "\"utf-8\">\n<title>Error</title>\n</head>\n<body>\n<pre>"
            "SyntaxError: %s</pre>\n</body>\n</html>\n" % msg).encode()
    return web.Response(status=400, body=body, headers=_express_headers(
        request, {"Content-Type": "text/html; charset=utf-8",
                  "Content-Security-Policy": "default-src 'none'",
                  "X-Content-Type-Options": "nosniff"}))


# ---------------------------------------------------------------------------
# client presence and paced writing


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
        hdrs = _express_headers(request)
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


# ---------------------------------------------------------------------------
# routing

ROUTES = []


def route(method, pattern):
    rx = "^" + re.sub(r":(\w+)", r"(?P<\1>[^/]+?)", pattern) + "/?$"

    def deco(fn):
        ROUTES.append((method, re.compile(rx, re.IGNORECASE), fn))
        return fn
    return deco


def decode_param(s):
    from urllib.parse import unquote
    return unquote(s)


def match_route(method, path):
    for m, rx, fn in ROUTES:
        if m != method and not (m == "GET" and method == "HEAD"):
            continue
        mo = rx.match(path)
        if mo:
            return fn, {k: decode_param(v) for k, v in mo.groupdict().items()}
    return None, None


def key_ok(request):
    auth = request.headers.get("Authorization")
    if not auth:
        return False
    parts = auth.split(" ")
    key = parts[1] if len(parts) > 1 else ""
    return key != "" and key == request.app["state"].api_key


# ---------------------------------------------------------------------------
# API handlers


@route("GET", "/api/v1/auth")
async def h_auth(request, p, body):
    return send_json(request, {"authenticated": True})


@route("POST", "/api/v1/workspace/new")
async def h_ws_new(request, p, body):
    data = body()
    if not isinstance(data, dict):
        data = {}
    name = data.get("name")
    if not js_truthy(name):
        return send_json(request, {"workspace": None,
                                   "message": "name cannot be null"}, 400)
    fields = {k: v for k, v in data.items() if k != "name"}
    st = request.app["state"]
    ws = st.new_workspace(js_str(name), fields)
    return send_json(request, {"workspace": dict(ws), "message": None})


@route("GET", "/api/v1/workspaces")
async def h_ws_list(request, p, body):
    st = request.app["state"]
    return send_json(request, {"workspaces": [st.ws_full(s, "list")
                                              for s in st.workspaces]})


@route("GET", "/api/v1/workspace/:slug")
async def h_ws_get(request, p, body):
    st = request.app["state"]
    if p["slug"] not in st.workspaces:
        return send_json(request, {"workspace": []})
    return send_json(request, {"workspace": [st.ws_full(p["slug"], "get")]})


@route("DELETE", "/api/v1/workspace/:slug")
async def h_ws_delete(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    if slug not in st.workspaces:
        return send_status(request, 400)
    for path in list(st.ws_docs.get(slug, [])):
        st.detach(slug, path)
    del st.workspaces[slug]
    st.ws_docs.pop(slug, None)
    st.chats = [c for c in st.chats if c["workspace"] != slug]
    for k in [k for k in st.threads if k[0] == slug]:
        del st.threads[k]
    return send_status(request, 200)


@route("POST", "/api/v1/workspace/:slug/update")
async def h_ws_update(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    data = body()
    if slug not in st.workspaces:
        return send_status(request, 400)
    upd = validate_fields(data)
    ws = st.workspaces[slug]
    if not upd:
        return send_json(request, {"workspace": {"id": ws["id"]},
                                   "message": "No valid fields to update!"})
    ws.update(upd)
    return send_json(request, {"workspace": dict(ws), "message": None})


def history_json(recs):
    out = []
    for r in recs:
        out.append({"role": "user", "content": r["prompt"],
                    "sentAt": r["sentAt"], "attachments": r["attachments"],
                    "chatId": r["id"]})
        out.append({"type": r["type"], "role": "assistant",
                    "content": r["text"], "sources": r["sources"],
                    "chatId": r["id"], "sentAt": r["sentAt"],
                    "feedbackScore": None, "metrics": r["metrics"]})
    return out


@route("GET", "/api/v1/workspace/:slug/chats")
async def h_ws_chats(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    if slug not in st.workspaces:
        return send_status(request, 400)
    q = request.rel_url.query
    session = q.get("apiSessionId")
    limit = js_parse_int(q.get("limit", "100"))
    if limit is None:
        return send_status(request, 500)
    limit = max(1, limit)
    order = q.get("orderBy", "asc")
    if order not in ("asc", "desc"):
        order = "asc"
    if session:
        recs = [c for c in st.chats if c["workspace"] == slug
                and c["thread"] is None and c["session"] == session]
    else:
        recs = [c for c in st.chats if c["workspace"] == slug
                and c["thread"] is None and c["session"] is None
                and c["include"]]
    if order == "desc":
        recs = list(reversed(recs))
    return send_json(request, {"history": history_json(recs[:limit])})


@route("DELETE", "/api/v1/workspace/:slug/chats")
async def h_ws_chats_delete(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    data = body()
    if slug not in st.workspaces:
        return send_status(request, 400)
    chat_id = data.get("chatId") if isinstance(data, dict) else None
    if chat_id is not None:
        cid = js_parse_int(chat_id)
        st.chats = [c for c in st.chats
                    if not (c["workspace"] == slug and c["id"] == cid)]
    else:
        st.chats = [c for c in st.chats if c["workspace"] != slug]
    return send_status(request, 200)


@route("POST", "/api/v1/workspace/:slug/update-embeddings")
async def h_ws_embeddings(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    data = body()
    if slug not in st.workspaces:
        return send_status(request, 400)
    adds = data.get("adds", []) if isinstance(data, dict) else []
    deletes = data.get("deletes", []) if isinstance(data, dict) else []
    for path in deletes or []:
        st.detach(slug, str(path))
    for path in adds or []:
        st.attach(slug, str(path))
    ws = st.ws_full(slug, "get")
    ws.pop("contextWindow", None)
    ws.pop("currentContextTokenCount", None)
    return send_json(request, {"workspace": ws})


@route("POST", "/api/v1/workspace/:slug/thread/new")
async def h_thread_new(request, p, body):
    st = request.app["state"]
    slug = p["slug"]
    data = body()
    if slug not in st.workspaces:
        return send_status(request, 400)
    if not isinstance(data, dict):
        data = {}
    tslug = slugify(js_str(data["slug"])) if js_truthy(data.get("slug")) \
        else str(uuidlib.uuid4())
    if (slug, tslug) in st.threads:
        return send_json(request, {
            "thread": None,
            "message": "Unique constraint failed on the fields: (`slug`)"})
    st.thread_seq += 1
    now = iso_now()
    th = {"id": st.thread_seq,
          "name": js_str(data["name"]) if js_truthy(data.get("name"))
          else "Thread",
          "slug": tslug, "workspace_id": st.workspaces[slug]["id"],
          "user_id": None, "createdAt": now, "lastUpdatedAt": now}
    st.threads[(slug, tslug)] = th
    return send_json(request, {"thread": th, "message": None})


@route("GET", "/api/v1/workspace/:slug/thread/:thread/chats")
async def h_thread_chats(request, p, body):
    st = request.app["state"]
    slug, tslug = p["slug"], p["thread"]
    if slug not in st.workspaces:
        return send_json(request, {"message": "Workspace not found"}, 404)
    if (slug, tslug) not in st.threads:
        return send_json(request, {"message": "Thread not found"}, 404)
    recs = [c for c in st.chats if c["workspace"] == slug
            and c["thread"] == tslug and c["include"]]
    return send_json(request, {"history": history_json(recs)})


@route("POST", "/api/v1/workspace/:slug/chat")
async def h_chat(request, p, body):
    return await chat_endpoint(request, p, body, stream=False)


@route("POST", "/api/v1/workspace/:slug/stream-chat")
async def h_stream_chat(request, p, body):
    return await chat_endpoint(request, p, body, stream=True)


@route("POST", "/api/v1/workspace/:slug/thread/:thread/chat")
async def h_thread_chat(request, p, body):
    return await chat_endpoint(request, p, body, stream=False)


@route("POST", "/api/v1/workspace/:slug/thread/:thread/stream-chat")
async def h_thread_stream_chat(request, p, body):
    return await chat_endpoint(request, p, body, stream=True)


def parse_multipart(request, raw):
    ctype = request.headers.get("Content-Type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        return None
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + raw)
    fields, files = {}, {}
    if not msg.is_multipart():
        return None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        data = part.get_payload(decode=True) or b""
        fname = part.get_filename()
        if fname is not None:
            files[name] = (fname, data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files


def new_document(st, folder, fname, data, metadata):
    stem = re.sub(r"\.[^.]*$", "", fname) or "document"
    doc_id = str(uuidlib.uuid4())
    name = "%s-%s.json" % (stem, doc_id)
    text = data.decode("utf-8", "replace")
    meta = metadata if isinstance(metadata, dict) else {}
    doc = {
        "id": doc_id,
        "location": "%s/%s" % (folder, name),
        "name": name,
        "url": "file:///app/collector/hotdir/%s" % fname,
        "title": meta.get("title") or fname,
        "docAuthor": meta.get("docAuthor") or "Unknown",
        "description": meta.get("description") or "Unknown",
        "docSource": meta.get("docSource")
        or "a text file uploaded by the user.",
        "chunkSource": fname,
        "published": time.strftime("%-m/%-d/%Y, %-I:%M:%S %p"),
        "wordCount": words(text),
        "pageContent": text,
        "token_count_estimate": max(1, len(text) // 4),
        "wsdoc": {},
    }
    st.documents[doc["location"]] = doc
    return doc


def doc_public(doc):
    return {k: v for k, v in doc.items() if k != "wsdoc"}


async def upload(request, p, raw, folder):
    st = request.app["state"]
    parsed = parse_multipart(request, raw)
    if parsed is None or "file" not in parsed[1]:
        return send_status(request, 500)
    fields, files = parsed
    fname, data = files["file"]
    meta = {}
    if fields.get("metadata"):
        try:
            meta = json.loads(fields["metadata"])
        except ValueError:
            meta = {}
    doc = new_document(st, folder, fname, data, meta)
    adds = fields.get("addToWorkspaces", "")
    for slug in adds.split(","):
        slug = slug.strip()
        if slug:
            st.attach(slug, doc["location"])
    return send_json(request, {"success": True, "error": None,
                               "documents": [doc_public(doc)]})


@route("POST", "/api/v1/document/upload")
async def h_upload(request, p, body):
    return await upload(request, p, request["raw_body"], "custom-documents")


@route("POST", "/api/v1/document/upload/:folder")
async def h_upload_folder(request, p, body):
    return await upload(request, p, request["raw_body"], p["folder"])


@route("GET", "/api/v1/documents")
async def h_documents(request, p, body):
    st = request.app["state"]
    folders = {"custom-documents": []}
    for path, doc in st.documents.items():
        folder = path.split("/", 1)[0]
        item = doc_public(doc)
        item.pop("pageContent", None)
        item.pop("location", None)
        item.update({"type": "file", "cached": False,
                     "pinnedWorkspaces": [], "watched": False})
        folders.setdefault(folder, []).append(item)
    items = [{"name": f, "type": "folder", "items": docs}
             for f, docs in folders.items()]
    return send_json(request, {"localFiles": {
        "name": "documents", "type": "folder", "items": items}})


@route("DELETE", "/api/v1/system/remove-documents")
async def h_remove_documents(request, p, body):
    st = request.app["state"]
    data = body()
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list):
        return send_status(request, 500)
    for name in names:
        path = js_str(name)
        for slug in list(st.ws_docs):
            st.detach(slug, path)
        st.documents.pop(path, None)
    return send_json(request, {"success": True,
                               "message": "Documents removed successfully"})


@route("GET", "/api/v1/openai/models")
async def h_oai_models(request, p, body):
    st = request.app["state"]
    data = []
    for ws in st.workspaces.values():
        created = datetime.datetime.strptime(
            ws["createdAt"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc)
        data.append({"id": ws["slug"], "object": "model",
                     "created": int(created.timestamp()),
                     "owned_by": ws["chatProvider"] or "stand-in"})
    return send_json(request, {"object": "list", "data": data})


@route("POST", "/api/v1/openai/chat/completions")
async def h_oai_chat(request, p, body):
    st = request.app["state"]
    data = body()
    if not isinstance(data, dict):
        data = {}
    model = data.get("model")
    slug = js_str(model)
    if slug not in st.workspaces:
        return send_empty(request, 401)
    messages = data.get("messages", [])
    if not isinstance(messages, list) or not messages \
            or not isinstance(messages[-1], dict):
        return send_empty(request, 500)
    last = messages[-1]
    if last.get("role") != "user":
        return send_json(request, abort_shape(
            "No user prompt found. Must be last element in message array "
            "with 'user' role."), 400)
    prompt = content_text(last.get("content"))
    earlier = [content_text(m.get("content")) for m in messages[:-1]
               if isinstance(m, dict) and m.get("role") == "user"]
    turns = len([m for m in messages[:-1] if isinstance(m, dict)
                 and m.get("role") == "assistant"])
    text = "Echo: %s | first: %s | turns: %d" % (
        prompt, earlier[0] if earlier else "-", turns)
    pieces = split_words(text)
    usage = metrics_for(prompt, [], len(pieces))
    created = int(time.time())
    cid = str(uuidlib.uuid4())
    if not js_truthy(data.get("stream")):
        return send_json(request, {
            "id": cid, "object": "chat.completion", "created": created,
            "model": slug, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": "stop"}],
            "usage": usage})
    s = Stream(request)
    completed = False
    try:
        await s.start()
        for piece in pieces:
            await s.send({"id": cid, "object": "chat.completion",
                          "created": created, "model": slug, "choices": [{
                              "index": 0, "delta": {"role": "assistant",
                                                    "content": piece},
                              "logprobs": None, "finish_reason": None}]})
        await s.send({"id": cid, "object": "chat.completion",
                      "created": created, "model": slug, "choices": [{
                          "index": 0, "delta": {"role": "assistant",
                                                "content": ""},
                          "logprobs": None, "finish_reason": "stop"}],
                      "usage": usage})
        await s.end()
        completed = True
    except ClientGone:
        s.gone(request.path, slug)
    finally:
        s.finish(completed)
    return s.resp


def content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content
                       if isinstance(c, dict) and c.get("type") == "text")
    return js_str(content)


# ---------------------------------------------------------------------------
# chat


def split_words(text):
    """Word by word deltas whose concatenation is the text."""
    parts = re.findall(r"\s*\S+", text)
    if not parts:
        return [text] if text else []
    tail = text[len("".join(parts)):]
    if tail:
        parts[-1] += tail
    return parts


def metrics_for(prompt, window, completion):
    prompt_tokens = 5 + words(prompt) + sum(
        words(r["prompt"]) + words(r["text"]) for r in window)
    duration = round(0.05 + completion * 0.01, 3)
    return {"prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "outputTps": round(completion / duration, 3),
            "duration": duration,
            "model": "stand-in-model",
            "provider": "stand-in",
            "timestamp": iso_now()}


def sources_for(st, slug):
    ws = st.workspaces[slug]
    out = []
    for path in st.ws_docs.get(slug, [])[: int(ws.get("topN") or 4)]:
        doc = st.documents[path]
        out.append({"id": doc["id"], "url": doc["url"],
                    "title": doc["title"], "docAuthor": doc["docAuthor"],
                    "description": doc["description"],
                    "docSource": doc["docSource"],
                    "chunkSource": doc["chunkSource"],
                    "published": doc["published"],
                    "wordCount": doc["wordCount"],
                    "token_count_estimate": doc["token_count_estimate"],
                    "text": doc["pageContent"][:200],
                    "docId": doc["id"], "score": 0.87})
    return out


async def chat_endpoint(request, p, body, stream):
    st = request.app["state"]
    slug = p["slug"]
    thread = p.get("thread")
    endpoint = "stream-chat" if stream else "chat"
    script = st.take_script(slug, endpoint, request.path)
    if script is not None:
        handled = await run_script(request, script, stream, slug)
        if handled is not None:
            return handled
    try:
        data = body()
    except ValueError as e:
        return send_json(request, abort_shape(str(e)), 500)
    if not isinstance(data, dict):
        data = {}
    ws = st.workspaces.get(slug)
    if thread is None:
        if ws is None:
            return send_json(request, abort_shape(
                "Workspace %s is not a valid workspace." % slug), 400)
    elif stream:
        if ws is None or (slug, thread) not in st.threads:
            return send_json(request, abort_shape(
                "Workspace %s or thread %s is not valid." % (slug, thread)),
                400)
    else:
        if ws is None:
            return send_json(request, abort_shape(
                "Workspace %s not found." % slug), 404)
        if (slug, thread) not in st.threads:
            return send_json(request, abort_shape(
                "Thread %s not found." % thread), 404)
    message = data.get("message")
    mode = data.get("mode")
    resolved = mode if mode is not None else ws["chatMode"]
    reset = js_truthy(data.get("reset"))
    if (not js_has_length(message) or resolved not in VALID_CHAT_MODES) \
            and not reset:
        return send_json(request, abort_shape(
            "Message is empty" if not js_has_length(message)
            else "%s is not a valid mode." % js_str(resolved)), 400)
    session = None
    if thread is None and js_truthy(data.get("sessionId")):
        session = js_str(data.get("sessionId"))
    attachments = data.get("attachments", [])
    if not isinstance(attachments, list):
        attachments = []
    job = Chat(st, slug, thread, session, message, resolved, attachments,
               reset)
    if stream:
        return await job.run_stream(request)
    return await job.run_sync(request)


class Chat:
    def __init__(self, st, slug, thread, session, message, mode, attachments,
                 reset):
        self.st = st
        self.slug = slug
        self.thread = thread
        self.session = session
        self.message = js_str(message) if message is not None else ""
        self.mode = mode
        self.attachments = attachments
        self.reset = reset
        self.uuid = str(uuidlib.uuid4())

    def prepare(self):
        """Decides the answer; returns a kind and fills self."""
        st = self.st
        ws = st.workspaces[self.slug]
        if self.reset:
            for c in st.chats:
                if c["workspace"] == self.slug and c["thread"] == self.thread \
                        and c["session"] == self.session:
                    c["include"] = False
            if not self.message:
                self.text = "Chat history was reset!"
                return "reset"
        msg = self.message
        if "[agent]" in msg or msg.startswith("@agent"):
            kind = "agent"
        elif self.mode == "query" and not st.ws_docs.get(self.slug):
            self.text = ws.get("queryRefusalResponse") or DEFAULT_REFUSAL
            self.st.add_chat(self.slug, self.thread, self.session,
                             self.message, self.text, [], {}, self.mode,
                             self.attachments, include=False)
            return "refusal"
        else:
            kind = "normal"
        self.window = st.history(self.slug, self.thread, self.session)
        first = self.window[0]["prompt"] if self.window else "-"
        text = "Echo: %s | first: %s | turns: %d" % (
            msg, first, len(self.window))
        if self.attachments:
            text += " | attachments: %d" % len(self.attachments)
        self.interval = 0.0
        m = re.search(r"\[big:(\d+)\]", msg)
        if m:
            self.pieces = ["x" * int(m.group(1))]
            text = self.pieces[0]
        elif "[slow]" in msg:
            base = split_words(text)
            extra = ["tick%d" % i for i in range(1, max(0, SLOW_WORDS
                                                         - len(base)) + 1)]
            text = " ".join(text.split() + extra)
            self.pieces = split_words(text)
            self.interval = SLOW_INTERVAL
        else:
            self.pieces = split_words(text)
        self.text = text
        self.sources = sources_for(st, self.slug)
        if "[error]" in msg:
            return "error"
        if "[empty]" in msg:
            self.text = ""
            self.pieces = []
            return "empty"
        if "[fail]" in msg:
            return "fail"
        return kind

    def save(self, text, metrics):
        return self.st.add_chat(self.slug, self.thread, self.session,
                                self.message, text, self.sources, metrics,
                                self.mode, self.attachments)

    async def run_sync(self, request):
        kind = self.prepare()
        if kind == "reset":
            return send_json(request, {
                "id": self.uuid, "type": "textResponse",
                "textResponse": self.text, "sources": [], "close": True,
                "error": None, "metrics": {}})
        if kind == "refusal":
            return send_json(request, {
                "id": self.uuid, "type": "textResponse", "sources": [],
                "close": True, "error": None, "textResponse": self.text,
                "metrics": {}})
        if self.interval:
            await pause(request, self.interval * len(self.pieces))
        if kind == "error":
            return send_json(request, abort_shape(
                "The model failed to respond."), 500)
        if kind == "fail":
            return send_json(request, abort_shape("Premature close"), 500)
        metrics = metrics_for(self.message, self.window, len(self.pieces))
        if kind == "empty":
            return send_json(request, {
                "id": self.uuid, "type": "abort", "textResponse": None,
                "sources": [], "close": True,
                "error": "No text completion could be completed with this "
                         "input.", "metrics": metrics})
        rec = self.save(self.text, metrics)
        out = {"id": self.uuid, "type": "textResponse", "close": True,
               "error": None, "chatId": rec["id"],
               "textResponse": self.text, "sources": self.sources,
               "metrics": metrics}
        if kind == "agent":
            out["thoughts"] = ["Thinking about the request."]
            out["outputs"] = []
        return send_json(request, out)

    async def run_stream(self, request):
        s = Stream(request)
        completed = False
        sent = []
        try:
            await s.start()
            kind = self.prepare()
            await self.stream_body(request, s, kind, sent)
            await s.end()
            completed = True
        except ClientGone:
            s.gone(request.path, self.slug)
            text = "".join(sent)
            if text:
                metrics = metrics_for(self.message, self.window, len(sent))
                self.save(text, metrics)
        finally:
            s.finish(completed)
        return s.resp

    async def stream_body(self, request, s, kind, sent):
        u = self.uuid
        if kind in ("reset", "refusal"):
            await s.send({"id": u, "type": "textResponse",
                          "textResponse": self.text, "sources": [],
                          "attachments": [], "close": True, "error": None,
                          "metrics": {}})
            return
        if kind == "error":
            await s.send({"id": str(uuidlib.uuid4()), "type": "abort",
                          "textResponse": None, "sources": [], "close": True,
                          "error": "The model failed to respond."})
            return
        if kind == "agent":
            await s.send({"uuid": u, "type": "statusResponse",
                          "content": "Agent @agent invoked.",
                          "animate": False})
            await s.send({"uuid": u, "type": "agentThought",
                          "thought": "Thinking about the request."})
        for i, piece in enumerate(self.pieces):
            if kind == "fail" and i == 2:
                await s.send({"id": u, "type": "abort", "textResponse": None,
                              "sources": [], "close": True,
                              "error": "Premature close"})
                return
            if self.interval and i > 0:
                await pause(request, self.interval)
            await s.send({"uuid": u, "sources": [],
                          "type": "textResponseChunk",
                          "textResponse": piece, "close": False,
                          "error": False})
            sent.append(piece)
        if kind == "fail":
            await s.send({"id": u, "type": "abort", "textResponse": None,
                          "sources": [], "close": True,
                          "error": "Premature close"})
            return
        metrics = metrics_for(self.message, self.window, len(self.pieces))
        if kind == "agent":
            await s.send({"uuid": u, "type": "textResponse",
                          "textResponse": self.text, "sources": self.sources,
                          "close": True, "error": False})
            await s.send({"uuid": u, "type": "usageMetrics",
                          "metrics": metrics})
            rec = self.save(self.text, metrics)
            await s.send({"uuid": u, "type": "finalizeResponseStream",
                          "textResponse": self.text, "thoughts": [],
                          "outputs": [], "sources": self.sources,
                          "close": True, "error": False, "chatId": rec["id"],
                          "metrics": metrics})
            return
        await s.send({"uuid": u, "sources": self.sources,
                      "type": "textResponseChunk", "textResponse": "",
                      "close": True, "error": False})
        if kind == "empty":
            await s.send({"uuid": u, "type": "finalizeResponseStream",
                          "close": True, "error": False})
            return
        rec = self.save(self.text, metrics)
        await s.send({"uuid": u, "type": "finalizeResponseStream",
                      "close": True, "error": False, "chatId": rec["id"],
                      "metrics": metrics, "sources": self.sources})


# ---------------------------------------------------------------------------
# scripted answers


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
        completed = False
        try:
            await s.start()
            for ev in sc["events"]:
                await run_event(request, s, ev)
                if s.ended:
                    break
            if not s.ended:
                await s.end()
                completed = True
        except ClientGone:
            s.gone(request.path, slug)
        finally:
            s.finish(completed)
        return s.resp
    if "json" in sc:
        r = send_json(request, sc["json"], status)
    elif "body" in sc:
        raw = str(sc["body"]).encode()
        r = web.Response(status=status, body=raw, headers=_express_headers(
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
        await s.raw(frame(ev["frame"]))
        s.frames += 1
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


# ---------------------------------------------------------------------------
# test control


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


# ---------------------------------------------------------------------------
# the entry point of every request


def cors_preflight(request):
    h = _express_headers(request)
    h.pop("Keep-Alive", None)
    h["Access-Control-Allow-Methods"] = "GET,HEAD,PUT,PATCH,POST,DELETE"
    vary = ["Origin"] if request.headers.get("Origin") else []
    want = request.headers.get("Access-Control-Request-Headers")
    if want:
        h["Access-Control-Allow-Headers"] = want
        vary.append("Access-Control-Request-Headers")
    if vary:
        h["Vary"] = ", ".join(vary)
    else:
        h.pop("Vary", None)
    h["Content-Length"] = "0"
    return web.Response(status=204, headers=h)


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
    st.req_seq += 1
    headers = {}
    for k, v in request.headers.items():
        lk = k.lower()
        headers[lk] = headers[lk] + ", " + v if lk in headers else v
    st.requests.append({
        "seq": st.req_seq,
        "time": time.time(),
        "conn": st.conn_no.get(handler),
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

    st.inflight += 1
    try:
        return await answer(request, raw_path, raw)
    except ClientGone:
        return web.Response(status=499)
    finally:
        st.inflight -= 1


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
    except ValueError:
        return send_status(request, 500)


# ---------------------------------------------------------------------------


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


def main():
    ap = argparse.ArgumentParser(description="AnythingLLM stand-in")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3001,
                    help="0 picks a free port (printed)")
    ap.add_argument("--api-key", default="UPSTREAM-KEY-0001-TEST")
    ap.add_argument("--workspaces", default="sales,support,engineering",
                    help="comma list of workspaces to start with")
    ap.add_argument("--keepalive-timeout", type=float, default=5.0,
                    help="seconds an idle connection is kept (Node: 5)")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
