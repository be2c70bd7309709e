"""Appraisal of a TPM2 quote: the checks of DESIGN.md "What Attest must check".

Everything arrives as arguments: the evidence bytes, the nonce this server
issued, the enrolled AK (parsed once at enrollment), the policy, the device's
last accepted clock state and the time. Nothing here does I/O.

Order matters and follows the trust it establishes:

1. structure (TPMS_ATTEST magic and type; Part 2, 10.12.12),
2. the signature by the enrolled AK (scheme fits the key, hash allowed),
   and only over authenticated bytes, from here on:
3. freshness (extraData equals the nonce, constant-time),
4. the signed pcrSelect equals the policy's selection and the submitted
   values' selection; the pcrDigest recomputed from the submitted values
   equals the signed one,
5. the values are among the policy's reference digests,
6. clock: safe, resetCount/restartCount never backwards, clock advancing,
   firmwareVersion not downgraded.

A failure at 1-2 stops the appraisal: nothing in unauthenticated bytes is
worth judging.

_appraise_quote_full does these checks one by one and names every failure. The
usual, good case is decided first by a fast path in appraise_quote (the same
checks, in the same order, with data derived once per policy and per AK) that
can only conclude "affirming, every check passed"; anything else goes to the full
path. tests/unit/core/test_quote_fastpath.py holds the two to equal results.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hmac
import operator
import types
from collections.abc import Mapping
from dataclasses import dataclass, replace
from operator import countOf
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestd.core import verdict as v
from attestd.core.errors import MalformedError
from attestd.core.eventlog import EventLog
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.measuredboot import appraise_boot
from attestd.core.policy import Policy
from attestd.core.tpm import (
    BANK_BY_NAME,
    PCR_COUNT,
    TPM_GENERATED_VALUE,
    Alg,
    Attest,
    Bank,
    PublicArea,
    Selection,
    Signature,
    St,
    _parse_attest_checked,
    _parse_quote_fast,
    _parse_signature_checked,
    alg_name,
    crypto_hash,
    fast_maker,
    parse_attest,
    parse_signature,
    pcr_digest,
)
from attestd.core.verdict import Code, Failure, TrustVector, Verdict

# PC Client PFP: PCRs 1, 3, 5 and 7 hold configuration; the others code.
CONFIG_PCRS = frozenset({1, 3, 5, 7})
# Boot-state findings about platform configuration rather than loaded code.
CONFIGURATION_CODES = frozenset({Code.SECURE_BOOT_DISABLED, Code.DBX_MISSING_HASH})
STRONG_HASHES = frozenset({Alg.SHA256, Alg.SHA384, Alg.SHA512})
# Hashes a signature may use, by whether SHA-1 is allowed.
_OK_HASHES = {False: STRONG_HASHES, True: STRONG_HASHES | {Alg.SHA1}}
# Signature schemes that fit a key type.
_FITTING_SCHEMES = {Alg.RSA: (Alg.RSASSA, Alg.RSAPSS), Alg.ECC: (Alg.ECDSA,)}
_PCR_INDICES = frozenset(range(PCR_COUNT))
_DIGEST_SIZES = {bank.value: bank.digest_size for bank in Bank}
# Enum members looked up once: each Enum class attribute access is a Python-level call.
_NULL, _RSASSA, _ATTEST_QUOTE = Alg.NULL, Alg.RSASSA, St.ATTEST_QUOTE
_ACCEPTED = (v.Status.AFFIRMING, v.Status.WARNING)
_ALG_ID = {bank: bank.alg.value for bank in Bank}
# Stateless padding and signature-algorithm objects, made once instead of per quote.
_PKCS1V15 = padding.PKCS1v15()
_ECDSA_BY_HASH: dict[int, ec.ECDSA] = {}
_NO_CLAIMS = TrustVector()
_SIGNATURE_INVALID = Failure(
    Code.SIGNATURE_INVALID,
    "signature",
    detail="the signature does not verify with the device's attestation key",
)
# The trust vector an appraisal starts from, with and without a policy (frozen: shared).
_FRESH_TRUST_VECTOR = {
    has_policy: TrustVector(
        instance_identity=v.TRUSTWORTHY_INSTANCE,
        hardware=v.GENUINE_HARDWARE,
        configuration=v.APPROVED_CONFIG if has_policy else v.NO_CLAIM,
        executables=v.APPROVED_BOOT if has_policy else v.NO_CLAIM,
    )
    for has_policy in (False, True)
}
# The usual outcome is the fresh vector with a policy, unchanged: its status, once.
_POLICY_START = _FRESH_TRUST_VECTOR[True]
_POLICY_START_STATUS = _POLICY_START.status

PcrValues = Mapping[Bank, Mapping[int, bytes]]


@dataclass(frozen=True, slots=True)
class ClockState:
    """What the last accepted quote said about the TPM's clock and firmware."""

    reset_count: int
    restart_count: int
    clock: int
    firmware_version: int

    @classmethod
    def of(cls, attest: Attest) -> ClockState:
        ci = attest.clock_info
        return cls(ci.reset_count, ci.restart_count, ci.clock, attest.firmware_version)


