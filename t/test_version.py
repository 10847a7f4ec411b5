"""The one version string: the VERSION file is what the module logs when a
worker starts with it configured, and what the Debian package carries."""

import os
import re

from lib import helpers
from lib.paths import REPO


# both halves of the module on: keys checked everywhere, the OpenAI
# routes under /v1/
BOTH = """
    anythingllm_redis  @REDIS@;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_auth          on;
        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }
    }
"""


def version():
    with open(os.path.join(REPO, "VERSION")) as f:
        return f.readline().strip()


def version_lines(n):
    """(pid, version) of every "ngx_http_anythingllm_module <v>" notice."""
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(
        r"\[notice\] (\d+)#\d+: ngx_http_anythingllm_module (\S+)$",
        n.error_log(), re.M)]


def test_version_file_holds_one_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", version()), version()


def test_each_worker_logs_the_version_once(nginx):
    n = nginx(BOTH, workers=2)
    workers = n.worker_pids()
    assert len(workers) == 2

    helpers.wait_until(lambda: len(version_lines(n)) >= 2, 5,
                       message="no version notice:\n" + n.error_log()[-2000:])
    assert sorted(version_lines(n)) == sorted(
        (pid, version()) for pid in workers)

    # the new workers of a reload log it again, the old ones do not
    n.reload()
    # the old workers may still be finishing when the reload returns
    new = helpers.wait_until(
        lambda: [p for p in n.worker_pids() if p not in workers]
        if len(set(n.worker_pids()) - set(workers)) == 2 else None, 10,
        message="no new workers after reload")
    helpers.wait_until(lambda: len(version_lines(n)) >= 4, 5,
                       message="no version notice after reload")
    assert sorted(version_lines(n)) == sorted(
        (pid, version()) for pid in workers + new)


def test_openai_alone_counts_as_configured(nginx):
    n = nginx("""
    server {
        listen  127.0.0.1:@PORT@;

        location /v1/ {
            anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
            anythingllm_openai        on;
            proxy_pass                http://anythingllm;
        }
    }
""", workers=1)
    helpers.wait_until(lambda: version_lines(n), 5,
                       message="no version notice")
    assert version_lines(n) == [(n.worker_pids()[0], version())]


def test_loaded_but_unused_logs_nothing(nginx):
    # neither auth nor openai anywhere: the module stays silent
    n = nginx("""
    anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;

    server {
        listen  127.0.0.1:@PORT@;

        location / {
            proxy_pass  http://anythingllm;
        }
    }
""", workers=1)
    r = n.get("/api/v1/workspaces")
    assert r.status == 200
    # the one worker answered, so it is past init_process
    assert version_lines(n) == []
    assert not re.search(r"ngx_http_anythingllm_module \d", n.error_log())


def test_debian_changelog_follows_version():
    with open(os.path.join(REPO, "debian", "changelog")) as f:
        first = f.readline()
    m = re.match(r"libnginx-mod-http-anythingllm \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == version()


def test_readme_names_this_version():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    v = re.escape(version())
    assert re.search(r"^This is version %s\." % v, readme, re.M)
    assert re.search(r"libnginx-mod-http-anythingllm_%s_amd64\.deb" % v,
                     readme)
    assert re.search(r"ngx_http_anythingllm_module %s$" % v, readme, re.M)
    # and no other version of the package or the module
    assert set(re.findall(r"libnginx-mod-http-anythingllm_([^_]+)_",
                          readme)) == {version()}
    assert set(re.findall(r"ngx_http_anythingllm_module (\d\S*)",
                          readme)) == {version()}
