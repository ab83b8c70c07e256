import subprocess
import sys

import pytest

from config import ConfigError, Settings, default_toml, load_settings


def test_default_toml_matches_schema_defaults(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text(default_toml())
    assert load_settings(f) == Settings()


def test_unknown_key_is_an_error_naming_key_and_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[node]\nport = 104\n\n[routing]\nmin_slices = 10\nslice_thicknes_mm = [1, 2]\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(f)
    msg = str(exc.value)
    assert "routing.slice_thicknes_mm: unknown key" in msg
    assert f"{f}:6" in msg


def test_invalid_value_is_reported(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[routing]\nmin_patient_age_years = 12\n')
    with pytest.raises(ConfigError, match="min_patient_age_years"):
        load_settings(f)


def test_config_check_cli(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[node]\nae_title = "NODE1"\n[[destinations]]\nname="p"\nae_title="PACS"\nhost="h"\nport=4242\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[nod]\n")
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nod: unknown key" in r.stderr


def test_shadow_destinations_must_name_configured_destinations(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[shadow]\nenabled = true\ndestinations = ["qa"]\n\n[[destinations]]\nname = "pacs"\n'
                 'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n')
    with pytest.raises(ConfigError, match=r"shadow.destinations names \['qa'\]"):
        load_settings(f)


def test_config_check_names_a_missing_or_misplaced_model_bundle(tmp_path, capsys):
    from dicom_node.cli import main

    missing = tmp_path / "missing.toml"
    missing.write_text('[screening]\nimage_only_model = "nope_v9"\n')
    assert main(["config", "check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "screening.image_only_model = 'nope_v9'" in err and "cropkd_v1" in err  # the known bundles are listed
    misplaced = tmp_path / "misplaced.toml"
    misplaced.write_text('[xray]\nenabled = true\nmodel = "mmpkd_v1"\n')
    assert main(["config", "check", str(misplaced)]) == 2
    assert "needs chest_radiograph_screening" in capsys.readouterr().err
    off = tmp_path / "off.toml"
    off.write_text('[xray]\nmodel = "mmpkd_v1"\n')  # the path is off: its bundle is not used, so not checked
    assert main(["config", "check", str(off)]) == 0
