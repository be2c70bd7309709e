"""The fast paths of attestd.core.quote against the full, check-by-check path.

parse_evidence and appraise_quote decide the usual, good case with few Python
operations and hand every other case to the step-by-step parsers and the full
appraisal (_parse_evidence_reference, _appraise_quote_full). This holds them to
that: for good evidence and for many mutations of it, the public functions give
a result equal to (and printed like) the reference's, or raise the same
MalformedError; and the good case really is decided by the fast path.

Evidence is forged and signed with software keys (tests/unit/forge.py); one
real GCP quote (SHA-1) comes from ../shared/vectors.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import forge
import pytest
from realquotes import GcpQuote

from attestd.core import quote as quote_module
from attestd.core import tpm
from attestd.core.errors import MalformedError
from attestd.core.eventlog import EventLog
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.policy import EventLogRules, Policy, policy_from_document
from attestd.core.quote import (
    ClockState,
    _appraise_quote_full,
    _parse_evidence_reference,
    appraise_quote,
    parse_evidence,
)
from attestd.core.tpm import (
    Alg,
    Bank,
    PublicArea,
    _parse_attest_checked,
    _parse_signature_checked,
    parse_attest,
    parse_public,
    parse_signature,
)
from attestd.core.verdict import Status

NONCE = b"fast-path-nonce-0123456789abcdef"
FIRMWARE = 0x2019_1023_0016_3636
CLOCK = dict(clock=100_000, reset_count=3, restart_count=2)
NOW_MS = 1_700_000_000_000


def _digest(seed: int, size: int = 32) -> bytes:
    return random.Random(seed).randbytes(size)


def values_for(pcrs: list[int], bank: str = "sha256", seed: int = 0) -> dict[str, dict[int, bytes]]:
    size = Bank.parse(bank).digest_size
    return {bank: {i: _digest(seed * 100 + i, size) for i in pcrs}}


def policy_of(values: dict[str, dict[int, bytes]], *, several: bool = False, **doc: Any) -> Policy:
    """A policy allowing ``values`` (with two more digests per PCR when ``several``)."""
    pcrs: dict[str, dict[int, Any]] = {}
    for bank, vals in values.items():
        pcrs[bank] = {}
        for i, d in vals.items():
            if several:
                others = [_digest(7000 + i, len(d)).hex(), _digest(8000 + i, len(d)).hex()]
                pcrs[bank][i] = [others[0], d.hex(), others[1]]
            else:
                pcrs[bank][i] = d.hex()
    return policy_from_document({"name": "fast", "pcrs": pcrs, **doc})


@dataclass
class Case:
    """One quote and how to appraise it."""

    key: forge.SoftKey
    ak: PublicArea
    quote: bytes
    signature: bytes
    pcrs: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    limits: Limits = DEFAULT_LIMITS

    def with_(self, **changes: Any) -> Case:
        kwargs = {**self.kwargs, **changes.pop("kwargs", {})}
        return replace(self, kwargs=kwargs, **changes)

    def resigned(self, quote: bytes, hash_alg: int = forge.SHA256) -> Case:
        """This case with ``quote``, validly signed."""
        return replace(self, quote=quote, signature=self.key.sign(quote, hash_alg))


def make_case(
    key: forge.SoftKey,
    *,
    pcrs: list[int] | None = None,
    values: dict[str, dict[int, bytes]] | None = None,
    signed_values: dict[str, dict[int, bytes]] | None = None,
    selection: list[tuple[int, list[int]]] | None = None,
    policy: Policy | str | None = "values",
    several: bool = False,
    hash_alg: int = forge.SHA256,
    scheme: int | None = None,
    ak: PublicArea | None = None,
    previous: ClockState | None = None,
    nonce: bytes | None = NONCE,
    extra_data: bytes = NONCE,
    **attest_fields: Any,
) -> Case:
    """A quote over ``signed_values`` (default ``values``), submitted with ``values``."""
    if values is None:
        values = values_for(pcrs if pcrs is not None else list(range(8)))
    signed = values if signed_values is None else signed_values
    if selection is None:
        selection = [(forge.BANK_ALG[b], sorted(v)) for b, v in signed.items()]
    digest = forge.pcr_digest(hash_alg, selection, signed)
    fields = {**CLOCK, "firmware": FIRMWARE, **attest_fields}
    message = forge.attest(extra_data=extra_data, selection=selection, digest=digest, **fields)
    if policy == "values":
        policy = policy_of(values, several=several)
    assert policy is None or isinstance(policy, Policy)
    return Case(
        key,
        ak or parse_public(key.public_area()),
        message,
        key.sign(message, hash_alg, scheme),
        values,
        {"nonce": nonce, "policy": policy, "previous": previous, "now_ms": NOW_MS},
    )


def outcome(parse: Callable[..., Any], appraise: Callable[..., Any], case: Case) -> Any:
    try:
        evidence = parse(case.quote, case.signature, case.pcrs, case.limits)
    except MalformedError as e:
        return ("MalformedError", e.code, e.field, e.offset, str(e))
    except Exception as e:  # values of the wrong kind: whatever the reference raises
        return (type(e).__name__, str(e))
    try:
        return appraise(evidence, case.ak, **case.kwargs)
    except Exception as e:  # the full path's own exceptions (a nonce of the wrong type)
        return (type(e).__name__, str(e))


@dataclass
class Calls:
    full: int = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Counts how often appraise_quote hands over to the full path."""
    counted = Calls()
    real = quote_module._appraise_quote_full

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.full += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(quote_module, "_appraise_quote_full", counting)
    yield counted


