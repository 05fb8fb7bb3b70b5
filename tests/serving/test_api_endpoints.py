"""The HTTP layer's successful paths, in process (httpx + ASGI) against the fake engine."""
from __future__ import annotations

import pytest

from serving.api import build_app
from serving.config import ServerConfig
from tests.serving.fake_engine import FakeEngine, asgi_client, parse_sse

MODEL = "fake-model"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine():
    return FakeEngine(max_model_len=64)


@pytest.fixture
async def client(engine):
    async with asgi_client(build_app(engine, ServerConfig())) as c:
        yield c


def _greedy(**fields):
    return {"model": MODEL, "temperature": 0, **fields}


@pytest.mark.anyio
async def test_completion_text_prompt_has_openai_shape(client, engine):
    r = await client.post("/v1/completions", json=_greedy(prompt="hello", max_tokens=7))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "hellohe", "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == 12
    assert engine.submitted[0].request_id == body["id"] + "-0"


@pytest.mark.anyio
async def test_prompt_lists_give_prompt_major_choices_with_n(client, engine):
    ids_b = engine.tokenizer.encode("xyz")
    r = await client.post("/v1/completions",
                          json=_greedy(prompt=[engine.tokenizer.encode("ab"), ids_b], n=2,
                                       max_tokens=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "aba"), (1, "aba"), (2, "xyz"), (3, "xyz")]
    assert sorted(s.request_id for s in engine.submitted) == [f"{body['id']}-{i}" for i in range(4)]
    assert all(s.params.n == 1 for s in engine.submitted)
    # the prompt counts once per prompt, the completion once per choice
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 12


@pytest.mark.anyio
async def test_list_of_strings_prompt(client):
    r = await client.post("/v1/completions", json=_greedy(prompt=["ab", "cd"], max_tokens=2))
    assert [c["text"] for c in r.json()["choices"]] == ["ab", "cd"]


@pytest.mark.anyio
async def test_seeded_n_choices_differ_and_repeat(client, engine):
    request = {"model": MODEL, "prompt": "x", "n": 3, "seed": 11, "temperature": 1.0,
               "max_tokens": 12}
    first = (await client.post("/v1/completions", json=request)).json()
    second = (await client.post("/v1/completions", json=request)).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert len(set(texts)) == 3
    assert sorted(s.params.seed for s in engine.submitted[:3]) == [11, 12, 13]


@pytest.mark.anyio
async def test_seed_offset_wraps_inside_int64(client, engine):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2,
                                                   "seed": 2**63 - 1, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert sorted(s.params.seed for s in engine.submitted) == [-(2**63), 2**63 - 1]


@pytest.mark.anyio
async def test_missing_max_tokens_defaults_to_remaining_context(client, engine):
    r = await client.post("/v1/completions", json=_greedy(prompt=["abcd", "ab"]))
    assert r.status_code == 200, r.text
    by_id = {s.request_id: s.params.max_tokens for s in engine.submitted}
    rid = r.json()["id"]
    assert by_id == {f"{rid}-0": 60, f"{rid}-1": 62}
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
async def test_sampling_fields_reach_the_engine(client, engine):
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9,
        "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "stop": "zz", "stop_token_ids": [3], "ignore_eos": True,
        "min_tokens": 1, "include_stop_str_in_output": True, "skip_special_tokens": False,
        "user": "someone", "logprobs": 3})
    assert r.status_code == 200, r.text
    p = engine.submitted[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.7, 0.9, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens) == (["zz"], [3], True, 1)
    assert (p.include_stop_str_in_output, p.skip_special_tokens, p.logprobs) == (True, False, 3)


@pytest.mark.anyio
async def test_stop_string_finish_reason_and_stop_reason(client):
    r = await client.post("/v1/completions", json=_greedy(prompt="hello world", stop=["wor"],
                                                          max_tokens=20))
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello "
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "wor")


@pytest.mark.anyio
async def test_completion_logprobs_shape(client):
    r = await client.post("/v1/completions", json=_greedy(prompt="hello", max_tokens=6, logprobs=2))
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]
    assert all(v <= 0 for v in lp["token_logprobs"])
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 3 and top[token] == logprob
        assert all(v <= 0 for v in top.values())


@pytest.mark.anyio
async def test_chat_completion_shape(client, engine):
    r = await client.post("/v1/chat/completions", json=_greedy(
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi "},
                                               {"type": "text", "text": "there"}]}],
        max_completion_tokens=4))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    expected_prompt = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        add_generation_prompt=True, tokenize=True)["input_ids"]
    assert engine.submitted[0].prompt_token_ids == expected_prompt
    assert engine.submitted[0].params.max_tokens == 4
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    # greedy echo of the templated prompt, special tokens skipped in the text
    assert choice["message"]["content"] == engine.tokenizer.decode(expected_prompt[:4],
                                                                   skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(expected_prompt)


@pytest.mark.anyio
async def test_chat_logprobs_shape(client):
    r = await client.post("/v1/chat/completions", json=_greedy(
        messages=[{"role": "user", "content": "abc"}], max_tokens=3, logprobs=True,
        top_logprobs=2))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]


@pytest.mark.anyio
async def test_streamed_completion_matches_non_streamed(client):
    request = _greedy(prompt="stream me", max_tokens=8, logprobs=1)
    whole = (await client.post("/v1/completions", json=request)).json()["choices"][0]
    r = await client.post("/v1/completions", json={**request, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.anyio
async def test_streamed_chat_with_usage_and_n(client):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hey"}], "n": 2, "seed": 5,
        "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    # the first chunk of each choice announces the role
    first_by_choice = {}
    for c in chunks[:-1]:
        first_by_choice.setdefault(c["choices"][0]["index"], c["choices"][0]["delta"])
    assert first_by_choice == {0: {"role": "assistant", "content": ""},
                               1: {"role": "assistant", "content": ""}}
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        assert c["object"] == "chat.completion.chunk" and c["usage"] is None
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert all(len(t) == 5 for t in texts.values())
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 10


@pytest.mark.anyio
async def test_model_may_be_named_by_path(client, engine):
    r = await client.post("/v1/completions", json={"model": engine.model_info.path,
                                                   "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL


@pytest.mark.anyio
async def test_models_health_version(client, engine):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL and models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == 64
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert (await client.get("/v1/models/other")).status_code == 404
    assert (await client.get("/health")).status_code == 200
    engine.healthy = False
    unhealthy = await client.get("/health")
    assert unhealthy.status_code == 503 and "error" in unhealthy.json()
    assert isinstance((await client.get("/version")).json()["version"], str)


@pytest.mark.anyio
async def test_no_request_left_running(client, engine):
    await client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "n": 3,
                                               "max_tokens": 4, "stream": True})
    await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 2})
    assert engine.active_ids == set()
    assert engine.aborted_ids == set() and engine.abort_calls == []


@pytest.mark.anyio
async def test_user_and_priority_reach_the_engine_from_both_endpoints(client, engine):
    r = await client.post("/v1/completions", json=_greedy(prompt="hi", max_tokens=2, user="alice", n=2,
                                                          priority=3))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json=_greedy(
        messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="bob"))
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", json=_greedy(prompt="hi", max_tokens=2))
    assert [(s.client_id, s.priority) for s in engine.submitted] == [("alice", 3), ("alice", 3), ("bob", 0),
                                                                     ("", 0)]
