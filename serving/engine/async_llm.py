"""AsyncLLM: the colocated EngineClient. Tokenizer and output processing on the event loop, an Engine
stepped on its EngineThread.

Each request's EngineCoreOutputs (token ids) become RequestOutputs (text deltas, stop strings) in its
own RequestState, on the event loop: the engine thread only schedules and computes. A stop string
finishes the request for the client at once and tells the engine to stop it.
"""
from __future__ import annotations

import os
import time
from typing import Any, AsyncIterator, Callable

from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.engine import Engine, build_engine
from serving.engine.engine_thread import EngineThread
from serving.engine.output_processor import RequestState
from serving.engine.protocol import EngineStats, ModelInfo, RequestOutput


class AsyncLLM:
    def __init__(self, engine: Engine, tokenizer, served_model_name: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_info = ModelInfo(name=served_model_name or engine.model_dir, path=engine.model_dir,
                                    max_model_len=engine.max_model_len, created=int(time.time()))
        self.thread = EngineThread(engine)

    @classmethod
    def from_config(cls, config: Config) -> "AsyncLLM":
        from transformers import AutoTokenizer
        engine = build_engine(config)
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or engine.model_dir)
        # like vLLM: the name is what --model said; the built-in model is called by its folder name
        name = config.model.served_model_name or config.model.model or os.path.basename(engine.model_dir)
        return cls(engine, tokenizer, name)

    # ---- EngineClient ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       client_id: str = "", priority: int = 0) -> AsyncIterator[RequestOutput]:
        state = RequestState(request_id, self.tokenizer, prompt_token_ids, params)
        async for output in self.thread.generate(request_id, prompt_token_ids, params, client_id=client_id,
                                                 priority=priority):
            client_output = state.process(output)
            if client_output is None:
                continue
            if state.stop_hit is not None:  # stop the engine; the rest of its stream is not needed
                self.thread.post(lambda engine: engine.abort_requests(
                    [request_id], RequestStatus.FINISHED_STOPPED, state.stop_hit))
            yield client_output
            if client_output.finished:
                return

    async def abort(self, request_id: str) -> None:
        await self.thread.abort(request_id)

    def is_healthy(self) -> bool:
        return self.thread.is_healthy()

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()  # plain reads of ints: fine to race the engine thread

    async def refresh_stats(self) -> None:
        """Stats are read live: nothing to refresh."""

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (tests, admin)."""
        return await self.thread.call(fn)

    async def shutdown(self) -> None:
        await self.thread.shutdown()
        self.engine.close()
