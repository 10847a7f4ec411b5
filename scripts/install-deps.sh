#!/bin/bash
# Installs the Debian packages the project needs, when missing.
# Idempotent; needs root (or sudo) only when something is missing.

set -eu

pkgs="nginx-core nginx-dev libhiredis-dev libcjson-dev libssl-dev
      redis-server redis-tools python3-pytest python3-aiohttp
      libcmocka-dev clang libclang-rt-14-dev gcc make curl nodejs npm"

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

echo "installing: $missing"

sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo=sudo
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null

# the packaged nginx and redis services are not ours to run
for s in nginx redis-server; do
    if command -v systemctl >/dev/null 2>&1; then
        $sudo systemctl stop $s >/dev/null 2>&1 || true
        $sudo systemctl disable $s >/dev/null 2>&1 || true
    fi
    $sudo service $s stop >/dev/null 2>&1 || true
done
