"""The README's first command runs `osteoscreen demo`; it must keep working."""
import subprocess
import sys

import pydicom
from PIL import Image


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "demo", "--output", str(out),
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines[-1].startswith("demo ok:"), lines[-1]
    for name in ("sr.dcm", "sc.dcm", "sc.png"):
        assert (out / name).stat().st_size > 0
    assert pydicom.dcmread(out / "sr.dcm").Modality == "SR"
    assert Image.open(out / "sc.png").size[0] >= 512
    text = r.stdout
    assert "L1 trabecular attenuation" in text and "labs found" in text and "category" in text
