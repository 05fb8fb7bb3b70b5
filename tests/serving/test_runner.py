"""The model runner's densest index arithmetic (build_step_inputs), and segments: a prompt run through
its layers in two steps, carried in between, gives exactly the one-step result."""
import numpy as np
import pytest
import torch

from kvcache.config import CacheConfig
from scheduler import CachedRequestData, NewRequestData, SamplingParams, Segment, StepPlan
from serving.runner.input_batch import RunnerRequestState, build_step_inputs
from serving.runner.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _state(rid, token_ids, block_ids, num_computed):
    return RunnerRequestState(rid, list(token_ids), len(token_ids), GREEDY, list(block_ids), num_computed, None)


def test_build_step_inputs_on_the_documented_example():
    # A: a prefill chunk of 3 tokens from position 4; B: one decode token at position 9 (block size 4)
    a = _state("A", range(100, 107), [7, 2], 4)
    b = _state("B", range(200, 210), [5, 1, 8], 9)
    inputs = build_step_inputs([a, b], [3, 1], 4, torch.device("cpu"))
    assert inputs.input_ids.tolist() == [104, 105, 106, 209]
    assert inputs.positions.tolist() == [4, 5, 6, 9]
    assert inputs.attn.query_start_loc.tolist() == [0, 3, 4]
    assert inputs.attn.seq_lens.tolist() == [7, 10]
    assert inputs.attn.slot_mapping.tolist() == [2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 8 * 4 + 1]
    assert inputs.logits_indices.tolist() == [2, 3] and inputs.sample_request_ids == ["A", "B"]
    assert inputs.attn.block_tables.tolist() == [[7, 2, 0], [5, 1, 8]]
    assert (inputs.attn.max_query_len, inputs.attn.max_seq_len) == (3, 10)


def test_build_step_inputs_against_a_loop_on_random_batches():
    rng = np.random.default_rng(0)
    block_size = 4
    for _ in range(50):
        states, num_tokens = [], []
        next_block = 0
        for i in range(rng.integers(1, 6)):
            length = int(rng.integers(1, 40))
            computed = int(rng.integers(0, length))
            num_blocks = -(-length // block_size)
            blocks = list(rng.permutation(200)[:num_blocks] + 0)
            states.append(_state(f"r{i}", rng.integers(0, 1000, length).tolist(), blocks, computed))
            num_tokens.append(int(rng.integers(1, length - computed + 1)))
            next_block += num_blocks
        inputs = build_step_inputs(states, num_tokens, block_size, torch.device("cpu"))
        ids, positions, slots, samples = [], [], [], []
        row = 0
        for state, n in zip(states, num_tokens):
            for p in range(state.num_computed_tokens, state.num_computed_tokens + n):
                ids.append(state.token_ids[p])
                positions.append(p)
                slots.append(state.block_ids[p // block_size] * block_size + p % block_size)
            row += n
            if state.num_computed_tokens + n >= len(state.token_ids):
                samples.append(row - 1)
        assert inputs.input_ids.tolist() == ids
        assert inputs.positions.tolist() == positions
        assert inputs.attn.slot_mapping.tolist() == slots
        assert inputs.logits_indices.tolist() == samples


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.load(tiny_model_dir, CacheConfig(num_blocks_override=64), torch.device("cpu"), torch.float32)


def _run(runner, plans):
    results = [runner.execute(plan) for plan in plans]
    runner.execute(StepPlan(finished_request_ids=list(runner.states)))
    return results


def test_a_prompt_split_across_steps_by_layers_equals_one_pass(runner):
    prompt = list(range(10, 50))
    blocks = [3, 9, 4]
    new = NewRequestData("p", prompt, len(prompt), GREEDY, blocks, 0)
    (whole,) = _run(runner, [StepPlan([new], num_scheduled_tokens={"p": 40})])
    first = StepPlan([new], num_scheduled_tokens={"p": 40}, segments=[Segment(["p"], 0, 2)])
    second = StepPlan(cached_requests=[CachedRequestData("p", [], 0)], num_scheduled_tokens={"p": 40},
                      segments=[Segment(["p"], 2, None)])
    half, rest = _run(runner, [first, second])
    assert not half.sampled_token_ids  # carried, nothing sampled yet
    assert rest.sampled_token_ids == whole.sampled_token_ids
    assert not runner.carried


def test_layer_groups_within_a_step_and_a_decode_beside_a_carried_prefill(runner):
    """Two chains in one step: a decode row through every layer, and a prefill's first layers."""
    decode_prompt, prefill_prompt = list(range(100, 120)), list(range(300, 333))
    d = NewRequestData("d", decode_prompt, 20, GREEDY, [1, 2], 0)
    p = NewRequestData("p", prefill_prompt, 33, GREEDY, [5, 6, 7], 0)
    # reference: d prefilled and decoded twice, p prefilled, each in plain one-chain steps
    ref = _run(runner, [StepPlan([d], num_scheduled_tokens={"d": 20}),
                        StepPlan([p], [CachedRequestData("d", [], 20)], {"p": 33, "d": 1})])
    grouped = _run(runner, [
        StepPlan([d], num_scheduled_tokens={"d": 20},
                 segments=[Segment(["d"], 0, 1), Segment(["d"], 1, 3), Segment(["d"], 3, None)]),
        StepPlan([p], [CachedRequestData("d", [], 20)], {"p": 33, "d": 1},
                 segments=[Segment(["d"]), Segment(["p"], 0, 3)]),
        StepPlan(cached_requests=[CachedRequestData("p", [], 0)], num_scheduled_tokens={"p": 33},
                 segments=[Segment(["p"], 3, None)])])
    assert grouped[0].sampled_token_ids == ref[0].sampled_token_ids
    assert grouped[1].sampled_token_ids == {"d": ref[1].sampled_token_ids["d"]}
    assert grouped[2].sampled_token_ids == {"p": ref[1].sampled_token_ids["p"]}


def test_a_resumed_segment_without_carried_state_fails_loudly(runner):
    new = NewRequestData("x", [1, 2, 3], 3, GREEDY, [0], 0)
    with pytest.raises(RuntimeError, match="no hidden state was carried"):
        runner.execute(StepPlan([new], num_scheduled_tokens={"x": 3}, segments=[Segment(["x"], 2, None)]))
    runner.execute(StepPlan(finished_request_ids=["x"]))
