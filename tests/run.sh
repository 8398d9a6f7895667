#!/usr/bin/env bash
# Install and run the whole test suite (lint, types, tests) on a fresh Debian machine.
set -euo pipefail
GATEWAYD_EXTRAS="[test]"
GATEWAYD_APT_EXTRA="libcoap3-bin"
source "$(dirname "${BASH_SOURCE[0]}")/../examples/setup.sh"
cd "$ROOT"
"$VENV/bin/ruff" check gatewayd plugins tests examples
"$VENV/bin/mypy" gatewayd plugins/anomaly/gatewayd_anomaly examples/plugin-template/gatewayd_plugin_template
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests examples/plugin-template/tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest ran no tests: that is a failure"; exit 1; fi
exit $rc
