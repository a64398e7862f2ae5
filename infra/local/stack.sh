#!/usr/bin/env bash
# A persistent local stack: a locked-down local Ray (ray-head.sh: token auth, everything on
# 127.0.0.1), Prometheus and Grafana if installed (monitoring.sh), a Prefect server (SQLite) on
# 127.0.0.1, a process work pool and a worker. `make demo` does not need this (it uses Prefect's
# ephemeral server). What listens where: infra/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export BIN=${BIN:-.venv/bin}
export PREFECT_API_URL=${PREFECT_API_URL:-http://127.0.0.1:4200/api}
export RAY_AUTH_MODE=token
# Drivers on this machine (the worker's flow runs) must see the head's loopback address too.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}; fi
# the Ray dashboard's Metrics tab embeds Grafana's panels and queries Prometheus
export RAY_GRAFANA_HOST=${RAY_GRAFANA_HOST:-http://127.0.0.1:3000}
export RAY_PROMETHEUS_HOST=${RAY_PROMETHEUS_HOST:-http://127.0.0.1:9090}
infra/local/ray-head.sh >/dev/null
export RAY_ADDRESS=${RAY_ADDRESS:-127.0.0.1:${RAY_PORT:-6379}}
infra/local/monitoring.sh || echo "monitoring not started (see infra/README.md)"
"$BIN/prefect" server start --host 127.0.0.1 --port 4200 >/tmp/cnc-prefect-server.log 2>&1 &
until curl -sf "$PREFECT_API_URL/health" >/dev/null; do sleep 1; done
"$BIN/prefect" work-pool create cnc-local --type process >/dev/null 2>&1 || true
"$BIN/prefect" work-pool create cnc-cluster --type process >/dev/null 2>&1 || true  # deploy --all needs every pool
"$BIN/prefect" --no-prompt deploy --all
echo "Prefect UI: http://127.0.0.1:4200   Ray dashboard: http://127.0.0.1:${DASHBOARD_PORT:-8265} (token: $BIN/ray get-auth-token)"
echo "Prometheus: http://127.0.0.1:9090   Grafana: http://127.0.0.1:3000 (when installed)"
echo "starting a worker (Ctrl-C to stop); runs use the Ray at RAY_ADDRESS=$RAY_ADDRESS"
exec "$BIN/prefect" worker start --pool cnc-local
