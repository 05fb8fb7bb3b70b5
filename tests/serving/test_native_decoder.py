"""The native decode path (serving/models/native_decoder.py): bit-identical to the model's Python path
for every supported architecture, batch size and layer split, and only where it applies."""
import pytest
import torch

from pdkernels import cpu_native
from kvcache.config import CacheConfig
from scheduler import CachedRequestData, NewRequestData, SamplingParams, Segment, StepPlan
from serving.models.cpu_linear import pack_linears, unpack_linears
from serving.runner.model_runner import ModelRunner
from tests.serving.test_models import CASES, COMMON, save_hf_case

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="needs pdserve's CPU kernel library "
                                "(a C++ compiler); the Python path is what runs without it")

PARAMS = SamplingParams(temperature=0.0, max_tokens=64, logprobs=3, ignore_eos=True)
BLOCK_SIZE = 4


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_case(request.param, path)
    return str(path)


def _runner(model_dir: str, enforce_eager: bool) -> ModelRunner:
    return ModelRunner.load(model_dir, CacheConfig(block_size=BLOCK_SIZE, num_blocks_override=160),
                            torch.device("cpu"), torch.float32, enforce_eager=enforce_eager)


def _count_native_calls(runner: ModelRunner) -> list[int]:
    calls = [0]
    layers = runner.native_decoder.layers

    def counted(*args):
        calls[0] += 1
        return layers(*args)
    runner.native_decoder.layers = counted
    return calls


def _scenario(num_rows: int, seed: int) -> list[StepPlan]:
    """num_rows requests prefilled in one step, then four decode steps of all rows: one plain, one
    split into layer segments [0, 1) [1, L), two plain."""
    gen = torch.Generator().manual_seed(seed)
    plans, next_block, lengths = [StepPlan()], 0, {}
    for i in range(num_rows):
        length = int(torch.randint(1, 30, (1,), generator=gen))
        prompt = torch.randint(0, COMMON["vocab_size"], (length,), generator=gen).tolist()
        num_blocks = -(-(length + 8) // BLOCK_SIZE)
        rid = f"r{i}"
        plans[0].new_requests.append(NewRequestData(rid, prompt, length, PARAMS,
                                                    list(range(next_block, next_block + num_blocks)), 0))
        plans[0].num_scheduled_tokens[rid] = length
        next_block, lengths[rid] = next_block + num_blocks, length
    for step in range(4):
        plan = StepPlan(cached_requests=[CachedRequestData(rid, [], lengths[rid] + step) for rid in lengths],
                        num_scheduled_tokens={rid: 1 for rid in lengths})
        if step == 1:
            plan.segments = [Segment(list(lengths), 0, 1), Segment(list(lengths), 1, None)]
        plans.append(plan)
    return plans


def _run(runner: ModelRunner, plans: list[StepPlan]):
    results = [runner.execute(plan) for plan in plans]
    runner.execute(StepPlan(finished_request_ids=list(runner.states)))
    return [(r.sampled_token_ids, r.logprobs) for r in results]


def test_decode_steps_are_bit_identical_to_the_python_path(model_dir):
    eager, native = _runner(model_dir, enforce_eager=True), _runner(model_dir, enforce_eager=False)
    assert eager.native_decoder is None and native.native_decoder is not None
    calls = _count_native_calls(native)
    for num_rows in (1, 2, 3, 5, 8):
        plans = _scenario(num_rows, seed=num_rows)
        assert _run(native, plans) == _run(eager, plans), f"{num_rows} rows"
        assert torch.equal(native.kv_cache, eager.kv_cache), f"{num_rows} rows: KV caches differ"
    # every decode step took the native path: 4 per scenario, the split one twice (two segments)
    assert calls[0] == 5 * 5


def test_prefill_mixed_and_wide_steps_keep_the_python_path(tiny_model_dir):
    runner = _runner(tiny_model_dir, enforce_eager=False)
    calls = _count_native_calls(runner)
    _run(runner, _scenario(cpu_native.MAX_ROWS + 1, seed=0))
    assert calls[0] == 0  # 9 decode rows: past the kernel's rows
    plans = _scenario(2, seed=1)
    # a prompt scheduled beside the decodes of the third decode step makes that step mixed
    plans[3].new_requests.append(NewRequestData("p", [5, 6, 7], 3, PARAMS, [150], 0))
    plans[3].num_scheduled_tokens["p"] = 3
    _run(runner, plans)
    assert calls[0] == 1 + 2 + 0 + 1  # plain, split in two segments, mixed, plain


def test_a_changed_model_is_not_run_through_stale_weights(tiny_model_dir):
    runner = _runner(tiny_model_dir, enforce_eager=False)
    plans = _scenario(2, seed=3)
    before = _run(runner, plans)
    calls = _count_native_calls(runner)
    unpack_linears(runner.model)
    assert not runner.native_decoder.is_current()
    # the Python path, on the plain layers (MKL's matmul: the same tokens, logprobs within rounding)
    assert [tokens for tokens, _ in _run(runner, plans)] == [tokens for tokens, _ in before] and calls[0] == 0
    runner.bind_native_decoder()
    assert runner.native_decoder is None  # nothing packed: nothing to bind
    pack_linears(runner.model)
    runner.bind_native_decoder()
    calls = _count_native_calls(runner)
    assert _run(runner, plans) == before and calls[0] == 5


def test_bad_inputs_are_refused_before_the_kernels_run(tiny_model_dir):
    runner = _runner(tiny_model_dir, enforce_eager=False)
    layers = runner.native_decoder.layers
    hidden_size = runner.arch.hidden_size
    hidden = torch.randn(2, hidden_size)
    ok = dict(positions=torch.tensor([3, 4]), slots=torch.tensor([3, 9]),
              block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
              seq_lens=torch.tensor([4, 5], dtype=torch.int32))
    layers(0, 1, hidden, None, **ok)
    with pytest.raises(ValueError, match="1-8 rows"):
        layers(0, 1, torch.randn(9, hidden_size), None, **ok)
    with pytest.raises(ValueError, match="layer range"):
        layers(1, 1, hidden, hidden, **ok)
    with pytest.raises(ValueError, match="block_tables"):  # the table does not cover 9 positions
        layers(0, 1, hidden, None, **{**ok, "seq_lens": torch.tensor([4, 9], dtype=torch.int32)})
    with pytest.raises(ValueError, match="rotary table"):
        layers(0, 1, hidden, None, **{**ok, "positions": torch.tensor([3, 10**6])})
    with pytest.raises(IndexError, match="slot"):
        layers(0, 1, hidden, None, **{**ok, "slots": torch.tensor([3, 10**6])})
