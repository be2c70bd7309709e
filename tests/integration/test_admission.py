"""Admission control: with admission "preregistered" only listed TPMs may enroll.

An admin lists devices with a manufacturer's manifest (CSV), through the Admin
service's PreregisterDevices or `attestd device preregister FILE.csv`. A device
is identified by its EK certificate's serial and issuer, by the SHA-256 of its
EK public key, or by both (then both must match). The manifest's name shows in
the device's record and its group is assigned at first activation.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import Device, ServerThread, rpc_code, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpmsim import SimTpm

from attestd.v1 import admin_pb2, admin_pb2_grpc, enrollment_pb2, policy_pb2

pytestmark = pytest.mark.integration

HEADER = ("ek_cert_serial", "ek_cert_issuer", "ek_public_sha256", "name", "group")


@dataclass(frozen=True)
class EkIdentity:
    """What enrollment computes from a TPM's EK certificate, as a manifest lists it."""

    serial: str  # lowercase hex, as format(serial, "x")
    issuer: str  # RFC 4514
    sha256: str  # hex SHA-256 of the EK's SubjectPublicKeyInfo

    @property
    def device_id(self) -> str:
        return "dev-" + self.sha256[:32]


def ek_identity(tpm: SimTpm) -> EkIdentity:
    cert = x509.load_der_x509_certificate(tpm.ek_cert_der())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return EkIdentity(
        serial=format(cert.serial_number, "x"),
        issuer=cert.issuer.rfc4514_string(),
        sha256=hashlib.sha256(spki).hexdigest(),
    )


def manifest(*rows: Sequence[str], header: Sequence[str] = HEADER) -> bytes:
    """A CSV manifest (quoted as spreadsheets export it) with ``rows`` after the header."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def preregister(server: ServerThread, data: bytes) -> admin_pb2.PreregisterDevicesResponse:
    resp: admin_pb2.PreregisterDevicesResponse = server.admin.PreregisterDevices(
        admin_pb2.PreregisterDevicesRequest(manifest=data, source="test.csv")
    )
    return resp


def counts(resp: admin_pb2.PreregisterDevicesResponse) -> tuple[int, int, int]:
    return resp.added, resp.updated, resp.unchanged


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    status, code = rpc_code(info.value)
    return status, code, info.value.details() or ""


def table_count(server: ServerThread, table: str) -> int:
    """Rows in one of the server's tables, read through a second connection."""
    with contextlib.closing(sqlite3.connect(server.config.store_path)) as db:
        (n,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(n)


def get_device(server: ServerThread, device_id: str) -> enrollment_pb2.DeviceInfo:
    info: enrollment_pb2.DeviceInfo = server.devices.GetDevice(
        enrollment_pb2.GetDeviceRequest(device_id=device_id)
    )
    return info


def assert_not_enrolled(server: ServerThread, device_id: str) -> None:
    status, code, _ = rpc_error(lambda: get_device(server, device_id))
    assert status == grpc.StatusCode.NOT_FOUND, code


def assert_refused(dev: Device) -> str:
    """The device's enrollment is refused as not pre-registered; the message."""
    status, code, details = rpc_error(dev.agent.enroll)
    assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "DEVICE_NOT_PREREGISTERED")
    return details


@pytest.fixture
def gated(server_factory: Callable[..., ServerThread]) -> ServerThread:
    """A server that admits only pre-registered devices."""
    return server_factory(admission="preregistered")


@pytest.fixture
def new_device(
    device_factory: Callable[..., Device], gated: ServerThread
) -> Callable[[], tuple[Device, EkIdentity]]:
    """make() -> a booted, not yet enrolled device of `gated` and its EK identity."""

    def make() -> tuple[Device, EkIdentity]:
        dev = device_factory(enroll=False, target=gated)
        return dev, ek_identity(dev.tpm)

    return make


def with_group(server: ServerThread, dev: Device, group: str) -> None:
    """The golden 'default' policy of ``dev`` and a group ``group`` using it."""
    server.put_policy(dev.golden_policy())
    server.policy.CreateGroup(policy_pb2.CreateGroupRequest(name=group, policy_name="default"))


