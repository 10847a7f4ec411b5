"""Redis highly available: a Sentinel group (a primary, a replica, three
sentinels, all real redis-server processes) behind nginx with two
workers.  The gateway follows a failover by itself, without a reload
and without blocking a worker; it refuses host names and incomplete
groups at configuration time; it works under the README's least
privilege ACL users, and names a command Redis refuses."""

import json
import os
import re
import subprocess
import threading
import time

from lib import helpers
from lib.auth import bearer
from lib.openai import assert_refused, user
from lib.paths import KEYS_TOOL, PYTHON, REPO
from lib.processes import key_digest
from lib.sentinel import MASTER, DataServer, FakeSentinel, acl_rules


TIMEOUT_MS = 200

GATEWAY = """
    anythingllm_redis      sentinel=%(sentinels)s master=%(master)s
                           timeout=%(timeout)dms%(extra)s;
    anythingllm_key_cache  zone=alm_keys:1m valid=600s invalid=5s;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location / {
            proxy_pass  http://anythingllm;
        }
    }
"""

# what a failover explains in the error log; anything else at "error"
# fails the test
EXPLAINED = re.compile(
    r"anythingllm: (redis (command|subscriber) connection to \"[^\"]+\" "
    r"(failed|lost|: (connect|command) timed out)"
    r"|redis \S+ answered READONLY"
    r"|redis \S+ is not the primary"
    r"|no sentinel of \""
    r"|rate of key \w+ cannot be counted: READONLY"
    r"|redis unreachable|redis error)")


def gateway(nginx, group, timeout=TIMEOUT_MS, extra="", **kw):
    conf = GATEWAY % {"sentinels": group.sentinel_list, "master": MASTER,
                      "timeout": timeout, "extra": extra}
    return nginx(conf, **kw)


def auth(n, key, timeout=5):
    """GET /api/v1/auth with the key: (the answer, seconds it took)."""
    t0 = time.monotonic()
    r = n.get("/api/v1/auth", headers=bearer(key), timeout=timeout)
    return r, time.monotonic() - t0


class Keys:
    """Fresh keys, each stored once and asked for once: never cached."""

    def __init__(self, name):
        self.name = name
        self.i = 0

    def store(self, server, count):
        for j in range(count):
            server.add_key("%s-%d" % (self.name, j), scopes="read")

    def next(self):
        self.i += 1
        return "%s-%d" % (self.name, self.i - 1)


def wait_serving(n, keys, timeout, in_a_row=6):
    """Until in_a_row fresh keys in a row are answered 200 (so both
    workers serve); returns when.  Every other answer must be a quick
    503."""
    deadline = time.monotonic() + timeout
    ok = 0
    key = keys.next()
    while ok < in_a_row:
        r, took = auth(n, key)
        if r.status == 200:
            ok += 1
            key = keys.next()
            continue
        # a 503 caches nothing: the key is still a fresh one
        assert_refused(r, 503, None, type_="server_error")
        assert took < 0.2 + TIMEOUT_MS / 1000.0 * 3, took
        ok = 0
        assert time.monotonic() < deadline, \
            "uncached keys not answered within %.1fs" % timeout
        time.sleep(0.01)
    return time.monotonic()


def wait_primary_logged(n, count=2, timeout=10):
    """Until count workers have logged the primary they found."""
    helpers.wait_until(
        lambda: n.error_log().count("redis primary of \"%s\" is" % MASTER)
        >= count, timeout, message="the workers never found the primary")


def unexplained_errors(n):
    return [l for l in n.error_log().splitlines()
            if "[error]" in l and not EXPLAINED.search(l)]


class Hammer(threading.Thread):
    """Asks with one key every 20 ms until stopped: (status, seconds)."""

    def __init__(self, n, key):
        super().__init__(daemon=True)
        self.n, self.key = n, key
        self.results = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                r, took = auth(self.n, self.key)
                self.results.append((r.status, took))
            except Exception as e:      # noqa: BLE001 - kept as a result
                self.results.append((repr(e), 0))
            time.sleep(0.02)

    def stop(self):
        self.done.set()
        self.join(10)
        return self.results


