"""Reference policies: allowed digests per PCR per bank.

A policy document (YAML or JSON) looks like::

    name: default
    description: golden values of the lab fleet
    allow_sha1: false          # SHA-1 banks and signatures only when true
    pcrs:
      sha256:
        0: 3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969
        7: [ "aa…", "bb…" ]     # several allowed values

Validation names the dotted field that is wrong (``pcrs.sha256.7[1]``).
The selection a device must quote is exactly the PCRs the policy lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from attestd.core.errors import PolicyError
from attestd.core.limits import DEFAULT_LIMITS, Limits
from attestd.core.tpm import PCR_COUNT, Bank, Selection

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_RE = re.compile(r"(0x)?[0-9a-fA-F]+")
_KNOWN_KEYS = {"name", "description", "allow_sha1", "pcrs"}


@dataclass(frozen=True)
class Policy:
    name: str
    pcrs: Mapping[Bank, Mapping[int, frozenset[bytes]]]
    allow_sha1: bool = False
    description: str = ""

    def selection(self) -> Selection:
        """The PCR selection to quote, in canonical order (bank algorithm id, then index)."""
        return tuple(
            (bank.alg.value, frozenset(self.pcrs[bank]))
            for bank in sorted(self.pcrs, key=lambda b: b.alg.value)
        )

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON-able form (sorted, lowercase hex)."""
        return {
            "name": self.name,
            "description": self.description,
            "allow_sha1": self.allow_sha1,
            "pcrs": {
                bank.value: {
                    str(i): sorted(d.hex() for d in self.pcrs[bank][i])
                    for i in sorted(self.pcrs[bank])
                }
                for bank in sorted(self.pcrs, key=lambda b: b.alg.value)
            },
        }

    def canonical_json(self) -> str:
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def load_policy_text(text: str, limits: Limits = DEFAULT_LIMITS) -> Policy:
    """Parse and validate a policy document given as YAML or JSON text."""
    if len(text.encode()) > limits.max_policy_size:
        raise PolicyError(f"document exceeds {limits.max_policy_size} bytes", field="document")
    try:
        # JSON is YAML; safe_load never builds arbitrary objects.
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"not valid YAML or JSON{where}", field="document") from None
    return policy_from_document(doc, limits)


def policy_from_document(doc: object, limits: Limits = DEFAULT_LIMITS) -> Policy:
    if not isinstance(doc, dict):
        raise PolicyError("a policy must be a mapping with name and pcrs", field="document")
    unknown = sorted(str(k) for k in doc if k not in _KNOWN_KEYS)
    if unknown:
        raise PolicyError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PolicyError(
            "required; 1-64 characters of letters, digits, '.', '_' or '-'", field="name"
        )
    description = doc.get("description", "") or ""
    if not isinstance(description, str):
        raise PolicyError("must be a string", field="description")
    allow_sha1 = doc.get("allow_sha1", False)
    if not isinstance(allow_sha1, bool):
        raise PolicyError("must be true or false", field="allow_sha1")
    raw_pcrs = doc.get("pcrs")
    if not isinstance(raw_pcrs, dict) or not raw_pcrs:
        raise PolicyError("required: at least one bank with at least one PCR", field="pcrs")
    pcrs: dict[Bank, dict[int, frozenset[bytes]]] = {}
    for bank_name, entries in raw_pcrs.items():
        where = f"pcrs.{bank_name}"
        try:
            bank = Bank.parse(str(bank_name))
        except ValueError as e:
            raise PolicyError(str(e), field=where) from None
        if bank in pcrs:
            raise PolicyError("bank listed twice", field=where)
        if bank is Bank.SHA1 and not allow_sha1:
            raise PolicyError("the SHA-1 bank needs 'allow_sha1: true'", field=where)
        if not isinstance(entries, dict) or not entries:
            raise PolicyError("must map PCR indices to allowed digests", field=where)
        values: dict[int, frozenset[bytes]] = {}
        for index, digests in entries.items():
            index_n = _pcr_index(index, where)
            pwhere = f"{where}.{index_n}"
            if index_n in values:
                raise PolicyError("PCR listed twice", field=pwhere)
            values[index_n] = _digests(digests, bank, pwhere, limits)
        pcrs[bank] = values
    return Policy(name=name, pcrs=pcrs, allow_sha1=allow_sha1, description=description)


def _pcr_index(index: object, where: str) -> int:
    if isinstance(index, bool):
        raise PolicyError("PCR index must be a number 0-23", field=f"{where}.{index}")
    if isinstance(index, str) and re.fullmatch(r"[0-9]{1,2}", index.strip()):
        index = int(index)
    if not isinstance(index, int) or not 0 <= index < PCR_COUNT:
        raise PolicyError("PCR index must be a number 0-23", field=f"{where}.{index}")
    return index


def _digests(raw: object, bank: Bank, where: str, limits: Limits) -> frozenset[bytes]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise PolicyError("at least one allowed digest is required", field=where)
    if len(items) > limits.max_digests_per_pcr:
        raise PolicyError(f"more than {limits.max_digests_per_pcr} digests", field=where)
    out = set()
    for n, item in enumerate(items):
        iwhere = f"{where}[{n}]" if isinstance(raw, list) else where
        # YAML reads an unquoted all-digit hex string as an int; refuse the guess.
        if not isinstance(item, str) or not _HEX_RE.fullmatch(item.strip()):
            raise PolicyError("digest must be a hex string (quote it in YAML)", field=iwhere)
        text = item.strip().lower().removeprefix("0x")
        if len(text) != 2 * bank.digest_size:
            raise PolicyError(
                f"a {bank.value} digest is {bank.digest_size} bytes "
                f"({2 * bank.digest_size} hex digits), got {len(text)} hex digits",
                field=iwhere,
            )
        out.add(bytes.fromhex(text))
    return frozenset(out)
