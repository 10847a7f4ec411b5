#!/bin/bash
# Builds the module against the nginx people run, warnings as errors:
#
#   debian-1.22.1-dynamic-gcc   Debian's nginx-dev (scripts/build-module.sh)
#   1.30.4-dynamic-gcc          nginx stable, --with-compat
#                               --add-dynamic-module
#   1.30.4-static-gcc           nginx stable, --add-module
#   1.31.4-dynamic-gcc          nginx mainline, --with-compat
#                               --add-dynamic-module
#   1.31.4-static-gcc           nginx mainline, --add-module (the binary
#                               the second pytest pass runs)
#   1.31.4-static-clang         the same with clang
#
#   dev/build-matrix.sh [name ...]          (default: all six)
#
# The upstream sources are nginx-<version>.tar.gz in ALM_NGINX_SOURCES
# (default: ../shared/nginx beside the repository).  They are unpacked
# once into build/nginx/; each build keeps its objects in
# build/matrix/<name>/objs, and configure runs again only when `config',
# the flags or the compiler change, so a second run only recompiles
# what changed.  ALM_JOBS sets make's -j (default 2).

set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
sources=${ALM_NGINX_SOURCES:-$top/../shared/nginx}
jobs=${ALM_JOBS:-2}

all="debian-1.22.1-dynamic-gcc 1.30.4-dynamic-gcc 1.30.4-static-gcc
     1.31.4-dynamic-gcc 1.31.4-static-gcc 1.31.4-static-clang"

# what every from-source build configures: the modules the tests and
# most packagers use, and debug logging, which the pytest suite reads
common_flags="--with-debug --with-threads --with-http_ssl_module
              --with-http_v2_module --with-http_realip_module
              --with-http_sub_module --with-http_gunzip_module
              --with-http_stub_status_module"
cc_opt="-O2 -Wall -Wextra -Werror"
# clang honours warning flags in order: -Wextra after nginx's own
# -Wno-unused-parameter would turn it back on for nginx's handlers,
# which ignore parameters by design
clang_opt="-O2 -Wall -Wextra -Wno-unused-parameter -Werror"

fail() {
    echo "build-matrix: $*" >&2
    exit 1
}

mkdir -p "$top/build/matrix" "$top/build/nginx"
exec 9>"$top/build/matrix/.lock"
flock 9

# unpacks nginx-<version> once; a changed tarball starts its builds over
unpack() {
    local v=$1 tgz stamp
    tgz=$sources/nginx-$v.tar.gz
    if [ ! -f "$tgz" ]; then
        fail "$tgz is missing: the nginx sources are expected in" \
             "../shared/nginx beside the repository, or in" \
             "ALM_NGINX_SOURCES"
    fi
    stamp=$(stat -c '%s %Y' "$tgz")
    if [ "$(cat "$top/build/nginx/nginx-$v.stamp" 2>/dev/null)" != "$stamp" ]
    then
        rm -rf "$top/build/nginx/nginx-$v" "$top"/build/matrix/"$v"-*
        tar -C "$top/build/nginx" -xzf "$tgz"
        [ -x "$top/build/nginx/nginx-$v/auto/configure" ] \
            || fail "$tgz holds no nginx-$v/auto/configure"
        printf '%s' "$stamp" > "$top/build/nginx/nginx-$v.stamp"
    fi
}

# one from-source build: <version> <dynamic|static> <cc>
build_upstream() {
    local name=$1 v=$2 link=$3 cc=$4 src dir objs flags stamp target opt

    unpack "$v"
    src=$top/build/nginx/nginx-$v
    dir=$top/build/matrix/$name
    objs=$dir/objs
    mkdir -p "$dir"

    opt=$cc_opt
    if [ "$cc" = clang ]; then
        opt=$clang_opt
    fi

    if [ "$link" = dynamic ]; then
        flags="--with-compat --add-dynamic-module=$top"
        target=modules
    else
        flags="--add-module=$top"
        target=binary
    fi

    # shellcheck disable=SC2086
    stamp="$(cat "$top/config"; echo $common_flags $flags $opt;
             $cc --version | head -n 1)"
    if [ ! -f "$objs/Makefile" ] \
       || [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]
    then
        rm -rf "$objs"
        # shellcheck disable=SC2086
        # objs named from $src: see scripts/build-module.sh
        (cd "$src" && auto/configure --with-cc="$cc" \
            --with-cc-opt="$opt" --builddir="../../matrix/$name/objs" \
            $common_flags $flags) > "$dir/configure.log" 2>&1 || {
            tail -n 30 "$dir/configure.log" >&2
            fail "$name: configure failed (see $dir/configure.log)"
        }
        printf '%s' "$stamp" > "$dir/.stamp"
    fi

    (cd "$src" && make -j"$jobs" -f "$objs/Makefile" $target) \
        > "$dir/make.log" 2>&1 || {
        grep -E 'error|warning' "$dir/make.log" | head -n 40 >&2
        fail "$name: make failed (see $dir/make.log)"
    }
    # -Werror turns compiler warnings into failures; the linker's too
    if grep -q 'warning:' "$dir/make.log"; then
        grep 'warning:' "$dir/make.log" >&2
        fail "$name: warnings (see $dir/make.log)"
    fi

    if [ "$link" = dynamic ]; then
        [ -f "$objs/ngx_http_anythingllm_module.so" ] \
            || fail "$name: no module built"
    else
        "$objs/nginx" -V 2>&1 | grep -q -- "--add-module=$top" \
            || fail "$name: the binary does not hold the module"
    fi
}

build_debian() {
    local dir=$top/build/module log
    log=$top/build/matrix/debian-1.22.1-dynamic-gcc.log
    "$top/scripts/build-module.sh" > "$log" 2>&1 || {
        cat "$log" >&2
        fail "debian-1.22.1-dynamic-gcc: build failed"
    }
    if grep -q 'warning:' "$log"; then
        grep 'warning:' "$log" >&2
        fail "debian-1.22.1-dynamic-gcc: warnings"
    fi
    grep -q -- '-Werror' "$dir/objs/Makefile" \
        || fail "debian-1.22.1-dynamic-gcc: built without -Werror"
}

version_of() {
    sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$1/src/core/nginx.h"
}

names=${*:-$all}
for name in $names; do
    start=$(date +%s)
    case $name in
        debian-1.22.1-dynamic-gcc)
            build_debian
            version="$(version_of /usr/share/nginx/src) (Debian nginx-dev)"
            compiler=$(cc --version | head -n 1)
            out=build/module/ngx_http_anythingllm_module.so
            ;;
        [0-9]*.[0-9]*.[0-9]*-dynamic-gcc | [0-9]*.[0-9]*.[0-9]*-static-gcc \
        | [0-9]*.[0-9]*.[0-9]*-static-clang)
            IFS=- read -r v link cc <<< "$name"
            build_upstream "$name" "$v" "$link" "$cc"
            version=$(version_of "$top/build/nginx/nginx-$v")
            compiler=$($cc --version | head -n 1)
            if [ "$link" = dynamic ]; then
                out=build/matrix/$name/objs/ngx_http_anythingllm_module.so
            else
                out=build/matrix/$name/objs/nginx
            fi
            ;;
        *)
            fail "unknown build $name (known: $(echo $all))"
            ;;
    esac
    printf 'build-matrix: %-26s nginx %s, %s: ok, no warning (%ds) -> %s\n' \
        "$name" "$version" "$compiler" $(( $(date +%s) - start )) "$out"
done
