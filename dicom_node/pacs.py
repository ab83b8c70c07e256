"""PACS peers for the demo and the tests: a real Orthanc, or a built-in storage SCP.

Orthanc from its Debian package runs as a plain process with a temporary
configuration (storage directory, DICOM and HTTP ports; HTTP on loopback only).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process.

    The kernel may give the same free port to two bind(0) calls in a row; a peer or node configured with
    ports picked here but not yet listening (a PACS started later) would then collide with another one.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no unused loopback port found in 100 tries")


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 30.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL: for the peers and nodes started by tests and the bench."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:``port``; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)


class OrthancPACS:
    kind = "Orthanc"

    def __init__(self, workdir: str | Path, *, aet: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None, tcp_nodelay: bool = True) -> None:
        self.workdir = Path(workdir)
        self.tcp_nodelay = tcp_nodelay  # DCMTK inside Orthanc reads TCP_NODELAY; as packaged Nagle stays on
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        binary = orthanc_binary()
        if not binary:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "osteoscreen-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "MaximumPduLength": 131072,  # as storescp and the node in the benchmarks (Orthanc's default: 16 KiB)
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        self._log = open(self.workdir / "orthanc.log", "ab")
        env = dict(os.environ)
        if self.tcp_nodelay:
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)
        self._proc = subprocess.Popen([binary, str(cfg_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        stop_process(self._proc, 20)
        if self._log:
            self._log.close()
            self._log = None

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def instances_by_sop_class(self, sop_class: str) -> list[dict]:
        out = []
        for iid in self.get("/instances"):  # type: ignore[union-attr]
            tags = self.get(f"/instances/{iid}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class:  # type: ignore[union-attr]
                out.append({"id": iid, "tags": tags})
        return out

    def describe(self) -> str:
        return f"Orthanc {self.aet}@127.0.0.1:{self.dicom_port} (REST {self.url})"


class BuiltinPACS:
    """A pynetdicom storage SCP that writes what it receives into a folder."""

    kind = "built-in storage SCP"

    def __init__(self, workdir: str | Path, *, aet: str = "PACS", dicom_port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self._server = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.aet)
        for uid in (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage,
                    SecondaryCaptureImageStorage, CTImageStorage):
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(self.workdir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        self._server = ae.start_server((self.host, self.dicom_port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server = None

    def files(self) -> list[Path]:
        return sorted(self.workdir.glob("*.dcm"))

    def describe(self) -> str:
        return f"built-in storage SCP {self.aet}@127.0.0.1:{self.dicom_port} (files in {self.workdir})"
