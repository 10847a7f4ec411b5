"""The throughput cases: one wrk run (2 threads, --latency) against
one gateway location each, all on the same backend answer within a
family: the GET cases fetch one workspace, openai and its baseline the
100-token chat answer, stream and its baseline the 100-token stream.
A baseline is the same upstream answer proxied plainly, untranslated,
so a ratio is the cost of what the gateway adds to it."""

import http.client
import json
import os
import subprocess

from . import answers

# name, gateway, path, key, body (None: GET), baseline
CASES = [
    ("plain", "gw", "/plain/api/v1/workspace/sales", None, None,
     "plain"),
    ("key", "gw", "/key/api/v1/workspace/sales", None, None, "plain"),
    ("auth", "gw", "/api/v1/workspace/sales", answers.KEY, None,
     "plain"),
    ("auth-nocache", "nocache", "/api/v1/workspace/sales", answers.KEY,
     None, "plain"),
    ("auth-metrics", "metrics", "/api/v1/workspace/sales", answers.KEY,
     None, "auth"),
    ("auth-rpm", "gw", "/api/v1/workspace/sales", answers.RPM_KEY, None,
     "plain"),
    ("auth_request", "gw", "/ar/api/v1/workspace/sales", answers.KEY,
     None, "plain"),
    ("openai-base", "gw", "/plain/api/v1/workspace/sales/chat", None,
     answers.workspace_request(), "openai-base"),
    ("openai", "gw", "/v1/chat/completions", answers.KEY,
     answers.openai_request(False), "openai-base"),
    ("stream-base", "gw", "/plain/api/v1/workspace/sales/stream-chat",
     None, answers.workspace_request(), "stream-base"),
    ("stream", "gw", "/v1/chat/completions", answers.KEY,
     answers.openai_request(True), "stream-base"),
]

NAMES = [c[0] for c in CASES]


def lua_string(s):
    return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"')


def wrk_args(work, case, ports):
    """The wrk arguments of a case after the common options."""
    name, gw, path, key, body, _ = case
    args = []
    if key:
        args += ["-H", "Authorization: Bearer " + key]
    if body is not None:
        script = os.path.join(work, "post-%s.lua" % name)
        with open(script, "w") as f:
            f.write('wrk.method = "POST"\n'
                    'wrk.body = %s\n'
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    % lua_string(body))
        args += ["-s", script]
    return args + ["http://127.0.0.1:%d%s" % (ports[gw], path)]


def parse_latency(text):
    """wrk's "1.23ms" (or us, s, m) in milliseconds."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0),
                        ("m", 60000.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    return float(text)


def parse_wrk(out):
    """Requests per second, p99 in ms, and the count of failures
    (non-2xx answers and socket errors)."""
    rps, p99, bad = 0.0, 0.0, 0
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif words[:1] == ["99%"]:
            p99 = parse_latency(words[1])
        elif "Non-2xx" in line:
            bad += int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            # connect N, read N, write N, timeout N
            bad += sum(int(w.strip(",")) for w in words[3::2])
    return rps, p99, bad


def wrk(seconds, conns, args):
    out = subprocess.run(["wrk", "-t2", "-c%d" % conns,
                          "-d%ds" % seconds, "--latency"] + args,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("bench: wrk failed: " + out.stderr.strip())
    return parse_wrk(out.stdout)


def warm(work, cases, ports):
    """Fills the key caches and opens the upstream connections."""
    for case in cases:
        wrk(1, 4, wrk_args(work, case, ports))


def run(work, case, ports, seconds, conns):
    """One try of a case: (req/s, p99 ms, failures)."""
    return wrk(seconds, conns, wrk_args(work, case, ports))


def selected(names):
    """The cases named, with the baselines they are measured against,
    in the order of CASES."""
    want = set(names)
    want |= set(c[5] for c in CASES if c[0] in want)
    return [c for c in CASES if c[0] in want]


def answer(case, ports):
    """One request of a case: (status, body)."""
    name, gw, path, key, body, _ = case
    c = http.client.HTTPConnection("127.0.0.1", ports[gw], timeout=10)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    c.request("POST" if body is not None else "GET", path, body, headers)
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, text


def check(cases, ports):
    """Each case answers what it should, before anything is timed (a
    case that failed fast would look fast), and where a key is checked
    an unknown key is refused."""
    whole = "".join(answers.tokens())
    for case in cases:
        status, text = answer(case, ports)
        name = case[0]
        ok = status == 200
        if name == "openai":
            ok = ok and json.loads(text)["choices"][0]["message"][
                "content"] == whole
        elif name == "stream":
            frames = [f[6:] for f in text.split("\n\n") if f]
            ok = ok and frames[-1] == "[DONE]" and "".join(
                json.loads(f)["choices"][0]["delta"].get("content", "")
                for f in frames[:-1]) == whole
        elif name.endswith("-base"):
            ok = ok and whole.split()[-1] in text
        else:
            ok = ok and '"slug":"sales"' in text
        if ok and case[3]:
            # and a key the checks do not know is refused
            status, text = answer(case[:3] + ("sk-alm-bench-unknown-"
                                              + "0" * 32,) + case[4:],
                                  ports)
            ok = status in (401, 403)
        if not ok:
            raise SystemExit("bench: %s answers %d, not what it should:"
                             "\n%s" % (name, status, text[:500]))
