"""`attestd check-quote` through its console script, on quotes made by tpm2-tools.

Exit codes (attestd/cli.py): 0 valid, 1 invalid evidence (reasons printed),
2 unusable arguments or unreadable files.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import forge
import pytest
from cryptography.hazmat.primitives import serialization
from realquotes import GcpQuote
from tpmsim import SimTpm

ATTESTD = Path(sys.executable).parent / "attestd"
NONCE = "0badc0de5eed1e55"
PCR_LIST = "sha256:0,1,2,7"


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.out)  # type: ignore[no-any-return]


def check_quote(*args: str | Path) -> Run:
    proc = subprocess.run(
        [str(ATTESTD), "check-quote", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


class Tools:
    """tpm2-tools against the session TPM, in one working directory.

    There is no resource manager in front of swtpm: every command is followed
    by flushing transient objects and sessions, or the TPM runs out of slots.
    """

    def __init__(self, tpm: SimTpm, workdir: Path) -> None:
        self.dir = workdir
        self.env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+none"}

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            args, cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=60
        )
        for flush in ("-t", "-l", "-s"):
            subprocess.run(
                ["tpm2_flushcontext", flush], cwd=self.dir, env=self.env, capture_output=True
            )
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def path(self, name: str) -> Path:
        return self.dir / name


@pytest.fixture(scope="module")
def tools(sim: SimTpm, tmp_path_factory: pytest.TempPathFactory) -> Tools:
    t = Tools(sim, tmp_path_factory.mktemp("tpm2-tools"))
    t("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    for alg, scheme in (("rsa", "rsassa"), ("ecc", "ecdsa")):
        t(
            "tpm2_createak",
            *("-C", "ek.ctx", "-c", f"ak-{alg}.ctx", "-G", alg, "-g", "sha256", "-s", scheme),
            *("-u", f"ak-{alg}.pub", "-n", f"ak-{alg}.name"),
        )
        t("tpm2_readpublic", "-c", f"ak-{alg}.ctx", "-f", "pem", "-o", f"ak-{alg}.pem")
        t("tpm2_readpublic", "-c", f"ak-{alg}.ctx", "-f", "tss", "-o", f"ak-{alg}.tss")
        for fmt in ("serialized", "values"):
            t(
                "tpm2_quote",
                *("-c", f"ak-{alg}.ctx", "-l", PCR_LIST, "-q", NONCE, "-g", "sha256"),
                *("-m", f"{alg}-{fmt}.msg", "-s", f"{alg}-{fmt}.sig"),
                *("-o", f"{alg}-{fmt}.pcrs", "-F", fmt),
            )
    t(
        "tpm2_quote",
        "-c",
        "ak-rsa.ctx",
        "-l",
        "sha256:0,1+sha1:4,23",
        "-q",
        NONCE,
        "-g",
        "sha256",
        "-m",
        "two-banks.msg",
        "-s",
        "two-banks.sig",
        "-o",
        "two-banks.pcrs",
    )
    t.path("pcrs.yaml").write_text(t("tpm2_pcrread", PCR_LIST))
    return t


def args_for(t: Tools, alg: str = "rsa", fmt: str = "serialized", ak: str = "pem") -> list[Path]:
    return [
        *("--ak", t.path(f"ak-{alg}.{ak}")),
        *("--quote", t.path(f"{alg}-{fmt}.msg")),
        *("--sig", t.path(f"{alg}-{fmt}.sig")),
        *("--pcrs", t.path(f"{alg}-{fmt}.pcrs")),
    ]  # type: ignore[list-item]


def tampered(t: Tools, name: str, index: int) -> Path:
    data = t.path(name).read_bytes()
    out = t.path(f"tampered-{index}-{name}")
    out.write_bytes(forge.flip(data, index if index >= 0 else len(data) + index))
    return out


def replaced(args: list[Path | str], flag: str, value: Path | str) -> list[Path | str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


# --- accepted ---------------------------------------------------------------


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
@pytest.mark.parametrize("ak", ["pem", "tss", "pub"])
def test_tpm2_tools_quote_is_valid(tools: Tools, alg: str, ak: str) -> None:
    run = check_quote(*args_for(tools, alg, ak=ak), "--nonce", NONCE)
    assert (run.rc, run.out.splitlines()[0]) == (0, "quote valid"), run
    assert "!" not in run.out  # no warnings: the nonce was checked


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_pcrs_as_values(tools: Tools, alg: str) -> None:
    run = check_quote(*args_for(tools, alg, "values"), "--nonce", NONCE)
    assert run.rc == 0, run


def test_pcrs_as_pcrread_yaml(tools: Tools) -> None:
    args = replaced(args_for(tools), "--pcrs", tools.path("pcrs.yaml"))
    run = check_quote(*args, "--nonce", NONCE)
    assert run.rc == 0, run


def test_two_banks_in_one_quote(tools: Tools) -> None:
    run = check_quote(
        *("--ak", tools.path("ak-rsa.pem"), "--quote", tools.path("two-banks.msg")),
        *("--sig", tools.path("two-banks.sig"), "--pcrs", tools.path("two-banks.pcrs")),
        *("--nonce", NONCE),
    )
    assert run.rc == 0, run


def test_nonce_with_0x_prefix(tools: Tools) -> None:
    assert check_quote(*args_for(tools), "--nonce", "0x" + NONCE).rc == 0


def test_size_prefixed_quote_message(tools: Tools) -> None:
    msg = tools.path("rsa-serialized.msg").read_bytes()
    prefixed = tools.path("tpm2b.msg")
    prefixed.write_bytes(len(msg).to_bytes(2, "big") + msg)
    args = replaced(args_for(tools), "--quote", prefixed)
    assert check_quote(*args, "--nonce", NONCE).rc == 0


def test_without_nonce_it_warns(tools: Tools) -> None:
    run = check_quote(*args_for(tools))
    assert run.rc == 0, run
    assert "NONCE_NOT_CHECKED" in run.out


def test_required_hash(tools: Tools) -> None:
    assert check_quote(*args_for(tools), "--hash", "sha256").rc == 0
    run = check_quote(*args_for(tools), "--hash", "sha384")
    assert run.rc == 1 and "SIGNATURE_HASH_NOT_ALLOWED" in run.out, run


# --- rejected ---------------------------------------------------------------


def _invalid(run: Run, code: str) -> None:
    assert run.rc == 1, run
    assert run.out.splitlines()[0] == "quote INVALID"
    assert code in run.out, run.out


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_flipped_byte_in_the_message(tools: Tools, alg: str) -> None:
    # The last byte lies in pcrDigest: the message still parses, the signature fails.
    args = replaced(args_for(tools, alg), "--quote", tampered(tools, f"{alg}-serialized.msg", -1))
    _invalid(check_quote(*args, "--nonce", NONCE), "SIGNATURE_INVALID")


@pytest.mark.parametrize("alg", ["rsa", "ecc"])
def test_flipped_byte_in_the_signature(tools: Tools, alg: str) -> None:
    args = replaced(args_for(tools, alg), "--sig", tampered(tools, f"{alg}-serialized.sig", -1))
    _invalid(check_quote(*args, "--nonce", NONCE), "SIGNATURE_INVALID")


def test_flipped_byte_in_the_pcrs(tools: Tools) -> None:
    # tpm2-tools' serialized file: TPML_PCR_SELECTION (132 bytes), a u32 list count,
    # then TPML_DIGEST {u32 count; {u16 size; digest}...}: byte 142 is in PCR 0's value.
    args = replaced(args_for(tools), "--pcrs", tampered(tools, "rsa-serialized.pcrs", 142))
    _invalid(check_quote(*args, "--nonce", NONCE), "PCR_DIGEST_MISMATCH")


def test_changed_value_in_pcrread_yaml(tools: Tools) -> None:
    text = tools.path("pcrs.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("7 :"))
    value = line.split("0x")[1]
    changed = line.replace(value, ("0" if value[0] != "0" else "1") + value[1:])
    yaml_file = tools.path("changed.yaml")
    yaml_file.write_text(text.replace(line, changed))
    args = replaced(args_for(tools), "--pcrs", yaml_file)
    _invalid(check_quote(*args, "--nonce", NONCE), "PCR_DIGEST_MISMATCH")


def test_wrong_nonce(tools: Tools) -> None:
    run = check_quote(*args_for(tools), "--nonce", "0badc0de5eed1e56")
    _invalid(run, "NONCE_MISMATCH")
    assert "expected 0badc0de5eed1e56" in run.out
    assert f"got      {NONCE}" in run.out


def test_quote_checked_with_another_ak(tools: Tools) -> None:
    args = replaced(args_for(tools, "rsa"), "--ak", tools.path("ak-ecc.pem"))
    _invalid(check_quote(*args, "--nonce", NONCE), "SIGNATURE_SCHEME_MISMATCH")


def test_truncated_message_is_malformed(tools: Tools) -> None:
    short = tools.path("short.msg")
    short.write_bytes(tools.path("rsa-serialized.msg").read_bytes()[:40])
    run = check_quote(*replaced(args_for(tools), "--quote", short), "--nonce", NONCE)
    _invalid(run, "MALFORMED")
    assert "quote" in run.out


def test_pcr_values_file_of_the_wrong_size_is_malformed(tools: Tools) -> None:
    values = tools.path("short.pcrs")
    values.write_bytes(tools.path("rsa-values.pcrs").read_bytes()[:-1])
    run = check_quote(*replaced(args_for(tools, "rsa", "values"), "--pcrs", values))
    _invalid(run, "MALFORMED")


def test_pem_ak_on_an_unknown_curve_is_reported_not_a_traceback(tools: Tools) -> None:
    der = forge.SoftKey.ecc().public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # namedCurve prime256v1 (1.2.840.10045.3.1.7) -> 1.2.840.10045.3.1.99
    der = der.replace(bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06082a8648ce3d030163"))
    pem = tools.path("unknown-curve.pem")
    pem.write_bytes(
        b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der) + b"-----END PUBLIC KEY-----\n"
    )
    run = check_quote(*replaced(args_for(tools), "--ak", pem), "--nonce", NONCE)
    assert "Traceback" not in run.err
    _invalid(run, "MALFORMED")


# --- unusable arguments: exit 2 -------------------------------------------------


@pytest.mark.parametrize("flag", ["--ak", "--quote", "--sig", "--pcrs"])
def test_missing_file(tools: Tools, flag: str) -> None:
    run = check_quote(*replaced(args_for(tools), flag, tools.path("no-such-file")))
    assert run.rc == 2, run
    assert "cannot read" in run.err and "no-such-file" in run.err
    assert run.out == ""


@pytest.mark.parametrize("nonce", ["zz", "abc", "0xg0"])
def test_bad_nonce_hex(tools: Tools, nonce: str) -> None:
    run = check_quote(*args_for(tools), "--nonce", nonce)
    assert run.rc == 2, run
    assert "--nonce must be hex" in run.err


def test_bad_hash_name(tools: Tools) -> None:
    run = check_quote(*args_for(tools), "--hash", "md5")
    assert run.rc == 2 and "--hash" in run.err, run


def test_missing_required_argument(tools: Tools) -> None:
    run = check_quote("--ak", tools.path("ak-rsa.pem"))
    assert run.rc == 2, run


# --- --json -----------------------------------------------------------------------


def test_json_for_a_valid_quote(tools: Tools) -> None:
    run = check_quote(*args_for(tools), "--nonce", NONCE, "--json")
    assert run.rc == 0
    doc = run.json()
    assert set(doc) == {
        "status",
        "trustworthiness_vector",
        "failures",
        "warnings",
        "valid",
        "clock",
    }
    assert doc["valid"] is True and doc["status"] == "affirming"
    assert doc["failures"] == [] and doc["warnings"] == []
    assert doc["trustworthiness_vector"]["instance-identity"] == 2
    assert set(doc["clock"]) == {
        "clock",
        "reset_count",
        "restart_count",
        "safe",
        "firmware_version",
    }
    assert doc["clock"]["safe"] is True
    assert all(
        isinstance(doc["clock"][k], int) for k in ("clock", "reset_count", "firmware_version")
    )


def test_json_for_an_invalid_quote(tools: Tools) -> None:
    run = check_quote(*args_for(tools), "--nonce", "00", "--json")
    assert run.rc == 1
    doc = run.json()
    assert doc["valid"] is False and doc["status"] == "contraindicated"
    (failure,) = doc["failures"]
    assert set(failure) == {"code", "subject", "expected", "got", "detail"}
    assert (failure["code"], failure["subject"]) == ("NONCE_MISMATCH", "quote.extraData")
    assert (failure["expected"], failure["got"]) == ("00", NONCE)


def test_json_for_a_malformed_quote(tools: Tools) -> None:
    short = tools.path("short-json.msg")
    short.write_bytes(tools.path("rsa-serialized.msg").read_bytes()[:40])
    run = check_quote(*replaced(args_for(tools), "--quote", short), "--json")
    assert run.rc == 1
    doc = run.json()
    assert doc["valid"] is False
    assert doc["failures"][0]["code"] == "MALFORMED"
    assert doc["failures"][0]["detail"].startswith("quote:")


# --- the real Windows quote (go-attestation test data) -----------------------------


@pytest.fixture(scope="module")
def gcp_files(gcp_quote: GcpQuote, tmp_path_factory: pytest.TempPathFactory) -> list[Path | str]:
    d = tmp_path_factory.mktemp("gcp")
    (d / "ak.tpmt").write_bytes(gcp_quote.ak_public)
    (d / "quote.msg").write_bytes(gcp_quote.quote)
    (d / "quote.sig").write_bytes(gcp_quote.signature)
    lines = ["sha1:"] + [
        f"  {i:<2}: 0x{digest.hex().upper()}"
        for i, digest in sorted(gcp_quote.pcrs["sha1"].items())
    ]
    (d / "pcrs.yaml").write_text("\n".join(lines) + "\n")
    return [
        *("--ak", d / "ak.tpmt", "--quote", d / "quote.msg"),
        *("--sig", d / "quote.sig", "--pcrs", d / "pcrs.yaml"),
    ]


def test_windows_quote_verifies_with_allow_sha1(gcp_files: list[Path | str]) -> None:
    run = check_quote(*gcp_files, "--allow-sha1", "--nonce", "")
    assert run.rc == 0, run
    assert run.out.splitlines()[0] == "quote valid"


def test_windows_quote_is_refused_without_allow_sha1(gcp_files: list[Path | str]) -> None:
    run = check_quote(*gcp_files)
    _invalid(run, "SIGNATURE_HASH_NOT_ALLOWED")
