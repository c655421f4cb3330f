#!/usr/bin/env bash
# Installs what cargohold needs on a fresh Debian machine (as root), then cargohold itself.
#   scripts/install-deps.sh          runtime: FUSE, loop/mount tools, file systems
#   scripts/install-deps.sh --test   plus what the test suite and benchmarks need
set -euo pipefail
cd "$(dirname "$0")/.."
# gcc and OpenSSL's headers build the block cipher of encrypted volumes (core/_xts.c)
packages=(fuse3 util-linux mount e2fsprogs xfsprogs gcc libssl-dev)
bare=()
if [[ "${1:-}" == "--test" ]]; then
  packages+=(fio docker.io etcd-server busybox-static iproute2 curl)
  # the C extensions' frame parsers are fuzzed with libFuzzer (tests/unit/test_frames.py)
  packages+=(clang)
  # the Debian package, the container image and the managed plugin: their builds
  # (scripts/build-*.sh) and tests (a registry on loopback for plugin push and upgrade)
  packages+=(python3-venv python3-dev logrotate debootstrap docker-registry)
  # metrics: a real Prometheus server, promtool and node_exporter; the dashboard: a real
  # browser (all without their recommends: fonts and the like)
  bare=(prometheus prometheus-node-exporter chromium chromium-driver)
fi
absent() {
  for p in "$@"; do
    [[ -n "$p" ]] || continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}
mapfile -t missing < <(absent "${packages[@]}")
mapfile -t missing_bare < <(absent "${bare[@]:-}")
if ((${#missing[@]} + ${#missing_bare[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ((${#missing[@]})); then
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#missing_bare[@]})); then
    apt-get install -y -qq --no-install-recommends "${missing_bare[@]}" >/dev/null
  fi
fi
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
