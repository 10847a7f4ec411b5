"""`make run`: a newcomer's first round trip, through dev/run.py."""

import contextlib
import os
import re
import signal
import stat
import subprocess
import time

from lib import helpers
from lib.paths import PYTHON, RUN_SCRIPT
from lib.processes import free_port, port_open


@contextlib.contextmanager
def make_run(tmp_path, **popen):
    """dev/run.py on free ports; yields (its output so far, gateway
    port, backend port, run directory)."""
    gw, be, rd = free_port(), free_port(), free_port()
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, GATEWAY_LISTEN="127.0.0.1:%d" % gw,
               ANYTHINGLLM_URL="http://127.0.0.1:%d" % be,
               REDIS_PORT=str(rd), ALM_RUN_DIR=run_dir)
    env.pop("ANYTHINGLLM_API_KEY", None)
    out = open(tmp_path / "out.txt", "w+")
    p = subprocess.Popen([PYTHON, RUN_SCRIPT],
                         stdout=out, stderr=subprocess.STDOUT, env=env,
                         **popen)
    try:
        text = ""
        deadline = time.time() + 30
        while "Ctrl-C stops everything" not in text:
            assert p.poll() is None, text
            assert time.time() < deadline, text
            time.sleep(0.1)
            out.seek(0)
            text = out.read()
        yield text, gw, be, run_dir
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(20)

    out.seek(0)
    assert "run: stopped" in out.read()
    # everything it started is gone
    for port in (gw, be, rd):
        assert not port_open(port)


def test_make_run_gives_a_working_gateway(tmp_path):
    with make_run(tmp_path) as (text, gw, be, _):
        assert "stand-in backend" in text
        key = re.search(r"^    (sk-alm-\S+)$", text, re.M).group(1)
        assert "curl -H \"Authorization: Bearer %s\"" % key in text

        base = "http://127.0.0.1:%d" % gw
        r = helpers.request("GET", base + "/api/v1/workspaces",
                            headers={"Authorization": "Bearer " + key})
        assert r.status == 200, r.text
        assert r.json()["workspaces"]

        # the backend saw AnythingLLM's own key, never the client's
        seen = helpers.request("GET", "http://127.0.0.1:%d/__test/requests"
                               % be).json()
        got = [q for q in seen if q["path"] == "/api/v1/workspaces"]
        assert len(got) == 1
        assert got[0]["headers"]["authorization"].startswith("Bearer DEMO-")
        assert key not in repr(seen)

        r = helpers.request("GET", base + "/api/v1/workspaces",
                            headers={"Authorization": "Bearer wrong"})
        assert r.status == 401


def test_make_run_keeps_the_upstream_key_private(tmp_path):
    # umask 0: whatever mode a file gets is the mode it was created with
    with make_run(tmp_path, umask=0) as (text, gw, be, run_dir):
        key = re.search(r"^    (sk-alm-\S+)$", text, re.M).group(1)
        r = helpers.request("GET", "http://127.0.0.1:%d/v1/models" % gw,
                            headers={"Authorization": "Bearer " + key})
        assert r.status == 200, r.text
        seen = helpers.request("GET", "http://127.0.0.1:%d/__test/requests"
                               % be).json()
        upstream_key = seen[-1]["headers"]["authorization"].split()[1]
        assert upstream_key.startswith("DEMO-")

        conf = os.path.join(run_dir, "nginx.conf")
        with open(conf) as f:
            assert upstream_key in f.read()
        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700

        # no file that holds a secret is readable by others
        holders = []
        for top, dirs, files in os.walk(run_dir):
            for name in files:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                if upstream_key.encode() in data or key.encode() in data:
                    holders.append(path)
                    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, \
                        "%s is mode %o" % (path, stat.S_IMODE(st.st_mode))
        assert holders == [conf]
