"""Shared fixtures: simulated TPM manufacturers and a factory for running TPMs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# `import tpmsim` from any test directory, and `import attestd` without installing.
_TESTS = Path(__file__).resolve().parent
for _p in (_TESTS, _TESTS.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tpmsim import Manufacturer, SimTpm  # noqa: E402


@pytest.fixture(scope="session")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    """The TPM vendor whose root the verifier trusts; a fresh CA per session."""
    return Manufacturer(tmp_path_factory.mktemp("manufacturer-ca"))


@pytest.fixture(scope="session")
def other_manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    """An independent vendor with its own CA, for "untrusted EK" cases."""
    return Manufacturer(tmp_path_factory.mktemp("other-manufacturer-ca"))


@pytest.fixture
def tpm_factory(manufacturer: Manufacturer, tmp_path: Path) -> Iterator[Callable[..., SimTpm]]:
    """make(maker=None, *, start=True) -> SimTpm: a new TPM, started on free ports.

    Defaults to `manufacturer`. Every TPM made here is stopped at teardown,
    whether or not the test passed.
    """
    made: list[SimTpm] = []

    def make(maker: Manufacturer | None = None, *, start: bool = True) -> SimTpm:
        tpm = (maker or manufacturer).make_tpm(tmp_path / f"tpm{len(made)}")
        made.append(tpm)
        if start:
            tpm.start()
        return tpm

    yield make

    errors = []
    for tpm in made:
        try:
            tpm.stop()
        except Exception as e:  # keep stopping the others
            errors.append(e)
    if errors:
        raise errors[0]
