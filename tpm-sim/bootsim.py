#!/usr/bin/env python3
"""Simulated UEFI Secure Boot with a TCG event log.

Writes a TCG PC Client Platform Firmware Profile crypto-agile event log (a
TCG_PCR_EVENT "Spec ID Event03" header for sha1 + sha256, then TCG_PCR_EVENT2
records) of a shim -> grub -> Linux Secure Boot chain, and extends exactly the
same digests into the sha1 and sha256 banks of a TPM, so replaying the log
gives the TPM's PCRs 0-9.

    bootsim.py --tcti TCTI --log OUT.bin [--tamper KIND] [--seed N] [--cache-dir DIR]

Deliberately independent of attestd (it does not import it), so it can be used
to check attestd's event-log parser, replay and policies rather than mirror
them. Everything is encoded from the TCG PFP and UEFI specifications; check a
log with `tpm2_eventlog OUT.bin`.

Run it once per boot, on a freshly started or power-cycled TPM: it refuses
(exit 1) if PCRs 0-9 are not at their reset values. Prints one line per event
(PCR, event type, description; tab-separated) to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import struct
import sys
import tempfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

PROG = "bootsim.py"
TAMPER_KINDS = ("kernel", "cmdline", "secureboot-off", "unlogged", "dbx-empty")
BOOT_PCRS = tuple(range(10))

# TPM_ALG_ID values and digest sizes of the two banks, in log order.
BANKS = (("sha1", 0x0004, 20), ("sha256", 0x000B, 32))

# Event types (TCG PC Client PFP, section 10.4.1).
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_S_CRTM_VERSION = 0x00000008
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EVENT_NAMES = {
    EV_NO_ACTION: "EV_NO_ACTION",
    EV_SEPARATOR: "EV_SEPARATOR",
    EV_S_CRTM_VERSION: "EV_S_CRTM_VERSION",
    EV_IPL: "EV_IPL",
    EV_EFI_VARIABLE_DRIVER_CONFIG: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    EV_EFI_BOOT_SERVICES_APPLICATION: "EV_EFI_BOOT_SERVICES_APPLICATION",
    EV_EFI_GPT_EVENT: "EV_EFI_GPT_EVENT",
    EV_EFI_ACTION: "EV_EFI_ACTION",
    EV_EFI_PLATFORM_FIRMWARE_BLOB: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    EV_EFI_VARIABLE_AUTHORITY: "EV_EFI_VARIABLE_AUTHORITY",
}

# GUIDs from the UEFI specification.
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
GPT_ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
GPT_LINUX_FS_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

# Our own fixed GUIDs: the owner of every signature we put in PK/KEK/db/dbx,
# and the simulated disk and its partitions.
SIM_OWNER_GUID = uuid.UUID("a77e57d0-5100-4b00-8e5c-000000000001")
DISK_GUID = uuid.UUID("a77e57d0-5100-4b00-8e5c-0000000000d1")
ROOT_PART_GUID = uuid.UUID("a77e57d0-5100-4b00-8e5c-0000000000a1")
ESP_PART_GUID = uuid.UUID("a77e57d0-5100-4b00-8e5c-0000000000a2")

# The simulated disk: 20 GiB of 512-byte sectors, GPT; sda1 = root file system
# (holds /boot, hence root=/dev/sda1), sda2 = 512 MiB EFI system partition at the end.
# Partitions are (number, first LBA, last LBA), 1 MiB aligned.
DISK_SECTORS = 20 * 1024 * 1024 * 2
_ESP_FIRST = (DISK_SECTORS - 34 - 1024 * 1024) // 2048 * 2048
ROOT_PART = (1, 2048, _ESP_FIRST - 1)
ESP_PART = (2, _ESP_FIRST, _ESP_FIRST + 1024 * 1024 - 1)

KERNEL_VERSION = "6.1.0-sim"
KERNEL_PATH = f"/vmlinuz-{KERNEL_VERSION}"
INITRD_PATH = f"/initrd.img-{KERNEL_VERSION}"
CMDLINE = f"{KERNEL_PATH} root=/dev/sda1 ro quiet"

# Revoked image hashes in a good dbx (any fixed values do; these are ours).
DBX_REVOKED = (
    hashlib.sha256(b"attestd-sim revoked: shimx64.efi 15.4 (BootHole)").digest(),
    hashlib.sha256(b"attestd-sim revoked: grubx64.efi 2.04 (CVE-2020-10713)").digest(),
)

# Certificate validity: fixed, so certificates do not depend on the clock.
CERT_NOT_BEFORE = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)
CERT_NOT_AFTER = datetime.datetime(2053, 1, 1, tzinfo=datetime.UTC)
SB_KEY_NAMES = ("PK", "KEK", "db")
SB_CERT_CN = {"PK": "attestd-sim PK", "KEK": "attestd-sim KEK", "db": "attestd-sim db CA"}


class BootSimError(Exception):
    """A failure to report on stderr (exit status 1)."""


# --------------------------------------------------------------------------
# Binary encodings (all little-endian, packed, as in the TCG and UEFI specs)


def guid(u: uuid.UUID) -> bytes:
    """EFI_GUID: the first three fields little-endian."""
    return u.bytes_le


def utf16(s: str, nul: bool = False) -> bytes:
    return (s + ("\0" if nul else "")).encode("utf-16-le")


def uefi_variable_data(var_guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP 10.3.3): GUID, name length in chars, data length, name, data."""
    return guid(var_guid) + struct.pack("<QQ", len(name), len(data)) + utf16(name) + data


