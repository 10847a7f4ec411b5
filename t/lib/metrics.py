"""The Prometheus answer of an "anythingllm_metrics" location as the
tests read it: its samples by name and labels (label values as written,
escapes kept), its format checked on the way."""

import re

from lib import helpers


SAMPLE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def scrape(n):
    """{(name, frozenset(labels)): value} of one answer, its format
    checked on the way: every sample's family has HELP and TYPE first."""
    r = n.get("/metrics")
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4"
    typed = set()
    out = {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, line
        name, labels, value = m.groups()
        family = re.sub(r'_(bucket|sum|count)$', "", name)
        assert name in typed or family in typed, line
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in out, line
        out[key] = float(value)
    return out


def value(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0)


def keyed(m, name):
    """{key_id: value} of a per-key family."""
    return {dict(k[1])["key_id"]: v for k, v in m.items() if k[0] == name}


def verdicts(m):
    return {dict(k[1])["verdict"]: v for k, v in m.items()
            if k[0] == "anythingllm_requests_total" and v}


def counted(n, requests, keyed_requests, timeout=5):
    """The answer once the log phase has counted every request: requests
    verdicts, keyed_requests of them in a key's series ("other"
    included).  The log phase runs after the answer is sent, and counts
    a request's verdict before its key's series, while a scrape copies
    the series before it reads the verdicts: the last verdict alone does
    not tell that its key's count is there."""
    def done():
        m = scrape(n)
        if sum(verdicts(m).values()) != requests:
            return None
        if sum(keyed(m, "anythingllm_key_requests_total").values()) \
                != keyed_requests:
            return None
        return m
    return helpers.wait_until(
        done, timeout, message="the metrics never counted %d requests, "
        "%d of them by key" % (requests, keyed_requests))
