"""The daemon speaks sd_notify as a Type=notify unit with WatchdogSec expects."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import udp_port

from gatewayd.testing import Mosquitto


def test_ready_watchdog_status_and_stopping(tmp_path: Path, broker: Mosquitto) -> None:
    """READY=1 when serving, WATCHDOG=1 at half of WATCHDOG_USEC, STATUS= lines, STOPPING=1 on SIGTERM."""
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f'[coap]\nbind = "127.0.0.1"\nport = {udp_port()}\n[store]\npath = "{tmp_path}/s.db"\n'
        f"[mqtt]\nport = {broker.port}\n"
    )
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "600000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    got: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), sock.recv(4096).decode()))
            if sum("WATCHDOG=1" in m for _, m in got) >= 4:
                break
        proc.send_signal(signal.SIGTERM)
        stop_deadline = time.monotonic() + 20
        while proc.poll() is None or not any("STOPPING=1" in m for _, m in got):
            if time.monotonic() > stop_deadline:
                break
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), sock.recv(4096).decode()))
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    lines = [line for _, m in got for line in m.split("\n")]
    assert rc == 0
    assert "READY=1" in lines and "STOPPING=1" in lines
    assert any(line.startswith("STATUS=serving") for line in lines)
    ready_at = next(t for t, m in got if "READY=1" in m)
    beats = [t for t, m in got if "WATCHDOG=1" in m]
    assert len(beats) >= 4 and beats[0] > ready_at
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert all(0.15 < g < 0.6 for g in gaps), gaps  # about 0.3 s: half of the 0.6 s interval