def signature_list(sig_type: uuid.UUID, entries: list[bytes], owner: uuid.UUID) -> bytes:
    """EFI_SIGNATURE_LIST holding EFI_SIGNATURE_DATA entries of equal size, no header."""
    if not entries:
        return b""
    size = 16 + len(entries[0])
    if any(16 + len(e) != size for e in entries):
        raise ValueError("all entries of one EFI_SIGNATURE_LIST must have the same size")
    body = b"".join(guid(owner) + e for e in entries)
    return guid(sig_type) + struct.pack("<III", 28 + len(body), 0, size) + body


def device_path_node(dp_type: int, subtype: int, data: bytes) -> bytes:
    return struct.pack("<BBH", dp_type, subtype, 4 + len(data)) + data


def device_path(partition: tuple[int, int, int], part_guid: uuid.UUID, file_path: str) -> bytes:
    """PciRoot(0x0)/Pci(0x1f,0x2)/Sata(0,0xffff,0)/HD(n,GPT,guid,...)/\\file."""
    number, first, last = partition
    return b"".join(
        (
            device_path_node(0x02, 0x01, struct.pack("<II", 0x0A0341D0, 0)),  # ACPI PNP0A03
            device_path_node(0x01, 0x01, struct.pack("<BB", 2, 0x1F)),  # PCI function, device
            device_path_node(0x03, 0x12, struct.pack("<HHH", 0, 0xFFFF, 0)),  # SATA
            device_path_node(  # Hard drive: GPT partition signature
                0x04,
                0x01,
                struct.pack("<IQQ", number, first, last - first + 1)
                + guid(part_guid)
                + b"\x02\x02",
            ),
            device_path_node(0x04, 0x04, utf16(file_path, nul=True)),  # File path
            device_path_node(0x7F, 0xFF, b""),  # End of entire device path
        )
    )


