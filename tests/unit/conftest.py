"""Unit-suite fixtures: one simulated TPM for the whole session, booted once.

The TPM work in the unit suite is a few milliseconds per quote; manufacturing
a TPM is about a second. So one TPM is made per session, its AKs are created
once at fixed persistent handles, and every module quotes with them. Tests
never re-create a session AK (that would change the key under other modules)
and never extend PCRs (that would change the values under other modules).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `import forge` from tests/unit/**
    sys.path.insert(0, str(_HERE))

from tpmsim import Manufacturer, SimTpm  # noqa: E402

from attestd.agent.tpm import DEFAULT_AK_HANDLE, DeviceTpm  # noqa: E402

REPO = _HERE.parents[1]
SHARED_VECTORS = REPO.parent / "shared" / "vectors"
GCP_QUOTE = SHARED_VECTORS / "quotes" / "windows_gcp_shielded_vm.json"

# DeviceTpm.activate() uses the default handle, so the RSA AK lives there.
RSA_AK_HANDLE = DEFAULT_AK_HANDLE
ECC_AK_HANDLE = DEFAULT_AK_HANDLE + 1
SCRATCH_AK_HANDLE = DEFAULT_AK_HANDLE + 2  # for tests that need a throwaway AK


@pytest.fixture(scope="session")
def sim(manufacturer: Manufacturer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimTpm]:
    """A manufactured, started TPM that has run the simulated measured boot."""
    tpm = manufacturer.make_tpm(tmp_path_factory.mktemp("unit-tpm"))
    tpm.start()
    try:
        tpm.boot()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture(scope="session")
def device(sim: SimTpm) -> Iterator[DeviceTpm]:
    with DeviceTpm(sim.tcti) as dev:
        yield dev


@pytest.fixture(scope="session")
def rsa_ak(device: DeviceTpm) -> bytes:
    """TPM2B_PUBLIC of an RSA-2048 RSASSA-SHA256 AK persisted at RSA_AK_HANDLE."""
    return device.create_ak("rsa", RSA_AK_HANDLE)


@pytest.fixture(scope="session")
def ecc_ak(device: DeviceTpm) -> bytes:
    """TPM2B_PUBLIC of an ECC P-256 ECDSA-SHA256 AK persisted at ECC_AK_HANDLE."""
    return device.create_ak("ecc", ECC_AK_HANDLE)


@dataclass(frozen=True)
class GcpQuote:
    """go-attestation's Windows Shielded VM quote (see ../shared/vectors/README.md)."""

    ak_public: bytes  # TPMT_PUBLIC, RSASSA-SHA1
    quote: bytes
    signature: bytes
    pcrs: dict[str, dict[int, bytes]]  # the sha1 bank, PCRs 0-23


@pytest.fixture(scope="session")
def gcp_quote() -> GcpQuote:
    if not GCP_QUOTE.exists():
        pytest.skip(f"shared vectors not checked out beside the repository ({GCP_QUOTE})")
    doc = json.loads(GCP_QUOTE.read_text())
    b64 = base64.b64decode
    assert doc["Quote"]["Alg"] == 4  # SHA-1, go-attestation's numbering
    pcrs = {}
    for entry in doc["Log"]["PCRs"]:
        assert entry["DigestAlg"] == 3  # SHA-1 in go-attestation's crypto.Hash numbering
        pcrs[entry["Index"]] = b64(entry["Digest"])
    return GcpQuote(
        ak_public=b64(doc["AK"]["Public"]),
        quote=b64(doc["Quote"]["Quote"]),
        signature=b64(doc["Quote"]["Signature"]),
        pcrs={"sha1": pcrs},
    )
