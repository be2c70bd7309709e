"""attestd.v1.Policy: versioned reference values, device groups, golden capture, dry-run.

Every RPC that changes state lives here, so the role check of a later layer
can allow this service to policy authors and admins only (devices never).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import yaml

from attestd.core.errors import EvidenceError
from attestd.core.eventlog import EventLog, parse_event_log
from attestd.core.groups import RULE_FIELDS, GroupChoice
from attestd.core.policy import Policy, diff_policies, load_policy_text, valid_name
from attestd.core.quote import appraise_values, describe_selection
from attestd.core.tpm import Bank
from attestd.core.verdict import Failure
from attestd.service.access import current_principal
from attestd.service.attestation import failure_pb
from attestd.service.effective import effective_policy, group_choices
from attestd.service.errors import ServiceError
from attestd.service.state import ServiceState
from attestd.store.base import Evidence, GroupRecord, NotFound, PolicyRecord
from attestd.v1 import policy_pb2, policy_pb2_grpc

T = TypeVar("T")

MAX_NOTE = 1024
MAX_ASSIGN = 10000
# Only an affirming verdict earns a credential, so only it counts as passing.
PASSING = ("affirming",)


def _info(record: PolicyRecord) -> policy_pb2.PolicyInfo:
    return policy_pb2.PolicyInfo(
        name=record.name,
        version=record.version,
        created_at_ms=record.created_at_ms,
        digest=record.digest,
        author=record.author,
        change_note=record.change_note,
    )


def parse_ref(
    ref: str, field: str = "name", *, need_version: bool = False
) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION``."""
    name, _, version = ref.partition("@")
    if not name:
        raise ServiceError(f"{field}: required", "MALFORMED")
    if not version:
        if need_version:
            raise ServiceError(f"{field}: give NAME@VERSION", "MALFORMED")
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ServiceError(f"{field}: version {version!r} must be a positive number", "MALFORMED")
    return name, int(version)


async def _named(field: str, call: Awaitable[T]) -> T:
    """Await a store call; a NotFound names the request field it is about."""
    try:
        return await call
    except NotFound as e:
        raise NotFound(f"{field}: {e}", e.code) from None


def _note(note: str) -> str:
    note = note.strip()
    if not note:
        raise ServiceError("change_note: required (say why this version exists)", "MALFORMED")
    if len(note) > MAX_NOTE:
        raise ServiceError(f"change_note: at most {MAX_NOTE} characters", "MALFORMED")
    return note


