#!/usr/bin/env bash
# Shared set-up for examples/demo.sh and tests/run.sh: Debian packages when missing, then a virtualenv
# in .venv with gatewayd and the reference plugins installed. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GATEWAYD_VENV:-$ROOT/.venv}"

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
for pkg in ${GATEWAYD_APT_EXTRA:-}; do need_apt+=("$pkg"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  missing=()
  for pkg in "${need_apt[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
# Ubuntu/Debian start mosquitto as a service on install; the demo uses it if it listens on 1883.

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
pip_log="$(mktemp)"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
    -e "$ROOT${GATEWAYD_EXTRAS:-}" -e "$ROOT/plugins/anomaly" -e "$ROOT/plugins/meter_ocr" -e "$ROOT/plugins/glm" \
    -e "$ROOT/examples/plugin-template" \
    >"$pip_log" 2>&1; then
  cat "$pip_log"; rm -f "$pip_log"; exit 1
fi
rm -f "$pip_log"
