#!/usr/bin/env bash
# A persistent local stack: Prefect server (SQLite), a process work pool and worker, a local Ray
# with its dashboard. `make demo` does not need this (it uses Prefect's ephemeral server).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:4200/api}
"$BIN/ray" start --head --dashboard-host 127.0.0.1 --metrics-export-port 8080 >/dev/null
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
"$BIN/prefect" server start --host 127.0.0.1 --port 4200 >/tmp/cnc-prefect-server.log 2>&1 &
until curl -sf "$PREFECT_API_URL/health" >/dev/null; do sleep 1; done
"$BIN/prefect" work-pool create cnc-local --type process >/dev/null 2>&1 || true
"$BIN/prefect" --no-prompt deploy --all
echo "Prefect UI: http://127.0.0.1:4200   Ray dashboard: http://127.0.0.1:8265"
echo "starting a worker (Ctrl-C to stop); runs use the Ray at RAY_ADDRESS=$RAY_ADDRESS"
exec "$BIN/prefect" worker start --pool cnc-local
