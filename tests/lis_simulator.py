"""A small LIS/RIS peer for tests: answers QBP^Q11 with RSP^K11 and QRY^R02 with ORF^R04 over MLLP, and
accepts ORU^R01 result messages (ACK AA) the way a RIS interface would.

Written from the HL7 v2.5 query/response grammar, independently of hl7/ (its own
framing and segment handling), so a test exercises our query client against a
peer that does not share its assumptions. Misbehaviours are switches: a delay,
dropped connections, an answer about another patient, a refusal.
"""
from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

SB, EB = b"\x0b", b"\x1c\x0d"


@dataclass
class LabPatient:
    patient_id: str
    issuer: str
    birth_date: str = "19580312"
    sex: str = "F"
    # (LOINC, name, value, unit, status, observed YYYYmmddHHMM)
    results: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)


class LISSimulator:
    def __init__(self, patients: list[LabPatient], *, ssl_context: ssl.SSLContext | None = None,
                 port: int = 0) -> None:
        self.patients = {p.patient_id: p for p in patients}
        self.ssl_context = ssl_context
        self.delay_s = 0.0
        self.drop_connections = 0  # close this many connections without answering
        self.answer_for = ""  # answer with this patient instead of the asked one
        self.refuse = ""  # MSA-1 AE with this text
        self.drip_s = 0.0  # send the answer one byte at a time, this long apart (a LIS stuck mid-answer)
        self.requests: list[str] = []
        self.results: list[str] = []  # ORU^R01 messages accepted
        self._sock = socket.create_server(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "LISSimulator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            if self.drop_connections > 0:
                self.drop_connections -= 1
                return
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            buf = b""
            conn.settimeout(10)
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while SB in buf and EB in buf:
                    start, end = buf.index(SB), buf.index(EB)
                    request = buf[start + 1:end].decode("latin-1")
                    buf = buf[end + 2:]
                    self.requests.append(request)
                    time.sleep(self.delay_s)
                    try:
                        self._send(conn, SB + self.answer(request).encode("latin-1") + EB)
                    except OSError:
                        return

    def _send(self, conn: socket.socket, data: bytes) -> None:
        if not self.drip_s:
            conn.sendall(data)
            return
        for i in range(len(data)):
            if self._stop.is_set():
                return
            conn.sendall(data[i:i + 1])
            time.sleep(self.drip_s)

    def answer(self, request: str) -> str:
        segs = {s[:3]: s.split("|") for s in request.replace("\n", "\r").split("\r") if s}
        msh = segs["MSH"]
        control, trigger = msh[9], msh[8].split("^")[:2]
        now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
        reply_control = "LIS" + str(len(self.requests))  # reused across runs: the client must cope
        if trigger == ["QBP", "Q11"]:
            qpd = segs["QPD"]
            tag, who, start, end = qpd[2], qpd[3].split("^")[0], qpd[4], qpd[5]
            head = [f"MSH|^~\\&|LIS|LAB|{msh[2]}|{msh[3]}|{now}||RSP^K11^RSP_K11|{reply_control}|P|2.5.1"]
        elif trigger == ["QRY", "R02"]:
            qrd, qrf = segs["QRD"], segs["QRF"]
            tag, who, start, end = qrd[4], qrd[8].split("^")[0], qrf[2], qrf[3]
            head = [f"MSH|^~\\&|LIS|LAB|{msh[2]}|{msh[3]}|{now}||ORF^R04|{reply_control}|P|2.3"]
        elif trigger == ["ORU", "R01"]:
            if "PID" not in segs or "OBX" not in segs or not msh[9]:
                return f"MSH|^~\\&|LIS|LAB|||{now}||ACK^R01|{reply_control}|P|2.5.1\rMSA|AE|{control}|no PID/OBX\r"
            self.results.append(request)
            return f"MSH|^~\\&|LIS|LAB|{msh[2]}|{msh[3]}|{now}||ACK^R01|{reply_control}|P|2.5.1\rMSA|AA|{control}\r"
        else:
            return f"MSH|^~\\&|LIS|LAB|||{now}||ACK|{reply_control}|P|2.5.1\rMSA|AR|{control}|unsupported query\r"
        if self.refuse:
            return "\r".join(head + [f"MSA|AE|{control}|{self.refuse}"]) + "\r"
        patient = self.patients.get(self.answer_for or who)
        rows = [r for r in (patient.results if patient else []) if start[:8] <= r[5][:8] <= end[:8]]
        if trigger == ["QBP", "Q11"]:
            body = [f"MSA|AA|{control}", f"QAK|{tag}|{'OK' if rows else 'NF'}|{segs['QPD'][1]}",
                    "|".join(segs["QPD"])]
        else:
            body = [f"MSA|AA|{control}", "|".join(segs["QRD"]), "|".join(segs["QRF"])]
        if rows and patient:
            body.append(f"PID|1||{patient.patient_id}^^^{patient.issuer}^MR||DOE^JANE||{patient.birth_date}|"
                        f"{patient.sex}")
            body.append(f"OBR|1|Q-{tag}|F-{tag}|24323-8^Chemistry^LN|||{rows[0][5]}")
            for i, (code, name, value, unit, status, when) in enumerate(rows, 1):
                body.append(f"OBX|{i}|NM|{code}^{name}^LN||{value}|{unit}|||||{status}|||{when}")
        return "\r".join(head + body) + "\r"
