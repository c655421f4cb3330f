#!/usr/bin/env bash
# Installs cargohold and runs a node with the embedded default: SQLite metadata and three
# data servers (three directories) on this host, so that replication is real on one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
state=${CARGOHOLD_STATE_DIR:-/var/lib/cargohold}
exec cargohold node --state-dir "$state" \
  --data-dir "$state/disks/1" --data-dir "$state/disks/2" --data-dir "$state/disks/3"
