"""JSON files replaced atomically and durably: a crash leaves the old file or the new one, never half.

Import-light on purpose (stdlib only): plugin workers import :mod:`gatewayd.bundle`, and
``check-config`` imports :mod:`gatewayd.credentials`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write(path: Path, data: Mapping[str, Any], *, mode: int = 0o644, sort_keys: bool = False) -> None:
    """Indented JSON with a final newline, written to a temporary file beside ``path``, synced, then
    renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
