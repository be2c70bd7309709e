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
_KNOWN_KEYS = {"name", "description", "allow_sha1", "pcrs", "eventlog"}
_RULE_KEYS = {
    "require_secure_boot",
    "boot_applications",
    "kernel_cmdline",
    "dbx_contains",
    "forbidden_authorities",
}


@dataclass(frozen=True)
class EventLogRules:
    """Rules on the boot state a device's event log shows (the policy's ``eventlog:``).

    Empty fields impose nothing. Any rule makes an event log required.
    """

    require_secure_boot: bool = False
    # Allowed EV_EFI_BOOT_SERVICES_APPLICATION digests (PCR 4, sha256 bank).
    boot_applications: frozenset[bytes] = frozenset()
    # Allowed kernel command lines: exact strings, or regular expressions that must match whole.
    kernel_cmdline_exact: tuple[str, ...] = ()
    kernel_cmdline_regex: tuple[str, ...] = ()
    # SHA-256 hashes dbx must contain (revocations the platform must carry).
    dbx_contains: frozenset[bytes] = frozenset()
    # SHA-256 fingerprints of certificates that must not have verified boot code.
    forbidden_authorities: frozenset[bytes] = frozenset()

    @property
    def any(self) -> bool:
        return bool(
            self.require_secure_boot
            or self.boot_applications
            or self.kernel_cmdline_exact
            or self.kernel_cmdline_regex
            or self.dbx_contains
            or self.forbidden_authorities
        )

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.require_secure_boot:
            doc["require_secure_boot"] = True
        if self.boot_applications:
            doc["boot_applications"] = sorted(d.hex() for d in self.boot_applications)
        if self.kernel_cmdline_exact or self.kernel_cmdline_regex:
            doc["kernel_cmdline"] = {
                k: list(v)
                for k, v in (
                    ("exact", self.kernel_cmdline_exact),
                    ("regex", self.kernel_cmdline_regex),
                )
                if v
            }
        if self.dbx_contains:
            doc["dbx_contains"] = sorted(d.hex() for d in self.dbx_contains)
        if self.forbidden_authorities:
            doc["forbidden_authorities"] = sorted(d.hex() for d in self.forbidden_authorities)
        return doc


