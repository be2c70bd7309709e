"""Make the quote vectors in tests/vectors/ from a simulated TPM.

Usage: python tests/vectors/generate.py [OUT_DIR]   (default: tests/vectors/)
Needs swtpm, swtpm-tools and tpm2-tools (see tpm-sim/README.md); runs on
127.0.0.1 only and leaves nothing running.

Each file is named after the defect it carries and is one JSON object:

    description   what the evidence is and why it must be judged so
    ak_public     base64 TPM2B_PUBLIC of the AK the verifier enrolled
    quote         base64 TPMS_ATTEST, as TPM2_Quote returned it (or tampered)
    signature     base64 TPMT_SIGNATURE
    pcrs          {bank: {index: hex digest}}: the PCR values the device submits
    nonce         hex nonce the verifier issued, or null (freshness not checked)
    policy        a policy document (attestd/core/policy.py), or null (integrity only)
    previous      the device's last accepted clock state, or null
    allow_sha1    the appraisal's allow_sha1 argument (null: the policy decides)
    expect        "valid" (no failures), "invalid" (failures) or "malformed"
                  (parse_evidence refuses the bytes)
    status        the verdict's EAR status, for valid and invalid
    codes         the failure codes, in order, for valid ([]) and invalid
    warnings      the warning codes, in order, for valid and invalid
    field         the MalformedError field, for malformed

The expectations are declared here, by the defect, never computed by
attestd: a verifier change that alters a verdict fails
tests/unit/core/test_vectors.py. The evidence is real TPM output, except
where a vector's description says which bytes were altered afterwards.
Regenerated files differ in keys, nonces and clock values, not in what they
expect; commit them together with the change that needed them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO / "tests", REPO):  # tpmsim, and attestd without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT  # noqa: E402
from tpm2_pytss.types import (  # noqa: E402
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
)
from tpmsim import Manufacturer, SimTpm  # noqa: E402

from attestd.agent.tpm import DeviceTpm  # noqa: E402

SELECTION = [("sha256", [0, 2, 4, 7])]  # code (0, 2, 4) and configuration (7)
RSA_AK, ECC_AK, OTHER_AK = 0x81010002, 0x81010003, 0x81010004
AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
ENV = {**os.environ, "TSS2_LOG": os.environ.get("TSS2_LOG", "all+none")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hex_pcrs(pcrs: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {bank: {str(i): d.hex() for i, d in sorted(v.items())} for bank, v in pcrs.items()}


def policy_doc(pcrs: dict[str, dict[int, bytes]], **override: str) -> dict[str, Any]:
    """A policy whose reference values are ``pcrs``; ``pcrN="hex"`` replaces one."""
    doc = {"name": "vectors", "pcrs": hex_pcrs(pcrs)}
    for key, value in override.items():
        doc["pcrs"]["sha256"][key.removeprefix("pcr")] = value
    return doc


class Quote:
    """A quote as the TPM made it, and its clock state as the verifier records it."""

    def __init__(self, ak_public: bytes, attest: bytes, signature: bytes, pcrs: Any, nonce: bytes):
        self.ak_public, self.attest, self.signature = ak_public, attest, signature
        self.pcrs, self.nonce = pcrs, nonce

    @property
    def clock_state(self) -> dict[str, int]:
        # TPMS_ATTEST: magic(4) type(2) TPM2B qualifiedSigner, TPM2B extraData,
        # clockInfo {clock u64, resetCount u32, restartCount u32, safe u8}, firmwareVersion u64.
        a = self.attest
        pos = 6
        for _ in range(2):
            pos += 2 + int.from_bytes(a[pos : pos + 2], "big")
        clock = int.from_bytes(a[pos : pos + 8], "big")
        reset = int.from_bytes(a[pos + 8 : pos + 12], "big")
        restart = int.from_bytes(a[pos + 12 : pos + 16], "big")
        firmware = int.from_bytes(a[pos + 17 : pos + 25], "big")
        return {
            "reset_count": reset,
            "restart_count": restart,
            "clock": clock,
            "firmware_version": firmware,
        }


def vector(
    q: Quote,
    description: str,
    expect: str,
    *,
    status: str = "",
    codes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    field: str = "",
    nonce: bytes | str | None = "same",
    policy: dict[str, Any] | None = None,
    previous: dict[str, int] | None = None,
    allow_sha1: bool | None = None,
    ak_public: bytes | None = None,
    attest: bytes | None = None,
    signature: bytes | None = None,
    pcrs: dict[str, dict[int, bytes]] | None = None,
) -> dict[str, Any]:
    the_nonce = q.nonce if nonce == "same" else nonce
    out: dict[str, Any] = {
        "description": description,
        "ak_public": b64(q.ak_public if ak_public is None else ak_public),
        "quote": b64(q.attest if attest is None else attest),
        "signature": b64(q.signature if signature is None else signature),
        "pcrs": hex_pcrs(q.pcrs if pcrs is None else pcrs),
        "nonce": None if the_nonce is None else the_nonce.hex(),  # type: ignore[union-attr]
        "policy": policy,
        "previous": previous,
        "allow_sha1": allow_sha1,
        "expect": expect,
    }
    if expect == "malformed":
        out["field"] = field
    else:
        out.update(status=status, codes=list(codes), warnings=list(warnings))
    return out


def tpml_selection(selection: Sequence[tuple[str, Sequence[int]]]) -> TPML_PCR_SELECTION:
    """TPML_PCR_SELECTION with 3-byte bitmaps; an empty index list gives an empty entry."""
    algs = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256}
    entries = []
    for bank, indices in selection:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        entries.append(TPMS_PCR_SELECTION(hash=algs[bank], sizeofSelect=3, pcrSelect=bytes(bitmap)))
    return TPML_PCR_SELECTION(entries)


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


@contextmanager
def running_tpm(workdir: Path) -> Iterator[SimTpm]:
    tpm = Manufacturer(workdir / "ca").make_tpm(workdir / "tpm")
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


def restart(tpm: SimTpm) -> None:
    """TPM Resume: Shutdown(STATE), TPM_Init, Startup(STATE): restartCount + 1, same reset."""
    assert tpm.port is not None
    for argv in (
        ["tpm2_shutdown", "-T", tpm.tcti],
        ["swtpm_ioctl", "--tcp", f"127.0.0.1:{tpm.port + 1}", "-i"],
        ["tpm2_startup", "-T", tpm.tcti],
    ):
        subprocess.run(argv, check=True, capture_output=True, env=ENV, timeout=30)


def quote(dev: DeviceTpm, ak_public: bytes, handle: int, selection: Any = SELECTION) -> Quote:
    nonce = secrets.token_bytes(32)
    q = dev.quote(selection, nonce, handle)
    return Quote(ak_public, q.attest, q.signature, q.pcrs, nonce)


def sha1_ak_quote(dev: DeviceTpm) -> Quote:
    """A quote by a transient RSA AK whose scheme is RSASSA-SHA1 (an old Windows-style AK)."""
    tmpl = TPMT_PUBLIC.parse(alg="rsa2048:rsassa-sha1:null", objectAttributes=AK_ATTRS)
    handle, public, *_ = dev.ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=tmpl), ESYS_TR.ENDORSEMENT
    )
    try:
        nonce = secrets.token_bytes(32)
        attest, sig = dev.ectx.quote(
            handle, tpml_selection(SELECTION), nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        )
    finally:
        dev.ectx.flush_context(handle)
    return Quote(
        bytes(public.marshal()),
        bytes(attest),
        bytes(sig.marshal()),
        dev.read_pcrs(SELECTION),
        nonce,
    )


def empty_bank_quote(dev: DeviceTpm, ak_public: bytes) -> Quote:
    """A quote whose signed selection carries an empty sha1 entry (the TPM keeps it)."""
    nonce = secrets.token_bytes(32)
    attest, sig = dev.ectx.quote(
        dev.ectx.tr_from_tpmpublic(RSA_AK),
        tpml_selection([*SELECTION, ("sha1", [])]),
        nonce,
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
    )
    return Quote(ak_public, bytes(attest), bytes(sig.marshal()), dev.read_pcrs(SELECTION), nonce)


def make_vectors(workdir: Path) -> dict[str, dict[str, Any]]:
    v: dict[str, dict[str, Any]] = {}
    with running_tpm(workdir) as tpm:
        tpm.boot()
        with DeviceTpm(tpm.tcti) as dev:
            rsa_ak = dev.create_ak("rsa", RSA_AK)
            ecc_ak = dev.create_ak("ecc", ECC_AK)
            other_ak = dev.create_ak("rsa", OTHER_AK)
            good = quote(dev, rsa_ak, RSA_AK)
            good_ecc = quote(dev, ecc_ak, ECC_AK)
            by_other = quote(dev, other_ak, OTHER_AK)
            short = quote(dev, rsa_ak, RSA_AK, [("sha256", [0, 2, 4])])
            empty_bank = empty_bank_quote(dev, rsa_ak)
            sha1 = sha1_ak_quote(dev)
        golden = good.pcrs
        policy = policy_doc(golden)

        restart(tpm)
        with DeviceTpm(tpm.tcti) as dev:
            after_restart = quote(dev, rsa_ak, RSA_AK)

        tpm.powercycle()
        tpm.boot(tamper=True)
        with DeviceTpm(tpm.tcti) as dev:
            tampered = quote(dev, rsa_ak, RSA_AK)

    assert after_restart.clock_state["restart_count"] == good.clock_state["restart_count"] + 1
    assert tampered.clock_state["reset_count"] == good.clock_state["reset_count"] + 1
    assert tampered.pcrs["sha256"][4] != golden["sha256"][4]
    assert all(tampered.pcrs["sha256"][i] == golden["sha256"][i] for i in (0, 2, 7))

    ok = {"status": "affirming", "codes": []}
    v["quote_valid_rsa"] = vector(
        good, "RSA-2048 AK, RSASSA-SHA256, good boot, golden policy", "valid", policy=policy, **ok
    )
    v["quote_valid_ecc"] = vector(
        good_ecc,
        "ECC P-256 AK, ECDSA-SHA256, good boot, golden policy",
        "valid",
        policy=policy,
        **ok,
    )
    v["quote_nonce_not_checked"] = vector(
        good,
        "no nonce given (offline check): valid, with a warning that freshness was not checked",
        "valid",
        nonce=None,
        warnings=["NONCE_NOT_CHECKED"],
        **ok,
    )
    v["quote_nonce_mismatch"] = vector(
        good,
        "the quote was made over another nonce than the one the verifier expects",
        "invalid",
        nonce=secrets.token_bytes(32),
        policy=policy,
        status="contraindicated",
        codes=["NONCE_MISMATCH"],
    )
    v["quote_signature_flipped"] = vector(
        good,
        "one bit of the RSA signature flipped after the TPM signed",
        "invalid",
        signature=flip_last(good.signature),
        policy=policy,
        status="contraindicated",
        codes=["SIGNATURE_INVALID"],
    )
    v["quote_ecdsa_signature_flipped"] = vector(
        good_ecc,
        "one bit of the ECDSA signature's s flipped after the TPM signed",
        "invalid",
        signature=flip_last(good_ecc.signature),
        policy=policy,
        status="contraindicated",
        codes=["SIGNATURE_INVALID"],
    )
    v["quote_attest_flipped"] = vector(
        good,
        "one bit of the signed TPMS_ATTEST (in pcrDigest) flipped after the TPM signed",
        "invalid",
        attest=flip_last(good.attest),
        policy=policy,
        status="contraindicated",
        codes=["SIGNATURE_INVALID"],
    )
    v["quote_signed_by_another_ak"] = vector(
        by_other,
        "a genuine quote from the same TPM, signed by an AK other than the enrolled one",
        "invalid",
        ak_public=rsa_ak,
        policy=policy,
        status="contraindicated",
        codes=["SIGNATURE_INVALID"],
    )
    v["quote_checked_with_ecc_ak"] = vector(
        good,
        "an RSASSA quote checked against an ECC AK",
        "invalid",
        ak_public=ecc_ak,
        status="contraindicated",
        codes=["SIGNATURE_SCHEME_MISMATCH"],
    )
    pcrs_changed = {"sha256": {**golden["sha256"], 7: bytes(32)}}
    v["quote_pcr_digest_mismatch"] = vector(
        good,
        "PCR 7 submitted as zeros: the values are not the ones the TPM signed",
        "invalid",
        pcrs=pcrs_changed,
        policy=policy,
        status="contraindicated",
        codes=["PCR_DIGEST_MISMATCH"],
    )
    v["quote_pcr_values_missing"] = vector(
        good,
        "the device submits values for PCRs 0, 2, 7 of a quote over 0, 2, 4, 7",
        "invalid",
        pcrs={"sha256": {i: golden["sha256"][i] for i in (0, 2, 7)}},
        policy=policy,
        status="contraindicated",
        codes=["PCR_VALUES_SELECTION_MISMATCH"],
    )
    v["quote_selection_short_of_policy"] = vector(
        short,
        "the TPM quoted PCRs 0, 2, 4 but the policy asks for 0, 2, 4, 7",
        "invalid",
        policy=policy,
        status="contraindicated",
        codes=["PCR_SELECTION_MISMATCH"],
    )
    v["quote_empty_bank_entry"] = vector(
        empty_bank,
        "the signed selection holds an empty sha1 entry; only sha256 values are submitted",
        "valid",
        policy=policy,
        **ok,
    )
    v["quote_pcr4_tampered_boot"] = vector(
        tampered,
        "after a reboot with an extra kernel measured into PCR 4 (boot.sh --tamper)",
        "invalid",
        policy=policy,
        previous=good.clock_state,
        status="contraindicated",
        codes=["PCR_VALUE_NOT_ALLOWED"],
    )
    v["quote_pcr7_not_in_policy"] = vector(
        good,
        "the policy's only PCR 7 reference is another Secure Boot configuration",
        "invalid",
        policy=policy_doc(golden, pcr7="7e" * 32),
        status="contraindicated",
        codes=["PCR_VALUE_NOT_ALLOWED"],
    )
    v["quote_reset_count_rollback"] = vector(
        good,
        "a quote from before a reboot, presented after the post-reboot quote was accepted",
        "invalid",
        policy=policy,
        previous=tampered.clock_state,
        status="contraindicated",
        codes=["RESET_COUNT_ROLLBACK"],
    )
    v["quote_restart_count_rollback"] = vector(
        good,
        "a quote from before a TPM restart (Shutdown/Startup STATE), presented after one "
        "made after it was accepted",
        "invalid",
        policy=policy,
        previous=after_restart.clock_state,
        status="contraindicated",
        codes=["RESTART_COUNT_ROLLBACK"],
    )
    v["quote_clock_replay"] = vector(
        good,
        "the last accepted quote presented again",
        "invalid",
        policy=policy,
        previous=good.clock_state,
        status="contraindicated",
        codes=["CLOCK_NOT_ADVANCING"],
    )
    v["quote_clock_advanced"] = vector(
        after_restart,
        "the next quote after a restart: counters forward, clock forward",
        "valid",
        policy=policy,
        previous=good.clock_state,
        **ok,
    )
    older = dict(good.clock_state, clock=good.clock_state["clock"] - 1)
    older["firmware_version"] += 1
    v["quote_firmware_downgrade"] = vector(
        good,
        "the last accepted quote reported a newer TPM firmware (previous is hand-made)",
        "valid",
        policy=policy,
        previous=older,
        status="warning",
        warnings=["FIRMWARE_DOWNGRADE"],
    )
    v["quote_sha1_signature"] = vector(
        sha1,
        "an AK with an RSASSA-SHA1 scheme: refused unless SHA-1 is allowed",
        "invalid",
        policy=policy,
        status="contraindicated",
        codes=["SIGNATURE_HASH_NOT_ALLOWED"],
    )
    v["quote_sha1_signature_allowed"] = vector(
        sha1,
        "the same SHA-1 quote when the appraisal allows SHA-1",
        "valid",
        policy=policy,
        allow_sha1=True,
        **ok,
    )
    v["quote_truncated"] = vector(
        good,
        "the TPMS_ATTEST lost its last byte",
        "malformed",
        field="quote",
        attest=good.attest[:-1],
    )
    v["quote_trailing_byte"] = vector(
        good,
        "a zero byte after the TPMS_ATTEST",
        "malformed",
        field="quote",
        attest=good.attest + b"\x00",
    )
    v["signature_truncated"] = vector(
        good,
        "the TPMT_SIGNATURE lost its last byte",
        "malformed",
        field="signature",
        signature=good.signature[:-1],
    )
    v["pcrs_wrong_digest_size"] = vector(
        good,
        "a sha256 PCR value of 20 bytes",
        "malformed",
        field="pcrs.sha256.7",
        pcrs={"sha256": {**golden["sha256"], 7: bytes(20)}},
    )
    return v


def write(vectors: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in sorted(vectors.items()):
        path = out / f"{name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        written.append(path)
    return written


def main(argv: Sequence[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    with tempfile.TemporaryDirectory(prefix="attestd-vectors-") as work:
        vectors = make_vectors(Path(work))
    for path in write(vectors, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