def image_load_event(location: int, image: bytes, dp: bytes) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.2.3): location, length, link-time address, path."""
    return struct.pack("<QQQQ", location, len(image), 0, len(dp)) + dp


def gpt_event() -> bytes:
    """UEFI_GPT_DATA: the GPT header, the number of partitions, the used entries."""

    def entry(
        type_guid: uuid.UUID, part_guid: uuid.UUID, part: tuple[int, int, int], name: str
    ) -> bytes:
        return (
            guid(type_guid)
            + guid(part_guid)
            + struct.pack("<QQQ", part[1], part[2], 0)
            + utf16(name).ljust(72, b"\0")
        )

    used = [
        entry(GPT_LINUX_FS_TYPE, ROOT_PART_GUID, ROOT_PART, "Linux filesystem"),
        entry(GPT_ESP_TYPE, ESP_PART_GUID, ESP_PART, "EFI System"),
    ]
    array = b"".join(used).ljust(128 * 128, b"\0")

    def header(crc: int) -> bytes:
        return (
            b"EFI PART"
            + struct.pack("<IIII", 0x00010000, 92, crc, 0)
            + struct.pack("<QQQQ", 1, DISK_SECTORS - 1, 34, DISK_SECTORS - 34)
            + guid(DISK_GUID)
            + struct.pack("<QIII", 2, 128, 128, zlib.crc32(array))
        )

    hdr = header(zlib.crc32(header(0)))
    return hdr + struct.pack("<Q", len(used)) + b"".join(used)


# --------------------------------------------------------------------------
# Secure Boot keys: RSA-2048, generated deterministically from the seed


class _Drbg:
    """SHA-256 in counter mode over a seed: a reproducible byte stream."""

    def __init__(self, seed: bytes) -> None:
        self.seed, self.counter = seed, 0

    def int_bits(self, bits: int) -> int:
        out = b""
        while len(out) * 8 < bits:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return int.from_bytes(out, "big") >> (len(out) * 8 - bits)


_SMALL_PRIMES = [p for p in range(3, 3000) if all(p % q for q in range(2, int(p**0.5) + 1))]


def _probable_prime(n: int, rng: _Drbg, rounds: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for i in range(rounds):
        a = 2 if i == 0 else 2 + rng.int_bits(n.bit_length()) % (n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(rng: _Drbg, bits: int, e: int) -> int:
    """A random `bits`-bit prime p (top two bits set) with gcd(p - 1, e) = 1."""
    while True:
        start = rng.int_bits(bits) | (3 << (bits - 2)) | 1
        # Incremental search: sieve start, start+2, ... by small primes at once.
        residues = [start % p for p in _SMALL_PRIMES]
        for step in range(0, 4096, 2):
            if any((r + step) % p == 0 for r, p in zip(residues, _SMALL_PRIMES, strict=True)):
                continue
            c = start + step
            # Miller-Rabin, base 2 and five derived bases: ample for random candidates.
            if (c - 1) % e != 0 and _probable_prime(c, rng, 6):
                return c


def derive_rsa_key(seed: int, name: str) -> rsa.RSAPrivateKey:
    """An RSA-2048 key that depends only on (seed, name)."""
    rng = _Drbg(f"attestd-sim bootsim key v1|{seed}|{name}".encode())
    e = 65537
    while True:
        p, q = _prime(rng, 1024, e), _prime(rng, 1024, e)
        if p == q:
            continue
        p, q = max(p, q), min(p, q)
        n = p * q
        if n.bit_length() != 2048:
            continue
        d = pow(e, -1, (p - 1) * (q - 1))
        numbers = rsa.RSAPrivateNumbers(
            p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, n)
        )
        return numbers.private_key()


def load_or_derive_keys(seed: int, cache_dir: Path | None) -> dict[str, rsa.RSAPrivateKey]:
    """The PK, KEK and db keys for `seed`; cached in cache_dir if given (a pure memo)."""
    cache = cache_dir / f"bootsim-keys-seed{seed}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            doc = json.loads(cache.read_text())
            loaded = {
                n: serialization.load_pem_private_key(doc[n].encode(), password=None)
                for n in SB_KEY_NAMES
            }
            rsa_keys = {n: k for n, k in loaded.items() if isinstance(k, rsa.RSAPrivateKey)}
            if len(rsa_keys) == len(SB_KEY_NAMES):
                return rsa_keys
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache is regenerated below
    keys = {n: derive_rsa_key(seed, n) for n in SB_KEY_NAMES}
    if cache is not None:
        doc = {
            n: k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
            for n, k in keys.items()
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".bootsim-keys-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, cache)
    return keys


def make_cert(seed: int, name: str, key: rsa.RSAPrivateKey) -> bytes:
    """A self-signed CA certificate (DER), reproducible from (seed, name, key)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attestd-sim"),
            x509.NameAttribute(NameOID.COMMON_NAME, SB_CERT_CN[name]),
        ]
    )
    serial = (
        int.from_bytes(
            hashlib.sha256(f"attestd-sim bootsim serial|{seed}|{name}".encode()).digest()[:16],
            "big",
        )
        >> 1
    )
    pub = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
        # RSA PKCS#1 v1.5 signatures are deterministic, so the certificate is too.
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------
# The boot


@dataclass(frozen=True)
class Event:
    pcr: int
    type: int
    data: bytes
    digests: dict[str, bytes]  # bank -> digest; empty for EV_NO_ACTION (all zero)
    description: str
    logged: bool = True  # False: extended into the TPM but left out of the log

    @property
    def extended(self) -> bool:
        return self.type != EV_NO_ACTION


def measure(
    pcr: int,
    ev_type: int,
    data: bytes,
    description: str,
    measured: bytes | None = None,
    logged: bool = True,
) -> Event:
    """An event whose digests are each bank's hash of `measured` (default: the data)."""
    m = data if measured is None else measured
    return Event(
        pcr,
        ev_type,
        data,
        {b: hashlib.new(b, m).digest() for b, _, _ in BANKS},
        description,
        logged,
    )


