"""`attestd admin|device preregister|audit … --data-dir`: the local mode, on a store file.

Each command runs in-process (``attestd.cli.main``) on a temporary data directory,
as an operator runs it on the server host. The remote mode goes through a real
server in the integration suite.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestd import cli
from attestd.admincli import parse_time_ms
from attestd.core.audit import parse_export_line, sign_checkpoint
from attestd.service.keys import SigningKeyring
from attestd.service.security import token_secret_hash
from attestd.store.sqlite import SqliteStore

GOOD_CSV = (
    "# shipment 2025-07\n"
    "ek_cert_serial,ek_cert_issuer,ek_public_sha256,name,group\n"
    '0A:1B:2C:3D,"CN=Example EK CA,O=Example,C=US",,rack1-node1,\n'
    ",,9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08,lab-1,\n"
)
BAD_CSV = (
    "ek_cert_serial,ek_cert_issuer,ek_public_sha256,name,group\n"
    '0A:1B,"CN=Example EK CA,C=US",,node-a,\n'
    ",,not-a-digest,node-b,\n"
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def count(data_dir: Path, table: str) -> int:
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_tls_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "tls"
    code, out, _ = run(
        capsys, "admin", "tls-init", "--out", str(out_dir), "--host", "localhost",
        "--host", "127.0.0.1", "--days", "30",
    )  # fmt: skip
    assert code == 0
    ca = x509.load_pem_x509_certificate((out_dir / "ca-cert.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out_dir / "server-cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert mode_of(out_dir / "server-key.pem") == 0o600
    assert f"tls_cert: {(out_dir / 'server-cert.pem').resolve()}" in out
    assert f"tls_key: {(out_dir / 'server-key.pem').resolve()}" in out
    assert f"--ca-cert {(out_dir / 'ca-cert.pem').resolve()}" in out
    # Existing files are not replaced without --force.
    code, _, err = run(capsys, "admin", "tls-init", "--out", str(out_dir), "--host", "x")
    assert code == 2 and "--force" in err


def test_missing_data_dir_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    code, _, err = run(
        capsys, "admin", "token", "create", "--role", "admin", "--name", "root",
        "--data-dir", str(missing),
    )  # fmt: skip
    assert code == 2
    assert "does not exist" in err and "Traceback" not in err
    assert not missing.exists()


def test_tokens(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dd = ("--data-dir", str(data_dir))
    code, out, _ = run(
        capsys, "admin", "token", "create", "--role", "admin", "--name", "root",
        "--lifetime", "3600", *dd,
    )  # fmt: skip
    assert code == 0
    token = out.strip().splitlines()[-1]
    assert token.startswith("atd_")
    listed = json.loads(run(capsys, "admin", "token", "list", "--json", *dd)[1])
    assert [(c["role"], c["name"], c["kind"]) for c in listed] == [("admin", "root", "token")]
    root = listed[0]
    assert root["id"] in out and root["expires_at_ms"] > root["created_at_ms"]
    assert root["created_by"] == f"local-admin uid={os.getuid()}"
    # The store holds the token's hash, which the printed token matches.
    ident, _, secret = token.removeprefix("atd_").partition("_")
    assert root["id"] == f"tok-{ident}"
    store = SqliteStore(data_dir / "attestd.sqlite")
    try:
        record = store.get_caller_credential(root["id"])
        assert record is not None and record.secret_hash == token_secret_hash(secret)
    finally:
        store.close()

    # --out: the token goes to a 0600 file, only the id to stdout.
    token_file = tmp_path / "gw.token"
    code, out, _ = run(
        capsys, "admin", "token", "create", "--role", "gateway", "--name", "gw1",
        "--out", str(token_file), *dd,
    )  # fmt: skip
    assert code == 0 and "atd_" not in out
    assert mode_of(token_file) == 0o600 and token_file.read_text().startswith("atd_")
    gw_id = "tok-" + token_file.read_text().strip().removeprefix("atd_").split("_")[0]
    assert gw_id in out

    code, out, _ = run(capsys, "admin", "token", "revoke", gw_id, "--reason", "test", *dd)
    assert code == 0 and f"revoked {gw_id}" in out
    live = json.loads(run(capsys, "admin", "token", "list", "--json", *dd)[1])
    assert [c["id"] for c in live] == [root["id"]]
    every = json.loads(run(capsys, "admin", "token", "list", "--all", "--json", *dd)[1])
    assert {c["id"]: bool(c["revoked_at_ms"]) for c in every} == {root["id"]: False, gw_id: True}
    code, out, _ = run(capsys, "admin", "token", "list", "--all", *dd)
    assert code == 0 and "revoked" in out and "gw1" in out

    # Refusals: an unknown id, a role that cannot be granted, a bad name.
    code, _, err = run(capsys, "admin", "token", "revoke", "tok-0000000000000000", *dd)
    assert code == 1 and "CREDENTIAL_UNKNOWN" in err
    code, _, err = run(
        capsys, "admin", "token", "create", "--role", "admin", "--name", "bad name", *dd
    )
    assert code == 1 and "MALFORMED" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a grantable role
        cli.main(["admin", "token", "create", "--role", "device", "--name", "d", *dd])
    assert exit_info.value.code == 2
    capsys.readouterr()

    kinds = [
        (r[0], json.loads(r[1])["outcome"])
        for r in sqlite3.connect(data_dir / "attestd.sqlite").execute(
            "SELECT kind, detail FROM audit_log ORDER BY seq"
        )
    ]
    assert kinds == [
        ("credential.token_create", "ok"),
        ("credential.token_create", "ok"),
        ("credential.revoke", "ok"),
        ("credential.revoke", "CREDENTIAL_UNKNOWN"),
        ("credential.token_create", "MALFORMED"),
    ]
    # No secret went into the audit log.
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        details = " ".join(r[0] for r in db.execute("SELECT detail FROM audit_log"))
    assert secret not in details and "atd_" not in details


def test_issue_client_cert(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "creds"
    code, out, _ = run(
        capsys, "admin", "issue-client-cert", "--role", "policy-author", "--name", "alice",
        "--out-dir", str(out_dir), "--lifetime", "86400", "--data-dir", str(data_dir),
    )  # fmt: skip
    assert code == 0
    key_path, cert_path = out_dir / "alice-key.pem", out_dir / "alice-cert.pem"
    assert mode_of(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificates((out_dir / "client-ca.pem").read_bytes())[0]
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    # The CA is the server's client CA, made in the data directory.
    server_ca = x509.load_pem_x509_certificate((data_dir / "client-ca-cert.pem").read_bytes())
    assert ca == server_ca
    listed = json.loads(
        run(capsys, "admin", "token", "list", "--json", "--data-dir", str(data_dir))[1]
    )
    assert len(listed) == 1
    crt = listed[0]
    assert crt["kind"] == "certificate" and crt["id"].startswith("crt-") and crt["id"] in out
    assert crt["certificate_serial"] == format(cert.serial_number, "x")
    assert str(key_path) in out and str(cert_path) in out

    # The same name again is refused before anything is made.
    code, _, err = run(
        capsys, "admin", "issue-client-cert", "--role", "gateway", "--name", "alice",
        "--out-dir", str(out_dir), "--data-dir", str(data_dir),
    )  # fmt: skip
    assert code == 2 and "exists" in err

    code, out, _ = run(capsys, "admin", "token", "revoke", crt["id"], "--data-dir", str(data_dir))
    assert code == 0 and crt["id"] in out
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        kinds = [r[0] for r in db.execute("SELECT kind FROM audit_log ORDER BY seq")]
    assert kinds == ["credential.cert_issue", "credential.revoke"]


def test_preregister(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(GOOD_CSV)
    bad.write_text(BAD_CSV)
    dd = ("--data-dir", str(data_dir))
    code, out, _ = run(capsys, "device", "preregister", str(good), *dd)
    assert code == 0 and "2 added, 0 updated, 0 unchanged" in out
    code, out, _ = run(capsys, "device", "preregister", str(good), *dd)
    assert code == 0 and "0 added, 0 updated, 2 unchanged" in out

    code, out, err = run(capsys, "device", "preregister", str(bad), *dd)
    assert code == 1
    assert "MANIFEST_INVALID" in err and "line 3" in err and "ek_public_sha256" in err
    assert "Traceback" not in err
    assert count(data_dir, "preregistrations") == 2  # nothing of the bad file was added

    code, _, err = run(capsys, "device", "preregister", str(tmp_path / "none.csv"), *dd)
    assert code == 2 and "cannot read" in err
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        rows = db.execute("SELECT kind, detail FROM audit_log ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["device.preregister"] * 3
    assert json.loads(rows[2][1])["outcome"] == "MANIFEST_INVALID"
    assert json.loads(rows[0][1])["request"]["source"] == "good.csv"


def _populate(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Five audit records, and a checkpoint signed by the server's key over the fourth."""
    dd = ("--data-dir", str(data_dir))
    for name in ("a", "b", "c", "d", "e"):
        code, _, _ = run(
            capsys, "admin", "token", "create", "--role", "gateway", "--name", name,
            "--out", str(tmp_path / f"{name}.token"), *dd,
        )  # fmt: skip
        assert code == 0
    store = SqliteStore(data_dir / "attestd.sqlite")
    try:
        signing = SigningKeyring(data_dir, 3600, int(time.time() * 1000)).current
        fourth = store.audit_records(3, 0, 1)[0]
        store.add_audit_checkpoint(sign_checkpoint(signing.key, signing.kid, fourth, fourth.at_ms))
    finally:
        store.close()


