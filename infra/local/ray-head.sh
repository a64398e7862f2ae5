#!/usr/bin/env bash
# The local stack's Ray head, locked down: token authentication on, and GCS, dashboard, metrics and
# every other Ray port bound to 127.0.0.1 (--node-ip-address), so nothing is reachable off this
# machine and nothing on it runs a job without the token. stack.sh runs this; so do the tests.
#
# The token: RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token),
# created (mode 600) if missing. Clients on this machine (ray job submit, the Prefect worker, the
# dashboard in a browser) read the same file; `ray get-auth-token` prints it.
#
# Settings (environment): BIN (folder of the ray executable), RAY_PORT (6379), DASHBOARD_PORT
# (8265), METRICS_PORT (8080), DASHBOARD_AGENT_PORT (52365), CLIENT_PORT (10001), RAY_TEMP_DIR (/tmp/ray; Prometheus' service-discovery file is
# written there), RAY_NUM_CPUS (all), RAY_BLOCK=1 to stay in the foreground (--block),
# RAY_EXTRA_ARGS (more `ray start` arguments).
set -euo pipefail
BIN=${BIN:-.venv/bin}
export RAY_AUTH_MODE=token
# Ray resolves --node-ip-address 127.0.0.1 to the machine's routable address unless told that this
# is a single-machine Ray (the switch Ray uses on macOS/Windows): then GCS, raylet, dashboard and
# the metrics endpoint listen on loopback only.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
  fi
fi
args=(--head --node-ip-address 127.0.0.1 --port "${RAY_PORT:-6379}"
      --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT:-8265}"
      --metrics-export-port "${METRICS_PORT:-8080}" --dashboard-agent-listen-port "${DASHBOARD_AGENT_PORT:-52365}"
      --ray-client-server-port "${CLIENT_PORT:-10001}" --temp-dir "${RAY_TEMP_DIR:-/tmp/ray}"
      --disable-usage-stats)
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus "$RAY_NUM_CPUS")
[[ "${RAY_BLOCK:-0}" == 1 ]] && args+=(--block)
# shellcheck disable=SC2206 # word splitting of the extra arguments is wanted
[[ -n "${RAY_EXTRA_ARGS:-}" ]] && args+=($RAY_EXTRA_ARGS)
exec "$BIN/ray" start "${args[@]}"