def rl_count(server, key):
    total = 0
    for name in server.cmd("KEYS", "anythingllm:rl:%s:*" % key_digest(key)):
        total += int(server.cmd("GET", name))
    return total


# ---------------------------------------------------------------------------


def test_sentinel_directive_errors(nginx):
    cases = [
        ("sentinel=127.0.0.1:26379", "needs master="),
        ("sentinel=localhost:26379 master=m", "must be an IPv4 literal"),
        ("sentinel=127.0.0.1:1,sentinel.example:26379 master=m",
         "must be an IPv4 literal"),
        ("sentinel=127.0.0.1 master=m", "invalid sentinel address"),
        ("sentinel=127.0.0.1:0 master=m", "invalid sentinel port"),
        ("sentinel=127.0.0.1:1,,127.0.0.1:2 master=m",
         "invalid sentinel address"),
        ("127.0.0.1:6379 sentinel=127.0.0.1:1 master=m",
         "one address or one sentinel= list"),
        ("127.0.0.1:6379 master=m", "need sentinel="),
        ("sentinel=127.0.0.1:1 master=m sentinel_user=u",
         "sentinel_user= needs sentinel_password="),
        ("127.0.0.1:6379 user=u", "user= needs password="),
        ("db=1", "needs an address"),
        ("redis.example:6379", "must be an IPv4 literal"),
    ]
    for args, message in cases:
        n = nginx("anythingllm_redis %s;\n" % args
                  + "server { listen 127.0.0.1:@PORT@; }", start=False)
        n.allow(r"\[emerg\]")
        ok, out = n.test_config()
        assert not ok, args
        assert message in out, (args, out)

    n = nginx("anythingllm_redis sentinel=127.0.0.1:1,127.0.0.1:2 master=m "
              "user=u password=p sentinel_user=su sentinel_password=sp "
              "timeout=50ms;\n"
              "server { listen 127.0.0.1:@PORT@; }", start=False)
    ok, out = n.test_config()
    assert ok, out


def test_failover_followed_without_reload(nginx, sentinel_group, backend):
    g = sentinel_group()
    old = g.primary()
    fresh = Keys("k-fresh")
    fresh.store(old, 80)
    old.add_key("k-cached", scopes="read")
    # an rpm under 200 is counted request by request (no lease), so
    # every request of k-rate writes to the primary of the moment
    old.add_key("k-rate", scopes="read", rpm=150)
    old.add_key("k-revoke", scopes="read")
    g.sync()

    n = gateway(nginx, g)
    wait_primary_logged(n)
    assert auth(n, "k-cached")[0].status == 200

    hammer = Hammer(n, "k-cached")
    hammer.start()
    time.sleep(0.2)

    g.kill_primary()
    new, promoted = g.wait_promoted(old)

    # uncached keys: answered again within 2 s of the promotion, each
    # refusal meanwhile a quick 503
    back = wait_serving(n, fresh, timeout=4)
    assert back - promoted < 2.0, back - promoted
    print("uncached keys served %.3f s after the promotion was seen"
          % (back - promoted))

    time.sleep(0.3)
    results = hammer.stop()
    assert results, "no request was made during the failover"
    assert all(s == 200 for s, _ in results), \
        [r for r in results if r[0] != 200][:5]
    slowest = max(t for _, t in results)
    assert slowest < 1.0, slowest
    print("cached key: %d answers during the failover, all 200, slowest "
          "%.3f s" % (len(results), slowest))

    # rate limits count on the new primary
    for _ in range(5):
        assert auth(n, "k-rate")[0].status == 200
    assert rl_count(new, "k-rate") == 5

    # a revocation published on the new primary takes effect at once
    assert auth(n, "k-revoke")[0].status == 200
    new.revoke("k-revoke")
    t0 = time.monotonic()
    helpers.wait_until(
        lambda: all(auth(n, "k-revoke")[0].status == 401 for _ in range(4)),
        timeout=2, interval=0.02, message="revocation not heard")
    assert time.monotonic() - t0 < 1.0

    # the old primary comes back as a replica of the new one: the gateway
    # never asks it anything, nor tries a write there
    old.replica_of = new.addr
    old.start()
    helpers.wait_until(
        lambda: old.info("replication").get("master_link_status") == "up",
        timeout=10, message="the old primary did not follow the new one")
    for _ in range(10):
        assert auth(n, fresh.next())[0].status == 200
        assert auth(n, "k-rate")[0].status == 200
    assert rl_count(new, "k-rate") == 15
    stats = old.info("commandstats")
    assert "cmdstat_hgetall" not in stats, stats
    assert "cmdstat_role" not in stats, stats
    assert "errorstat_READONLY" not in old.info("errorstats")

    assert "sentinels switched the primary of \"%s\" to %s" \
        % (MASTER, new.addr) in n.error_log()
    assert unexplained_errors(n) == []


