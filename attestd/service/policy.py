"""attestd.v1.Policy: publish and read reference-value policies."""

from __future__ import annotations

import json

import grpc

from attestd.core.policy import load_policy_text
from attestd.service.errors import ServiceError
from attestd.service.state import ServiceState
from attestd.store.base import PolicyRecord
from attestd.v1 import policy_pb2, policy_pb2_grpc


def _info(record: PolicyRecord) -> policy_pb2.PolicyInfo:
    return policy_pb2.PolicyInfo(
        name=record.name,
        version=record.version,
        created_at_ms=record.created_at_ms,
        digest=record.digest,
    )


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION``."""
    name, _, version = ref.partition("@")
    if not name:
        raise ServiceError("name: required", "MALFORMED")
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ServiceError(f"name: version {version!r} must be a positive number", "MALFORMED")
    return name, int(version)


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    async def PutPolicy(
        self, request: policy_pb2.PutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        policy = load_policy_text(request.document, self.s.config.limits)
        record = await self.s.store(
            self.s.store.store.put_policy,
            policy.name,
            policy.to_document(),
            policy.digest(),
            self.s.now_ms(),
        )
        return _info(record)

    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.PolicyDocument:
        name, version = parse_ref(request.name)
        record = await self.s.store(self.s.store.store.get_policy, name, version)
        return policy_pb2.PolicyDocument(
            info=_info(record),
            document=json.dumps(record.document, sort_keys=True, separators=(",", ":")),
        )

    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        records = await self.s.store(self.s.store.store.list_policies)
        return policy_pb2.ListPoliciesResponse(policies=[_info(r) for r in records])
