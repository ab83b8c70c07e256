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


def test_two_listeners_on_one_port_are_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[node]\nport = 2575\n")  # the HL7 listener's default port
    with pytest.raises(ConfigError, match="node.port and hl7.port are both 2575"):
        load_settings(f)
    f.write_text('[node]\nport = 2575\n[hl7]\nenabled = false\n')
    assert load_settings(f).node.port == 2575  # no HL7 listener: no clash
    f.write_text('[metrics]\nport = 11112\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="node.port and metrics.port"):
        load_settings(f)


def test_a_file_saved_as_latin1_or_with_a_bom_is_read_or_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes('[node]\ninstitution_name = "Klinikum München"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8 \(byte 0xfc\)"):
        load_settings(f)
    f.write_bytes(b"\xef\xbb\xbf" + '[node]\ninstitution_name = "Klinikum München"\n'.encode())
    assert load_settings(f).node.institution_name == "Klinikum München"
