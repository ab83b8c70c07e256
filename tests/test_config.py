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


def _load(tmp_path, text: str, name: str = "c.toml"):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return load_settings(f)


def _refused(tmp_path, text: str, name: str = "c.toml") -> str:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text, name)
    return str(exc.value)


_DEST = '[[destinations]]\nname = "pacs"\nae_title = "{ae}"\nhost = "10.0.0.1"\nport = 104\n'


@pytest.mark.parametrize("ae", ["ÄRZTE", "A\\\\B", "   ", "", "ABCDEFGHIJKLMNOPQ", "A\\tB"])
@pytest.mark.parametrize("where", ["node", "destination", "export", "allowed", "routing", "sop_key"])
def test_every_ae_title_setting_takes_only_dicom_ae_characters(tmp_path, ae, where):
    """`node.ae_title = "ÄRZTE"` or "A\\B" passed `config check`; the exporter then failed on every send. An AE
    title is 1-16 characters of printable ASCII without a backslash, not only spaces (DICOM AE VR)."""
    text = {"node": f'[node]\nae_title = "{ae}"\n',
            "destination": _DEST.format(ae=ae),
            "export": f'[export]\ncalling_ae_title = "{ae}"\n',
            "allowed": f'[node]\nallowed_calling_aets = ["CT1", "{ae}"]\n',
            "routing": f'[routing]\ncalling_aets = ["{ae}"]\n',
            "sop_key": f'[node.allowed_sop_classes]\n"{ae}" = ["CTImageStorage"]\n'}[where]
    msg = _refused(tmp_path, text)
    assert "AE title" in msg and "16" in msg, msg


def test_ae_titles_in_lists_and_keys_are_stripped_as_the_receiver_strips_them(tmp_path):
    """The receiver strips the calling AE title: an allow-list entry "CT1 " never matched."""
    s = _load(tmp_path, '[node]\nae_title = " NODE1 "\nallowed_calling_aets = ["CT1 ", " CT2"]\n'
                        '[node.allowed_sop_classes]\n"CT1 " = ["CTImageStorage"]\n'
                        '[routing]\ncalling_aets = [" CT1 "]\n' + _DEST.format(ae="PACS ") +
                        '[export]\ncalling_ae_title = " OUT"\n')
    assert s.node.ae_title == "NODE1" and s.node.allowed_calling_aets == ["CT1", "CT2"]
    assert list(s.node.allowed_sop_classes) == ["CT1"] and s.routing.calling_aets == ["CT1"]
    assert s.destinations[0].ae_title == "PACS" and s.export.calling_ae_title == "OUT"
    assert Settings(node={"ae_title": "A B C"}).node.ae_title == "A B C"  # inner spaces are allowed
    msg = _refused(tmp_path, '[node.allowed_sop_classes]\n"CT1" = ["CTImageStorage"]\n"CT1 " = ["MRImageStorage"]\n')
    assert "'CT1' is listed twice" in msg


def test_lab_windows_are_bounded(tmp_path):
    """labs.window_days = 999999 passed and every job then failed with OverflowError (date arithmetic)."""
    for key in ("window_days", "after_study_days"):
        msg = _refused(tmp_path, f"[labs]\n{key} = 999999\n")
        assert f"labs.{key}" in msg and "36500" in msg
        assert getattr(_load(tmp_path, f"[labs]\n{key} = 36500\n").labs, key) == 36500


def test_an_empty_optional_path_means_its_default_not_the_working_directory(tmp_path):
    """`worklist.directory = ""` was Path("") == "." : PHI worklists went to the working directory (chmod 0700)."""
    s = _load(tmp_path, '[labs]\nmapping_file = ""\n[worklist]\ndirectory = ""\n'
                        '[node.tls]\nenabled = false\ncert_file = ""\nkey_file = ""\nca_file = ""\n'
                        '[hl7.tls]\nca_file = " "\n'
                        '[lis_query.tls]\nenabled = true\nca_file = ""\ncert_file = ""\nkey_file = ""\n'
                        '[followup.tls]\nca_file = ""\n')
    assert s.labs.mapping_file is None and s.worklist.directory is None
    for tls in (s.node.tls, s.hl7.tls, s.lis_query.tls, s.followup.tls):
        assert (tls.cert_file, tls.key_file, tls.ca_file) == (None, None, None)
    # a TLS listener with an empty certificate is told it needs one (not "file . does not exist")
    assert "a TLS listener needs cert_file" in _refused(tmp_path, '[hl7.tls]\nenabled = true\ncert_file = ""\n'
                                                                  'key_file = ""\n')


