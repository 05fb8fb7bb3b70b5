"""`pdserve serve --config deploy/1p1d.yaml` as a user runs it: the real CLI process starts its prefill
and decode instances (local launcher), serves the openai client, and stops them all on SIGTERM; with
--step-trace-dir each instance's engine traces its own steps."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import free_port, start_server
from tests.serving.test_disagg_support import (
    KV_BUDGET,
    instance_children,
    make_cases,
    reference_outputs,
    tiny_config,
)

pytestmark = pytest.mark.slow

DEPLOY_1P1D = Path(__file__).resolve().parents[2] / "deploy" / "1p1d.yaml"
STARTUP_TIMEOUT_S = 300.0


def test_serve_disaggregated_from_the_deploy_yaml(tiny_model_dir, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    process = start_server(["--config", str(DEPLOY_1P1D), "--model", tiny_model_dir,
                            "--kv-cache-memory-bytes", KV_BUDGET, "--log-level", "warning",
                            "--step-trace-dir", str(tmp_path / "trace")],
                           port, log_path, STARTUP_TIMEOUT_S)
    try:
        instances = instance_children(process.pid)
        assert len(instances) == 2  # one prefill, one decode

        cases = make_cases("cli", 13, [25, 60], [12])
        expected = reference_outputs(tiny_config(tiny_model_dir), cases)
        api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120)
        model = api.models.list().data[0].id
        for case in cases:
            reply = api.completions.create(model=model, prompt=case.prompt_token_ids, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
            assert reply.choices[0].text == "".join(o.new_text for o in expected[case.request_id])
            assert reply.usage.prompt_tokens == len(case.prompt_token_ids)
            assert reply.usage.completion_tokens == 12
        chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        assert httpx.get(f"{base_url}/metrics", timeout=30).status_code == 200

        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()[-4000:]
        # the server has exited: its instances were stopped (and reaped) before it did
        assert not [pid for pid in instances if os.path.exists(f"/proc/{pid}")], "instances outlived the server"
        # each engine traced its own role's steps: prompts prefilled on one, tokens decoded on the other
        from scheduler import step_trace
        traces = {path.name.split("-")[0]: step_trace.read([path]) for path in (tmp_path / "trace").glob("*.jsonl")}
        assert sorted(traces) == ["decode", "prefill"]
        assert sum(sum(s.prefill) for s in traces["prefill"]) >= sum(len(c.prompt_token_ids) for c in cases)
        assert not any(s.decode for s in traces["prefill"])
        assert sum(len(s.decode) for s in traces["decode"]) >= len(cases) * (12 - 1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
