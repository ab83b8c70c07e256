"""The settings schema: one TOML file, validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the key
instead of a setting that silently does nothing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# Upper bounds of durations, so that a typo (1e300) is named here instead of an OverflowError in a scheduler, a
# timer or date arithmetic: a year in each field's unit (days: a century, as for the lab windows).
MAX_SECONDS = 365 * 86400
MAX_HOURS = 365 * 24
MAX_DAYS = 36500
MAX_PDU = 64 * 1024 * 1024  # the receiver buffers one PDU: a peer must not make it allocate more (see scp.py)


def _ae_title(value: str) -> str:
    """DICOM AE VR: 1-16 characters of printable ASCII without backslash; leading and trailing spaces are not
    significant (the receiver strips the calling AE title), so they are stripped here."""
    value = value.strip(" ")
    bad = sorted({c for c in value if not ("\x20" <= c <= "\x7e") or c == "\\"})
    if bad:
        raise ValueError(f"AE title {value!r} has {', '.join(repr(c) for c in bad)}: an AE title is 1-16 characters of "
                         "printable ASCII (letters, digits, spaces, punctuation) without a backslash; "
                         "use the AE title as configured on the peer")
    if not value:
        raise ValueError("AE title is empty or only spaces: an AE title is 1-16 characters of printable ASCII")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} has {len(value)} characters: an AE title has at most 16; "
                         "use the AE title as configured on the peer")
    return value


def _code_string(value: str) -> str:
    """A value compared with a DICOM code string (CS: upper case; padding not significant)."""
    value = value.strip().upper()
    if not value:
        raise ValueError("empty entry: it never matches a DICOM value; remove it")
    return value


def _empty_is_none(value: object) -> object:
    """An empty path setting means its default (None), never Path("") == "." (the working directory)."""
    return None if isinstance(value, str) and not value.strip() else value


AETitle = Annotated[str, AfterValidator(_ae_title)]
CodeString = Annotated[str, AfterValidator(_code_string)]
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """TLS for an MLLP connection. Files are PEM. Off unless ``enabled``."""

    enabled: bool = False
    cert_file: OptionalPath = Field(
        None, description="Our certificate (listener: required; client: for mutual TLS; empty: none).")
    key_file: OptionalPath = Field(None, description="Private key of cert_file (empty: none).")
    ca_file: OptionalPath = Field(
        None, description="Listener: require client certificates signed by these CAs. "
                          "Client: trust these CAs instead of the system store. Empty: none.")
    check_hostname: bool = Field(
        True, description="Client connections only ([lis_query.tls], [followup.tls]): the server certificate must "
                          "name the host connected to. A listener ([node.tls], [hl7.tls]) does not check host names "
                          "(it checks client certificates against ca_file), so it refuses this key.")
    key_password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding key_file's password (an encrypted key). The secret "
                    "never goes in this file: set it in the unit's EnvironmentFile or a systemd credential.")

    @model_validator(mode="after")
    def _files(self) -> "TLSSettings":
        if not self.enabled:
            return self
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist or is not a file")
        return self


class ListenerTLSSettings(TLSSettings):
    """TLS for one of our listeners: when enabled, it needs its certificate and key."""

    @field_validator("check_hostname")
    @classmethod
    def _no_check_hostname(cls, value: bool) -> bool:
        # only a value given in the file is validated (the default is not): that one would do nothing here
        raise ValueError("check_hostname applies to client connections only ([lis_query.tls], [followup.tls]); "
                         "a listener checks client certificates against ca_file, not host names: remove it")

    @model_validator(mode="after")
    def _listener_cert(self) -> "ListenerTLSSettings":
        if self.enabled and self.cert_file is None:
            raise ValueError("a TLS listener needs cert_file and key_file")
        return self


class NodeSettings(_Section):
    """The DICOM listener (C-ECHO / C-STORE SCP)."""

    ae_title: AETitle = "OSTEOSCREEN"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu: int = Field(
        131072, description="Largest P-DATA-TF PDU received, in bytes, advertised to the sender as its maximum "
                            "length: 4096..67108864 (64 MiB), or 0 for the node's ceiling of 64 MiB (advertised as such; "
                            "a longer PDU is aborted), not 'unlimited'.")
    allowed_calling_aets: list[AETitle] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty accepts any (logged as a warning).",
    )
    state_dir: Path = Path("/var/lib/osteoscreen")
    series_quiet_s: float = Field(10.0, gt=0, le=MAX_SECONDS)
    manufacturer: str = "osteoscreen project"
    institution_name: str = ""
    device_serial_number: str = "0001"
    max_associations: int = Field(32, ge=1, le=256, description="Concurrent associations; more are rejected "
                                                              "(A-ASSOCIATE-RJ, transient: local limit exceeded).")
    receiver_processes: int = Field(2, ge=0, le=32, description="Processes that serve DICOM associations, each "
                                    "handed to the least busy one; 0 serves them in the service process.")
    min_free_mb: int = Field(512, ge=0, description="C-STORE is refused (0xA700, out of resources), and an HL7 "
                                                   "message answered AR (resend later), while the state directory "
                                                   "has less free space than this; 0 disables the check.")
    tls: ListenerTLSSettings = ListenerTLSSettings()
    allowed_sop_classes: dict[AETitle, list[str]] = Field(
        default_factory=dict,
        description="Per calling AE title: the SOP classes it may store (UIDs or keywords such as "
                    "CTImageStorage); others are refused with 0x0122. AEs not listed may store any accepted class.")

    @field_validator("max_pdu")
    @classmethod
    def _max_pdu(cls, value: int) -> int:
        if value != 0 and not 4096 <= value <= MAX_PDU:
            raise ValueError(f"{value} is not a usable PDU length: give 4096..{MAX_PDU} bytes (senders refuse less "
                             "than 4096; the node buffers a whole PDU, so it reads at most 64 MiB), or 0 for that "
                             "64 MiB ceiling")
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: the state directory (instances, databases, results) must be a directory, "
                             "e.g. /var/lib/osteoscreen; remove the key to use that default")
        return value

    @field_validator("allowed_sop_classes", mode="before")
    @classmethod
    def _sop_class_keys(cls, value: object) -> object:
        if isinstance(value, dict):
            seen: set[str] = set()
            for ae in value:
                key = ae.strip(" ") if isinstance(ae, str) else ae
                if key in seen:
                    raise ValueError(f"{key!r} is listed twice (AE titles are compared without leading and trailing "
                                     "spaces): merge its SOP classes into one entry")
                seen.add(key)
        return value

    @field_validator("allowed_sop_classes")
    @classmethod
    def _sop_classes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from pynetdicom import sop_class

        resolved = {}
        for ae, classes in value.items():
            uids = []
            for c in classes:
                if re.fullmatch(r"[0-9]+(\.[0-9]+)+", c):
                    uids.append(c)
                elif isinstance(getattr(sop_class, c, None), str):
                    uids.append(str(getattr(sop_class, c)))
                else:
                    raise ValueError(f"allowed_sop_classes[{ae!r}]: {c!r} is neither a UID nor a SOP class keyword "
                                     "(e.g. CTImageStorage, EnhancedCTImageStorage)")
            resolved[ae] = uids
        return resolved


class HL7Settings(_Section):
    """The MLLP listener that receives ORU^R01 lab results."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 2575
    max_message_bytes: int = Field(1_048_576, ge=1024)
    read_timeout_s: float = Field(300.0, gt=0, le=MAX_SECONDS,
                                  description="A connection with no complete frame (or unread ACKs) "
                                              "for this long is closed.")
    max_connections: int = Field(64, ge=1, le=10_000, description="Connections open at once; more are closed at "
                                                                  "accept, with a log line.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Addresses or networks (CIDR) the LIS connects from; a connection from "
                                          "elsewhere is closed at once. Empty: any (a warning at start when the "
                                          "listener is not on loopback and no client certificate is required).")
    allowed_senders: list[str] = Field(
        default_factory=list, description="MSH-3 sending application, or MSH-3|MSH-4 (application|facility), of "
                                          "the senders whose results are stored (case-insensitive); others get AE. "
                                          "Empty: any sender.")
    tls: ListenerTLSSettings = ListenerTLSSettings()

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.1.2.3 or 10.1.2.0/24)") from None
        return [e.strip() for e in value]

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            app, _, facility = entry.partition("|")
            if not app.strip() or "|" in facility:
                raise ValueError(f"{entry!r}: give the sending application (MSH-3), or application|facility "
                                 "(MSH-3|MSH-4)")
            out.append(f"{app.strip().upper()}|{facility.strip().upper()}" if facility.strip() else app.strip().upper())
        return out


