"""Peer-supplied text and header values that must not reach logs, HL7 frames or file modes as they came."""
from __future__ import annotations

import logging
import os
import warnings

from pydicom.dataset import Dataset


def test_hl7_escape_makes_every_control_character_an_escape():
    """A VT (MLLP start block) in an accession number started a forged message inside the result frame."""
    from hl7.er7 import escape, unescape

    text = escape("A1\x0bMSH|x^y\x1c\r\nz\\")
    assert not any(ord(c) < 0x20 for c in text)
    assert "\\X0B\\" in text and "\\X1C\\" in text and "\\F\\" in text and "\\E\\" in text
    assert unescape(escape("plain & simple ^ ok")) == "plain & simple ^ ok"


def test_text_logs_show_a_peers_newline_instead_of_starting_a_forged_line(capsys):
    from dicom_node.logfmt import configure

    configure(logging.INFO, "text")
    try:
        logging.getLogger("osteoscreen.test").warning("calling AE %s refused", "X\n2026-01-01 INFO all fine\x1b[2J")
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("    2026-01-01") and "\\x1b" in lines[1]


def test_a_non_conforming_header_date_is_left_out_of_the_results_not_failing_the_job(caplog):
    """A birth date written 1958-03-12 failed every attempt of the job ('Unable to convert ... to DA') and was
    quoted in the log by pydicom's validation warning."""
    from dicom_node.logfmt import configure
    from pipeline.report.source import report_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = Dataset()
        header.PatientBirthDate, header.PatientAge, header.StudyDate = "1958-03-12", "67Y", "20260105"
    configure(logging.INFO, "text")
    logging.getLogger().addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            src = report_source(header)
    finally:
        logging.getLogger().handlers.clear()
    assert src.PatientBirthDate == "" and "PatientAge" not in src and src.StudyDate == "20260105"
    assert "1958-03-12" not in caplog.text and not [w for w in seen if "1958" in str(w.message)]


def test_the_node_creates_its_state_private_whatever_the_shells_umask(node_factory):
    """Outside systemd (umask 022) the databases and instance folders were created readable by everyone."""
    old = os.umask(0o022)
    try:
        node = node_factory().start()  # the child inherits umask 022
    finally:
        os.umask(old)
    made = list(node.state_dir.rglob("*"))
    assert any(p.name == "osteoscreen.sqlite" for p in made)
    for path in made:
        assert os.stat(path).st_mode & 0o007 == 0, f"{path} is readable by others: {oct(os.stat(path).st_mode)}"
