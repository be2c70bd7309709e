"""Unit-suite fixtures: one simulated TPM for the whole session, booted once.

The TPM work in the unit suite is a few milliseconds per quote; manufacturing
a TPM is about a second. So one TPM is made per session, its AKs are created
once at fixed persistent handles, and every module quotes with them. Tests
never re-create a session AK (that would change the key under other modules)
and never extend PCRs (that would change the values under other modules).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # `import forge`, `import sessiontpm` from tests/unit/**
    sys.path.insert(0, str(_HERE))

from realquotes import GCP_QUOTE, GcpQuote, load_gcp_quote  # noqa: E402
from sessiontpm import ECC_AK_HANDLE, RSA_AK_HANDLE  # noqa: E402
from tpmsim import Manufacturer, SimTpm  # noqa: E402

from attestd.agent.tpm import DeviceTpm  # noqa: E402


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


@pytest.fixture(scope="session")
def gcp_quote() -> GcpQuote:
    if not GCP_QUOTE.exists():
        pytest.skip(f"shared vectors not checked out beside the repository ({GCP_QUOTE})")
    return load_gcp_quote()
