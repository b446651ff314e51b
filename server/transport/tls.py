"""TLS and mutual-TLS server credentials from PEM files, checked before the server binds."""

from __future__ import annotations

import ipaddress
import re
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


_SOURCE_LINE = re.compile(r" \(_ssl\.c:\d+\)$")


def _said(exc: ssl.SSLError | OSError) -> str:
    """OpenSSL's words without the "(_ssl.c:3926)" of CPython's source."""
    return _SOURCE_LINE.sub("", str(exc))


def server_credentials(
    cert: str | None,
    key: str | None,
    client_ca: str | None,
    *,
    named: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca"),
) -> grpc.ServerCredentials | None:
    """None without a certificate (plaintext); TLS, or mTLS when client_ca is given.
    The settings are consistent (ServerConfig.check() refuses a key, or a client CA,
    without a certificate); named: how the three were given (flags, or ENROLLMENT_*
    variables), for the errors about the files."""
    cert_is, key_is, client_ca_is = named
    if not cert or not key:
        return None
    # Let OpenSSL judge the files now, so a wrong file is a clear start-up error
    # rather than failed handshakes later.
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"{cert_is} {cert!r} and {key_is} {key!r} are not a PEM certificate and its "
            f"private key: {_said(exc)}"
        ) from exc
    root = None
    if client_ca:
        try:
            check.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(
                f"{client_ca_is} {client_ca!r} is not a PEM CA certificate: {_said(exc)}"
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
