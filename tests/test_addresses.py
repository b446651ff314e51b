"""HOST:PORT as the flags give it: split into host and port, and joined again."""

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