def test_an_empty_state_dir_is_refused(tmp_path):
    for value in ('""', '"  "'):
        msg = _refused(tmp_path, f"[node]\nstate_dir = {value}\n")
        assert "node.state_dir" in msg and "empty" in msg and "/var/lib/osteoscreen" in msg, msg


def test_max_pdu_is_zero_or_a_pdu_length_a_peer_can_use(tmp_path):
    """4294967296 crashed every association in struct.pack; 1 made storescu refuse the association. The node
    buffers a whole PDU, so more than its 64 MiB ceiling would let a peer make it allocate that much."""
    from dicom_node.scp import UNLIMITED_PDU_CAP

    for ok in (0, 4096, 131072, UNLIMITED_PDU_CAP):
        assert _load(tmp_path, f"[node]\nmax_pdu = {ok}\n").node.max_pdu == ok
    for bad in (1, 4095, UNLIMITED_PDU_CAP + 1, 4294967296, -1):
        msg = _refused(tmp_path, f"[node]\nmax_pdu = {bad}\n")
        assert "node.max_pdu" in msg and "4096" in msg and str(UNLIMITED_PDU_CAP) in msg, msg
    assert "64 MiB" in Settings.model_fields["node"].annotation.model_fields["max_pdu"].description


def _time_fields():
    from pydantic import BaseModel

    def walk(model: type[BaseModel], where: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{where}{name}.")
            elif name.endswith(("_s", "_h", "_days")):
                yield f"{where}{name}", "1e300" if ann is float else "999999999999"

    return list(walk(Settings, ""))


def test_every_timeout_interval_and_period_has_an_upper_bound(tmp_path):
    """`[retention] every_h = 1e300` crashed serve (scheduler OverflowError); `[export] timeout_s = 1e300` the stop."""
    fields = _time_fields()
    assert {"retention.every_h", "export.timeout_s", "jobs.timeout_s", "node.series_quiet_s",
            "labs.window_days"} <= {f for f, _ in fields}
    for dotted, huge in fields:
        section, key = dotted.rsplit(".", 1)
        text = f"[{section}]\n{key} = {huge}\n"
        msg = _refused(tmp_path, text)
        assert f"{dotted}: Input should be less than or equal to" in msg, msg
        year = {"_s": 365 * 86400, "_h": 365 * 24, "_days": 36500}[next(s for s in ("_s", "_h", "_days")
                                                                         if key.endswith(s))]
        other = "retry_max_s = 31536000\n" if dotted == "export.retry_initial_s" else ""  # (initial <= max)
        _load(tmp_path, f"[{section}]\n{key} = {year}\n{other}")  # a year (a century of days) is still accepted


def test_code_string_lists_are_upper_case_and_stripped(tmp_path):
    """routing.modalities = ["ct"] never matched CT, while image_type was compared case-insensitively."""
    s = _load(tmp_path, '[routing]\nmodalities = ["ct", " mr "]\nimage_type = ["original", "primary "]\n'
                        '[xray]\nmodalities = ["cr", "dx"]\nbody_parts = ["chest", " thorax"]\nviews = ["pa", "ap"]\n')
    assert s.routing.modalities == ["CT", "MR"] and s.routing.image_type == ["ORIGINAL", "PRIMARY"]
    assert (s.xray.modalities, s.xray.body_parts, s.xray.views) == (["CR", "DX"], ["CHEST", "THORAX"], ["PA", "AP"])
    msg = _refused(tmp_path, '[routing]\nmodalities = ["CT", " "]\n')
    assert "routing.modalities" in msg and "empty" in msg


def test_destination_names_starting_with_hl7_are_reserved(tmp_path):
    """The exporter sends outbox rows for "hl7:..." to the HL7 follow-up receiver, not to a DICOM AE."""
    for name in ("hl7:ris", "HL7:pacs"):
        msg = _refused(tmp_path, _DEST.format(ae="PACS").replace('"pacs"', f'"{name}"'))
        assert "destinations.0.name" in msg and "reserved" in msg and "[followup]" in msg, msg
    assert _load(tmp_path, _DEST.format(ae="PACS").replace('"pacs"', '"hl7pacs"')).destinations[0].name == "hl7pacs"


def test_triton_url_is_host_and_port_without_a_scheme(tmp_path):
    """`triton_url = "http://x"` was refused only by tritonclient at start, with a traceback."""
    for bad in ("http://x", "grpc://triton:8001", "x", "triton:0", "triton:99999", "triton:8000/v2", "a b:1"):
        msg = _refused(tmp_path, f'[engines]\ntriton_url = "{bad}"\n')
        assert "engines.triton_url" in msg and "host:port" in msg, msg
        assert "Traceback" not in msg
    for good in ("", "triton:8000", "10.0.0.5:8001", "[::1]:8001", "triton.example.org:8000"):
        assert _load(tmp_path, f'[engines]\ntriton_url = "{good}"\n').engines.triton_url == good


def _line_problem(tmp_path, text: str) -> str:
    return _refused(tmp_path, text, "lines.toml")


def test_error_line_numbers_point_at_the_offending_key(tmp_path):
    f = tmp_path / "lines.toml"
    dests = ''.join(f'[[destinations]]\nname = "{n}"\nae_title = "A"\nhost = "10.0.0.1"\nport = {p}\n\n'
                    for n, p in (("a", 104), ("b", 0), ("c", 104)))
    assert f"{f}:11: destinations.1.port" in _line_problem(tmp_path, dests)  # was the 3rd block's line 17
    # a missing key points at its table's header, not at a key of the same name further down
    missing = '[[destinations]]\nname = "a"\nae_title = "A"\nport = 104\n\n[followup]\nhost = "10.0.0.9"\n'
    assert f"{f}:1: destinations.0.host: Field required" in _line_problem(tmp_path, missing)
    missing2 = ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\n'
                '[[destinations]]\nname = "b"\nae_title = "B"\nport = 104\n[followup]\nhost = "10.0.0.9"\n')
    assert f"{f}:6: destinations.1.host: Field required" in _line_problem(tmp_path, missing2)
    assert f"{f}:4: routnig: unknown key" in _line_problem(tmp_path, "[node]\nport = 11112\n\n[routnig]\n"
                                                                     "min_slices = 10\n")
    dotted = _line_problem(tmp_path, "node.port = 0\nrouting.min_slices = 0\n")
    assert f"{f}:1: node.port" in dotted and f"{f}:2: routing.min_slices" in dotted
    # the key is looked for only in its own table
    other = _line_problem(tmp_path, "[hl7]\nport = 2576\n[node]\nhost = 'x'\nport = 0\n")
    assert f"{f}:5: node.port" in other
    sub = _line_problem(tmp_path, '[node]\nport = 11112\n[node.tls]\nenabled = true\n[hl7]\nport = 2575\n')
    assert f"{f}:3: node.tls" in sub
    # lines of a multi-line array are not keys or table headers
    arr = _line_problem(tmp_path, '[routing]\nmin_slices = 40\nslice_thickness_mm = [\n  0.5,\n  5.0,\n]\n'
                                  'calling_aets = [\n  ["CT1"],\n]\n[node]\nport = 0\n')
    assert f"{f}:7: routing.calling_aets.0" in arr and f"{f}:11: node.port" in arr, arr


