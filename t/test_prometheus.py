"""The metrics as Prometheus reads them: the real Prometheus server
(Debian's prometheus package, dev/install-deps.sh test) scrapes a test
nginx after a known workload, and PromQL through its HTTP API gives back
the counts of that workload; promtool accepts the exposition; every
metric conf/grafana-dashboard.json uses is in it."""

import json
import os
import re
import subprocess
import time
import urllib.parse

import pytest

from lib import helpers
from lib.auth import bearer
from lib.openai import abort, chunk, finalize, open_stream
from lib.paths import REPO
from lib.processes import Service, free_port, key_digest, stop_process
from lib.metrics import counted, keyed, scrape, value

PROMETHEUS = os.environ.get("ALM_PROMETHEUS", "/usr/bin/prometheus")
PROMTOOL = os.environ.get("ALM_PROMTOOL", "/usr/bin/promtool")
DASHBOARD = os.path.join(REPO, "conf", "grafana-dashboard.json")

# the gateway as conf/anythingllm.conf sets it up, metrics location
# included
GATEWAY = """
    anythingllm_redis         @REDIS@ timeout=2s;
    anythingllm_key_cache     zone=alm_keys:1m valid=30s invalid=5s;
    anythingllm_metrics_zone  1m;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";
        proxy_buffering     off;

        location = /metrics {
            anythingllm_auth  off;
            allow             127.0.0.1;
            deny              all;
            anythingllm_metrics;
        }

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            proxy_pass  http://anythingllm;
        }
    }
"""

# what the dashboard's variables stand for, to run its queries here
DASHBOARD_VARS = {"$__rate_interval": "1m", "$__range": "5m",
                  "$instance": ".*"}