@dataclass(frozen=True, slots=True)
class QuoteEvidence:
    """Parsed, bounded evidence: nothing in it has been judged yet."""

    attest: Attest
    signature: Signature
    message: bytes  # the signed TPMS_ATTEST bytes
    pcrs: PcrValues


@dataclass(frozen=True, slots=True)
class Appraisal:
    verdict: Verdict
    evidence: QuoteEvidence
    # The clock state to remember as "last accepted", or None when not accepted.
    accepted_clock: ClockState | None
    # The boot state the event log shows (when a log was sent and agreed with the quote).
    boot_state: dict[str, Any] | None = None
    # Whether the signature vouches for the submitted PCR values.
    values_verified: bool = False


_NEW_QUOTE_EVIDENCE = fast_maker(QuoteEvidence)
_NEW_APPRAISAL = fast_maker(Appraisal)
_NEW_CLOCK_STATE = fast_maker(ClockState)
_NEW_VERDICT = fast_maker(Verdict)


def parse_evidence(
    quote: bytes,
    signature: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    limits: Limits = DEFAULT_LIMITS,
) -> QuoteEvidence:
    """Parse quote, signature and PCR values; raise MalformedError naming the field."""
    if type(quote) is bytes:
        message = quote
        attest = _parse_quote_fast(quote, limits)
        if attest is None:
            attest = _parse_attest_checked(quote, "quote", limits)
    else:
        attest = parse_attest(quote, "quote", limits)
        message = bytes(quote)
    sig = parse_signature(signature, "signature", limits)
    # The usual values: known bank names, each once, every index 0-23, every value bytes
    # of the bank's size. Anything else goes to _pcr_values, which names the first fault.
    values: dict[Bank, dict[int, bytes]] | None = None
    if type(pcrs) is dict and len(pcrs) <= limits.max_banks_per_request:
        values = {}
        for bank_name, bank_values in pcrs.items():
            bank = BANK_BY_NAME.get(bank_name)
            if bank is None or bank in values or type(bank_values) is not dict:
                values = None
                break
            digests = bank_values.values()
            count = len(digests)
            if not (
                countOf(map(type, digests), bytes) == count
                and countOf(map(len, digests), _DIGEST_SIZES[bank_name]) == count
                and _PCR_INDICES.issuperset(bank_values)
            ):
                values = None
                break
            values[bank] = bank_values.copy()  # bytes(d) is d for bytes
    if values is None:
        values = _pcr_values(pcrs, limits)
    evidence = _NEW_QUOTE_EVIDENCE()
    evidence.attest = attest
    evidence.signature = sig
    evidence.message = message
    evidence.pcrs = values
    evidence.__class__ = QuoteEvidence
    return evidence  # type: ignore[no-any-return]  # a fast_maker object


def _parse_evidence_reference(
    quote: bytes,
    signature: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    limits: Limits = DEFAULT_LIMITS,
) -> QuoteEvidence:
    """parse_evidence without its fast paths: every field parsed step by step (the
    reference the tests hold parse_evidence to)."""
    attest = _parse_attest_checked(quote, "quote", limits)
    sig = _parse_signature_checked(signature, "signature", limits)
    return QuoteEvidence(attest, sig, bytes(quote), _pcr_values(pcrs, limits, fast=False))


def _pcr_values(
    pcrs: Mapping[str, Mapping[int, bytes]], limits: Limits, *, fast: bool = True
) -> dict[Bank, dict[int, bytes]]:
    if len(pcrs) > limits.max_banks_per_request:
        raise MalformedError(f"more than {limits.max_banks_per_request} banks", field="pcrs")
    values: dict[Bank, dict[int, bytes]] = {}
    for bank_name, bank_values in pcrs.items():
        bank = BANK_BY_NAME.get(bank_name)
        if bank is None:
            try:
                bank = Bank.parse(bank_name)
            except ValueError as e:
                raise MalformedError(str(e), field=f"pcrs.{bank_name}") from None
        if bank in values:
            raise MalformedError("bank given twice", field=f"pcrs.{bank_name}")
        if fast and type(bank_values) is dict:
            # Every index 0-23, every value bytes of the bank's size: then the loop below
            # would copy nothing and find nothing. Otherwise it checks (and names the
            # first fault).
            digests = bank_values.values()
            if (
                {bytes}.issuperset(map(type, digests))
                and {bank.digest_size}.issuperset(map(len, digests))
                and bank_values.keys() <= _PCR_INDICES
            ):
                values[bank] = dict(bank_values)
                continue
        checked: dict[int, bytes] = {}
        for index, digest in bank_values.items():
            where = f"pcrs.{bank.value}.{index}"
            if not 0 <= index < PCR_COUNT:
                raise MalformedError("PCR index must be 0-23", field=where)
            if len(digest) != bank.digest_size:
                raise MalformedError(
                    f"a {bank.value} PCR value is {bank.digest_size} bytes, got {len(digest)}",
                    field=where,
                )
            checked[index] = bytes(digest)
        values[bank] = checked
    return values


