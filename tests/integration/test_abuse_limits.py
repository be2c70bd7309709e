"""Abuse limits and safe defaults: rate limits, the nonce cap, message size, file modes, logs.

GetNonce and Enroll need no credential, so they are rate-limited per peer
address and per device from that address (a token bucket: a burst, then a
sustained rate); a device keeps only its newest max_outstanding_nonces unused
nonces, older ones are retired (NONCE_RETIRED), never refused; requests larger than
max_message_bytes are refused by gRPC itself. The server will not start on a
data directory or key file others can read, and never logs a secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code, server_config
from tpmsim import Manufacturer

from attestd.agent.tpm import DeviceTpm
from attestd.service.config import ConfigError, ServerConfig
from attestd.service.server import create_server
from attestd.tlsinit import TlsFiles
from attestd.v1 import (
    admin_pb2,
    attestation_pb2,
    common_pb2,
    enrollment_pb2,
    verdicts_pb2,
)

pytestmark = pytest.mark.integration

AFFIRMING = common_pb2.VERDICT_STATUS_AFFIRMING
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    status, code = rpc_code(info.value)
    return status, code, info.value.details() or ""


def get_nonce(server: ServerThread, device_id: str) -> attestation_pb2.GetNonceResponse:
    grant: attestation_pb2.GetNonceResponse = server.attestation.GetNonce(
        attestation_pb2.GetNonceRequest(device_id=device_id)
    )
    return grant


def attest_with(
    dev: Device, grant: attestation_pb2.GetNonceResponse
) -> attestation_pb2.AttestResponse:
    """Quote the grant's selection over its nonce on the device's TPM and attest."""
    selection = [(s.bank, list(s.indices)) for s in grant.pcr_selection]
    with DeviceTpm(dev.tpm.tcti) as tpm:
        q = tpm.quote(selection, grant.nonce)
    response: attestation_pb2.AttestResponse = dev.server.attestation.Attest(
        attestation_pb2.AttestRequest(
            device_id=dev.device_id,
            nonce=grant.nonce,
            quote=q.attest,
            signature=q.signature,
            pcrs=[common_pb2.PcrBank(bank=b, values=v) for b, v in q.pcrs.items()],
        )
    )
    return response


def enrolled(
    device_factory: Callable[..., Device], server: ServerThread, n: int = 1
) -> list[Device]:
    """``n`` enrolled devices of ``server``, whose boot is its golden 'default' policy."""
    devs = [device_factory(target=server) for _ in range(n)]
    server.put_policy(devs[0].golden_policy())
    return devs


# -- rate limits ---------------------------------------------------------------------------------


def test_get_nonce_is_limited_per_peer(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(peer_rate_per_s=1, peer_burst=3)
    dev, dev2 = enrolled(device_factory, server, 2)
    for _ in range(3):
        assert get_nonce(server, dev.device_id).nonce
    status, code, details = rpc_error(lambda: get_nonce(server, dev.device_id))
    assert (status, code) == (EXHAUSTED, "RATE_LIMITED")
    assert "retry in" in details
    # The limit is the address's, whichever device it asks for.
    assert rpc_error(lambda: get_nonce(server, dev2.device_id))[:2] == (EXHAUSTED, "RATE_LIMITED")
    # Calls that are not limited still work from the same address.
    server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))


def test_get_nonce_is_limited_per_device(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    # The device bucket is keyed by (device id, caller's address): these calls all come
    # from one address, so it applies (other addresses: tests/unit/test_rate_limit_keys.py).
    server = server_factory(device_rate_per_s=0.01, device_burst=2)
    dev, dev2 = enrolled(device_factory, server, 2)
    get_nonce(server, dev.device_id)
    get_nonce(server, dev.device_id)
    status, code, _ = rpc_error(lambda: get_nonce(server, dev.device_id))
    assert (status, code) == (EXHAUSTED, "RATE_LIMITED")
    # Another device is not held back by the first one's bucket.
    assert get_nonce(server, dev2.device_id).nonce
    assert get_nonce(server, dev2.device_id).nonce
    assert rpc_error(lambda: get_nonce(server, dev2.device_id))[:2] == (EXHAUSTED, "RATE_LIMITED")


def test_enroll_is_limited_per_peer(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(peer_rate_per_s=0.01, peer_burst=2)
    first = device_factory(target=server)  # Enroll 1
    second = device_factory(target=server)  # Enroll 2
    third = device_factory(target=server, enroll=False)
    status, code, _ = rpc_error(third.agent.enroll)
    assert (status, code) == (EXHAUSTED, "RATE_LIMITED")
    # Even garbage is refused by the limit before it is parsed.
    garbage = enrollment_pb2.EnrollRequest(ek_certificate=b"x", ek_public=b"y", ak_public=b"z")
    status, code, _ = rpc_error(lambda: server.enrollment.Enroll(garbage))
    assert (status, code) == (EXHAUSTED, "RATE_LIMITED")
    for dev in (first, second):
        server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=dev.device_id))
    # GetNonce has a bucket of its own.
    server.put_policy(first.golden_policy())
    assert get_nonce(server, first.device_id).nonce


# -- unused nonces -------------------------------------------------------------------------------


def nonce_rows(server: ServerThread, device_id: str) -> dict[bytes, int | None]:
    """The device's nonce rows in the store: SHA-256 of the nonce -> used_at_ms."""
    with contextlib.closing(
        sqlite3.connect(f"file:{server.config.store_path}?mode=ro", uri=True, timeout=10)
    ) as db:
        rows = db.execute(
            "SELECT nonce_hash, used_at_ms FROM nonces WHERE device_id = ?", (device_id,)
        ).fetchall()
    return {bytes(h): used for h, used in rows}


def outstanding(server: ServerThread, device_id: str) -> int:
    """How many unused, unexpired nonces the device holds (by the server's clock)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{server.config.store_path}?mode=ro", uri=True, timeout=10)
    ) as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM nonces WHERE device_id = ? AND used_at_ms IS NULL"
            " AND expires_at_ms > ?",
            (device_id, server.running.state.now_ms()),
        ).fetchone()
    return int(n)


def used_at(
    server: ServerThread, grant: attestation_pb2.GetNonceResponse, device_id: str
) -> object:
    return nonce_rows(server, device_id)[hashlib.sha256(grant.nonce).digest()]


def test_outstanding_nonces_beyond_the_cap_retire_the_oldest(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(max_outstanding_nonces=2)
    (dev,) = enrolled(device_factory, server)
    # No refusal: every GetNonce succeeds, and the oldest beyond the cap is retired.
    grants = [get_nonce(server, dev.device_id) for _ in range(3)]
    assert all(g.nonce for g in grants)
    assert [used_at(server, g, dev.device_id) for g in grants] == [0, None, None]
    assert outstanding(server, dev.device_id) == 2

    status, code, details = rpc_error(lambda: attest_with(dev, grants[0]))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_RETIRED")
    assert "retired" in details and "new one" in details
    assert used_at(server, grants[0], dev.device_id) == 0  # still retired, not "used"

    # The newest nonces still work; using one frees its place.
    assert attest_with(dev, grants[2]).verdict.status == AFFIRMING
    assert outstanding(server, dev.device_id) == 1
    grants.append(get_nonce(server, dev.device_id))
    assert used_at(server, grants[1], dev.device_id) is None  # not retired: room for it
    assert attest_with(dev, grants[1]).verdict.status == AFFIRMING
    assert attest_with(dev, grants[3]).verdict.status == AFFIRMING


def test_a_stranger_asking_for_nonces_cannot_lock_the_device_out(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(max_outstanding_nonces=2)
    (dev,) = enrolled(device_factory, server)
    # Anyone may ask in the device's name: the stored nonces stay bounded...
    for _ in range(25):
        assert get_nonce(server, dev.device_id).nonce
        assert outstanding(server, dev.device_id) <= 2
    assert outstanding(server, dev.device_id) == 2
    rows = nonce_rows(server, dev.device_id)
    assert len(rows) == 25
    assert sorted(rows.values(), key=str) == [0] * 23 + [None] * 2
    # ...and the device still gets a nonce of its own and attests.
    assert dev.agent.attest().verdict.status == AFFIRMING
    assert outstanding(server, dev.device_id) <= 2


def test_expired_nonces_do_not_count_towards_the_cap(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(max_outstanding_nonces=2)
    (dev,) = enrolled(device_factory, server)
    old = [get_nonce(server, dev.device_id), get_nonce(server, dev.device_id)]
    server.advance(server.config.nonce_ttl_s + 1)
    assert outstanding(server, dev.device_id) == 0
    fresh = [get_nonce(server, dev.device_id), get_nonce(server, dev.device_id)]
    # The expired ones took no place (neither new one was retired) and were not retired.
    assert [used_at(server, g, dev.device_id) for g in old + fresh] == [None] * 4
    assert outstanding(server, dev.device_id) == 2
    status, code, _ = rpc_error(lambda: attest_with(dev, old[0]))
    assert (status, code) == (grpc.StatusCode.FAILED_PRECONDITION, "NONCE_EXPIRED")
    assert attest_with(dev, fresh[0]).verdict.status == AFFIRMING
    assert attest_with(dev, fresh[1]).verdict.status == AFFIRMING


# -- message size --------------------------------------------------------------------------------


def test_a_request_larger_than_max_message_bytes_is_refused(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    server = server_factory(max_message_bytes=64 * 1024)
    (dev,) = enrolled(device_factory, server)
    grant = get_nonce(server, dev.device_id)
    huge = attestation_pb2.AttestRequest(
        device_id=dev.device_id, nonce=grant.nonce, event_log=b"\0" * (100 * 1024)
    )
    status, code, _ = rpc_error(lambda: server.attestation.Attest(huge))
    assert status == EXHAUSTED
    assert code == ""  # gRPC refused it before attestd saw it
    # The server still serves, the same connection and new ones alike.
    server.verdicts.GetTrustBundle(verdicts_pb2.GetTrustBundleRequest())
    assert attest_with(dev, grant).verdict.status == AFFIRMING
    assert dev.agent.attest().verdict.status == AFFIRMING


# -- files others can read -----------------------------------------------------------------------


def start_and_stop(config: ServerConfig) -> None:
    """Start a server on ``config`` and stop it at once (raises what start raises)."""

    async def go() -> None:
        running = await create_server(config)
        await running.stop(0)

    asyncio.run(go())


@pytest.fixture
def config_in(
    tmp_path: Path, manufacturer: Manufacturer, tls_files: TlsFiles
) -> Callable[[Path], ServerConfig]:
    def make(data_dir: Path) -> ServerConfig:
        return server_config(data_dir, manufacturer, tls_files)

    return make


@pytest.mark.parametrize("mode", [0o755, 0o705, 0o701])
def test_a_world_accessible_data_dir_is_refused(
    tmp_path: Path, config_in: Callable[[Path], ServerConfig], mode: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chmod(data_dir, mode)
    with pytest.raises(ConfigError) as info:
        start_and_stop(config_in(data_dir))
    assert str(data_dir) in str(info.value)
    assert stat.S_IMODE(data_dir.stat().st_mode) == mode  # left for the operator to check
    assert not (data_dir / "attestd.sqlite").exists()
    assert not (data_dir / "keys").exists()


def test_a_group_readable_data_dir_is_made_private(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chmod(data_dir, 0o750)
    server = server_factory(data_dir=data_dir)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    server.verdicts.GetTrustBundle(verdicts_pb2.GetTrustBundleRequest())


def test_a_signing_key_others_can_read_is_refused_at_start(
    tmp_path: Path, config_in: Callable[[Path], ServerConfig]
) -> None:
    data_dir = tmp_path / "data"
    config = config_in(data_dir)
    start_and_stop(config)  # creates the keys
    keys = sorted((data_dir / "keys").glob("*.pem"))
    assert keys
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) & 0o077 == 0
    os.chmod(keys[0], 0o644)
    with pytest.raises(ConfigError) as info:
        start_and_stop(config)
    assert "readable by others" in str(info.value)
    assert keys[0].name in str(info.value)
    os.chmod(keys[0], 0o600)
    start_and_stop(dataclasses.replace(config))  # fixed: starts again


# -- secrets in logs -----------------------------------------------------------------------------


@pytest.fixture
def debug_logging() -> Iterator[None]:
    """Every logger at DEBUG for the test; the levels restored after."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    try:
        yield
    finally:
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled


def encodings(secret: bytes) -> set[str]:
    forms = {secret.hex(), secret.hex().upper()}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        text = enc(secret).decode()
        forms |= {text, text.rstrip("=")}
    return forms


def test_no_secret_reaches_the_logs(
    server: ServerThread,
    device_factory: Callable[..., Device],
    debug_logging: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: dict[str, set[str]] = {}

    # Enrollment by hand, to see the activation secret and the challenge.
    dev = device_factory(enroll=False)
    with DeviceTpm(dev.tpm.tcti) as tpm:
        cert, ek_public = tpm.endorsement()
        challenge = server.enrollment.Enroll(
            enrollment_pb2.EnrollRequest(
                ek_certificate=cert, ek_public=ek_public, ak_public=tpm.create_ak()
            )
        )
        secret = tpm.activate(challenge.credential_blob, challenge.encrypted_secret)
    server.enrollment.Activate(
        enrollment_pb2.ActivateRequest(
            device_id=challenge.device_id, challenge_id=challenge.challenge_id, secret=secret
        )
    )
    secrets["activation secret"] = encodings(secret)
    secrets["credential blob"] = encodings(challenge.credential_blob)
    secrets["encrypted secret"] = encodings(challenge.encrypted_secret)

    # The agent's own enrollment (the same TPM, a new AK) and attestation.
    dev.agent.enroll(new_ak=True)
    server.put_policy(dev.golden_policy())
    grant = get_nonce(server, dev.device_id)
    secrets["nonce"] = encodings(grant.nonce)
    by_hand = attest_with(dev, grant)
    agent = dev.agent.attest()
    assert by_hand.credential and agent.credential
    secrets["credentials"] = {by_hand.credential, agent.credential}
    # A refused attestation logs too: the same nonce again.
    assert rpc_error(lambda: attest_with(dev, grant))[1] == "NONCE_REUSED"

    made = server.admin.CreateToken(
        admin_pb2.CreateTokenRequest(role=admin_pb2.ROLE_GATEWAY, name="log-check")
    )
    tokens = [made.token, *server.tokens.values()]
    secrets["API tokens"] = set(tokens) | {t.split("_", 2)[2] for t in tokens}

    messages = [r.getMessage() for r in caplog.records]
    text = "\n".join([caplog.text, *messages])
    assert any("activated" in m for m in messages), messages  # the server's logs are here
    for what, forms in secrets.items():
        for form in forms:
            assert form and form not in text, f"the {what} is in the logs"
    assert "PRIVATE KEY" not in text
