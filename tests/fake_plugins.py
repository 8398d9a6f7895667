"""Misbehaving plugins for supervision tests, loaded by ``module:Class`` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from gatewayd.plugin_api import Plugin, Reading, Result


class Echo(Plugin):
    """Returns each reading's field names; crashes the process on a reading with field ``crash``,
    hangs on ``hang``, raises on ``boom``."""

    name = "echo"
    version = "1"

    def load(self) -> None:
        if os.environ.get("GATEWAYD_TEST_FAIL_LOAD"):
            raise RuntimeError("load failure requested")

    def sample(self) -> Sequence[Reading]:
        return [Reading("warmup", "n", 0.0, {"x": 1})]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        for r in batch:
            if "crash" in r.fields:
                os._exit(3)
            if "hang" in r.fields:
                time.sleep(3600)
            if "boom" in r.fields:
                raise ValueError("boom requested")
        return [
            Result(r.id, {"fields": sorted(r.fields), "batch": len(batch), "pid": os.getpid()}) for r in batch
        ]


class NotAPlugin:
    """Something that is not a Plugin subclass."""
