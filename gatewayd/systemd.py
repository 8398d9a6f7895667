"""sd_notify: READY, WATCHDOG, STOPPING and STATUS for a Type=notify unit.

Ten lines of socket code instead of a dependency; a no-op outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to systemd; False when not run under a notify unit."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The unit's WatchdogSec in seconds, if the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
