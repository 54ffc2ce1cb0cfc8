#!/usr/bin/env bash
# The `pipecat cloud` interoperability test against the release binary. Builds nothing: run
# `cargo build --release` first. Installs the pinned CLI into $PCC_VENV (default
# target/pcc-venv) when it is missing or holds other versions, then runs the test.
#   tests/cli/run.sh [BROKER_BINARY]      (default: target/release/session-broker)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${PCC_VENV:-target/pcc-venv}"
if [ ! -x "$venv/bin/pipecat" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/cli/requirements.txt
fi
export PCC_VENV="$venv"
exec python3 tests/cli/pcc_interop.py "${1:-target/release/session-broker}"
