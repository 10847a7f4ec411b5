"""Chat and stream-chat, in a workspace or one of its threads: the
checks of the real handlers, the deterministic answer with its history
window, every frame type of a stream, and the magic words of a message
(see t/backend.py)."""

import functools
import re
import uuid as uuidlib

from standin.express import abort_shape, send_json
from standin.js import iso_now, js_has_length, js_str, js_truthy, words
from standin.routes import route
from standin.scripted import run_script
from standin.state import VALID_CHAT_MODES
from standin.stream import Stream, pause, serve_stream


DEFAULT_REFUSAL = (
    "There is no relevant information in this workspace to answer your query."
)

MODEL_FAILED = "The model failed to respond."
PREMATURE_CLOSE = "Premature close"

SLOW_WORDS = 40
SLOW_INTERVAL = 0.3


def echo_text(message, first, turns):
    """The model's answer: what tests match to see what reached it."""
    return "Echo: %s | first: %s | turns: %d" % (message, first, turns)


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


def unknown_target(request, st, slug, thread, stream):
    """The refusal of a chat whose workspace or thread does not exist,
    worded and numbered as each of the four handlers does, or None."""
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
    return None


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
    refused = unknown_target(request, st, slug, thread, stream)
    if refused is not None:
        return refused
    ws = st.workspaces[slug]
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
        text = echo_text(msg, first, len(self.window))
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
            return send_json(request, abort_shape(MODEL_FAILED), 500)
        if kind == "fail":
            return send_json(request, abort_shape(PREMATURE_CLOSE), 500)
        metrics = metrics_for(self.message, self.window, len(self.pieces))
        if kind == "empty":
            return send_json(request, dict(abort_shape(
                "No text completion could be completed with this input.",
                self.uuid), metrics=metrics))
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
        sent = []

        async def write_body(s):
            await self.stream_body(request, s, self.prepare(), sent)

        def gone():
            # the chunks the client got before it left are kept as the
            # chat's answer
            text = "".join(sent)
            if text:
                metrics = metrics_for(self.message, self.window, len(sent))
                self.save(text, metrics)

        return await serve_stream(request, Stream(request), self.slug,
                                  write_body, gone)

    async def stream_body(self, request, s, kind, sent):
        u = self.uuid
        if kind in ("reset", "refusal"):
            await s.send({"id": u, "type": "textResponse",
                          "textResponse": self.text, "sources": [],
                          "attachments": [], "close": True, "error": None,
                          "metrics": {}})
            return
        if kind == "error":
            await s.send(abort_shape(MODEL_FAILED))
            return
        if kind == "agent":
            await s.send({"uuid": u, "type": "statusResponse",
                          "content": "Agent @agent invoked.",
                          "animate": False})
            await s.send({"uuid": u, "type": "agentThought",
                          "thought": "Thinking about the request."})
        for i, piece in enumerate(self.pieces):
            if kind == "fail" and i == 2:
                break
            if self.interval and i > 0:
                await pause(request, self.interval)
            await s.send({"uuid": u, "sources": [],
                          "type": "textResponseChunk",
                          "textResponse": piece, "close": False,
                          "error": False})
            sent.append(piece)
        if kind == "fail":
            await s.send(abort_shape(PREMATURE_CLOSE, u))
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


# the four chat routes share one handler
for _pattern, _stream in (
        ("/api/v1/workspace/:slug/chat", False),
        ("/api/v1/workspace/:slug/stream-chat", True),
        ("/api/v1/workspace/:slug/thread/:thread/chat", False),
        ("/api/v1/workspace/:slug/thread/:thread/stream-chat", True)):
    route("POST", _pattern)(functools.partial(chat_endpoint,
                                              stream=_stream))
