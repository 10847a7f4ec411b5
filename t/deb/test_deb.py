"""The Debian package, installed into this machine's nginx and purged again.

Runs as root (make test-deb, after make deb): installs
build/deb/libnginx-mod-http-anythingllm_<VERSION>_<arch>.deb with apt-get,
checks the system configuration with nginx -t, serves requests with key
checking through /usr/sbin/nginx loading the module the Debian way (the
enabled snippet in /etc/nginx/modules-enabled) with a key made by the
packaged anythingllm-keys, then purges the package and shows that the
machine is as it was.  The system's nginx service is never started,
stopped or reloaded by the test."""

import json
import os
import re
import signal
import subprocess

import pytest

from lib import helpers
from lib.paths import REPO
from lib.processes import UPSTREAM_KEY, free_port, port_open, worker_pids

PKG = "libnginx-mod-http-anythingllm"
NGINX = "/usr/sbin/nginx"
MODULE_SO = "/usr/lib/nginx/modules/ngx_http_anythingllm_module.so"
SNIPPET = "/usr/share/nginx/modules-available/mod-http-anythingllm.conf"
ENABLED = "/etc/nginx/modules-enabled/50-mod-http-anythingllm.conf"
TOOL = "/usr/bin/anythingllm-keys"
DOC = "/usr/share/doc/" + PKG
MAN = "/usr/share/man/man1/anythingllm-keys.1.gz"
ABI_VARS = "/usr/share/nginx/src/debian/libnginx-mod.abisubstvars"

# where a package of this kind may leave traces
WATCHED = ("/etc/nginx", "/usr/lib/nginx",
           "/usr/share/nginx/modules-available", DOC)

APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
# another apt run on the machine holds the lock for a while: wait for it
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]


def version():
    with open(os.path.join(REPO, "VERSION")) as f:
        return f.readline().strip()


