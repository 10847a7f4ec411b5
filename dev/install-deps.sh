#!/bin/bash
# Installs the Debian packages one task of the project needs, when
# missing.  Idempotent; needs root (or sudo) only when something is
# missing.  It never stops, disables or reconfigures a service, but for
# the one Prometheus server its own install may have started (the tests
# run Prometheus themselves, and only promtool and the binary are
# wanted).
#
#   dev/install-deps.sh build   building the module (make build)
#   dev/install-deps.sh bench   build + wrk and redis (make bench)
#   dev/install-deps.sh test    everything the test suites need:
#                               build + bench + test tools, the
#                               sources' build deps for the nginx
#                               build matrix, Perl for nginx-tests,
#                               Prometheus and promtool
#   dev/install-deps.sh deb     build + Debian's packaging tools
#                               (make deb)

set -eu

mode=${1:-build}

build_pkgs="nginx-core nginx-dev libhiredis-dev libcjson-dev libssl-dev"

bench_pkgs="$build_pkgs wrk redis-server"

test_pkgs="$bench_pkgs redis-tools python3-pytest python3-aiohttp
           libcmocka-dev clang libclang-rt-14-dev gcc make curl
           nodejs npm libpcre2-dev zlib1g-dev perl
           libnginx-mod-http-perl prometheus"

deb_pkgs="$build_pkgs build-essential debhelper dpkg-dev lintian"

case $mode in
    build)  pkgs=$build_pkgs ;;
    deb)    pkgs=$deb_pkgs ;;
    bench)  pkgs=$bench_pkgs ;;
    test)   pkgs=$test_pkgs ;;
    *)
        echo "usage: $0 build|bench|test|deb" >&2
        exit 2
        ;;
esac

# building needs a C compiler; a machine may have one of its own
if [ "$mode" != test ] && ! command -v cc >/dev/null 2>&1; then
    pkgs="$pkgs gcc"
fi

missing=""
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
         | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

# a machine may carry its own node and npm outside Debian's packages
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    missing=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e nodejs -e npm \
              | tr '\n' ' ')
fi

missing=$(echo $missing)
[ -z "$missing" ] && exit 0

echo "installing ($mode): $missing"

sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo=sudo
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null

# Debian's prometheus starts its service when installed, unless the
# machine forbids it (policy-rc.d, as in containers).  If this install
# started it, stop it and keep it from starting at boot: a system
# Prometheus would scrape, write and hold port 9090 for nothing.  Only
# that service runs as the user the package creates; a Prometheus the
# tests run is left alone.
case " $missing " in
    *" prometheus "*)
        if pgrep -u prometheus -x prometheus >/dev/null 2>&1; then
            if [ -d /run/systemd/system ]; then
                $sudo systemctl disable --now prometheus.service
            else
                $sudo /etc/init.d/prometheus stop
                $sudo update-rc.d prometheus disable
            fi
        fi
        ;;
esac
