"""HOST:PORT as the flags give it: split into host and port, and joined again."""

import socket

import pytest

from enrollment.server import addresses


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", "50051"),
        ("localhost:0", "localhost", "0"),
        ("[::1]:9464", "::1", "9464"),
        ("[::]:50051", "::", "50051"),
        (":50051", "", "50051"),
        ("50051", "", "50051"),
        ("host:", "host", ""),
    ],
)
def test_split_takes_the_last_colon_and_drops_ipv6_brackets(address, host, port):
    assert addresses.split(address) == (host, port)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "[::1]:9464", "localhost:0"])
def test_join_gives_back_what_split_took_apart(address):
    assert addresses.join(*addresses.split(address)) == address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


_IPV6 = _ipv6_loopback()


@pytest.mark.parametrize(
    ("address", "targets"),
    [
        ("127.0.0.1:50051", ["127.0.0.1:50051"]),
        ("[::]:0", ["[::]:0"]),
        ("0.0.0.0:7", ["0.0.0.0:7"]),
        # grpc's own "localhost": both loopbacks, where the machine has IPv6 on.
        ("localhost:50051", ["127.0.0.1:50051"] + (["[::1]:50051"] if _IPV6 else [])),
        # A name that does not resolve is left to grpc, which says it cannot bind it.
        ("no-such-host.invalid:50051", ["no-such-host.invalid:50051"]),
    ],
)
def test_bind_targets_are_every_local_address_of_a_name(address, targets):
    assert addresses.bind_targets(address) == targets
