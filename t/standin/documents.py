"""Documents: uploads (multipart, as the collector receives them), the
document tree, and their removal from the system and every workspace."""

import email.parser
import email.policy
import json
import re
import time
import uuid as uuidlib

from standin.express import send_json, send_status
from standin.js import js_str, words
from standin.routes import route


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