def verify_signature(
    public: PublicArea, sig: Signature, message: bytes, *, allow_sha1: bool
) -> Failure | None:
    """Check that ``sig`` over ``message`` is the key's, with an acceptable scheme.

    Returns the failure, or None when the signature is good. (Named failures
    rather than a bool: the caller reports which rule broke.)
    """
    allowed = _FITTING_SCHEMES[public.type]
    if sig.alg not in allowed or (public.scheme != _NULL and sig.alg != public.scheme):
        return Failure(
            Code.SIGNATURE_SCHEME_MISMATCH,
            "signature.sigAlg",
            expected=alg_name(public.scheme if public.scheme != Alg.NULL else allowed[0]),
            got=alg_name(sig.alg),
            detail="the signature scheme does not fit the attestation key",
        )
    if (
        public.scheme != _NULL
        and public.scheme_hash is not None
        and sig.hash_alg != public.scheme_hash
    ):
        return Failure(
            Code.SIGNATURE_SCHEME_MISMATCH,
            "signature.hash",
            expected=alg_name(public.scheme_hash),
            got=alg_name(sig.hash_alg),
            detail="the signature hash differs from the key's scheme",
        )
    ok_hashes = _OK_HASHES[bool(allow_sha1)]
    if sig.hash_alg not in ok_hashes:
        return Failure(
            Code.SIGNATURE_HASH_NOT_ALLOWED,
            "signature.hash",
            expected="/".join(sorted(alg_name(a) for a in ok_hashes)),
            got=alg_name(sig.hash_alg),
            detail="SHA-1 needs a policy that allows it" if sig.hash_alg == Alg.SHA1 else "",
        )
    h = crypto_hash(sig.hash_alg)
    key = public.public_key
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                _PKCS1V15
                if sig.alg == _RSASSA
                else padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)
            )
            key.verify(sig.sig, message, pad, h)
        else:
            ecdsa = _ECDSA_BY_HASH.get(sig.hash_alg)
            if ecdsa is None:
                ecdsa = _ECDSA_BY_HASH[sig.hash_alg] = ec.ECDSA(h)
            key.verify(encode_dss_signature(sig.r, sig.s), message, ecdsa)
    except (InvalidSignature, ValueError):
        return _SIGNATURE_INVALID
    return None


def describe_selection(selection: Mapping[Bank, frozenset[int]]) -> str:
    return " ".join(
        f"{bank.value}:{','.join(str(i) for i in sorted(idx))}"
        for bank, idx in sorted(selection.items(), key=lambda kv: kv[0].alg.value)
    )


def _canonical(selection: Selection) -> dict[Bank, frozenset[int]] | None:
    """Selection as {bank: indices}, or None when it repeats or names an unknown bank."""
    out: dict[Bank, frozenset[int]] = {}
    for alg, indices in selection:
        try:
            bank = Bank.from_alg(alg)
        except ValueError:
            return None
        if bank in out:
            return None
        if indices:
            out[bank] = indices
    return out


def _selection_is(
    signed: Mapping[Bank, frozenset[int]],
    by_bank: Mapping[Bank, Mapping[int, object]],
    *,
    keep_empty: bool,
) -> bool:
    """signed == {bank: frozenset(m) for bank, m in by_bank.items() if keep_empty or m},
    without building that dict (a frozenset equals a keys view with the same members)."""
    listed = 0
    for bank, m in by_bank.items():
        if not (keep_empty or m):
            continue
        indices = signed.get(bank)
        if indices is None or indices != m.keys():
            return False
        listed += 1
    return listed == len(signed)


# --- the fast path's derived data ---------------------------------------------

# The attribute under which a Policy or a PublicArea keeps what the fast path derives
# from it, once: both are frozen (a Policy's mappings included, by contract), and this
# is no field, so == and repr ignore it; a copy made by dataclasses.replace derives anew.
_FAST = "_quote_fast"
_set = object.__setattr__
_ATTEST_QUOTE_VALUE = int(St.ATTEST_QUOTE)
_SHA1_VALUE = int(Alg.SHA1)
_compare_digest = hmac.compare_digest


