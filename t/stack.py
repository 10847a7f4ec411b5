#!/usr/bin/python3
"""Runs a command against a whole gateway: the Node client suite.

    t/stack.py -- node --test

Starts redis-server, the AnythingLLM stand-in and nginx with the full
gateway configuration (the same processes the pytest fixtures use),
runs the command with the environment below, stops everything, and
fails when the command fails or nginx's error log holds an [alert],
[emerg], [crit] or sanitizer line.

    ALM_BASE_URLS   the two OpenAI base URLs, comma separated
    ALM_GATEWAY_URL http://127.0.0.1:<port>
    ALM_BACKEND_URL the stand-in (its /__test/ control API)
    ALM_REDIS       ip:port of redis-server
    ALM_KEYS_TOOL   scripts/anythingllm-keys
    ALM_KEY_FULL    a key with scopes chat,read on every workspace
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lib import paths, processes  # noqa: E402
from lib.gateway import GATEWAY  # noqa: E402


def main(argv):
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        sys.exit("usage: t/stack.py -- command [args...]")

    if not processes.module_available():
        sys.exit("stack: module not built: %s" % processes.MODULE)

    work, dirs, redis, backend = processes.stack_parts("stack")
    ngx = None
    rc = 1

    try:
        redis.start()
        backend.start()

        ngx = processes.Nginx(dirs["nginx"], GATEWAY, {}, backend.addr,
                              redis.addr)
        ngx.start()

        key = "sk-alm-stack-full-" + os.urandom(12).hex()
        redis.add_key(key, name="stack-full", scopes="chat,read",
                      workspaces="*")

        env = dict(os.environ)
        env.update({
            "ALM_BASE_URLS": "%s/v1,%s/api/v1/openai" % (ngx.url, ngx.url),
            "ALM_GATEWAY_URL": ngx.url,
            "ALM_BACKEND_URL": backend.url,
            "ALM_REDIS": redis.addr,
            "ALM_KEYS_TOOL": paths.KEYS_TOOL,
            "ALM_KEY_FULL": key,
        })

        rc = subprocess.call(argv, env=env)

    finally:
        if ngx is not None:
            ngx.stop()
            bad = ngx.bad_lines()
            if bad:
                print("stack: nginx error log:\n  " + "\n  ".join(bad),
                      file=sys.stderr)
                rc = rc or 1
        backend.stop()
        redis.stop()

    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
