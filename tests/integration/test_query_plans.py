"""At fleet scale no statement may read a whole table that grows with the fleet.

Every SQL statement that an enrollment, a revocation and readmission, an
attestation (GetNonce, Attest, the verdict's record), a gateway's look-ups
(VerifyCredential by token and by certificate, GetVerdict, GetDevice,
WatchVerdicts for one device and for all) and the periodic sweeps (expiry
announcements, audit checkpoints, retention) run on the store's connection is
captured from the real server, and SQLite's own query plan for each must find its
rows through a key or an index. A full scan there costs, every second or every
attestation, in proportion to the fleet: the expiry sweep once read every
device's status row each second, inside a write transaction, and a credential
checked by its client certificate was looked for among all credentials.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import pytest
from conftest import Device, ServerThread

from attestd.service.server import checkpoint_audit
from attestd.v1 import common_pb2, enrollment_pb2, verdicts_pb2

pytestmark = pytest.mark.integration

# Tables whose rows grow with the number of devices or of attestations.
FLEET_TABLES = {
    "devices",
    "device_status",
    "attestation_counts",
    "evidence",
    "attestations",
    "credentials",
    "nonces",
    "challenges",
    "verdict_events",
    "audit_log",
    "audit_checkpoints",
    "group_members",
    "preregistrations",
    "caller_credentials",
}
STATEMENT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|REPLACE)\b", re.IGNORECASE)
SCAN = re.compile(r"^SCAN (\w+)")


def _newest_rows(sql: str, plan: list[tuple[int, int, int, str]]) -> bool:
    """A scan in key order with no condition and a LIMIT (the newest audit record, the
    newest event beyond those kept): it stops after LIMIT (+ OFFSET) rows, whatever the
    table holds. Without an index in that order SQLite sorts first (a temp B-tree)."""
    return (
        " LIMIT " in sql
        and " WHERE " not in sql
        and not any("TEMP B-TREE" in row[3] for row in plan)
    )


def _full_scans(server: ServerThread, statements: list[str]) -> dict[str, list[str]]:
    """For each distinct statement that scans a fleet table: the tables it scans."""
    conn = server.running.state.store.store.db.conn
    found: dict[str, list[str]] = {}
    for sql in sorted(set(statements)):
        if not STATEMENT.match(sql):
            continue
        plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        if _newest_rows(sql, plan):
            continue
        scans = [m.group(1) for row in plan if (m := SCAN.match(row[3]))]
        scanned = [t for t in scans if t in FLEET_TABLES]
        if scanned:
            found[sql] = scanned
    return found


def test_enrolling_attesting_and_the_sweeps_read_no_fleet_table_whole(
    server: ServerThread, device: Device, device_factory: Callable[..., Device]
) -> None:
    state = server.running.state
    store = state.store.store
    statements: list[str] = []
    lock = threading.Lock()

    def trace(sql: str) -> None:
        with lock:
            statements.append(sql)

    store.db.conn.set_trace_callback(trace)
    try:
        device_factory()  # a second device enrolls and is activated
        # An admin revokes the device and readmits it.
        server.devices.RevokeDevice(
            enrollment_pb2.RevokeDeviceRequest(device_id=device.device_id, reason="test")
        )
        server.devices.ReadmitDevice(
            enrollment_pb2.ReadmitDeviceRequest(device_id=device.device_id, reason="test")
        )
        for _ in range(2):
            result = device.agent.attest()
            assert result.verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING
        for request in (
            verdicts_pb2.VerifyCredentialRequest(token=result.credential),
            verdicts_pb2.VerifyCredentialRequest(certificate=result.client_certificate),
        ):
            checked = server.verdicts.VerifyCredential(request)
            assert checked.state == verdicts_pb2.CREDENTIAL_STATE_VALID
        # A gateway's look-ups.
        verdict = server.verdicts.GetVerdict(
            verdicts_pb2.GetVerdictRequest(device_id=device.device_id)
        )
        assert verdict.verdict.status == common_pb2.VERDICT_STATUS_AFFIRMING
        server.devices.GetDevice(enrollment_pb2.GetDeviceRequest(device_id=device.device_id))
        for watch in (
            verdicts_pb2.WatchVerdictsRequest(device_ids=[device.device_id]),
            verdicts_pb2.WatchVerdictsRequest(after_cursor=1),
        ):
            stream = server.verdicts.WatchVerdicts(watch, timeout=30)
            assert next(iter(stream)).cursor > 0
            stream.cancel()
        server.advance(24 * 3600.0)  # the credentials expire: the sweep announces them
        assert server.call(state.store(store.announce_expiries, state.now_ms())) == 1
        server.call(state.store(store.prune, state.now_ms(), 1))
        server.call(checkpoint_audit(state))
    finally:
        store.db.conn.set_trace_callback(None)
    # The sweep's look-up of the devices due was among them.
    assert any("FROM device_status WHERE live_expires_at_ms" in s for s in statements)
    assert _full_scans(server, statements) == {}


def test_the_check_sees_a_full_scan(server: ServerThread) -> None:
    """The check itself: a statement without a usable index is reported."""
    scans = _full_scans(
        server,
        ["SELECT device_id FROM device_status WHERE revocation_reason = 'x'"],
    )
    assert list(scans.values()) == [["device_status"]]