def same(case: Case) -> Any:
    """Assert the public functions and the reference agree on ``case``; return the outcome."""
    ours = outcome(parse_evidence, appraise_quote, case)
    reference = outcome(_parse_evidence_reference, _appraise_quote_full, case)
    assert ours == reference
    assert repr(ours) == repr(reference)
    # And again: the second time the layout and the derived policy and AK data are cached.
    again = outcome(parse_evidence, appraise_quote, case)
    assert again == reference and repr(again) == repr(reference)
    return ours


def affirmed_fast(case: Case, calls: Calls) -> None:
    before = calls.full
    result = same(case)
    assert result.verdict.status is Status.AFFIRMING, result.verdict
    assert result.verdict.failures == () and result.verdict.warnings == ()
    assert calls.full == before, "the good case should not need the full path"


def not_affirming(case: Case) -> Any:
    result = same(case)
    assert (
        isinstance(result, tuple)
        or result.verdict.status is not Status.AFFIRMING
        or (result.verdict.warnings)
    )
    return result


@pytest.fixture(scope="module")
def rsa_key() -> forge.SoftKey:
    return forge.SoftKey.rsa()


@pytest.fixture(scope="module")
def ecc_key() -> forge.SoftKey:
    return forge.SoftKey.ecc()


@pytest.fixture(scope="module", params=["rsa", "ecc"])
def key(request: pytest.FixtureRequest, rsa_key: forge.SoftKey, ecc_key: forge.SoftKey) -> Any:
    return rsa_key if request.param == "rsa" else ecc_key


# --- the good case ----------------------------------------------------------


@pytest.mark.parametrize("count", [1, 8, 16, 24])
@pytest.mark.parametrize("several", [False, True])
@pytest.mark.parametrize("with_previous", [False, True])
def test_good_quotes_are_decided_by_the_fast_path(
    key: forge.SoftKey, count: int, several: bool, with_previous: bool, calls: Calls
) -> None:
    previous = ClockState(3, 1, 99_999, FIRMWARE) if with_previous else None
    case = make_case(key, pcrs=list(range(count)), several=several, previous=previous)
    affirmed_fast(case, calls)


