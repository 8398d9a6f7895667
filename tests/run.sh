#!/usr/bin/env bash
# Install and run the whole test suite (lint, types, tests) on a fresh Debian machine.
set -euo pipefail
GATEWAYD_EXTRAS="[test,models]"
# fonts: the OCR evaluation frames; systemd: systemd-analyze (the unit's security score, tests/test_unit.py)
# and libseccomp2 (tests/unit_sandbox.py), also on machines where systemd is not PID 1.
GATEWAYD_APT_EXTRA="libcoap3-bin fonts-dejavu-core fonts-dejavu-extra systemd"
source "$(dirname "${BASH_SOURCE[0]}")/../examples/setup.sh"
cd "$ROOT"
"$VENV/bin/ruff" check gatewayd plugins tests examples
"$VENV/bin/mypy" gatewayd plugins/anomaly/gatewayd_anomaly plugins/meter_ocr/gatewayd_meter_ocr plugins/glm/gatewayd_glm \
  examples/plugin-template/gatewayd_plugin_template
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests examples/plugin-template/tests "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest ran no tests: that is a failure"; exit 1; fi
exit $rc
