"""SSL contexts for MLLP over TLS, built from the ``hl7.tls`` and ``lis_query.tls`` settings."""
from __future__ import annotations

import ssl

from config.schema import TLSSettings


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The listener's context (TLS 1.2+); with ``ca_file`` every sender must present a certificate it signed."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """A verifying client context (TLS 1.2+); never one that accepts any certificate."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx
