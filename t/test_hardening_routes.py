"""Hardening of the route table.

- update-embeddings attaches documents of the store every workspace
  shares: only a key allowed every workspace may call it; update-pin
  stays with the workspace in the path.

The full gateway of conf/anythingllm.conf (auth on, both OpenAI base
paths), a real redis-server, and the stand-in AnythingLLM, which records
every request that reaches it: a refusal must leave it untouched.
"""

import json
import uuid

import pytest

import helpers


def bearer(key):
    return {"Authorization": "Bearer %s" % key}


def error_of(r, status):
    """The OpenAI error object of a refusal, its shape checked."""
    assert r.status == status, (r.status, r.text)
    assert r.headers.get("content-type", "").startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error", err
    return err


def upload(backend, name, text, workspaces):
    """Puts a document into the stand-in's shared store, attached to the
    given workspaces (directly, not through the gateway); its path."""
    boundary = uuid.uuid4().hex
    body = ("--%s\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"%s\"\r\nContent-Type: text/plain\r\n\r\n%s\r\n"
            "--%s\r\nContent-Disposition: form-data; "
            "name=\"addToWorkspaces\"\r\n\r\n%s\r\n--%s--\r\n"
            % (boundary, name, text, boundary, workspaces,
               boundary)).encode()
    r = backend.api("POST", "/api/v1/document/upload", body=body, headers={
        "Content-Type": "multipart/form-data; boundary=" + boundary})
    assert r.status == 200, r.text
    return r.json()["documents"][0]["location"]


def ws_docpaths(backend, slug):
    r = backend.api("GET", "/api/v1/workspace/%s" % slug)
    assert r.status == 200, r.text
    return [d["docpath"] for d in r.json()["workspace"][0]["documents"]]


@pytest.fixture
def gateway(nginx, redis_server, backend):
    return nginx(gateway=True, redis=redis_server)


# ---------------------------------------------------------------------------
# update-embeddings and update-pin


def test_update_embeddings_refused_to_a_limited_key(gateway, redis_server,
                                                    backend):
    """A documents key held to "sales" cannot attach to sales a document
    of the shared store that only engineering holds: that would let it
    read the document through sales' chat."""
    secret = upload(backend, "payroll.txt", "salaries of everyone",
                    "engineering")
    redis_server.add_key("k-sales", scopes="chat,read,documents",
                         workspaces="sales")
    redis_server.add_key("k-two", scopes="documents",
                         workspaces="sales,support")
    backend.clear()

    for key, path, body in (
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings/",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/Workspace/sales/Update-Embeddings",
             {"adds": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"adds": [secret], "deletes": []}),
            # the rule is the route's: the body is not read to judge it
            ("k-sales", "/api/v1/workspace/sales/update-embeddings",
             {"deletes": [secret]}),
            ("k-sales", "/api/v1/workspace/sales/update-embeddings", None),
            ("k-two", "/api/v1/workspace/support/update-embeddings",
             {"adds": [secret]})):
        r = gateway.post(path, json=body, headers=bearer(key))
        err = error_of(r, 403)
        assert err["code"] == "workspace_forbidden", err
        assert "every workspace" in err["message"], err
        assert err["param"] is None

    assert backend.requests() == []
    assert ws_docpaths(backend, "sales") == []
    assert ws_docpaths(backend, "support") == []

    line = helpers.wait_until(
        lambda: [l for l in gateway.access_lines()
                 if "update-embeddings" in l.lower()][6:7], timeout=5)[0]
    assert "auth=denied_workspace" in line, line

    # the key still reaches its workspace otherwise
    r = gateway.post("/api/v1/workspace/sales/chat",
                     json={"message": "hi"}, headers=bearer("k-sales"))
    assert r.status == 200, r.text


def test_update_embeddings_allowed_to_an_instance_key(gateway, redis_server,
                                                      backend):
    doc = upload(backend, "handbook.txt", "the handbook", "engineering")
    redis_server.add_key("k-docs", scopes="documents", workspaces="*")
    redis_server.add_key("k-read", scopes="read", workspaces="*")
    backend.clear()

    # a key allowed every workspace still needs the documents scope
    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"adds": [doc]}, headers=bearer("k-read"))
    assert error_of(r, 403)["code"] == "insufficient_scope"
    assert backend.requests() == []

    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"adds": [doc]}, headers=bearer("k-docs"))
    assert r.status == 200, r.text
    assert [d["docpath"] for d in r.json()["workspace"]["documents"]] \
        == [doc]
    seen = backend.requests()
    assert len(seen) == 1
    assert seen[0]["path"] == "/api/v1/workspace/sales/update-embeddings"
    assert seen[0]["headers"]["authorization"] == \
        "Bearer UPSTREAM-KEY-0001-TEST"
    assert json.loads(seen[0]["body"]) == {"adds": [doc]}
    assert ws_docpaths(backend, "sales") == [doc]

    r = gateway.post("/api/v1/workspace/sales/update-embeddings",
                     json={"deletes": [doc]}, headers=bearer("k-docs"))
    assert r.status == 200, r.text
    assert ws_docpaths(backend, "sales") == []


def test_update_pin_stays_with_the_workspace(gateway, redis_server, backend):
    """update-pin acts only on a document already in the workspace of the
    path (AnythingLLM looks it up by workspace): the slug is enough."""
    doc = upload(backend, "faq.txt", "questions", "sales")
    redis_server.add_key("k-sales", scopes="documents", workspaces="sales")
    backend.clear()

    body = {"docPath": doc, "pinStatus": True}
    gateway.post("/api/v1/workspace/sales/update-pin", json=body,
                 headers=bearer("k-sales"))
    seen = backend.requests()
    assert [s["path"] for s in seen] == ["/api/v1/workspace/sales/update-pin"]
    assert json.loads(seen[0]["body"]) == body

    backend.clear()
    r = gateway.post("/api/v1/workspace/engineering/update-pin", json=body,
                     headers=bearer("k-sales"))
    err = error_of(r, 403)
    assert err["code"] == "workspace_forbidden"
    assert '"engineering"' in err["message"], err
    assert backend.requests() == []
