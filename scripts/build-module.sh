#!/bin/bash
# Builds ngx_http_anythingllm_module.so against Debian's nginx-dev so
# that the stock /usr/sbin/nginx loads it.
#
#   scripts/build-module.sh [--asan] [outdir]
#
# The result is <outdir>/ngx_http_anythingllm_module.so (default
# build/module, or build/asan with --asan).

set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
src=/usr/share/nginx/src

asan=0
if [ "${1:-}" = "--asan" ]; then
    asan=1
    shift
fi

if [ $asan = 1 ]; then
    out=${1:-$top/build/asan}
    cc_opt="-g -O1 -fPIC -fno-omit-frame-pointer -fsanitize=address,undefined"
    ld_opt="-fPIC -fsanitize=address,undefined"
else
    # A call from one of the module's files to a function of another
    # binds inside the module, not through the PLT: nothing outside it
    # may interpose its functions (-fno-semantic-interposition lets the
    # compiler inline them within a file, -Bsymbolic-functions has the
    # linker bind the calls between files)
    out=${1:-$top/build/module}
    cc_opt="-g -O2 -fPIC -fno-semantic-interposition -Wextra"
    cc_opt="$cc_opt -Wno-unused-parameter"
    ld_opt="-fPIC -Wl,-Bsymbolic-functions"
fi

if [ ! -f $src/conf_flags ]; then
    echo "build-module: $src is missing: install nginx-dev" >&2
    exit 1
fi
mkdir -p "$out"

# conf/*.conf keep their logs and temp files there (nginx -t -p "$PWD")
mkdir -p "$top/build/run"

# several builds may run at once (tests, editors): one at a time
exec 9>"$out/.lock"
flock 9

# configure writes into its source tree: work on a private copy, and
# configure again only when the addon file, the version it reads or the
# flags change
stamp="$(cat "$top/config" "$top/VERSION"; echo "$cc_opt $ld_opt")"
if [ ! -f "$out/objs/Makefile" ] || [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]
then
    rm -rf "$out/nginx-src" "$out/objs"
    cp -a $src "$out/nginx-src"
    cd "$out/nginx-src"

    # shellcheck disable=SC1091
    . ./conf_flags

    # objs is named relative to nginx-src: configure's seds that turn
    # sources into objects would take a ".S" in an absolute path for an
    # assembler source's suffix (a checkout in /tmp/tmp.S1x2 would not
    # build)
    ./configure --with-cc-opt="$cc_opt" --with-ld-opt="$ld_opt" \
        "${NGX_CONF_FLAGS[@]}" --add-dynamic-module="$top" \
        --builddir=../objs > "$out/configure.log" 2>&1 || {
        cat "$out/configure.log" >&2
        exit 1
    }

    printf '%s' "$stamp" > "$out/.stamp"
fi

cd "$out/nginx-src"
make -s -f "$out/objs/Makefile" modules

cp "$out/objs/ngx_http_anythingllm_module.so" "$out/.module.so.tmp"
mv -f "$out/.module.so.tmp" "$out/ngx_http_anythingllm_module.so"
echo "built $out/ngx_http_anythingllm_module.so"
