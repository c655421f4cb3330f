#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the whole suite
# (unit, integration, and system tests, which need root, /dev/fuse and loop devices).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
python3 -m ruff check src tests benchmarks
python3 -m mypy src
exec python3 -m pytest "$@"