def test_readonly_answer_leads_to_rediscovery(nginx, sentinel_group,
                                             backend, tmp_path):
    g = sentinel_group()
    p = g.primary()
    fresh = Keys("k-fresh")
    fresh.store(p, 60)
    # counted request by request (rpm under 200): each request writes
    p.add_key("k-rate", scopes="read", rpm=150)
    g.sync()

    n = gateway(nginx, g)
    wait_primary_logged(n)
    wait_serving(n, fresh, timeout=5)
    assert auth(n, "k-rate")[0].status == 200

    # the primary is demoted under the gateway's open connections, the
    # sentinels not told: a third server, a copy of it, takes the lead
    (tmp_path / "other").mkdir()
    other = DataServer(tmp_path / "other", replica_of=p.addr)
    other.start()
    try:
        helpers.wait_until(
            lambda: other.info("replication").get("master_link_status")
            == "up", timeout=10, message="the copy did not sync")
        other.cmd("REPLICAOF", "NO", "ONE")
        p.cmd("REPLICAOF", other.host, str(other.port))

        # a write answered READONLY: each worker leaves that server (the
        # key is cached: only its rate count goes to Redis)
        def left():
            r = auth(n, "k-rate")[0]
            assert r.status in (200, 503), r.text
            pids = set(re.findall(r"#(\d+): anythingllm: redis \S+ "
                                  r"answered READONLY", n.error_log()))
            return len(pids) >= 2
        helpers.wait_until(left, timeout=5, interval=0.01,
                           message="READONLY not heard by both workers")

        # the sentinels still name it, but ROLE says "slave": nothing
        # more is sent there, and uncached keys get a quick 503
        helpers.wait_until(
            lambda: "is not the primary of \"%s\"" % MASTER
            in n.error_log(), timeout=5,
            message="the demoted server was not checked with ROLE")
        before = (p.info("errorstats").get("errorstat_READONLY"),
                  p.info("commandstats").get("cmdstat_hgetall"))
        for _ in range(10):
            assert auth(n, "k-rate")[0].status == 200
            r, took = auth(n, fresh.next())
            assert_refused(r, 503, None, type_="server_error")
            assert took < 0.2 + TIMEOUT_MS / 1000.0 * 3, took
        assert (p.info("errorstats").get("errorstat_READONLY"),
                p.info("commandstats").get("cmdstat_hgetall")) == before

        # it becomes the primary again: the gateway is back by itself
        p.cmd("REPLICAOF", "NO", "ONE")
    finally:
        other.stop()
    wait_serving(n, fresh, timeout=4)
    assert auth(n, "k-rate")[0].status == 200
    assert unexplained_errors(n) == []


