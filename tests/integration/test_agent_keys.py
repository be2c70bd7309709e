"""The agent's TPM-resident TLS key: made once, certified by the AK, usable by OpenSSL.

Also the renewal loop (``Agent.run`` / ``attestd-agent run``) and handle hygiene.
Tests marked ``needs_server_binding`` need the server half of key binding (``cnf``
in the credential, a client certificate issued); they are skipped until
attestd/service/attestation.py uses attestd/core/certify.py's check.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import REPO, Device, ServerThread, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestd.agent.client import (
    Agent,
    AgentConfig,
    NotAffirmingError,
    RenewalSchedule,
    credential_lifetime_s,
)
from attestd.agent.tpm import TLS_KEY_ATTRS, CertifiedKey, DeviceTpm, tls_key_problem
from attestd.core.certify import check_certified_key, parse_certified_key
from attestd.core.ear import decode_unverified
from attestd.core.tpm import Alg, EccCurve, ObjectAttr, St, parse_attest, parse_public
from attestd.v1 import attestation_pb2

pytestmark = pytest.mark.integration

TPM2_PROVIDER = Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so")
SERVER_BINDS_KEYS = (
    "check_certified_key" in (REPO / "attestd" / "service" / "attestation.py").read_text()
)
needs_server_binding = pytest.mark.skipif(
    not SERVER_BINDS_KEYS,
    reason="the server does not bind credentials to certified keys yet "
    "(attestd/service/attestation.py does not call check_certified_key)",
)
needs_tpm2_provider = pytest.mark.skipif(
    not TPM2_PROVIDER.exists(), reason="tpm2-openssl (the OpenSSL 3 tpm2 provider) not installed"
)
AFFIRMING = 2


# --- helpers ---------------------------------------------------------------


class CertifySpy:
    """Records every (nonce, CertifiedKey) the agent's TPM produced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[bytes, CertifiedKey]] = []
        real = DeviceTpm.certify_tls_key

        def spy(tpm: DeviceTpm, pem: bytes, nonce: bytes, ak_handle: int) -> CertifiedKey:
            out = real(tpm, pem, nonce, ak_handle)
            self.calls.append((nonce, out))
            return out

        monkeypatch.setattr(DeviceTpm, "certify_tls_key", spy)

    @property
    def publics(self) -> list[bytes]:
        return [c.public for _, c in self.calls]


class RequestRecorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps every AttestRequest sent through the channel it intercepts."""

    def __init__(self) -> None:
        self.attests: list[attestation_pb2.AttestRequest] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if isinstance(request, attestation_pb2.AttestRequest):
            self.attests.append(request)
        return continuation(details, request)


def recording(waits: list[float]) -> Callable[[float], bool]:
    """A `wait` for Agent.run that returns at once, noting how long it was asked to wait."""

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    return wait


def ak_public(dev: Device) -> bytes:
    with DeviceTpm(dev.tpm.tcti) as tpm:
        public = tpm.ak_public()
    assert public is not None
    return public


def transient_handles(tcti: str) -> str:
    out = subprocess.run(
        ["tpm2_getcap", "-T", tcti, "handles-transient"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TSS2_LOG": "all+none"},
    )
    return out.stdout.strip()


def key_public(dev: Device) -> ec.EllipticCurvePublicKey:
    """The TLS key's public key, from the TPM2B_PUBLIC inside the saved TSS2 PEM."""
    from tpm2_pytss.tsskey import TSSPrivKey

    pem = (dev.state_dir / "tls-key.pem").read_bytes()
    public = parse_public(bytes(TSSPrivKey.from_pem(pem).public.marshal())).public_key
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def certificate_for(public: ec.EllipticCurvePublicKey, path: Path) -> Path:
    """A certificate for `public` from a throwaway CA (what attestd would issue)."""
    ca = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test device")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(ca, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_env(tmp_path: Path, tcti: str) -> dict[str, str]:
    """Environment for a process whose OpenSSL loads TSS2 keys through the TPM.

    The tpm2 provider is listed first: OpenSSL 3.0 then takes its ECDSA for TPM keys
    (with the default provider first it picks the software ECDSA, which gets only the
    public half and fails with "missing private key").
    """
    conf = tmp_path / "openssl-tpm2.cnf"
    conf.write_text(
        textwrap.dedent(
            """\
            openssl_conf = openssl_init
            [openssl_init]
            providers = provider_sect
            [provider_sect]
            tpm2 = tpm2_sect
            default = default_sect
            [tpm2_sect]
            activate = 1
            [default_sect]
            activate = 1
            """
        )
    )
    return {
        **os.environ,
        "OPENSSL_CONF": str(conf),
        "TPM2OPENSSL_TCTI": tcti,
        "TSS2_LOG": "all+none",
    }


