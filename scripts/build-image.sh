#!/usr/bin/env bash
# Builds the container image of cargohold with no registry (as root, against the dockerd of
# DOCKER_HOST):
#
#   scripts/build-image.sh [DEB] [TAG]     # default DEB: a new build-deb.sh; TAG cargohold:latest
#
# Its base is Debian 12 made from Debian's packages alone: debootstrap into a folder (with
# the packages cargohold depends on), `docker import` of it as cargohold-base:bookworm. Then
# deploy/docker/Dockerfile installs the Debian package into it, so that the image runs exactly
# what the package installs. The base's tarball is kept in dist/ and reused by later builds;
# DEBIAN_MIRROR chooses where debootstrap downloads from.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
deb=${1:-}
tag=${2:-cargohold:latest}
base=cargohold-base:bookworm
packages=python3,fuse3,util-linux,mount,e2fsprogs,xfsprogs,libssl3
mkdir -p "$src/dist"
rootfs_tar="$src/dist/debian-bookworm-rootfs.tar"

if [ -z "$deb" ]; then
    deb=$("$src/scripts/build-deb.sh" "$src/dist" | tail -1)
fi
if ! docker image inspect "$base" >/dev/null 2>&1; then
    if [ ! -s "$rootfs_tar" ]; then
        rootfs=$(mktemp -d /tmp/cargohold-rootfs.XXXXXX)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" \
            "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
        # what a container never uses: downloaded packages, apt's lists, docs and locales
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
               "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
        tar -C "$rootfs" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
    fi
    docker import --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$base" >/dev/null
fi
context=$(mktemp -d /tmp/cargohold-image.XXXXXX)
trap 'rm -rf "$context" ${rootfs:+"$rootfs"}' EXIT
cp "$deb" "$context/cargohold.deb"
# --network none: the build downloads nothing (dockerd here may have no bridge network)
docker build -q --network none --build-arg "BASE=$base" -t "$tag" \
    -f "$src/deploy/docker/Dockerfile" "$context" >/dev/null
echo "$tag"
