"""Offline API in the manner of vLLM's: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from tqdm import tqdm

from scheduler.request import RequestStatus
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.engine import build_engine
from serving.engine.output_processor import OutputProcessor
from serving.engine.protocol import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


class LLM:
    """Synchronous engine for batch inference. Keyword arguments are config keys (as in the CLI,
    with underscores): LLM(model=DIR, max_num_seqs=32, max_num_batched_tokens=512, ...)."""

    def __init__(self, model: str | None = None, config: Config | None = None, **overrides) -> None:
        config = config or Config()
        self.config = config.replace(model=model, **overrides) if (model or overrides) else config
        from transformers import AutoTokenizer
        self.engine = build_engine(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model.tokenizer or self.engine.model_dir)
        self.outputs = OutputProcessor(self.tokenizer)
        self._next_id = 0

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        """Generate for each prompt (text, or a list of token ids); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params or SamplingParams()] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        results, targets = [], {}
        for prompt, params in zip(prompts, params_list):
            text = prompt if isinstance(prompt, str) else None
            token_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
            result = GenerationResult(str(self._next_id), text, token_ids,
                                      [CompletionOutput(i) for i in range(params.n)])
            self._next_id += 1
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                sub_id = f"{result.request_id}-{i}"
                sub_params = params.clone(n=1, seed=seed)
                self.engine.add_request(sub_id, token_ids, sub_params)
                self.outputs.add_request(sub_id, token_ids, sub_params)
                targets[sub_id] = (result, result.outputs[i])
            results.append(result)
        self._run(targets, use_tqdm)
        return results

    def _run(self, targets: dict, use_tqdm: bool) -> None:
        bar = tqdm(total=len(targets), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished():
            outputs, stopped = self.outputs.process(self.engine.step())
            for state in stopped:  # a stop string: the engine stops the request too
                self.engine.abort_requests([state.request_id], RequestStatus.FINISHED_STOPPED, state.stop_hit)
            for out in outputs:
                result, completion = targets[out.request_id]
                completion.text += out.new_text
                completion.token_ids.extend(out.new_token_ids)
                if out.new_logprobs:
                    completion.logprobs = (completion.logprobs or []) + out.new_logprobs
                if out.finished:
                    completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
                    result.num_cached_tokens = out.num_cached_tokens
                    bar.update(1)
        bar.close()
