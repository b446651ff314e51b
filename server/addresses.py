"""HOST:PORT addresses as the flags give them, split into host and port and joined again."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket


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


def _is_ip(host: str) -> bool:
    """Whether host is an IP address (an IPv6 one may carry a %zone), not a name."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _assignable(host: str) -> bool:
    """Whether this machine has the address host (a socket can bind it, on any port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return False
        raise
    return True


def bind_targets(address: str) -> list[str]:
    """The HOST:PORT addresses to listen on for address, each of which must bind.

    grpc binds a name's addresses itself but serves when any one of them binds:
    "localhost:50051" served on [::1] alone while 127.0.0.1:50051 was another
    program's. So: an IP address as given; "localhost" as 127.0.0.1 and ::1, as grpc
    takes it; another name as each address it resolves to. Addresses this machine does
    not have (::1 where IPv6 is off) are left out; when none is left, or the name does
    not resolve, the address as given (grpc then says it cannot bind it)."""
    host, port = split(address)
    if _is_ip(host):
        return [address]
    if host == "localhost":
        found = ["127.0.0.1", "::1"]
    else:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return [address]
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    try:
        local = [found_host for found_host in found if _assignable(found_host)]
    except OSError:
        return [address]
    return [join(local_host, port) for local_host in local] or [address]
