"""Every bad input and every engine failure gets OpenAI's error shape and the right status, and
the server keeps serving after each (in process, httpx + ASGI, fake engine)."""
from __future__ import annotations

import json

import pytest

from serving.api import build_app
from serving.config import ServerConfig
from tests.serving.fake_engine import FakeEngine, asgi_client, parse_sse

MODEL = "fake-model"
MAX_MODEL_LEN = 64
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine():
    return FakeEngine(max_model_len=MAX_MODEL_LEN)


@pytest.fixture
async def client(engine):
    async with asgi_client(build_app(engine, ServerConfig())) as c:
        yield c


def _assert_error(response, status: int, *, says: str = "", code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert says.lower() in error["message"].lower(), error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def _assert_still_serving(client) -> None:
    r = await client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text


BAD_COMPLETIONS = [
    ({"model": MODEL}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({**COMPLETION, "prompt": 5}, "prompt"),
    ({**COMPLETION, "prompt": []}, "empty"),
    ({**COMPLETION, "prompt": ""}, "empty"),
    ({**COMPLETION, "prompt": [1, "a"]}, "prompt"),
    ({**COMPLETION, "prompt": [10**6]}, "vocabulary"),
    ({**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ({**COMPLETION, "max_tokens": -3}, "max_tokens"),
    ({**COMPLETION, "max_tokens": "many"}, "max_tokens"),
    ({**COMPLETION, "temperature": -0.5}, "temperature"),
    ({**COMPLETION, "top_p": 0}, "top_p"),
    ({**COMPLETION, "top_p": 1.5}, "top_p"),
    ({**COMPLETION, "n": 0}, "n must be"),
    ({**COMPLETION, "n": 1000}, "n must be"),
    ({**COMPLETION, "logprobs": 50}, "logprobs"),
    ({**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ({**COMPLETION, "top_k": -5}, "top_k"),
    ({**COMPLETION, "stop": [""]}, "stop"),
    ({**COMPLETION, "echo": True}, "echo"),
    ({**COMPLETION, "suffix": "x"}, "suffix"),
    ({**COMPLETION, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**COMPLETION, "seed": 2**70}, "seed"),
    ({**COMPLETION, "min_tokens": 5}, "min_tokens"),
    ({**COMPLETION, "top_k": 2**31}, "top_k"),
    ({**COMPLETION, "stop_token_ids": [5, 10**6]}, "stop_token_ids contains 1000000"),
    ({**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids contains -1"),
    ({**COMPLETION, "stop_token_ids": [2**70]}, "outside the vocabulary"),
    ({**COMPLETION, "stop": [f"s{i}" for i in range(17)]}, "at most 16 stop strings"),
    ({**COMPLETION, "stop": "x" * 1001}, "at most 1000 characters"),
    ({**COMPLETION, "stop": ["ok", "x" * 100_000]}, "at most 1000 characters"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("body,says", BAD_COMPLETIONS)
async def test_bad_completion_request_is_400(client, engine, body, says):
    _assert_error(await client.post("/v1/completions", json=body), 400, says=says)
    assert engine.submitted == []
    await _assert_still_serving(client)


BAD_CHATS = [
    ({"model": MODEL, "max_tokens": 2}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": [{"content": "no role"}]}, "role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ({**CHAT, "top_logprobs": 2}, "logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 30}, "logprobs"),
    ({**CHAT, "max_completion_tokens": 0}, "max_tokens"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({**CHAT, "stop": ["x" * 1001]}, "at most 1000 characters"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("body,says", BAD_CHATS)
async def test_bad_chat_request_is_400(client, engine, body, says):
    _assert_error(await client.post("/v1/chat/completions", json=body), 400, says=says)
    assert engine.submitted == []
    await _assert_still_serving(client)


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
async def test_malformed_body_is_400(client, content):
    r = await client.post("/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    _assert_error(r, 400, says="JSON")
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_out_of_vocabulary_stop_token_id_names_the_field_and_the_range(client, engine):
    r = await client.post("/v1/completions", json={**COMPLETION, "stop_token_ids": [10**6]})
    error = _assert_error(r, 400, says=f"valid ids are 0..{len(engine.tokenizer) - 1}")
    assert error["param"] == "stop_token_ids"
    ok = await client.post("/v1/completions", json={**COMPLETION, "stop_token_ids": [len(engine.tokenizer) - 1]})
    assert ok.status_code == 200, ok.text


@pytest.mark.anyio
async def test_stop_strings_at_the_limits_are_accepted(client):
    body = {**COMPLETION, "stop": [f"{i:02d}" + "x" * 998 for i in range(16)]}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_sampling_value_is_400(client, engine, field, literal):
    # not JSON, but Python's json (the server's parser) reads these literals
    content = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "{field}": {literal}}}'
    r = await client.post("/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    _assert_error(r, 400, says=f"{field} must be a finite number")
    assert engine.submitted == []
    await _assert_still_serving(client)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.anyio
@pytest.mark.parametrize("path,content", [
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "x": {_nested(100_000)}}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": {_nested(100_000)}}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "x": {_nested(64)}}}'),  # 65 levels
    # the message's extra fields reach the chat template, which recursed past Python's limit
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi", '
                             f'"x": {_nested(900)}}}]}}'),
])
async def test_deeply_nested_body_is_400(client, engine, path, content):
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    _assert_error(r, 400, says="nested too deeply")
    assert engine.submitted == []
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_body_nested_up_to_the_limit_is_accepted(client):
    # the body is level 1, so 63 more levels of arrays make 64
    content = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "x": {_nested(63)}}}'
    r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


LONE_SURROGATES = [
    ("/v1/completions", {**COMPLETION, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["fine", "\udfff"]}, "prompt.1"),
    ("/v1/completions", {**COMPLETION, "stop": "\ud800"}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["ok", "x\udc00"]}, "stop.1"),
    ("/v1/completions", {**COMPLETION, "model": "\ud800"}, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udbff"}]}]},
     "messages.0.content.1.text"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user\ud800", "content": "hi"}]},
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "stop": ["\ud800"]}, "stop.0"),
]


def _raw_json(body: dict) -> str:
    """The body as JSON text with every surrogate written as a \\uXXXX escape (httpx's json= would
    fail to encode one; a hostile client sends the escape)."""
    return json.dumps(body)  # ensure_ascii


@pytest.mark.anyio
@pytest.mark.parametrize("path,body,field", LONE_SURROGATES)
async def test_lone_surrogate_is_400_naming_the_field(client, engine, path, body, field):
    r = await client.post(path, content=_raw_json(body), headers={"content-type": "application/json"})
    error = _assert_error(r, 400, says=f"{field} contains a lone UTF-16 surrogate")
    assert error["param"] == field
    assert engine.submitted == []
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_surrogate_pair_is_valid_text(client, engine):
    body = {**COMPLETION, "prompt": "smile \ud83d\ude00"}
    r = await client.post("/v1/completions", content=_raw_json(body),
                          headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert engine.tokenizer.decode(engine.submitted[-1].prompt_token_ids) == "smile \U0001F600"


@pytest.mark.anyio
async def test_missing_field_is_400_not_422(client):
    error = _assert_error(await client.post("/v1/completions", json={"model": MODEL}), 400)
    assert error["param"] == "prompt" and error["type"] == "invalid_request_error"


@pytest.mark.anyio
@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION),
                                       ("/v1/chat/completions", CHAT)])
async def test_unknown_model_is_404(client, path, body):
    r = await client.post(path, json={**body, "model": "gpt-4"})
    error = _assert_error(r, 404, says="gpt-4", code="model_not_found")
    assert error["param"] == "model"
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_prompt_over_context_is_400_with_lengths(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 70})
    _assert_error(r, 400, says=f"maximum context length is {MAX_MODEL_LEN} tokens")
    assert "70 input tokens" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * MAX_MODEL_LEN})
    _assert_error(r, 400, says=f"{MAX_MODEL_LEN} input tokens")
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_prompt_plus_max_tokens_over_context_is_400_with_lengths(client):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 40,
                                                   "max_tokens": 30})
    error = _assert_error(r, 400, says=f"maximum context length is {MAX_MODEL_LEN} tokens")
    assert "you requested 70 tokens (40 in the prompt, 30 in the completion)" in error["message"]
    assert error["param"] == "max_tokens"
    ok = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 40,
                                                    "max_tokens": 24})
    assert ok.status_code == 200