class _Unchecked(enum.Enum):
    UNCHECKED = 0


_UNCHECKED = _Unchecked.UNCHECKED


class _FastPolicy:
    """What the fast path needs of a policy, derived once per Policy object.

    ``selection`` is None when the fast path never applies (event-log rules, an empty
    bank, no PCRs). ``expected`` is the only allowed values, when the policy allows
    exactly one per PCR (then their PCR digest per hash, ``digests``, is known).
    """

    __slots__ = (
        "banks",
        "digests",
        "expected",
        "name",
        "seen_selection",
        "selection",
        "sha1_ok",
    )

    def __init__(self, policy: Policy) -> None:
        pcrs = policy.pcrs
        self.sha1_ok = bool(policy.allow_sha1)
        self.banks = tuple((bank, bank.alg.value, refs) for bank, refs in pcrs.items())
        eligible = bool(pcrs) and all(pcrs.values()) and not policy.eventlog.any
        self.selection: Selection | None = policy.selection() if eligible else None
        self.seen_selection: Selection | None = None  # a signed selection found equal
        self.expected: dict[Bank, dict[int, bytes]] | None = None
        if eligible and all(len(a) == 1 for refs in pcrs.values() for a in refs.values()):
            self.expected = {
                bank: {i: next(iter(a)) for i, a in refs.items()} for bank, refs in pcrs.items()
            }
        self.digests: dict[int, bytes] = {}
        self.name = policy.name

    def digest(self, hash_alg: int) -> bytes:
        """The PCR digest of ``expected`` over ``selection``."""
        assert self.expected is not None and self.selection is not None
        by_alg = {_ALG_ID[bank]: values for bank, values in self.expected.items()}
        digest = self.digests[hash_alg] = pcr_digest(hash_alg, self.selection, by_alg)
        return digest

    def digest_of(self, hash_alg: int, pcrs: PcrValues) -> bytes | None:
        """The PCR digest of ``pcrs`` over ``selection`` when they are exactly the policy's
        PCRs, each with an allowed value; else None."""
        if len(pcrs) != len(self.banks) or self.selection is None:
            return None
        by_alg = {}
        for bank, alg, refs in self.banks:
            got = pcrs.get(bank)
            if (
                got is None
                or got.keys() != refs.keys()
                or not all(map(operator.contains, refs.values(), map(got.__getitem__, refs)))
            ):
                return None
            by_alg[alg] = got
        return pcr_digest(hash_alg, self.selection, by_alg)


def _fast_policy(policy: Policy) -> _FastPolicy:
    derived = _FastPolicy(policy)
    with contextlib.suppress(AttributeError, TypeError):  # an object that takes none
        _set(policy, _FAST, derived)
    return derived


class _FastAk:
    """What the fast path needs of an AK, derived once per PublicArea object: the one
    signature scheme it takes (RSASSA for an RSA key, ECDSA for an ECC key, when the
    key's scheme allows it; else none) and the hashes verify_signature accepts with it
    (as the hash, or the ECDSA object, to verify with): SHA-256/384/512 by algorithm id
    (``strong``), and SHA-1 (``sha1``, for when SHA-1 is allowed)."""

    __slots__ = ("is_rsa", "key", "sha1", "sig_alg", "strong")

    def __init__(self, ak: PublicArea) -> None:
        key = ak.public_key
        self.key: Any = key  # one of two types: is_rsa says which
        self.is_rsa = isinstance(key, rsa.RSAPublicKey)
        self.sig_alg: Alg | None = None
        if ak.type == Alg.RSA and self.is_rsa:
            self.sig_alg = Alg.RSASSA
        elif ak.type == Alg.ECC and isinstance(key, ec.EllipticCurvePublicKey):
            self.sig_alg = Alg.ECDSA
        if ak.scheme not in (_NULL, self.sig_alg):
            self.sig_alg = None
        scheme_hash = ak.scheme_hash if ak.scheme != _NULL else None
        self.sha1, self.strong = _fitting_hashes(self.is_rsa, self.sig_alg, scheme_hash)


@functools.lru_cache(maxsize=64)  # a handful of combinations in practice
def _fitting_hashes(
    is_rsa: bool, sig_alg: Alg | None, scheme_hash: Alg | None
) -> tuple[Any, Mapping[int, Any]]:
    """(the SHA-1 object or None, {hash algorithm id: object} for the others) that a key
    of this kind verifies with; the objects hold no state, so keys share them."""
    fitting: dict[int, Any] = {}
    if sig_alg is not None:
        for h in _OK_HASHES[True]:
            if scheme_hash is not None and h != scheme_hash:
                continue
            fitting[int(h)] = crypto_hash(h) if is_rsa else ec.ECDSA(crypto_hash(h))
    return fitting.pop(_SHA1_VALUE, None), types.MappingProxyType(fitting)


