"""
Fixtures that run the real processes (t/lib/processes.py): Redis, the
AnythingLLM stand-in (t/backend.py) and nginx with the module.

    redis_server     a redis-server of its own on a free port
    backend          the stand-in AnythingLLM on a free port
    backend_factory  more stand-ins: backend_factory(api_key=...)
    nginx            a factory: nginx(conf, ...) -> Nginx
    sentinel_group   a factory: a primary, a replica and three sentinels
                     (t/lib/sentinel.py), started and ready

The environment variables that pick the binaries are described in
t/lib/processes.py.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib.processes import (MODULE, Backend, Nginx,  # noqa: E402
                           RedisServer, module_available, running)


@pytest.fixture
def redis_server(tmp_path_factory):
    yield from running(RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture
def backend(tmp_path_factory):
    yield from running(Backend(tmp_path_factory.mktemp("backend")))


@pytest.fixture
def backend_factory(tmp_path_factory):
    """Starts more stand-ins: backend_factory(api_key=..., workspaces=...)."""
    made = []

    def make(**kw):
        b = Backend(tmp_path_factory.mktemp("backend"), **kw)
        b.start()
        made.append(b)
        return b
    yield make
    for b in made:
        b.stop()


@pytest.fixture
def sentinel_group(tmp_path_factory):
    """Factory: sentinel_group(auth_user=None, auth_pass=None) ->
    SentinelGroup, started, its sentinels agreed on the group."""
    from lib.sentinel import SentinelGroup
    made = []

    def make(**kw):
        g = SentinelGroup(tmp_path_factory.mktemp("sentinel"), **kw)
        made.append(g)
        g.start()
        return g
    yield make
    for g in made:
        g.stop()


@pytest.fixture
def nginx(request, tmp_path_factory):
    """Factory: nginx(conf, workers=2, module=True, main="", events="",
    log_format=None, log_level="debug", user=True,
    backend=<Backend>|None, redis=<RedisServer>|None,
    upstream="host:port", start=True) -> Nginx.

    conf is the test's text inside http {} (its server blocks and any
    http-level directives), written out in the test file; in it @PORT@,
    @BACKEND@ (host:port of the stand-in), @REDIS@ (host:port of Redis)
    and @PREFIX@ are filled in.  The frame around it (main context,
    events, log format, temp paths, "upstream anythingllm") is
    t/lib/processes.py's FRAME.  The default backend is the `backend`
    fixture; the default Redis the `redis_server` fixture, started only
    when conf names @REDIS@."""
    made = []

    def make(conf, **params):
        if params.get("module", True) and not module_available():
            pytest.fail("module not built: %s (run make build)" % MODULE)
        upstream = params.pop("upstream", None)
        be = params.pop("backend", None)
        rd = params.pop("redis", None)
        start = params.pop("start", True)
        if upstream is None:
            if be is None:
                be = request.getfixturevalue("backend")
            upstream = be.addr
        if rd is None and "@REDIS@" in conf + params.get("main", ""):
            rd = request.getfixturevalue("redis_server")
        n = Nginx(tmp_path_factory.mktemp("nginx"), conf, params, upstream,
                  rd.addr if rd is not None else None)
        n.backend = be
        n.redis = rd
        made.append(n)
        if start:
            n.start()
        return n

    yield make

    problems = []
    for n in made:
        n.stop()
        bad = n.bad_lines()
        if bad:
            problems.append("%s:\n  %s" % (n.prefix, "\n  ".join(bad[:20])))
    if problems:
        pytest.fail("nginx logged alerts or sanitizer reports:\n"
                    + "\n".join(problems), pytrace=False)