def test_good_quotes_of_other_shapes(key: forge.SoftKey, calls: Calls) -> None:
    # Sparse PCRs, a longer nonce, SHA-384 (allowed) signatures, two banks.
    affirmed_fast(make_case(key, pcrs=[0, 2, 7, 23]), calls)
    long_nonce = bytes(range(64))
    affirmed_fast(
        make_case(
            key,
            extra_data=long_nonce,
            nonce=long_nonce,
            ak=parse_public(key.public_area(scheme_hash=forge.SHA384)),
            hash_alg=forge.SHA384,
        ),
        calls,
    )
    two_banks = {**values_for([0, 1, 2]), **values_for([4, 5], "sha384", 1)}
    affirmed_fast(make_case(key, values=two_banks), calls)
    # A key without a scheme of its own takes the fitting one with any strong hash.
    null_scheme = parse_public(key.public_area(scheme=forge.NULL))
    affirmed_fast(make_case(key, ak=null_scheme, hash_alg=forge.SHA512), calls)
    # Later clocks: a reset (restartCount may then be lower), a restart, time passing.
    for previous in (
        ClockState(2, 9, 10**12, FIRMWARE),
        ClockState(3, 1, 99_999, FIRMWARE),
        ClockState(3, 2, 99_999, FIRMWARE - 1),
    ):
        affirmed_fast(make_case(key, previous=previous), calls)


def test_one_policy_many_devices(
    rsa_key: forge.SoftKey, ecc_key: forge.SoftKey, calls: Calls
) -> None:
    """One Policy object (as the service caches it) over quotes of either key and over
    other selections: what it derives once serves them all, and stays right."""
    values = values_for(list(range(10)))
    policy = policy_of(values)
    for key in (rsa_key, ecc_key, rsa_key):
        affirmed_fast(make_case(key, values=values, policy=policy), calls)
        smaller = {"sha256": {i: values["sha256"][i] for i in range(8)}}
        not_affirming(make_case(key, values=smaller, policy=policy))
        affirmed_fast(make_case(key, values=values, policy=policy), calls)


# --- every check, failing ----------------------------------------------------


def test_each_quote_byte_flipped(key: forge.SoftKey) -> None:
    """Each byte of the quote flipped (with the old signature, and re-signed), for a
    sample of masks: every outcome, from malformed to each failed check, agrees."""
    base = make_case(key, pcrs=[0, 1, 2, 4, 7], previous=ClockState(3, 2, 99_000, FIRMWARE))
    rng = random.Random(5)
    seen = set()
    for position in range(len(base.quote)):
        for mask in (0x01, 0x80, rng.randint(1, 255)):
            quote = forge.flip(base.quote, position, mask)
            not_affirming(replace(base, quote=quote))
            # Re-signed, a flip in qualifiedSigner (not judged) or a later clock passes.
            result = same(base.resigned(quote))
            seen.add(result[:1] if isinstance(result, tuple) else tuple(result.verdict.codes()))
    # The flips reach the structure, the signature and each check after it.
    codes = {c for s in seen for c in s}
    for code in (
        "MalformedError",
        "QUOTE_MAGIC_INVALID",
        "NONCE_MISMATCH",
        "PCR_SELECTION_MISMATCH",
        "PCR_DIGEST_MISMATCH",
        "CLOCK_UNSAFE",
        "RESET_COUNT_ROLLBACK",
    ):
        assert code in codes, (code, seen)


def test_signature_flipped(key: forge.SoftKey) -> None:
    base = make_case(key)
    for position in range(len(base.signature)):
        not_affirming(replace(base, signature=forge.flip(base.signature, position)))