def test_audit_export_and_verify(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(data_dir, tmp_path, capsys)
    dd = ("--data-dir", str(data_dir))
    export, jwks = tmp_path / "audit.jsonl", tmp_path / "keys.jwks"
    code, out, _ = run(
        capsys, "audit", "export", "--out", str(export), "--jwks-out", str(jwks), *dd
    )
    assert code == 0 and "5 records and 1 checkpoints" in out
    items = [parse_export_line(line) for line in export.read_text().splitlines()]
    assert [type(i).__name__ for i in items] == ["AuditRecord"] * 5 + ["Checkpoint"]
    assert [json.loads(line)["seq"] for line in export.read_text().splitlines()][:5] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert len(json.loads(jwks.read_text())["keys"]) == 1

    # To stdout, from a sequence number or a time.
    code, out, _ = run(capsys, "audit", "export", "--after-seq", "3", *dd)
    assert code == 0
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [4, 5, 4]
    code, out, _ = run(capsys, "audit", "export", "--since", "2999-01-01", *dd)
    assert code == 0 and out == ""

    expected = (
        "audit log intact: 5 records, 1 checkpoints, last checkpoint at seq 4;"
        " 1 records after it are protected by the chain only"
    )
    code, out, _ = run(capsys, "audit", "verify", *dd)
    assert code == 0 and expected in out
    code, out, _ = run(capsys, "audit", "verify", "--file", str(export), "--jwks", str(jwks))
    assert code == 0 and expected in out
    code, _, err = run(capsys, "audit", "verify", "--file", str(export))
    assert code == 2 and "--jwks" in err
    doc = json.loads(run(capsys, "audit", "verify", "--json", *dd)[1])
    assert doc["intact"] and doc["records"] == 5 and doc["last_checkpoint_seq"] == 4

    # Someone with write access to the store edits record 2.
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        db.execute("""UPDATE audit_log SET detail = '{"outcome":"ok"}' WHERE seq = 2""")
    code, out, _ = run(capsys, "audit", "verify", *dd)
    assert code == 1
    assert "seq 2: RECORD_EDITED:" in out and "NOT intact" in out
    doc = json.loads(run(capsys, "audit", "verify", "--json", *dd)[1])
    assert not doc["intact"]
    assert [(f["seq"], f["code"]) for f in doc["findings"]] == [(2, "RECORD_EDITED")]
    # The export taken before still verifies: it is the auditor's copy.
    assert run(capsys, "audit", "verify", "--file", str(export), "--jwks", str(jwks))[0] == 0


def test_audit_verify_finds_a_deleted_record(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(data_dir, tmp_path, capsys)
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        db.execute("DELETE FROM audit_log WHERE seq = 3")
    code, out, _ = run(capsys, "audit", "verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "seq 3: RECORD_DELETED:" in out


def test_audit_verify_finds_the_newest_records_deleted(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(data_dir, tmp_path, capsys)
    with sqlite3.connect(data_dir / "attestd.sqlite") as db:
        db.execute("DELETE FROM audit_log WHERE seq >= 4")
    code, out, _ = run(capsys, "audit", "verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "seq 4: RECORDS_TRUNCATED:" in out


def test_export_file_tampered(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(data_dir, tmp_path, capsys)
    export, jwks = tmp_path / "audit.jsonl", tmp_path / "keys.jwks"
    dd = ("--data-dir", str(data_dir))
    assert (
        run(capsys, "audit", "export", "--out", str(export), "--jwks-out", str(jwks), *dd)[0] == 0
    )
    lines = export.read_text().splitlines()
    record = json.loads(lines[1])
    record["actor"] = "someone else"
    lines[1] = json.dumps(record, sort_keys=True)
    export.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "audit", "verify", "--file", str(export), "--jwks", str(jwks))
    assert code == 1 and "seq 2: RECORD_EDITED:" in out
    export.write_text("not json\n")
    code, _, err = run(capsys, "audit", "verify", "--file", str(export), "--jwks", str(jwks))
    assert code == 2 and "line 1" in err


def test_parse_time() -> None:
    assert parse_time_ms("1700000000123") == 1700000000123
    assert parse_time_ms("2026-11-22T10:00:00Z") == 1795341600000
    assert parse_time_ms("2026-11-22") == 1795305600000
    assert parse_time_ms("2026-11-22T11:00:00+01:00") == 1795341600000


def test_connection_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "admin", "token", "list", "--token-file", str(tmp_path / "missing"))
    assert code == 2 and "cannot read the token file" in err and "Traceback" not in err
