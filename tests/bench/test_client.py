"""The streaming client: what it sends, and how it turns SSE lines into TTFT / ITL / E2EL.

Stream parsing is driven with explicit timestamps; the HTTP path uses httpx.MockTransport, which
answers in-process with canned bytes (no server, no socket).
"""
import asyncio
import json

import httpx
import pytest

from bench.client import StreamAccumulator, StreamingClient, build_payload
from bench.config import EndpointConfig
from bench.records import RequestRecord

COMPLETIONS = EndpointConfig(base_url="http://127.0.0.1:1", endpoint="/v1/completions")
CHAT = EndpointConfig(base_url="http://127.0.0.1:1", endpoint="/v1/chat/completions")


def _sse(chunk: dict | str) -> str:
    return "data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk))


def _text_chunk(text: str, finish: str | None = None) -> str:
    return _sse({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def _chat_chunk(delta: dict, finish: str | None = None) -> str:
    return _sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _usage(prompt: int, completion: int) -> str:
    return _sse({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})


def test_completions_stream_timings():
    acc = StreamAccumulator(is_chat=False, start_s=10.0)
    for line, now in [(": keep-alive", 10.05), (_text_chunk(" a"), 10.25), ("", 10.25),
                      (_text_chunk(" b"), 10.30), (_text_chunk(" c"), 10.45),
                      (_text_chunk("", "length"), 10.50), (_usage(7, 3), 10.50), (_sse("[DONE]"), 10.5)]:
        acc.feed(line, now)
    record = RequestRecord("r", num_prompt_tokens=99)
    acc.finish(record, count_tokens=None)
    assert record.success and record.error == ""
    assert record.ttft_s == pytest.approx(0.25)
    assert record.itl_s == pytest.approx([0.05, 0.15])
    assert record.e2el_s == pytest.approx(0.45)  # the closing chunk carries no token: not timed
    assert (record.num_prompt_tokens, record.num_output_tokens) == (7, 3)  # from usage
    assert record.generated_text == " a b c"


def test_chat_role_preamble_is_not_the_first_token():
    acc = StreamAccumulator(is_chat=True, start_s=0.0)
    acc.feed(_chat_chunk({"role": "assistant", "content": ""}), 0.01)  # sent before any token exists
    acc.feed(_chat_chunk({"content": "Hi"}), 0.20)
    acc.feed(_chat_chunk({"content": " there"}), 0.26)
    acc.feed(_chat_chunk({}, "stop"), 0.27)
    record = RequestRecord("r")
    acc.finish(record, count_tokens=lambda text: len(text.split()))
    assert record.ttft_s == pytest.approx(0.20)
    assert record.itl_s == pytest.approx([0.06])
    assert record.num_output_tokens == 2  # no usage: counted with the tokenizer
    # a chunk whose text is held back (empty, no finish) still marks a token's arrival
    acc = StreamAccumulator(is_chat=False, start_s=0.0)
    acc.feed(_text_chunk(""), 0.1)
    acc.feed(_text_chunk("x"), 0.2)
    record = RequestRecord("r")
    acc.finish(record, count_tokens=None)
    assert record.ttft_s == pytest.approx(0.1) and record.num_output_tokens == 2  # chunks, no usage


def test_stream_errors_fail_the_request():
    acc = StreamAccumulator(is_chat=False, start_s=0.0)
    acc.feed(_text_chunk("a"), 0.1)
    acc.feed(_sse({"error": {"message": "engine died", "type": "InternalError"}}), 0.2)
    record = RequestRecord("r")
    acc.finish(record, None)
    assert not record.success and record.error == "engine died"
    empty = RequestRecord("r")
    StreamAccumulator(is_chat=False, start_s=0.0).finish(empty, None)
    assert not empty.success and "without any output" in empty.error


def test_payload_controls_output_length():
    endpoint = EndpointConfig(base_url="http://h:1", ignore_eos=True, temperature=0.0,
                              extra_body={"top_p": 0.5})
    payload = build_payload(endpoint, "m", [1, 2, 3], 16, "alice")
    assert payload == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 16, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True,
                       "temperature": 0.0, "user": "alice", "top_p": 0.5}
    assert build_payload(endpoint, "m", [1], 2, None, priority=3)["priority"] == 3
    chat = build_payload(CHAT, "m", [{"role": "user", "content": "hi"}], 4, None)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in chat
    assert "ignore_eos" not in chat and "user" not in chat and chat["max_tokens"] == 4 and "priority" not in chat


def _run_send(endpoint: EndpointConfig, handler) -> RequestRecord:
    record = RequestRecord("req-1")

    async def go():
        async with StreamingClient(endpoint, transport=httpx.MockTransport(handler)) as client:
            await client.send({"model": "m", "prompt": "x", "max_tokens": 2, "stream": True}, record, 0.0)

    asyncio.run(go())
    return record


def test_client_sends_headers_and_parses_the_stream():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["request_id"] = request.headers.get("x-request-id")
        body = "\n\n".join([_text_chunk("a"), _text_chunk("b"), _usage(1, 2), _sse("[DONE]")]) + "\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    endpoint = EndpointConfig(base_url="http://127.0.0.1:1/", api_key="sekret")
    record = _run_send(endpoint, handler)
    assert seen == {"url": "http://127.0.0.1:1/v1/completions", "auth": "Bearer sekret",
                    "request_id": "req-1"}
    assert record.success and record.num_output_tokens == 2 and len(record.itl_s) == 1
    assert record.ttft_s >= 0 and record.e2el_s >= record.ttft_s


def test_client_reports_the_servers_error_message():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1"}})

    record = _run_send(COMPLETIONS, handler)
    assert not record.success
    assert record.error == "HTTP 400: max_tokens must be at least 1"


def test_client_records_status_and_finish_reasons():
    def handler(request: httpx.Request) -> httpx.Response:
        body = "\n\n".join([_text_chunk("a"), _text_chunk("b", "length"), _sse("[DONE]")]) + "\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    record = _run_send(COMPLETIONS, handler)
    assert record.http_status == 200 and record.finish_reasons == ["length"]
    refused = _run_send(COMPLETIONS, lambda request: httpx.Response(503, json={"error": {"message": "busy"}}))
    assert refused.http_status == 503 and refused.finish_reasons == [] and refused.error == "HTTP 503: busy"


def test_client_reads_a_whole_reply_when_not_streaming():
    replies = {
        "/v1/completions": {"choices": [{"index": 0, "text": "hello", "finish_reason": "length"},
                                        {"index": 1, "text": "world", "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
        "/v1/chat/completions": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is False
        return httpx.Response(200, json=replies[request.url.path])

    for endpoint, text, reasons, tokens in [(COMPLETIONS, "hello", ["length", "stop"], 5),
                                            (CHAT, "hi", ["stop"], 1)]:
        record = RequestRecord("req-1")

        async def go():
            async with StreamingClient(endpoint, transport=httpx.MockTransport(handler)) as client:
                await client.send({"model": "m", "max_tokens": 5, "stream": False}, record, 0.0)

        asyncio.run(go())
        assert record.success and record.generated_text == text and record.finish_reasons == reasons
        assert record.num_output_tokens == tokens and record.itl_s == [] and record.e2el_s == record.ttft_s > 0
