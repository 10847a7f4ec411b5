"""A Redis Sentinel group of real processes: a primary, a replica and
three sentinels (redis-server --sentinel), each on a free port in its own
folder, with short failure detection so that a failover takes about a
second.

    g = SentinelGroup(tmpdir); g.start()
    g.sentinel_list      "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
    g.primary()          the RedisServer the sentinels name now
    g.kill_primary()     SIGKILL; returns the killed RedisServer
    g.wait_promoted(old) polls until the sentinels name another server
    g.stop()

FakeSentinel(answer) is not a sentinel: it takes any connection and
answers every command with the raw bytes given, to test what the
gateway does with answers a real sentinel would not send.
"""

import os
import re
import socket
import subprocess
import threading
import time

from lib import helpers, resp
from lib.processes import REDIS_BIN, RedisServer, Service, free_port


MASTER = "alm-primary"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000


class DataServer(RedisServer):
    """A RedisServer that may start as a replica, and that keeps its port
    across a restart."""

    def __init__(self, tmpdir, replica_of=None, extra=()):
        super().__init__(tmpdir)
        self.replica_of = replica_of
        self.extra = list(extra)

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [REDIS_BIN, "--save", "", "--appendonly", "no",
               "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", self.dir, "--logfile", self.log_path,
               "--daemonize", "no"] + self.extra
        if self.replica_of is not None:
            cmd += ["--replicaof"] + self.replica_of.split(":")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self.dir)
        helpers.wait_until(self._answers, 10,
                           message="redis-server did not answer PING")

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError("redis-server exited: %s" % self.log())
        try:
            c = resp.connect(self.host, self.port, timeout=1)
        except resp.Failure:
            return False
        try:
            return c.cmd("PING") == "PONG"
        except (resp.Failure, resp.RedisError):
            return False
        finally:
            c.close()

    def role(self):
        try:
            return self.cmd("ROLE")[0].decode()
        except (resp.Failure, resp.RedisError):
            return None

    def info(self, section):
        text = self.cmd("INFO", section)
        if isinstance(text, bytes):
            text = text.decode()
        out = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out


