"""Typed appraisal results in the IETF RATS EAR / AR4SI vocabulary.

A ``Verdict`` is what the core returns; nothing in it is a bare bool a caller
could forget to check. Failure codes are stable strings (docs/api.md lists
them); adding a code is fine, renaming one breaks gateways.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class Status(enum.Enum):
    """EAR status tiers (draft-ietf-rats-ear, ear.status)."""

    NONE = "none"
    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Status.NONE: 0, Status.AFFIRMING: 1, Status.WARNING: 2, Status.CONTRAINDICATED: 3}


class Claim(enum.Enum):
    """AR4SI trustworthiness claims (draft-ietf-rats-ar4si, 2.3)."""

    INSTANCE_IDENTITY = "instance-identity"
    CONFIGURATION = "configuration"
    EXECUTABLES = "executables"
    FILE_SYSTEM = "file-system"
    HARDWARE = "hardware"
    RUNTIME_OPAQUE = "runtime-opaque"
    STORAGE_OPAQUE = "storage-opaque"
    SOURCED_DATA = "sourced-data"


# AR4SI claim values used here.
NO_CLAIM = 0
TRUSTWORTHY_INSTANCE = 2
APPROVED_CONFIG = 2
APPROVED_BOOT = 3  # executables: only approved code loaded during boot
GENUINE_HARDWARE = 2
UNSAFE_HARDWARE = 32  # e.g. a firmware downgrade
UNSAFE_CONFIG = 32
UNSUPPORTABLE_CONFIG = 96
CONTRAINDICATED_EXECUTABLES = 96  # unapproved code was loaded
UNTRUSTWORTHY_INSTANCE = 96
CONTRAINDICATED_HARDWARE = 96
CRYPTO_VALIDATION_FAILED = 99


def tier(value: int) -> Status:
    """The EAR tier a claim value falls in (AR4SI 2.3.1)."""
    if -1 <= value <= 1:
        return Status.NONE
    if 2 <= value <= 31:
        return Status.AFFIRMING
    if 32 <= value <= 95:
        return Status.WARNING
    return Status.CONTRAINDICATED


class Code(enum.Enum):
    """Stable failure codes of the appraisal (the verdict's ``failures``)."""

    QUOTE_MAGIC_INVALID = "QUOTE_MAGIC_INVALID"
    QUOTE_TYPE_INVALID = "QUOTE_TYPE_INVALID"
    SIGNATURE_SCHEME_MISMATCH = "SIGNATURE_SCHEME_MISMATCH"
    SIGNATURE_HASH_NOT_ALLOWED = "SIGNATURE_HASH_NOT_ALLOWED"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    NONCE_MISMATCH = "NONCE_MISMATCH"
    NONCE_NOT_CHECKED = "NONCE_NOT_CHECKED"
    PCR_SELECTION_MISMATCH = "PCR_SELECTION_MISMATCH"
    PCR_VALUES_SELECTION_MISMATCH = "PCR_VALUES_SELECTION_MISMATCH"
    PCR_DIGEST_MISMATCH = "PCR_DIGEST_MISMATCH"
    PCR_VALUE_NOT_ALLOWED = "PCR_VALUE_NOT_ALLOWED"
    CLOCK_UNSAFE = "CLOCK_UNSAFE"
    RESET_COUNT_ROLLBACK = "RESET_COUNT_ROLLBACK"
    RESTART_COUNT_ROLLBACK = "RESTART_COUNT_ROLLBACK"
    CLOCK_NOT_ADVANCING = "CLOCK_NOT_ADVANCING"
    FIRMWARE_DOWNGRADE = "FIRMWARE_DOWNGRADE"
    # Boot event log (replay against the quote).
    EVENTLOG_MISSING = "EVENTLOG_MISSING"
    EVENTLOG_REPLAY_MISMATCH = "EVENTLOG_REPLAY_MISMATCH"
    EVENTLOG_PCR_UNEXPLAINED = "EVENTLOG_PCR_UNEXPLAINED"
    # Boot event log (event semantics: known tampering).
    EVENT_DIGEST_MISMATCH = "EVENT_DIGEST_MISMATCH"
    EVENT_DATA_MALFORMED = "EVENT_DATA_MALFORMED"
    EVENT_RETYPED = "EVENT_RETYPED"
    EVENT_TYPE_UNEXPECTED = "EVENT_TYPE_UNEXPECTED"
    SEPARATOR_REPEATED = "SEPARATOR_REPEATED"
    SECURE_BOOT_VARIABLE_AFTER_SEPARATOR = "SECURE_BOOT_VARIABLE_AFTER_SEPARATOR"
    SECURE_BOOT_VARIABLE_MALFORMED = "SECURE_BOOT_VARIABLE_MALFORMED"
    # Boot state against the policy's event-log rules.
    SECURE_BOOT_DISABLED = "SECURE_BOOT_DISABLED"
    BOOT_APPLICATION_NOT_ALLOWED = "BOOT_APPLICATION_NOT_ALLOWED"
    KERNEL_CMDLINE_NOT_ALLOWED = "KERNEL_CMDLINE_NOT_ALLOWED"
    DBX_MISSING_HASH = "DBX_MISSING_HASH"
    FORBIDDEN_AUTHORITY = "FORBIDDEN_AUTHORITY"
    # A key presented for binding (TPM2_Certify by the AK).
    CERTIFY_TYPE_INVALID = "CERTIFY_TYPE_INVALID"
    CERTIFY_SIGNATURE_INVALID = "CERTIFY_SIGNATURE_INVALID"
    CERTIFY_NONCE_MISMATCH = "CERTIFY_NONCE_MISMATCH"
    CERTIFY_NAME_MISMATCH = "CERTIFY_NAME_MISMATCH"
    CERTIFIED_KEY_ATTRIBUTES = "CERTIFIED_KEY_ATTRIBUTES"
    # The device itself.
    DEVICE_REVOKED = "DEVICE_REVOKED"


@dataclass(frozen=True)
class Failure:
    """One failed (or, among warnings, noteworthy) check."""

    code: Code
    subject: str
    expected: str = ""
    got: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "code": self.code.value,
            "subject": self.subject,
            "expected": self.expected,
            "got": self.got,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class TrustVector:
    instance_identity: int = NO_CLAIM
    configuration: int = NO_CLAIM
    executables: int = NO_CLAIM
    file_system: int = NO_CLAIM
    hardware: int = NO_CLAIM
    runtime_opaque: int = NO_CLAIM
    storage_opaque: int = NO_CLAIM
    sourced_data: int = NO_CLAIM

    def as_ear(self) -> dict[str, int]:
        """The ``ear.trustworthiness-vector`` object (claims with no value omitted)."""
        out = {}
        for claim in Claim:
            value = getattr(self, claim.name.lower())
            if value != NO_CLAIM:
                out[claim.value] = value
        return out

    def worse(self, **claims: int) -> TrustVector:
        """A copy where each named claim takes the worse (higher-tier) value."""
        changes = {}
        for name, value in claims.items():
            current = getattr(self, name)
            if current == NO_CLAIM or tier(value).rank > tier(current).rank:
                changes[name] = value
        return replace(self, **changes)

    @property
    def status(self) -> Status:
        worst = Status.NONE
        for claim in Claim:
            t = tier(getattr(self, claim.name.lower()))
            if t.rank > worst.rank:
                worst = t
        return worst


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one appraisal."""

    status: Status
    trust_vector: TrustVector
    failures: tuple[Failure, ...] = ()
    warnings: tuple[Failure, ...] = ()
    appraised_at_ms: int = 0
    policy_name: str = ""
    policy_version: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def affirming(self) -> bool:
        return self.status is Status.AFFIRMING

    def codes(self) -> list[str]:
        return [f.code.value for f in self.failures]


def with_failures(verdict: Verdict, failures: tuple[Failure, ...], **claims: int) -> Verdict:
    """The verdict with more failures: the named claims lowered, the status recomputed."""
    if not failures:
        return verdict
    tv = verdict.trust_vector.worse(**claims)
    status = tv.status
    if status is not Status.CONTRAINDICATED:
        status = Status.CONTRAINDICATED  # every failure contraindicates
    return replace(verdict, status=status, trust_vector=tv, failures=verdict.failures + failures)