def run(*cmd, check=True, env=None, timeout=600):
    p = subprocess.run(list(cmd), capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, "%s: %d\n%s%s" % (
            " ".join(cmd), p.returncode, p.stdout, p.stderr)
    return p


def deb_path():
    arch = run("dpkg", "--print-architecture").stdout.strip()
    return os.path.join(REPO, "build", "deb", "%s_%s_%s.deb"
                        % (PKG, version(), arch))


def status(pkg=PKG):
    p = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def installed_packages():
    out = run("dpkg-query", "-W", "-f=${Package}:${Architecture} "
              "${Version} ${Status}\n").stdout
    return sorted(line for line in out.splitlines()
                  if not line.startswith(PKG + ":"))


def snapshot():
    """Every path under the watched places, with its link target."""
    seen = {}
    for top in WATCHED:
        if not os.path.lexists(top):
            continue
        seen[top] = None
        for d, dirs, files in os.walk(top):
            for name in dirs + files:
                p = os.path.join(d, name)
                seen[p] = os.readlink(p) if os.path.islink(p) else None
    return seen


def purge():
    return run(*APT, "purge", PKG, env=APT_ENV, check=False)


@pytest.fixture(scope="module")
def installed():
    """Installs the package once for the module; purges it at the end
    whatever happened, when the tests did not already."""
    if os.geteuid() != 0:
        pytest.fail("the package tests install into the system: run them "
                    "as root (make test-deb)", pytrace=False)
    deb = deb_path()
    if not os.path.exists(deb):
        pytest.fail("%s is missing: run make deb" % deb, pytrace=False)
    if status() != "unknown" and "not-installed" not in status():
        pytest.fail("%s is already on this machine (%s): purge it first, "
                    "the test does not replace an installation"
                    % (PKG, status()), pytrace=False)

    before = {"files": snapshot(), "packages": installed_packages()}
    p = run(*APT, "install", deb, env=APT_ENV, check=False)
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        assert status() == "install ok installed"
        yield {"deb": deb, "before": before, "install": p}
    finally:
        if status() != "unknown" and "not-installed" not in status():
            purge()


def test_package_metadata(installed):
    fields = run("dpkg-deb", "-f", installed["deb"], "Package", "Version",
                 "Architecture", "Depends").stdout
    f = dict(line.split(": ", 1) for line in fields.splitlines())
    assert f["Package"] == PKG
    assert f["Version"] == version()
    assert f["Architecture"] == run("dpkg", "--print-architecture") \
        .stdout.strip()

    depends = [d.strip().split(" ")[0] for d in f["Depends"].split(",")]

    # the ABI of the nginx it was built for, as nginx-dev names it, which
    # the installed nginx provides
    with open(ABI_VARS) as fh:
        abi = re.search(r"^nginx:abi=(\S+)", fh.read(), re.M).group(1)
    assert abi.startswith("nginx-abi-1.22.1-")
    assert abi in depends
    provides = run("dpkg-query", "-W", "-f=${Provides}\n", "nginx").stdout
    assert abi in [x.strip() for x in provides.split(",")]

    # every shared library the module links, by the package that ships it
    needed = re.findall(r"NEEDED\s+(\S+)",
                        run("objdump", "-p", MODULE_SO).stdout)
    assert {"libhiredis.so.0.14", "libcjson.so.1", "libcrypto.so.3"} \
        <= set(needed)
    ldd = run("ldd", MODULE_SO).stdout
    for lib in needed:
        path = re.search(r"^\s*%s => (\S+)" % re.escape(lib), ldd,
                         re.M).group(1)
        owner = run("dpkg", "-S", os.path.realpath(path), check=False)
        if owner.returncode != 0:
            owner = run("dpkg", "-S", path)
        pkg = owner.stdout.split(":")[0]
        assert pkg in depends, (lib, pkg, depends)

    # the key tool is Python
    assert "python3" in depends


def test_files_go_where_debian_puts_them(installed):
    files = set(run("dpkg", "-L", PKG).stdout.splitlines())
    for p in (MODULE_SO, SNIPPET, TOOL, DOC + "/README.md.gz",
              DOC + "/copyright", DOC + "/changelog.gz",
              DOC + "/examples/anythingllm.conf",
              DOC + "/examples/minimal.conf", MAN):
        assert p in files, p
        assert os.path.isfile(p), p

    with open(SNIPPET) as f:
        assert f.read() == \
            "load_module modules/ngx_http_anythingllm_module.so;\n"

    # enabled by the maintainer script, as a link Debian's tools manage
    assert os.path.islink(ENABLED)
    assert os.readlink(ENABLED) == SNIPPET
    assert ENABLED not in files

    assert os.access(TOOL, os.X_OK)
    p = run(TOOL, "--help")
    assert "Manage the API keys" in p.stdout

    with open(MODULE_SO, "rb") as f:
        assert ("ngx_http_anythingllm_module " + version()).encode() \
            in f.read()

    # built with debian/rules' flags: the module's files call one
    # another directly, not through the PLT
    assert helpers.own_function_slots(MODULE_SO) == []


def test_system_nginx_config_passes(installed):
    p = run(NGINX, "-t", "-q", check=False)
    assert p.returncode == 0, p.stderr

    # and the system configuration is what loads the enabled snippet
    dump = run(NGINX, "-T", "-q").stdout
    assert "# configuration file %s:\nload_module " \
           "modules/ngx_http_anythingllm_module.so;" % ENABLED in dump


CONF = """\
include /etc/nginx/modules-enabled/*.conf;

user root;
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;

events {{
}}

http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    anythingllm_redis  {redis} timeout=500ms;

    server {{
        listen  127.0.0.1:{port};

        anythingllm_upstream_key  {upstream_key};
        anythingllm_auth          on;

        location /api/v1/ {{
            proxy_pass          http://{backend};
            proxy_http_version  1.1;
            proxy_set_header    Connection "";
        }}
    }}
}}
"""


def test_serves_with_key_checking(installed, tmp_path, redis_server,
                                  backend):
    # the system's nginx binary and prefix (modules/ is /usr/lib/nginx/
    # modules through it), with a configuration of its own on a free port
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONF.format(dir=tmp_path, redis=redis_server.addr,
                                backend=backend.addr, port=port,
                                upstream_key=UPSTREAM_KEY))
    err = tmp_path / "error.log"
    cmd = [NGINX, "-c", str(conf), "-e", str(err)]

    p = run(*cmd, "-t", check=False)
    assert p.returncode == 0, p.stderr

    # the module comes in through the packaged snippet, not a load_module
    # of our own
    assert "load_module" not in conf.read_text()
    dump = run(*cmd, "-T").stdout
    assert "# configuration file %s:\nload_module " \
           "modules/ngx_http_anythingllm_module.so;" % ENABLED in dump

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        helpers.wait_until(lambda: port_open(port) and
                           len(worker_pids(proc.pid)) == 2, 10,
                           message="nginx did not start: %s" % (
                               err.read_text() if err.exists() else ""))
        workers = worker_pids(proc.pid)

        # the workers run the packaged file, and no other copy
        for pid in workers:
            with open("/proc/%d/maps" % pid) as f:
                maps = {line.split()[-1] for line in f
                        if "ngx_http_anythingllm_module" in line}
            assert maps == {MODULE_SO}, maps

        # each worker names the version of the package
        helpers.wait_until(
            lambda: err.read_text().count(
                "ngx_http_anythingllm_module " + version()) == 2, 5,
            message="no version notice:\n" + err.read_text())
        for pid in workers:
            assert re.search(r"\[notice\] %d#\d+: ngx_http_anythingllm_module "
                             r"%s$" % (pid, re.escape(version())),
                             err.read_text(), re.M)

        url = "http://127.0.0.1:%d/api/v1/workspaces" % port

        r = helpers.get(url)
        assert r.status == 401, r
        assert r.json()["error"]["code"] == "invalid_api_key"

        r = helpers.get(url, headers={"Authorization": "Bearer sk-unknown"})
        assert r.status == 401, r
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert not backend.requests("/api/v1/workspaces")

        # a key made by the packaged tool in the private Redis
        p = run(TOOL, "--redis", redis_server.addr, "create", "--json",
                "--name", "deb-test", "--scopes", "read")
        key = json.loads(p.stdout)["key"]

        backend.clear()
        r = helpers.get(url, headers={"Authorization": "Bearer " + key})
        assert r.status == 200, r
        assert "workspaces" in r.json()
        seen = backend.last_request("/api/v1/workspaces")
        assert seen["headers"]["authorization"] == "Bearer " + UPSTREAM_KEY

        # the tool's revocation reaches the running gateway
        run(TOOL, "--redis", redis_server.addr, "revoke", key)
        helpers.wait_until(lambda: helpers.get(url, headers={
            "Authorization": "Bearer " + key}).status == 401, 5,
            message="revoked key still accepted")

        assert "[alert]" not in err.read_text()
        assert "[emerg]" not in err.read_text()
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_purge_leaves_nothing(installed):
    p = purge()
    assert p.returncode == 0, p.stdout + p.stderr

    assert status() == "unknown" or "not-installed" in status(), status()
    for path in (MODULE_SO, SNIPPET, TOOL, DOC, MAN, ENABLED,
                 ENABLED + ".removed"):
        assert not os.path.lexists(path), path

    before = installed["before"]
    assert snapshot() == before["files"]
    assert installed_packages() == before["packages"]

    # the system configuration still checks without the module
    p = run(NGINX, "-t", "-q", check=False)
    assert p.returncode == 0, p.stderr
    assert "anythingllm" not in run(NGINX, "-T", "-q").stdout
