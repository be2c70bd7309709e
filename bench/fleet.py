"""A simulated fleet, bulk-loaded straight into a fresh attestd store.

Every device gets, as if it had enrolled through Enroll/Activate:

- an ECC NIST P-256 EK (TCG EK Credential Profile template L-2: restricted
  decryption key, AES-128-CFB, the standard EK authPolicy) and an EK
  certificate for it, signed by a bench EK CA (written next to the fleet
  file, so ``attestd serve --ek-root`` can trust it);
- ``device_id``/``ek_fingerprint`` derived from the EK exactly as
  attestd.core.enroll does (SHA-256 of the SubjectPublicKeyInfo);
- a P-256 AK: a restricted signing key (fixedTPM, fixedParent,
  sensitiveDataOrigin, userWithAuth; ECDSA/SHA-256), as a TPM2B_PUBLIC, with
  its Name;
- a last accepted clock state, as after an earlier attestation, so every
  attestation in the benchmark takes the steady-state path (clock checks);
- and (unless ``--no-history``) the rows that earlier attestation left, as a
  fleet in service has them: an affirming attestation a day ago in the
  history, its counters, its latest evidence (the PCR values; no event log),
  a status row whose credential has long expired and been announced. The
  tables keyed by device then hold a row per device, as they would, and every
  attestation in the benchmark updates rows rather than inserting them. (Not
  loaded: that attestation's audit record and verdict event, credential record
  and nonce: a global log, an event feed that retention trims, and rows the
  expiry sweep deletes.)

Keys are software keys derived from a seed (scalar = SHA-256(seed, label,
index)), so nothing secret has to be stored: the load generator re-derives
the AK of each device it drives. ``ak_pool=K`` makes device i use AK i mod K
(faster loads; the server's AK cache then hits far more often than with a
real fleet, so the default is one AK per device).

Also published: the policy ``default`` (sha256 PCRs 0-7) whose reference
values are those of the simulated boot every device reports.

The schema is the real one: the store is created by SqliteStore, then rows go
in with executemany in large transactions on a connection tuned for loading
(no journal, no sync); the file is put back in WAL mode at the end.

Usage: python bench/fleet.py DATA_DIR N [--ak-pool K]

Then serve it as bench/e2e.py does: ``attestd serve --data-dir DATA_DIR --ek-root
DATA_DIR/bench-ek-ca.pem`` with TLS (``--tls-cert``/``--tls-key``, e.g. from
``attestd admin tls-init``) and a ``--config`` file raising the abuse limits
(``peer_rate_per_s``, ``peer_burst``, ``device_rate_per_s``, ``device_burst``,
``max_outstanding_nonces``): the load generator drives every device from one address.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sqlite3
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestd.core.policy import load_policy_text
from attestd.store.sqlite import SqliteStore, sync_file

# --- TPM 2.0 marshalling (Part 2), written out here rather than borrowed from attestd.core.

ALG_SHA256, ALG_AES, ALG_NULL, ALG_ECDSA, ALG_ECC, ALG_CFB = 0x0B, 0x06, 0x10, 0x18, 0x23, 0x43
CURVE_P256 = 0x0003
ST_ATTEST_QUOTE = 0x8018
TPM_GENERATED_VALUE = 0xFF544347
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
USER_WITH_AUTH, ADMIN_WITH_POLICY = 1 << 6, 1 << 7
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
AK_ATTRS = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | RESTRICTED | SIGN
EK_ATTRS = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
)
# TCG EK Credential Profile: PolicySecret(TPM_RH_ENDORSEMENT), the low-range EK templates.
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
# DER SubjectPublicKeyInfo of a P-256 key, up to the uncompressed point.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ECDSA_SHA256_ALG = bytes.fromhex("300a06082a8648ce3d040302")  # AlgorithmIdentifier

TPM_MANUFACTURER_OID = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL_OID = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION_OID = x509.ObjectIdentifier("2.23.133.2.3")
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")

# The simulated platform: firmware and reset counters every device's quote reports.
FIRMWARE_VERSION = 0x2019_1023_0016_3636
RESET_COUNT, RESTART_COUNT = 3, 0
PCR_INDICES = tuple(range(8))
FLEET_FILE = "fleet.json"
DEVICES_FILE = "devices.txt"
EK_CA_FILE = "bench-ek-ca.pem"


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def tpm2b(data: bytes) -> bytes:
    return u16(len(data)) + data


def ecc_public_area(x: bytes, y: bytes, *, ek: bool) -> bytes:
    """TPMT_PUBLIC (Part 2, 12.2.4) of a P-256 EK (template L-2) or AK."""
    if ek:
        head = u16(ALG_ECC) + u16(ALG_SHA256) + u32(EK_ATTRS) + tpm2b(EK_AUTH_POLICY)
        params = u16(ALG_AES) + u16(128) + u16(ALG_CFB) + u16(ALG_NULL)
    else:
        head = u16(ALG_ECC) + u16(ALG_SHA256) + u32(AK_ATTRS) + tpm2b(b"")
        params = u16(ALG_NULL) + u16(ALG_ECDSA) + u16(ALG_SHA256)
    return head + params + u16(CURVE_P256) + u16(ALG_NULL) + tpm2b(x) + tpm2b(y)


def object_name(public_area: bytes) -> bytes:
    """nameAlg || SHA-256(TPMT_PUBLIC) (Part 1, 16)."""
    return u16(ALG_SHA256) + hashlib.sha256(public_area).digest()


def derive_scalar(seed: bytes, label: bytes, index: int) -> int:
    h = hashlib.sha256(seed + label + index.to_bytes(8, "big")).digest()
    return int.from_bytes(h, "big") % (P256_ORDER - 1) + 1


def derive_key(seed: bytes, label: bytes, index: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(derive_scalar(seed, label, index), ec.SECP256R1())


def ak_key(seed: bytes, index: int, ak_pool: int) -> ec.EllipticCurvePrivateKey:
    """The software AK of device ``index`` (shared by index mod ak_pool when pooled)."""
    return derive_key(seed, b"ak", index % ak_pool if ak_pool else index)


def ak_public_area(key: ec.EllipticCurvePrivateKey) -> bytes:
    nums = key.public_key().public_numbers()
    return ecc_public_area(nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"), ek=False)


def boot_pcrs() -> dict[int, bytes]:
    """sha256 PCRs 0-7 after the simulated boot: a few events extended into each."""
    out = {}
    for i in PCR_INDICES:
        pcr = bytes(32)
        for event in range(3 + i % 3):
            measured = hashlib.sha256(f"attestd-bench pcr {i} event {event}".encode()).digest()
            pcr = hashlib.sha256(pcr + measured).digest()
        out[i] = pcr
    return out


def policy_text(pcrs: dict[int, bytes]) -> str:
    lines = ["name: default", "description: attestd bench fleet", "pcrs:", "  sha256:"]
    lines += [f"    {i}: {d.hex()}" for i, d in sorted(pcrs.items())]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Fleet:
    """What the load generator needs: ids (in key-index order), the key seed, the boot."""

    n_devices: int
    seed_hex: str
    ak_pool: int  # 0: one AK per device
    pcrs_sha256: dict[str, str]  # index -> hex value
    reset_count: int
    restart_count: int
    firmware_version: int
    device_ids: list[str]

    @property
    def seed(self) -> bytes:
        return bytes.fromhex(self.seed_hex)

    def save(self, directory: Path) -> Path:
        meta = asdict(self)
        del meta["device_ids"]
        (directory / DEVICES_FILE).write_text("\n".join(self.device_ids) + "\n")
        path = directory / FLEET_FILE
        path.write_text(json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Fleet:
        meta = json.loads(path.read_text())
        ids = (path.parent / DEVICES_FILE).read_text().split()
        return cls(**meta, device_ids=ids)


# --- EK certificates: one template, then per device the serial and key swapped and re-signed.


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


SERIAL_TOP = 0x4B << 120  # 16-byte serials, top byte 0x4b: no DER sign padding, fixed length


@dataclass(frozen=True)
class CertTemplate:
    tbs: bytes
    serial_at: int
    point_at: int
    issuer: str


def make_ek_ca(seed: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = derive_key(seed, b"ek-ca", 0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestd bench EK CA")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365 * 20))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_template(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> CertTemplate:
    """An EK certificate as manufacturers issue them (empty subject, critical SAN with
    the TPM's manufacturer/model/version, EK EKU), whose serial and key get replaced."""
    placeholder = derive_key(b"placeholder", b"ek", 0)
    serial = SERIAL_TOP | 0xABCDEF
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    san = x509.DirectoryName(
        x509.Name(
            [
                x509.NameAttribute(TPM_MANUFACTURER_OID, "id:42454E43"),
                x509.NameAttribute(TPM_MODEL_OID, "attestd-bench"),
                x509.NameAttribute(TPM_VERSION_OID, "id:00020000"),
            ]
        )
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(placeholder.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365 * 15))
        .add_extension(x509.SubjectAlternativeName([san]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, True, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tbs = cert.tbs_certificate_bytes
    point = placeholder.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    serial_bytes = serial.to_bytes(16, "big")
    assert tbs.count(serial_bytes) == 1 and tbs.count(point) == 1
    return CertTemplate(
        tbs, tbs.index(serial_bytes), tbs.index(point), ca_cert.subject.rfc4514_string()
    )


def ek_certificate(
    t: CertTemplate, ca_key: ec.EllipticCurvePrivateKey, serial: int, point: bytes
) -> bytes:
    tbs = (
        t.tbs[: t.serial_at]
        + serial.to_bytes(16, "big")
        + t.tbs[t.serial_at + 16 : t.point_at]
        + point
        + t.tbs[t.point_at + 65 :]
    )
    sig = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + ECDSA_SHA256_ALG + _der(0x03, b"\x00" + sig))


# --- Row generation (in worker processes) ---------------------------------------------

_W: dict[str, object] = {}


def _init_worker(seed: bytes, ak_pool: int, ca_pem: bytes, clock_json: str, now_ms: int) -> None:
    ca_key = serialization.load_pem_private_key(ca_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    _, ca_cert = make_ek_ca(seed)
    _W.update(
        seed=seed,
        ak_pool=ak_pool,
        ca_key=ca_key,
        template=make_template(ca_key, ca_cert),
        clock=clock_json,
        now=now_ms,
        aks={},
    )


Row = tuple[str, str, bytes, bytes, bytes, str, int, int, str, str]


def _rows(start: int, end: int) -> list[Row]:
    seed: bytes = _W["seed"]  # type: ignore[assignment]
    ak_pool: int = _W["ak_pool"]  # type: ignore[assignment]
    ca_key: ec.EllipticCurvePrivateKey = _W["ca_key"]  # type: ignore[assignment]
    template: CertTemplate = _W["template"]  # type: ignore[assignment]
    aks: dict[int, tuple[bytes, str]] = _W["aks"]  # type: ignore[assignment]
    clock: str = _W["clock"]  # type: ignore[assignment]
    now: int = _W["now"]  # type: ignore[assignment]
    out: list[Row] = []
    for i in range(start, end):
        ek = derive_key(seed, b"ek", i).public_key().public_numbers()
        x, y = ek.x.to_bytes(32, "big"), ek.y.to_bytes(32, "big")
        point = b"\x04" + x + y
        fingerprint = hashlib.sha256(P256_SPKI_PREFIX + point).hexdigest()
        ek_public = tpm2b(ecc_public_area(x, y, ek=True))
        serial = SERIAL_TOP | i
        cert = ek_certificate(template, ca_key, serial, point)
        slot = i % ak_pool if ak_pool else i
        ak = aks.get(slot)
        if ak is None:
            area = ak_public_area(ak_key(seed, i, ak_pool))
            ak = (tpm2b(area), object_name(area).hex())
            if ak_pool:
                aks[slot] = ak
        facts = json.dumps(
            {
                "ek_cert_issuer": template.issuer,
                "ek_cert_serial": format(serial, "x"),
                "tpm_manufacturer": "id:42454E43",
                "tpm_model": "attestd-bench",
                "tpm_version": "id:00020000",
            }
        )
        device_id = "dev-" + fingerprint[:32]
        out.append((device_id, fingerprint, ek_public, cert, ak[0], ak[1], now, now, facts, clock))
    return out


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def self_check(
    seed: bytes, ak_pool: int, row: Row, ca_cert: x509.Certificate, index: int = 0
) -> None:
    """The first device passes attestd's own enrollment checks (EK chain, EK and AK areas)."""
    from attestd.core.enroll import verify_enrollment

    facts = verify_enrollment(
        row[3],
        [],
        row[2],
        row[4],
        [ca_cert],
        datetime.datetime.now(datetime.UTC),
    )
    assert facts.device_id == row[0] and facts.ek_fingerprint == row[1], "device id derivation"
    assert facts.ak.name.hex() == row[5], "AK name"
    assert facts.ak.tpm2b() == ak_public_area_tpm2b(seed, index, ak_pool)


def ak_public_area_tpm2b(seed: bytes, index: int, ak_pool: int) -> bytes:
    return tpm2b(ak_public_area(ak_key(seed, index, ak_pool)))


# The earlier attestation each device has (history=True): what attestd records of an
# affirming verdict under the policy ``default`` (version 1, the first published).
HISTORY_AGE_MS = 24 * 3600 * 1000
HISTORY_CREDENTIAL_MS = 3600 * 1000
TRUST_VECTOR = {"instance-identity": 2, "configuration": 2, "executables": 3, "hardware": 2}


def _load_history(
    conn: sqlite3.Connection, ids: list[str], first_id: int, at_ms: int, clock: str, pcrs: str
) -> None:
    """The rows an earlier affirming attestation left for each of ``ids`` (sorted), whose
    attestation ids are first_id, first_id + 1, ..."""
    trust = json.dumps(TRUST_VECTOR)
    expires = at_ms + HISTORY_CREDENTIAL_MS
    conn.executemany(
        "INSERT INTO attestations (id, device_id, at_ms, status, failures, warnings,"
        " trust_vector, policy_name, policy_version, clock, pcrs, credential_expires_at_ms,"
        " boot_state) VALUES (?,?,?,'affirming','[]','[]',?,'default',1,?,?,?,NULL)",
        ((first_id + k, d, at_ms, trust, clock, pcrs, expires) for k, d in enumerate(ids)),
    )
    conn.executemany(
        "INSERT INTO attestation_counts (device_id, total, affirming, failed) VALUES (?,1,1,0)",
        ((d,) for d in ids),
    )
    conn.executemany(
        "INSERT INTO evidence (device_id, attestation_id, at_ms, status, values_verified, pcrs,"
        " event_log) VALUES (?,?,?,'affirming',1,?,NULL)",
        ((d, first_id + k, at_ms, pcrs) for k, d in enumerate(ids)),
    )
    conn.executemany(
        "INSERT INTO device_status (device_id, revoked, revoked_at_ms, revocation_reason,"
        " credentials_invalid_before_ms, live_expires_at_ms) VALUES (?,0,0,'',0,0)",
        ((d,) for d in ids),
    )


def bulk_load(
    store_path: str | Path,
    n_devices: int,
    *,
    seed: bytes = b"attestd-bench-fleet",
    ak_pool: int = 0,
    history: bool = True,
    procs: int | None = None,
    chunk: int = 5000,
    txn_rows: int = 100_000,
    progress: bool = False,
) -> Fleet:
    """Create a store at ``store_path`` holding ``n_devices`` enrolled devices (each with
    its earlier attestation's rows, unless ``history`` is false) and the policy
    ``default``; write fleet.json, devices.txt and the EK CA beside it; return the Fleet."""
    store_path = Path(store_path)
    directory = store_path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now_ms = int(time.time() * 1000)
    pcrs = boot_pcrs()
    # The real schema, and the policy through the store's own publication path.
    store = SqliteStore(store_path)
    policy = load_policy_text(policy_text(pcrs))
    store.put_policy("default", policy.to_document(), policy.digest(), now_ms, "bench", "fleet")
    store.close()

    ca_key, ca_cert = make_ek_ca(seed)
    (directory / EK_CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_pem = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # As if each device had attested once before, long ago on its TPM's clock.
    clock = json.dumps(
        {
            "reset_count": RESET_COUNT,
            "restart_count": RESTART_COUNT,
            "clock": 1000,
            "firmware_version": FIRMWARE_VERSION,
        }
    )
    conn = sqlite3.connect(str(store_path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")  # leaves WAL; put back below
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1048576")  # 1 GiB: the indexes stay in memory
    sql = (
        "INSERT INTO devices (device_id, ek_fingerprint, ek_public, ek_certificate, ak_public,"
        " ak_name, enrolled_at_ms, activated_at_ms, facts, clock, last_attestation_id)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    )
    pcrs_json = json.dumps({"sha256": {str(i): d.hex() for i, d in sorted(pcrs.items())}})
    next_id = 1
    ids: list[str] = [""] * n_devices
    t0 = time.monotonic()
    procs = procs or os.cpu_count() or 1
    init = (seed, ak_pool, ca_pem, clock, now_ms)
    pending: list[Row] = []
    done = 0
    first_checked = False
    with ProcessPoolExecutor(procs, initializer=_init_worker, initargs=init) as pool:
        conn.execute("BEGIN")
        for (start, _end), rows in zip(
            _chunks(n_devices, chunk),
            pool.map(_rows, *zip(*_chunks(n_devices, chunk), strict=True)),
            strict=True,
        ):
            if not first_checked:
                self_check(seed, ak_pool, rows[0], ca_cert)
                first_checked = True
            for k, row in enumerate(rows):
                ids[start + k] = row[0]
            pending.extend(rows)
            done += len(rows)
            if len(pending) >= txn_rows or done == n_devices:
                # Sorted: the indexes keyed by device_id grow in key order within a batch.
                pending.sort()
                first = next_id
                conn.executemany(
                    sql,
                    ((*row, first + k if history else None) for k, row in enumerate(pending)),
                )
                if history:
                    ids_sorted = [row[0] for row in pending]
                    _load_history(
                        conn, ids_sorted, first, now_ms - HISTORY_AGE_MS, clock, pcrs_json
                    )
                    next_id += len(pending)
                pending = []
                conn.execute("COMMIT")
                if done < n_devices:
                    conn.execute("BEGIN")
                if progress:
                    rate = done / (time.monotonic() - t0)
                    print(f"  loaded {done}/{n_devices} devices ({rate:,.0f}/s)", file=sys.stderr)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    # Loaded without syncs: on disk now, as a store in service would be, rather than
    # written back by the kernel (or by the server's first sync) while rounds are timed.
    sync_file(store_path)
    fleet = Fleet(
        n_devices=n_devices,
        seed_hex=seed.hex(),
        ak_pool=ak_pool,
        pcrs_sha256={str(i): d.hex() for i, d in pcrs.items()},
        reset_count=RESET_COUNT,
        restart_count=RESTART_COUNT,
        firmware_version=FIRMWARE_VERSION,
        device_ids=ids,
    )
    fleet.save(directory)
    return fleet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("n_devices", type=int)
    p.add_argument("--ak-pool", type=int, default=0, help="share K AKs among all devices")
    p.add_argument("--procs", type=int, default=None)
    p.add_argument(
        "--no-history",
        action="store_true",
        help="enrolled devices only, without the rows of an earlier attestation",
    )
    args = p.parse_args()
    t0 = time.monotonic()
    directory = Path(args.data_dir)
    bulk_load(
        directory / "attestd.sqlite",
        args.n_devices,
        ak_pool=args.ak_pool,
        procs=args.procs,
        history=not args.no_history,
        progress=True,
    )
    size = sum(f.stat().st_size for f in directory.glob("attestd.sqlite*"))
    print(f"{args.n_devices} devices in {time.monotonic() - t0:.1f} s, store {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
