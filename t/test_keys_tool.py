"""scripts/anythingllm-keys against a real Redis."""

import hashlib
import json
import os
import pty
import random
import re
import select
import subprocess
import threading
import time

import pytest

from lib.paths import KEYS_TOOL as TOOL
from lib.processes import free_port
from lib.tcpproxy import TcpProxy


def run(redis, *args, stdin=None, env=None, addr=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("ANYTHINGLLM_") and k != "REDISCLI_AUTH"}
    if env:
        e.update(env)
    cmd = [TOOL]
    if redis is not None or addr is not None:
        cmd += ["--redis", addr or redis.addr]
    p = subprocess.run(cmd + list(args), input=stdin, capture_output=True,
                       text=True, env=e, timeout=30)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def create(redis, *args):
    p = run(redis, "create", "--json", *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def stored(redis, digest, prefix="anythingllm:"):
    return redis.hgetall("%skey:%s" % (prefix, digest))


def test_tool_is_executable():
    assert os.access(TOOL, os.X_OK)
    with open(TOOL) as f:
        assert f.readline() == "#!/usr/bin/python3\n"
    p = subprocess.run([TOOL, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "create" in p.stdout


def test_create_defaults(redis_server):
    p = run(redis_server, "create", "--name", "team a")
    assert p.returncode == 0, p.stderr
    key = re.search(r"^key:\s+(\S+)$", p.stdout, re.M).group(1)
    kid = re.search(r"^id:\s+(\S+)$", p.stdout, re.M).group(1)
    assert re.fullmatch(r"sk-alm-[A-Za-z0-9_-]{43}", key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert kid == digest[:12]
    assert "not shown again" in p.stderr
    rec = stored(redis_server, digest)
    assert rec["name"] == "team a"
    assert rec["scopes"] == "chat,read"
    assert rec["workspaces"] == "*"
    assert (rec["rpm"], rec["expires"], rec["disabled"]) == ("0", "0", "0")
    assert abs(int(rec["created"]) - time.time()) < 60
    # only the digest is stored, never the key
    names = redis_server.cmd("KEYS", "*")
    assert names == [("anythingllm:key:" + digest).encode()]
    assert key.encode() not in b"".join(
        redis_server.cmd("HGETALL", names[0]))


def test_create_options(redis_server):
    now = time.time()
    info = create(redis_server, "--name", "bot", "--scopes",
                  "admin,chat,documents", "--workspaces", "sales,support",
                  "--rpm", "60", "--expires", "30d")
    rec = stored(redis_server, info["digest"])
    assert rec["scopes"] == "chat,documents,admin"
    assert rec["workspaces"] == "sales,support"
    assert rec["rpm"] == "60"
    assert abs(int(rec["expires"]) - (now + 30 * 86400)) < 60
    assert info["key"].startswith("sk-alm-")
    assert hashlib.sha256(info["key"].encode()).hexdigest() == \
        info["digest"]

    for spec, delta in (("12h", 12 * 3600), ("45m", 45 * 60)):
        i = create(redis_server, "--name", "x", "--expires", spec)
        assert abs(i["expires"] - (now + delta)) < 60
    ts = int(now) + 1000
    i = create(redis_server, "--name", "x", "--expires", str(ts))
    assert i["expires"] == ts
    i = create(redis_server, "--name", "x", "--expires", "0")
    assert i["expires"] == 0


OWN_KEY = "my-own-key-0123456789-abcdefghijkl"   # 34 characters


def test_create_with_given_key(redis_server):
    p = run(redis_server, "create", "--name", "imported",
            "--key-from-stdin", "--json", stdin=OWN_KEY + "\n")
    assert p.returncode == 0, p.stderr
    digest = hashlib.sha256(OWN_KEY.encode()).hexdigest()
    assert json.loads(p.stdout)["digest"] == digest
    assert stored(redis_server, digest)["name"] == "imported"
    p = run(redis_server, "create", "--name", "again", "--key-from-stdin",
            stdin=OWN_KEY + "\n")
    assert p.returncode == 1 and "already" in p.stderr


def test_given_key_of_32_characters_is_enough(redis_server):
    key = "k" * 31 + "Z"
    p = run(redis_server, "create", "--name", "n", "--key-from-stdin",
            "--json", stdin=key)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["digest"] == \
        hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize("key", ["my-own-key-123", "x" * 31])
def test_short_given_key_is_refused(redis_server, key):
    p = run(redis_server, "create", "--name", "weak", "--key-from-stdin",
            stdin=key + "\n")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "%d characters" % len(key) in p.stderr
    assert "32" in p.stderr and "--allow-weak-key" in p.stderr
    assert p.stdout == ""
    assert redis_server.cmd("DBSIZE") == 0
    # on purpose: stored, and the digest is what the gateway computes
    p = run(redis_server, "create", "--name", "weak", "--key-from-stdin",
            "--allow-weak-key", "--json", stdin=key + "\n")
    assert p.returncode == 0, p.stderr
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert json.loads(p.stdout)["digest"] == digest
    assert stored(redis_server, digest)["name"] == "weak"


@pytest.mark.parametrize("key", [
    "", "\n",
    OWN_KEY[:10] + " " + OWN_KEY[10:],
    OWN_KEY[:10] + "\t" + OWN_KEY[10:],
    OWN_KEY + "\r\r",
    OWN_KEY[:10] + "\x00" + OWN_KEY[10:],
    OWN_KEY[:10] + "\x1b[2J" + OWN_KEY[10:],
    OWN_KEY[:10] + "\x7f" + OWN_KEY[10:],
    OWN_KEY[:10] + "\u00a0" + OWN_KEY[10:],     # no-break space
    OWN_KEY[:10] + "\u200b" + OWN_KEY[10:],     # zero width space
    OWN_KEY[:10] + "\u202e" + OWN_KEY[10:],     # right-to-left override
    OWN_KEY[:10] + "\u00e9" + OWN_KEY[10:],     # not ASCII
])
def test_given_key_with_invisible_characters_is_refused(redis_server, key):
    for extra in ([], ["--allow-weak-key"]):
        p = run(redis_server, "create", "--name", "n", "--key-from-stdin",
                *extra, stdin=key + "\n")
        assert p.returncode == 2, (repr(key), p.stdout, p.stderr)
        assert "stdin" in p.stderr
        assert p.stdout == ""
    assert redis_server.cmd("DBSIZE") == 0


def test_given_key_that_is_not_utf8_is_refused(redis_server):
    p = subprocess.run(
        [TOOL, "--redis", redis_server.addr, "create", "--name", "n",
         "--key-from-stdin"], input=OWN_KEY.encode() + b"\xff\xfe\n",
        capture_output=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert b"Traceback" not in p.stderr and b"stdin" in p.stderr
    assert redis_server.cmd("DBSIZE") == 0


def test_allow_weak_key_only_with_a_given_key():
    p = run(None, "create", "--name", "n", "--allow-weak-key",
            addr="127.0.0.1:1")
    assert p.returncode == 2 and "--key-from-stdin" in p.stderr


@pytest.mark.parametrize("args, words", [
    (["--scopes", "chat,write"], "unknown scope"),
    (["--scopes", ""], "--scopes"),
    (["--expires", "soon"], "--expires"),
    (["--expires", "5y"], "--expires"),
    (["--expires", "1000"], "past"),
    (["--expires", "99999999999999"], "9999"),
    (["--expires", "99999999999d"], "9999"),
    (["--workspaces", "sales,../x"], "slug"),
    (["--workspaces", "a b"], "slug"),
    (["--workspaces", "*,sales"], "'*'"),
    (["--workspaces", "sales,,x"], "--workspaces"),
    (["--rpm", "-1"], "--rpm"),
    (["--rpm", "ten"], "--rpm"),
])
def test_create_bad_arguments(redis_server, args, words):
    p = run(redis_server, "create", "--name", "n", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert words in p.stderr
    assert p.stdout == ""
    assert redis_server.cmd("DBSIZE") == 0


def test_bad_arguments_need_no_redis():
    p = run(None, "create", "--name", "n", "--scopes", "nope",
            addr="127.0.0.1:%d" % free_port())
    assert p.returncode == 2 and "unknown scope" in p.stderr
    p = run(None, "create", addr="127.0.0.1:1")
    assert p.returncode == 2 and "--name" in p.stderr
    p = run(None, "frobnicate", addr="127.0.0.1:1")
    assert p.returncode == 2
    p = run(None, "list", addr="127.0.0.1:99999")
    assert p.returncode == 2 and "bad Redis address" in p.stderr


def test_unreachable_redis():
    port = free_port()
    p = run(None, "list", addr="127.0.0.1:%d" % port)
    assert p.returncode == 1
    assert p.stderr.strip() == ("anythingllm-keys: cannot reach Redis at "
                                "127.0.0.1:%d: Connection refused" % port)
    p = run(None, "create", "--name", "x", addr="unix:/nonexistent/sock")
    assert p.returncode == 1 and "cannot reach Redis at unix:" in p.stderr


def test_list(redis_server):
    a = create(redis_server, "--name", "alpha", "--rpm", "5")
    b = create(redis_server, "--name", "beta", "--workspaces", "sales",
               "--expires", "1d")
    redis_server.cmd("SET", "anythingllm:other", "x")
    redis_server.cmd("HSET", "otherprefix:key:" + "0" * 64, "name", "z")
    p = run(redis_server, "list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "SCOPES", "WORKSPACES", "RPM",
                                "EXPIRES", "DISABLED"]
    assert len(lines) == 3
    assert lines[1].startswith(a["id"]) and "alpha" in lines[1]
    assert lines[2].startswith(b["id"]) and "sales" in lines[2]
    assert "never" in lines[1] and "UTC" in lines[2]
    assert a["key"] not in p.stdout and b["key"] not in p.stdout
    rows = json.loads(run(redis_server, "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["alpha", "beta"]
    assert rows[0]["rpm"] == 5 and "key" not in rows[0]


def test_list_many_keys_uses_scan(redis_server):
    for i in range(250):
        redis_server.add_key("k%d" % i, name="n%03d" % i)
    rows = json.loads(run(redis_server, "list", "--json").stdout)
    assert len(rows) == 250


def test_show_by_key_id_and_digest(redis_server):
    info = create(redis_server, "--name", "show me", "--scopes", "read")
    for ref in (info["key"], info["id"], info["digest"],
                info["digest"][:8].upper()):
        p = run(redis_server, "show", ref)
        assert p.returncode == 0, (ref, p.stderr)
        assert "name:       show me" in p.stdout
        assert "scopes:     read" in p.stdout
        assert info["digest"] in p.stdout
    p = run(redis_server, "show", "no-such-key")
    assert p.returncode == 1 and "no key matches" in p.stderr


def test_ambiguous_id(redis_server):
    redis_server.cmd("HSET", "anythingllm:key:abcdef" + "1" * 58, "name", "a")
    redis_server.cmd("HSET", "anythingllm:key:abcdef" + "2" * 58, "name", "b")
    p = run(redis_server, "show", "abcdef")
    assert p.returncode == 2 and "matches 2 keys" in p.stderr
    p = run(redis_server, "show", "abcdef1")
    assert p.returncode == 0 and "name:       a" in p.stdout
    # fewer than six digits is not an id: taken as a key, it matches none
    p = run(redis_server, "show", "abcde")
    assert p.returncode == 1


def test_revoke_deletes_and_publishes(redis_server):
    info = create(redis_server, "--name", "gone")
    sub = redis_server.subscribe("anythingllm:revocations")
    try:
        p = run(redis_server, "revoke", info["id"])
        assert p.returncode == 0, p.stderr
        assert info["id"] in p.stdout
        msg = sub.reply()
        assert msg == [b"message", b"anythingllm:revocations",
                       info["digest"].encode()]
    finally:
        sub.close()
    assert redis_server.cmd("EXISTS",
                            "anythingllm:key:" + info["digest"]) == 0
    p = run(redis_server, "revoke", info["key"])
    assert p.returncode == 1


def test_disable_enable(redis_server):
    info = create(redis_server, "--name", "toggle")
    sub = redis_server.subscribe("anythingllm:revocations")
    try:
        assert run(redis_server, "disable", info["key"]).returncode == 0
        assert stored(redis_server, info["digest"])["disabled"] == "1"
        assert sub.reply()[2] == info["digest"].encode()
        rows = json.loads(run(redis_server, "list", "--json").stdout)
        assert rows[0]["status"] == "disabled"
        assert run(redis_server, "enable", info["id"]).returncode == 0
        assert stored(redis_server, info["digest"])["disabled"] == "0"
        assert sub.reply()[2] == info["digest"].encode()
    finally:
        sub.close()
    assert run(redis_server, "disable", "ffffffffffff").returncode == 1


def test_set(redis_server):
    info = create(redis_server, "--name", "change me")
    p = run(redis_server, "set", info["id"], "--rpm", "7", "--scopes",
            "chat", "--workspaces", "engineering")
    assert p.returncode == 0, p.stderr
    rec = stored(redis_server, info["digest"])
    assert (rec["rpm"], rec["scopes"], rec["workspaces"]) == (
        "7", "chat", "engineering")
    assert run(redis_server, "set", info["id"]).returncode == 2
    assert run(redis_server, "set", info["id"], "--scopes",
               "x").returncode == 2


def test_prefix_db_and_env(redis_server):
    p = run(redis_server, "--prefix", "gw2:", "--db", "3", "create",
            "--name", "other", "--json")
    assert p.returncode == 0, p.stderr
    digest = json.loads(p.stdout)["digest"]
    redis_server.cmd("SELECT", "3")
    try:
        assert stored(redis_server, digest, prefix="gw2:")["name"] == "other"
    finally:
        redis_server.cmd("SELECT", "0")
    # options after the command, and the environment
    p = run(None, "list", "--json", env={
        "ANYTHINGLLM_REDIS": redis_server.addr, "ANYTHINGLLM_REDIS_DB": "3",
        "ANYTHINGLLM_PREFIX": "gw2:"})
    assert [r["name"] for r in json.loads(p.stdout)] == ["other"]
    p = run(None, "list", "--json", "--prefix", "gw2:", "--db", "3",
            addr=redis_server.addr)
    assert [r["name"] for r in json.loads(p.stdout)] == ["other"]
    assert json.loads(run(redis_server, "list", "--json").stdout) == []


def test_unix_socket_and_password(redis_server):
    info = create(redis_server, "--name", "u")
    p = run(None, "show", info["id"],
            addr="unix:" + redis_server.unix_path)
    assert p.returncode == 0, p.stderr
    redis_server.cmd("CONFIG", "SET", "requirepass", "s3cret")
    try:
        p = run(redis_server, "list")
        assert p.returncode == 1 and "NOAUTH" in p.stderr
        p = run(redis_server, "--password", "wrong", "list")
        assert p.returncode == 1 and "refused" in p.stderr
        p = run(redis_server, "--password", "s3cret", "list")
        assert p.returncode == 0 and "u" in p.stdout
        p = run(None, "list", env={"ANYTHINGLLM_REDIS": redis_server.addr,
                                   "ANYTHINGLLM_REDIS_PASSWORD": "s3cret"})
        assert p.returncode == 0
    finally:
        redis_server.cmd("CONFIG", "SET", "requirepass", "")


# ---------------------------------------------------------------------------
# names: what logs and lists show must be what it looks like


@pytest.mark.parametrize("name", [
    "admin\u202e",                    # right-to-left override (bidi)
    "team \u2067a\u2069",             # right-to-left isolate ... pop
    "ev\u200bil",                     # zero width space
    "a\u200db",                       # zero width joiner
    "\ufeffbom",                      # byte order mark
    "x\u00ady",                       # soft hyphen
    "tag\U000e0041",                  # tag character
    "line\u2028two",                  # line separator
    "para\u2029two",                  # paragraph separator
    "bell\x07",                       # C0 control
    "csi\x9b31m",                     # C1 control
    "del\x7f",
    "tab\tname",
    "new\nline",
])
def test_name_with_invisible_characters_is_refused(redis_server, name):
    p = run(redis_server, "create", "--name", name)
    assert p.returncode == 2, (repr(name), p.stdout, p.stderr)
    assert "--name" in p.stderr and "U+" in p.stderr
    assert redis_server.cmd("DBSIZE") == 0
    info = create(redis_server, "--name", "plain")
    p = run(redis_server, "set", info["id"], "--name", name)
    assert p.returncode == 2, (repr(name), p.stdout, p.stderr)
    assert stored(redis_server, info["digest"])["name"] == "plain"
    redis_server.cmd("FLUSHALL")


def test_name_not_utf8_is_refused(redis_server):
    p = subprocess.run([TOOL.encode(), b"--redis", redis_server.addr.encode(),
                        b"create", b"--name", b"caf\xe9"],
                       capture_output=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert b"Traceback" not in p.stderr and b"--name" in p.stderr
    assert redis_server.cmd("DBSIZE") == 0


def test_visible_unicode_names_are_kept(redis_server):
    for name in ("équipe café", "営業 チーム", "team 🚀", "שיווק"):
        info = create(redis_server, "--name", name)
        assert stored(redis_server, info["digest"])["name"] == name


def test_stored_invisible_characters_are_shown_escaped(redis_server):
    # a record written by something else than this tool
    digest = redis_server.add_key("k", name="nice\u202eevil\x1b[2J")
    for args in (["list"], ["show", digest]):
        p = run(redis_server, *args)
        assert p.returncode == 0, p.stderr
        assert "\u202e" not in p.stdout and "\x1b" not in p.stdout
        assert "nice\\u202eevil\\x1b[2J" in p.stdout
    p = run(redis_server, "show", "--json", digest)
    assert json.loads(p.stdout)["name"] == "nice\u202eevil\x1b[2J"
    assert "\u202e" not in p.stdout


@pytest.mark.parametrize("args", [["--rpm", "\u00b2"], ["--rpm", "\u0663"],
                                  ["--expires", "\u00b2"],
                                  ["--expires", "\u0663d"]])
def test_non_ascii_digits_are_refused(redis_server, args):
    p = run(redis_server, "create", "--name", "n", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert args[0] in p.stderr
    assert redis_server.cmd("DBSIZE") == 0


# ---------------------------------------------------------------------------
# no secret on the command line: keys on stdin, the password in the
# environment (other users see a process's arguments in ps)


def test_key_reference_from_stdin(redis_server):
    info = create(redis_server, "--name", "piped", "--scopes", "read")
    for args in (["show", "-"], ["show", "--key-from-stdin"]):
        p = run(redis_server, *args, stdin=info["key"] + "\n")
        assert p.returncode == 0, (args, p.stderr)
        assert "name:       piped" in p.stdout
        assert info["key"] not in p.stdout
    p = run(redis_server, "set", "-", "--rpm", "9", stdin=info["key"])
    assert p.returncode == 0, p.stderr
    assert stored(redis_server, info["digest"])["rpm"] == "9"
    p = run(redis_server, "disable", "--key-from-stdin",
            stdin=info["key"] + "\r\n")
    assert p.returncode == 0, p.stderr
    assert stored(redis_server, info["digest"])["disabled"] == "1"
    p = run(redis_server, "enable", "-", stdin=info["key"] + "\n")
    assert p.returncode == 0, p.stderr
    assert stored(redis_server, info["digest"])["disabled"] == "0"
    p = run(redis_server, "revoke", "-", stdin=info["key"] + "\n")
    assert p.returncode == 0, p.stderr
    assert info["id"] in p.stdout
    assert redis_server.cmd("DBSIZE") == 0
    p = run(redis_server, "revoke", "-", stdin=info["key"] + "\n")
    assert p.returncode == 1 and "no key matches" in p.stderr
    assert info["key"] not in p.stderr


def test_key_reference_from_stdin_bad_use(redis_server):
    info = create(redis_server, "--name", "x")
    p = run(redis_server, "show", "--key-from-stdin", info["id"],
            stdin=info["key"] + "\n")
    assert p.returncode == 2 and "not both" in p.stderr
    p = run(redis_server, "show", "-", stdin="")
    assert p.returncode == 2 and "stdin" in p.stderr
    p = run(redis_server, "revoke", "-", stdin="\n" + info["key"] + "\n")
    assert p.returncode == 2 and "stdin" in p.stderr
    p = run(redis_server, "show")
    assert p.returncode == 2
    assert redis_server.cmd("EXISTS", "anythingllm:key:" + info["digest"])


def test_password_from_rediscli_auth(redis_server):
    create(redis_server, "--name", "behind a password")
    redis_server.cmd("CONFIG", "SET", "requirepass", "s3cret")
    try:
        p = run(redis_server, "list", env={"REDISCLI_AUTH": "s3cret"})
        assert p.returncode == 0, p.stderr
        assert "behind a password" in p.stdout
        p = run(redis_server, "create", "--name", "new", "--json",
                env={"REDISCLI_AUTH": "s3cret"})
        assert p.returncode == 0, p.stderr
        p = run(redis_server, "list", env={"REDISCLI_AUTH": "wrong"})
        assert p.returncode == 1 and "refused" in p.stderr
        assert "wrong" not in p.stderr
        # the command line wins, as with redis-cli
        p = run(redis_server, "--password", "s3cret", "list",
                env={"REDISCLI_AUTH": "wrong"})
        assert p.returncode == 0, p.stderr
        # so does the tool's own variable
        p = run(redis_server, "list",
                env={"REDISCLI_AUTH": "wrong",
                     "ANYTHINGLLM_REDIS_PASSWORD": "s3cret"})
        assert p.returncode == 0, p.stderr
    finally:
        redis_server.cmd("CONFIG", "SET", "requirepass", "")


def test_password_and_user_from_the_environment_with_acl(redis_server):
    redis_server.cmd("ACL", "SETUSER", "keys", "on", ">k3ys-pw", "~*",
                     "&*", "+@all")
    p = run(redis_server, "--user", "keys", "create", "--name", "acl",
            "--json", env={"REDISCLI_AUTH": "k3ys-pw"})
    assert p.returncode == 0, p.stderr
    p = run(redis_server, "list", env={"REDISCLI_AUTH": "k3ys-pw",
                                       "ANYTHINGLLM_REDIS_USER": "keys"})
    assert p.returncode == 0 and "acl" in p.stdout
    p = run(redis_server, "--user", "keys", "list",
            env={"REDISCLI_AUTH": "nope"})
    assert p.returncode == 1 and "refused" in p.stderr


# ---------------------------------------------------------------------------
# changes racing a revoke: a revoked key stays revoked, whole or not at all


WRITES = {b"HSET", b"HMSET", b"HSETNX", b"DEL", b"UNLINK", b"EVAL",
          b"EVALSHA", b"EXEC"}


def resp_command(buf):
    """(length, upper-case name) of the first whole RESP command in buf,
    or (None, None) while it is incomplete."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None, None
    assert buf[:1] == b"*", buf[:40]
    count, pos, name = int(buf[1:end]), end + 2, None
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None, None
        n = int(buf[pos + 1:end])
        if len(buf) < end + 2 + n + 2:
            return None, None
        if name is None:
            name = buf[end + 2:end + 2 + n].upper()
        pos = end + 2 + n + 2
    return pos, name


class RedisProxy(TcpProxy):
    """A TCP proxy in front of Redis that reads the tool's commands one by
    one.  hold(): the next write command (in WRITES) waits until
    release(), so that something else can run in between; delay: seconds
    every command waits, which widens the gaps between them; count: the
    commands passed on so far."""

    def __init__(self, redis, delay=0.0):
        self.delay = delay
        self.holding = False
        self.count = 0
        self.held = threading.Event()
        self.go = threading.Event()
        super().__init__((redis.host, redis.port))

    def hold(self):
        self.held.clear()
        self.go.clear()
        self.holding = True

    def release(self):
        self.go.set()

    def closing(self):
        self.go.set()

    def forward(self, c, s):
        buf = b""
        while True:
            d = c.recv(65536)
            if not d:
                break
            buf += d
            while True:
                n, name = resp_command(buf)
                if n is None:
                    break
                with self.lock:
                    hold = self.holding and name in WRITES
                    if hold:
                        self.holding = False
                if hold:
                    self.held.set()
                    self.go.wait(30)
                if self.delay:
                    time.sleep(self.delay)
                s.sendall(buf[:n])
                buf = buf[n:]
                with self.lock:
                    self.count += 1


@pytest.fixture
def proxy(redis_server):
    p = RedisProxy(redis_server)
    yield p
    assert p.close() == [], "threads of the proxy outlive it"


def popen_tool(addr, *args, stdin=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("ANYTHINGLLM_") and k != "REDISCLI_AUTH"}
    p = subprocess.Popen([TOOL, "--redis", addr] + list(args),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=e)
    if stdin is not None:
        p.stdin.write(stdin)
    p.stdin.close()
    p.stdin = None      # for communicate()
    return p


def finish(p):
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    return p.returncode, out, err


@pytest.mark.parametrize("change", [["disable"], ["enable"],
                                    ["set", "--rpm", "5"],
                                    ["set", "--name", "renamed"]])
def test_change_that_loses_to_a_revoke_recreates_nothing(
        redis_server, proxy, change):
    info = create(redis_server, "--name", "doomed")
    name = "anythingllm:key:" + info["digest"]
    # the change has found the key and is about to write ...
    proxy.hold()
    p = popen_tool(proxy.addr, change[0], info["id"], *change[1:])
    assert proxy.held.wait(30), finish(p)
    # ... when the key is revoked
    r = run(redis_server, "revoke", info["id"])
    assert r.returncode == 0, r.stderr
    proxy.release()
    rc, out, err = finish(p)
    assert redis_server.cmd("EXISTS", name) == 0, \
        "revoked key came back: %r" % redis_server.hgetall(name)
    assert rc == 1 and "no key matches" in err, (rc, out, err)


def test_create_that_loses_to_another_create_overwrites_nothing(
        redis_server, proxy):
    proxy.hold()
    p = popen_tool(proxy.addr, "create", "--name", "first",
                   "--key-from-stdin", stdin=OWN_KEY + "\n")
    assert proxy.held.wait(30), finish(p)
    q = run(redis_server, "create", "--name", "second", "--key-from-stdin",
            stdin=OWN_KEY + "\n")
    assert q.returncode == 0, q.stderr
    proxy.release()
    rc, out, err = finish(p)
    digest = hashlib.sha256(OWN_KEY.encode()).hexdigest()
    assert stored(redis_server, digest)["name"] == "second"
    assert rc == 1 and "already" in err, (rc, out, err)
    assert OWN_KEY not in out


def test_many_changes_racing_revokes(redis_server):
    # Four changers at once, their every command slowed down; a revoke,
    # held just before its delete, is let go after a random number of the
    # changers' commands: it lands anywhere between their lookups and
    # their writes.
    slow = RedisProxy(redis_server, delay=0.02)
    gate = RedisProxy(redis_server)
    rng = random.Random(7)
    try:
        for round in range(8):
            info = create(redis_server, "--name", "round %d" % round)
            name = "anythingllm:key:" + info["digest"]
            gate.hold()
            revoker = popen_tool(gate.addr, "revoke", info["id"])
            assert gate.held.wait(30), finish(revoker)
            start = slow.count
            changers = [
                popen_tool(slow.addr, "disable", info["id"]),
                popen_tool(slow.addr, "set", info["id"], "--rpm", "3"),
                popen_tool(slow.addr, "enable", "-", stdin=info["key"]),
                popen_tool(slow.addr, "set", info["id"], "--scopes", "chat",
                           "--workspaces", "sales"),
            ]
            k = rng.randint(1, 12)
            deadline = time.monotonic() + 60
            while slow.count < start + k and \
                    any(p.poll() is None for p in changers):
                assert time.monotonic() < deadline
                time.sleep(0.002)
            gate.release()
            rc, out, err = finish(revoker)
            assert rc == 0, err
            codes = [finish(p)[0] for p in changers]
            assert set(codes) <= {0, 1}, codes
            assert redis_server.cmd("EXISTS", name) == 0, \
                "round %d: revoked key came back: %r (changers: %r)" % (
                    round, redis_server.hgetall(name), codes)
    finally:
        slow.close()
        gate.close()
    assert redis_server.cmd("DBSIZE") == 0


def test_key_from_a_terminal_is_not_echoed(redis_server):
    info = create(redis_server, "--name", "typed")
    master, slave = pty.openpty()
    tty = os.ttyname(slave)

    def own_terminal():
        # a session of its own whose controlling terminal is the pty
        os.setsid()
        os.close(os.open(tty, os.O_RDWR))

    e = {k: v for k, v in os.environ.items()
         if not k.startswith("ANYTHINGLLM_") and k != "REDISCLI_AUTH"}
    p = subprocess.Popen([TOOL, "--redis", redis_server.addr, "disable",
                          "-"], stdin=slave, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=e,
                         preexec_fn=own_terminal)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"key: " not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        os.write(master, info["key"].encode() + b"\n")
        out, err = p.communicate(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    finally:
        os.close(master)
    assert p.returncode == 0, err
    assert stored(redis_server, info["digest"])["disabled"] == "1"
    assert info["key"].encode() not in seen
    assert info["key"] not in out + err


def put_usage(redis, digest, day, requests, prompt, completion,
              prefix="anythingllm:"):
    redis.cmd("HSET", "%susage:%s:%s" % (prefix, digest, day),
              "requests", requests, "prompt_tokens", prompt,
              "completion_tokens", completion)


def test_tpm_tpd_options(redis_server):
    info = create(redis_server, "--name", "tok", "--tpm", "1000",
                  "--tpd", "50000")
    rec = stored(redis_server, info["digest"])
    assert (rec["tpm"], rec["tpd"]) == ("1000", "50000")
    assert (info["tpm"], info["tpd"]) == (1000, 50000)
    p = run(redis_server, "set", info["id"], "--tpm", "0", "--tpd", "7")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^tpm:\s+0 \(no limit\)$", p.stdout, re.M)
    assert re.search(r"^tpd:\s+7$", p.stdout, re.M)
    rec = stored(redis_server, info["digest"])
    assert (rec["tpm"], rec["tpd"]) == ("0", "7")
    for bad in ("-1", "x", "1.5", "٣"):
        assert run(redis_server, "set", info["id"], "--tpm",
                   bad).returncode == 2
        assert run(redis_server, "create", "--name", "b", "--tpd",
                   bad).returncode == 2


def test_usage(redis_server):
    a = create(redis_server, "--name", "alpha")
    b = create(redis_server, "--name", "beta")
    now = time.time()
    today = time.strftime("%Y%m%d", time.gmtime(now))
    yesterday = time.strftime("%Y%m%d", time.gmtime(now - 86400))
    old = time.strftime("%Y%m%d", time.gmtime(now - 10 * 86400))
    put_usage(redis_server, a["digest"], today, 3, 100, 20)
    put_usage(redis_server, a["digest"], yesterday, 1, 7, 2)
    put_usage(redis_server, a["digest"], old, 9, 900, 90)
    put_usage(redis_server, b["digest"], today, 2, 10, 5)

    p = run(redis_server, "usage", "--json")
    assert p.returncode == 0, p.stderr
    u = json.loads(p.stdout)
    assert u["days"] == 7
    assert [k["name"] for k in u["keys"]] == ["alpha", "beta"]
    alpha = u["keys"][0]
    assert alpha["id"] == a["id"]
    assert [d["date"] for d in alpha["days"]] == [
        "%s-%s-%s" % (d[:4], d[4:6], d[6:]) for d in (yesterday, today)]
    assert alpha["days"][1] == {"date": alpha["days"][1]["date"],
                                "requests": 3, "prompt_tokens": 100,
                                "completion_tokens": 20,
                                "total_tokens": 120}
    assert alpha["total"] == {"requests": 4, "prompt_tokens": 107,
                              "completion_tokens": 22, "total_tokens": 129}
    assert u["total"] == {"requests": 6, "prompt_tokens": 117,
                          "completion_tokens": 27, "total_tokens": 144}

    # one key, by id; the older day within --days
    p = run(redis_server, "usage", a["id"], "--days", "11", "--json")
    u = json.loads(p.stdout)
    assert [k["id"] for k in u["keys"]] == [a["id"]]
    assert u["total"]["requests"] == 13

    p = run(redis_server, "usage", "--days", "1")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^%s  alpha$" % a["id"], p.stdout, re.M)
    assert re.search(r"^  total\s+3\s+100\s+20\s+120$", p.stdout, re.M)
    assert "all keys, last 1 day: 5 requests, 110 prompt + 25 completion " \
        "= 135 tokens" in p.stdout

    # a revoked key's counters stay readable by its digest
    assert run(redis_server, "revoke", a["id"]).returncode == 0
    u = json.loads(run(redis_server, "usage", a["digest"], "--json").stdout)
    assert u["keys"][0]["total"]["requests"] == 4
    assert u["keys"][0]["name"] == ""

    assert run(redis_server, "usage", "--days", "0").returncode == 2
    assert run(redis_server, "usage", "--days", "x").returncode == 2
    assert run(redis_server, "usage", "ffffff").returncode == 1
