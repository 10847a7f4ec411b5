#!/usr/bin/python3
"""
A stand-in for the AnythingLLM server, used by the tests of ngx_anythingllm.

It follows the upstream contract (AnythingLLM server v1.16 line): the
developer API under /api/v1
with the upstream key check, workspaces, chats (plain and streamed), threads,
documents and AnythingLLM's own OpenAI-like endpoints, all in memory.  The
answers are deterministic so that tests can prove what reached the model:

    Echo: <message> | first: <first earlier user message or -> | turns: <N>

with " | attachments: N" appended when the request carried attachments.

Behaviour worth knowing, copied from the real server (Express):
  * routes match case-insensitively and accept one trailing slash;
  * route parameters are percent-decoded, the path is matched undecoded;
  * an unknown route gives 404 "Not Found" (text/plain) without a key check;
  * OPTIONS on any path is a CORS preflight answered with 204;
  * JSON and text answers carry a weak ETag, and a GET or HEAD whose
    If-None-Match names it (or "*") gets 304 without a body;
  * responses to a request with an Origin header reflect that origin;
  * idle keep-alive connections are closed after 5 s (Node's default).

Test control lives under /__test/ and needs no key:

    POST   /__test/reset              back to the seed state, drop records
    GET    /__test/requests           every request received, oldest first
    DELETE /__test/requests           forget them
    GET    /__test/connections        open connections, streams in flight,
                                      streams whose client went away
    GET    /__test/state              the above plus waits and scripts
    POST   /__test/script             script the next chat or stream-chat
    DELETE /__test/script             drop pending scripts
    POST   /__test/release/<name>     let {"wait": name} events go on

A script is a JSON object:

    {"events": [...],          raw answer, written event by event:
         {"write": "text"}       one TCP write of these bytes (UTF-8)
         {"write_b64": "..."}    one TCP write of raw bytes
         {"frame": {...}}        one "data: <json>\n\n" write ("frame" may
                                 also be a string, written after "data: ")
         {"frames": [...]}       several frames in one write
         {"sleep": seconds}
         {"wait": "name"}        until POST /__test/release/name
         {"close": true}         abort the connection (no chunked end)
         {"reset": true}         abort with a TCP RST
     "status": 200, "headers": {...},
     "json": {...} | "body": "text"   a whole answer instead of events
     "delay": seconds            before anything is sent
     "workspace": "slug"         only for this workspace
     "endpoint": "chat" | "stream-chat" | "any"     (default "any")
     "path": "/api/v1/..."       instead: any route whose path starts so
     "times": 1                  how many requests it serves (0: forever)
    }

A script with only "delay" delays the normal answer.  Releases are sticky
until the next reset.

Magic words in a chat message, for clients that cannot script:
    [slow]    40 words, one every 0.3 s
    [fail]    two chunks, then an abort frame "Premature close"
    [error]   the model fails before any output
    [empty]   the model returns nothing
    [agent]   the agent path (also a message starting with "@agent")
    [big:N]   the answer is one chunk of N "x"

This file is the command line; the server is the package t/standin/,
one module a concern (listed in its __init__.py).
"""

import argparse
import asyncio
import sys

from standin.server import serve


def main():
    ap = argparse.ArgumentParser(description="AnythingLLM stand-in")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3001,
                    help="0 picks a free port (printed)")
    ap.add_argument("--api-key", default="UPSTREAM-KEY-0001-TEST")
    ap.add_argument("--workspaces", default="sales,support,engineering",
                    help="comma list of workspaces to start with")
    ap.add_argument("--keepalive-timeout", type=float, default=5.0,
                    help="seconds an idle connection is kept (Node: 5)")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