class LISQuerySettings(_Section):
    """Pull labs from the LIS when the local store lacks what a job needs (off unless ``enabled``)."""

    enabled: bool = False
    protocol: str = Field("qbp_q11", pattern=r"^(qbp_q11|qry_r02)$",
                          description="qbp_q11: QBP^Q11 -> RSP^K11 (v2.5); qry_r02: QRY^R02 -> ORF^R04 (legacy).")
    host: str = "127.0.0.1"
    port: Port = 2576
    version: str = Field("", pattern=r"^(|2\.3|2\.3\.1|2\.4|2\.5|2\.5\.1)$",
                         description="MSH-12; empty: 2.5.1 for qbp_q11, 2.3 for qry_r02.")
    sending_application: str = "OSTEOSCREEN"
    sending_facility: str = ""
    receiving_application: str = "LIS"
    receiving_facility: str = ""
    query_name: str = Field("Z_LAB_RESULTS^Lab results history^OSTEOSCREEN",
                            description="QPD-1 (qbp_q11), as agreed in the site's conformance statement.")
    max_results: int = Field(200, ge=1, description="RCP-2 / QRD-7 quantity limit.")
    connect_timeout_s: float = Field(3.0, gt=0, le=MAX_SECONDS)
    read_timeout_s: float = Field(10.0, gt=0, le=MAX_SECONDS)
    retries: int = Field(2, ge=0, le=10, description="Further attempts after a failed connection or timeout.")
    budget_s: float = Field(15.0, gt=0, le=MAX_SECONDS,
                            description="All attempts together; the job then goes on without the labs.")
    requery_after_s: float = Field(300.0, ge=0, le=MAX_SECONDS,
                                   description="Do not ask again for the same patient within this time.")
    tls: TLSSettings = TLSSettings()


class LabSettings(_Section):
    window_days: int = Field(90, ge=0, le=MAX_DAYS,
                             description="Labs older than this before the study date are not used.")
    after_study_days: int = Field(1, ge=0, le=MAX_DAYS,
                                  description="Labs up to this long after the study date are used.")
    match_without_issuer: bool = Field(
        True, description="Match patient IDs when either side carries no issuer (single-issuer sites)."
    )
    issuer_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Names of one assigning authority as DICOM (IssuerOfPatientID) or HL7 (PID-3.4) spell it, "
                    "mapped to one name before they are compared, e.g. {\"1.2.3.4.5\" = \"HOSP\"}.",
    )
    mapping_file: OptionalPath = Field(
        None, description="Lab mapping table (TOML); empty uses the shipped hl7/lab_mapping.toml.")
    accept_preliminary: bool = Field(False, description="Use preliminary (OBX-11 P) results when no final one exists.")

    @field_validator("mapping_file")
    @classmethod
    def _mapping_loads(cls, v: Path | None) -> Path | None:
        if v is not None:
            from hl7.mapping import MappingError, load_mapping

            try:
                load_mapping(v)
            except MappingError as exc:
                raise ValueError(str(exc)) from exc
        return v


class RoutingSettings(_Section):
    """Which completed series are screened. Each decision is recorded with its reason."""

    modalities: list[CodeString] = Field(default_factory=lambda: ["CT"],
                                         description="Modality values screened (compared in upper case).")
    require_axial: bool = True
    max_axial_tilt_deg: float = Field(10.0, ge=0, le=45)
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)
    min_slices: int = Field(40, ge=1)
    image_type: list[CodeString] = Field(default_factory=lambda: ["ORIGINAL", "PRIMARY"],
                                          description="ImageType values a series must carry (upper case).")
    calling_aets: list[AETitle] = Field(
        default_factory=list, description="Only screen series sent by these AEs; empty means any."
    )
    min_patient_age_years: int = Field(50, ge=18, description="Adults only: children are never screened.")
    screen_unknown_age: bool = False

    @field_validator("slice_thickness_mm")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("slice_thickness_mm must be [min, max] with 0 < min <= max")
        return v


