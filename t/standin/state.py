"""The server's memory: workspaces with their documents, chat records,
threads, uploaded documents, and what the tests look at and steer
(requests received, connections, scripts, named waits)."""

import asyncio
import json
import time
import uuid as uuidlib

from standin.js import iso_now, js_parse_int, slugify


VALID_CHAT_MODES = ("automatic", "chat", "query")

DEFAULT_PROMPT = (
    "Given the following conversation, relevant context, and a follow up "
    "question, reply with an answer to the current question the user is "
    "asking. Return only your response to the question given the above "
    "information following the users instructions as needed."
)


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
