"""The systemd unit and the notify/watchdog/reload protocol against a fake NOTIFY_SOCKET."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.pacs import free_port
from tests.conftest import need_tool, wait_port

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"


def _exposure(path: Path) -> float:
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run([exe, "security", "--offline=true", str(path)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for .*: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


@pytest.mark.parametrize("dropin", [None, "osteoscreen-gpu.conf", "osteoscreen-port104.conf"])
def test_unit_exposure_at_most_2_5(tmp_path, dropin):
    unit = tmp_path / "osteoscreen.service"
    text = (UNIT_DIR / "osteoscreen.service").read_text()
    if dropin:
        text += "\n" + (UNIT_DIR / dropin).read_text()  # a drop-in's [Service] section, merged
    unit.write_text(text)
    assert _exposure(unit) <= 2.5


def test_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed")
    osteoscreen = Path(sys.executable).with_name("osteoscreen")
    unit = tmp_path / "osteoscreen.service"
    unit.write_text((UNIT_DIR / "osteoscreen.service").read_text().replace(
        "/opt/osteoscreen/.venv/bin/osteoscreen", str(osteoscreen)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (UNIT_DIR / "osteoscreen.service").read_text()
    for needle in ("Type=notify", "WatchdogSec=", "ExecReload=", "ProtectSystem=strict", "CapabilityBoundingSet=\n",
                   "SystemCallFilter=@system-service", "StateDirectory=", "CacheDirectory="):
        assert needle in text


def _recv_until(sock: socket.socket, needle: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if needle in msg:
            return got
    raise AssertionError(f"{needle!r} not received; got {got}")


def test_notify_watchdog_reload_and_stop(tmp_path):
    echoscu = need_tool("echoscu")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    port = free_port()
    cfg = tmp_path / "node.toml"

    def write(aets):
        cfg.write_text(f'[node]\nport = {port}\nstate_dir = "{tmp_path / "state"}"\n'
                       f'allowed_calling_aets = {aets!r}\n'.replace("'", '"') + f"[hl7]\nport = {free_port()}\n")

    write(["CT1"])
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "node.log", "wb"))
    try:
        ready = _recv_until(sock, "READY=1", 60)
        assert any("READY=1" in m for m in ready)
        wait_port(port)  # READY came after the listener was up
        _recv_until(sock, "WATCHDOG=1", 5)  # pinged at half of WatchdogSec
        denied = subprocess.run([echoscu, "-aet", "CT2", "127.0.0.1", str(port)], capture_output=True)
        assert denied.returncode != 0
        write(["CT1", "CT2"])
        proc.send_signal(signal.SIGHUP)
        msgs = _recv_until(sock, "READY=1", 30)
        assert any("RELOADING=1" in m for m in msgs)
        allowed = subprocess.run([echoscu, "-aet", "CT2", "127.0.0.1", str(port)], capture_output=True)
        assert allowed.returncode == 0, "reloaded allow-list not applied"
        cfg.write_text(cfg.read_text() + "\n[nonsense]\n")  # a bad reload keeps the running configuration
        proc.send_signal(signal.SIGHUP)
        _recv_until(sock, "READY=1", 30)
        assert proc.poll() is None
        assert "reload refused" in (tmp_path / "node.log").read_text()
        write(["CT1", "CT2"])
        good = cfg.read_text()
        for bad, why in ((good + '[node.tls]\n# Klinikum M\xfcnchen\n', "not UTF-8"),  # saved as Latin-1
                         (good + '[screening]\nmodel = "no_such_bundle"\n', "model check failed")):
            cfg.write_bytes(bad.encode("latin-1"))
            proc.send_signal(signal.SIGHUP)
            _recv_until(sock, "READY=1", 30)
            assert proc.poll() is None, why
            assert why in (tmp_path / "node.log").read_text()
        cfg.write_text(good + "[jobs]\nworkers = 2\n[export]\nretry_max_s = 60\n")
        proc.send_signal(signal.SIGHUP)
        _recv_until(sock, "READY=1", 30)
        last = [ln for ln in (tmp_path / "node.log").read_text().splitlines() if "configuration reloaded" in ln][-1]
        assert "applied no changes; restart needed for" in last and "jobs, export" in last  # (hl7: a new port)
        # a later reload of something else still lists what waits for a restart (it used to forget it), in the
        # log and in the status systemd shows; the running node keeps the values it started with meanwhile
        cfg.write_text(good + "[jobs]\nworkers = 2\n[export]\nretry_max_s = 60\n[routing]\nmin_slices = 21\n")
        proc.send_signal(signal.SIGHUP)
        msgs = _recv_until(sock, "READY=1", 30)
        last = [ln for ln in (tmp_path / "node.log").read_text().splitlines() if "configuration reloaded" in ln][-1]
        assert "applied routing; restart needed for" in last and "jobs, export" in last
        assert any("STATUS=" in m and "restart needed for" in m and "jobs" in m for m in msgs), msgs
        proc.send_signal(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1", 30)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_a_configuration_error_at_start_exits_2_so_systemd_does_not_restart_it(tmp_path, capsys):
    """The unit's RestartPreventExitStatus=2: a file `serve` cannot start with exits 2 (it exited 1, and systemd
    restarted it for ever). `config check` refuses a state directory under a file, as `serve` does."""
    from dicom_node.cli import main

    unit = (UNIT_DIR / "osteoscreen.service").read_text()
    assert "RestartPreventExitStatus=2" in unit
    cfg = tmp_path / "bad-model.toml"
    cfg.write_text(f'[node]\nport = {free_port()}\nstate_dir = "{tmp_path / "state"}"\n[hl7]\nport = {free_port()}\n'
                   '[screening]\nmodel = "no_such_bundle"\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no_such_bundle" in r.stderr, r.stderr
    (tmp_path / "afile").write_text("")
    under_a_file = tmp_path / "under-a-file.toml"
    under_a_file.write_text(f'[node]\nstate_dir = "{tmp_path / "afile" / "state"}"\n')
    assert main(["config", "check", str(under_a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_long_store_check_after_a_power_loss_extends_the_start_timeout(tmp_path, monkeypatch, sample_series):
    """TimeoutStartSec would kill a start that checks a big store: each progress report extends it."""
    import itertools

    from dicom_node import index_recovery
    from dicom_node.db import NodeDB
    from dicom_node.service import _store_check_progress
    from dicom_node.store import InstanceStore

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    _store_check_progress(1234)
    msg = sock.recv(4096).decode()
    assert "EXTEND_TIMEOUT_USEC=60000000" in msg and "STATUS=checking the instance store" in msg and "1234" in msg
    sock.close()
    store = InstanceStore(tmp_path / "instances", NodeDB(tmp_path / "db.sqlite"))
    for i, f in enumerate(sample_series.files[:3]):  # three series folders (the walk reports between folders)
        folder = tmp_path / "instances" / "1.2.3" / f"1.2.3.{i}"
        folder.mkdir(parents=True)
        (folder / f.name).write_bytes(f.read_bytes())
    clock = itertools.count(0, 10.0)  # 10 s per look at the clock
    monkeypatch.setattr(index_recovery, "_clock", lambda: next(clock))
    seen: list[int] = []
    index_recovery.reindex_unindexed(store, progress=seen.append)
    assert seen == [1, 2, 3]
