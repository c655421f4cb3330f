#!/usr/bin/env bash
# Creates cargohold's Docker managed plugin in the dockerd of DOCKER_HOST (as root), from the
# container image (scripts/build-image.sh) and deploy/docker/plugin:
#
#   scripts/build-plugin.sh [IMAGE] [NAME]   # IMAGE cargohold:latest (built if missing),
#                                            # NAME cargohold/cargohold:latest
#   docker plugin enable cargohold/cargohold:latest
#   docker volume create -d cargohold/cargohold:latest --name pgdata -o size=10G
#
# The plugin's root file system is the image's, with the node's settings for a plugin
# (deploy/docker/plugin/plugin.toml); config.json says what Docker gives it (CAP_SYS_ADMIN,
# /dev, the host's network and PIDs, /var/lib/cargohold as its propagated mount). To share
# it, name it REGISTRY/NAME:TAG and `docker plugin push` it; hosts then `docker plugin
# install` and later `docker plugin upgrade` it.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-cargohold:latest}
name=${2:-cargohold/cargohold:latest}
if ! docker image inspect "$image" >/dev/null 2>&1; then
    "$src/scripts/build-image.sh" "" "$image" >/dev/null
fi
dir=$(mktemp -d /tmp/cargohold-plugin.XXXXXX)
container=""
cleanup() {
    [ -z "$container" ] || docker rm -f "$container" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir "$dir/rootfs"
container=$(docker create "$image")
docker export "$container" | tar -x -C "$dir/rootfs"
install -m 644 "$src/deploy/docker/plugin/plugin.toml" "$dir/rootfs/etc/cargohold/plugin.toml"
# which build this is (each build's root file system differs, so an upgrade is one)
echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from image $(docker image inspect -f '{{.Id}}' "$image")" \
    > "$dir/rootfs/etc/cargohold/plugin-build"
install -m 644 "$src/deploy/docker/plugin/config.json" "$dir/config.json"
docker plugin create "$name" "$dir" >/dev/null
echo "$name"
