"""The route table of the developer API, matched as Express matches:
case-insensitively, one trailing slash allowed, parameters
percent-decoded while the path itself is matched undecoded."""

import re
from urllib.parse import unquote

from standin.express import send_status


ROUTES = []


def route(method, pattern):
    rx = "^" + re.sub(r":(\w+)", r"(?P<\1>[^/]+?)", pattern) + "/?$"

    def deco(fn):
        ROUTES.append((method, re.compile(rx, re.IGNORECASE), fn))
        return fn
    return deco


def match_route(method, path):
    for m, rx, fn in ROUTES:
        if m != method and not (m == "GET" and method == "HEAD"):
            continue
        mo = rx.match(path)
        if mo:
            return fn, {k: unquote(v) for k, v in mo.groupdict().items()}
    return None, None


def key_ok(request):
    auth = request.headers.get("Authorization")
    if not auth:
        return False
    parts = auth.split(" ")
    key = parts[1] if len(parts) > 1 else ""
    return key != "" and key == request.app["state"].api_key


class Answered(Exception):
    """A handler's check has its answer already: dispatch sends it."""

    def __init__(self, response):
        super().__init__(response.status)
        self.response = response


def on_workspace(request, p, body=None):
    """The state, the slug and, with body, the parsed body of a call on
    the workspace p["slug"]; an unknown one is answered 400.  The body is
    parsed before the lookup, as upstream's handlers do, so that a body
    that does not parse answers 500 even for an unknown workspace."""
    st = request.app["state"]
    slug = p["slug"]
    data = body() if body is not None else None
    if slug not in st.workspaces:
        raise Answered(send_status(request, 400))
    return st, slug, data
