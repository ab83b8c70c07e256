"""The systemd notify protocol (sd_notify), without libsystemd: one datagram per state change.

READY=1 once every component is up, WATCHDOG=1 from the main loop at half the
configured WatchdogSec, RELOADING=1/READY=1 around a configuration reload, and
STOPPING=1 on shutdown; EXTEND_TIMEOUT_USEC while a long start makes progress
(the instance store checked after a power loss). Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(self.address)
            s.sendall("\n".join(fields).encode())
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *( [f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd 253+ wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older ones ignore it.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        """Start or stop is taking long and still progressing: systemd waits ``seconds`` more from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", *([f"STATUS={status}"] if status else []))
