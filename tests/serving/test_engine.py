"""The engine against transformers on the same weights, and its bookkeeping under churn."""
import asyncio
import inspect
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler import SamplingParams
from serving.llm import LLM

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, and show your work. " * 2
PROMPTS = ["hello", "The quick brown fox jumps over the lazy dog",
           "import os\nimport sys\n\ndef main():\n    return 0\n", "a b c d e f g h i j k l m n o p",
           "1 2 3", "Once upon a time, in a land far away, there lived a dragon who loved numbers " * 3,
           "x", "What is the capital of France? Please explain the history too."]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' own KV cache (generate's min_new_tokens would mask
    EOS, which ignore_eos does not)."""
    tokens = []
    with torch.no_grad():
        out = hf_model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(max_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = hf_model(torch.tensor([[token]]), use_cache=True, **_cache_of(hf_model, out))
    return tokens


def _cache_of(hf_model, out) -> dict:
    """The next call's KV-cache argument: transformers 5.25 renamed past_key_values (argument and output) to
    cache, and warns that the old name goes in 5.40."""
    if "cache" in inspect.signature(hf_model.forward).parameters:
        return {"cache": out["cache"]}
    return {"past_key_values": out.past_key_values}


def greedy(max_tokens=MAX_TOKENS, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_matches_transformers_chunked_with_prefix_hits(tiny_model_dir, hf_model):
    # a 24-token budget splits the longer prompts into chunks; block size 4 makes many blocks
    llm = LLM(tiny_model_dir, max_num_batched_tokens=24, block_size=4, num_blocks_override=512)
    prompts = [SYSTEM + p for p in PROMPTS]
    llm.generate([SYSTEM], greedy(1))  # publish the shared system prompt's blocks
    results = llm.generate(prompts, greedy())
    for result in results:
        expected = hf_greedy(hf_model, result.prompt_token_ids, MAX_TOKENS)
        assert result.outputs[0].token_ids == expected, result.prompt
        assert result.num_cached_tokens >= 4 * (len(llm.tokenizer.encode(SYSTEM)) // 4) - 4
    llm.engine.check_integrity()
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_greedy_matches_transformers_under_preemption(tiny_model_dir, hf_model):
    # 40 blocks of 4 tokens cannot hold 8 requests of ~30 tokens at once: requests get preempted
    # (the context is capped at what the pool holds, or the engine refuses to start)
    llm = LLM(tiny_model_dir, max_num_batched_tokens=64, block_size=4, num_blocks_override=40,
              max_model_len=160, enable_prefix_caching=False)
    results = llm.generate(PROMPTS, greedy(16))
    assert llm.engine.scheduler.num_preemptions > 0
    for result in results:
        assert result.outputs[0].token_ids == hf_greedy(hf_model, result.prompt_token_ids, 16)
    llm.engine.check_integrity()


def test_seed_determinism_and_n(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=123, n=2, ignore_eos=True)
    a = llm.generate(["tell me a story"], params)[0]
    b = llm.generate(["tell me a story", "other prompt in the batch"], [params, params])[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids  # n=2 choices are seeded differently
    c = llm.generate(["tell me a story"], params.clone(seed=124))[0]
    assert c.outputs[0].token_ids != a.outputs[0].token_ids


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=s, ignore_eos=True)
              for s in range(8)]
    roomy = LLM(tiny_model_dir, block_size=4, num_blocks_override=512)
    tight = LLM(tiny_model_dir, block_size=4, num_blocks_override=40, max_model_len=160,
                enable_prefix_caching=False)
    expected = [r.outputs[0].token_ids for r in roomy.generate(PROMPTS, params)]
    got = [r.outputs[0].token_ids for r in tight.generate(PROMPTS, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_stop_string_across_tokens(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    full = llm.generate(["the stop test"], greedy(24))[0].outputs[0]
    # a stop string that starts inside one token and ends inside a later one
    text = full.text
    start = len(text) // 3
    stop = text[start:start + 5]
    first = text.find(stop)
    out = llm.generate(["the stop test"], greedy(24, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    inc = llm.generate(["the stop test"], greedy(24, stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.outputs[0].text == text[:first + len(stop)]


def test_stop_token_and_length(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    full = llm.generate(["count"], greedy(8))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = llm.generate(["count"], greedy(8, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[:first + 1]


def test_logprobs_match_transformers(tiny_model_dir, hf_model):
    llm = LLM(tiny_model_dir)
    result = llm.generate(["logprob check"], greedy(4, logprobs=3))[0]
    ids = result.prompt_token_ids + result.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    n = len(result.prompt_token_ids)
    for i, lp in enumerate(result.outputs[0].logprobs):
        assert lp.token_id == ids[n + i]
        assert lp.logprob == pytest.approx(ref[n + i - 1, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[n + i - 1].topk(3).indices.tolist()


def test_async_engine_churn_with_aborts_leaves_no_leaks(tiny_model_dir):
    from serving.config import Config
    from serving.engine.async_llm import AsyncLLM

    config = Config().replace(model=tiny_model_dir, block_size=4, num_blocks_override=96, max_model_len=384,
                              max_num_seqs=16, max_num_batched_tokens=64)
    engine = AsyncLLM.from_config(config)
    rng = random.Random(0)
    tokenizer = engine.tokenizer
    prefix = tokenizer.encode(SYSTEM)

    async def one(i: int) -> str:
        ids = prefix[: rng.randrange(0, len(prefix))] + [rng.randrange(10, 2000) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 24), seed=i)
        abort_after = rng.choice([None, None, 0, 1, 3])
        seen = 0
        async for out in engine.generate(f"req-{i}", ids, params):
            seen += 1
            if abort_after is not None and seen > abort_after:
                return "aborted"  # leaving the loop closes the generator: the engine aborts it
            if out.finished:
                return out.finish_reason
        return "none"

    async def main():
        reasons = []
        for batch in range(6):
            tasks = [asyncio.create_task(one(batch * 50 + i)) for i in range(50)]
            await asyncio.sleep(0.05)
            for t in rng.sample(tasks, 5):
                t.cancel()  # a client that goes away mid-request
            reasons += await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.2)
        free, total = await engine.call(lambda core: (core.kv.pool.num_free_blocks, core.kv.pool.num_blocks))
        await engine.call(lambda core: core.check_integrity())
        stats = engine.get_stats()
        await engine.shutdown()
        return reasons, free, total, stats

    reasons, free, total, stats = asyncio.run(main())
    assert len(reasons) == 300
    assert {"length", "aborted"} <= set(r for r in reasons if isinstance(r, str))
    assert free == total
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.prefix_cache_hits > 0


def test_engine_survives_calls_whose_caller_gave_up(tiny_model_dir):
    """A client that disconnects cancels the future of a call still waiting in the engine's inbox
    (its add_request, its abort). The engine thread must skip such a call, not die completing it.
    (The engine thread of --no-engine-process; the engine process: tests/serving/test_engine_process.py.)"""
    import threading

    from serving.config import Config
    from serving.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_config(Config().replace(model=tiny_model_dir, engine_process=False))
    gate = threading.Event()

    async def main():
        blocker = asyncio.ensure_future(engine.call(lambda core: gate.wait(30)))
        await asyncio.sleep(0.1)  # the engine thread now waits inside that call
        given_up = [asyncio.ensure_future(engine.call(lambda core: None)) for _ in range(3)]

        async def first_output(rid):
            async for out in engine.generate(rid, [5, 6, 7], greedy(4)):
                return out

        gone = [asyncio.ensure_future(first_output(f"gone-{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        for task in given_up + gone:
            task.cancel()  # their calls are queued behind the blocker, never started
        await asyncio.gather(*given_up, *gone, return_exceptions=True)
        gate.set()
        await blocker
        outputs = [o async for o in engine.generate("after", [5, 6, 7], greedy(4))]
        await engine.call(lambda core: core.check_integrity())
        free, total = await engine.call(lambda core: (core.kv.pool.num_free_blocks, core.kv.pool.num_blocks))
        healthy = engine.is_healthy()
        await engine.shutdown()
        return outputs, healthy, free, total

    # bounded: an engine thread that died here used to leave its callers waiting for ever
    outputs, healthy, free, total = asyncio.run(asyncio.wait_for(main(), 120))
    assert healthy
    assert outputs[-1].finished and outputs[-1].num_output_tokens == 4
    assert free == total
    assert engine.core.num_cancelled_calls >= 3


def test_client_id_and_priority_reach_the_request(tiny_model_dir):
    from serving.config import Config
    from serving.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_config(Config().replace(model=tiny_model_dir))

    async def main():
        seen = {}
        async for _ in engine.generate("r", [5, 6, 7], greedy(30), client_id="alice", priority=2):
            if not seen:
                request = await engine.call(lambda e: e.scheduler.requests["r"])
                seen = {"client_id": request.client_id, "priority": request.priority}
        await engine.shutdown()
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 120)) == {"client_id": "alice", "priority": 2}


def test_dead_engine_tells_the_client_that_retrying_here_cannot_help(tiny_model_dir):
    """A bug that kills the engine thread: every request then fails with a message meant for the
    client (it becomes the 503's message), which names no internals. (The engine thread of
    --no-engine-process, which is not restarted; the engine process, which is: test_engine_process.py.)"""
    from serving.api.errors import to_api_error
    from serving.config import Config
    from serving.engine.async_llm import AsyncLLM
    from serving.engine.protocol import EngineDeadError

    engine = AsyncLLM.from_config(Config().replace(model=tiny_model_dir, engine_process=False))

    def broken_schedule():
        raise KeyError("secret internal state")

    async def failure(request_id: str) -> EngineDeadError:
        with pytest.raises(EngineDeadError) as error:
            async for _ in engine.generate(request_id, [5, 6, 7], greedy(4)):
                pass
        return error.value

    async def main():
        await engine.call(lambda core: setattr(core.scheduler, "schedule", broken_schedule))
        errors = [await failure("running"), await failure("after")]
        await engine.shutdown()
        return errors

    for error in asyncio.run(asyncio.wait_for(main(), 120)):
        message = str(error)
        assert "internal error (KeyError)" in message and "until it is restarted" in message
        assert "secret" not in message
        api_error = to_api_error(error, "/v1/completions")
        assert api_error.status == 503 and api_error.message == message
    assert not engine.is_healthy()