@pytest.mark.anyio
async def test_chat_over_context_is_400(client):
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "messages": [{"role": "user", "content": "b" * 60}], "max_tokens": 10})
    _assert_error(r, 400, says="in the messages")


@pytest.mark.anyio
async def test_chat_template_refusal_is_400(client, engine):
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    _assert_error(await client.post("/v1/chat/completions", json=CHAT), 400,
                  says="roles must alternate")
    engine.tokenizer.chat_template = None
    _assert_error(await client.post("/v1/chat/completions", json=CHAT), 400, says="chat template")


@pytest.mark.anyio
async def test_unknown_route_and_method_are_openai_errors(client):
    _assert_error(await client.get("/v1/nothing"), 404)
    _assert_error(await client.get("/v1/completions"), 405)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_rejection_is_400(client, engine, stream):
    engine.reject_message = "prompt needs 9000 KV blocks, the cache has 100"
    r = await client.post("/v1/completions", json={**COMPLETION, "stream": stream})
    _assert_error(r, 400, says="the cache has 100")
    engine.reject_message = None
    await _assert_still_serving(client)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_dead_engine_is_503_saying_what_failed(client, engine, stream):
    engine.dead = True
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    error = _assert_error(r, 503)
    assert error["message"] == engine.dead_message and error["type"] == "service_unavailable"
    engine.dead = False
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_dead_engine_message_never_carries_a_stack_trace(client, engine):
    engine.dead = True
    engine.dead_message = ("decode instance decode-1 failed\nTraceback (most recent call last):\n"
                           '  File "flow.py", line 9, in read\nKeyError: secret')
    error = _assert_error(await client.post("/v1/completions", json=COMPLETION), 503)
    assert error["message"] == "decode instance decode-1 failed"
    engine.dead_message = "Traceback (most recent call last):\n  File ..."
    error = _assert_error(await client.post("/v1/completions", json=COMPLETION), 503)
    assert "Traceback" not in error["message"] and "unavailable" in error["message"]
    engine.dead = False
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_engine_dying_mid_stream_names_what_failed_in_the_error_event(client, engine):
    engine.die_after_tokens = 2
    body = {**COMPLETION, "max_tokens": 5, "temperature": 0, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["h", "i"]
    assert events[2] == {"error": {"message": engine.dead_message, "type": "service_unavailable",
                                   "param": None, "code": None}}
    assert events[3:] == ["[DONE]"]
    engine.die_after_tokens = None
    await _assert_still_serving(client)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_unexpected_engine_error_is_generic_500(client, engine, stream):
    engine.crash = KeyError("secret internal state")
    r = await client.post("/v1/completions", json={**COMPLETION, "n": 2, "stream": stream})
    error = _assert_error(r, 500, says="internal server error")
    assert "secret" not in r.text and "Traceback" not in r.text
    assert error["type"] == "server_error"
    engine.crash = None
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_error_finish_is_500(client, engine):
    engine.error_after_tokens = 1
    r = await client.post("/v1/completions", json=COMPLETION)
    _assert_error(r, 500)
    assert "kernel exploded" not in r.text


@pytest.mark.anyio
async def test_engine_failing_mid_stream_ends_the_stream_with_an_error_event(client, engine):
    engine.error_after_tokens = 0  # fails before any output: the status can still say so
    _assert_error(await client.post("/v1/completions", json={**COMPLETION, "stream": True}), 500)
    engine.error_after_tokens = 2  # fails once the 200 and two chunks have been sent
    body = {**COMPLETION, "max_tokens": 5, "temperature": 0, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["h", "i"]
    assert set(events[2]) == {"error"} and events[2]["error"]["type"] == "server_error"
    assert "kernel exploded" not in r.text
    assert events[3:] == ["[DONE]"]
    engine.error_after_tokens = None
    await _assert_still_serving(client)


@pytest.mark.anyio
async def test_api_key(engine):
    app = build_app(engine, ServerConfig(api_key="s3cret"))
    async with asgi_client(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = await client.post("/v1/completions", json=COMPLETION, headers=headers)
            _assert_error(r, 401, code="invalid_api_key")
            _assert_error(await client.get("/v1/models", headers=headers), 401)
        assert engine.submitted == []
        ok = {"Authorization": "Bearer s3cret"}
        r = await client.post("/v1/completions", json=COMPLETION, headers=ok)
        assert r.status_code == 200
        for open_path in ("/health", "/metrics", "/version"):
            assert (await client.get(open_path)).status_code == 200


@pytest.mark.anyio
async def test_body_over_limit_is_413(engine):
    app = build_app(engine, ServerConfig(max_request_bytes=2048))
    big = {**COMPLETION, "prompt": "a" * 4096}
    async with asgi_client(app) as client:
        _assert_error(await client.post("/v1/completions", json=big), 413, says="2048 bytes")

        async def chunked():  # no Content-Length: counted as it arrives
            for _ in range(8):
                yield b" " * 512
        r = await client.post("/v1/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        _assert_error(r, 413, code="request_too_large")
        assert engine.submitted == []
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200