def image_bytes(name: str, version: str) -> tuple[bytes, bytes]:
    """(the "Authenticode view" of an image, the file on disk): fixed stand-in bytes.

    PCR 4 gets the hash of the first (firmware/shim measure the Authenticode
    hash, which leaves out the signature); PCR 9 gets the hash of the second
    (grub hashes whole files). So the two differ, as on real machines.
    """
    body = f"MZ attestd-sim image {name} {version}\n".encode() * 64
    return body, body + f"attestd-sim signature over {name} {version}\n".encode()


def build_events(seed: int, tamper: str | None, keys: dict[str, rsa.RSAPrivateKey]) -> list[Event]:
    certs = {n: make_cert(seed, n, keys[n]) for n in SB_KEY_NAMES}
    ev: list[Event] = []

    # PCR 0: locality, S-CRTM version, firmware volume.
    ev.append(
        Event(
            0,
            EV_NO_ACTION,
            b"StartupLocality\0" + bytes([0]),
            {},
            "StartupLocality 0 (not extended)",
        )
    )
    ev.append(
        measure(
            0,
            EV_S_CRTM_VERSION,
            utf16("attestd-sim firmware 1.0", nul=True),
            "S-CRTM version: attestd-sim firmware 1.0",
        )
    )
    fv_base, fv_len = 0x00900000, 0x00C00000
    ev.append(
        measure(
            0,
            EV_EFI_PLATFORM_FIRMWARE_BLOB,
            struct.pack("<QQ", fv_base, fv_len),
            f"firmware volume at {fv_base:#x}, {fv_len:#x} bytes",
            measured=b"attestd-sim firmware volume DXEFV 1.0\n" * 256,
        )
    )

    # PCR 7: the Secure Boot policy, then its separator.
    secure_boot = tamper != "secureboot-off"
    for var_guid, name, data, desc in (
        (
            EFI_GLOBAL_VARIABLE,
            "SecureBoot",
            bytes([1 if secure_boot else 0]),
            f"SecureBoot = {1 if secure_boot else 0}",
        ),
        (
            EFI_GLOBAL_VARIABLE,
            "PK",
            signature_list(EFI_CERT_X509_GUID, [certs["PK"]], SIM_OWNER_GUID),
            f"PK: {SB_CERT_CN['PK']}",
        ),
        (
            EFI_GLOBAL_VARIABLE,
            "KEK",
            signature_list(EFI_CERT_X509_GUID, [certs["KEK"]], SIM_OWNER_GUID),
            f"KEK: {SB_CERT_CN['KEK']}",
        ),
        (
            EFI_IMAGE_SECURITY_DATABASE_GUID,
            "db",
            signature_list(EFI_CERT_X509_GUID, [certs["db"]], SIM_OWNER_GUID),
            f"db: {SB_CERT_CN['db']}",
        ),
        (
            EFI_IMAGE_SECURITY_DATABASE_GUID,
            "dbx",
            signature_list(
                EFI_CERT_SHA256_GUID,
                [] if tamper == "dbx-empty" else list(DBX_REVOKED),
                SIM_OWNER_GUID,
            ),
            "dbx: empty"
            if tamper == "dbx-empty"
            else f"dbx: {len(DBX_REVOKED)} revoked SHA-256 hashes",
        ),
    ):
        ev.append(
            measure(
                7, EV_EFI_VARIABLE_DRIVER_CONFIG, uefi_variable_data(var_guid, name, data), desc
            )
        )
    ev.append(measure(7, EV_SEPARATOR, b"\0\0\0\0", "separator"))

    # ReadyToBoot: boot option chosen, separators for PCRs 0-6.
    action = "Calling EFI Application from Boot Option"
    ev.append(measure(4, EV_EFI_ACTION, action.encode(), action))
    for pcr in range(7):
        ev.append(measure(pcr, EV_SEPARATOR, b"\0\0\0\0", "separator"))

    # The boot disk's partition table, then shim: verified against db (PCR 7
    # authority; only when Secure Boot is on) and measured (PCR 4).
    ev.append(measure(5, EV_EFI_GPT_EVENT, gpt_event(), "GPT: sda1 Linux filesystem, sda2 ESP"))
    if secure_boot:
        ev.append(
            measure(
                7,
                EV_EFI_VARIABLE_AUTHORITY,
                uefi_variable_data(
                    EFI_IMAGE_SECURITY_DATABASE_GUID, "db", guid(SIM_OWNER_GUID) + certs["db"]
                ),
                f"db authority: {SB_CERT_CN['db']} (verified shim)",
            )
        )

    def boot_app(
        location: int,
        part: tuple[int, int, int],
        part_guid: uuid.UUID,
        path: str,
        image: bytes,
        desc: str,
    ) -> Event:
        return measure(
            4,
            EV_EFI_BOOT_SERVICES_APPLICATION,
            image_load_event(location, image, device_path(part, part_guid, path)),
            desc,
            measured=image,
        )

    shim, _ = image_bytes("shimx64.efi", "15.7-1")
    grub, _ = image_bytes("grubx64.efi", "2.06-13")
    kernel_version = "6.1.0-sim (tampered)" if tamper == "kernel" else KERNEL_VERSION
    kernel, kernel_file = image_bytes("vmlinuz", kernel_version)
    _, initrd_file = image_bytes("initrd.img", KERNEL_VERSION)

    ev.append(
        boot_app(
            0x7E5A1018,
            ESP_PART,
            ESP_PART_GUID,
            r"\EFI\debian\shimx64.efi",
            shim,
            r"shim \EFI\debian\shimx64.efi 15.7-1",
        )
    )
    ev.append(
        boot_app(
            0x7E0B3018,
            ESP_PART,
            ESP_PART_GUID,
            r"\EFI\debian\grubx64.efi",
            grub,
            r"grub \EFI\debian\grubx64.efi 2.06-13",
        )
    )

    # grub: its command (PCR 8), the kernel file it reads (PCR 9), which shim
    # verifies and measures (PCR 4), the command line (PCR 8), the initrd (PCR 9).
    cmdline = CMDLINE + (" init=/bin/sh" if tamper == "cmdline" else "")

    def grub_string(pcr: int, text: str) -> Event:
        # grub logs "prefix: text" with its NUL but hashes only the text after the prefix.
        measured = text.split(": ", 1)[1].encode()
        return measure(pcr, EV_IPL, text.encode() + b"\0", text, measured=measured)

    ev.append(grub_string(8, f"grub_cmd: linux {cmdline}"))
    ev.append(
        measure(
            9,
            EV_IPL,
            KERNEL_PATH.encode() + b"\0",
            f"kernel file {KERNEL_PATH}",
            measured=kernel_file,
        )
    )
    ev.append(
        boot_app(
            0x6F200000,
            ROOT_PART,
            ROOT_PART_GUID,
            KERNEL_PATH.replace("/", "\\"),
            kernel,
            f"kernel {KERNEL_PATH} {kernel_version}",
        )
    )
    if tamper == "unlogged":
        evil, _ = image_bytes("unlogged.efi", "0")
        ev.append(
            measure(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                b"",
                "unlogged extend (NOT IN LOG)",
                measured=evil,
                logged=False,
            )
        )
    ev.append(grub_string(8, f"kernel_cmdline: {cmdline}"))
    ev.append(
        measure(
            9,
            EV_IPL,
            INITRD_PATH.encode() + b"\0",
            f"initrd file {INITRD_PATH}",
            measured=initrd_file,
        )
    )

    # The kernel's EFI stub leaves boot services.
    for action in ("Exit Boot Services Invocation", "Exit Boot Services Returned with Success"):
        ev.append(measure(5, EV_EFI_ACTION, action.encode(), action))
    return ev


