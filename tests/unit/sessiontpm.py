"""Where the unit suite's session TPM keeps its keys, and a selection builder.

The fixtures that create them live in tests/unit/conftest.py; tests import
the handles from here (importing from a conftest module is fragile when
several conftest.py files exist).
"""

from __future__ import annotations

from collections.abc import Sequence

from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPML_PCR_SELECTION, TPMS_PCR_SELECTION

from attestd.agent.tpm import DEFAULT_AK_HANDLE

# DeviceTpm.activate() defaults to DEFAULT_AK_HANDLE, so the RSA AK lives there.
RSA_AK_HANDLE = DEFAULT_AK_HANDLE
ECC_AK_HANDLE = DEFAULT_AK_HANDLE + 1

_BANK_ALG = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}


def tpml_selection(selection: Sequence[tuple[str, Sequence[int]]]) -> TPML_PCR_SELECTION:
    """A TPML_PCR_SELECTION with 3-byte bitmaps; an empty index list gives an empty entry."""
    entries = []
    for bank, indices in selection:
        bitmap = bytearray(3)
        for i in indices:
            bitmap[i // 8] |= 1 << (i % 8)
        entries.append(
            TPMS_PCR_SELECTION(hash=_BANK_ALG[bank], sizeofSelect=3, pcrSelect=bytes(bitmap))
        )
    return TPML_PCR_SELECTION(entries)
