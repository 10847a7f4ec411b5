"""Self-tests of the AnythingLLM stand-in (t/backend.py), without nginx."""

import base64
import time
import uuid

import pytest

from lib import helpers
from lib.processes import UPSTREAM_KEY, Backend, running


@pytest.fixture(scope="module")
def shared_backend(tmp_path_factory):
    yield from running(Backend(tmp_path_factory.mktemp("backend")))


@pytest.fixture
def be(shared_backend):
    shared_backend.reset()
    return shared_backend


AUTH = {"Authorization": "Bearer " + UPSTREAM_KEY}


def chat(be, slug, body, stream=False, **kw):
    path = "/api/v1/workspace/%s/%s" % (slug,
                                         "stream-chat" if stream else "chat")
    return be.api("POST", path, json=body, **kw)


def stream(be, slug, body, headers=AUTH):
    return helpers.StreamReader(
        "POST", be.url + "/api/v1/workspace/%s/stream-chat" % slug,
        json=body, headers=headers)


# ---------------------------------------------------------------------------
# key check and routing


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer",
                                  "Bearer  " + UPSTREAM_KEY, UPSTREAM_KEY])
def test_key_check_refuses(be, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    r = helpers.get(be.url + "/api/v1/auth", headers=headers)
    assert r.status == 403
    assert r.json() == {"error": "No valid api key found."}
    # recorded although refused
    assert be.last_request("/api/v1/auth")["headers"].get(
        "authorization") == auth


def test_key_check_accepts_second_word(be):
    r = helpers.get(be.url + "/api/v1/auth", headers=AUTH)
    assert (r.status, r.json()) == (200, {"authenticated": True})
    r = helpers.get(be.url + "/api/v1/auth",
                    headers={"Authorization": "Token " + UPSTREAM_KEY})
    assert r.status == 200


def test_unknown_route_is_404_without_key_check(be):
    r = helpers.get(be.url + "/api/v1/nothing-here")
    assert r.status == 404 and r.text == "Not Found"
    r = be.api("POST", "/api/v1/workspaces")
    assert r.status == 404


def test_routes_are_case_insensitive_and_allow_trailing_slash(be):
    assert be.api("GET", "/api/v1/Workspaces/").status == 200
    assert be.api("GET", "/API/V1/AUTH").json() == {"authenticated": True}


def test_requests_are_recorded(be):
    be.clear()
    be.api("POST", "/api/v1/workspace/sales/chat?x=1&y=%20",
           json={"message": "hello"}, headers={"X-Extra": "1"})
    reqs = be.requests()
    assert len(reqs) == 1
    r = reqs[0]
    assert r["method"] == "POST"
    assert r["path"] == "/api/v1/workspace/sales/chat?x=1&y=%20"
    assert r["query"] == "x=1&y=%20"
    assert r["headers"]["x-extra"] == "1"
    assert ["X-Extra", "1"] in r["raw_headers"]
    assert r["body"] == '{"message": "hello"}'
    be.clear()
    assert be.requests() == []


# ---------------------------------------------------------------------------
# workspaces


def test_workspaces_seeded_with_full_fields(be):
    ws = be.api("GET", "/api/v1/workspaces").json()["workspaces"]
    assert [w["slug"] for w in ws] == ["sales", "support", "engineering"]
    w = ws[0]
    for field in ("id", "name", "slug", "createdAt", "openAiTemp",
                  "lastUpdatedAt", "openAiHistory", "openAiPrompt",
                  "similarityThreshold", "chatMode", "topN", "documents",
                  "threads"):
        assert field in w
    assert w["createdAt"].endswith("Z") and "T" in w["createdAt"]


def test_workspace_new_get_update_delete(be):
    r = be.api("POST", "/api/v1/workspace/new", json={})
    assert r.status == 400
    assert r.json() == {"workspace": None, "message": "name cannot be null"}

    r = be.api("POST", "/api/v1/workspace/new",
               json={"name": "My Team 2.0", "openAiHistory": 5})
    assert r.status == 200
    ws = r.json()["workspace"]
    assert ws["slug"] == "my-team-2-dot-0"
    assert ws["chatMode"] == "automatic" and ws["openAiHistory"] == 5
    dup = be.api("POST", "/api/v1/workspace/new",
                 json={"name": "My Team 2.0"}).json()["workspace"]
    assert dup["slug"] != ws["slug"]

    got = be.api("GET", "/api/v1/workspace/my-team-2-dot-0").json()
    assert isinstance(got["workspace"], list)
    assert got["workspace"][0]["slug"] == "my-team-2-dot-0"
    assert be.api("GET", "/api/v1/workspace/nope").json() == {
        "workspace": []}

    r = be.api("POST", "/api/v1/workspace/nope/update", json={"name": "x"})
    assert (r.status, r.text) == (400, "Bad Request")
    r = be.api("POST", "/api/v1/workspace/sales/update",
               json={"chatMode": "query", "bogus": 1})
    assert r.json()["workspace"]["chatMode"] == "query"

    r = be.api("DELETE", "/api/v1/workspace/my-team-2-dot-0")
    assert r.status == 200
    r = be.api("DELETE", "/api/v1/workspace/my-team-2-dot-0")
    assert (r.status, r.text) == (400, "Bad Request")


# ---------------------------------------------------------------------------
# chat


def test_chat_history_per_session_and_shared(be):
    a1 = chat(be, "sales", {"message": "one", "sessionId": "A"}).json()
    assert a1["type"] == "textResponse"
    assert a1["textResponse"] == "Echo: one | first: - | turns: 0"
    assert a1["metrics"]["total_tokens"] == (
        a1["metrics"]["prompt_tokens"] + a1["metrics"]["completion_tokens"])
    a2 = chat(be, "sales", {"message": "two", "sessionId": "A"}).json()
    assert a2["textResponse"] == "Echo: two | first: one | turns: 1"
    b1 = chat(be, "sales", {"message": "uno", "sessionId": "B"}).json()
    assert b1["textResponse"] == "Echo: uno | first: - | turns: 0"
    # without a session every caller shares one history
    s1 = chat(be, "sales", {"message": "x"}).json()
    s2 = chat(be, "sales", {"message": "y"}).json()
    assert s1["textResponse"].endswith("turns: 0")
    assert s2["textResponse"] == "Echo: y | first: x | turns: 1"
    # other workspaces are separate
    o = chat(be, "support", {"message": "z", "sessionId": "A"}).json()
    assert o["textResponse"].endswith("turns: 0")

    h = be.api("GET", "/api/v1/workspace/sales/chats?apiSessionId=A").json()
    assert [m["content"] for m in h["history"]] == [
        "one", a1["textResponse"], "two", a2["textResponse"]]
    assert h["history"][1]["role"] == "assistant"
    h = be.api("GET", "/api/v1/workspace/sales/chats").json()
    assert [m["content"] for m in h["history"] if m["role"] == "user"] == [
        "x", "y"]

    r = chat(be, "sales", {"reset": True, "sessionId": "A"}).json()
    assert r["textResponse"] == "Chat history was reset!"
    assert r["metrics"] == {}
    a3 = chat(be, "sales", {"message": "three", "sessionId": "A"}).json()
    assert a3["textResponse"] == "Echo: three | first: - | turns: 0"


def test_chat_attachments_counted(be):
    r = chat(be, "sales", {"message": "look", "attachments": [
        {"name": "a.png", "mime": "image/png",
         "contentString": "data:image/png;base64,AAAA"}] * 2}).json()
    assert r["textResponse"].endswith(" | attachments: 2")


@pytest.mark.parametrize("stream_mode", [False, True])
def test_chat_errors_before_output(be, stream_mode):
    r = chat(be, "nope", {"message": "hi"}, stream=stream_mode)
    assert r.status == 400
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["type"] == "abort" and body["close"] is True
    assert body["textResponse"] is None and body["sources"] == []
    assert body["error"] == "Workspace nope is not a valid workspace."
    r = chat(be, "sales", {"message": ""}, stream=stream_mode)
    assert (r.status, r.json()["error"]) == (400, "Message is empty")
    r = chat(be, "sales", {"message": "hi", "mode": "foo"},
             stream=stream_mode)
    assert (r.status, r.json()["error"]) == (400, "foo is not a valid mode.")


def test_stream_frames_in_order(be):
    s = stream(be, "sales", {"message": "hello big world", "sessionId": "S"})
    assert s.status == 200
    assert s.headers["content-type"] == "text/event-stream"
    assert s.headers["cache-control"] == "no-cache"
    assert s.headers["transfer-encoding"] == "chunked"
    frames = s.json_frames()
    s.close()
    assert s.done
    types = [f["type"] for f in frames]
    assert types[-1] == "finalizeResponseStream"
    assert types[-2] == "textResponseChunk"
    assert set(types[:-1]) == {"textResponseChunk"}
    chunks = frames[:-2]
    assert len(chunks) > 3
    assert "".join(f["textResponse"] for f in chunks) == \
        "Echo: hello big world | first: - | turns: 0"
    assert all(f["close"] is False for f in chunks)
    assert frames[-2]["textResponse"] == "" and frames[-2]["close"] is True
    fin = frames[-1]
    assert fin["close"] is True and isinstance(fin["chatId"], int)
    m = fin["metrics"]
    assert m["total_tokens"] == m["prompt_tokens"] + m["completion_tokens"]
    assert all(f["uuid"] == fin["uuid"] for f in frames)
    # the stream's answer is in the history
    r = chat(be, "sales", {"message": "next", "sessionId": "S"}).json()
    assert r["textResponse"] == "Echo: next | first: hello big world | " \
        "turns: 1"


def test_query_refusal(be):
    r = chat(be, "sales", {"message": "anything?", "mode": "query"}).json()
    assert r["type"] == "textResponse" and r["metrics"] == {}
    assert r["textResponse"] == ("There is no relevant information in this "
                                 "workspace to answer your query.")
    be.api("POST", "/api/v1/workspace/support/update",
           json={"queryRefusalResponse": "Nothing here."})
    s = stream(be, "support", {"message": "anything?", "mode": "query"})
    frames = s.json_frames()
    s.close()
    assert len(frames) == 1
    assert frames[0]["type"] == "textResponse"
    assert frames[0]["textResponse"] == "Nothing here."
    assert frames[0]["close"] is True


def test_documents_upload_list_embed_remove(be):
    boundary = "----b" + uuid.uuid4().hex
    body = ("--%s\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"notes.txt\"\r\nContent-Type: text/plain\r\n\r\n"
            "The sky is blue today.\r\n--%s\r\nContent-Disposition: "
            "form-data; name=\"addToWorkspaces\"\r\n\r\nsales\r\n--%s--\r\n"
            % (boundary, boundary, boundary)).encode()
    r = be.api("POST", "/api/v1/document/upload", body=body, headers={
        "Content-Type": "multipart/form-data; boundary=" + boundary})
    assert r.status == 200, r
    doc = r.json()["documents"][0]
    assert r.json()["success"] is True
    assert doc["location"].startswith("custom-documents/notes-")
    assert doc["title"] == "notes.txt"

    files = be.api("GET", "/api/v1/documents").json()["localFiles"]
    assert files["name"] == "documents" and files["type"] == "folder"
    folder = files["items"][0]
    assert folder["name"] == "custom-documents"
    assert folder["items"][0]["name"] == doc["name"]

    # query mode now answers, with sources
    a = chat(be, "sales", {"message": "sky?", "mode": "query"}).json()
    assert a["textResponse"].startswith("Echo: sky?")
    assert a["sources"][0]["title"] == "notes.txt"

    r = be.api("POST", "/api/v1/workspace/support/update-embeddings",
               json={"adds": [doc["location"]]})
    assert r.json()["workspace"]["documents"][0]["docpath"] == \
        doc["location"]
    r = be.api("DELETE", "/api/v1/system/remove-documents",
               json={"names": [doc["location"]]})
    assert r.json()["success"] is True
    ws = be.api("GET", "/api/v1/workspace/sales").json()["workspace"][0]
    assert ws["documents"] == []


def test_threads(be):
    t = be.api("POST", "/api/v1/workspace/sales/thread/new",
               json={"name": "T", "slug": "t1"}).json()["thread"]
    assert t["slug"] == "t1"
    base = "/api/v1/workspace/sales/thread/t1"
    r1 = be.api("POST", base + "/chat", json={"message": "a"}).json()
    r2 = be.api("POST", base + "/chat", json={"message": "b"}).json()
    assert r1["textResponse"].endswith("turns: 0")
    assert r2["textResponse"] == "Echo: b | first: a | turns: 1"
    h = be.api("GET", base + "/chats").json()["history"]
    assert len(h) == 4
    s = helpers.StreamReader("POST", be.url + base + "/stream-chat",
                             json={"message": "c"}, headers=AUTH)
    frames = s.json_frames()
    s.close()
    assert frames[-1]["type"] == "finalizeResponseStream"
    r = be.api("POST", "/api/v1/workspace/sales/thread/zz/chat",
               json={"message": "a"})
    assert r.status == 404


def test_openai_models(be):
    r = be.api("GET", "/api/v1/openai/models").json()
    assert r["object"] == "list"
    assert [m["id"] for m in r["data"]] == ["sales", "support", "engineering"]
    r = be.api("POST", "/api/v1/openai/chat/completions",
               json={"model": "nope", "messages": [
                   {"role": "user", "content": "x"}]})
    assert (r.status, r.body) == (401, b"")


# ---------------------------------------------------------------------------
# magic words, scripts, connections


def test_fail_magic_word(be):
    s = stream(be, "sales", {"message": "please [fail]"})
    frames = s.json_frames()
    s.close()
    assert [f["type"] for f in frames] == [
        "textResponseChunk", "textResponseChunk", "abort"]
    assert frames[-1]["error"] == "Premature close"


def test_scripted_split_writes_arrive_separately(be):
    frame = b'data: {"type":"textResponseChunk","textResponse":"Hi"}\n\n'
    be.script([{"write": frame[:20].decode()}, {"sleep": 0.3},
               {"write": frame[20:].decode() + frame.decode() * 2}],
              workspace="sales")
    s = stream(be, "sales", {"message": "x"})
    first = s.read_some()
    t_first = time.monotonic()
    assert first == frame[:20]
    rest = s.read_all()
    t_rest = time.monotonic()
    s.close()
    assert rest == frame * 3
    assert t_rest - t_first > 0.2
    assert len(helpers.frames_of(rest)) == 3


def test_script_applies_to_one_workspace_and_times(be):
    be.script(json={"type": "textResponse", "textResponse": "scripted"},
              workspace="support", endpoint="chat", times=2)
    assert chat(be, "sales", {"message": "a"}).json()["textResponse"] \
        .startswith("Echo:")
    for _ in range(2):
        assert chat(be, "support", {"message": "a"}).json()[
            "textResponse"] == "scripted"
    assert chat(be, "support", {"message": "a"}).json()["textResponse"] \
        .startswith("Echo:")


def test_script_status_headers_and_raw_bytes(be):
    be.script([{"write_b64": base64.b64encode(b"\xff\xfe").decode()}],
              status=500, headers={"X-Test": "yes"})
    s = stream(be, "sales", {"message": "a"})
    assert s.status == 500 and s.headers["x-test"] == "yes"
    assert s.read_all() == b"\xff\xfe"
    s.close()


def test_script_wait_and_release(be):
    be.script([{"frame": {"type": "textResponseChunk", "textResponse": "A",
                          "close": False}},
               {"wait": "go"},
               {"frame": {"type": "finalizeResponseStream", "close": True}}])
    s = stream(be, "sales", {"message": "a"})
    assert helpers.json_frames(s.read_until(b"\n\n"))[0]["textResponse"] \
        == "A"
    be.wait_waiting("go")
    assert s.next_frame(timeout=0.01) is not None      # the first frame
    with pytest.raises(TimeoutError):
        s.read_some(timeout=0.2)
    be.release("go")
    rest = s.frames()
    s.close()
    assert "finalizeResponseStream" in rest[-1]


def test_script_close_aborts_mid_stream(be):
    be.script([{"frame": {"type": "textResponseChunk", "textResponse": "A",
                          "close": False}},
               {"write": 'data: {"type":"textRes'},
               {"close": True}])
    s = stream(be, "sales", {"message": "a"})
    s.read_all()
    s.close()
    assert s.truncated and not s.done
    assert s.text.endswith('data: {"type":"textRes')


def test_script_delay_then_normal_answer(be):
    be.script(delay=0.3)
    t = time.monotonic()
    r = chat(be, "sales", {"message": "late"}).json()
    assert time.monotonic() - t >= 0.3
    assert r["textResponse"].startswith("Echo: late")


def test_client_disconnect_is_seen(be):
    s = stream(be, "sales", {"message": "go [slow]"})
    assert s.next_frame() is not None
    c = be.connections()
    assert c["open"] == 1 and c["streams"] == 1
    s.close()
    c = be.wait_connections(open=0, streams=0, aborted=1, timeout=1)
    assert c["aborted"][0]["workspace"] == "sales"
    assert c["aborted"][0]["frames"] >= 1


def test_keepalive_connection_counted(be):
    s1 = helpers.StreamReader("GET", be.url + "/api/v1/auth",
                              headers=dict(AUTH, Connection="keep-alive"))
    s1.read_all()
    c = be.connections()
    assert c["open"] == 1
    s1.close()
    be.wait_connections(open=0, timeout=1)
