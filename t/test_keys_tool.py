"""scripts/anythingllm-keys against a real Redis."""

import hashlib
import json
import os
import re
import subprocess
import time

import pytest

from conftest import REPO, free_port

TOOL = os.path.join(REPO, "scripts", "anythingllm-keys")


def run(redis, *args, stdin=None, env=None, addr=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("ANYTHINGLLM_")}
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


def test_create_with_given_key(redis_server):
    p = run(redis_server, "create", "--name", "imported",
            "--key-from-stdin", "--json", stdin="my-own-key-123\n")
    assert p.returncode == 0, p.stderr
    digest = hashlib.sha256(b"my-own-key-123").hexdigest()
    assert json.loads(p.stdout)["digest"] == digest
    assert stored(redis_server, digest)["name"] == "imported"
    p = run(redis_server, "create", "--name", "again", "--key-from-stdin",
            stdin="my-own-key-123\n")
    assert p.returncode == 1 and "already" in p.stderr


@pytest.mark.parametrize("args, words", [
    (["--scopes", "chat,write"], "unknown scope"),
    (["--scopes", ""], "--scopes"),
    (["--expires", "soon"], "--expires"),
    (["--expires", "5y"], "--expires"),
    (["--expires", "1000"], "past"),
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