def _fast_ak(ak: PublicArea) -> _FastAk:
    derived = _FastAk(ak)
    with contextlib.suppress(AttributeError, TypeError):  # an object that takes none
        _set(ak, _FAST, derived)
    return derived


def appraise_quote(
    evidence: QuoteEvidence,
    ak: PublicArea,
    *,
    nonce: bytes | None,
    policy: Policy | None,
    previous: ClockState | None,
    now_ms: int,
    allow_sha1: bool | None = None,
    required_hash: Alg | None = None,
    event_log: EventLog | None = None,
) -> Appraisal:
    """Appraise a quote. ``nonce=None`` skips freshness (offline use only; a warning says so).

    ``policy=None`` checks integrity only (offline): no reference values, no selection demand.
    ``event_log`` is the parsed boot log, checked against the signed PCR values and the
    policy's event-log rules (measuredboot.appraise_boot).

    The usual case (a policy without event-log rules, a nonce, no event log, and every
    check passing) is decided by a fast path that can only conclude "affirming, every
    check passed"; on any deviation the full appraisal (_appraise_quote_full) decides and
    names what failed. Both return equal Appraisals for the same input.
    """
    if policy is None or nonce is None or event_log is not None or required_hash is not None:
        return _appraise_quote_full(
            evidence,
            ak,
            nonce=nonce,
            policy=policy,
            previous=previous,
            now_ms=now_ms,
            allow_sha1=allow_sha1,
            required_hash=required_hash,
            event_log=event_log,
        )
    try:
        fast_policy: _FastPolicy = policy._quote_fast  # type: ignore[attr-defined]
    except AttributeError:
        fast_policy = _fast_policy(policy)
    try:
        fast_ak: _FastAk = ak._quote_fast  # type: ignore[attr-defined]
    except AttributeError:
        fast_ak = _fast_ak(ak)
    attest = evidence.attest
    sig = evidence.signature
    # What the full path checks first: structure, then the signature by the enrolled AK
    # (a scheme that fits the key, a hash the key and the policy allow).
    hash_alg = sig.hash_alg
    algorithm = fast_ak.strong.get(hash_alg)
    if (
        algorithm is None
        and hash_alg == _SHA1_VALUE
        and (fast_policy.sha1_ok if allow_sha1 is None else allow_sha1)
    ):
        algorithm = fast_ak.sha1
    if (
        algorithm is None
        or sig.alg is not fast_ak.sig_alg  # members of Alg, or no match
        or attest.magic != TPM_GENERATED_VALUE
        or attest.type != _ATTEST_QUOTE_VALUE
    ):
        return _appraise_quote_full(
            evidence,
            ak,
            nonce=nonce,
            policy=policy,
            previous=previous,
            now_ms=now_ms,
            allow_sha1=allow_sha1,
        )
    message = evidence.message
    try:
        if fast_ak.is_rsa:
            fast_ak.key.verify(sig.sig, message, _PKCS1V15, algorithm)
        else:
            fast_ak.key.verify(encode_dss_signature(sig.r, sig.s), message, algorithm)
    except (InvalidSignature, ValueError):
        # What verify_signature returns for this signature (its other checks passed).
        return _appraise_quote_full(
            evidence,
            ak,
            nonce=nonce,
            policy=policy,
            previous=previous,
            now_ms=now_ms,
            allow_sha1=allow_sha1,
            _signature=_SIGNATURE_INVALID,
        )
    # From here on the bytes are authenticated: freshness, the signed selection (the
    # policy's, in its order), the submitted values (that selection, each allowed), the
    # signed digest over them, and the clock.
    values = evidence.pcrs
    selection = attest.pcr_select
    ok = _compare_digest(attest.extra_data, nonce) and (
        selection is fast_policy.seen_selection or selection == fast_policy.selection
    )
    if ok:
        fast_policy.seen_selection = selection
        if values == fast_policy.expected:
            # The policy's only allowed values, exactly: their digest is known.
            digest = fast_policy.digests.get(hash_alg)
            if digest is None:
                digest = fast_policy.digest(hash_alg)
        else:
            digest = fast_policy.digest_of(hash_alg, values)
        clock_info = attest.clock_info
        reset_count = clock_info.reset_count
        restart_count = clock_info.restart_count
        clock_value = clock_info.clock
        firmware = attest.firmware_version
        ok = (
            digest is not None
            and _compare_digest(digest, attest.pcr_digest)
            and clock_info.safe
            and (
                previous is None
                or (
                    firmware >= previous.firmware_version
                    and (
                        reset_count > previous.reset_count
                        or (
                            reset_count == previous.reset_count
                            and restart_count >= previous.restart_count
                            and clock_value > previous.clock
                        )
                    )
                )
            )
        )
    if not ok:
        return _appraise_quote_full(
            evidence,
            ak,
            nonce=nonce,
            policy=policy,
            previous=previous,
            now_ms=now_ms,
            allow_sha1=allow_sha1,
            _signature=None,
        )
    verdict = _NEW_VERDICT()
    verdict.status = _POLICY_START_STATUS
    verdict.trust_vector = _POLICY_START
    verdict.failures = ()
    verdict.warnings = ()
    verdict.appraised_at_ms = now_ms
    verdict.policy_name = fast_policy.name
    verdict.policy_version = 0
    verdict.extra = {}
    verdict.__class__ = Verdict
    clock = _NEW_CLOCK_STATE()
    clock.reset_count = reset_count
    clock.restart_count = restart_count
    clock.clock = clock_value
    clock.firmware_version = firmware
    clock.__class__ = ClockState
    appraisal = _NEW_APPRAISAL()
    appraisal.verdict = verdict
    appraisal.evidence = evidence
    appraisal.accepted_clock = clock
    appraisal.boot_state = None
    appraisal.values_verified = True
    appraisal.__class__ = Appraisal
    return appraisal  # type: ignore[no-any-return]  # a fast_maker object


