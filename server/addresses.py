"""HOST:PORT addresses as the flags give them, split into host and port and joined again."""

from __future__ import annotations


def split(address: str) -> tuple[str, str]:
    """The host and the port text of HOST:PORT, an IPv6 host without its brackets:
    '[::1]:50051' gives ('::1', '50051'); an address without a colon gives ('', address)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def join(host: str, port: int | str) -> str:
    """HOST:PORT, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