LOAD_CHAIN = textwrap.dedent(
    """\
    import ssl, sys
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    except ssl.SSLError as e:
        print(e.reason or e)
        sys.exit(1)
    print("loaded")
    """
)


def load_cert_chain(env: dict[str, str], cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """python ssl's load_cert_chain in a child process (the provider config is per process)."""
    return subprocess.run(
        [sys.executable, "-c", LOAD_CHAIN, str(cert), str(key)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def agent_args(dev: Device, server: ServerThread | None = None) -> list[str]:
    return [
        "--server",
        (server or dev.server).address,
        "--tcti",
        dev.tpm.tcti,
        "--state-dir",
        str(dev.state_dir),
    ]


# --- the key ----------------------------------------------------------------


def test_key_made_once_and_reused_across_attestations_restarts_and_reboots(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = CertifySpy(monkeypatch)
    key_file = device.state_dir / "tls-key.pem"
    assert not key_file.exists()

    for _ in range(2):
        resp = device.agent.attest()
        assert resp.verdict.status == AFFIRMING, resp.verdict
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert tls_key_problem(pem) is None

    # A new agent process on the same state dir: same key file, same key.
    restarted = Agent(device.server.agent_config(device.tpm.tcti, device.state_dir))
    try:
        assert restarted.attest().verdict.status == AFFIRMING
        # A reboot (TPM reset, measured boot again): the wrapped key still loads.
        device.tpm.powercycle()
        device.tpm.boot()
        assert restarted.attest().verdict.status == AFFIRMING
    finally:
        restarted.close()
    assert key_file.read_bytes() == pem
    assert len(spy.publics) == 4
    assert len(set(spy.publics)) == 1


def test_certification_is_what_attestd_checks(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core check attestd runs (certify.py) accepts what the agent sends."""
    spy = CertifySpy(monkeypatch)
    device.agent.attest()
    ((nonce, certified),) = spy.calls
    ak = parse_public(ak_public(device))
    evidence = parse_certified_key(certified.public, certified.certify_info, certified.signature)
    assert check_certified_key(evidence, ak, nonce) is None

    attest = parse_attest(certified.certify_info, "certify_info")
    assert attest.type == St.ATTEST_CERTIFY
    assert attest.extra_data == nonce
    assert attest.certified_name == parse_public(certified.public).name
    # Over another nonce it is no longer acceptable.
    failure = check_certified_key(evidence, ak, bytes(len(nonce)))
    assert failure is not None and "NONCE" in str(failure.code)


def test_key_attributes(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = CertifySpy(monkeypatch)
    device.agent.attest()
    public = parse_public(spy.publics[0], "tls key")
    assert public.type == Alg.ECC
    assert public.curve == EccCurve.NIST_P256
    assert public.scheme == Alg.ECDSA and public.scheme_hash == Alg.SHA256
    assert public.name_alg == Alg.SHA256
    for attr in (
        ObjectAttr.FIXED_TPM,
        ObjectAttr.FIXED_PARENT,
        ObjectAttr.SENSITIVE_DATA_ORIGIN,
        ObjectAttr.SIGN,
        ObjectAttr.USER_WITH_AUTH,
    ):
        assert public.has(attr), attr
    assert not public.has(ObjectAttr.RESTRICTED)
    assert not public.has(ObjectAttr.DECRYPT)
    assert int(public.attributes) == int(TLS_KEY_ATTRS)


def test_no_key_binding_sends_no_key(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = CertifySpy(monkeypatch)
    recorder = RequestRecorder()
    monkeypatch.setattr(
        device.agent, "channel", grpc.intercept_channel(device.agent.channel, recorder)
    )
    sent = recorder.attests
    resp = device.agent.attest(bind_key=False)
    assert resp.verdict.status == AFFIRMING
    assert not spy.calls
    assert not sent[0].HasField("certified_key")
    assert not (device.state_dir / "tls-key.pem").exists()

    device.agent.attest()
    assert sent[1].HasField("certified_key")
    assert sent[1].certified_key.public == spy.publics[0]

    out = run_cli(
        *agent_args(device), "attest", "--no-event-log", "--no-key-binding", tool="attestd-agent"
    )
    assert out.returncode == 0, out.stderr
    assert "client certificate" not in out.stdout and "TPM key" not in out.stdout


def test_unusable_key_file_is_replaced(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpm2_pytss.tsskey import TSSPrivKey

    spy = CertifySpy(monkeypatch)
    key_file = device.state_dir / "tls-key.pem"
    key_file.write_bytes(b"-----BEGIN TSS2 PRIVATE KEY-----\nnot base64\n")
    assert device.agent.attest().verdict.status == AFFIRMING
    made = key_file.read_bytes()
    assert tls_key_problem(made) is None

    # A TPM key, but not one the agent would make (tpm2-pytss' default template has noDA).
    with DeviceTpm(device.tpm.tcti) as tpm:
        other = bytes(TSSPrivKey.create_ecc(tpm.ectx).to_pem())
    assert tls_key_problem(other) is not None
    key_file.write_bytes(other)
    assert device.agent.attest().verdict.status == AFFIRMING
    assert key_file.read_bytes() not in (other, made)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(spy.calls) == 2
    assert transient_handles(device.tpm.tcti) == ""


def test_key_from_another_tpm_is_replaced(
    device: Device, device_factory: Callable[..., Device], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = device_factory(enroll=False, boot=False)
    with DeviceTpm(other.tpm.tcti) as tpm:
        foreign = tpm.create_tls_key()
    key_file = device.state_dir / "tls-key.pem"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(foreign)
    spy = CertifySpy(monkeypatch)
    assert device.agent.attest().verdict.status == AFFIRMING
    assert key_file.read_bytes() != foreign
    assert tls_key_problem(key_file.read_bytes()) is None
    assert len(spy.calls) == 1  # the failed load made no certification
    assert transient_handles(device.tpm.tcti) == ""


# --- OpenSSL ------------------------------------------------------------------


@needs_tpm2_provider
def test_tss2_key_loads_in_python_ssl_with_the_tpm2_provider(
    device: Device, tmp_path: Path
) -> None:
    device.agent.attest()
    key = device.state_dir / "tls-key.pem"
    env = openssl_env(tmp_path, device.tpm.tcti)

    good = certificate_for(key_public(device), tmp_path / "cert.pem")
    out = load_cert_chain(env, good, key)
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stdout + out.stderr

    # Control: OpenSSL really compares the TPM key with the certificate.
    stranger = certificate_for(ec.generate_private_key(ec.SECP256R1()).public_key(), tmp_path / "x")
    out = load_cert_chain(env, stranger, key)
    assert out.returncode == 1 and "MISMATCH" in out.stdout.upper(), out.stdout + out.stderr
    assert transient_handles(device.tpm.tcti) == ""


@needs_tpm2_provider
def test_tss2_key_signs_through_openssl(device: Device, tmp_path: Path) -> None:
    """OpenSSL signs with the key inside the TPM; the signature verifies with its public key."""
    device.agent.attest()
    env = openssl_env(tmp_path, device.tpm.tcti)
    message = tmp_path / "message"
    message.write_bytes(b"attestd")
    signature = tmp_path / "signature"
    out = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-sign",
            str(device.state_dir / "tls-key.pem"),
            "-out",
            str(signature),
            str(message),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    key_public(device).verify(
        signature.read_bytes(), b"attestd", ec.ECDSA(hashes.SHA256())
    )  # raises InvalidSignature otherwise
    assert transient_handles(device.tpm.tcti) == ""


# --- handles -------------------------------------------------------------------


def test_no_transient_handles_leak(device: Device) -> None:
    for _ in range(5):
        assert device.agent.attest().verdict.status == AFFIRMING
    assert device.agent.attest(bind_key=False).verdict.status == AFFIRMING
    device.agent.run(max_renewals=2, wait=lambda _s: False)
    out = run_cli(*agent_args(device), "attest", "--no-event-log", tool="attestd-agent")
    assert out.returncode == 0, out.stderr
    assert transient_handles(device.tpm.tcti) == ""


# --- the renewal loop: schedule -------------------------------------------------


def test_renewal_delay_is_80_percent_with_5_percent_jitter() -> None:
    s = RenewalSchedule()
    assert s.renewal_delay(1000, lambda: 0.5) == pytest.approx(800)
    assert s.renewal_delay(1000, lambda: 0.0) == pytest.approx(760)
    assert s.renewal_delay(1000, lambda: 1.0) == pytest.approx(840)
    delays = [s.renewal_delay(3600) for _ in range(500)]
    assert all(0.76 * 3600 <= d <= 0.84 * 3600 for d in delays)
    assert max(delays) - min(delays) > 100  # it does spread


def test_retry_backoff_doubles_up_to_a_cap() -> None:
    s = RenewalSchedule(backoff_s=2, backoff_max_s=20, jitter=0)
    assert [s.retry_delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 20, 20]


def _response(iat: int, exp: int, expires_at_ms: int) -> attestation_pb2.AttestResponse:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    token = f"{part({'alg': 'ES256'})}.{part({'iat': iat, 'exp': exp})}.sig"
    return attestation_pb2.AttestResponse(credential=token, credential_expires_at_ms=expires_at_ms)


def test_credential_lifetime_is_immune_to_a_slow_device_clock() -> None:
    # Issued at server time 10_000 for an hour.
    resp = _response(10_000, 13_600, 13_600_000)
    assert credential_lifetime_s(resp, now_s=10_000) == 3600
    # Device clock an hour behind: local arithmetic would say two hours; exp - iat wins.
    assert credential_lifetime_s(resp, now_s=6_400) == 3600
    # Device clock 10 minutes ahead: renew by the local expiry, earlier.
    assert credential_lifetime_s(resp, now_s=10_600) == 3000
    # Device clock far ahead (local expiry passed): still the issued lifetime.
    assert credential_lifetime_s(resp, now_s=20_000) == 3600
    assert credential_lifetime_s(attestation_pb2.AttestResponse(), now_s=0) is None


# --- the renewal loop: against the real server -----------------------------------


def test_run_renews_at_80_percent_with_a_fake_clock(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = CertifySpy(monkeypatch)
    waits: list[float] = []
    seen: list[tuple[int, float | None]] = []
    last = device.agent.run(
        max_renewals=3,
        wait=recording(waits),
        on_attested=lambda r, nxt: seen.append((r.verdict.status, nxt)),
    )
    assert last is not None and last.verdict.status == AFFIRMING
    assert len(seen) == 4 and all(status == AFFIRMING for status, _ in seen)
    assert seen[-1][1] is None
    assert len(waits) == 3
    # Default lifetime one hour: about 2880 s (the local view may be up to 1 s shorter).
    assert all(0.76 * 3599 <= w <= 0.84 * 3600 for w in waits), waits
    assert len(spy.calls) == 4 and len(set(spy.publics)) == 1
    assert (device.state_dir / "credential.jwt").read_text() == last.credential


def test_run_with_a_two_second_credential_really_renews(
    server_factory: Callable[..., ServerThread], device_factory: Callable[..., Device]
) -> None:
    short = server_factory(credential_lifetime_s=2)
    dev = device_factory(target=short)
    short.put_policy(dev.golden_policy())
    credentials: list[str] = []
    stamps: list[float] = []

    def attested(resp: attestation_pb2.AttestResponse, _next: float | None) -> None:
        credentials.append(resp.credential)
        stamps.append(time.monotonic())

    dev.agent.run(max_renewals=2, on_attested=attested)
    assert len(credentials) == 3 and len(set(credentials)) == 3
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # 80% of (at most) 2 s, ±5%, counted from when the credential arrived.
    assert all(0.5 <= g <= 1.9 for g in gaps), gaps
    for token in credentials:
        claims = decode_unverified(token)
        assert claims["exp"] - claims["iat"] == 2


def test_run_stops_when_told(device: Device) -> None:
    stop = threading.Event()
    seen: list[float | None] = []

    def attested(_r: attestation_pb2.AttestResponse, nxt: float | None) -> None:
        seen.append(nxt)
        stop.set()  # as a SIGTERM would, while it waits for the next renewal

    started = time.monotonic()
    last = device.agent.run(stop=stop, on_attested=attested)
    assert last is not None and len(seen) == 1 and seen[0] is not None and seen[0] > 2000
    assert time.monotonic() - started < 30


def test_run_retries_with_backoff_then_recovers(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attestd.agent.tpm import AgentError

    real = Agent.attest
    calls = {"n": 0}

    def flaky(self: Agent, *args: Any, **kwargs: Any) -> attestation_pb2.AttestResponse:
        calls["n"] += 1
        if calls["n"] in (1, 2, 4):
            raise AgentError("the TPM is busy")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Agent, "attest", flaky)
    waits: list[float] = []
    schedule = RenewalSchedule(retries=2, backoff_s=1, jitter=0)
    last = device.agent.run(max_renewals=1, schedule=schedule, wait=recording(waits))
    assert last is not None and last.verdict.status == AFFIRMING
    # fail, fail, ok (renewal wait), fail (the count started over), ok.
    assert calls["n"] == 5
    assert waits[:2] == [1, 2] and waits[3] == 1
    assert 0.8 * 3599 <= waits[2] <= 0.8 * 3600


def test_run_gives_up_on_an_unreachable_server(device: Device) -> None:
    agent = Agent(
        AgentConfig(
            server="127.0.0.1:9", tcti=device.tpm.tcti, state_dir=device.state_dir, timeout_s=2
        )
    )
    waits: list[float] = []
    try:
        with pytest.raises(grpc.RpcError) as info:
            agent.run(
                schedule=RenewalSchedule(retries=3, backoff_s=2, jitter=0),
                wait=recording(waits),
            )
    finally:
        agent.close()
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert waits == [2, 4, 8]


def test_run_gives_up_on_a_verdict_that_stays_bad(device: Device) -> None:
    device.tpm.boot()  # measured again on top: PCRs no longer the golden ones
    waits: list[float] = []
    with pytest.raises(NotAffirmingError) as info:
        device.agent.run(
            schedule=RenewalSchedule(retries=1, backoff_s=5, jitter=0),
            wait=recording(waits),
        )
    assert info.value.response.verdict.status == 4  # contraindicated
    assert waits == [5]
    assert not (device.state_dir / "credential.jwt").exists()


def test_cli_run_logs_each_renewal(
    server_factory: Callable[..., ServerThread],
    device_factory: Callable[..., Device],
) -> None:
    short = server_factory(credential_lifetime_s=2)
    dev = device_factory(target=short)
    short.put_policy(dev.golden_policy())
    started = time.monotonic()
    out = run_cli(
        *agent_args(dev), "run", "--no-event-log", "--max-renewals", "2", tool="attestd-agent"
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("attested: AFFIRMING")]
    assert len(lines) == 3, out.stdout
    assert all("next renewal in" in ln for ln in lines[:2]) and lines[2].endswith("done")
    assert str(dev.state_dir / "credential.jwt") in lines[0]
    assert 1.0 <= elapsed <= 60

    out = run_cli(*agent_args(dev), "run", "--once", "--no-event-log", tool="attestd-agent")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("attested: AFFIRMING") == 1
    assert transient_handles(dev.tpm.tcti) == ""


def test_cli_run_stops_on_sigterm(device: Device) -> None:
    exe = Path(sys.executable).parent / "attestd-agent"
    proc = subprocess.Popen(
        [str(exe), *agent_args(device), "run", "--no-event-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TSS2_LOG": "all+none", "ATTESTD_CA_CERT": str(device.server.ca_cert)},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("attested: AFFIRMING"), first + proc.stderr.read()
        assert "next renewal in" in first
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert rest.strip() == "stopped"
    assert transient_handles(device.tpm.tcti) == ""


def test_cli_attest_says_where_the_key_is(device: Device) -> None:
    out = run_cli(*agent_args(device), "attest", "--no-event-log", tool="attestd-agent")
    assert out.returncode == 0, out.stderr
    assert str(device.state_dir / "tls-key.pem") in out.stdout
    assert (device.state_dir / "tls-key.pem").exists()
    out = run_cli(*agent_args(device), "attest", "--no-event-log", "--json", tool="attestd-agent")
    doc = json.loads(out.stdout)
    assert doc["tls_key_path"] == str(device.state_dir / "tls-key.pem")


# --- with the server half of key binding ---------------------------------------------


def _thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of a P-256 key."""
    n = public.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": base64.urlsafe_b64encode(n.x.to_bytes(32, "big")).decode().rstrip("="),
        "y": base64.urlsafe_b64encode(n.y.to_bytes(32, "big")).decode().rstrip("="),
    }
    digest = hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode())
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


@needs_server_binding
def test_credential_is_bound_and_a_client_certificate_issued(device: Device) -> None:
    resp = device.agent.attest()
    assert resp.verdict.status == AFFIRMING
    assert resp.client_certificate
    cert_file = device.state_dir / "client-cert.pem"
    assert cert_file.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert cert.public_bytes(serialization.Encoding.DER) == resp.client_certificate
    ours = key_public(device)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert cert.public_key().public_bytes(der, spki) == ours.public_bytes(der, spki)

    cnf = decode_unverified(resp.credential)["cnf"]
    matched = []
    if "jwk" in cnf:
        n = ours.public_numbers()
        x = base64.urlsafe_b64decode(cnf["jwk"]["x"] + "==")
        y = base64.urlsafe_b64decode(cnf["jwk"]["y"] + "==")
        assert (int.from_bytes(x, "big"), int.from_bytes(y, "big")) == (n.x, n.y)
        matched.append("jwk")
    if "jkt" in cnf:
        assert cnf["jkt"] == _thumbprint(ours)
        matched.append("jkt")
    if "x5t#S256" in cnf:
        digest = hashlib.sha256(resp.client_certificate).digest()
        assert cnf["x5t#S256"] == base64.urlsafe_b64encode(digest).decode().rstrip("=")
        matched.append("x5t#S256")
    assert matched, cnf

    # Unbound attestation: no cnf, no certificate, and the old one is not left lying around.
    plain = device.agent.attest(bind_key=False)
    assert "cnf" not in decode_unverified(plain.credential)
    assert not plain.client_certificate
    assert not cert_file.exists()


@needs_server_binding
def test_each_renewal_brings_a_new_certificate_for_the_same_key(device: Device) -> None:
    first = device.agent.attest()
    second = device.agent.attest()
    assert first.client_certificate and second.client_certificate
    assert first.client_certificate != second.client_certificate
    a = x509.load_der_x509_certificate(first.client_certificate).public_key()
    b = x509.load_der_x509_certificate(second.client_certificate).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert a.public_bytes(der, spki) == b.public_bytes(der, spki)
    saved = x509.load_pem_x509_certificate((device.state_dir / "client-cert.pem").read_bytes())
    assert saved.public_bytes(der) == second.client_certificate


@needs_server_binding
@needs_tpm2_provider
def test_issued_certificate_and_tss2_key_load_in_python_ssl(device: Device, tmp_path: Path) -> None:
    out = run_cli(*agent_args(device), "attest", "--no-event-log", tool="attestd-agent")
    assert out.returncode == 0, out.stderr
    cert = device.state_dir / "client-cert.pem"
    key = device.state_dir / "tls-key.pem"
    assert f"client certificate saved to {cert}" in out.stdout
    assert str(key) in out.stdout
    loaded = load_cert_chain(openssl_env(tmp_path, device.tpm.tcti), cert, key)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert transient_handles(device.tpm.tcti) == ""