class Sentinel(Service):
    def __init__(self, tmpdir, primary_addr, auth_user=None,
                 auth_pass=None):
        super().__init__(tmpdir, "sentinel.log", free_port())
        self.conf_path = os.path.join(self.dir, "sentinel.conf")
        host, port = primary_addr.split(":")
        lines = [
            "port %d" % self.port,
            "bind 127.0.0.1",
            "daemonize no",
            "dir %s" % self.dir,
            "logfile %s" % self.log_path,
            "sentinel monitor %s %s %s 2" % (MASTER, host, port),
            "sentinel down-after-milliseconds %s %d" % (MASTER,
                                                        DOWN_AFTER_MS),
            "sentinel failover-timeout %s %d" % (MASTER,
                                                 FAILOVER_TIMEOUT_MS),
            "sentinel parallel-syncs %s 1" % MASTER,
        ]
        if auth_user:
            lines.append("sentinel auth-user %s %s" % (MASTER, auth_user))
        if auth_pass:
            lines.append("sentinel auth-pass %s %s" % (MASTER, auth_pass))
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [REDIS_BIN, self.conf_path, "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.dir)
        helpers.wait_until(self._answers, 10,
                           message="sentinel did not answer PING")

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError("sentinel exited: %s" % self.log())
        try:
            c = resp.connect(self.host, self.port, timeout=1)
        except resp.Failure:
            return False
        try:
            return c.cmd("PING") == "PONG"
        except (resp.Failure, resp.RedisError):
            return False
        finally:
            c.close()

    def cmd(self, *args):
        c = resp.connect(self.host, self.port, timeout=2)
        try:
            return c.cmd(*args)
        finally:
            c.close()

    def master_addr(self):
        try:
            r = self.cmd("SENTINEL", "get-master-addr-by-name", MASTER)
        except (resp.Failure, resp.RedisError):
            return None
        if not r:
            return None
        return "%s:%s" % (r[0].decode(), r[1].decode())

    def running(self):
        return self.proc is not None and self.proc.poll() is None


def pairs(reply):
    return [{reply_item[i].decode(): reply_item[i + 1].decode()
             for i in range(0, len(reply_item), 2)} for reply_item in reply]


class SentinelGroup:
    def __init__(self, tmpdir, auth_user=None, auth_pass=None):
        self.dir = str(tmpdir)
        d = lambda name: _mkdir(os.path.join(self.dir, name))  # noqa: E731
        self.servers = [DataServer(d("a"))]
        self.servers.append(DataServer(d("b"),
                                       replica_of=self.servers[0].addr))
        self.sentinels = [Sentinel(d("s%d" % i), self.servers[0].addr,
                                   auth_user, auth_pass)
                          for i in range(3)]

    @property
    def sentinel_list(self):
        return ",".join(s.addr for s in self.sentinels)

    def start(self):
        for s in self.servers + self.sentinels:
            s.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout=20):
        """Until every sentinel knows the replica and the two other
        sentinels: a failover can be agreed on then."""
        def ready():
            for s in self.sentinels:
                if not s.running():
                    continue
                try:
                    reps = pairs(s.cmd("SENTINEL", "replicas", MASTER))
                    sens = pairs(s.cmd("SENTINEL", "sentinels", MASTER))
                except (resp.Failure, resp.RedisError):
                    return False
                if not any("s_down" not in r["flags"] and
                           r.get("master-link-status") == "ok"
                           for r in reps):
                    return False
                if len(sens) < 2:
                    return False
            return True
        helpers.wait_until(ready, timeout, interval=0.1,
                           message="sentinels did not see the group")

    def stop(self):
        for s in self.sentinels + self.servers:
            s.stop()

    def by_addr(self, addr):
        for s in self.servers:
            if s.addr == addr:
                return s
        return None

    def master_addr(self):
        for s in self.sentinels:
            if s.running():
                a = s.master_addr()
                if a:
                    return a
        return None

    def primary(self):
        return self.by_addr(self.master_addr())

    def replica(self):
        p = self.primary()
        return [s for s in self.servers if s is not p][0]

    def sync(self):
        """Waits until the replica holds every write of the primary."""
        n = self.primary().cmd("WAIT", "1", "5000")
        assert n >= 1, "the replica did not acknowledge the writes"

    def kill_primary(self):
        p = self.primary()
        p.kill()
        return p

    def wait_promoted(self, old, timeout=15):
        """Until every running sentinel names a primary other than old
        and that server says it is one; returns (the new primary, when
        seen)."""
        def promoted():
            addrs = {s.master_addr() for s in self.sentinels
                     if s.running()}
            if len(addrs) != 1:
                return None
            addr = addrs.pop()
            if addr is None or addr == old.addr:
                return None
            new = self.by_addr(addr)
            return new if new.role() == "master" else None
        new = helpers.wait_until(promoted, timeout, interval=0.02,
                                 message="no replica was promoted")
        return new, time.monotonic()


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def acl_rules(readme_text, user):
    """The words of the README's "ACL SETUSER <user> ..." rule (a shell
    line that may go on over backslashed lines), for ACL SETUSER."""
    text = readme_text.replace("\\\n", " ")
    m = re.search(r"^\s*(?:redis-cli[^\n]*?\s)?ACL SETUSER %s (.*)$"
                  % re.escape(user), text, re.M)
    assert m, "README has no ACL SETUSER rule for %s" % user
    return m.group(1).split()


class FakeSentinel(threading.Thread):
    """Listens on a free port; reads commands (RESP arrays of bulk
    strings) and answers each with "answer", raw bytes.  asked counts
    the SENTINEL commands, of every connection (each served by a thread
    of its own)."""

    def __init__(self, answer):
        super().__init__(daemon=True)
        self.answer = answer
        self._asked = 0
        self._asked_lock = threading.Lock()
        self.port = free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.closed = False

    @property
    def asked(self):
        with self._asked_lock:
            return self._asked

    def run(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while not self.closed:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while True:
                    cmd, buf = _command(buf)
                    if cmd is None:
                        break
                    if cmd and cmd[0].upper() == b"SENTINEL":
                        with self._asked_lock:
                            self._asked += 1
                    try:
                        conn.sendall(self.answer)
                    except OSError:
                        return

    def stop(self):
        self.closed = True
        self.sock.close()


def _command(buf):
    """(the command's words, the rest) or (None, buf) when incomplete."""
    if not buf.startswith(b"*"):
        end = buf.find(b"\r\n")
        if end < 0:
            return None, buf
        return buf[:end].split(), buf[end + 2:]
    end = buf.find(b"\r\n")
    if end < 0:
        return None, buf
    words, at = [], end + 2
    for _ in range(int(buf[1:end])):
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None, buf
        size = int(buf[at + 1:end])
        if len(buf) < end + 2 + size + 2:
            return None, buf
        words.append(buf[end + 2:end + 2 + size])
        at = end + 2 + size + 2
    return words, buf[at:]
