"""The engine core of an instance: an EngineCore that keeps its KV connector told, on the engine thread.

The decode side's KV receiver writes into blocks from gRPC threads; those blocks belong to a request
the engine may abort at any moment. Telling the connector *before* the engine frees the blocks (both
on the engine thread) is what guarantees that a late chunk never lands in blocks that another request
has been given. Likewise, the reservation is handed to the connector right after the engine made it.
"""
from __future__ import annotations

from scheduler.request import RequestStatus
from serving.config import Config
from serving.disagg.connector import InstanceConnector
from serving.engine.core import EngineCore
from serving.engine.protocol import RequestOutput

ROLES = ("prefill", "decode", "colocated")


class InstanceCore(EngineCore):
    def __init__(self, config: Config, role: str, connector: InstanceConnector) -> None:
        if role not in ROLES:
            raise ValueError(f"instance role must be one of {', '.join(ROLES)}, got {role!r}")
        super().__init__(config, connector=connector, detokenize=False)
        self.role = role
        self.connector = connector
        connector.bind(self.runner.kv_cache, self.model_dir)

    # ---- engine-thread hooks (called through AsyncLLM) ----
    def register_remote(self, request_id: str) -> bool:
        """Decode: hand a just-reserved request's blocks to the receiver. False while the request is
        not (or no longer) waiting for its KV."""
        if request_id not in self.scheduler.remote_waiting:
            return False
        self.connector.expect_recv(request_id, list(self.kv.block_ids(request_id)))
        return True

    def set_first_token(self, request_id: str, token_id: int) -> None:
        super().set_first_token(request_id, token_id)
        self.connector.first_token_arrived(request_id)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       error: str | None = None) -> list[RequestOutput]:
        self.connector.cancel_recvs(request_ids)  # before the blocks go back to the pool
        return super().abort_requests(request_ids, status, error)

    def step(self) -> list[RequestOutput]:
        # receives that failed for good while the policy says fail (not recompute)
        failed = self.connector.take_failed_recvs()
        if not failed:
            return super().step()
        outputs = self.abort_requests(failed, RequestStatus.FINISHED_ERROR,
                                      error="the KV transfer from the prefill instance failed")
        return outputs + super().step()

    # ---- introspection ----
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens admitted but not yet computed (what a new prefill would wait behind)."""
        requests = list(self.scheduler.waiting) + self.scheduler.running
        return sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in requests)

    def integrity(self) -> tuple[bool, str]:
        try:
            self.check_integrity()
        except AssertionError as e:
            return False, str(e) or "check_integrity failed"
        return True, ""
