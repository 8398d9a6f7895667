"""Misbehaving plugins for supervision tests, loaded by ``module:Class`` (tests/ is on PYTHONPATH).

``Echo`` misbehaves only while the file named by option ``flag`` exists, so a test can end the
fault and watch the plugin recover. Option ``fault`` picks how.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from gatewayd.plugin_api import Plugin, PluginNotReady, Reading, Result

FAULTS = ("load", "not_ready", "crash", "segv", "hang", "raise", "leak")
_leaked: list[bytes] = []


class Echo(Plugin):
    """Answers each reading with its field names, the batch size, its pid and threads.

    Per reading: field ``sleep`` sleeps that long, ``boom`` raises, ``crash`` exits the process.
    """

    name = "echo"
    version = "1"

    def __init__(self, options: dict[str, object]) -> None:
        super().__init__(options)
        self.fault = str(options.get("fault", ""))
        if self.fault and self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        self.flag = Path(str(options.get("flag", "/nonexistent")))

    def _faulty(self) -> bool:
        return bool(self.fault) and self.flag.exists()

    def load(self) -> None:
        if self._faulty() and self.fault == "load":
            raise RuntimeError("load failure requested")
        if self._faulty() and self.fault == "not_ready":
            raise PluginNotReady("model not there yet")

    def sample(self) -> Sequence[Reading]:
        return [Reading("warmup", "n", 0.0, {"x": 1})]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        started = time.time()
        if batch and batch[0].id != "warmup" and self._faulty():
            if self.fault == "crash":
                os._exit(3)
            if self.fault == "segv":
                ctypes.string_at(0)  # a segfault, as native inference code might
            if self.fault == "hang":
                time.sleep(3600)
            if self.fault == "raise":
                raise RuntimeError("batch failure requested")
            if self.fault == "leak":
                _leaked.append(os.urandom(40 * 1024 * 1024))
        for r in batch:
            if "crash" in r.fields:
                os._exit(3)
            if "boom" in r.fields:
                raise ValueError("boom requested")
            if "sleep" in r.fields:
                time.sleep(float(r.fields["sleep"]))  # type: ignore[arg-type]
        return [
            Result(
                r.id,
                {
                    "fields": sorted(r.fields),
                    "batch": len(batch),
                    "pid": os.getpid(),
                    "t": started,
                    "threads": self.threads,
                    "omp": os.environ.get("OMP_NUM_THREADS"),
                    "cpus": sorted(os.sched_getaffinity(0)),
                },
            )
            for r in batch
        ]


class NotAPlugin:
    """Something that is not a Plugin subclass."""


class Versioned(Plugin):
    """A plugin whose "model" is a bundle folder (option ``model``) with a ``model.json``:
    ``{"answer": ..., "sleep_ms": 0, "fail_load": false, "fail_after": null}``, to make model
    updates that disagree, are slow, fail to load or fail after some readings."""

    name = "versioned"
    bundle_option = "model"
    answer_keys = ("answer",)

    def __init__(self, options: dict[str, object]) -> None:
        super().__init__(options)
        self.folder = Path(str(options["model"]))
        self.served = 0

    def load(self) -> None:
        from gatewayd.bundle import verify_for_gateway

        self.model_version = verify_for_gateway(self.folder).version
        self.spec = json.loads((self.folder / "model.json").read_text())
        if self.spec.get("fail_load"):
            raise RuntimeError(f"model {self.model_version} does not load")

    def sample(self) -> Sequence[Reading]:
        return [Reading("warmup", "n", 0.0, {"x": 1})]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        if batch and batch[0].id != "warmup":
            self.served += len(batch)
            fail_after = self.spec.get("fail_after")
            if fail_after is not None and self.served > fail_after:
                raise RuntimeError(f"model {self.model_version} fails")
        time.sleep(self.spec.get("sleep_ms", 0) / 1000 * len(batch))
        data = {"answer": self.spec["answer"], "version": self.model_version, "pid": os.getpid()}
        return [Result(r.id, data) for r in batch]
