#!/usr/bin/env bash
# Prometheus (and Grafana, where it is installed) next to a running `vllm serve`, on a bare machine.
#   deploy/monitor.sh [--target HOST:PORT] [--prometheus-port N] [--grafana-port N] [--interval 5s]
#                     [--listen ADDR] [--data DIR]
# Defaults: target 127.0.0.1:8000, Prometheus 9090, Grafana 3000, listening on 127.0.0.1 only.
# Runs in the foreground; Ctrl-C (or SIGTERM) stops both. Debian/Ubuntu: apt-get install prometheus.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=127.0.0.1:8000 pport=9090 gport=3000 interval=5s listen=127.0.0.1 data=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --prometheus-port) pport=$2; shift 2 ;;
    --grafana-port) gport=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --listen) listen=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "monitor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! command -v prometheus >/dev/null; then
  echo "monitor.sh: prometheus is not installed. Debian/Ubuntu: apt-get install prometheus;" \
       "elsewhere: a release from prometheus.io, or deploy/compose.yaml" >&2
  exit 2
fi
data=${data:-$(mktemp -d -t caps-monitor-XXXXXX)}
mkdir -p "$data"
sed -e "s|\"vllm:8000\"|\"$target\"|" -e "s|scrape_interval: 5s|scrape_interval: $interval|" \
  "$here/prometheus/prometheus.yml" > "$data/prometheus.yml"

pids=()
stop() { trap - EXIT INT TERM; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

prometheus --config.file="$data/prometheus.yml" --storage.tsdb.path="$data/tsdb" \
  --web.listen-address="$listen:$pport" --log.level=warn &
pids+=($!)
echo "Prometheus: http://$listen:$pport  (scrapes http://$target/metrics every $interval; data in $data)"

grafana_bin=$(command -v grafana || command -v grafana-server || true)
if [ -n "$grafana_bin" ]; then
  export PROMETHEUS_URL="http://127.0.0.1:$pport" CAPS_DASHBOARDS="$here/grafana/dashboards" \
    GF_PATHS_PROVISIONING="$here/grafana/provisioning" GF_PATHS_DATA="$data/grafana" \
    GF_SERVER_HTTP_ADDR="$listen" GF_SERVER_HTTP_PORT="$gport" GF_AUTH_ANONYMOUS_ENABLED=true
  home=/usr/share/grafana
  if [ "$(basename "$grafana_bin")" = grafana ]; then
    "$grafana_bin" server --homepath "$home" &
  else
    "$grafana_bin" --homepath "$home" &
  fi
  pids+=($!)
  echo "Grafana:    http://$listen:$gport/d/caps-vllm  (dashboard 'CAPS: expert load and latency')"
else
  echo "Grafana:    not installed here; import deploy/grafana/dashboards/caps-vllm.json into yours" \
       "(datasource uid caps-prometheus), or run deploy/compose.yaml"
fi
wait -n
