"""The AnythingLLM answers the stand-in backends give, shaped as
AnythingLLM's workspace chat and stream-chat answer.

A realistic answer is 100 tokens: 100 textResponseChunk frames of one
token each, then the closing chunk (empty text, close:true) and
finalizeResponseStream with the usage, as AnythingLLM sends a chat-mode
stream.
"""

import json

TOKENS = 100
UUID = "3f1c2a9e-5b7d-4e21-9c8a-6d2f0b4e7a13"
KEY = "sk-alm-bench-" + "0123456789abcdef" * 2
RPM_KEY = "sk-alm-bench-rpm-" + "fedcba9876543210" * 2
# high enough never to refuse: wrk stays far below a billion a minute
RPM = 1000000000
SLUG = "sales"

_WORDS = ("The quarterly figures show steady growth in every region,"
          " with the strongest gains in the north where two new"
          " accounts signed").split()


def tokens(n=TOKENS):
    """n answer pieces, each a word with its leading blank."""
    out = []
    for i in range(n):
        w = _WORDS[i % len(_WORDS)]
        out.append(w if i == 0 else " " + w)
    return out


def metrics(completion):
    return {"prompt_tokens": 42, "completion_tokens": completion,
            "total_tokens": 42 + completion, "duration": 2.1,
            "outputTps": 47.6, "model": "bench-model",
            "provider": "bench"}


def chunk_frame(text, close=False):
    return {"uuid": UUID, "sources": [], "type": "textResponseChunk",
            "textResponse": text, "close": close, "error": False}


def final_frame(completion=TOKENS):
    return {"uuid": UUID, "type": "finalizeResponseStream",
            "close": True, "error": False, "chatId": 1,
            "metrics": metrics(completion), "sources": []}


def sse(frame):
    return "data: %s\n\n" % json.dumps(frame, separators=(",", ":"))


def stream_frames(n=TOKENS):
    """The whole stream-chat answer as a list of frame texts."""
    frames = [sse(chunk_frame(t)) for t in tokens(n)]
    frames.append(sse(chunk_frame("", True)))
    frames.append(sse(final_frame(n)))
    return frames


def chat_answer(n=TOKENS):
    """The non-stream workspace chat answer of the same 100 tokens."""
    return json.dumps({"id": UUID, "type": "textResponse",
                       "textResponse": "".join(tokens(n)),
                       "sources": [], "close": True, "error": None,
                       "chatId": 1, "metrics": metrics(n)},
                      separators=(",", ":"))


def _workspace():
    return {"id": 1, "name": "Sales", "slug": SLUG,
            "createdAt": "2026-01-01T00:00:00.000Z", "openAiTemp": 0.7,
            "openAiHistory": 20, "chatMode": "chat", "documents": [],
            "threads": []}


def workspaces():
    """GET /api/v1/workspaces"""
    return json.dumps({"workspaces": [_workspace()]},
                      separators=(",", ":"))


def workspace():
    """GET /api/v1/workspace/sales: an array, as AnythingLLM has it"""
    return json.dumps({"workspace": [_workspace()]},
                      separators=(",", ":"))


def openai_request(stream):
    """The client's chat completion: one user message."""
    return json.dumps({"model": SLUG, "stream": stream,
                       "messages": [{"role": "user",
                                     "content": "How did sales do?"}]})


def workspace_request():
    """What the gateway sends upstream for it, for the baselines."""
    return json.dumps({"message": "How did sales do?", "mode": "chat"})