def test_signature_by_another_key_or_scheme(key: forge.SoftKey) -> None:
    base = make_case(key)
    other = forge.SoftKey.rsa() if key.is_rsa else forge.SoftKey.ecc()
    not_affirming(replace(base, signature=other.sign(base.quote)))
    if key.is_rsa:
        pss = make_case(key, scheme=forge.RSAPSS)
        not_affirming(pss)  # the AK's scheme is RSASSA
        lenient = parse_public(key.public_area(scheme=forge.NULL))
        same(pss.with_(ak=lenient))  # no scheme of its own: PSS is fine (the full path)
    # The AK of the other type.
    theirs = forge.SoftKey.ecc() if key.is_rsa else forge.SoftKey.rsa()
    not_affirming(base.with_(ak=parse_public(theirs.public_area())))
    # An AK whose scheme names another hash.
    not_affirming(base.with_(ak=parse_public(key.public_area(scheme_hash=forge.SHA384))))


@pytest.mark.parametrize("policy_allows", [False, True])
@pytest.mark.parametrize("caller_allows", [None, False, True])
def test_sha1_signature(
    key: forge.SoftKey, policy_allows: bool, caller_allows: bool | None, calls: Calls
) -> None:
    values = values_for([0, 1, 2])
    case = make_case(
        key,
        values=values,
        hash_alg=forge.SHA1,
        ak=parse_public(key.public_area(scheme=forge.NULL)),
        policy=policy_of(values, allow_sha1=policy_allows),
    ).with_(kwargs={"allow_sha1": caller_allows})
    allowed = caller_allows if caller_allows is not None else policy_allows
    if allowed:
        affirmed_fast(case, calls)
    else:
        assert not_affirming(case).verdict.codes() == ["SIGNATURE_HASH_NOT_ALLOWED"]


@pytest.mark.parametrize("sha1_allowed", [False, True])
def test_hash_field_other_than_the_hash_signed(key: forge.SoftKey, sha1_allowed: bool) -> None:
    """TPMT_SIGNATURE names one hash, the signature was made with another."""
    lenient = parse_public(key.public_area(scheme=forge.NULL))
    for signed_with in (forge.SHA1, forge.SHA256):
        base = make_case(key, ak=lenient, hash_alg=signed_with)
        for named in (forge.SHA1, forge.SHA256, forge.SHA384, 0x0012, 0x0099):
            signature = base.signature[:2] + forge.u16(named) + base.signature[4:]
            same(replace(base, signature=signature).with_(kwargs={"allow_sha1": sha1_allowed}))


def test_nonce(key: forge.SoftKey) -> None:
    base = make_case(key)
    assert not_affirming(base.with_(kwargs={"nonce": NONCE[:-1] + b"?"})).verdict.codes() == [
        "NONCE_MISMATCH"
    ]
    not_affirming(base.with_(kwargs={"nonce": NONCE + b"!"}))
    not_affirming(base.with_(kwargs={"nonce": b""}))
    none = not_affirming(base.with_(kwargs={"nonce": None}))
    assert [w.code.value for w in none.verdict.warnings] == ["NONCE_NOT_CHECKED"]
    same(base.with_(kwargs={"nonce": bytearray(NONCE)}))
    same(base.with_(kwargs={"nonce": NONCE.decode()}))  # a TypeError, either way


