"""A plugin module that fails to import while the file named by $GATEWAYD_TEST_IMPORT_FLAG exists."""

from __future__ import annotations

import os
from pathlib import Path

from fake_plugins import Echo

if (_flag := os.environ.get("GATEWAYD_TEST_IMPORT_FLAG")) and Path(_flag).exists():
    raise ImportError("import failure requested by the test")

__all__ = ["Echo"]