class XraySettings(_Section):
    """The EXPERIMENTAL chest radiograph path (CR/DX chest PA/AP + labs and demographics). Off by default: its
    image model was trained only on semi-synthetic images derived from one real radiograph."""

    enabled: bool = False
    modalities: list[CodeString] = Field(default_factory=lambda: ["CR", "DX"])
    body_parts: list[CodeString] = Field(default_factory=lambda: ["CHEST", "THORAX"],
                                         description="BodyPartExamined values taken as a chest radiograph.")
    views: list[CodeString] = Field(default_factory=lambda: ["PA", "AP"], description="ViewPosition values screened.")
    model: str = Field("cxr_fusion_v1", description="Chest radiograph bundle: a shipped bundle's name, or a bundle "
                                                    "directory as a path (./mine, /opt/models/mine).")


class JobSettings(_Section):
    workers: int = Field(1, ge=1, le=64)
    max_attempts: int = Field(3, ge=1)
    retry_delay_s: float = Field(30.0, ge=0, le=MAX_SECONDS)
    timeout_s: float = Field(600.0, gt=0, le=MAX_SECONDS,
                             description="A job running longer is stopped (its worker killed) and retried as "
                                         "configured; a hung decoder never blocks the queue.")


class ScreeningSettings(_Section):
    model: str = Field(
        "fused_kdamm_v1",
        description="Fused screening model bundle: a shipped bundle's name, or a bundle directory as a path "
                    "(./mine, /opt/models/mine).",
    )
    attenuation_rule: str = Field(
        "pickhardt_l1_2013", description="Threshold rule reported with the L1 measurement (bundle name or path)."
    )
    backend: str = Field(
        "auto", pattern=r"^(auto|tensorrt|onnxruntime-cuda|onnxruntime-cpu|pytorch|pytorch-cuda|triton)$",
        description="Inference backend; auto: TensorRT, ONNX Runtime CUDA, ONNX Runtime CPU, PyTorch, the first "
                    "available. A forced backend that is unavailable stops the service at start-up.")
    selector: str = Field(
        "drlis_v1",
        description="Learned slice selector bundle (DRLIS), used only where it agrees with the anatomical "
                    "localiser; empty: the localiser alone.",
    )
    image_only_model: str = Field(
        "mmpkd_v1",
        description="Image-only student for studies with neither labs nor demographics: mmpkd_v1 (privileged "
                    "distillation, L1 patch) or cropkd_v1 (crop teacher -> full-slice student; its attention map "
                    "becomes the SC overlay and the SR's region); used only where its card says it beat the fused "
                    "model's image-only path; empty: off.")
    contrast: str = Field(
        "flag", pattern=r"^(flag|skip)$",
        description="Contrast-enhanced studies (header agent or enhanced aorta at L1): 'flag' screens them and "
                    "says so in every output; 'skip' records them as not screened.",
    )


