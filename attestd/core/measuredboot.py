"""The boot event log against the quote: replay, event semantics, policy rules.

PCR values say that something changed; the event log says what. But the log
is unsigned: it is worth exactly as much as its replay agrees with PCR values
the TPM signed. So, in order:

1. Every quoted PCR the log covers must equal the log's replay (TCG PFP 10.2
   "the event log is a record of the extends"); a quoted PCR with a
   non-reset value and no events is not explained by the log.
2. The PCRs the policy's rules read (7 for Secure Boot state and
   authorities, 4 for boot applications, 8 and 9 for the boot loader's
   commands and the kernel command line, and whichever PCR a found command line
   sits in, e.g. 12 for systemd-boot) must be quoted and replay-verified;
   otherwise a rule would judge unverified bytes.
3. Event semantics (known tampering, digests checked against data).
4. The boot state extracted from the log meets the policy's rules.

Pure: the parsed log, the signed PCR values and the rules come in; failures
and the boot state go out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attestd.core.bootstate import check_events, evaluate_rules, extract_state
from attestd.core.errors import MalformedError
from attestd.core.eventlog import EventLog, EventType, replay
from attestd.core.policy import EventLogRules
from attestd.core.tpm import Bank
from attestd.core.verdict import Code, Failure

# Which PCRs each rule reads its facts from (TCG PC Client PFP, PCR usage).
SECURE_BOOT_PCRS = frozenset({7})
BOOT_APPLICATION_PCRS = frozenset({4})
KERNEL_CMDLINE_PCRS = frozenset({8})  # grub; plus wherever a command line is found


def rule_pcrs(rules: EventLogRules) -> frozenset[int]:
    needed: set[int] = set()
    if rules.require_secure_boot or rules.dbx_contains or rules.forbidden_authorities:
        needed |= SECURE_BOOT_PCRS
    if rules.boot_applications:
        needed |= BOOT_APPLICATION_PCRS
    # Command-line rules add the PCRs the lines were found in (see appraise_boot).
    return frozenset(needed)


def _reset_values(size: int) -> tuple[bytes, bytes]:
    # PCRs reset to zeros, the DRTM PCRs 17-22 to all ones (PC Client PTP).
    return bytes(size), b"\xff" * size


@dataclass(frozen=True)
class BootAppraisal:
    failures: tuple[Failure, ...]
    # The extracted boot state (BootState.to_json()), when the log was consistent with the quote.
    state: dict[str, Any] | None


def appraise_boot(
    log: EventLog | None,
    signed_pcrs: Mapping[Bank, Mapping[int, bytes]],
    rules: EventLogRules,
) -> BootAppraisal:
    """Check ``log`` against PCR values the quote's signature vouches for."""
    if log is None:
        if rules.any:
            return BootAppraisal(
                (
                    Failure(
                        Code.EVENTLOG_MISSING,
                        "event_log",
                        "a boot event log",
                        "none",
                        "the policy has event-log rules, so the device must send its log",
                    ),
                ),
                None,
            )
        return BootAppraisal((), None)

    failures: list[Failure] = []
    replayed = replay(log)
    verified: set[int] = set()
    for bank, values in sorted(signed_pcrs.items(), key=lambda kv: kv[0].alg.value):
        bank_replay = replayed.get(bank)
        for index, quoted in sorted(values.items()):
            subject = f"pcr[{bank.value}:{index}]"
            if bank_replay is not None and index in bank_replay:
                if bank_replay[index] == quoted:
                    verified.add(index)
                else:
                    failures.append(
                        Failure(
                            Code.EVENTLOG_REPLAY_MISMATCH,
                            subject,
                            quoted.hex(),
                            bank_replay[index].hex(),
                            f"the event log replays to another PCR {index} than the TPM quoted",
                        )
                    )
            elif bank_replay is not None and quoted not in _reset_values(len(quoted)):
                # Extended, yet the log has no event for it.
                failures.append(
                    Failure(
                        Code.EVENTLOG_PCR_UNEXPLAINED,
                        subject,
                        "events in the log for this PCR",
                        quoted.hex(),
                        f"PCR {index} was extended but the log does not say by what",
                    )
                )
    if failures:
        # The log is not the record of this boot: judging its contents would judge fiction.
        return BootAppraisal(tuple(failures), None)
    try:
        state = extract_state(log)
        needed = set(rule_pcrs(rules))
        if rules.kernel_cmdline_exact or rules.kernel_cmdline_regex:
            # Command lines are judged where they were found (grub: 8, systemd-boot: 12);
            # finding none is judged on a verified PCR 8.
            needed |= {c.pcr for c in state.kernel_cmdlines} or set(KERNEL_CMDLINE_PCRS)
        for index in sorted(needed - verified):
            failures.append(
                Failure(
                    Code.EVENTLOG_PCR_UNEXPLAINED,
                    f"pcr[{index}]",
                    "quoted and matching the log",
                    "not verified",
                    f"the policy's event-log rules read PCR {index}, which the quote and the "
                    "log do not both cover",
                )
            )
        if failures:
            return BootAppraisal(tuple(failures), None)
        failures.extend(check_events(log))
        failures.extend(_unjudged_events(log, rules))
        failures.extend(evaluate_rules(state, rules))
    except MalformedError as e:
        # Replay agreed with the TPM, so the device really measured these bytes: a named
        # failure in the verdict (not an RPC error after the nonce is spent).
        return BootAppraisal(
            (*failures, Failure(Code.EVENT_DATA_MALFORMED, f"event_log@{e.offset}", detail=str(e))),
            None,
        )
    # Boot state is only worth keeping when the log replayed against a quoted bank.
    return BootAppraisal(tuple(failures), state.to_json() if verified else None)


# PCR 4 events a boot-application rule can judge, or that carry no code.
_PCR4_JUDGED = frozenset(
    {
        EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
        EventType.EV_EFI_ACTION,
        EventType.EV_SEPARATOR,
        EventType.EV_NO_ACTION,
    }
)
_SPDM = frozenset(
    {
        EventType.EV_EFI_SPDM_FIRMWARE_BLOB,
        EventType.EV_EFI_SPDM_FIRMWARE_CONFIG,
        0x800000E3,
        0x800000E4,
    }
)


def _unjudged_events(log: EventLog, rules: EventLogRules) -> list[Failure]:
    """Events a rule would have to judge but cannot: fail closed instead of looking away.

    An application relabelled (say, as a boot services driver) in PCR 4 would escape
    ``boot_applications``; an authority relabelled as an SPDM event in PCR 7 would
    escape ``forbidden_authorities``.
    """
    out = []
    for e in log.events:
        if rules.boot_applications and e.pcr == 4 and e.type not in _PCR4_JUDGED:
            out.append(
                Failure(
                    Code.EVENT_TYPE_UNEXPECTED,
                    f"event[{e.number}] pcr 4 {e.type_name}",
                    "boot applications, actions or separators",
                    e.type_name,
                    "the boot_applications rule cannot judge this PCR 4 event",
                )
            )
        if rules.forbidden_authorities and e.pcr == 7 and e.type in _SPDM:
            out.append(
                Failure(
                    Code.EVENT_TYPE_UNEXPECTED,
                    f"event[{e.number}] pcr 7 {e.type_name}",
                    "no SPDM events",
                    e.type_name,
                    "the forbidden_authorities rule cannot judge SPDM authority events",
                )
            )
    return out
