#!/usr/bin/env bash
# Install and run the demo: gatewayd on its built-in config, a simulated pump node, MQTT traffic printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$VENV/bin/gatewayd" demo "$@"