def test_selection_and_values(key: forge.SoftKey) -> None:
    values = values_for([0, 1, 2, 4, 7])
    policy = policy_of(values)
    sha256 = values["sha256"]
    fewer = {"sha256": {i: sha256[i] for i in (0, 1, 2, 4)}}
    more = {"sha256": {**sha256, 9: _digest(9)}}
    other_value = {"sha256": {**sha256, 4: _digest(44)}}
    sha1_too = {**values, **values_for([0], "sha1")}
    cases = [
        # The quote covers other PCRs than the policy asks for (values match the quote).
        make_case(key, values=fewer, policy=policy),
        make_case(key, values=more, policy=policy),
        # The values submitted are not the quoted ones.
        make_case(key, values=fewer, signed_values=values, policy=policy),
        make_case(key, values=more, signed_values=values, policy=policy),
        make_case(key, values=sha1_too, signed_values=values, policy=policy),
        make_case(
            key,
            values={"sha1": {i: bytes(20) for i in sha256}},
            signed_values=values,
            policy=policy,
        ),
        # The values are the quoted PCRs but not the values signed: digest mismatch.
        make_case(key, values=other_value, signed_values=values, policy=policy),
        # A value the policy does not allow (signed and submitted alike).
        make_case(key, values=other_value, policy=policy),
        make_case(key, values=other_value, policy=policy_of(values, several=True)),
        # The selection signed in another order, or with an empty or repeated entry.
        make_case(key, values=values, selection=[(forge.SHA256, [7, 4, 2, 1, 0])]),
        make_case(key, values=values, selection=[(forge.SHA256, sorted(sha256)), (forge.SHA1, [])]),
        make_case(
            key,
            values=values,
            selection=[(forge.SHA256, [0, 1, 2]), (forge.SHA256, [4, 7])],
        ),
    ]
    for case in cases:
        same(case)
    assert not_affirming(cases[6]).verdict.codes() == ["PCR_DIGEST_MISMATCH"]
    assert not_affirming(cases[7]).verdict.codes() == ["PCR_VALUE_NOT_ALLOWED"]
    # An empty bank submitted beside the quoted one is no deviation, but not the usual case.
    same(make_case(key, values={**values, "sha1": {}}, signed_values=values, policy=policy))


def test_two_bank_policy_with_the_banks_signed_in_another_order(key: forge.SoftKey) -> None:
    values = {**values_for([0, 1]), **values_for([2], "sha1")}
    policy = policy_of(values, allow_sha1=True)
    selection = [(forge.SHA256, [0, 1]), (forge.SHA1, [2])]  # not by algorithm id
    same(make_case(key, values=values, policy=policy, selection=selection))


@pytest.mark.parametrize(
    ("fields", "previous", "code"),
    [
        ({"safe": 0}, None, "CLOCK_UNSAFE"),
        ({}, ClockState(4, 0, 0, FIRMWARE), "RESET_COUNT_ROLLBACK"),
        ({}, ClockState(3, 3, 0, FIRMWARE), "RESTART_COUNT_ROLLBACK"),
        ({}, ClockState(3, 2, 100_000, FIRMWARE), "CLOCK_NOT_ADVANCING"),
        ({}, ClockState(3, 2, 100_001, FIRMWARE), "CLOCK_NOT_ADVANCING"),
        ({}, ClockState(3, 2, 1, FIRMWARE + 1), "FIRMWARE_DOWNGRADE"),
        ({}, ClockState(2, 0, 10**9, FIRMWARE + 1), "FIRMWARE_DOWNGRADE"),
    ],
)
def test_clock_and_firmware(
    key: forge.SoftKey, fields: dict[str, int], previous: ClockState | None, code: str
) -> None:
    result = not_affirming(make_case(key, previous=previous, **fields))
    found = [f.code.value for f in result.verdict.failures + result.verdict.warnings]
    assert found == [code]


def test_policy_none_event_log_rules_and_caller_options(key: forge.SoftKey) -> None:
    values = values_for([0, 1, 2, 4, 7])
    base = make_case(key, values=values)
    same(base.with_(kwargs={"policy": None}))
    same(base.with_(kwargs={"required_hash": Alg.SHA256}))
    same(base.with_(kwargs={"required_hash": Alg.SHA384}))
    log = EventLog(format="crypto-agile", algorithms={forge.SHA256: 32}, events=(), size=0)
    same(base.with_(kwargs={"event_log": log}))
    rules = replace(base.kwargs["policy"], eventlog=EventLogRules(require_secure_boot=True))
    same(base.with_(kwargs={"policy": rules}))
    same(base.with_(kwargs={"policy": rules, "event_log": log}))


