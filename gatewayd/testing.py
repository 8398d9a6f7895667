"""Helpers to run things for real without the daemon: a plugin in-process, a local Mosquitto.

Plugin authors: ``run_plugin(MyPlugin, [reading(...)])`` loads the plugin, warms
it up on its ``sample()`` and returns its results for the given readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from gatewayd.plugin_api import FieldValue, Plugin, Reading, Result
from gatewayd.supervisor import BatchFailed, WorkerFailed

__all__ = [
    "BatchFailed", "Mosquitto", "WorkerFailed", "free_port", "port_open", "reading", "run_plugin",
    "run_plugin_in_worker",
]  # fmt: skip


def reading(node: str = "node-1", id: str = "r-1", ts: float = 0.0, **fields: FieldValue) -> Reading:
    """A Reading with the given fields, for tests."""
    return Reading(id=id, node=node, ts=ts or time.time(), fields=fields)


def run_plugin(
    cls: type[Plugin], batch: Sequence[Reading], options: Mapping[str, Any] | None = None
) -> list[Result]:
    """Load ``cls`` as the worker would, warm it up, and process ``batch`` in this process."""
    plugin = cls(options or {})
    plugin.load()
    plugin.process(list(plugin.sample()))
    return list(plugin.process(list(batch)))


def run_plugin_in_worker(
    target: str, batch: Sequence[Reading], options: Mapping[str, Any] | None = None, threads: int = 1,
    timeout_s: float = 120.0,
) -> list[Result]:  # fmt: skip
    """Run ``target`` ("module:Class" or an entry-point name) in a real worker process, as the
    daemon does, and return its results for ``batch``.

    Raises :class:`WorkerFailed` (load failed, crashed, timed out) or :class:`BatchFailed`
    (``process`` raised), both importable from here.
    """
    from gatewayd.registry import resolve
    from gatewayd.supervisor import Worker

    async def go() -> list[Result]:
        worker = await Worker.start(threads)
        try:
            await worker.load(resolve(target), dict(options or {}), threads, timeout_s)
            results = await worker.process(list(batch), timeout_s)
        finally:
            await worker.stop()
        return [Result(rid, data) for rid, data in results.items()]

    return asyncio.run(go())


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 right now (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


class Mosquitto:
    """A private Mosquitto broker on a free loopback port; ``stop``/``start`` simulate an outage."""

    def __init__(
        self, port: int | None = None, *, persistence: bool = False, extra_conf: Sequence[str] = ()
    ) -> None:
        """``extra_conf``: more mosquitto.conf lines for the listener (``cafile``, ``require_certificate``,
        ``password_file``, ``allow_anonymous false``, ...); anonymous clients are allowed unless set."""
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto')")
        self.exe = exe
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gatewayd-mosquitto-"))
        extra = list(extra_conf)
        if not any(line.split()[:1] == ["allow_anonymous"] for line in extra):
            extra.append("allow_anonymous true")
        # As root, mosquitto would switch to the "mosquitto" user and could neither read files a test
        # wrote (password file, certificates) nor write its persistence into this 0700 directory.
        user = pwd.getpwuid(os.getuid()).pw_name
        conf = [f"listener {self.port} 127.0.0.1", *extra, "log_dest stdout", f"user {user}"]
        if persistence:
            conf += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        log = (self.dir / "broker.log").open("ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {(self.dir / 'broker.log').read_text()[-500:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
