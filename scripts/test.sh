#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs the whole suite
# (unit, integration, and system tests, which need root, /dev/fuse and loop devices).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
python3 -m ruff check src tests benchmarks
python3 -m mypy src
# what the install wrote is still being written back: flush it now, so that the first tests'
# fsyncs (the metadata store's lease renewals among them, 2 s leases) do not queue behind it
sync
exec python3 -m pytest "$@"
