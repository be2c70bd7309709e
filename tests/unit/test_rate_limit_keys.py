"""How GetNonce and Enroll are rate-limited, without a server.

The per-peer bucket is keyed by the caller's address; the per-device bucket by
(device, caller's address), so a stranger naming a device cannot use up the real
device's allowance. The interceptor is built over a stand-in state that has only
``config``: its constructor reads nothing else, and ``_rate_limit`` uses only the
limiters it made.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from attestd.service.config import ServerConfig
from attestd.service.errors import ServiceError
from attestd.service.ratelimit import RateLimiter, peer_host
from attestd.service.security import SecurityInterceptor
from attestd.service.state import ServiceState
from attestd.v1 import attestation_pb2, enrollment_pb2

A1 = "ipv4:10.0.0.1:5555"
A1_OTHER_PORT = "ipv4:10.0.0.1:6666"
A2 = "ipv4:10.0.0.2:5555"


def interceptor(**limits: Any) -> SecurityInterceptor:
    """A SecurityInterceptor over a state that holds only a ServerConfig with ``limits``."""
    config = ServerConfig(
        **{
            "peer_rate_per_s": 0.001,
            "peer_burst": 1000,
            "device_rate_per_s": 0.001,
            "device_burst": 3,
            **limits,
        }
    )
    return SecurityInterceptor(cast(ServiceState, SimpleNamespace(config=config)))


def nonce(device_id: str) -> attestation_pb2.GetNonceRequest:
    return attestation_pb2.GetNonceRequest(device_id=device_id)


def limited(sec: SecurityInterceptor, bucket: str, peer: str, request: Any) -> bool:
    """Whether one call is refused; a refusal must be RESOURCE_EXHAUSTED RATE_LIMITED."""
    try:
        sec._rate_limit(bucket, peer, request)
    except ServiceError as e:
        assert e.code == "RATE_LIMITED"
        assert e.status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in str(e)
        return True
    return False


# -- the interceptor's keys ------------------------------------------------------


def test_a_devices_allowance_is_per_caller_address() -> None:
    sec = interceptor()
    for _ in range(3):
        assert not limited(sec, "nonce", A1, nonce("dev-a"))
    assert limited(sec, "nonce", A1, nonce("dev-a"))
    assert limited(sec, "nonce", A1_OTHER_PORT, nonce("dev-a"))  # the port does not matter
    # Another address asking for the same device has its own allowance: a stranger
    # who used up dev-a's bucket from 10.0.0.1 does not lock dev-a out at 10.0.0.2.
    for _ in range(3):
        assert not limited(sec, "nonce", A2, nonce("dev-a"))
    assert limited(sec, "nonce", A2, nonce("dev-a"))
    # And the first address may still ask for other devices.
    assert not limited(sec, "nonce", A1, nonce("dev-b"))


def test_the_per_peer_limit_holds_across_devices() -> None:
    sec = interceptor(peer_burst=4, device_burst=100)
    for i in range(4):
        assert not limited(sec, "nonce", A1, nonce(f"dev-{i}"))
    assert limited(sec, "nonce", A1, nonce("dev-new"))
    assert limited(sec, "nonce", A1_OTHER_PORT, nonce("dev-newer"))
    assert not limited(sec, "nonce", A2, nonce("dev-new"))  # another address is not held back


def test_a_peer_refusal_spends_nothing_from_the_device_bucket() -> None:
    sec = interceptor(peer_burst=2, device_burst=2)
    assert not limited(sec, "nonce", A1, nonce("dev-a"))
    assert not limited(sec, "nonce", A1, nonce("dev-a"))
    assert limited(sec, "nonce", A1, nonce("dev-a"))
    assert len(sec.device_limits["nonce"]) == 1


def test_nonce_and_enroll_have_separate_buckets() -> None:
    sec = interceptor(peer_burst=2)
    enroll = enrollment_pb2.EnrollRequest(ek_certificate=b"cert", ak_public=b"ak")
    assert not limited(sec, "nonce", A1, nonce("dev-a"))
    assert not limited(sec, "nonce", A1, nonce("dev-a"))
    assert limited(sec, "nonce", A1, nonce("dev-a"))
    assert not limited(sec, "enroll", A1, enroll)


def test_enroll_is_keyed_by_the_ek_and_the_caller_address() -> None:
    sec = interceptor()
    by_cert = enrollment_pb2.EnrollRequest(ek_certificate=b"cert-1", ek_public=b"pub-1")
    for _ in range(3):
        assert not limited(sec, "enroll", A1, by_cert)
    assert limited(sec, "enroll", A1, by_cert)
    # The EK certificate decides, whatever else the request carries.
    same_cert = enrollment_pb2.EnrollRequest(ek_certificate=b"cert-1", ek_public=b"pub-2")
    assert limited(sec, "enroll", A1, same_cert)
    assert not limited(sec, "enroll", A2, by_cert)  # another address
    assert not limited(sec, "enroll", A1, enrollment_pb2.EnrollRequest(ek_certificate=b"cert-2"))
    # Without a certificate, the EK public key is the key.
    by_public = enrollment_pb2.EnrollRequest(ek_public=b"pub-1")
    for _ in range(3):
        assert not limited(sec, "enroll", A1, by_public)
    assert limited(sec, "enroll", A1, by_public)
    keys = list(sec.device_limits["enroll"]._buckets)
    assert f"{hashlib.sha256(b'cert-1').hexdigest()}|10.0.0.1" in keys
    assert f"{hashlib.sha256(b'pub-1').hexdigest()}|10.0.0.1" in keys
    assert not any("cert-1" in k or "pub-1" in k for k in keys)  # hashed, never raw


@pytest.mark.parametrize(
    ("first", "same_host", "other_host"),
    [
        ("ipv6:[2001:db8::1]:5555", "ipv6:[2001:db8::1]:6666", "ipv6:[2001:db8::2]:5555"),
        # What grpcio actually reports for IPv6 peers: the brackets percent-encoded.
        ("ipv6:%5B2001:db8::1%5D:5555", "ipv6:%5B2001:db8::1%5D:6666", "ipv6:%5B::1%5D:5555"),
    ],
)
def test_ipv6_peers_are_keyed_by_host(first: str, same_host: str, other_host: str) -> None:
    sec = interceptor()
    for _ in range(3):
        assert not limited(sec, "nonce", first, nonce("dev-a"))
    assert limited(sec, "nonce", same_host, nonce("dev-a"))
    assert not limited(sec, "nonce", other_host, nonce("dev-a"))


# -- peer_host -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:1.2.3.4:555", "1.2.3.4"),
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ipv6:[::1]:555", "::1"),
        ("ipv6:[2001:db8::1]:443", "2001:db8::1"),
        ("ipv6:[fe80::1", "[fe80::1"),  # no closing bracket: the rest as it is
        ("unix:/run/attestd.sock", "unix:/run/attestd.sock"),
        ("", ""),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_peer_host_drops_the_port_of_a_percent_encoded_ipv6_peer() -> None:
    a = peer_host("ipv6:%5B2001:db8::1%5D:5555")
    assert a == peer_host("ipv6:%5B2001:db8::1%5D:6666") == "2001:db8::1"
    assert a != peer_host("ipv6:%5B2001:db8::2%5D:5555")
    assert "5555" not in a


# -- RateLimiter -----------------------------------------------------------------


def test_burst_then_refusal_with_the_wait() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3)
    assert [rl.take("k", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("k", 100.0) == pytest.approx(0.5)  # one call every 0.5 s
    assert rl.take("other", 100.0) == 0.0  # keys are independent


def test_refill_at_the_rate_up_to_the_burst() -> None:
    rl = RateLimiter(rate_per_s=2.0, burst=3)
    for _ in range(3):
        rl.take("k", 0.0)
    assert rl.take("k", 0.25) == pytest.approx(0.25)  # half a call refilled, not spent
    assert rl.take("k", 0.5) == 0.0  # one full call after 0.5 s
    assert rl.take("k", 0.5) > 0.0
    # A long pause refills only up to the burst.
    assert [rl.take("k", 1000.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("k", 1000.0) > 0.0


def test_a_refused_call_does_not_spend() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1)
    assert rl.take("k", 0.0) == 0.0
    for _ in range(10):
        assert rl.take("k", 0.5) == pytest.approx(0.5)
    assert rl.take("k", 1.0) == 0.0


def test_the_clock_going_back_does_not_refill() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1)
    rl.take("k", 10.0)
    assert rl.take("k", 5.0) > 0.0


def test_memory_is_bounded_by_max_keys_least_recently_used_first() -> None:
    rl = RateLimiter(rate_per_s=0.001, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert rl.take(key, 0.0) == 0.0
    assert rl.take("a", 0.0) > 0.0  # "a" is now the most recently used
    assert rl.take("d", 0.0) == 0.0  # evicts "b", the least recently used
    assert len(rl) == 3
    assert rl.take("a", 0.0) > 0.0  # kept: still limited
    assert rl.take("c", 0.0) > 0.0  # kept
    assert rl.take("b", 0.0) == 0.0  # forgotten: starts again with a full bucket
    assert len(rl) == 3
    for i in range(1000):
        rl.take(f"rotating-{i}", 0.0)
    assert len(rl) == 3


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"), [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]
)
def test_limits_must_be_positive(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_keys)
