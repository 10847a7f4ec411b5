"""AnythingLLM's own OpenAI-like endpoints: /api/v1/openai/models lists
the workspaces, /api/v1/openai/chat/completions answers whole or
streamed, with no history of its own (the messages carry it)."""

import datetime
import time
import uuid as uuidlib

from standin.chat import echo_text, metrics_for, split_words
from standin.express import abort_shape, send_empty, send_json
from standin.js import js_str, js_truthy
from standin.routes import route
from standin.stream import Stream, serve_stream


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
    text = echo_text(prompt, earlier[0] if earlier else "-", turns)
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

    def chunk(content, finish):
        return {"id": cid, "object": "chat.completion", "created": created,
                "model": slug, "choices": [{
                    "index": 0, "delta": {"role": "assistant",
                                          "content": content},
                    "logprobs": None, "finish_reason": finish}]}

    async def write_body(s):
        for piece in pieces:
            await s.send(chunk(piece, None))
        await s.send(dict(chunk("", "stop"), usage=usage))

    return await serve_stream(request, Stream(request), slug, write_body)


def content_text(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content
                       if isinstance(c, dict) and c.get("type") == "text")
    return js_str(content)
