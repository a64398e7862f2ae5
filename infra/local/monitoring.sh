#!/usr/bin/env bash
# Prometheus (and Grafana, when installed) for the local stack, on 127.0.0.1 only, with the
# project's configuration: infra/prometheus/prometheus.yml (its service-discovery path pointed at
# RAY_TEMP_DIR) and infra/grafana/ (data source + the pipeline's dashboard + Ray's own).
# Starts them in the background and writes their pids to $CNC_MONITORING_DIR/*.pid.
#
# Prometheus: Debian/Ubuntu `apt-get install prometheus` (or a release binary on PATH).
# Grafana: https://grafana.com/docs/grafana/latest/setup-grafana/installation/ (optional).
# Settings (environment): RAY_TEMP_DIR (/tmp/ray), PROMETHEUS_PORT (9090), GRAFANA_PORT (3000),
# CNC_MONITORING_DIR (/tmp/cnc-monitoring), PROMETHEUS_BIN, GRAFANA_BIN (`none`: no Grafana).
set -euo pipefail
INFRA=$(cd "$(dirname "$0")/.." && pwd)
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
DIR=${CNC_MONITORING_DIR:-/tmp/cnc-monitoring}
PROMETHEUS_BIN=${PROMETHEUS_BIN:-$(command -v prometheus || true)}
GRAFANA_BIN=${GRAFANA_BIN:-$(command -v grafana-server || command -v grafana || true)}
mkdir -p "$DIR/prometheus-data"
if [[ -z "$PROMETHEUS_BIN" ]]; then
  echo "prometheus not found: install it (apt-get install prometheus) or set PROMETHEUS_BIN" >&2
  exit 1
fi
sed "s#/tmp/ray/prom_metrics_service_discovery.json#$RAY_TEMP_DIR/prom_metrics_service_discovery.json#" \
  "$INFRA/prometheus/prometheus.yml" > "$DIR/prometheus.yml"
"$PROMETHEUS_BIN" --config.file "$DIR/prometheus.yml" --storage.tsdb.path "$DIR/prometheus-data" \
  --web.listen-address "127.0.0.1:${PROMETHEUS_PORT:-9090}" >"$DIR/prometheus.log" 2>&1 &
echo $! > "$DIR/prometheus.pid"
echo "Prometheus: http://127.0.0.1:${PROMETHEUS_PORT:-9090} (log $DIR/prometheus.log)"
if [[ -n "$GRAFANA_BIN" && "$GRAFANA_BIN" != none ]]; then
  export CNC_INFRA=$INFRA RAY_TEMP_DIR CNC_PROMETHEUS_URL="http://127.0.0.1:${PROMETHEUS_PORT:-9090}"
  # Loopback only; anonymous viewers and embedding so that the Ray dashboard's Metrics tab can
  # show the panels. Do not copy these settings to a Grafana reachable from a network.
  GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT=${GRAFANA_PORT:-3000} \
  GF_PATHS_PROVISIONING="$INFRA/grafana/provisioning" GF_PATHS_DATA="$DIR/grafana-data" \
  GF_SECURITY_ALLOW_EMBEDDING=true GF_AUTH_ANONYMOUS_ENABLED=true GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
    "$GRAFANA_BIN" server --homepath "${GRAFANA_HOME:-/usr/share/grafana}" >"$DIR/grafana.log" 2>&1 &
  echo $! > "$DIR/grafana.pid"
  echo "Grafana: http://127.0.0.1:${GRAFANA_PORT:-3000} (dashboard 'Compose and Conquer pipeline')"
else
  echo "grafana not found: the panels are in infra/grafana/dashboards/cnc-pipeline.json (import by hand)" >&2
fi
