"""What the key-checking tests share: the Authorization header, whether
an answer is one of the gateway's refusals, and the access log."""

import re

from lib import helpers
from lib.openai import assert_refused


def bearer(key):
    return {"Authorization": "Bearer %s" % key}


def is_ours(r):
    """True when the answer is one of the gateway's refusals."""
    if r.status not in (400, 401, 403, 429, 503):
        return False
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(err, dict):
        return False
    return err.get("code") in ("invalid_api_key", "insufficient_scope",
                               "workspace_forbidden", "rate_limit_exceeded",
                               "invalid_path", None) \
        and isinstance(err.get("type"), str)


def access_field(line, name):
    m = re.search(r'\b%s=("[^"]*"|\S+)' % re.escape(name), line)
    return m.group(1).strip('"') if m else None


def logged(n, method, path, **kw):
    """A request, once its access log line is written (workers log after
    the answer is sent: the next request's line could come first)."""
    before = len(n.access_lines())
    r = n.request(method, path, **kw)
    lines = wait_access_lines(n, before + 1)
    return r, lines[before]


def wait_access_lines(n, count, timeout=5):
    return helpers.wait_until(
        lambda: n.access_lines() if len(n.access_lines()) >= count else None,
        timeout, message="access log lines never reached %d" % count)


def assert_workspace_forbidden(n, key, slug):
    """key may not chat in slug, nor list the instance's documents: both
    refused with workspace_forbidden."""
    r = n.post("/api/v1/workspace/%s/chat" % slug, json={"message": "hi"},
               headers=bearer(key))
    assert_refused(r, 403, "workspace_forbidden")
    r = n.get("/api/v1/documents", headers=bearer(key))
    assert_refused(r, 403, "workspace_forbidden")
