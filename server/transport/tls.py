"""TLS and mutual-TLS server credentials from PEM files, checked before the server binds."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import grpc

from enrollment.server import addresses


class TlsConfigError(ValueError):
    """The TLS files cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read the {what} {path!r}: {exc.strerror}") from exc


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """None without --tls-cert (plaintext); TLS, or mTLS when client_ca is given."""
    if not cert and not key and not client_ca:
        return None
    if not cert and not key:
        raise TlsConfigError(
            "--tls-client-ca turns on mutual TLS, which needs TLS: give --tls-cert and "
            "--tls-key too"
        )
    if not cert or not key:
        raise TlsConfigError("--tls-cert and --tls-key go together")
    # Let OpenSSL judge the files now, so a wrong file is a clear start-up error
    # rather than failed handshakes later.
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"--tls-cert {cert!r} and --tls-key {key!r} are not a PEM certificate and its "
            f"private key: {exc}"
        ) from exc
    root = None
    if client_ca:
        try:
            check.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(
                f"--tls-client-ca {client_ca!r} is not a PEM CA certificate: {exc}"
            ) from exc
        root = _read(client_ca, "client CA file")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=root,
        require_client_auth=root is not None,
    )


def is_loopback(address: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 listen addresses."""
    host, _ = addresses.split(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
