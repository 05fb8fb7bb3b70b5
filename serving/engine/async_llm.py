"""AsyncLLM: the colocated EngineClient. Tokenizer and output processing on the event loop; the
engine core in a process of its own (EngineProcess), or on a thread of this one (EngineThread,
--no-engine-process). Both take the same calls.

Each request's EngineCoreOutputs (token ids) become RequestOutputs (text deltas, stop strings) in its
own RequestState, on the event loop: the engine only schedules and computes. A stop string
finishes the request for the client at once and tells the engine to stop it.

A dead engine process fails the requests it held with EngineDeadError (a 503 or a stream's error
event) and is started again; requests that come while it starts fail at once the same way, and
/health says 503, until it is back.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, AsyncIterator, Callable

from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.engine import Engine, build_engine, resolve_model_dir
from serving.engine.cpu_placement import engine_placement
from serving.engine.engine_process import EngineProcess
from serving.engine.engine_thread import EngineThread
from serving.engine.output_processor import RequestState
from serving.engine.protocol import EngineStats, ModelInfo, RequestOutput


def stop_request(request_id: str, stop_reason: int | str, engine: Engine) -> None:
    """Engine side: a stop string matched; the rest of the request's output is not needed."""
    engine.abort_requests([request_id], RequestStatus.FINISHED_STOPPED, stop_reason)


class AsyncLLM:
    def __init__(self, core: EngineProcess | EngineThread, tokenizer, served_model_name: str | None = None) -> None:
        self.core = core
        self.tokenizer = tokenizer
        info = core.info
        self.model_info = ModelInfo(name=served_model_name or info.model_dir, path=info.model_dir,
                                    max_model_len=info.max_model_len, created=int(time.time()))

    @classmethod
    def from_config(cls, config: Config) -> "AsyncLLM":
        from transformers import AutoTokenizer
        model_dir = resolve_model_dir(config.model.model)  # here: the built-in model is made once
        engine_config = config.replace(model=model_dir)
        if config.deploy.engine_process:
            core = EngineProcess(engine_config, restart=True,
                                 placement=engine_placement(bind=config.deploy.cpu_threads_bind))
        else:
            core = EngineThread(build_engine(engine_config))
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or model_dir)
        # like vLLM: the name is what --model said; the built-in model is called by its folder name
        name = config.model.served_model_name or config.model.model or os.path.basename(model_dir)
        return cls(core, tokenizer, name)

    # ---- EngineClient ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       client_id: str = "", priority: int = 0) -> AsyncIterator[RequestOutput]:
        state = RequestState(request_id, self.tokenizer, prompt_token_ids, params)
        async for output in self.core.generate(request_id, prompt_token_ids, params, client_id=client_id,
                                               priority=priority):
            client_output = state.process(output)
            if client_output is None:
                continue
            if state.stop_hit is not None:  # stop the engine; the rest of its stream is not needed
                self.core.post(functools.partial(stop_request, request_id, state.stop_hit))
            yield client_output
            if client_output.finished:
                return

    async def abort(self, request_id: str) -> None:
        await self.core.abort(request_id)

    def is_healthy(self) -> bool:
        return self.core.is_healthy()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    async def refresh_stats(self) -> None:
        await self.core.refresh_stats()

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) where the engine runs, between steps (tests, admin). In an engine process,
        fn and its result travel pickled (cloudpickle: lambdas are fine)."""
        return await self.core.call(fn)

    async def shutdown(self) -> None:
        await self.core.shutdown()
        if isinstance(self.core, EngineThread):
            self.core.engine.close()
