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


def test_a_site_mapping_table_in_other_units_is_converted_at_the_model_input_or_refused(tmp_path):
    """A site table keeping calcium in mmol/L: the model still gets mg/dL (it once got 2.4 for a feature in mg/dL,
    z = -19). A unit the shipped table cannot convert is refused by `config check`."""
    import datetime as dt

    from hl7.mapping import SHIPPED_MAPPING, load_mapping
    from hl7.panel import LabPanel, LabValue
    from pipeline.demographics import Demographics
    from pipeline.features import FEATURES
    from pipeline.fused import lab_unit_problems, tabular_input

    assert lab_unit_problems(load_mapping(None)) == []
    text = SHIPPED_MAPPING.read_text()
    unit_at = text.index('unit = "mg/dL"', text.index('loinc = "17861-6"'))

    def site(unit: str, accepted: bool = True):
        path = tmp_path / f"site_{unit.replace('/', '_')}.toml"
        rest = text[unit_at + len('unit = "mg/dL"'):]
        if not accepted:  # the table itself must list its canonical unit among the accepted ones
            rest = rest.replace("units = { ", f'units = {{ "{unit}" = 1.0, ', 1)
        path.write_text(text[:unit_at] + f'unit = "{unit}"' + rest)
        return path

    assert lab_unit_problems(load_mapping(site("mmol/L"))) == []
    panel = LabPanel("P", None, dt.date(2026, 1, 5), 90, (
        LabValue("17861-6", "Calcium", 2.4, "mmol/L", dt.datetime(2026, 1, 4), "LIS"),
        LabValue("62292-8", "25-hydroxyvitamin D", 20.0, "ng/mL", dt.datetime(2026, 1, 4), "LIS")))
    values = dict(zip((f.name for f in FEATURES), tabular_input(panel, Demographics(None, None, None, None)).values))
    assert values["calcium"] == pytest.approx(2.4 * 4.008) and values["vitamin_d"] == pytest.approx(20 * 2.496, rel=1e-4)
    bad = site("mol/m3x", accepted=False)
    assert any("Calcium: LOINC 17861-6 is kept in mol/m3x, which cannot be converted" in p
               for p in lab_unit_problems(load_mapping(bad)))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[labs]\nmapping_file = "{bad}"\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot be converted" in r.stderr


def test_config_check_fails_where_serve_would_and_warns_about_relative_paths(tmp_path, capsys, monkeypatch):
    """`config check` passed a forced GPU backend on a machine without one and an encrypted TLS key without its
    password variable; `serve` then refused both. Relative paths resolve against serve's working directory
    (/ under systemd), not the checker's."""
    from dicom_node.cli import main

    gpu = tmp_path / "gpu.toml"
    gpu.write_text(f'[node]\nstate_dir = "{tmp_path}/state"\n[screening]\nbackend = "tensorrt"\n')
    assert main(["config", "check", str(gpu)]) == 2
    assert "models: backend tensorrt is not available here" in capsys.readouterr().err
    relative = tmp_path / "relative.toml"
    relative.write_text('[node]\nstate_dir = "state"\n')
    assert main(["config", "check", str(relative)]) == 0
    err = capsys.readouterr().err
    assert "warning: node.state_dir = 'state' is a relative path" in err and "(/ under systemd)" in err


def test_hl7_max_connections_must_be_positive(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[hl7]\nmax_connections = 0\n")
    with pytest.raises(ConfigError, match="max_connections"):
        load_settings(f)
    assert Settings().hl7.max_connections == 64