def _appraise_quote_full(
    evidence: QuoteEvidence,
    ak: PublicArea,
    *,
    nonce: bytes | None,
    policy: Policy | None,
    previous: ClockState | None,
    now_ms: int,
    allow_sha1: bool | None = None,
    required_hash: Alg | None = None,
    event_log: EventLog | None = None,
    _signature: Failure | _Unchecked | None = _UNCHECKED,
) -> Appraisal:
    """appraise_quote, check by check: the reference for every outcome and its message.

    ``_signature`` is verify_signature's result when appraise_quote already has it.
    """
    attest = evidence.attest
    failures: list[Failure] = []
    warnings: list[Failure] = []
    tv = _FRESH_TRUST_VECTOR[bool(policy)]
    sha1_ok = allow_sha1 if allow_sha1 is not None else bool(policy and policy.allow_sha1)

    # 1. Structure.
    if attest.magic != TPM_GENERATED_VALUE:
        failures.append(
            Failure(
                Code.QUOTE_MAGIC_INVALID,
                "quote.magic",
                f"0x{TPM_GENERATED_VALUE:08x}",
                f"0x{attest.magic:08x}",
                "not a structure the TPM generated",
            )
        )
    if attest.type != _ATTEST_QUOTE:
        failures.append(
            Failure(
                Code.QUOTE_TYPE_INVALID,
                "quote.type",
                f"0x{St.ATTEST_QUOTE:04x}",
                f"0x{attest.type:04x}",
                "not a TPM2_Quote attestation",
            )
        )
    # 2. Signature by the enrolled AK.
    if not failures:
        bad = (
            verify_signature(ak, evidence.signature, evidence.message, allow_sha1=sha1_ok)
            if _signature is _UNCHECKED
            else _signature
        )
        if (
            bad is None
            and required_hash is not None
            and evidence.signature.hash_alg != required_hash
        ):
            bad = Failure(
                Code.SIGNATURE_HASH_NOT_ALLOWED,
                "signature.hash",
                alg_name(required_hash),
                alg_name(evidence.signature.hash_alg),
                "the caller required another hash",
            )
        if bad is not None:
            failures.append(bad)
    if failures:
        # Nothing past the signature was judged, so only identity carries a claim.
        tv = TrustVector(instance_identity=v.CRYPTO_VALIDATION_FAILED)
        return _done(evidence, tv, failures, warnings, policy, now_ms)

    # 3. Freshness.
    if nonce is None:
        warnings.append(
            Failure(
                Code.NONCE_NOT_CHECKED,
                "quote.extraData",
                got=attest.extra_data.hex(),
                detail="no nonce was given, so freshness was not checked",
            )
        )
    elif not hmac.compare_digest(attest.extra_data, nonce):
        failures.append(
            Failure(
                Code.NONCE_MISMATCH,
                "quote.extraData",
                nonce.hex(),
                attest.extra_data.hex(),
                "the quote was not made over this nonce",
            )
        )
        tv = tv.worse(instance_identity=v.UNTRUSTWORTHY_INSTANCE)

    # 4. Signed selection and digest.
    signed = _canonical(attest.pcr_select)
    values_trusted = False
    if signed is None:
        failures.append(
            Failure(
                Code.PCR_SELECTION_MISMATCH,
                "quote.pcrSelect",
                detail="the signed selection repeats a bank or names an unknown one",
            )
        )
    else:
        if policy is not None and not _selection_is(signed, policy.pcrs, keep_empty=True):
            # policy.selection() by bank: every bank the policy lists, with its PCRs.
            wanted = {bank: frozenset(refs) for bank, refs in policy.pcrs.items()}
            if signed != wanted:
                failures.append(
                    Failure(
                        Code.PCR_SELECTION_MISMATCH,
                        "quote.pcrSelect",
                        describe_selection(wanted),
                        describe_selection(signed),
                        "the signed selection is not the one the policy asked for",
                    )
                )
        if not _selection_is(signed, evidence.pcrs, keep_empty=False):
            submitted = {bank: frozenset(vals) for bank, vals in evidence.pcrs.items() if vals}
            failures.append(
                Failure(
                    Code.PCR_VALUES_SELECTION_MISMATCH,
                    "pcrs",
                    describe_selection(signed),
                    describe_selection(submitted),
                    "the submitted PCR values are not the ones the quote covers",
                )
            )
        else:
            by_alg = {_ALG_ID[bank]: vals for bank, vals in evidence.pcrs.items()}
            digest = pcr_digest(evidence.signature.hash_alg, attest.pcr_select, by_alg)
            if hmac.compare_digest(digest, attest.pcr_digest):
                values_trusted = True
            else:
                failures.append(
                    Failure(
                        Code.PCR_DIGEST_MISMATCH,
                        "quote.pcrDigest",
                        attest.pcr_digest.hex(),
                        digest.hex(),
                        "the submitted PCR values are not the ones the TPM signed",
                    )
                )
    if not values_trusted or failures:
        tv = tv.worse(instance_identity=v.UNTRUSTWORTHY_INSTANCE)
    if not values_trusted:
        # Unverified values say nothing about configuration or code.
        tv = replace(tv, configuration=v.NO_CLAIM, executables=v.NO_CLAIM)

    # 5. Reference values and the boot event log (only over values the signature vouches for).
    boot_state = None
    if (
        policy is not None
        and values_trusted
        and not _nothing_to_find(policy, evidence.pcrs, event_log)
    ):
        measured = appraise_values(policy, evidence.pcrs, event_log)
        failures.extend(measured.failures)
        if measured.claims:
            tv = tv.worse(**measured.claims)
        boot_state = measured.boot_state

    # 6. Clock and firmware against the last accepted quote.
    ci = attest.clock_info
    if not ci.safe:
        failures.append(
            Failure(
                Code.CLOCK_UNSAFE,
                "quote.clockInfo.safe",
                "1",
                "0",
                "the TPM clock may have gone backwards since it was last recorded",
            )
        )
        tv = tv.worse(hardware=v.CONTRAINDICATED_HARDWARE)
    if previous is not None:
        clock_failure = _clock_failure(previous, attest)
        if clock_failure is not None:
            failures.append(clock_failure)
            tv = tv.worse(hardware=v.CONTRAINDICATED_HARDWARE)
        if attest.firmware_version < previous.firmware_version:
            warnings.append(
                Failure(
                    Code.FIRMWARE_DOWNGRADE,
                    "quote.firmwareVersion",
                    f">= 0x{previous.firmware_version:016x}",
                    f"0x{attest.firmware_version:016x}",
                    "the TPM firmware is older than at the last accepted quote",
                )
            )
            tv = tv.worse(hardware=v.UNSAFE_HARDWARE)
    return _done(evidence, tv, failures, warnings, policy, now_ms, boot_state, values_trusted)


