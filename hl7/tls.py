"""SSL contexts for MLLP over TLS, built from the ``hl7.tls`` and ``lis_query.tls`` settings."""
from __future__ import annotations

import os
import ssl

from config.schema import TLSSettings


class TLSConfigError(ValueError):
    pass


def _load_chain(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    password = None
    if tls.key_password_env:
        password = os.environ.get(tls.key_password_env)
        if password is None:
            raise TLSConfigError(f"environment variable {tls.key_password_env} (the password of {tls.key_file}) is "
                                 "not set: add it to the service's environment (systemd EnvironmentFile)")
    try:
        # A callable, never None: with None, OpenSSL would prompt on the terminal for an encrypted key's password.
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=lambda: password or "")
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot load certificate {tls.cert_file} with key {tls.key_file}: {exc.reason or exc}"
                             + _hint(exc, tls, password)) from None


def _hint(exc: ssl.SSLError, tls: TLSSettings, password: str | None) -> str:
    """What the operator most likely has to fix, from the key file and OpenSSL's reason."""
    try:
        encrypted = b"ENCRYPTED" in open(tls.key_file, "rb").read(4096)
    except OSError:
        encrypted = False
    if encrypted:
        return (" (the key is encrypted: set key_password_env)" if password is None
                else f" (wrong password in {tls.key_password_env}?)")
    if "MISMATCH" in str(exc.reason or ""):
        return " (the key does not belong to the certificate)"
    return " (both must be PEM files: the certificate, and its unencrypted or key_password_env-protected key)"


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The listener's context (TLS 1.2+); with ``ca_file`` every sender must present a certificate it signed."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls)
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
        _load_chain(ctx, tls)
    return ctx
