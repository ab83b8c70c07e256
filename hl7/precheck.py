"""Fast, strict checks run before a message is acknowledged.

Only what decides AA/AE/AR is read here (MSH and PID-3) with a plain
splitter; the full parse with hl7apy happens after the ACK.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
SUPPORTED_MESSAGES = (("ORU", "R01"),)


@dataclass(frozen=True)
class PatientIdentifier:
    id: str
    issuer: str  # assigning authority (namespace ID, else universal ID); "" when absent
    id_type: str

    @property
    def names_the_patient(self) -> bool:
        """An identifier a DICOM Patient ID can be: a record number, not an account, visit or other number that
        may equal another patient's record number (HL7 table 0203)."""
        return self.id_type.upper() in PATIENT_ID_TYPES


# HL7 table 0203 types that identify the patient the way the image's Patient ID does; empty (CX-5 is optional).
PATIENT_ID_TYPES = frozenset({"", "MR", "MRN", "PI", "PT", "PN"})


@dataclass(frozen=True)
class MessageHeader:
    field_sep: str
    encoding: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    processing_id: str
    version: str
    message_type: str
    trigger_event: str
    accept_ack_type: str
    application_ack_type: str
    patient_ids: tuple[PatientIdentifier, ...] = ()
    birth_date: str = ""  # PID-7, YYYYMMDD part
    sex: str = ""  # PID-8 (F, M, O, U, ...)
    raw_msh: tuple[str, ...] = ()  # the MSH fields as sent (index n-1 = MSH-n, MSH-2 onwards), for the ACK to copy

    def raw_field(self, n: int) -> str:
        """MSH-n exactly as sent (all components, escapes untouched); "" when absent."""
        return self.raw_msh[n - 1] if 2 <= n <= len(self.raw_msh) else ""

    @property
    def sender(self) -> str:
        return f"{self.sending_application}|{self.sending_facility}"


class PrecheckError(Exception):
    """The message is refused: ``code`` is AE (error) or AR (reject); ``header`` as far as it was read."""

    def __init__(self, code: str, text: str, header: MessageHeader | None = None, error_code: int = 207) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.header = header
        self.error_code = error_code  # HL7 table 0357


def issuer_canon(issuer_aliases: dict[str, str] | None):
    """A function mapping an assigning-authority name to its one canonical name (labs.issuer_aliases);
    comparison is case- and space-insensitive."""
    aliases = {k.strip().upper(): v.strip().upper() for k, v in (issuer_aliases or {}).items()}

    def canon(name: str | None) -> str:
        n = (name or "").strip().upper()
        return aliases.get(n, n)

    return canon


def split_segments(text: str) -> list[str]:
    """Segments, tolerating LF or CRLF in place of CR and blank lines."""
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]


def _component(value: str, comp_sep: str, index: int) -> str:
    parts = value.split(comp_sep)
    return parts[index] if index < len(parts) else ""


MAX_SEGMENTS = 2000  # a lab result message holds tens of segments, a cumulative report a few hundred