@dataclass(frozen=True)
class Policy:
    """A validated policy. Immutable, its mappings included: appraise_quote keeps data
    derived from a Policy object on it (see attestd.core.quote._FastPolicy)."""

    name: str
    pcrs: Mapping[Bank, Mapping[int, frozenset[bytes]]]
    allow_sha1: bool = False
    description: str = ""
    eventlog: EventLogRules = EventLogRules()

    def selection(self) -> Selection:
        """The PCR selection to quote, in canonical order (bank algorithm id, then index)."""
        return tuple(
            (bank.alg.value, frozenset(self.pcrs[bank]))
            for bank in sorted(self.pcrs, key=lambda b: b.alg.value)
        )

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON-able form (sorted, lowercase hex)."""
        doc: dict[str, Any] = {
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
        if self.eventlog.any:
            doc["eventlog"] = self.eventlog.to_document()
        return doc

    def canonical_json(self) -> str:
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def valid_name(name: str) -> bool:
    """Policy and group names: 1-64 of letters, digits, '.', '_', '-' (not starting with those)."""
    return bool(_NAME_RE.fullmatch(name))


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
    rules = _rules(doc.get("eventlog"), limits)
    return Policy(
        name=name, pcrs=pcrs, allow_sha1=allow_sha1, description=description, eventlog=rules
    )


def _rules(raw: object, limits: Limits) -> EventLogRules:
    if raw is None:
        return EventLogRules()
    if not isinstance(raw, dict):
        raise PolicyError("must be a mapping of rules", field="eventlog")
    unknown = sorted(str(k) for k in raw if k not in _RULE_KEYS)
    if unknown:
        raise PolicyError(f"unknown rule(s): {', '.join(unknown)}", field=f"eventlog.{unknown[0]}")
    secure_boot = raw.get("require_secure_boot", False)
    if not isinstance(secure_boot, bool):
        raise PolicyError("must be true or false", field="eventlog.require_secure_boot")
    exact: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    cmdline = raw.get("kernel_cmdline")
    if cmdline is not None:
        if not isinstance(cmdline, dict) or not cmdline or set(cmdline) - {"exact", "regex"}:
            raise PolicyError(
                "must map 'exact' and/or 'regex' to lists of strings",
                field="eventlog.kernel_cmdline",
            )
        exact = _strings(cmdline.get("exact", []), "eventlog.kernel_cmdline.exact", limits)
        regex = _strings(cmdline.get("regex", []), "eventlog.kernel_cmdline.regex", limits)
        for n, pattern in enumerate(regex):
            try:
                re.compile(pattern)
            except re.error as e:
                raise PolicyError(
                    f"invalid regular expression: {e}", field=f"eventlog.kernel_cmdline.regex[{n}]"
                ) from None
    return EventLogRules(
        require_secure_boot=secure_boot,
        boot_applications=_sha256_list(
            raw.get("boot_applications"), "eventlog.boot_applications", limits
        ),
        kernel_cmdline_exact=exact,
        kernel_cmdline_regex=regex,
        dbx_contains=_sha256_list(raw.get("dbx_contains"), "eventlog.dbx_contains", limits),
        forbidden_authorities=_sha256_list(
            raw.get("forbidden_authorities"), "eventlog.forbidden_authorities", limits
        ),
    )


def _strings(raw: object, where: str, limits: Limits) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > limits.max_digests_per_pcr:
        raise PolicyError(
            f"must be a list of at most {limits.max_digests_per_pcr} strings", field=where
        )
    for n, item in enumerate(raw):
        if not isinstance(item, str) or len(item) > 4096:
            raise PolicyError("must be a string of at most 4096 characters", field=f"{where}[{n}]")
    return tuple(raw)


def _sha256_list(raw: object, where: str, limits: Limits) -> frozenset[bytes]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or not raw:
        raise PolicyError("must be a non-empty list of SHA-256 hex digests", field=where)
    return _digests(raw, Bank.SHA256, where, limits)


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


@dataclass(frozen=True)
class PcrChange:
    bank: Bank
    index: int
    added: tuple[bytes, ...]  # allowed in the newer policy only
    removed: tuple[bytes, ...]  # allowed in the older policy only


@dataclass(frozen=True)
class SettingChange:
    field: str  # dotted path in the policy document
    before: Any  # JSON-able value, None when absent
    after: Any


def diff_policies(old: Policy, new: Policy) -> tuple[list[PcrChange], list[SettingChange]]:
    """What changed from ``old`` to ``new``: digests per bank and PCR, then every other setting.

    A PCR present in only one of them shows all its digests as added or removed.
    """
    pcr_changes: list[PcrChange] = []
    banks = sorted(set(old.pcrs) | set(new.pcrs), key=lambda b: b.alg.value)
    for bank in banks:
        before_bank, after_bank = old.pcrs.get(bank, {}), new.pcrs.get(bank, {})
        for index in sorted(set(before_bank) | set(after_bank)):
            before = before_bank.get(index, frozenset())
            after = after_bank.get(index, frozenset())
            if before != after:
                pcr_changes.append(
                    PcrChange(
                        bank, index, tuple(sorted(after - before)), tuple(sorted(before - after))
                    )
                )
    settings: list[SettingChange] = []
    flat_old, flat_new = _settings(old), _settings(new)
    for key in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(key) != flat_new.get(key):
            settings.append(SettingChange(key, flat_old.get(key), flat_new.get(key)))
    return pcr_changes, settings


def _settings(policy: Policy) -> dict[str, Any]:
    flat: dict[str, Any] = {"description": policy.description, "allow_sha1": policy.allow_sha1}
    for key, value in policy.eventlog.to_document().items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"eventlog.{key}.{sub}"] = subvalue
        else:
            flat[f"eventlog.{key}"] = value
    return flat