def test_sentinels_down(nginx, sentinel_group, backend):
    g = sentinel_group()
    p = g.primary()
    fresh = Keys("k-fresh")
    fresh.store(p, 80)
    p.add_key("k-cached", scopes="read")

    # one of three down: it is skipped, within the timeout
    g.sentinels[0].stop()
    n = gateway(nginx, g)
    wait_serving(n, fresh, timeout=5, in_a_row=10)
    assert auth(n, "k-cached")[0].status == 200

    # all down: new workers (a reload) serve cached keys, refuse
    # uncached ones at once
    for s in g.sentinels:
        s.stop()
    n.reload()
    for _ in range(10):
        r, took = auth(n, "k-cached")
        assert r.status == 200, r.text
        r, took = auth(n, fresh.next())
        assert_refused(r, 503, None, type_="server_error")
        assert r.headers["retry-after"] == "1"
        assert took < 0.2 + TIMEOUT_MS / 1000.0 * 3, took
    helpers.wait_until(lambda: "no sentinel of" in n.error_log(), timeout=5)

    # a gateway started with every sentinel down starts, and refuses
    n2 = gateway(nginx, g)
    r, took = auth(n2, "k-cached")
    assert_refused(r, 503, None, type_="server_error")

    # the sentinels back: found again without a reload
    for s in g.sentinels:
        s.start()
    wait_serving(n, fresh, timeout=5)
    wait_serving(n2, fresh, timeout=5)
    assert unexplained_errors(n) == []
    assert unexplained_errors(n2) == []


def bulk(b):
    return b"$%d\r\n%s\r\n" % (len(b), b)


# answers to SENTINEL get-master-addr-by-name no sentinel sends
MALFORMED = [
    b":1\r\n",                                        # an integer
    b"+OK\r\n",                                       # a status
    b"-ERR no such master\r\n",                       # an error
    b"*-1\r\n",                                       # no master known
    b"*0\r\n",
    b"*1\r\n" + bulk(b"127.0.0.1"),
    b"*3\r\n" + bulk(b"127.0.0.1") + bulk(b"6379") + bulk(b"x"),
    b"*2\r\n" + bulk(b"redis.example") + bulk(b"6379"),  # a host name
    b"*2\r\n" + bulk(b"127.0.0.1") + bulk(b"0"),
    b"*2\r\n" + bulk(b"127.0.0.1") + bulk(b"70000"),
    b"*2\r\n" + bulk(b"127.0.0.1") + bulk(b"-1"),
    b"*2\r\n" + bulk(b"127.0.0.1") + bulk(b" 6379"),
    b"*2\r\n" + bulk(b"127.0.0.1") + bulk(b""),
    b"*2\r\n" + bulk(b"") + bulk(b"6379"),
    b"*2\r\n" + bulk(b"1" * 300) + bulk(b"6379"),        # too long
    b"*2\r\n" + bulk(b"127.0\x00.0.1") + bulk(b"6379"),   # a NUL
    b"*2\r\n$-1\r\n$-1\r\n",                          # nils
    b"*2\r\n*0\r\n*0\r\n",                            # arrays
    b"*2\r\n:1\r\n:6379\r\n",                         # integers
    b"*2\r\n" + bulk(b"127.0.0.1"),                     # cut short
    b"garbage\r\n",                                   # not RESP
]


def test_malformed_sentinel_answers_are_skipped(nginx, sentinel_group,
                                                backend):
    fakes = [FakeSentinel(a) for a in MALFORMED]
    for f in fakes:
        f.start()
    try:
        # only sentinels that answer nonsense: nothing is connected to,
        # an uncached key gets a quick 503, and every one was asked
        only = ",".join(f.addr for f in fakes)
        conf = GATEWAY % {"sentinels": only, "master": MASTER,
                          "timeout": TIMEOUT_MS, "extra": ""}
        n = nginx(conf)
        helpers.wait_until(lambda: all(f.asked for f in fakes), timeout=10,
                           message="not every sentinel was asked: %s"
                           % [f.asked for f in fakes])
        for i in range(5):
            r, took = auth(n, "k-nowhere-%d" % i)
            assert_refused(r, 503, None, type_="server_error")
            assert took < 0.2 + TIMEOUT_MS / 1000.0 * 3, took
        # the answer cut short is given up when its timeout fires,
        # which may come after the last refusal on a loaded machine
        helpers.wait_until(lambda: "did not answer within" in n.error_log(),
                           timeout=5, message="the answer cut short was "
                           "not given up")
        log = n.error_log()
        assert "named no IP address and port" in log
        assert "does not know the master" in log
        assert "Protocol error" in log          # the bytes that are not RESP

        # the same nonsense before the real sentinels: they are found
        g = sentinel_group()
        fresh = Keys("k-found")
        fresh.store(g.primary(), 40)
        conf = GATEWAY % {"sentinels": only + "," + g.sentinel_list,
                          "master": MASTER, "timeout": TIMEOUT_MS,
                          "extra": ""}
        n2 = nginx(conf)
        wait_serving(n2, fresh, timeout=10)

        for gw in (n, n2):
            log = gw.error_log()
            for bad in ("[alert]", "[crit]", "[emerg]", "exited on signal"):
                assert bad not in log, log
    finally:
        for f in fakes:
            f.stop()


