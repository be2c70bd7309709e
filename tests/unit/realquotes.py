"""Real-world quotes from ../shared/vectors/quotes (see that directory's README)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GCP_QUOTE = REPO.parent / "shared" / "vectors" / "quotes" / "windows_gcp_shielded_vm.json"


@dataclass(frozen=True)
class GcpQuote:
    """go-attestation's Windows Shielded VM quote: RSA-2048 AK, SHA-1 throughout."""

    ak_public: bytes  # TPMT_PUBLIC, RSASSA-SHA1
    quote: bytes  # TPMS_ATTEST over an empty nonce
    signature: bytes  # TPMT_SIGNATURE
    pcrs: dict[str, dict[int, bytes]]  # the sha1 bank, PCRs 0-23


def load_gcp_quote(path: Path = GCP_QUOTE) -> GcpQuote:
    doc = json.loads(path.read_text())
    b64 = base64.b64decode
    assert doc["Quote"]["Alg"] == 4  # TPM_ALG_SHA1
    pcrs = {}
    for entry in doc["Log"]["PCRs"]:
        assert entry["DigestAlg"] == 3  # SHA-1 in go-attestation's crypto.Hash numbering
        pcrs[entry["Index"]] = b64(entry["Digest"])
    return GcpQuote(
        ak_public=b64(doc["AK"]["Public"]),
        quote=b64(doc["Quote"]["Quote"]),
        signature=b64(doc["Quote"]["Signature"]),
        pcrs={"sha1": pcrs},
    )
