from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.pacs import OrthancPACS, free_port, orthanc_binary, stop_process, wait_port  # noqa: F401 - tests import it from here
from dicom_node.sample import write_sample_series

DATA = Path(__file__).parent / "data"


def need_tool(name: str) -> str:
    """A real peer the suite needs: skip locally if missing, fail in CI (which installs it)."""
    path = orthanc_binary() if name == "Orthanc" else shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI (.ci/run installs it with apt-get)")
    pytest.skip(f"{name} not installed")


@pytest.fixture(scope="session")
def sample_series(tmp_path_factory):
    return write_sample_series(tmp_path_factory.mktemp("sample"), tag="tests")


@pytest.fixture()
def orthanc(tmp_path):
    need_tool("Orthanc")
    pacs = OrthancPACS(tmp_path / "orthanc")
    pacs.start()
    yield pacs
    pacs.stop()


class NodeProcess:
    """`osteoscreen serve` as a real child process with its own config file."""

    def __init__(self, workdir: Path, destinations: list[dict] | None = None, allowed=("CT1",), quiet_s=1.5,
                 extra: str = "", node_extra: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.hl7_port, self.metrics_port = free_port(), free_port(), free_port()
        self.state_dir = workdir / "state"
        self.log_path = workdir / "node.log"
        dest = "".join(
            f'\n[[destinations]]\nname = "{d["name"]}"\nae_title = "{d["ae_title"]}"\nhost = "127.0.0.1"\n'
            f'port = {d["port"]}\n' for d in destinations or [])
        self.config = workdir / "osteoscreen.toml"
        self.config.write_text(
            f'[node]\nport = {self.port}\nstate_dir = "{self.state_dir}"\nseries_quiet_s = {quiet_s}\n'
            f'allowed_calling_aets = {list(allowed)!r}\n'.replace("'", '"')
            + node_extra
            + f"[hl7]\nport = {self.hl7_port}\n[metrics]\nport = {self.metrics_port}\n"
            + "[export]\nretry_initial_s = 0.5\nretry_max_s = 5.0\n"
            + extra + dest)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_port(self.port)
        wait_port(self.hl7_port)
        if self.proc.poll() is not None:  # something else answered on its ports while it failed to start
            raise AssertionError(f"osteoscreen serve exited with {self.proc.returncode} during start-up:\n"
                                 + self.log()[-3000:])
        return self

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def node_factory(tmp_path):
    nodes: list[NodeProcess] = []

    def make(**kw) -> NodeProcess:
        n = NodeProcess(tmp_path / f"node{len(nodes)}", **kw)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


def storescu(files, port: int, calling: str = "CT1", called: str = "OSTEOSCREEN",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    exe = need_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([exe, "-aet", calling, "-aec", called, "--max-pdu", "131072", *extra, "127.0.0.1",
                           str(port), *map(str, files)], env=env, capture_output=True, text=True, timeout=300)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def screen_image_only(node_factory, files, tmp_path: Path, image_only_bundle: Path) -> tuple["NodeProcess", dict]:
    """Send a series with no age, sex or body size (and no labs) to a node whose image-only model is the given
    bundle; the node and job 1's result once done. Without an age the router skips a series unless the site allows
    it (``[routing] screen_unknown_age``; children are never screened)."""
    import json
    import sqlite3

    import pydicom

    anon = tmp_path / "anon"
    anon.mkdir()
    sent = []
    for f in files:
        ds = pydicom.dcmread(f)
        for kw in ("PatientSex", "PatientBirthDate", "PatientAge", "PatientSize", "PatientWeight"):
            if kw in ds:
                delattr(ds, kw)
        sent.append(anon / Path(f).name)
        ds.save_as(sent[-1])
    node = node_factory(extra=f'[routing]\nscreen_unknown_age = true\n'
                              f'[screening]\nimage_only_model = "{image_only_bundle}"\n').start()
    r = storescu(sent, node.port)
    assert r.returncode == 0, r.stderr
    db = node.state_dir / "osteoscreen.sqlite"

    def done():
        with sqlite3.connect(db) as c:
            row = c.execute("SELECT state, result_json FROM jobs WHERE id=1").fetchone()
        return row if row and row[0] in ("done", "failed") else None

    state, result = wait_for(done, 180, "job 1 finished")
    assert state == "done", result
    return node, json.loads(result)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=osteoscreen test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return d
