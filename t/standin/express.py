"""Answers shaped like Express's (the real server's framework): its
headers, res.send() with a weak ETag and 304s, its body parsers and their
error page, and the CORS preflight."""

import email.utils
import json
import re
import uuid as uuidlib

from aiohttp import web

from standin.js import etag_for


def express_headers(request, extra=None):
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
    return _express_send(request, status, body, express_headers(
        request, {"Content-Type": "application/json; charset=utf-8"}))


def send_status(request, status):
    text = {200: "OK", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found",
            500: "Internal Server Error"}.get(status, str(status))
    body = text.encode()
    return _express_send(request, status, body, express_headers(
        request, {"Content-Type": "text/plain; charset=utf-8"}))


def send_empty(request, status):
    return web.Response(status=status, body=b"",
                        headers=express_headers(request))


def abort_shape(error, uid=None):
    """The answer or frame of a chat that failed; a fresh id unless the
    chat's own is given."""
    return {"id": uid or str(uuidlib.uuid4()), "type": "abort",
            "textResponse": None, "sources": [], "close": True,
            "error": error}


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
    return web.Response(status=400, body=body, headers=express_headers(
        request, {"Content-Type": "text/html; charset=utf-8",
                  "Content-Security-Policy": "default-src 'none'",
                  "X-Content-Type-Options": "nosniff"}))


def cors_preflight(request):
    h = express_headers(request)
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
