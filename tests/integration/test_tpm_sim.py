"""The TPM simulator the other integration tests build on behaves like real hardware."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from tpmsim import BOOT_PCRS, EK_CERT_RSA_NV, SCRIPTS, Manufacturer, SimTpm

pytestmark = pytest.mark.integration


def _verify_chain(leaf: x509.Certificate, maker: Manufacturer) -> None:
    root = x509.load_pem_x509_certificate(maker.root_cert_path.read_bytes())
    intermediate = x509.load_pem_x509_certificate(maker.intermediate_cert_path.read_bytes())
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(datetime.datetime.now(datetime.UTC))
        # EK certs are not web server certs: only the CAs get webpki checks.
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    verifier.verify(leaf, [intermediate])


def _alive(pid: int) -> bool:
    # Zombies count as dead: a container's init may be slow to reap them.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ek_cert_chains_to_its_manufacturer_only(tpm_factory, manufacturer, other_manufacturer):
    tpm = tpm_factory()
    leaf = x509.load_der_x509_certificate(tpm.nv_read(EK_CERT_RSA_NV))

    _verify_chain(leaf, manufacturer)
    with pytest.raises(VerificationError):
        _verify_chain(leaf, other_manufacturer)


def test_tpms_from_one_manufacturer_share_the_root(tpm_factory, manufacturer):
    a, b = tpm_factory(), tpm_factory()
    cert_a = x509.load_der_x509_certificate(a.ek_cert_der())
    cert_b = x509.load_der_x509_certificate(b.ek_cert_der())

    assert cert_a.public_key() != cert_b.public_key()
    _verify_chain(cert_a, manufacturer)
    _verify_chain(cert_b, manufacturer)


def test_good_boots_give_identical_pcrs(tpm_factory):
    a, b = tpm_factory(), tpm_factory()
    events_a, events_b = a.boot(), b.boot()

    assert events_a == events_b
    assert a.pcrs() == b.pcrs()
    for bank in ("sha1", "sha256"):
        for pcr in BOOT_PCRS:
            assert any(a.pcrs()[bank][pcr]), f"{bank}:{pcr} was never extended"


def test_tamper_changes_exactly_pcr4(tpm_factory):
    good, bad = tpm_factory(), tpm_factory()
    good.boot()
    bad.boot(tamper=True)

    good_pcrs, bad_pcrs = good.pcrs(), bad.pcrs()
    for bank in ("sha1", "sha256"):
        differing = [p for p in BOOT_PCRS if good_pcrs[bank][p] != bad_pcrs[bank][p]]
        assert differing == [4], bank


def test_powercycle_increments_reset_count_and_resets_pcrs(tpm_factory):
    tpm = tpm_factory()
    fresh = tpm.pcrs()
    tpm.boot()
    before = tpm.reset_count()
    assert tpm.pcrs() != fresh

    tpm.powercycle()

    assert tpm.reset_count() == before + 1
    assert tpm.pcrs() == fresh
    # And the reboot measures the same way as the first boot.
    booted_again = tpm.boot()
    tpm.powercycle()
    assert tpm.boot() == booted_again


def test_nv_and_keys_survive_stop_and_start(tpm_factory):
    tpm = tpm_factory()
    cert = tpm.ek_cert_der()
    tpm.stop()
    tpm.start()
    assert tpm.ek_cert_der() == cert


def test_stop_is_idempotent(tpm_factory, manufacturer, tmp_path):
    tpm = tpm_factory()
    pid = int((tpm.state_dir / "swtpm.pid").read_text())
    tpm.stop()
    tpm.stop()
    assert not (tpm.state_dir / "swtpm.pid").exists()
    assert not _alive(pid)
    with pytest.raises(Exception, match="not started"):
        _ = tpm.tcti

    never_started = manufacturer.make_tpm(tmp_path / "never-started")
    never_started.stop()


def test_context_manager_stops(manufacturer, tmp_path):
    with manufacturer.make_tpm(tmp_path / "cm") as tpm:
        assert isinstance(tpm, SimTpm)
        pid = int((tpm.state_dir / "swtpm.pid").read_text())
        assert tpm.reset_count() >= 1
    assert not _alive(pid)


@pytest.mark.parametrize(
    "argv",
    [
        ["manufacture.sh"],
        ["manufacture.sh", "--ca"],
        ["start.sh", "--state", "x"],
        ["stop.sh", "--bogus"],
        ["powercycle.sh"],
        ["boot.sh", "--tamper"],
    ],
)
def test_scripts_reject_bad_arguments(argv):
    proc = subprocess.run([str(SCRIPTS / argv[0]), *argv[1:]], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "usage:" in proc.stderr