def parse_header(text: str, supported: tuple[tuple[str, str], ...] = SUPPORTED_MESSAGES) -> MessageHeader:
    """MSH and PID of a message; PrecheckError (AE/AR with the reason) when it cannot be accepted.

    ``supported`` is what the caller accepts: the listener takes ORU^R01; the
    query client takes the LIS's RSP^K11 or ORF^R04 answers.
    """
    segments = split_segments(text)
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise PrecheckError("AE", "message does not start with an MSH segment", None, 100)
    msh = segments[0]
    fs = msh[3]
    fields = msh.split(fs)
    encoding = fields[1] if len(fields) > 1 else ""
    if len(encoding) < 4 or fs in encoding or fs.isalnum():
        raise PrecheckError("AE", "MSH-1/MSH-2: invalid field separator or encoding characters", None, 100)
    cs, rs, sub = encoding[0], encoding[1], encoding[3]

    def f(n: int) -> str:  # MSH-n
        return fields[n - 1] if len(fields) >= n else ""

    msg_type = f(9)
    header = MessageHeader(
        field_sep=fs,
        encoding=encoding,
        sending_application=_component(f(3), cs, 0),
        sending_facility=_component(f(4), cs, 0),
        receiving_application=_component(f(5), cs, 0),
        receiving_facility=_component(f(6), cs, 0),
        control_id=f(10).strip(),
        processing_id=_component(f(11), cs, 0),
        version=_component(f(12), cs, 0).strip(),
        message_type=_component(msg_type, cs, 0).strip(),
        trigger_event=_component(msg_type, cs, 1).strip(),
        accept_ack_type=f(15).strip(),
        application_ack_type=f(16).strip(),
        raw_msh=tuple(fields),
    )
    if not header.control_id:
        raise PrecheckError("AE", "MSH-10 (message control ID) is empty", header, 101)
    if not header.message_type:
        raise PrecheckError("AE", "MSH-9 (message type) is empty", header, 101)
    if (header.message_type, header.trigger_event) not in supported:
        accepted = " or ".join("^".join(m) for m in supported)
        raise PrecheckError(
            "AR", f"unsupported message type {header.message_type}^{header.trigger_event}: only {accepted} is accepted",
            header, 200)
    if header.version not in SUPPORTED_VERSIONS:
        raise PrecheckError(
            "AR", f"unsupported HL7 version {header.version or '(empty)'}: supported {', '.join(SUPPORTED_VERSIONS)}", header, 203
        )
    if len(segments) > MAX_SEGMENTS:
        # hl7apy's full parse (the application ACK, the background parser) takes ~35 kB of memory per segment:
        # 22,000 OBX segments in one 1 MiB message grew the service by 800 MB, and kept it
        raise PrecheckError("AE", f"{len(segments)} segments: more than the {MAX_SEGMENTS} a lab result message is "
                                  "accepted with; split it", header, 207)
    pids = [s for s in segments[1:] if s.startswith("PID" + fs)]
    if not pids:
        raise PrecheckError("AE", "no PID segment", header, 100)
    pid = pids[0]
    pid_fields = pid.split(fs)

    def identifiers(segment: str) -> list[PatientIdentifier]:
        """PID-3 of one PID segment."""
        parts = segment.split(fs)
        ids = []
        for rep in (parts[3] if len(parts) > 3 else "").split(rs):
            ident = _component(rep, cs, 0).strip()
            if not ident:
                continue
            authority = _component(rep, cs, 3)
            hd_parts = authority.split(sub)
            issuer = (hd_parts[0] or (hd_parts[1] if len(hd_parts) > 1 else "")).strip()
            ids.append(PatientIdentifier(ident, issuer, _component(rep, cs, 4).strip()))
        return ids

    ids = identifiers(pid)
    if not ids:
        raise PrecheckError("AE", "PID-3 (patient identifier list) is empty", header, 101)
    if not any(i.names_the_patient for i in ids):
        raise PrecheckError("AE", "PID-3 holds no patient record number (identifier type MR, PI, PT, PN or empty): "
                                  f"types {', '.join(sorted({i.id_type for i in ids}))} cannot be matched to a "
                                  "study's Patient ID", header, 103)
    # Results are filed under the message's patient: a batch of several patients would give them all to the
    # first one. Refuse it whole (the sender keeps it) rather than file anyone's results under another patient.
    patients = {tuple(sorted((i.id, i.issuer) for i in group)) for group in [ids, *map(identifiers, pids[1:])]}
    if len(patients) > 1:
        raise PrecheckError(
            "AE", f"the message carries results for {len(patients)} different patients ({len(pids)} PID segments):"
                  " send one patient per message (split the batch in the interface engine)", header, 100)
    dob = _component(pid_fields[7], cs, 0).strip()[:8] if len(pid_fields) > 7 else ""
    sex = pid_fields[8].strip()[:1].upper() if len(pid_fields) > 8 else ""
    return MessageHeader(**{**header.__dict__, "patient_ids": tuple(ids), "birth_date": dob, "sex": sex})