@dataclass(frozen=True)
class ValuesAppraisal:
    failures: tuple[Failure, ...]
    claims: dict[str, int]  # trust-vector claims the failures lower
    boot_state: dict[str, Any] | None


def appraise_values(policy: Policy, pcrs: PcrValues, event_log: EventLog | None) -> ValuesAppraisal:
    """Judge PCR values the caller already trusts against a policy.

    Reference digests per PCR, then the boot event log (measuredboot.appraise_boot).
    Used by appraise_quote on signature-verified values, and by dry-runs on a
    device's stored, verified evidence.
    """
    failures: list[Failure] = []
    ok = _values_allowed(policy, pcrs)
    tv = _NO_CLAIMS if ok else _value_failures(policy, pcrs, failures)
    boot = appraise_boot(event_log, pcrs, policy.eventlog)
    for f in boot.failures:
        failures.append(f)
        if f.code in CONFIGURATION_CODES:
            tv = tv.worse(configuration=v.UNSUPPORTABLE_CONFIG)
        else:
            tv = tv.worse(executables=v.CONTRAINDICATED_EXECUTABLES)
    if not failures:
        return ValuesAppraisal((), {}, boot.state)  # nothing lowered a claim
    claims = {
        name: getattr(tv, name)
        for name in ("configuration", "executables")
        if getattr(tv, name) != v.NO_CLAIM
    }
    return ValuesAppraisal(tuple(failures), claims, boot.state)


