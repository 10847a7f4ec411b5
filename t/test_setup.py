"""Setting up: what dev/install-deps.sh installs for each target,
that it leaves the machine's services alone, and that conf/*.conf check
in a tree where only the build has run."""

import os
import shutil
import stat
import subprocess

import pytest

from lib.paths import INSTALL_DEPS, REPO


# what make build makes, whichever nginx the suite runs
DEBIAN_MODULE = os.path.join(REPO, "build", "module",
                             "ngx_http_anythingllm_module.so")

BUILD_PKGS = {"nginx-core", "nginx-dev", "libhiredis-dev", "libcjson-dev",
              "libssl-dev"}


def fake_tools(bin_dir, log):
    """dpkg-query reports every package missing; apt-get, systemctl,
    service, invoke-rc.d and sudo only log how they were called."""
    scripts = {
        "dpkg-query": "exit 1\n",
        "apt-get": 'echo "apt-get $*" >> %s\n' % log,
        "systemctl": 'echo "systemctl $*" >> %s\n' % log,
        "service": 'echo "service $*" >> %s\n' % log,
        "invoke-rc.d": 'echo "invoke-rc.d $*" >> %s\n' % log,
        "sudo": 'echo "sudo $*" >> %s\n"$@"\n' % log,
    }
    for name, body in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, stat.S_IRWXU)


def install(mode, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.write_text("")
    fake_tools(str(bin_dir), str(log))
    env = dict(os.environ, PATH="%s:%s" % (bin_dir, os.environ["PATH"]))
    out = subprocess.run([INSTALL_DEPS, mode], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    installed = set()
    for line in calls:
        words = line.split()
        if words[:2] == ["apt-get", "install"]:
            installed |= {w for w in words[2:] if not w.startswith("-")}
    return installed, calls


def test_build_installs_only_the_build_packages(tmp_path):
    installed, calls = install("build", tmp_path)
    # a C compiler only when the machine has none
    assert installed - {"gcc"} == BUILD_PKGS
    assert not [c for c in calls if c.split()[0] in
                ("systemctl", "service", "invoke-rc.d")]


@pytest.mark.parametrize("mode", ["build", "bench", "test"])
def test_no_mode_touches_a_service(tmp_path, mode):
    installed, calls = install(mode, tmp_path)
    assert installed >= BUILD_PKGS
    assert [c for c in calls if c.split()[0] in
            ("systemctl", "service", "invoke-rc.d")] == []


def test_bench_and_test_install_wrk(tmp_path):
    installed, _ = install("bench", tmp_path)
    assert "wrk" in installed and "redis-server" in installed
    assert "clang" not in installed and "nodejs" not in installed


def test_test_mode_installs_the_nginx_build_and_suite_needs(tmp_path):
    installed, _ = install("test", tmp_path)
    assert {"wrk", "libpcre2-dev", "zlib1g-dev", "perl",
            "libnginx-mod-http-perl", "redis-server", "python3-pytest",
            "libcmocka-dev", "clang"} <= installed


def test_conf_files_check_after_the_build_alone(tmp_path):
    """A tree as cloned, plus what scripts/build-module.sh makes: the
    conf files check with nginx -t -p "$PWD" as their comments say."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("config", "VERSION", "scripts", "conf"):
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, tree / name)
        else:
            shutil.copy(src, tree / name)
    # the build itself reuses the repository's objects (same config):
    # what matters is what it leaves in the tree it belongs to
    out = subprocess.run([str(tree / "scripts" / "build-module.sh"),
                          os.path.dirname(DEBIAN_MODULE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (tree / "build" / "module").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEBIAN_MODULE, tree / "build" / "module")
    for name in ("minimal.conf", "anythingllm.conf"):
        out = subprocess.run(["/usr/sbin/nginx", "-t", "-p", str(tree) + "/",
                              "-c", "conf/" + name],
                             capture_output=True, text=True, cwd=str(tree))
        assert out.returncode == 0, out.stderr
        assert "test is successful" in out.stderr
