"""The key check's echo (/auth), workspaces, their threads and their
chat histories.  Chatting itself is in chat.py."""

import uuid as uuidlib

from standin.express import send_json, send_status
from standin.js import iso_now, js_parse_int, js_str, js_truthy, slugify
from standin.routes import on_workspace, route
from standin.state import validate_fields


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
    st, slug, _ = on_workspace(request, p)
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
    st, slug, data = on_workspace(request, p, body)
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
    st, slug, _ = on_workspace(request, p)
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
    st, slug, data = on_workspace(request, p, body)
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
    st, slug, data = on_workspace(request, p, body)
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
    st, slug, data = on_workspace(request, p, body)
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