def test_a_single_destinations_table_gets_a_hint(tmp_path):
    msg = _line_problem(tmp_path, '[node]\nport = 11112\n\n[destinations]\nname = "pacs"\nae_title = "PACS"\n'
                                  'host = "10.0.0.1"\nport = 104\n')
    assert f"{tmp_path / 'lines.toml'}:4: destinations" in msg and "[[destinations]]" in msg, msg


def test_check_hostname_is_refused_in_a_listener_tls_section(tmp_path):
    """check_hostname applies to client connections only (hl7/tls.py client_context); in [node.tls] or [hl7.tls]
    it was accepted and did nothing."""
    for section in ("node.tls", "hl7.tls"):
        msg = _refused(tmp_path, f"[{section}]\ncheck_hostname = false\n")
        assert f"{section}.check_hostname" in msg and "client" in msg and "remove it" in msg, msg
    s = _load(tmp_path, "[lis_query.tls]\ncheck_hostname = false\n[followup.tls]\ncheck_hostname = false\n")
    assert s.lis_query.tls.check_hostname is False and s.followup.tls.check_hostname is False
    from config.schema import TLSSettings

    assert "client" in TLSSettings.model_fields["check_hostname"].description.lower()


def test_export_backoff_order_and_shadow_destinations_listed_once(tmp_path):
    msg = _refused(tmp_path, "[export]\nretry_initial_s = 600\nretry_max_s = 60\n")
    assert "retry_initial_s" in msg and "retry_max_s" in msg, msg
    msg = _refused(tmp_path, '[[destinations]]\nname = "qa"\nae_title = "QA"\nhost = "127.0.0.1"\nport = 104\n'
                             '[shadow]\nenabled = true\ndestinations = ["qa", "qa"]\n')
    assert "more than once: qa" in msg, msg