class EnginesSettings(_Section):
    """How the models run (engines/): threads, precision, the TensorRT cache, a Triton server."""

    threads: int | None = Field(None, ge=1, description="Intra-op threads per CPU model session (default: "
                                                        "each network's own share).")
    precision: str = Field("auto", pattern=r"^(auto|fp32|fp16)$",
                           description="auto: fp16 on TensorRT where the model card allows it, else fp32.")
    cache_dir: str = Field("", description="Compiled TensorRT engines (default: <state_dir>/engine-cache).")
    graph_optimization: str = Field("all", pattern=r"^(disabled|basic|extended|all)$",
                                    description="ONNX Runtime graph optimisation level.")
    opt_batch: int = Field(8, ge=1, description="TensorRT profile: the batch it is tuned for.")
    max_batch: int = Field(512, ge=1, description="TensorRT profile: the largest batch; larger calls run in chunks.")
    triton_url: str = Field("", description="host:port of a Triton server (backend = \"triton\"), no scheme.")
    triton_protocol: str = Field("http", pattern=r"^(http|grpc)$")
    triton_timeout_s: float = Field(10.0, gt=0, le=MAX_SECONDS)

    @field_validator("triton_url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not value:
            return value
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})", value)
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            hint = " without the scheme (tritonclient adds it)" if "://" in value else ""
            raise ValueError(f"{value!r} is not host:port: give the Triton server as host:port{hint}, e.g. "
                             "triton.example.org:8000 (http) or :8001 (grpc); [::1]:8000 for an IPv6 address")
        return value

    @model_validator(mode="after")
    def _batches(self) -> "EnginesSettings":
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch ({self.opt_batch}) exceeds max_batch ({self.max_batch})")
        return self


class Destination(_Section):
    name: str = Field(min_length=1, description="Shown in the outbox; names starting with hl7: are reserved.")
    ae_title: AETitle
    host: str
    port: Port

    @field_validator("name")
    @classmethod
    def _not_hl7(cls, value: str) -> str:
        if value.lower().startswith("hl7:"):
            raise ValueError(f"{value!r}: names starting with 'hl7:' are reserved for the HL7 follow-up receiver "
                             "([followup], outbox hl7:NAME); the exporter would send there, not to this AE: "
                             "rename the destination")
        return value


