#!/usr/bin/env bash
# Install and run the whole test suite (lint, types, tests) on a fresh Debian machine.
set -euo pipefail
GATEWAYD_EXTRAS="[test,models]"
GATEWAYD_APT_EXTRA="libcoap3-bin fonts-dejavu-core fonts-dejavu-extra"  # fonts: the OCR evaluation frames
source "$(dirname "${BASH_SOURCE[0]}")/../examples/setup.sh"
cd "$ROOT"
"$VENV/bin/ruff" check gatewayd plugins tests examples
"$VENV/bin/mypy" gatewayd plugins/anomaly/gatewayd_anomaly plugins/meter_ocr/gatewayd_meter_ocr \
  examples/plugin-template/gatewayd_plugin_template
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests examples/plugin-template/tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest ran no tests: that is a failure"; exit 1; fi
exit $rc