def _author(author: str, context: grpc.aio.ServicerContext) -> str:
    """Who made a change: the authenticated caller; a declared author is kept beside it."""
    principal = current_principal.get()
    declared = author.strip()
    if principal is None:  # not reachable through the role matrix; kept for safety
        return (declared or str(context.peer()))[:256]
    if declared and declared != principal.name:
        return f"{declared} ({principal.name})"[:256]
    return principal.name[:256]


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    @property
    def _store(self) -> Any:
        return self.s.store.store

    # -- versions ----------------------------------------------------------

    async def PutPolicy(
        self, request: policy_pb2.PutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        policy = load_policy_text(request.document, self.s.config.limits)
        note = _note(request.change_note)
        record = await self.s.store(
            self._store.put_policy,
            policy.name,
            policy.to_document(),
            policy.digest(),
            self.s.now_ms(),
            _author(request.author, context),
            note,
        )
        return _info(record)

    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyDocument:
        name, version = parse_ref(request.name)
        record = await self.s.store(self._store.get_policy, name, version)
        return policy_pb2.PolicyDocument(
            info=_info(record),
            document=json.dumps(record.document, sort_keys=True, separators=(",", ":")),
        )

    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        records = await self.s.store(self._store.list_policies)
        return policy_pb2.ListPoliciesResponse(policies=[_info(r) for r in records])

    async def PolicyHistory(
        self, request: policy_pb2.PolicyHistoryRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        if not request.name:
            raise ServiceError("name: required", "MALFORMED")
        records = await self.s.store(self._store.policy_history, request.name)
        return policy_pb2.ListPoliciesResponse(policies=[_info(r) for r in records])

    async def DiffPolicies(
        self, request: policy_pb2.DiffPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyDiff:
        old_ref = parse_ref(getattr(request, "from"), "from", need_version=True)
        new_ref = parse_ref(request.to, "to", need_version=True)
        old = await self.s.store(self._store.get_policy, *old_ref)
        new = await self.s.store(self._store.get_policy, *new_ref)
        pcrs, settings = diff_policies(self.s.policy_of(old), self.s.policy_of(new))
        diff = policy_pb2.PolicyDiff(
            pcrs=[
                policy_pb2.PcrChange(
                    bank=c.bank.value,
                    index=c.index,
                    added=[d.hex() for d in c.added],
                    removed=[d.hex() for d in c.removed],
                )
                for c in pcrs
            ],
            settings=[
                policy_pb2.SettingChange(
                    field=c.field, to=json.dumps(c.after), **{"from": json.dumps(c.before)}
                )
                for c in settings
            ],
        )
        getattr(diff, "from").CopyFrom(_info(old))
        diff.to.CopyFrom(_info(new))
        return diff

    async def RollbackPolicy(
        self, request: policy_pb2.RollbackPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        name, version = parse_ref(request.name, need_version=True)
        note = _note(request.change_note)
        old = await self.s.store(self._store.get_policy, name, version)
        record = await self.s.store(
            self._store.put_policy,
            name,
            old.document,
            old.digest,
            self.s.now_ms(),
            _author(request.author, context),
            f"rollback to {name}@{version}: {note}",
        )
        return _info(record)

    async def DeletePolicy(
        self, request: policy_pb2.DeletePolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.DeletePolicyResponse:
        if not request.name:
            raise ServiceError("name: required", "MALFORMED")
        if request.name == self.s.config.default_policy:
            raise ServiceError(
                f"{request.name!r} is the server's default policy (for devices in no group)",
                "POLICY_IN_USE",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        await self.s.store(self._store.delete_policy, request.name, self.s.now_ms())
        return policy_pb2.DeletePolicyResponse()

    # -- golden capture ----------------------------------------------------

    async def CapturePolicy(
        self, request: policy_pb2.CapturePolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.CapturePolicyResponse:
        if not request.device_id:
            raise ServiceError("device_id: required", "MALFORMED")
        if not valid_name(request.name):
            raise ServiceError(
                "name: 1-64 characters of letters, digits, '.', '_' or '-'", "MALFORMED"
            )
        await _named("device_id", self.s.store(self._store.get_device, request.device_id))
        evidence: Evidence | None = await self.s.store(
            self._store.latest_evidence, request.device_id
        )
        if evidence is None:
            raise ServiceError(
                "the device has not attested yet: nothing to capture",
                "NO_EVIDENCE",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        if not evidence.values_verified:
            # Never, not even with allow_non_affirming: these values are whatever was sent.
            raise ServiceError(
                "the device's last quote did not verify, so its PCR values are not evidence",
                "EVIDENCE_UNVERIFIED",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        warning = ""
        if evidence.status != "affirming":
            if not request.allow_non_affirming:
                raise ServiceError(
                    f"the device's last verdict was {evidence.status}, not affirming; "
                    "capture anyway only if you know this boot is good (allow_non_affirming)",
                    "CAPTURE_NOT_AFFIRMING",
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
            warning = (
                f"captured from a {evidence.status} attestation: these values were not "
                "accepted by the policy in force; review them before publishing"
            )
        doc = {
            "name": request.name,
            "description": f"captured from {request.device_id} (attestation "
            f"{evidence.attestation_id}, {evidence.status})",
            "allow_sha1": "sha1" in evidence.pcrs,
            "pcrs": {
                bank: {
                    int(i): digest
                    for i, digest in sorted(values.items(), key=lambda kv: int(kv[0]))
                }
                for bank, values in evidence.pcrs.items()
            },
        }
        text = yaml.safe_dump(doc, sort_keys=False)
        load_policy_text(text, self.s.config.limits)  # what we hand out must be publishable
        return policy_pb2.CapturePolicyResponse(
            document=text,
            source_status=evidence.status,
            source_appraised_at_ms=evidence.at_ms,
            warning=warning,
        )

    # -- dry-run -----------------------------------------------------------

    async def DryRunPolicy(
        self, request: policy_pb2.DryRunPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.DryRunPolicyResponse:
        which = request.WhichOneof("candidate")
        if which == "document":
            candidate = load_policy_text(request.document, self.s.config.limits)
        elif which == "ref":
            name, version = parse_ref(request.ref, "ref")
            candidate = self.s.policy_of(await self.s.store(self._store.get_policy, name, version))
        else:
            raise ServiceError("candidate: give a document or a ref", "MALFORMED")
        if request.group:
            await _named("group", self.s.store(self._store.get_group, request.group))
        rows = await self.s.store(self._store.all_evidence)
        choices = await group_choices(self.s, [d for d, _ in rows])
        response = policy_pb2.DryRunPolicyResponse()
        for device, evidence in rows:
            choice = choices[device.device_id]
            _, current = await effective_policy(self.s, device, choice)
            if request.group:
                if choice.group != request.group:
                    continue
            elif current is None or current.name != candidate.name:
                continue
            in_force = self.s.policy_of(current) if current is not None else None
            self._dry_run_one(candidate, in_force, device.device_id, choice, evidence, response)
        return response

    def _dry_run_one(
        self,
        candidate: Policy,
        in_force: Policy | None,
        device_id: str,
        choice: GroupChoice,
        evidence: Evidence | None,
        response: policy_pb2.DryRunPolicyResponse,
    ) -> None:
        if evidence is None or not evidence.values_verified:
            why = "never attested" if evidence is None else "last quote did not verify"
            response.skipped.append(f"{device_id}: {why}")
            return
        pcrs = {
            Bank(bank): {int(i): bytes.fromhex(d) for i, d in values.items()}
            for bank, values in evidence.pcrs.items()
        }
        try:
            log = parse_event_log(evidence.event_log) if evidence.event_log else None
        except EvidenceError as e:  # accepted once; only a tightened limit can refuse it now
            response.skipped.append(f"{device_id}: stored event log unusable: {e}")
            return
        judged = _judge(candidate, pcrs, log)
        if isinstance(judged, str):
            response.skipped.append(f"{device_id}: last quote does not cover {judged}")
            return
        # Like with like: the policy in force judged by the same rules over the same
        # evidence (the stored status also reflects nonce and clock checks no policy changes).
        now = _judge(in_force, pcrs, log) if in_force is not None else None
        current_pass = not now if isinstance(now, tuple) else evidence.status in PASSING
        response.evaluated += 1
        candidate_status = "contraindicated" if judged else "affirming"
        if current_pass == (not judged):
            response.unchanged += 1
            return
        response.changed.append(
            policy_pb2.DryRunDevice(
                device_id=device_id,
                group=choice.group or "",
                current_status="affirming" if current_pass else "contraindicated",
                candidate_status=candidate_status,
                failures=[failure_pb(f) for f in judged],
            )
        )

    # -- groups ------------------------------------------------------------

    def _group_pb(self, g: GroupRecord) -> policy_pb2.Group:
        return policy_pb2.Group(
            name=g.name,
            description=g.description,
            policy_name=g.policy_name,
            policy_version=g.policy_version,
            rules=[policy_pb2.GroupRule(**r) for r in g.rules],
            device_ids=list(g.device_ids),
            is_default=g.name == self.s.config.default_group,
            created_at_ms=g.created_at_ms,
        )

    def _group_record(
        self, request: policy_pb2.CreateGroupRequest | policy_pb2.UpdateGroupRequest
    ) -> GroupRecord:
        if not valid_name(request.name):
            raise ServiceError(
                "name: 1-64 characters of letters, digits, '.', '_' or '-'", "MALFORMED"
            )
        if not request.policy_name:
            raise ServiceError("policy_name: required", "MALFORMED")
        rules = []
        for n, rule in enumerate(request.rules):
            fields = {f: getattr(rule, f) for f in RULE_FIELDS if getattr(rule, f)}
            if not fields:
                raise ServiceError(
                    f"rules[{n}]: give at least one of {', '.join(RULE_FIELDS)}", "MALFORMED"
                )
            rules.append(fields)
        return GroupRecord(
            name=request.name,
            description=request.description[:1024],
            policy_name=request.policy_name,
            policy_version=request.policy_version,
            rules=rules,
            device_ids=(),
            created_at_ms=self.s.now_ms(),
        )

    async def CreateGroup(
        self, request: policy_pb2.CreateGroupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.Group:
        record = await self.s.store(self._store.put_group, self._group_record(request), create=True)
        return self._group_pb(record)

    async def UpdateGroup(
        self, request: policy_pb2.UpdateGroupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.Group:
        record = await self.s.store(
            self._store.put_group, self._group_record(request), create=False
        )
        return self._group_pb(record)

    async def GetGroup(
        self, request: policy_pb2.GetGroupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.Group:
        if not request.name:
            raise ServiceError("name: required", "MALFORMED")
        return self._group_pb(
            await _named("name", self.s.store(self._store.get_group, request.name))
        )

    async def ListGroups(
        self, request: policy_pb2.ListGroupsRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListGroupsResponse:
        groups = await self.s.store(self._store.list_groups)
        return policy_pb2.ListGroupsResponse(groups=[self._group_pb(g) for g in groups])

    async def DeleteGroup(
        self, request: policy_pb2.DeleteGroupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.DeleteGroupResponse:
        if not request.name:
            raise ServiceError("name: required", "MALFORMED")
        if request.name == self.s.config.default_group:
            raise ServiceError(
                f"{request.name!r} is the default group, where new devices land",
                "GROUP_IS_DEFAULT",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        await _named("name", self.s.store(self._store.delete_group, request.name))
        return policy_pb2.DeleteGroupResponse()

    async def AssignDevices(
        self, request: policy_pb2.AssignDevicesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.AssignDevicesResponse:
        if not request.group:
            raise ServiceError("group: required", "MALFORMED")
        if not request.device_ids or len(request.device_ids) > MAX_ASSIGN:
            raise ServiceError(f"device_ids: between 1 and {MAX_ASSIGN} ids", "MALFORMED")
        record = await self.s.store(
            self._store.assign_devices, request.group, list(request.device_ids)
        )
        return policy_pb2.AssignDevicesResponse(group=self._group_pb(record))

    async def UnassignDevices(
        self, request: policy_pb2.UnassignDevicesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UnassignDevicesResponse:
        if not request.device_ids or len(request.device_ids) > MAX_ASSIGN:
            raise ServiceError(f"device_ids: between 1 and {MAX_ASSIGN} ids", "MALFORMED")
        await self.s.store(self._store.unassign_devices, list(request.device_ids))
        return policy_pb2.UnassignDevicesResponse()


def _judge(
    policy: Policy, pcrs: dict[Bank, dict[int, bytes]], log: EventLog | None
) -> tuple[Failure, ...] | str:
    """The policy's failures over stored evidence, or what the evidence does not cover."""
    missing = {
        bank: frozenset(idx) - frozenset(pcrs.get(bank, {})) for bank, idx in policy.pcrs.items()
    }
    missing = {b: m for b, m in missing.items() if m}
    if missing:
        return describe_selection(missing)
    # As a real attestation under this policy would: only the PCRs it selects.
    selected = {bank: {i: pcrs[bank][i] for i in idx} for bank, idx in policy.pcrs.items()}
    return appraise_values(policy, selected, log).failures
