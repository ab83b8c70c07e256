"""The follow-up ORU^R01: valid HL7 (hl7apy strict), coded result, recommendation only when positive."""
import dataclasses
import datetime as dt

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7.result_message import ScreeningReport, build_result_message

REPORT = ScreeningReport(
    control_id="OSR000042", patient_id="P|1", issuer="HOSP", patient_name="O'NEIL^MARY^A", birth_date="19580312",
    sex="F", accession_number="ACC-9", study_uid="1.2.3", study_datetime="20260105093000",
    category_id="screen_positive", category_label="Elevated osteoporosis risk - consider DXA", probability=0.183,
    threshold=0.12, model="fused_kdamm_v1 1.0.0", level="L1", mean_hu=94.0, sr_sop_instance_uid="1.2.3.4",
    recommendation="Consider DXA ^ soon", notice="RESEARCH USE ONLY - not for diagnostic use")
ARGS = dict(sending_application="OSTEOSCREEN", sending_facility="RAD", receiving_application="RIS",
            receiving_facility="HOSP", now=dt.datetime(2026, 1, 5, 12))


def obx(message: bytes) -> dict[str, list[str]]:
    out = {}
    for seg in message.decode().split("\r"):
        f = seg.split("|")
        if f[0] == "OBX":
            out[f[3].split("^")[0]] = f
    return out


def test_positive_result_is_strictly_valid_and_carries_the_recommendation():
    msg = build_result_message(REPORT, **ARGS)
    parsed = parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    assert parsed.msh.msh_10.value == "OSR000042"
    pid = parsed.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "P\\F\\1^^^HOSP^MR"  # the '|' in the ID is escaped, not a new field
    assert pid.pid_5.to_er7() == "O'NEIL^MARY^A"
    rows = obx(msg)
    assert rows["OS0001"][5].startswith("screen_positive^")
    assert rows["OS0002"][5] == "0.183" and rows["OS0002"][8] == "A"
    assert rows["112031"][5] == "94" and rows["112031"][11] == "F" and rows["112031"][14] == "20260105120000"
    assert rows["OS0006"][5] == "Consider DXA \\S\\ soon"
    assert rows["OS0009"][5].startswith("RESEARCH USE ONLY")
    obr = next(s for s in msg.decode().split("\r") if s.startswith("OBR")).split("|")
    assert obr[3] == obr[18] == "ACC-9" and obr[25] == "F"


def test_negative_result_has_no_recommendation_and_no_measurement_when_the_image_was_not_used():
    neg = dataclasses.replace(REPORT, category_id="screen_negative", category_label="Low risk", probability=0.05,
                              level=None, mean_hu=None)
    msg = build_result_message(neg, **ARGS)
    parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    rows = obx(msg)
    assert "OS0006" not in rows and "112031" not in rows
    assert rows["OS0002"][8] == "N"


def test_a_corrected_result_says_so_in_every_result_status():
    msg = build_result_message(dataclasses.replace(REPORT, corrected=True), **ARGS)
    parse_message(msg.decode(), validation_level=VALIDATION_LEVEL.STRICT)
    obr = next(s for s in msg.decode().split("\r") if s.startswith("OBR")).split("|")
    assert obr[25] == "C" and {f[11] for f in obx(msg).values()} == {"C"}
    assert {f[11] for f in obx(build_result_message(REPORT, **ARGS)).values()} == {"F"}


def test_non_ascii_names_are_declared_in_msh_18_and_only_the_alphabetic_group_is_sent():
    latin = build_result_message(dataclasses.replace(REPORT, patient_name="Müller^Jürgen"), **ARGS)
    msh = latin.split(b"\r")[0].split(b"|")
    assert msh[17] == b"8859/1" and b"PID|1||P\\F\\1^^^HOSP^MR||M\xfcller^J\xfcrgen|" in latin
    parse_message(latin.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT)
    japanese = build_result_message(dataclasses.replace(REPORT, patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう"),
                                    **ARGS)
    pid = next(s for s in japanese.split(b"\r") if s.startswith(b"PID")).split(b"|")
    assert pid[5] == b"Yamada^Tarou"  # ideographic and phonetic groups are not XPN components
    wide = build_result_message(dataclasses.replace(REPORT, patient_name="Łukasiewicz^Zoë", model="模型"), **ARGS)
    assert wide.split(b"\r")[0].split(b"|")[17] == b"UNICODE UTF-8" and "模型" in wide.decode("utf-8")
    old = build_result_message(dataclasses.replace(REPORT, patient_name="Łukasiewicz^Zoë"), **ARGS, version="2.4")
    assert old.split(b"\r")[0].split(b"|")[17] == b"8859/1" and b"?ukasiewicz^Zo\xeb" in old  # no UTF-8 before 2.5
    assert b"|" * 6 not in build_result_message(REPORT, **ARGS).split(b"\r")[0]  # ASCII: MSH-18 left out