def test_policies_built_by_hand(key: forge.SoftKey) -> None:
    """Policies the document loader would refuse: an empty bank, a PCR with no allowed
    digest, no PCRs at all."""
    values = values_for([0, 1])
    refs = {i: frozenset({d}) for i, d in values["sha256"].items()}
    base = make_case(key, values=values)
    for pcrs in (
        {Bank.SHA256: refs, Bank.SHA1: {}},
        {Bank.SHA256: {**refs, 1: frozenset()}},
        {},
        {Bank.SHA256: {}},
    ):
        same(base.with_(kwargs={"policy": Policy(name="by-hand", pcrs=pcrs)}))
    empty = make_case(key, values={"sha256": {}}, selection=[(forge.SHA256, [])], policy=None)
    same(empty.with_(kwargs={"policy": Policy(name="by-hand", pcrs={Bank.SHA256: {}})}))
    same(empty.with_(kwargs={"policy": Policy(name="by-hand", pcrs={})}))


def test_gcp_sha1_quote(gcp_quote: GcpQuote) -> None:
    ak = parse_public(gcp_quote.ak_public)
    values = gcp_quote.pcrs
    refs = {i: frozenset({d}) for i, d in values["sha1"].items()}
    for allow in (False, True):
        policy = Policy(name="gcp", pcrs={Bank.SHA1: refs}, allow_sha1=allow)
        case = Case(
            forge.SoftKey.rsa(),
            ak,
            gcp_quote.quote,
            gcp_quote.signature,
            values,
            {"nonce": b"", "policy": policy, "previous": None, "now_ms": NOW_MS},
        )
        result = same(case)
        assert result.verdict.status is (Status.AFFIRMING if allow else Status.CONTRAINDICATED)


# --- malformed input ----------------------------------------------------------


def test_truncated_and_extended(key: forge.SoftKey) -> None:
    base = make_case(key)
    same(base)
    for n in range(len(base.quote) + 3):
        result = same(replace(base, quote=(base.quote + b"\0\0\0")[:n]))
        assert n == len(base.quote) or result[0] == "MalformedError"
    for n in range(len(base.signature) + 3):
        same(replace(base, signature=(base.signature + b"\0\0\0")[:n]))


def test_limits(key: forge.SoftKey) -> None:
    """A layout learnt under the default limits is refused under tighter ones."""
    base = make_case(key, pcrs=[0, 1, 2, 23])
    same(base)
    for tight in (
        Limits(max_attest_size=len(base.quote) - 1),
        Limits(max_tpm2b=len(NONCE) - 1),
        Limits(max_tpm2b=33),  # the qualified signer is 34 bytes
        Limits(max_size_of_select=2),
        Limits(max_pcr_selections=0),
        Limits(max_signature_size=len(base.signature) - 1),
        Limits(max_banks_per_request=0),
    ):
        assert same(replace(base, limits=tight))[0] == "MalformedError"
    same(replace(base, limits=Limits(max_attest_size=len(base.quote))))
    same(base)


def test_layouts_with_the_same_sizes(key: forge.SoftKey, calls: Calls) -> None:
    """Quotes of the same length and sizes, other selections: the layout picked by the
    sizes must also match the selection bytes."""
    for pcrs in ([0, 1, 2], [3, 4, 5], [8, 9, 10], [0, 1, 2], [16, 17, 18], [3, 4, 5]):
        affirmed_fast(make_case(key, pcrs=pcrs), calls)
    # sizeofSelect 4 instead of 3: a TPMS_PCR_SELECTION the TPM may send.
    values = values_for([0, 1])
    digest = forge.pcr_digest(forge.SHA256, [(forge.SHA256, [0, 1])], values)
    body = forge.pcr_selection([(forge.SHA256, [0, 1])], size_of_select=4) + forge.tpm2b(digest)
    message = forge.attest(extra_data=NONCE, body=body, **CLOCK, firmware=FIRMWARE)
    case = make_case(key, values=values).resigned(message)
    affirmed_fast(case, calls)
    same(replace(case, limits=Limits(max_size_of_select=3)))


