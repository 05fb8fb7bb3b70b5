"""EngineCore: one scheduler, one KV pool and one model runner, stepped synchronously.

Every placement mode drives this same object (in-process for colocated serving and the offline LLM
API; inside an instance process in disaggregated mode). It turns token ids into RequestOutputs,
detokenizing incrementally and finishing requests whose text hits a stop string.
"""
from __future__ import annotations

import logging
import os

from transformers import AutoTokenizer

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import RequestTooLargeError, Scheduler
from serving.config import Config
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.protocol import EngineStats, RequestOutput, RequestRejectedError
from serving.engine.validation import check_kv_pool_fits, check_stop_token_ids
from serving.runner.model_runner import ModelRunner, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        from serving.models.default_model import ensure_default_model
        return ensure_default_model()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model!r} is not a local Hugging Face model directory (no config.json); "
                         "pdserve loads models from disk: pass a directory, or make one with "
                         "`pdserve make-model --size tiny --out DIR`")
    return model


class EngineCore:
    def __init__(self, config: Config, runner: ModelRunner | None = None, connector=None,
                 detokenize: bool = True) -> None:
        """detokenize=False: outputs carry token ids only and stop strings are not checked (an instance
        behind a router, which detokenizes for the client)."""
        self.config = config
        self.model_dir = resolve_model_dir(config.model.model)
        device = resolve_device(config.model.device)
        dtype = resolve_dtype(config.model.dtype, device)
        self.runner = runner or ModelRunner(self.model_dir, config.cache, device, dtype, config.model.seed,
                                            connector=connector)
        self.detokenize = detokenize
        self.last_step_idle = True  # the last step computed nothing (only polled transfers)
        arch = self.runner.arch
        self.max_model_len = self._resolve_max_model_len(config.model.max_model_len, arch)
        self.eos_token_ids = arch.eos_token_ids
        self.vocab_size = arch.vocab_size
        check_kv_pool_fits(self.runner.num_blocks, config.cache.block_size, self.max_model_len)
        pool = BlockPool(self.runner.num_blocks, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or self.model_dir)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._awaiting_first_output: set[str] = set()

    @staticmethod
    def _resolve_max_model_len(requested: int | None, arch) -> int:
        limit = arch.max_position_embeddings
        if arch.sliding_window:
            limit = min(limit, arch.sliding_window)
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(f"--max-model-len {requested} exceeds what the model supports ({limit}: "
                             "max_position_embeddings or sliding window); lower it")
        return requested

    # ---- requests ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    client_id: str = "", kv_peer: str | None = None, remote_prefill: bool = False) -> None:
        """Queue a request; RequestRejectedError (a ValueError) says why one cannot be served.

        kv_peer: (prefill instance) send the prompt KV there and finish after the first token.
        remote_prefill: (decode instance) reserve blocks now and wait for the KV and the first token
        (set_first_token); raises NoKVSpaceError when the blocks are not free (backpressure)."""
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejectedError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        check_stop_token_ids(params.stop_token_ids, self.vocab_size)
        try:
            request = Request(request_id, prompt_token_ids, params, self.eos_token_ids,
                              self.max_model_len, client_id, kv_peer=kv_peer, remote_prefill=remote_prefill)
            self.scheduler.add_request(request)
        except (RequestTooLargeError, ValueError) as e:
            raise RequestRejectedError(str(e)) from e
        if self.detokenize:
            self._detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens)
        self._awaiting_first_output.add(request_id)

    def set_first_token(self, request_id: str, token_id: int) -> None:
        """Decode instance: the first output token of a remote-prefilled request."""
        self.scheduler.set_first_token(request_id, token_id)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       error: str | None = None) -> list[RequestOutput]:
        finished = self.scheduler.finish_requests(request_ids, status)
        return [self._make_output(r, [], None, error=error) for r in finished]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ----
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.last_step_idle = plan.is_empty
        try:
            result = self.runner.execute(plan)
        except Exception as e:  # a failed forward fails its requests, not the engine
            logger.exception("step failed; failing its %d requests", len(plan.num_scheduled_tokens))
            return self.abort_requests(list(plan.num_scheduled_tokens), RequestStatus.FINISHED_ERROR,
                                       error=f"internal error during the forward pass: {type(e).__name__}")
        outputs = []
        for request in self.scheduler.update_from_result(plan, result):
            token_id = request.output_token_ids[-1]
            detok = self._detokenizers.get(request.request_id)
            stop = detok.add_tokens([token_id]) if detok else None
            if stop is not None and not request.is_finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED, stop)
            logprob = result.logprobs.get(request.request_id)
            outputs.append(self._make_output(request, [token_id], [logprob] if logprob else None))
        return outputs

    def _make_output(self, request: Request, new_token_ids: list[int], logprobs, error: str | None = None
                     ) -> RequestOutput:
        request_id = request.request_id
        finished = request.is_finished
        detok = self._detokenizers.get(request_id)
        queue_time = None
        if request_id in self._awaiting_first_output:
            self._awaiting_first_output.discard(request_id)
            if request.first_scheduled_time is not None:
                queue_time = request.first_scheduled_time - request.arrival_time
        output = RequestOutput(
            request_id=request_id, new_token_ids=new_token_ids,
            new_text=detok.take_new_text(finished) if detok else "",
            finished=finished, finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None, new_logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens, num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=max(0, request.num_cached_tokens), error=error, queue_time_s=queue_time)
        if finished:
            self._detokenizers.pop(request_id, None)
            self._awaiting_first_output.discard(request_id)
        return output

    # ---- introspection ----
    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv.pool.usage, num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv.num_prefix_queries, prefix_cache_hits=self.kv.num_prefix_hits)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        owners = set(self.scheduler.requests) | self.scheduler.leased
        assert set(self.kv.request_ids) <= owners, "blocks held by an unknown request"
        assert set(self._detokenizers) <= set(self.scheduler.requests), "detokenizer state leaked"
