"""Bounded fuzzing (hypothesis, derandomized: the same corpus on every CI run) of what strangers can send.

Targets: the HL7 receiver (any bytes -> an ACK or a recorded refusal, never an exception), the MLLP
de-framer, and the DICOM series path (mutated real CT files -> routing facts or a recorded refusal,
a checked volume or a VolumeError with a reason; never another exception, never a huge allocation).
More examples on demand: HYPOTHESIS_PROFILE=long (marked slow).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.schema import RoutingSettings
from dicom_node.routing import UnreadableSeries, decide, series_facts
from hl7.mllp import FS, VT, FrameReader
from hl7.receiver import LabReceiver
from hl7.store import LabStore
from pipeline.volume import VolumeError, load_volume

DATA = Path(__file__).parent / "data"
HL7_SAMPLES = [p.read_bytes() for p in sorted((DATA / "hl7").glob("*.hl7"))]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def mutate(data: bytes, edits: list[tuple[int, int, bytes]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for kind, pos, chunk in edits:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i : i + len(chunk)] = chunk  # overwrite
        elif kind == 1:
            buf[i:i] = chunk  # insert
        else:
            del buf[i : i + max(1, len(chunk))]  # delete
    if cut is not None and buf:
        del buf[cut % len(buf):]
    return bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), max_size=6)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    return LabReceiver(LabStore(tmp_path_factory.mktemp("fuzz-hl7") / "labs.sqlite"))


@FUZZ
@given(sample=st.sampled_from(HL7_SAMPLES), edits=EDITS, cut=st.one_of(st.none(), st.integers(0, 10**6)),
       noise=st.one_of(st.none(), st.binary(max_size=300)))
def test_hl7_receiver_answers_any_bytes(receiver, sample, edits, cut, noise):
    raw = noise if noise is not None else mutate(sample, edits, cut)
    acks = receiver.handle(raw)  # must not raise
    assert isinstance(acks, list)
    for ack in acks:
        assert ack.startswith(b"MSH") and b"MSA" in ack


@FUZZ
@given(chunks=st.lists(st.one_of(st.binary(max_size=64), st.sampled_from([VT, FS, FS + b"\r", b"\r"])), max_size=40))
def test_mllp_deframer_never_raises_and_respects_the_size_limit(chunks):
    reader = FrameReader(max_bytes=100)
    for c in chunks:
        for frame in reader.feed(c):
            assert frame is None or len(frame) <= 100


@pytest.fixture(scope="module")
def ct_file(sample_series):
    return Path(sample_series.files[len(sample_series.files) // 2]).read_bytes()


@FUZZ
@given(edits=EDITS, cut=st.one_of(st.none(), st.integers(0, 10**6)),
       header=st.sampled_from([None, ("Rows", 65535), ("Columns", 60000), ("BitsAllocated", 8),
                               ("ImageOrientationPatient", [1, 0, 0, 0, 0, 1]), ("PixelSpacing", [0, 0]),
                               ("NumberOfFrames", 1000)]))
def test_mutated_ct_gives_a_decision_and_a_volume_or_a_reason(tmp_path_factory, ct_file, edits, cut, header):
    d = tmp_path_factory.mktemp("fuzz-ct")
    path = d / "x.dcm"
    data = ct_file
    if header is not None:
        ds = pydicom.dcmread(io.BytesIO(ct_file))
        setattr(ds, header[0], header[1])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    # Edits after the first 400 bytes: the SCP parses the header before storing, so what reaches the
    # store has a readable preamble and meta group; the damage is in the dataset and pixel data.
    path.write_bytes(data[:400] + mutate(data[400:], edits, cut))
    try:
        decide(series_facts([str(path)], "CT1"), RoutingSettings())
    except UnreadableSeries as exc:  # recorded as the skip reason
        assert str(exc).startswith("unreadable DICOM header")
    try:
        vol = load_volume([path])
    except VolumeError as exc:
        assert exc.reason
    else:
        assert vol.hu.dtype.name == "int16" and vol.hu.size <= 4096 * 4096