@pytest.mark.parametrize(
    "pcrs",
    [
        {"sha256": {24: bytes(32)}},
        {"sha256": {-1: bytes(32)}},
        {"sha256": {0: bytes(31)}},
        {"sha256": {0: bytes(32), 1: bytes(20)}},
        {"sha999": {0: bytes(32)}},
        {"SHA256": {0: bytes(32)}},
        {"sha256": {0: bytes(32)}, "SHA256": {0: bytes(32)}},
        {b: {} for b in ("sha1", "sha256", "sha384", "sha512", "sha3")},
        {"sha256": {0: bytearray(32)}},
        {"sha256": {0: memoryview(bytes(32))}},
        {"sha256": {True: bytes(32)}},
        {"sha256": {"0": bytes(32)}},
        {"sha999": [bytes(32)]},
        {"sha256": [bytes(32)]},
        {"sha256": {0: "x" * 32}},
        {"sha256": {0: bytes(32)}, "sha1": {0: bytes(32)}},
    ],
)
def test_malformed_or_unusual_values(key: forge.SoftKey, pcrs: Any) -> None:
    same(replace(make_case(key, pcrs=[0]), pcrs=pcrs))


def test_values_in_other_mappings(key: forge.SoftKey) -> None:
    base = make_case(key, pcrs=[0, 1])
    same(replace(base, pcrs=dict(base.pcrs)))
    from types import MappingProxyType

    same(replace(base, pcrs=MappingProxyType(base.pcrs)))
    same(replace(base, pcrs={"sha256": MappingProxyType(base.pcrs["sha256"])}))
    same(replace(base, quote=bytearray(base.quote)))
    same(replace(base, signature=bytearray(base.signature)))


def test_random_mutations(rsa_key: forge.SoftKey, ecc_key: forge.SoftKey) -> None:
    """Random combinations: flipped quote bytes (re-signed or not), clocks, nonces,
    values and policies, all at once."""
    rng = random.Random(20261122)
    for _ in range(300):
        key = rng.choice([rsa_key, ecc_key])
        pcrs = sorted(rng.sample(range(24), rng.choice([1, 3, 8])))
        values = values_for(pcrs, seed=rng.randrange(3))
        submitted = {"sha256": dict(values["sha256"])}
        if rng.random() < 0.2:
            index = rng.choice(pcrs)
            submitted["sha256"][index] = _digest(rng.randrange(10**6))
        previous = None
        if rng.random() < 0.6:
            previous = ClockState(
                rng.choice([2, 3, 4]),
                rng.choice([1, 2, 3]),
                rng.choice([0, 100_000, 200_000]),
                FIRMWARE + rng.choice([-1, 0, 1]),
            )
        case = make_case(
            key,
            values=submitted,
            signed_values=values,
            policy=policy_of(values, several=rng.random() < 0.5),
            previous=previous,
            safe=rng.choice([1, 1, 1, 0]),
        )
        if rng.random() < 0.3:
            quote = forge.flip(case.quote, rng.randrange(len(case.quote)), rng.randint(1, 255))
            case = case.resigned(quote) if rng.random() < 0.5 else replace(case, quote=quote)
        if rng.random() < 0.1:
            case = case.with_(kwargs={"nonce": rng.choice([None, b"x" * 32])})
        same(case)


# --- the objects the fast paths make, and the parsers' caches ----------------------


