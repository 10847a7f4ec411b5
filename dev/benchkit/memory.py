"""The memory case: what an open stream costs a gateway worker.

STREAMS slow streams (benchkit.slowstream) are held open at once, each
having received its first frame, through a fresh gateway: once proxied
plainly (stream-chat through a location without the module) and once
as an OpenAI stream (/v1/chat/completions with stream: true, the key
checked from the cache and every frame re-framed).  The growth of the
worker's resident memory from before the streams to while they are
held, divided by STREAMS, is each way's cost per stream; the
difference is what the gateway adds to plain proxying.

Each stream holds two descriptors in the worker (client and upstream):
the gateway gets worker_connections and worker_rlimit_nofile to match,
and this process a descriptor limit that its children inherit.
"""

import os
import subprocess
import sys
import time

from . import answers, stack

WARM = 50


def gateway_conf(redis_port, slow_port, port, workers):
    return """
    anythingllm_redis 127.0.0.1:%d;
    anythingllm_key_cache zone=keys:10m valid=600s;
    upstream be { server 127.0.0.1:%d; }
    server {
        listen 127.0.0.1:%d backlog=4096%s;
        location /plain/ { rewrite ^/plain(/.*)$ $1 break; %s }
        location /v1/ {
            anythingllm_upstream_key %s;
            anythingllm_auth on;
            anythingllm_openai on;
            %s
        }
    }""" % (redis_port, slow_port, port,
            " reuseport" if workers > 1 else "", stack.PROXY,
            stack.UPSTREAM_KEY, stack.PROXY)


def hold(port, path, streams, key, body):
    """Opens the streams; returns the client (holding them, to be
    released with release()) and how many are open."""
    p = subprocess.Popen([sys.executable, "-m", "benchkit.slowstream",
                          "client", str(port), path, str(streams),
                          key or "", body],
                         cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline().split()
    if line[:1] != ["ready"]:
        release(p)
        raise SystemExit("bench: the stream client failed")
    return p, int(line[1])


def release(p):
    try:
        p.stdin.write("close\n")
        p.stdin.flush()
    except OSError:
        pass
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def measure_one(st, name, redis_port, slow_port, streams, path, key,
                body, limit):
    """KiB per stream of one way, with a gateway of its own.  A worker
    needs two descriptors a stream: when the limit does not allow that
    many, more workers share the streams (reuseport spreads them), with
    room for an uneven share; their memory is summed."""
    port = stack.free_port()
    workers = 1
    while 2 * streams * 1.2 / workers + 512 > limit:
        workers += 1
    fds = min(limit, int(2 * streams * 1.2 / workers) + 512)
    master = st.nginx(name, gateway_conf(redis_port, slow_port, port,
                                         workers),
                      connections=fds, nofile=fds, workers=workers)
    stack.wait_port(port)
    try:
        # first requests allocate once for good: keep them out
        c, _ = hold(port, path, WARM, key, body)
        release(c)
        time.sleep(0.5)
        pids = stack.worker_pids(master.pid)
        before = stack.rss_kib(pids)
        c, n = hold(port, path, streams, key, body)
        time.sleep(1)
        after = stack.rss_kib(pids)
        release(c)
    finally:
        st.stop(master)
    if n != streams:
        raise SystemExit("bench: %s: only %d of %d streams opened"
                         % (name, n, streams))
    return (after - before) / float(streams)


def measure(st, redis_port, streams):
    """{"plain": KiB, "openai": KiB} per open stream."""
    have = stack.raise_fd_limit(2 * streams + 1024)
    if have < streams + 256:
        raise SystemExit("bench: %d descriptors allowed, %d streams "
                         "need more" % (have, streams))
    slow_port = stack.free_port()
    backend = st.spawn([sys.executable, "-m", "benchkit.slowstream",
                        "backend", str(slow_port)],
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
    stack.wait_port(slow_port)
    try:
        plain = measure_one(st, "mem-plain", redis_port, slow_port,
                            streams,
                            "/plain/api/v1/workspace/sales/stream-chat",
                            None, answers.workspace_request(), have)
        openai = measure_one(st, "mem-openai", redis_port, slow_port,
                             streams, "/v1/chat/completions",
                             answers.KEY, answers.openai_request(True),
                             have)
    finally:
        st.stop(backend)
    return {"plain": plain, "openai": openai}