def spec_id_event() -> bytes:
    """TCG_PCR_EVENT (SHA-1 format) carrying TCG_EfiSpecIDEvent for sha1 + sha256."""
    algs = b"".join(struct.pack("<HH", alg, size) for _, alg, size in BANKS)
    body = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(BANKS))  # class, minor, major, errata, uintn
        + algs
        + b"\0"  # vendorInfoSize
    )
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def encode_event(e: Event) -> bytes:
    """TCG_PCR_EVENT2: PCR, type, TPML_DIGEST_VALUES, event size, event."""
    digests = b"".join(
        struct.pack("<H", alg) + (e.digests[name] if e.extended else bytes(size))
        for name, alg, size in BANKS
    )
    return (
        struct.pack("<III", e.pcr, e.type, len(BANKS))
        + digests
        + struct.pack("<I", len(e.data))
        + e.data
    )


def encode_log(events: list[Event]) -> bytes:
    return spec_id_event() + b"".join(encode_event(e) for e in events if e.logged)


# --------------------------------------------------------------------------
# The TPM (tpm2-pytss ESAPI)


def tpm_boot(tcti: str, events: list[Event], commit: Callable[[], None]) -> None:
    """Check PCRs 0-9 are at reset, extend every extended event, then commit()."""
    # Imported here so --help works without tpm2-pytss.
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    alg_ids = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256}
    try:
        esys = ESAPI(tcti)
    except Exception as e:
        raise BootSimError(f"cannot open TPM at {tcti!r}: {e}") from e
    with esys:
        try:
            current = _read_pcrs(esys)
        except Exception as e:
            raise BootSimError(f"cannot read PCRs from TPM at {tcti!r}: {e}") from e
        for bank, _, _ in BANKS:
            missing = [p for p in BOOT_PCRS if p not in current.get(bank, {})]
            if missing:
                raise BootSimError(
                    f"the TPM has no active {bank} bank for PCRs {missing} "
                    "(bootsim needs sha1 and sha256)"
                )
        dirty = sorted(
            {p for bank, _, size in BANKS for p in BOOT_PCRS if current[bank][p] != bytes(size)}
        )
        if dirty:
            which = "PCR 0 is" if dirty == [0] else f"PCRs {', '.join(map(str, dirty))} are"
            raise BootSimError(
                f"{which} not at the reset value: this TPM has already booted since its last "
                "reset. Power-cycle it first (tpm-sim/powercycle.sh) or start a fresh one."
            )
        for event in events:
            if not event.extended:
                continue
            values = TPML_DIGEST_VALUES(
                [
                    TPMT_HA(hashAlg=alg_ids[bank], digest=TPMU_HA(**{bank: event.digests[bank]}))
                    for bank, _, _ in BANKS
                ]
            )
            try:
                esys.pcr_extend(ESYS_TR.PCR0 + event.pcr, values)
            except Exception as e:
                raise BootSimError(
                    f"extending PCR {event.pcr} ({event.description}) failed: {e}"
                ) from e
        commit()


