"""The fake Anthropic API (chat_gpt_proxy/fake_anthropic/), tested directly with the official Python SDK.

The proxy's Anthropic tests rely on what is checked here: the fake speaks the
Messages API as the SDK parses it (JSON messages, named stream events with
``ping``, tool_use through ``input_json_delta``, thinking through
``thinking_delta``, errors in Anthropic's shape with their status,
count_tokens, the model list), wants a key and a known ``anthropic-version``,
and records every header it received.
"""

from __future__ import annotations

import json

import anthropic
import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_anthropic import Behaviour, FakeAnthropic

KEY = "sk-ant-FAKEKEY-0c9d2e"
MODEL = "claude-sonnet-4-5-20250929"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def fake(io_loop):
    server = FakeAnthropic(api_keys={KEY})
    server.start()
    yield server
    io_loop.run_sync(server.stop)


def client(fake, **kwargs) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.url, api_key=KEY, max_retries=0, **kwargs)


async def raw_post(fake, path: str, body, headers: dict | None = None) -> tornado.httpclient.HTTPResponse:
    all_headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    all_headers.update(headers or {})
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        fake.url + path, method="POST", body=payload, headers=all_headers, raise_error=False
    )


@pytest.mark.gen_test
async def test_a_message_as_the_sdk_reads_it(fake):
    fake.push(Behaviour(cache_creation=100, cache_read=2000))
    answer = await client(fake).messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert answer.type == "message" and answer.role == "assistant" and answer.model == MODEL
    assert answer.content[0].type == "text" and answer.content[0].text == "Echo: hello there "
    assert answer.stop_reason == "end_turn"
    assert answer.usage.cache_creation_input_tokens == 100 and answer.usage.cache_read_input_tokens == 2000
    assert answer.usage.input_tokens > 0 and answer.usage.output_tokens == 3
    sent = fake.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["anthropic-version"] == "2026-10-21"
    # The SDK sends its api_key as a bearer token; the fake takes it there too.
    assert sent.headers["Authorization"] == "Bearer " + KEY


@pytest.mark.gen_test
async def test_a_stream_has_named_events_and_a_ping(fake):
    response = await raw_post(
        fake, "/v1/messages", {"model": MODEL, "max_tokens": 9, "messages": HELLO, "stream": True}
    )
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in response.body.decode().split("\n\n") if e]
    names = [e.split("\n")[0] for e in events]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-3:] == ["event: content_block_stop", "event: message_delta", "event: message_stop"]
    for event in events:
        name, data = event.split("\n")
        assert json.loads(data[len("data: ") :])["type"] == name[len("event: ") :]
    final = json.loads(events[-2].split("\n")[1][6:])
    assert final["usage"]["output_tokens"] == 3 and final["delta"]["stop_reason"] == "end_turn"


@pytest.mark.gen_test
async def test_the_sdk_assembles_tool_use_and_thinking_from_a_stream(fake):
    fake.push(Behaviour(thinking="Let me think.", tool={"name": "get_weather", "input": {"city": "Paris, France"}}))
    async with client(fake).messages.stream(model=MODEL, max_tokens=99, messages=HELLO) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds and "input_json" in kinds
    thinking, text, tool = final.content
    assert thinking.type == "thinking" and thinking.thinking == "Let me think. " and thinking.signature
    assert text.text == "Echo: hello there "
    assert tool.type == "tool_use" and tool.name == "get_weather" and tool.input == {"city": "Paris, France"}
    assert final.stop_reason == "tool_use"


@pytest.mark.gen_test
async def test_errors_in_anthropic_shape_with_their_status(fake):
    fake.push(Behaviour(kind="error", error_type="overloaded_error", message="Overloaded"))
    with pytest.raises(anthropic.OverloadedError) as raised:
        await client(fake).messages.create(model=MODEL, max_tokens=9, messages=HELLO)
    assert raised.value.status_code == 529
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "overloaded_error"
    fake.push(Behaviour(kind="error", error_type="rate_limit_error", message="slow down"))
    with pytest.raises(anthropic.RateLimitError):
        await client(fake).messages.create(model=MODEL, max_tokens=9, messages=HELLO)


@pytest.mark.gen_test
async def test_an_error_mid_stream_is_an_error_event(fake):
    fake.push(Behaviour(kind="stream_error", after=1, error_type="overloaded_error", message="Overloaded"))
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async with client(fake).messages.stream(model=MODEL, max_tokens=9, messages=HELLO) as stream:
            async for _ in stream:
                pass


@pytest.mark.gen_test
async def test_key_version_and_body_refusals(fake):
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=fake.url, api_key="sk-ant-other", max_retries=0).messages.create(
            model=MODEL, max_tokens=9, messages=HELLO
        )
    body = {"model": MODEL, "max_tokens": 9, "messages": HELLO}
    unknown = await raw_post(fake, "/v1/messages", body, {"anthropic-version": "2099-01-01"})
    assert unknown.code == 400 and "anthropic-version" in json.loads(unknown.body)["error"]["message"]
    not_json = await raw_post(fake, "/v1/messages", b"{nope")
    assert not_json.code == 400 and json.loads(not_json.body)["error"]["type"] == "invalid_request_error"
    no_model = await raw_post(fake, "/v1/messages", {"max_tokens": 9, "messages": HELLO})
    assert json.loads(no_model.body)["error"]["message"] == "model: Field required"
    assert no_model.headers["request-id"].startswith("req_")


@pytest.mark.gen_test
async def test_count_tokens_and_the_model_list(fake):
    counted = await client(fake).messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens > 0
    page = await client(fake).models.list(limit=2)
    assert [m.id for m in page.data] == ["claude-opus-4-5-20251101", "claude-haiku-4-5-20251001"]
    assert page.has_more and page.last_id == "claude-haiku-4-5-20251001"
    every = [m.id async for m in client(fake).models.list(limit=2)]
    assert len(every) == 6 and all(m.startswith("claude") for m in every)
    one = await client(fake).models.retrieve("claude-sonnet-4-5-20250929")
    assert one.display_name == "Claude Sonnet 4.5" and one.type == "model"


@pytest.mark.gen_test
async def test_an_alias_answers_with_the_snapshot_that_ran(fake):
    answer = await client(fake).messages.create(model="claude-sonnet-4-5", max_tokens=9, messages=HELLO)
    assert answer.model == "claude-sonnet-4-5-20250929"


@pytest.mark.gen_test
async def test_an_openai_shaped_answer_when_scripted(fake):
    fake.push(Behaviour(kind="openai"))
    response = await raw_post(fake, "/v1/messages", {"model": MODEL, "max_tokens": 9, "messages": HELLO})
    assert response.code == 200 and json.loads(response.body)["object"] == "chat.completion"
