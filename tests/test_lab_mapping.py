"""The lab mapping table (config, not code), result status policy, abnormal flags and issuer aliases."""
import datetime as dt
import tomllib

import pytest

from config import ConfigError, settings_from_dict
from hl7.lookup import lookup_labs
from hl7.mapping import SHIPPED_MAPPING, MappingError, load_mapping, to_canonical
from hl7.receiver import LabReceiver
from hl7.store import LabStore

STUDY = dt.date(2026, 1, 5)
OBS = "202601040900"


def oru(control: str, obx: list[str], *, pid3: str = "P1^^^HOSP^MR", dob: str = "19580312", sex: str = "F") -> bytes:
    segs = [f"MSH|^~\\&|LIS|LAB|OSTEOSCREEN|RAD|20260104120000||ORU^R01|{control}|P|2.5.1",
            f"PID|1||{pid3}||DOE^JANE||{dob}|{sex}", f"OBR|1|O1|F1|24323-8^CMP^LN|||{OBS}"]
    segs += [f"OBX|{i}|{line}" for i, line in enumerate(obx, 1)]
    return "\r".join(segs).encode() + b"\r"


@pytest.fixture()
def store(tmp_path):
    s = LabStore(tmp_path / "labs.sqlite")
    yield s
    s.close()


def receive(store: LabStore, *messages: bytes, mapping=None) -> None:
    receiver = LabReceiver(store, mapping) if mapping else LabReceiver(store)
    for m in messages:
        assert b"MSA|AA" in receiver.handle(m)[0]


def test_shipped_table_covers_the_bone_and_renal_panel_with_checked_conversions():
    m = load_mapping()
    for code in ("17861-6", "2777-1", "6768-6", "1751-7", "2160-0", "98979-8", "62292-8", "1989-3", "2731-8",
                 "718-7", "3016-3", "17862-4", "2161-8", "9321-1"):
        assert code in m.analytes, code
    assert to_canonical("17861-6", 2.5, "mmol/L")[0] == pytest.approx(10.02)  # Ca: 1 mmol/L = 4.008 mg/dL
    assert to_canonical("17861-6", 10.02, "mg/dL")[0] / 4.008 == pytest.approx(2.5)
    assert to_canonical("2160-0", 88.42, "µmol/L")[0] == pytest.approx(1.0, rel=1e-5)  # creatinine 88.42 µmol/mg/dL
    assert to_canonical("2161-8", 10.0, "mmol/L")[0] == pytest.approx(113.1, rel=1e-3)  # urine creatinine
    assert to_canonical("9321-1", 0.5, "mmol/mmol")[0] == pytest.approx(0.177, rel=1e-2)  # Ca/Cr molar -> mass
    assert to_canonical("9321-1", 150, "mg/g")[0] == pytest.approx(0.15)
    assert to_canonical("3016-3", 2.1, "uIU/mL")[0] == pytest.approx(2.1)
    assert to_canonical("2731-8", 5.0, "pmol/L")[0] == pytest.approx(47.15)
    assert m.canonical_code("62238-1", "LN") == "98979-8"  # CKD-EPI 2009 eGFR -> the eGFR analyte
    with pytest.raises(ValueError, match="not recognised"):
        to_canonical("3016-3", 2.1, "mg/dL")


def test_site_table_maps_local_codes_and_is_checked_at_config_time(tmp_path, store):
    site = tmp_path / "site_mapping.toml"
    site.write_text(SHIPPED_MAPPING.read_text() + '\n[[local_code]]\nsystem = "99LAB"\ncode = "CA"\nloinc = "2000-8"\n')
    mapping = load_mapping(site)
    assert mapping.canonical_code("CA", "99lab") == "17861-6"  # via the alias: moles code -> canonical analyte
    receive(store, oru("L1", ["NM|CA^Calcium^99LAB||2.3|mmol/L|||||F|||" + OBS]), mapping=mapping)
    panel = lookup_labs(store, "P1", "HOSP", STUDY, mapping=mapping)
    assert panel.get("17861-6").value == pytest.approx(2.3 * 4.008)
    assert lookup_labs(store, "P1", "HOSP", STUDY).get("17861-6") is None  # the shipped table does not know "CA"

    bad = tmp_path / "bad.toml"
    bad.write_text('[[analyte]]\nloinc = "17861-6"\nname = "Calcium"\nunit = "mg/dL"\nunits = { "mmol/L" = 4.0 }\n')
    with pytest.raises(MappingError, match="canonical unit"):
        load_mapping(bad)
    with pytest.raises(ConfigError, match="labs.mapping_file: .*cannot read the lab mapping file"):
        settings_from_dict(tomllib.loads(f'[labs]\nmapping_file = "{tmp_path / "missing.toml"}"\n'))
    assert settings_from_dict(tomllib.loads(f'[labs]\nmapping_file = "{site}"\n')).labs.mapping_file == site