def test_fast_objects_are_ordinary_instances(key: forge.SoftKey, calls: Calls) -> None:
    previous = ClockState(3, 1, 99_999, FIRMWARE)
    case = make_case(key, previous=previous)
    ours = appraise_quote(
        parse_evidence(case.quote, case.signature, case.pcrs), case.ak, **case.kwargs
    )
    reference = _appraise_quote_full(
        _parse_evidence_reference(case.quote, case.signature, case.pcrs), case.ak, **case.kwargs
    )
    assert calls.full == 0
    assert ours == reference
    pairs = [
        (ours, reference),
        (ours.verdict, reference.verdict),
        (ours.evidence, reference.evidence),
        (ours.evidence.attest, reference.evidence.attest),
        (ours.evidence.attest.clock_info, reference.evidence.attest.clock_info),
        (ours.evidence.signature, reference.evidence.signature),
        (ours.accepted_clock, reference.accepted_clock),
    ]
    for mine, theirs in pairs:
        assert type(mine) is type(theirs)
        assert mine == theirs and repr(mine) == repr(theirs)
        # Whatever storing another attribute raises (for frozen slotted dataclasses,
        # Python 3.11 raises TypeError), it raises for both alike.
        raised = []
        for obj in (mine, theirs):
            with pytest.raises(Exception) as info:
                obj.anything = 1  # type: ignore[union-attr]
            raised.append(type(info.value))
        assert raised[0] is raised[1]
        first = dataclasses.fields(mine)[0].name  # type: ignore[arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(mine, first, None)
        assert dataclasses.replace(mine) == theirs  # type: ignore[type-var]
        assert copy.deepcopy(mine) == theirs
        assert pickle.loads(pickle.dumps(mine)) == theirs
    for mine, theirs in pairs[3:]:  # the hashable ones
        assert hash(mine) == hash(theirs)
    # The verdict's extra is its own dict, as each __init__-built verdict's is.
    again = appraise_quote(
        parse_evidence(case.quote, case.signature, case.pcrs), case.ak, **case.kwargs
    )
    assert again.verdict.extra is not ours.verdict.extra


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, Limits(max_tpm2b=40)])
def test_parsers_agree_with_the_checked_ones(
    rsa_key: forge.SoftKey, ecc_key: forge.SoftKey, limits: Limits
) -> None:
    """parse_attest and parse_signature (the fast paths) against the step-by-step parsers,
    byte flips included."""
    rng = random.Random(7)

    def result(parse: Callable[..., Any], data: bytes, field: str) -> Any:
        try:
            return parse(data, field, limits)
        except MalformedError as e:
            return ("MalformedError", e.code, e.field, e.offset, str(e))

    for key in (rsa_key, ecc_key):
        for pcrs in ([0], [0, 1, 2, 3, 4, 5, 6, 7], list(range(24))):
            case = make_case(key, pcrs=pcrs)
            for data in [case.quote] + [
                forge.flip(case.quote, rng.randrange(len(case.quote)), rng.randint(1, 255))
                for _ in range(60)
            ]:
                for _ in range(2):  # the second time from the layout learnt
                    ours = result(parse_attest, data, "quote")
                    assert ours == result(_parse_attest_checked, data, "quote")
            for data in [case.signature] + [
                forge.flip(case.signature, rng.randrange(len(case.signature)), rng.randint(1, 255))
                for _ in range(30)
            ]:
                ours = result(parse_signature, data, "signature")
                assert ours == result(_parse_signature_checked, data, "signature")
                assert repr(ours) == repr(result(_parse_signature_checked, data, "signature"))


def test_layout_caches_start_over_when_full(
    key: forge.SoftKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tpm, "_SHAPES", {})
    monkeypatch.setattr(tpm, "_learnt", 0)
    monkeypatch.setattr(tpm, "_SHAPES_PER_SIZE", 2)
    monkeypatch.setattr(tpm, "_MAX_LAYOUTS", 3)
    cases = [
        make_case(key, pcrs=pcrs, extra_data=nonce, nonce=nonce)
        for nonce in (NONCE, NONCE[:20], NONCE[:8], b"")
        for pcrs in ([0], [1], [2], [0, 1, 2])
    ]
    for _ in range(2):
        for case in cases:
            same(case)
    assert all(len(shapes) <= 2 for shapes in tpm._SHAPES.values())
    assert sum(len(s.layouts) for shapes in tpm._SHAPES.values() for s in shapes) <= 3
