"""Bounds on every piece of untrusted input, in one place.

Each parser takes these limits rather than hard-coding numbers, so an
operator reads (and a test checks) them here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # TPM structures (TPM 2.0 Part 2 sizes, with room for vendor variation).
    max_attest_size: int = 2048  # TPMS_ATTEST; a 24-PCR, 4-bank quote is < 300 bytes
    max_signature_size: int = 1024  # TPMT_SIGNATURE; RSA-4096 is 512 bytes of signature
    max_public_size: int = 1024  # TPMT_PUBLIC/TPM2B_PUBLIC
    max_tpm2b: int = 512  # any single TPM2B inside those structures
    max_pcr_selections: int = 8  # TPML_PCR_SELECTION.count (HASH_COUNT in practice <= 5)
    max_size_of_select: int = 4  # TPMS_PCR_SELECTION.sizeofSelect: 24 PCRs need 3 bytes
    # Certificates.
    max_certificate_size: int = 8192
    max_intermediates: int = 4
    # Policies.
    max_policy_size: int = 256 * 1024
    max_digests_per_pcr: int = 256
    # Requests.
    max_banks_per_request: int = 4
    # Boot event logs (TCG PFP). Real firmware logs are tens of KB with a few hundred
    # events; dbx is the largest single event (tens of KB).
    max_event_log_size: int = 1024 * 1024
    max_events: int = 10000
    max_event_size: int = 256 * 1024


DEFAULT_LIMITS = Limits()