def keys_tool(g, *args, stdin=None, acl=True):
    """The key tool on the group; acl: as the README's ACL users."""
    env = dict(os.environ)
    cmd = [PYTHON, KEYS_TOOL, "--sentinel", g.sentinel_list, "--master",
           MASTER]
    if acl:
        env.update({"ANYTHINGLLM_REDIS_PASSWORD": "keys-secret",
                    "ANYTHINGLLM_SENTINEL_PASSWORD": "sentinel-secret"})
        cmd += ["--user", "anythingllm-keys",
                "--sentinel-user", "anythingllm-sentinel"]
    return subprocess.run(cmd + list(args), input=stdin,
                          capture_output=True, text=True, env=env,
                          timeout=30)


def test_keys_tool_sentinel_options(sentinel_group):
    def tool(*args):
        return subprocess.run([PYTHON, KEYS_TOOL] + list(args),
                              capture_output=True, text=True, timeout=30)

    r = tool("--master", MASTER, "list")
    assert r.returncode == 2 and "go together" in r.stderr, r.stderr
    r = tool("--sentinel", "127.0.0.1:1,127.0.0.1:2", "--master", MASTER,
             "list")
    assert r.returncode == 1, r.stderr
    assert "no sentinel named the primary" in r.stderr, r.stderr

    # a sentinel down is skipped; the key lands on the primary
    g = sentinel_group()
    g.sentinels[0].stop()
    r = keys_tool(g, "create", "--name", "via-sentinel", acl=False)
    assert r.returncode == 0, r.stderr
    key = re.search(r"^key:\s+(\S+)", r.stdout, re.M).group(1)
    assert g.primary().hgetall(g.primary().key_name(key))["name"] \
        == "via-sentinel"

    # a group name the sentinels do not know
    r = subprocess.run([PYTHON, KEYS_TOOL, "--sentinel", g.sentinel_list,
                        "--master", "nosuch", "list"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "does not know master" in r.stderr, \
        r.stderr


def test_least_privilege_acl_users(nginx, sentinel_group, backend):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    g = sentinel_group()

    # the README's rules, as written, with the test's passwords
    for s in g.servers:
        for name, pw in (("anythingllm-gateway", "gateway-secret"),
                         ("anythingllm-keys", "keys-secret")):
            rules = [w.replace("<password>", pw)
                     for w in acl_rules(readme, name)]
            assert s.cmd("ACL", "SETUSER", name, *rules) == "OK"
    for s in g.sentinels:
        rules = [w.replace("<password>", "sentinel-secret")
                 for w in acl_rules(readme, "anythingllm-sentinel")]
        assert s.cmd("ACL", "SETUSER", "anythingllm-sentinel",
                     *rules) == "OK"

    n = gateway(nginx, g, extra=(
        " user=anythingllm-gateway password=gateway-secret"
        " sentinel_user=anythingllm-sentinel"
        " sentinel_password=sentinel-secret"))
    wait_primary_logged(n)

    # every command of the key tool, under its user, through the group
    r = keys_tool(g, "create", "--name", "acl", "--scopes", "chat,read",
                  "--workspaces", "sales", "--rpm", "100", "--tpm", "100000",
                  "--key-from-stdin", stdin="sk-acl-" + "x" * 40 + "\n")
    assert r.returncode == 0, r.stderr
    key = "sk-acl-" + "x" * 40
    kid = key_digest(key)[:12]

    assert auth(n, key)[0].status == 200
    assert n.get("/v1/models", headers=bearer(key)).status == 200
    body = {"model": "sales", "messages": [user("hello")]}
    r = n.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert r.status == 200, r.text
    body["messages"] += [{"role": "assistant",
                          "content": r.json()["choices"][0]["message"]
                          ["content"]}, user("again")]
    # stored and taken under the gateway's user: the second turn goes
    # on in the first one's session
    helpers.wait_until(lambda: g.primary().cmd("HLEN", "anythingllm:conv"),
                       timeout=5, message="conversation not stored")
    r = n.post("/v1/chat/completions", headers=bearer(key), json=body)
    assert r.status == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].endswith(
        "| turns: 1"), r.text

    for args in (["list"], ["show", kid], ["set", kid, "--rpm", "50"],
                 ["disable", kid]):
        r = keys_tool(g, *args)
        assert r.returncode == 0, (args, r.stderr)
    helpers.wait_until(lambda: auth(n, key)[0].status == 401, timeout=2,
                       message="disable not heard")
    assert keys_tool(g, "enable", kid).returncode == 0
    helpers.wait_until(lambda: auth(n, key)[0].status == 200, timeout=2)
    assert keys_tool(g, "revoke", kid).returncode == 0
    helpers.wait_until(lambda: auth(n, key)[0].status == 401, timeout=2)

    # the chats' usage, counted by the gateway's user, read by the tool's
    r = keys_tool(g, "usage", key_digest(key), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"]["requests"] == 2, r.stdout

    log = n.error_log()
    assert "NOPERM" not in log and "can't run" not in log
    assert "redis refused the command" not in log

    # a right taken away: the refused command is named
    p = g.primary()
    p.cmd("ACL", "SETUSER", "anythingllm-gateway", "-incr")
    p.add_key("k-rate", scopes="read", rpm=100)
    r, _ = auth(n, "k-rate")
    assert_refused(r, 503, None, type_="server_error")
    helpers.wait_until(
        lambda: "redis refused the command INCR to user "
        "\"anythingllm-gateway\"" in n.error_log(), timeout=3,
        message="the refused command was not logged")


def test_acl_user_on_a_single_redis(nginx, redis_server, backend):
    with open(os.path.join(REPO, "README.md")) as f:
        rules = [w.replace("<password>", "gateway-secret")
                 for w in acl_rules(f.read(), "anythingllm-gateway")]
    redis_server.cmd("ACL", "SETUSER", "anythingllm-gateway", *rules)
    redis_server.add_key("k-acl", scopes="read", rpm=100)
    conf = GATEWAY.replace(
        "sentinel=%(sentinels)s master=%(master)s",
        "@REDIS@ user=anythingllm-gateway password=%(password)s")
    conf = conf.replace("anythingllm_key_cache  zone=alm_keys:1m",
                        "anythingllm_key_cache  zone=alm_keys%(n)d:1m")

    n = nginx(conf % {"password": "gateway-secret", "timeout": 500,
                      "extra": "", "n": 1}, redis=redis_server)
    helpers.wait_until(lambda: auth(n, "k-acl")[0].status == 200, timeout=5)
    clients = redis_server.cmd("CLIENT", "LIST").decode()
    assert "user=anythingllm-gateway" in clients

    # a wrong password: refused at AUTH, logged, uncached keys get 503
    bad = nginx(conf % {"password": "wrong", "timeout": 500, "extra": "",
                        "n": 2}, redis=redis_server)
    r, _ = auth(bad, "k-acl")
    assert_refused(r, 503, None, type_="server_error")
    helpers.wait_until(lambda: "AUTH or SELECT failed: WRONGPASS"
                       in bad.error_log(), timeout=5)
