"""The engine on CUDA (Triton kernels, paged cache on the device) against transformers on the same
device and weights. Skipped without a CUDA device; `make gpu-check` runs it."""
import pytest
import torch

from scheduler import SamplingParams
from serving.llm import LLM
from tests.serving.test_engine import PROMPTS, SYSTEM

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_on_cuda_matches_transformers_on_cuda(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).cuda().eval()
    llm = LLM(tiny_model_dir, device="cuda", dtype=dtype, max_num_batched_tokens=24, block_size=16,
              num_blocks_override=256)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = llm.generate([SYSTEM + p for p in PROMPTS], params)
    mismatches = 0
    for result in results:
        ids = torch.tensor([result.prompt_token_ids], device="cuda")
        expected = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        mismatches += result.outputs[0].token_ids != expected.tolist()
    # float32 must match exactly; bfloat16 rounds differently in fused kernels: allow one prompt to drift
    assert mismatches <= (0 if dtype == "float32" else 1)
    llm.engine.check_integrity()