class Prometheus(Service):
    """A Prometheus server of its own: its config, its storage, a free
    port, scraping every second the targets given."""

    def __init__(self, tmpdir, targets):
        super().__init__(tmpdir, "prometheus.log", free_port())
        self.config = os.path.join(self.dir, "prometheus.yml")
        # YAML is a superset of JSON
        with open(self.config, "w") as f:
            json.dump({
                "global": {"scrape_interval": "1s",
                           "scrape_timeout": "1s",
                           "evaluation_interval": "1s"},
                "scrape_configs": [{
                    "job_name": "anythingllm",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": targets}]}]}, f)

    def start(self):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [PROMETHEUS, "--config.file=" + self.config,
             "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=" + self.addr,
             "--log.level=warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.dir)
        log.close()
        helpers.wait_until(self.ready, timeout=30, interval=0.1,
                           message="prometheus not ready: " + self.log())

    def ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("prometheus exited: %s" % self.log())
        try:
            return helpers.get("http://%s/-/ready" % self.addr,
                               timeout=1).status == 200
        except OSError:
            return False

    def stop(self):
        stop_process(self.proc, timeout=10)

    def query(self, expr):
        """The instant vector of expr now: [(labels, value)]."""
        r = helpers.get("http://%s/api/v1/query?%s" % (
            self.addr, urllib.parse.urlencode({"query": expr})))
        body = r.json()
        assert r.status == 200 and body["status"] == "success", \
            (expr, r.text)
        assert body["data"]["resultType"] == "vector", (expr, body)
        return [(s["metric"], float(s["value"][1]))
                for s in body["data"]["result"]]

    def scalar(self, expr):
        """The one value of expr (0 when it has no sample)."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else 0

    def by(self, expr, label):
        return {m[label]: v for m, v in self.query(expr)}

    def scraped_since(self, t):
        """True once a scrape that started after t is stored, and the
        target answered it."""
        up = self.query('up{job="anythingllm"}')
        if not up or up[0][1] != 1:
            return False
        return self.scalar('timestamp(up{job="anythingllm"})') > t


@pytest.fixture
def prometheus(tmp_path_factory):
    made = []

    def make(targets):
        p = Prometheus(tmp_path_factory.mktemp("prometheus"), targets)
        made.append(p)
        p.start()
        return p
    yield make
    for p in made:
        p.stop()


def redis_clients_back(redis_server, workers):
    """Every worker's command and subscriber connections are up (the
    test's own connection is one more of the normal ones)."""
    listing = redis_server.cmd("CLIENT", "LIST").decode()
    types = re.findall(r"\bflags=(\S+)", listing)
    pubsub = sum(1 for f in types if "P" in f)
    return pubsub == workers and len(types) - pubsub == workers + 1


def workload(n, redis_server, backend):
    """Keys allowed and refused; a stream to its end, one AnythingLLM
    aborts, one the client leaves; a Redis restart."""
    for k, scopes in (("k-alice", "chat,read"), ("k-bob", "read"),
                      ("k-carol", "chat"), ("k-dave", "read")):
        redis_server.add_key(k, name=k[2:], scopes=scopes)
    alice, bob = bearer("k-alice"), bearer("k-bob")

    for _ in range(3):
        assert n.get("/api/v1/auth", headers=alice).status == 200
    for _ in range(2):
        assert n.get("/api/v1/workspaces", headers=bob).status == 200
    assert n.get("/api/v1/admin/users", headers=bob).status == 403
    assert n.get("/api/v1/auth").status == 401
    assert n.get("/api/v1/auth", headers=bearer("k-nobody")).status == 401

    backend.script(endpoint="stream-chat", events=[
        {"frame": f} for f in (chunk("Hel"), chunk("lo", close=True),
                               finalize(prompt=11, completion=2))])
    s = open_stream(n, headers=alice)
    s.read_all()
    assert s.done, s.text
    s.close()

    # AnythingLLM aborts a stream, then a client leaves one mid-way
    backend.script(endpoint="stream-chat", events=[
        {"frame": f} for f in (chunk("Hel"), abort())])
    s = open_stream(n, headers=bearer("k-carol"))
    s.read_all()
    assert s.done, s.text
    s.close()
    s = open_stream(n, "[slow] tell me a story", headers=bearer("k-carol"))
    s.next_frame(timeout=3)
    s.close()
    helpers.wait_until(lambda: value(
        scrape(n), "anythingllm_streams_ended_total",
        cause="client_gone") == 1, timeout=10)

    # Redis stops: a cached key passes, an uncached one is refused
    redis_server.stop()
    assert n.get("/api/v1/auth", headers=alice).status == 200
    assert n.get("/api/v1/auth", headers=bearer("k-dave")).status == 503

    # it comes back empty (no persistence): dave's key is stored again,
    # and once the workers are connected again, it passes
    redis_server.start()
    redis_server.add_key("k-dave", name="dave", scopes="read")
    helpers.wait_until(lambda: redis_clients_back(redis_server, n.workers),
                       timeout=10, interval=0.05)
    assert n.get("/api/v1/auth", headers=bearer("k-dave")).status == 200


def test_prometheus_reads_the_workload(nginx, redis_server, backend,
                                       prometheus):
    n = nginx(GATEWAY, redis=redis_server, workers=2)
    workload(n, redis_server, backend)

    # the log phase of the last request is done once all are counted,
    # eleven of them by key
    direct = counted(n, 14, 11)

    after = time.time()
    p = prometheus([n.addr])
    helpers.wait_until(lambda: p.scraped_since(after), timeout=15,
                       interval=0.2, message="no scrape: " + p.log())
    assert p.scalar('up{job="anythingllm"}') == 1

    # requests by verdict: alice 3 + 1 stream + 1 while Redis was away,
    # bob 2 + 1 refused for scope, no key, an unknown key, carol's two
    # streams, dave refused while Redis was away and let in after
    assert p.by("anythingllm_requests_total > 0", "verdict") == {
        "redis": 4, "cached": 6, "denied_scope": 1, "denied_missing": 1,
        "denied_unknown": 1, "redis_error": 1}
    assert p.scalar("sum(anythingllm_requests_total)") == 14
    assert p.by("anythingllm_requests_by_scope_total > 0", "scope") == {
        "none": 8, "read": 2, "admin": 1, "chat": 3}
    # every request that reached AnythingLLM answered 200
    assert p.by("anythingllm_upstream_responses_total > 0", "code") == \
        {"2xx": 10}

    # per key; dave's refusal while Redis was away read no record
    ids = {k: key_digest("k-" + k)[:12]
           for k in ("alice", "bob", "carol", "dave")}
    assert p.by("anythingllm_key_requests_total", "key_id") == {
        ids["alice"]: 5, ids["bob"]: 3, ids["carol"]: 2, ids["dave"]: 1,
        "other": 0}
    assert p.by("anythingllm_key_refusals_total > 0", "key_id") == \
        {ids["bob"]: 1}
    assert p.query('anythingllm_key_requests_total{key_name="alice"}')[0][0][
        "key_id"] == ids["alice"]
    assert p.scalar('anythingllm_key_prompt_tokens_total{key_name="alice"}') \
        == 11
    assert p.scalar(
        'anythingllm_key_completion_tokens_total{key_name="alice"}') == 2
    assert p.scalar('anythingllm_key_prompt_tokens_total{key_name="bob"}') \
        == 0

    # the three streams
    assert p.by("anythingllm_streams_ended_total > 0", "cause") == \
        {"complete": 1, "upstream_abort": 1, "client_gone": 1}
    assert p.scalar("anythingllm_streams_open") == 0
    assert p.scalar("anythingllm_first_token_seconds_count") == 3
    assert p.scalar("anythingllm_stream_duration_seconds_count") == 3
    assert p.scalar(
        'anythingllm_stream_duration_seconds_bucket{le="+Inf"}') == 3

    # Redis: each worker lost both its connections and made them again;
    # no command failed or timed out, and every answered one has its
    # round trip in the histogram
    assert p.scalar("anythingllm_redis_reconnects_total") >= 2 * n.workers
    assert p.scalar("anythingllm_redis_errors_total") == 0
    assert p.scalar("anythingllm_redis_timeouts_total") == 0
    assert p.scalar("anythingllm_redis_latency_seconds_count") == \
        p.scalar("anythingllm_redis_commands_total")

    # the key cache: a miss for each first sight of a key (alice, bob,
    # the unknown one, carol; dave twice, Redis could not answer the
    # first), a hit for each other request with a key (alice 2 + 1
    # stream + 1 while Redis was away, bob 2, carol 1)
    assert p.scalar("anythingllm_key_cache_misses_total") == 6
    assert p.scalar("anythingllm_key_cache_hits_total") == 7
    assert p.scalar("anythingllm_key_cache_evictions_total") == 0
    assert p.scalar("anythingllm_revocations_total") == 0

    # what Prometheus stored is what nginx answered, series for series
    # (a label with an empty value is no label to Prometheus)
    direct = {(name, frozenset(l for l in labels if l[1] != "")): v
              for (name, labels), v in direct.items()}
    stored = {(m["__name__"], frozenset((k, v) for k, v in m.items()
                                        if k not in ("__name__", "job",
                                                     "instance"))): v
              for m, v in p.query('{job="anythingllm",'
                                  '__name__=~"anythingllm_.*"}')}
    assert stored == direct


def test_promtool_checks_the_exposition(nginx, redis_server, backend):
    """promtool check metrics (stdin) on an answer with every family,
    per-key series among them."""
    redis_server.add_key("k-lint", name='lint "x"', scopes="chat")
    n = nginx(GATEWAY, redis=redis_server)
    assert n.get("/api/v1/auth", headers=bearer("k-lint")).status == 200
    assert n.get("/api/v1/auth", headers=bearer("k-none")).status == 401
    counted(n, 2, 1)
    body = n.get("/metrics").body
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                       capture_output=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout + r.stderr == b""
    assert keyed(scrape(n), "anythingllm_key_requests_total") == \
        {key_digest("k-lint")[:12]: 1, "other": 0}


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))
    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return dash, exprs


def test_grafana_dashboard(nginx, redis_server, backend, prometheus):
    """A Grafana dashboard over a Prometheus data source chosen by a
    variable; every metric its queries name is in the exposition, and
    Prometheus takes every query."""
    dash, exprs = dashboard_exprs()
    assert isinstance(dash["schemaVersion"], int)
    assert dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel
        assert panel["targets"], panel
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", t
            assert t["expr"] and t["refId"], t

    n = nginx(GATEWAY, redis=redis_server)
    exposed = {name for name, _ in scrape(n)}
    used = set()
    for e in exprs:
        used |= set(re.findall(r"\banythingllm_[a-z_]+", e))
    assert used and not used - exposed, sorted(used - exposed)
    # what the dashboard shows, in the words
    for name in ("anythingllm_requests_total",
                 "anythingllm_key_prompt_tokens_total",
                 "anythingllm_key_completion_tokens_total",
                 "anythingllm_first_token_seconds_bucket",
                 "anythingllm_redis_latency_seconds_bucket",
                 "anythingllm_redis_errors_total",
                 "anythingllm_key_cache_hits_total",
                 "anythingllm_key_cache_misses_total"):
        assert name in used, name

    # each query is PromQL that Prometheus runs over the scraped series
    after = time.time()
    p = prometheus([n.addr])
    helpers.wait_until(lambda: p.scraped_since(after), timeout=15,
                       interval=0.2, message="no scrape: " + p.log())
    for e in exprs:
        if e.startswith("label_values("):
            metric = re.match(r"label_values\((\w+),", e).group(1)
            assert p.query(metric), e
            continue
        for var, v in DASHBOARD_VARS.items():
            e = e.replace(var, v)
        assert "$" not in e, e
        p.query(e)