class ExportSettings(_Section):
    calling_ae_title: AETitle | None = Field(None, description="Defaults to node.ae_title.")
    retry_initial_s: float = Field(5.0, gt=0, le=MAX_SECONDS)
    retry_max_s: float = Field(300.0, gt=0, le=MAX_SECONDS)
    timeout_s: float = Field(30.0, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _backoff_order(self) -> "ExportSettings":
        if self.retry_initial_s > self.retry_max_s:
            raise ValueError(f"retry_initial_s ({self.retry_initial_s:g}) is longer than retry_max_s "
                             f"({self.retry_max_s:g}): the first retry delay cannot exceed the longest")
        return self


class ResultsSettings(_Section):
    """Optional DICOM objects sent with the SR and the key image (Secondary Capture)."""

    key_object_selection: bool = Field(False, description="A KOS flagging the measured slice and the key image.")
    presentation_state: bool = Field(False, description="A GSPS drawing the ROI on the measured slice (bone window).")
    report_not_screened: bool = Field(
        False, description="An SR saying why, when a series routed for screening could not be screened "
                           "(no usable input, contrast skipped), so the department knows the study was seen.")


class FollowupSettings(_Section):
    """An ORU^R01 per screening result to the RIS/EHR over MLLP, through the persistent outbox (off by default)."""

    enabled: bool = False
    name: str = Field("ris", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Shown in the outbox as hl7:NAME.")
    host: str = "127.0.0.1"
    port: Port = 2577
    send_for: str = Field("positive", pattern=r"^(positive|all)$",
                          description="positive: only screen-positive results; all: every screened study.")
    recommendation: str = Field(
        "Consider DXA (bone densitometry): opportunistic CT screening suggests an elevated risk of osteoporosis.",
        min_length=1, description="Wording of the recommendation sent with a positive screen.")
    sending_application: str = "OSTEOSCREEN"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    version: str = Field("2.5.1", pattern=r"^(2\.3|2\.3\.1|2\.4|2\.5|2\.5\.1)$")
    timeout_s: float = Field(30.0, gt=0, le=MAX_SECONDS,
                             description="Connect and ACK wait; then the outbox retries with backoff.")
    tls: TLSSettings = TLSSettings()


class WorklistSettings(_Section):
    """A daily CSV + JSON list of positive screens for care coordinators (off by default)."""

    enabled: bool = False
    directory: OptionalPath = Field(
        None, description="Empty or unset: <state_dir>/worklist. Files are 0600 (they hold PHI).")
    at: str = Field("06:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
                    description="Local time of day; the list covers the time since the last list (24 hours; "
                                "a node down at this time writes the lists it missed at its next start).")


class ShadowSettings(_Section):
    """Site validation before go-live: screen everything, deliver nothing to the clinic."""

    enabled: bool = Field(False, description="Results stay in <state_dir>/results (and go only to the QA "
                                             "destinations listed here); no follow-up ORU, no worklist.")
    destinations: list[str] = Field(default_factory=list,
                                    description="Names of [[destinations]] (a QA PACS or AE) that receive results "
                                                "in shadow mode; every other destination gets nothing.")

    @field_validator("destinations")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        twice = sorted({d for d in value if value.count(d) > 1})
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return value


class MetricsSettings(_Section):
    """Prometheus metrics over HTTP (GET /metrics). Keep it on loopback: the labels hold no PHI, but the
    endpoint has no authentication; scrape it through the site's exporter or a local agent."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port (logged at start).")


class RetentionSettings(_Section):
    """Deleting received CT once it has been screened (or skipped) and delivered."""

    instances_days: float = Field(30.0, ge=0, le=MAX_DAYS,
                                  description="Days after routing; 0 keeps received CT forever. Failed jobs and "
                                              "undelivered results (queued, or refused for good by the PACS) keep "
                                              "theirs; cancelled jobs do not.")
    every_h: float = Field(6.0, gt=0, le=MAX_HOURS, description="How often the purge runs (also once at start).")


class LoggingSettings(_Section):
    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    format: str = Field("auto", pattern=r"^(auto|text|json)$",
                        description="json: one object per line with job_id and hashed patient_key (for journald "
                                    "and log shippers); auto: json under systemd, text on a terminal.")


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    hl7: HL7Settings = HL7Settings()
    labs: LabSettings = LabSettings()
    lis_query: LISQuerySettings = LISQuerySettings()
    routing: RoutingSettings = RoutingSettings()
    xray: XraySettings = XraySettings()
    jobs: JobSettings = JobSettings()
    screening: ScreeningSettings = ScreeningSettings()
    engines: EnginesSettings = EnginesSettings()
    destinations: list[Destination] = Field(default_factory=list)
    export: ExportSettings = ExportSettings()
    results: ResultsSettings = ResultsSettings()
    followup: FollowupSettings = FollowupSettings()
    worklist: WorklistSettings = WorklistSettings()
    retention: RetentionSettings = RetentionSettings()
    metrics: MetricsSettings = MetricsSettings()
    shadow: ShadowSettings = ShadowSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _unique_destinations(self) -> "Settings":
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        if self.screening.backend == "triton" and not self.engines.triton_url:
            raise ValueError("screening.backend = \"triton\" needs engines.triton_url")
        unknown = [n for n in self.shadow.destinations if n not in names]
        if unknown:
            raise ValueError(f"shadow.destinations names {unknown} that are not [[destinations]] "
                             f"(known: {names or 'none'})")
        listeners = [("node", self.node.host, self.node.port)]
        listeners += [("hl7", self.hl7.host, self.hl7.port)] if self.hl7.enabled else []
        listeners += [("metrics", self.metrics.host, self.metrics.port)] if self.metrics.enabled else []
        anywhere = ("", "0.0.0.0", "::")
        for i, (a, host_a, port_a) in enumerate(listeners):
            for b, host_b, port_b in listeners[i + 1:]:
                if port_a and port_a == port_b and (host_a == host_b or host_a in anywhere or host_b in anywhere):
                    raise ValueError(f"{a}.port and {b}.port are both {port_a} on {host_a or '*'} / {host_b or '*'}: "
                                     "each listener needs its own port")
        return self
