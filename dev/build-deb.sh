#!/bin/bash
# Builds the Debian package libnginx-mod-http-anythingllm_<version>_<arch>.deb
# from debian/ with dpkg-buildpackage (dh with the nginx sequence of
# nginx-dev), then checks it with lintian.
#
#   dev/build-deb.sh [outdir]
#
# The package lands in <outdir> (default build/deb).  The build runs on a
# copy of the tree under build/deb-src, so that the repository stays clean.
# Installs its build dependencies with apt-get when missing (needs root).

set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/build/deb}
work=$top/build/deb-src
# Debian's nginx build names its objects from an absolute path, where
# configure takes a ".S" for an assembler source's suffix: such a
# checkout builds the package elsewhere
case "$work" in
    *.S*) work=/tmp/anythingllm-deb-src.$(id -u) ;;
esac
pkg=libnginx-mod-http-anythingllm

"$top/dev/install-deps.sh" deb

# one version for everything: VERSION, and debian/changelog follows it
version=$(sed -n '1{s/[[:space:]]//g;p;}' "$top/VERSION")
changelog=$(cd "$top" && dpkg-parsechangelog -S Version)
if [ "$version" != "$changelog" ]; then
    echo "build-deb: VERSION says $version, debian/changelog says" \
         "$changelog: add a changelog entry (dch -v $version)" >&2
    exit 1
fi

arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=${pkg}_${version}_${arch}.deb

mkdir -p "$out" "$work"

# one package build at a time on the machine: they all configure inside
# nginx-dev's source tree (below)
exec 9</usr/share/nginx/src
flock 9

src=$work/$pkg-$version
rm -rf "$work/$pkg"-* "$work/${pkg}_"*
mkdir -p "$src"

# only what the package is made of
(cd "$top" && tar -cf - VERSION LICENSE README.md config conf debian \
     ngx_anythingllm_module scripts/anythingllm-keys) | tar -C "$src" -xf -

# nginx's configure, run by the nginx_mod build system inside nginx-dev's
# shared source tree, leaves a Makefile there: remove it again unless it
# was there before
ngx_makefile=/usr/share/nginx/src/Makefile
if [ -e $ngx_makefile ]; then
    keep_makefile=1
else
    keep_makefile=0
fi

cleanup() {
    if [ $keep_makefile = 0 ]; then
        rm -f $ngx_makefile
    fi
}
trap cleanup EXIT

(cd "$src" && dpkg-buildpackage -us -uc -b) > "$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed, see $work/build.log" >&2
    exit 1
}

# the package, its detached debug symbols, and the build's records
for f in "$deb" "${pkg}-dbgsym_${version}_${arch}.deb" \
         "${pkg}_${version}_${arch}.buildinfo" \
         "${pkg}_${version}_${arch}.changes"
do
    if [ -e "$work/$f" ]; then
        mv -f "$work/$f" "$out/$f"
    fi
done

echo "built $out/$deb"

# errors fail the build; warnings and notes are shown
lintian --fail-on error --info "$out/$deb"
echo "lintian: no errors in $deb"
