"""The RESP client of the key tool (scripts/anythingllm-keys), loaded
from the script itself: the tests and the tool speak to Redis through
the same code.

    c = connect(host, port)
    c.cmd("HSET", name, "k", "v")     one command, its reply
    c.send(...); c.reply()            pipelining, or a subscription

Bulk strings come back as bytes, status lines as str.  An error reply
raises RedisError; a connection that cannot be made or is lost raises
Failure."""

import importlib.machinery
import importlib.util

from lib import paths


def _load_tool():
    loader = importlib.machinery.SourceFileLoader("anythingllm_keys",
                                                  paths.KEYS_TOOL)
    spec = importlib.util.spec_from_loader("anythingllm_keys", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


keys_tool = _load_tool()

Redis = keys_tool.Redis
RedisError = keys_tool.RedisReplyError
Failure = keys_tool.Failure


def connect(host, port, timeout=5.0):
    return Redis("%s:%d" % (host, port), timeout=timeout)
