"""`pdserve serve --preemption-mode swap` as a user runs it: concurrent requests through the openai
client on a KV pool too small for them swap each other out, get exactly what an engine that never
preempts gives, and /metrics says what happened."""
from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

from scheduler import SamplingParams
from serving.llm import LLM
from tests.servers import free_port, start_server, stop_server
from tests.serving.test_engine import PROMPTS

pytestmark = pytest.mark.slow


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _reference(model_dir: str, prompts: list[str]) -> list[str]:
    """What an engine with room for every request (never preempting) answers."""
    llm = LLM(model_dir, block_size=4, num_blocks_override=512, max_model_len=160)
    return [r.outputs[0].text for r in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                          ignore_eos=True))]


def _complete_all(port: int, prompts: list[str]) -> list[str]:
    """Every prompt at once through the openai client (greedy, 24 tokens each)."""
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    model = api.models.list().data[0].id

    def complete(prompt: str) -> str:
        reply = api.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
        return reply.choices[0].text
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(complete, prompts))


def test_the_server_swaps_under_memory_pressure_and_counts_it(tiny_model_dir, tmp_path):
    prompts = PROMPTS + [p + " and so on" for p in PROMPTS]
    expected = _reference(tiny_model_dir, prompts)
    port = free_port()
    process = start_server(["--model", tiny_model_dir, "--block-size", "4", "--num-gpu-blocks-override", "40",
                            "--max-model-len", "160", "--no-enable-prefix-caching", "--preemption-mode", "swap",
                            "--swap-space", "0.01", "--log-level", "warning"], port, tmp_path / "server.log", 240)
    try:
        assert _complete_all(port, prompts) == expected
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert _metric(metrics, "pdserve:kv_swap_preemptions_swap_total") > 0
        assert _metric(metrics, "pdserve:kv_swap_swap_out_bytes_total") > 0
        assert _metric(metrics, "pdserve:kv_swap_swap_in_moves_total") > 0
        assert _metric(metrics, "pdserve:kv_swap_preemptions_recompute_total") == 0
        assert _metric(metrics, "pdserve:cpu_cache_usage_perc") == 0  # everything came back
        assert _metric(metrics, "pdserve:num_requests_swapped") == 0
    finally:
        stop_server(process)


def test_a_decode_instance_swaps_and_its_counters_reach_the_router(tiny_model_dir, tmp_path):
    """1P1D with a decode pool too small for its streams: the decode instance swaps (its own KV pool in
    shared memory, a TransferWorker and a SwapWorker side by side); outputs are unchanged and the
    instance's swap counters reach the router's /metrics over the instance gRPC."""
    prompts = PROMPTS + [p + " and so on" for p in PROMPTS]
    expected = _reference(tiny_model_dir, prompts)
    config = tmp_path / "deploy.yaml"
    config.write_text("""
model: {max_model_len: 160}
cache: {block_size: 4, enable_prefix_caching: false}
deploy:
  mode: disaggregated
  num_prefill: 1
  num_decode: 1
  decode_overrides: {num_blocks_override: 48, preemption_mode: swap, swap_space: 0.01}
""")
    port = free_port()
    process = start_server(["--config", str(config), "--model", tiny_model_dir, "--log-level", "warning"], port,
                           tmp_path / "server.log", 300)
    try:
        assert _complete_all(port, prompts) == expected
        metrics = ""
        for _ in range(50):  # the router polls instance stats every health-check interval
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            if "pdserve:kv_swap_preemptions_swap_total" in metrics \
                    and _metric(metrics, "pdserve:kv_swap_preemptions_swap_total") > 0:
                break
            time.sleep(0.2)
        assert _metric(metrics, "pdserve:kv_swap_preemptions_swap_total") > 0
        assert _metric(metrics, "pdserve:kv_swap_swap_in_moves_total") > 0
        assert "pdserve:kv_transfer_kv_swap" not in metrics  # split back out of the transfer map
    finally:
        stop_server(process)
