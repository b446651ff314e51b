"""HOST:PORT addresses as the flags give them, split into host and port and joined again."""

from __future__ import annotations

import re


def split(address: str) -> tuple[str, str]:
    """The host and the port text of HOST:PORT, an IPv6 host without its brackets:
    '[::1]:50051' gives ('::1', '50051'); an address without a colon gives ('', address)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def join(host: str, port: int | str) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_PORT = re.compile(r"[0-9]{1,5}")


def well_formed(address: str) -> bool:
    """Whether address is HOST:PORT with a host and a port of 0-65535 (0: any free port).
    grpc itself takes a port beyond 65535 modulo 65536, and an empty one as 443."""
    host, port = split(address)
    # A host never holds a "/": "http://host:50051" is a URL, not an address.
    return bool(host) and "/" not in host and bool(_PORT.fullmatch(port)) and int(port) <= 65535