# -- refusal -------------------------------------------------------------------------------------


def test_unlisted_device_is_refused_naming_its_identity_and_nothing_is_stored(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    details = assert_refused(dev)
    assert ek.serial in details
    assert ek.issuer in details
    assert ek.sha256 in details
    assert_not_enrolled(gated, ek.device_id)
    assert table_count(gated, "challenges") == 0
    assert table_count(gated, "devices") == 0


def test_admission_any_admits_an_unlisted_device(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    open_server = server_factory(admission="any")
    dev = device_factory(target=open_server)  # enrolls
    info = get_device(open_server, dev.device_id)
    assert info.activated_at_ms > 0
    assert info.name == ""


# -- admitted by the manifest --------------------------------------------------------------------


def test_preregistered_by_serial_and_issuer_enrolls_with_name_and_group(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    other, other_ek = new_device()
    with_group(gated, dev, "edge")
    data = manifest(
        ("# shipment 2025-07",),
        (ek.serial.upper(), ek.issuer, "", "rack1-node1", "edge"),
    )
    assert counts(preregister(gated, data)) == (1, 0, 0)
    assert table_count(gated, "preregistrations") == 1

    dev.agent.enroll()
    assert dev.device_id == ek.device_id
    info = get_device(gated, ek.device_id)
    assert info.name == "rack1-node1"
    assert (info.group, info.group_source) == ("edge", "assigned")
    group = gated.policy.GetGroup(policy_pb2.GetGroupRequest(name="edge"))
    assert list(group.device_ids) == [ek.device_id]

    # Only the listed TPM: another one of the same manufacturer is still refused.
    assert other_ek.issuer == ek.issuer
    assert_refused(other)
    assert_not_enrolled(gated, other_ek.device_id)

    # The same manifest again changes nothing; a new name for the same TPM updates its row.
    assert counts(preregister(gated, data)) == (0, 0, 1)
    assert table_count(gated, "preregistrations") == 1
    renamed = manifest((ek.serial, ek.issuer, "", "rack1-node1b", "edge"))
    assert counts(preregister(gated, renamed)) == (0, 1, 0)
    assert table_count(gated, "preregistrations") == 1


def test_preregistered_by_key_hash_through_the_cli(
    gated: ServerThread,
    new_device: Callable[[], tuple[Device, EkIdentity]],
    tmp_path: Path,
) -> None:
    dev, ek = new_device()
    gated.put_policy(dev.golden_policy())
    path = tmp_path / "shipment.csv"
    path.write_bytes(manifest(("", "", ek.sha256.upper(), "lab-1", "")))

    out = run_cli("device", "preregister", str(path), "--server", gated.address, check=True)
    assert "1 added" in out.stdout, out.stdout
    again = run_cli("device", "preregister", str(path), "--server", gated.address, check=True)
    assert "0 added" in again.stdout and "1 unchanged" in again.stdout, again.stdout

    dev.agent.enroll()
    info = get_device(gated, ek.device_id)
    assert info.name == "lab-1"
    assert info.group == ""
    assert dev.agent.attest().credential


def test_a_row_giving_both_identifiers_needs_both_to_match(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    dev2, ek2 = new_device()
    # dev: its certificate with a wrong key hash; dev2: its key hash with a wrong serial.
    data = manifest(
        (ek.serial, ek.issuer, "ab" * 32, "a", ""),
        (format(int(ek2.serial, 16) + 1, "x"), ek2.issuer, ek2.sha256, "b", ""),
    )
    assert counts(preregister(gated, data)) == (2, 0, 0)
    assert_refused(dev)
    assert_refused(dev2)
    assert_not_enrolled(gated, ek.device_id)
    assert_not_enrolled(gated, ek2.device_id)

    # Both identifiers right: admitted.
    assert counts(preregister(gated, manifest((ek.serial, ek.issuer, ek.sha256, "a", "")))) == (
        1,
        0,
        0,
    )
    dev.agent.enroll()
    assert get_device(gated, ek.device_id).name == "a"


def test_a_group_deleted_after_preregistration_does_not_break_activation(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    with_group(gated, dev, "edge")
    assert counts(preregister(gated, manifest((ek.serial, ek.issuer, "", "n1", "edge")))) == (
        1,
        0,
        0,
    )
    gated.policy.DeleteGroup(policy_pb2.DeleteGroupRequest(name="edge"))
    dev.agent.enroll()  # activated, in no group, rather than NOT_FOUND after activating
    info = get_device(gated, ek.device_id)
    assert (info.name, info.group) == ("n1", "")
    assert dev.agent.attest().credential


# -- refused manifests ---------------------------------------------------------------------------


def test_bad_manifest_is_refused_naming_the_line_and_nothing_is_stored(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    data = manifest(
        (ek.serial, ek.issuer, "", "good-row", ""),  # line 2
        ("zz:11", ek.issuer, "", "bad-hex", ""),  # line 3
    )
    status, code, details = rpc_error(lambda: preregister(gated, data))
    assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, "MANIFEST_INVALID")
    assert "line 3" in details
    assert "ek_cert_serial" in details
    assert table_count(gated, "preregistrations") == 0
    assert_refused(dev)  # the good row before it was not stored either


def test_bad_manifest_through_the_cli_fails_naming_the_line(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]], tmp_path: Path
) -> None:
    _, ek = new_device()
    path = tmp_path / "bad.csv"
    path.write_bytes(
        manifest((ek.serial, ek.issuer, "", "ok", ""), ("", "", "12:34:not-hex", "", ""))
    )
    out = run_cli("device", "preregister", str(path), "--server", gated.address)
    assert out.returncode != 0
    assert "line 3" in out.stdout + out.stderr
    assert table_count(gated, "preregistrations") == 0


def test_unknown_group_is_refused_and_nothing_is_stored(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    dev2, ek2 = new_device()
    with_group(gated, dev, "edge")
    data = manifest(
        (ek.serial, ek.issuer, "", "one", "edge"),
        (ek2.serial, ek2.issuer, "", "two", "no-such-group"),
    )
    status, code, details = rpc_error(lambda: preregister(gated, data))
    assert (status, code) == (grpc.StatusCode.NOT_FOUND, "GROUP_UNKNOWN")
    assert "no-such-group" in details
    assert table_count(gated, "preregistrations") == 0
    assert_refused(dev)
    assert_refused(dev2)


def test_only_an_admin_may_preregister(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]]
) -> None:
    dev, ek = new_device()
    data = manifest((ek.serial, ek.issuer, "", "x", ""))
    for role in ("policy-author", "gateway"):
        stub = admin_pb2_grpc.AdminStub(gated.open(role))
        status, code, _ = rpc_error(
            lambda stub=stub: stub.PreregisterDevices(
                admin_pb2.PreregisterDevicesRequest(manifest=data)
            )
        )
        assert (status, code) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), role
    # Without any credential: not even authenticated.
    anonymous = admin_pb2_grpc.AdminStub(gated.channel)
    status, _, _ = rpc_error(
        lambda: anonymous.PreregisterDevices(admin_pb2.PreregisterDevicesRequest(manifest=data))
    )
    assert status == grpc.StatusCode.UNAUTHENTICATED
    assert table_count(gated, "preregistrations") == 0
    assert_refused(dev)


def test_the_cli_with_a_gateway_token_cannot_preregister(
    gated: ServerThread, new_device: Callable[[], tuple[Device, EkIdentity]], tmp_path: Path
) -> None:
    _, ek = new_device()
    path = tmp_path / "m.csv"
    path.write_bytes(manifest((ek.serial, ek.issuer, "", "x", "")))
    for role in ("gateway", "policy-author"):
        out = run_cli("device", "preregister", str(path), "--server", gated.address, role=role)
        assert out.returncode != 0, out.stdout
        assert "PERMISSION_DENIED" in out.stderr or "may not" in out.stderr, out.stderr
    assert table_count(gated, "preregistrations") == 0