def test_result_status_policy_and_withdrawn_results(store):
    receive(store,
            oru("S1", ["NM|17861-6^Ca^LN||9.0|mg/dL|||||F|||" + OBS,
                       "NM|2777-1^Phos^LN||3.1|mg/dL|||||P|||" + OBS,
                       "NM|1751-7^Alb^LN||4.1|g/dL|||||X|||" + OBS,
                       "NM|6768-6^ALP^LN||90|U/L|||||F|||" + OBS]),
            oru("S2", ["NM|6768-6^ALP^LN||90|U/L|||||D|||" + OBS]))  # the lab deletes the ALP result
    panel = lookup_labs(store, "P1", "HOSP", STUDY)
    assert panel.get("17861-6").value == pytest.approx(9.0)
    reasons = {e.code: e.reason for e in panel.excluded}
    assert panel.get("2777-1") is None and "P (preliminary)" in reasons["2777-1"]
    assert panel.get("1751-7") is None and "X" in reasons["1751-7"]
    assert panel.get("6768-6") is None and "withdrawn" in reasons["6768-6"]
    with_prelim = lookup_labs(store, "P1", "HOSP", STUDY, accept_preliminary=True)
    assert with_prelim.get("2777-1").value == pytest.approx(3.1) and with_prelim.get("2777-1").status == "P"


def test_a_deletion_without_an_observation_time_withdraws_the_earlier_values_of_its_analyte(store):
    """A D (or C) with no OBX-14 and no OBR-7 cannot name the value it replaces: it must not leave it in use."""
    receive(store, oru("U1", ["NM|6768-6^ALP^LN||90|U/L|||||F|||" + OBS, "NM|17861-6^Ca^LN||9.0|mg/dL|||||F|||" + OBS]))
    undated = oru("U2", ["NM|6768-6^ALP^LN||90|U/L|||||D"]).replace(f"|||{OBS}".encode(), b"|||")
    assert OBS.encode() not in undated
    receive(store, undated)
    panel = lookup_labs(store, "P1", "HOSP", STUDY)
    reasons = {e.code: e.reason for e in panel.excluded}
    assert panel.get("6768-6") is None and "no observation time" in reasons["6768-6"]
    assert panel.get("17861-6").value == pytest.approx(9.0)  # another analyte is untouched


def test_final_beats_preliminary_flags_are_kept_and_censored_values_are_not_measurements(store):
    receive(store,
            oru("F1", ["NM|17861-6^Ca^LN||8.0|mg/dL|8.6-10.3|L||||P|||" + OBS]),
            oru("F2", ["NM|17861-6^Ca^LN||8.2|mg/dL|8.6-10.3|L||||F|||" + OBS,
                       "NM|98979-8^eGFR^LN||>90|mL/min/{1.73_m2}|||||F|||" + OBS,
                       "SN|2731-8^PTH^LN||^88|pg/mL|15-65|H~A||||F|||" + OBS]))
    panel = lookup_labs(store, "P1", "HOSP", STUDY, accept_preliminary=True)
    ca = panel.get("17861-6")
    assert ca.value == pytest.approx(8.2) and ca.flags == "L" and ca.status == "F"
    assert panel.get("2731-8").value == pytest.approx(88) and panel.get("2731-8").flags == "H~A"
    assert panel.get("98979-8") is None
    assert any(e.code == "98979-8" and "censored" in e.reason for e in panel.excluded)


def test_issuer_aliases_join_the_dicom_and_hl7_names_of_one_authority(store):
    receive(store, oru("I1", ["NM|17861-6^Ca^LN||9.3|mg/dL|||||F|||" + OBS], pid3="P1^^^&1.2.3.4.5&ISO^MR"))
    assert lookup_labs(store, "P1", "HOSP", STUDY).get("17861-6") is None  # different names: not the same patient
    joined = lookup_labs(store, "P1", "HOSP", STUDY, issuer_aliases={"1.2.3.4.5": "HOSP"})
    assert joined.get("17861-6").value == pytest.approx(9.3)
    assert lookup_labs(store, "P1", "OTHER", STUDY, issuer_aliases={"1.2.3.4.5": "HOSP"}).get("17861-6") is None


def test_unit_spellings_seen_in_real_feeds_are_read(tmp_path):
    """HL7's escaped 10^9/L, 10E3/uL, G/L, and a UTF-8 micro sign read as Latin-1 (no MSH-18): each was excluded as
    an unknown unit, so white cells, platelets or creatinine went missing."""
    from hl7.parse import parse_observations

    obx = [("6690-2^Leukocytes^LN", "7.1", "10\\S\\9/L"), ("777-3^Platelets^LN", "250", "10E3/uL"),
           ("26464-8^Leukocytes^LN", "6.0", "G/L"), ("2160-0^Creatinine^LN", "80", "µmol/L")]
    rows = "".join(f"OBX|{i}|NM|{c}||{v}|{u}|||||F|||202601040800\r" for i, (c, v, u) in enumerate(obx, 1))
    raw = ("MSH|^~\\&|LIS|LAB|OSTEOSCREEN|RAD|20260104120000||ORU^R01|U1|P|2.5.1\r"
           "PID|1||P1^^^HOSP^MR||Doe^Jane\rOBR|1|||24323-8^CMP^LN|||202601040800\r" + rows).encode("utf-8")
    got = {(r["code"], r["unit"]): r["value"] for r in parse_observations(raw)}
    assert got[("6690-2", "10*3/uL")] == pytest.approx(7.1)
    assert got[("777-3", "10*3/uL")] == pytest.approx(250)
    assert got[("26464-8", "10*3/uL")] == pytest.approx(6.0)
    assert got[("2160-0", "mg/dL")] == pytest.approx(80 * 0.01130966)


@pytest.mark.parametrize("text", ["=>1000", "=<0.1", "<= 2", ">^1000"])
def test_every_spelling_of_a_censored_value_is_left_out(text):
    from hl7.mapping import DEFAULT

    found = DEFAULT.interpret("2160-0", "LN", "", "", "NM", text, "mg/dL")
    assert found.value is None and "censored" in found.problem
