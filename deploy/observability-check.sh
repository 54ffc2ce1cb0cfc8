#!/usr/bin/env bash
# Checks the Grafana dashboard, the Prometheus alerts and their tests against the metrics a real
# broker exports (deploy/observability_check.py says what is checked). Builds nothing: give it
# the broker binary, by default the release build.
#   deploy/observability-check.sh [path/to/session-broker]
set -euo pipefail
cd "$(dirname "$0")/.."

broker=${1:-${CARGO_TARGET_DIR:-target}/release/session-broker}
if [ ! -x "$broker" ]; then
  echo "no broker binary at $broker: cargo build --release --bin session-broker" >&2
  exit 2
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool not found: apt-get install prometheus (Debian) or put Prometheus's promtool on PATH" >&2
  exit 2
fi
python3 -c 'import websockets, yaml' 2>/dev/null || pip install -q websockets pyyaml

exec python3 deploy/observability_check.py "$broker"
