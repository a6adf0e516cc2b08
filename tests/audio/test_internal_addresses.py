"""The audio downloader's internal-address check sees through IPv6 forms that carry an IPv4
address: 6to4, IPv4-mapped, IPv4-compatible, NAT64 and Teredo. A name resolving to any of them
with a refused IPv4 inside is refused, whatever the host allowlist says; ordinary public
addresses pass."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from workers.audio.download import AudioFailure, Target, UrlPolicy

HOST = "audio.example.com"
URL = f"https://{HOST}/a.m4a"

# IPv4 networks the check refuses (loopback, private, link-local, metadata, shared, test
# ranges, multicast, reserved, this-network, broadcast), to draw refused addresses from often.
REFUSED_V4 = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
# Blocks of ordinary public unicast (no special-purpose range inside them).
PUBLIC_V4 = ["8.0.0.0/8", "23.0.0.0/8", "52.0.0.0/8", "93.0.0.0/8", "151.0.0.0/8", "212.0.0.0/8"]
PUBLIC_V6 = ["2400::/12", "2600::/12", "2a00::/12"]


def policy_resolving_to(address: str) -> UrlPolicy:
    async def resolver(host: str, port: int) -> list[str]:
        return [address]

    return UrlPolicy((HOST,), (), resolver)


def check(address: str) -> Target:
    return asyncio.run(policy_resolving_to(address).check(URL))


def refusal(address: str) -> AudioFailure:
    with pytest.raises(AudioFailure) as err:
        check(address)
    return err.value


def is_refused(address: str) -> bool:
    try:
        check(address)
    except AudioFailure as exc:
        assert exc.code == "internal_address" and not exc.retry
        return True
    return False


def in_network(network: str) -> st.SearchStrategy[int]:
    net = ipaddress.ip_network(network)
    return st.integers(int(net.network_address), int(net.broadcast_address))


def v4(n: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(n)


def v6(n: int) -> str:
    return str(ipaddress.IPv6Address(n))


# --- every way of carrying an IPv4 address inside an IPv6 one -----------------------------------


def six_to_four(ip4: int, rest: int) -> str:  # 2002:AABB:CCDD::/48, any subnet and host
    return v6((0x2002 << 112) | (ip4 << 80) | (rest & ((1 << 80) - 1)))


def mapped(ip4: int, rest: int) -> str:  # ::ffff:a.b.c.d
    return v6((0xFFFF << 32) | ip4)


def compatible(ip4: int, rest: int) -> str:  # ::a.b.c.d (deprecated)
    return v6(ip4)


def nat64(ip4: int, rest: int) -> str:  # 64:ff9b::a.b.c.d
    return v6((0x64FF9B << 96) | ip4)


def nat64_local(ip4: int, rest: int) -> str:  # 64:ff9b:1::/48, RFC 6052 /96 placement
    return v6((0x0064FF9B0001 << 80) | ip4)


def teredo_client(ip4: int, rest: int) -> str:
    # 2001:0:SSSS:SSSS:flags:port:~client; the server address comes from `rest`.
    server, flags_port = (rest >> 32) & 0xFFFFFFFF, rest & 0xFFFFFFFF
    return v6((0x20010000 << 96) | (server << 64) | (flags_port << 32) | (ip4 ^ 0xFFFFFFFF))


def teredo_server(ip4: int, rest: int) -> str:
    return v6((0x20010000 << 96) | (ip4 << 64) | (rest & ((1 << 64) - 1)))


EMBEDDINGS = [six_to_four, mapped, compatible, nat64, nat64_local, teredo_client, teredo_server]


refused_v4 = st.one_of(st.integers(0, 2**32 - 1), *(in_network(n) for n in REFUSED_V4))


@settings(max_examples=300, deadline=None)
@given(ip4=refused_v4, rest=st.integers(0, 2**80 - 1), embed=st.sampled_from(EMBEDDINGS))
def test_every_embedding_of_a_refused_ipv4_address_is_refused(ip4, rest, embed):
    assume(is_refused(str(v4(ip4))))
    assert is_refused(embed(ip4, rest)), (embed.__name__, str(v4(ip4)))


@settings(max_examples=200, deadline=None)
@given(ip4=st.one_of(*(in_network(n) for n in PUBLIC_V4)))
def test_public_ipv4_addresses_pass(ip4):
    assert check(str(v4(ip4))).address == str(v4(ip4))


@settings(max_examples=200, deadline=None)
@given(ip6=st.one_of(*(in_network(n) for n in PUBLIC_V6)))
def test_public_ipv6_addresses_pass(ip6):
    assert check(v6(ip6)).address == v6(ip6)


@settings(max_examples=100, deadline=None)
@given(ip4=st.one_of(*(in_network(n) for n in PUBLIC_V4)), rest=st.integers(0, 2**80 - 1))
def test_the_mapped_form_of_a_public_ipv4_address_passes(ip4, rest):
    # An IPv4-mapped address is the IPv4 address itself (a dual-stack socket's view of it).
    assert not is_refused(mapped(ip4, rest))


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("2002:7f00:1::", "127.0.0.1, a loopback address"),
        ("2002:a9fe:a9fe::1", "169.254.169.254, a link-local address"),
        ("2002:a00:1:5::9", "10.0.0.1, a private address"),
    ],
)
def test_a_6to4_address_carrying_an_internal_ipv4_address_is_refused(address, inside):
    err = refusal(address)
    assert err.code == "internal_address" and not err.retry
    assert f"{address} is a 6to4 address carrying {inside}" in err.detail
    assert f"({HOST} resolves to it)" in err.detail


def test_a_6to4_literal_in_the_url_is_refused_even_when_allowed_as_a_host():
    policy = UrlPolicy(("[2002:a9fe:a9fe::]",))
    with pytest.raises(AudioFailure) as err:
        asyncio.run(policy.check("http://[2002:a9fe:a9fe::]/latest/meta-data/"))
    assert err.value.code == "internal_address"
    assert "169.254.169.254, a link-local address" in err.value.detail


def test_teredo_names_the_internal_client_address():
    # Client 127.0.0.1 is stored inverted in the last 32 bits: ~0x7f000001 = 0x80fffffe.
    err = refusal("2001:0:4136:e378:8000:63bf:80ff:fffe")
    assert "a Teredo address carrying 127.0.0.1, a loopback address" in err.detail
