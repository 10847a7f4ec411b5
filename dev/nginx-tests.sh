#!/bin/bash
# Runs nginx's own test suite (nginx-tests) against Debian's nginx twice:
# as it is, then with the module loaded into every test's configuration
# (TEST_NGINX_GLOBALS="load_module ...;") and no anythingllm_* directive
# set.  The module must be invisible where unused: the second run may
# have no failure that the first lacks.  Some tests fail in both runs,
# as the suite is newer than nginx 1.22.1 (newer syntax).
#
#   dev/nginx-tests.sh
#
# The suite is nginx-tests.tar.gz in ALM_NGINX_SOURCES (default
# ../shared/nginx beside the repository), unpacked into build/.  It
# refuses to run as root: as root the runs use an unprivileged system
# user, ALM_TEST_USER (default alm-tests), created when missing.  The
# logs stay in build/nginx-tests-{plain,module}.log.

set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
sources=${ALM_NGINX_SOURCES:-$top/../shared/nginx}
module=$top/build/module/ngx_http_anythingllm_module.so
nginx=${ALM_NGINX_TESTS_BINARY:-/usr/sbin/nginx}
jobs=${ALM_JOBS:-2}

fail() {
    echo "nginx-tests: $*" >&2
    exit 1
}

tgz=$sources/nginx-tests.tar.gz
[ -f "$tgz" ] || fail "$tgz is missing: nginx-tests.tar.gz is expected in" \
                      "../shared/nginx beside the repository, or in" \
                      "ALM_NGINX_SOURCES"
[ -f "$module" ] || fail "$module is missing (make build)"
command -v prove >/dev/null || fail "prove is missing (perl)"

mkdir -p "$top/build"
stamp=$(stat -c '%s %Y' "$tgz")
if [ "$(cat "$top/build/nginx-tests.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$top/build/nginx-tests"
    tar -C "$top/build" -xzf "$tgz"
    [ -f "$top/build/nginx-tests/lib/Test/Nginx.pm" ] \
        || fail "$tgz holds no nginx-tests/lib/Test/Nginx.pm"
    printf '%s' "$stamp" > "$top/build/nginx-tests.stamp"
fi

# the suite, the module and the temp files live in a folder of the
# test user's own: the checkout may sit where that user cannot look
run_as=()
if [ "$(id -u)" = 0 ]; then
    user=${ALM_TEST_USER:-alm-tests}
    if ! id "$user" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin \
            --user-group "$user"
    fi
    run_as=(runuser -u "$user" --)
fi

work=$(mktemp -d /tmp/alm-nginx-tests.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$top/build/nginx-tests" "$work/suite"
cp "$module" "$work/ngx_http_anythingllm_module.so"
mkdir "$work/tmp"
chmod 755 "$work"
if [ ${#run_as[@]} -gt 0 ]; then
    chown -R "$user:" "$work"
fi

# one run: <name> [globals]; prints nothing, leaves the log
run() {
    local name=$1 globals=${2:-}
    (cd "$work/suite" && "${run_as[@]}" env -i PATH="$PATH" \
        HOME="$work" TMPDIR="$work/tmp" LC_ALL=C \
        TEST_NGINX_BINARY="$nginx" \
        TEST_NGINX_MODULES=/usr/lib/nginx/modules \
        TEST_NGINX_GLOBALS="$globals" \
        prove -j"$jobs" .) > "$top/build/nginx-tests-$name.log" 2>&1 || true
    grep -q '^Result: ' "$top/build/nginx-tests-$name.log" \
        || fail "$name run ended without a result (see" \
                "build/nginx-tests-$name.log)"
}

# the failures in a log, one a line: file#test, or file: what went
# wrong for a file that died or broke its plan
failures() {
    awk '
        /^Test Summary Report/ { on = 1; next }
        !on { next }
        /^Files=/ { exit }
        /^[^ ].*\.t +\(Wstat: / { file = $1; next }
        /^  Failed tests?: / {
            sub(/^  Failed tests?: +/, "")
            n = split($0, parts, /, */)
            for (i = 1; i <= n; i++) {
                if (split(parts[i], r, "-") == 2) {
                    for (j = r[1]; j <= r[2]; j++) print file "#" j
                } else {
                    print file "#" parts[i]
                }
            }
            next
        }
        /^  Non-zero exit status: / { print file ": exit status"; next }
        /^  Non-zero wait status: / { print file ": wait status"; next }
        /^  Parse errors: / { print file ": parse errors"; next }
    ' "$1" | sort -u
}

start=$(date +%s)
run plain
plain_time=$(( $(date +%s) - start ))

start=$(date +%s)
run module "load_module $work/ngx_http_anythingllm_module.so;"
module_time=$(( $(date +%s) - start ))

failures "$top/build/nginx-tests-plain.log" > "$work/plain.failed"
failures "$top/build/nginx-tests-module.log" > "$work/module.failed"
comm -13 "$work/plain.failed" "$work/module.failed" > "$work/new.failed"

count() {
    grep -c . "$1" || true
}

echo "nginx-tests against $("$nginx" -v 2>&1 | sed 's/^nginx version: //')"
echo "  without the module: $(count "$work/plain.failed") failing" \
     "(${plain_time}s): $(grep '^Files=' "$top/build/nginx-tests-plain.log")"
echo "  with the module:    $(count "$work/module.failed") failing" \
     "(${module_time}s): $(grep '^Files=' "$top/build/nginx-tests-module.log")"

if [ -s "$work/new.failed" ]; then
    echo "nginx-tests: failing only with the module loaded:" >&2
    sed 's/^/  /' "$work/new.failed" >&2
    exit 1
fi
echo "nginx-tests: no failure comes with the module"