def _nothing_to_find(policy: Policy, pcrs: PcrValues, event_log: EventLog | None) -> bool:
    """True when appraise_values would return no failures and no boot state, the usual
    case: no event log and no event-log rules (any rule requires a log, so appraise_boot
    has nothing to judge), and every PCR the policy lists has one of its reference values."""
    return event_log is None and not policy.eventlog.any and _values_allowed(policy, pcrs)


def _values_allowed(policy: Policy, pcrs: PcrValues) -> bool:
    """A quick pass for the common, good case. True only when _value_failures would find
    nothing: every PCR the policy lists was quoted with one of its reference values."""
    for bank, refs in policy.pcrs.items():
        bank_pcrs = pcrs.get(bank)
        # A listed PCR that was not quoted gives None, which no reference set holds: then
        # False, and _value_failures judges PCR by PCR (it skips unquoted ones).
        if bank_pcrs and not all(map(operator.contains, refs.values(), map(bank_pcrs.get, refs))):
            return False
    return True


def _value_failures(policy: Policy, pcrs: PcrValues, failures: list[Failure]) -> TrustVector:
    """Append a failure per quoted PCR whose value the policy does not allow, in bank and
    index order; returns the trust vector those failures lower."""
    tv = TrustVector()
    for bank, refs in sorted(policy.pcrs.items(), key=lambda kv: kv[0].alg.value):
        for index, allowed in sorted(refs.items()):
            got = pcrs.get(bank, {}).get(index)
            if got is None or got in allowed:
                # An unquoted PCR is a selection mismatch, reported by the caller.
                continue
            failures.append(
                Failure(
                    Code.PCR_VALUE_NOT_ALLOWED,
                    f"pcr[{bank.value}:{index}]",
                    " | ".join(sorted(d.hex() for d in allowed)),
                    got.hex(),
                    f"PCR {index} ({bank.value}) is not among the policy's reference values",
                )
            )
            if index in CONFIG_PCRS:
                tv = tv.worse(configuration=v.UNSUPPORTABLE_CONFIG)
            else:
                tv = tv.worse(executables=v.CONTRAINDICATED_EXECUTABLES)
    return tv


def _clock_failure(prev: ClockState, attest: Attest) -> Failure | None:
    ci = attest.clock_info
    if ci.reset_count < prev.reset_count:
        return Failure(
            Code.RESET_COUNT_ROLLBACK,
            "quote.clockInfo.resetCount",
            f">= {prev.reset_count}",
            str(ci.reset_count),
            "resetCount went backwards: an old TPM state or a replayed quote",
        )
    if ci.reset_count == prev.reset_count:
        if ci.restart_count < prev.restart_count:
            return Failure(
                Code.RESTART_COUNT_ROLLBACK,
                "quote.clockInfo.restartCount",
                f">= {prev.restart_count}",
                str(ci.restart_count),
                "restartCount went backwards without a TPM reset",
            )
        if ci.clock <= prev.clock:
            return Failure(
                Code.CLOCK_NOT_ADVANCING,
                "quote.clockInfo.clock",
                f"> {prev.clock}",
                str(ci.clock),
                "the TPM clock did not advance since the last accepted quote",
            )
    return None


def _done(
    evidence: QuoteEvidence,
    tv: TrustVector,
    failures: list[Failure],
    warnings: list[Failure],
    policy: Policy | None,
    now_ms: int,
    boot_state: dict[str, Any] | None = None,
    values_verified: bool = False,
) -> Appraisal:
    status = _POLICY_START_STATUS if tv is _POLICY_START else tv.status
    if failures and status is not v.Status.CONTRAINDICATED:
        # Every failure maps to a contraindicating claim; this keeps it so.
        status = v.Status.CONTRAINDICATED
    verdict = Verdict(
        status=status,
        trust_vector=tv,
        failures=tuple(failures),
        warnings=tuple(warnings),
        appraised_at_ms=now_ms,
        policy_name=policy.name if policy else "",
    )
    accepted = status in _ACCEPTED
    return Appraisal(
        verdict,
        evidence,
        ClockState.of(evidence.attest) if accepted else None,
        boot_state,
        values_verified,
    )
