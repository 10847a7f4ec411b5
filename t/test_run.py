"""`make run`: a newcomer's first round trip, through scripts/run.py."""

import os
import re
import signal
import subprocess
import time

import helpers
from conftest import PYTHON, REPO, free_port, port_open


def test_make_run_gives_a_working_gateway(tmp_path):
    gw, be, rd = free_port(), free_port(), free_port()
    env = dict(os.environ, GATEWAY_LISTEN="127.0.0.1:%d" % gw,
               ANYTHINGLLM_URL="http://127.0.0.1:%d" % be,
               REDIS_PORT=str(rd), ALM_RUN_DIR=str(tmp_path / "run"))
    env.pop("ANYTHINGLLM_API_KEY", None)
    out = open(tmp_path / "out.txt", "w+")
    p = subprocess.Popen([PYTHON, os.path.join(REPO, "scripts", "run.py")],
                         stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        text = ""
        deadline = time.time() + 30
        while "Ctrl-C stops everything" not in text:
            assert p.poll() is None, text
            assert time.time() < deadline, text
            time.sleep(0.1)
            out.seek(0)
            text = out.read()

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
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(20)

    out.seek(0)
    assert "run: stopped" in out.read()
    # everything it started is gone
    for port in (gw, be, rd):
        assert not port_open(port)