def _read_pcrs(esys: Any) -> dict[str, dict[int, bytes]]:
    """{bank: {pcr: value}} for PCRs 0-9 of sha1/sha256 (TPM2_PCR_Read returns <= 8 at a time)."""
    want = {bank: set(BOOT_PCRS) for bank, _, _ in BANKS}
    got: dict[str, dict[int, bytes]] = {bank: {} for bank in want}
    while any(want.values()):
        spec = "+".join(f"{b}:{','.join(map(str, sorted(p)))}" for b, p in want.items() if p)
        _, sel, digests = esys.pcr_read(spec)
        values = iter(bytes(d) for d in digests)
        progress = False
        for s in sel:
            bank = {0x0004: "sha1", 0x000B: "sha256"}.get(int(s.hash))
            for i in range(s.sizeofSelect):
                for bit in range(8):
                    if s.pcrSelect[i] & (1 << bit):
                        pcr = i * 8 + bit
                        value = next(values)
                        if bank in got and pcr in want[bank]:
                            got[bank][pcr] = value
                            want[bank].discard(pcr)
                            progress = True
        if not progress:  # the TPM returned none of what is left: those are not allocated
            break
    return got


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Simulated UEFI Secure Boot: write a TCG event log and extend the same "
        "digests into the sha1 and sha256 banks of a TPM whose PCRs are at reset.",
    )
    parser.add_argument(
        "--tcti", required=True, help="TCTI string, e.g. swtpm:host=127.0.0.1,port=2321"
    )
    parser.add_argument(
        "--log", required=True, type=Path, help="where to write the binary event log"
    )
    parser.add_argument(
        "--tamper",
        choices=TAMPER_KINDS,
        help="boot something that a verifier should reject (see tpm-sim/README.md)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="selects the Secure Boot keys and certificates (default 0); the same "
        "seed always gives the same log and PCRs",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="keep the generated Secure Boot keys here (pure speed-up: ~1 s less)",
    )
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    os.environ.setdefault("TSS2_LOG", "all+none")

    try:
        keys = load_or_derive_keys(args.seed, args.cache_dir)
        events = build_events(args.seed, args.tamper, keys)
        log = encode_log(events)
        out: Path = args.log
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(log)
            # The log appears only once every extend has succeeded.
            tpm_boot(args.tcti, events, lambda: os.replace(tmp, out))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (BootSimError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1

    print(f"0\tEV_NO_ACTION\tSpec ID Event03: {', '.join(b for b, _, _ in BANKS)}")
    for event in events:
        print(f"{event.pcr}\t{EVENT_NAMES[event.type]}\t{event.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
