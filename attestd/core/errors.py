"""The errors the pure core raises.

Two kinds, kept apart (as python-tuf keeps bad metadata apart from misuse):

- ``EvidenceError`` and its subclasses: the bytes or values a device or an
  author sent are unusable. Each carries a stable ``code`` and the ``field``
  it is about, so callers map it to an RPC status or an exit code without
  parsing messages. No ``struct.error``/``IndexError``/``ValueError`` from a
  parse escapes as anything else.
- ``RuntimeError`` for calling the core wrongly (a bug, not bad evidence).
"""

from __future__ import annotations


class EvidenceError(Exception):
    """Untrusted input is malformed or refused.

    ``code`` is stable and documented in docs/api.md; ``field`` names the
    request field or structure member; ``offset`` is the byte offset inside
    that field where parsing stopped, when it applies.
    """

    code: str = "MALFORMED"

    def __init__(
        self, message: str, *, field: str = "", code: str | None = None, offset: int | None = None
    ) -> None:
        if code is not None:
            self.code = code
        self.field = field
        self.offset = offset
        where = f"{field}: " if field else ""
        at = f" (at byte {offset})" if offset is not None else ""
        super().__init__(f"{where}{message}{at}")


class MalformedError(EvidenceError):
    """A TPM structure or file could not be parsed within its bounds."""

    code = "MALFORMED"


class PolicyError(EvidenceError):
    """A policy document is invalid; ``field`` is the dotted path of the problem."""

    code = "POLICY_INVALID"


class EnrollmentError(EvidenceError):
    """Enrollment evidence (EK certificate, EK, AK) is refused."""

    code = "ENROLLMENT_REFUSED"
