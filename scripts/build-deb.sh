#!/usr/bin/env bash
# Builds the Debian package cargohold_VERSION_ARCH.deb with Debian's own tools (dpkg-deb),
# from the source tree this script is in:
#
#   scripts/build-deb.sh [OUT_DIR]     # default OUT_DIR: dist/; prints the .deb's path
#
# The package holds a virtual environment in /opt/cargohold on Debian's python3 with cargohold
# and its Python dependencies (fetched from PyPI by pip at build time, none at install time),
# /usr/bin/cargohold, the systemd unit, /etc/cargohold/node.toml, a logrotate file and the
# manual page cargohold(1). Its version is the project's plus the last commit's time and
# hash, so that a newer build of the tree upgrades an older one. Needs no root: python3-venv, python3-dev, gcc, libssl-dev and
# dpkg-deb (`scripts/install-deps.sh --test` installs them on a fresh machine).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
python=/usr/bin/python3  # Debian's: the package depends on it

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$src/pyproject.toml")
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    version="$version+git$(git -C "$src" log -1 --format=%ct).$(git -C "$src" log -1 --format=%h)"
    if [ -n "$(git -C "$src" status --porcelain --untracked-files=no)" ]; then
        version="$version.dirty$(date +%s)"
    fi
fi
arch=$(dpkg --print-architecture)

stage=$(mktemp -d /tmp/cargohold-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
venv="$root/opt/cargohold"

"$python" -m venv "$venv"
# a copy of the tree: pip builds in it (generated CSI modules, the C extension), not in src/
mkdir "$stage/src"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$src" && git ls-files --cached --others --exclude-standard | tar -cf - -T -) \
        | tar -xf - -C "$stage/src"
else
    cp -a "$src/." "$stage/src/"
fi
"$venv/bin/pip" install --quiet --no-compile --no-cache-dir "$stage/src"
"$venv/bin/python" -c 'import cargohold.core._xts, cargohold.stores._diskreads, cargohold.stores._blockio, cargohold.adapters.dataserver._fastio, cargohold.adapters.csi.csi_pb2'  # built?

# The venv was made in the stage: its scripts and config name the stage's path.
grep -rlI --null "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 sed -i "s|$venv|/opt/cargohold|g"
rm -rf "$venv/lib/python3"*/site-packages/pip "$venv/lib/python3"*/site-packages/pip-* \
       "$venv/bin/pip" "$venv/bin/pip3"*  # not needed to run; dpkg owns the tree
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +  # postinst compiles

install -d "$root/usr/bin" "$root/etc/cargohold" "$root/etc/logrotate.d" \
           "$root/lib/systemd/system" "$root/usr/share/doc/cargohold" \
           "$root/usr/share/man/man1" "$root/DEBIAN"
# cargohold(1), from the command line's own parser
"$venv/bin/python" -m cargohold.cli.manual | gzip -9n > "$root/usr/share/man/man1/cargohold.1.gz"
ln -s /opt/cargohold/bin/cargohold "$root/usr/bin/cargohold"
install -m 644 "$src/deploy/debian/node.toml" "$root/etc/cargohold/node.toml"
install -m 644 "$src/deploy/debian/cargohold.logrotate" "$root/etc/logrotate.d/cargohold"
install -m 644 "$src/deploy/systemd/cargohold.service" "$root/lib/systemd/system/"
install -m 644 "$src/README.md" "$root/usr/share/doc/cargohold/"
for script in postinst prerm postrm; do
    install -m 755 "$src/deploy/debian/$script" "$root/DEBIAN/"
done
install -m 644 "$src/deploy/debian/conffiles" "$root/DEBIAN/"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    "$src/deploy/debian/control" > "$root/DEBIAN/control"

deb="$out/cargohold_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build -Zxz -z3 "$root" "$deb" >/dev/null
echo "$deb"
