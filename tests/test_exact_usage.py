"""Every token charged exactly, whatever the answer looks like: the usage is read through the one SSE
parser and the format objects (chat_gpt_proxy/formats), on every surface, from an upstream that writes
compact JSON (OpenAI), spaced JSON (servers on Python's json.dumps) or OpenAI's ``obfuscation`` field.

The ledger is the real SQLite one; the fake upstream is told what usage and which model to report.
"""

import asyncio
import json
import re
import sqlite3
import time

import httpx
import pytest
import websockets

from chat_gpt_proxy.fake_openai.behaviours import Behaviour, RealtimeBehaviour
from chat_gpt_proxy.formats.sse import parse_all
from chat_gpt_proxy.upstream.routing import Router, parse_upstreams
from chat_gpt_proxy.usage.meter import output_cap
from chat_gpt_proxy.usage.prices import PriceTable
from tests.conftest import open_raw, proxy_settings

TEAM = "team-TOKEN-7e6d5c4b3a"
KEY = "sk-test-exact-usage-0123456789"
STYLES = ["compact", "spaced", "obfuscation"]
DEFERRED_TOML = f"""
[team]
token = "{TEAM}"
budget_tokens = 100000000

[trusted]
token = "trusted-TOKEN-1a2b3c4d5e"
budget_tokens = 100000000
deferred = true
"""
TRUSTED = "trusted-TOKEN-1a2b3c4d5e"


@pytest.fixture
def config(request, fake_openai, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(DEFERRED_TOML)
    return proxy_settings(
        request, fake_openai, access_tokens_file=str(tokens), usage_database=str(tmp_path / "usage.sqlite3")
    )


def styled(fake, style: str) -> None:
    fake.spaced = style == "spaced"
    fake.obfuscation = style == "obfuscation"


def headers(**more) -> dict:
    return {"access-token": TEAM, "Authorization": "Bearer " + KEY, "openai-token": KEY, **more}


async def rows(app, count: int = 1, timeout: float = 5) -> list[dict]:
    """The ledger's rows once ``count`` have been charged (a request is charged as its handler finishes)."""
    deadline = time.monotonic() + timeout
    while True:
        await app.spend.ledger.flush()
        with sqlite3.connect(app.config.usage_database) as db:
            db.row_factory = sqlite3.Row
            found = [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def stream_bytes(base_url: str, path: str, body: dict) -> bytes:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", base_url + path, json=body, headers=headers()) as response,
    ):
        assert response.status_code == 200
        return b"".join([chunk async for chunk in response.aiter_raw()])


def usage_of(row: dict) -> tuple:
    return row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["estimated"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.gen_test(timeout=30)
async def test_a_responses_stream_is_charged_the_usage_of_response_completed(proxy, app, fake_openai, style, base_url):
    styled(fake_openai, style)
    fake_openai.push(Behaviour(usage={"input_tokens": 13, "output_tokens": 9}))
    body = {"model": "gpt-4o-mini", "input": "hello there", "stream": True}
    raw = await stream_bytes(base_url, "/v1/responses", body)
    assert b"response.completed" in raw
    (row,) = await rows(app)
    assert usage_of(row) == (13, 0, 9, 0)
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="team"} 13.0' in metrics
    assert 'proxy_tokens_total{kind="completion",model="gpt-4o-mini",token="team"} 9.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_closes_on_response_completed_is_charged_its_usage(http_server, app, fake_openai, base_url):
    """Codex CLI closes its connection the moment response.completed arrives."""
    fake_openai.push(Behaviour(usage={"input_tokens": 13, "output_tokens": 9}, chunks=["a ", "b "]))
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    head, reader, writer = await open_raw(base_url, body, path="/v1/responses", headers=headers())
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b"response.completed")
    writer.close()
    (row,) = await rows(app)
    assert usage_of(row) == (13, 0, 9, 0)


def normalised(raw: bytes) -> bytes:
    """A chat stream with what differs between two runs of the same request made equal."""
    raw = re.sub(rb'"id": ?"chatcmpl-[0-9a-f]+"', b'"id":"X"', raw)
    raw = re.sub(rb'"created": ?\d+', b'"created":0', raw)
    return re.sub(rb'"obfuscation": ?"[0-9a-f]*"', b'"obfuscation":"X"', raw)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.gen_test(timeout=30)
async def test_a_chat_stream_is_charged_and_reaches_the_client_as_it_asked_for_it(
    http_server, app, fake_openai, style, base_url
):
    """The proxy asks for the usage the caller did not, and takes out only what that added."""
    styled(fake_openai, style)
    fake_openai.push(Behaviour(usage={"prompt_tokens": 500, "completion_tokens": 9}))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two"}], "stream": True}
    through = await stream_bytes(base_url, "/v1/chat/completions", body)
    # What the upstream sends to a caller who asks it directly, without usage.
    direct = await stream_bytes(fake_openai.url[: -len("/v1")], "/v1/chat/completions", body)
    assert b"usage" not in direct
    assert normalised(through) == normalised(direct)
    (row,) = await rows(app)
    assert usage_of(row) == (500, 0, 9, 0)
    sent = json.loads(fake_openai.received[0].body)
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.gen_test(timeout=30)
async def test_a_caller_who_asks_for_usage_gets_it_untouched(http_server, app, fake_openai, style, base_url):
    styled(fake_openai, style)
    fake_openai.push(Behaviour(usage={"prompt_tokens": 7, "completion_tokens": 3}))
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    through = await stream_bytes(base_url, "/v1/chat/completions", body)
    fake_openai.push(Behaviour(usage={"prompt_tokens": 7, "completion_tokens": 3}))
    direct = await stream_bytes(fake_openai.url[: -len("/v1")], "/v1/chat/completions", body)
    assert normalised(through) == normalised(direct)
    (row,) = await rows(app)
    assert usage_of(row) == (7, 0, 3, 0)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.gen_test(timeout=30)
async def test_a_chat_complete_stream_is_charged_with_no_usage_chunk_for_the_client(
    http_server, app, fake_openai, style, base_url
):
    styled(fake_openai, style)
    fake_openai.push(Behaviour(usage={"prompt_tokens": 509, "completion_tokens": 2}))
    body = {"prompt": "one two", "generate_params": {"stream": True}}
    raw = await stream_bytes(base_url, "/chat_complete", body)
    datas = [e.data for e in parse_all(raw) if e.data is not None]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert chunks and all("usage" not in c and c["choices"] for c in chunks)
    if style == "obfuscation":
        assert all("obfuscation" in c for c in chunks)
    (row,) = await rows(app)
    assert usage_of(row) == (509, 0, 2, 0)


@pytest.mark.parametrize("style", ["compact", "spaced"])
@pytest.mark.parametrize("size", [300_000, 1_500_000])
@pytest.mark.gen_test(timeout=60)
async def test_a_large_json_answer_is_charged_its_reported_usage(proxy, app, fake_openai, size, style):
    """300 KB is read whole; 1.5 MB is relayed in chunks and read by the incremental parser."""
    styled(fake_openai, style)
    fake_openai.push(Behaviour(usage={"prompt_tokens": 4, "completion_tokens": 60010}))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "w " * (size // 2)}]}
    response = await proxy.request("/v1/chat/completions", json_body=body, headers=headers(), auth=False)
    assert response.code == 200 and len(response.body) > size
    (row,) = await rows(app)
    assert usage_of(row) == (4, 0, 60010, 0)


@pytest.mark.gen_test(timeout=30)
async def test_the_query_never_names_the_model_of_a_post(proxy, app, fake_openai):
    """A stored prompt names no model in the body; ?model= does not set its price, the model that ran does."""
    fake_openai.push(Behaviour(answer_model="o1-pro", usage={"input_tokens": 1000, "output_tokens": 1000}))
    body = {"prompt": {"id": "pmpt_123"}, "input": "x"}
    response = await proxy.request("/v1/responses?model=gpt-4o-mini", json_body=body, headers=headers(), auth=False)
    assert response.code == 200
    (row,) = await rows(app)
    assert row["model"] == "o1-pro"
    assert row["usd"] == pytest.approx((1000 * 150.0 + 1000 * 600.0) / 1e6)


@pytest.mark.parametrize(
    ("asked", "ran", "price_of"),
    [
        # A dated snapshot with a price of its own is charged that price, not its family's.
        ("gpt-4o", "gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        # A snapshot without one takes its family's.
        ("gpt-4o", "gpt-4o-2024-08-06", "gpt-4o"),
        # An upstream that names a model the table does not know: the model asked for.
        ("gpt-4o-mini", "mystery-model", "gpt-4o-mini"),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_a_request_is_priced_by_the_model_that_ran(proxy, app, fake_openai, asked, ran, price_of):
    fake_openai.push(Behaviour(answer_model=ran, usage={"prompt_tokens": 1000, "completion_tokens": 1000}))
    body = {"model": asked, "messages": [{"role": "user", "content": "x"}]}
    response = await proxy.request("/v1/chat/completions", json_body=body, headers=headers(), auth=False)
    assert response.code == 200
    (row,) = await rows(app)
    price = PriceTable().price(price_of)
    assert row["model"] == ran
    assert row["usd"] == pytest.approx((1000 * price.input + 1000 * price.output) / 1e6)


@pytest.mark.parametrize(("cap", "charged"), [({"max_completion_tokens": 8000}, 8000), ({}, 100000)])
@pytest.mark.gen_test(timeout=30)
async def test_a_reasoning_stream_left_after_its_first_event_is_charged_what_may_have_run(
    http_server, app, fake_openai, base_url, cap, charged
):
    """Hidden reasoning relays no event: the estimate is the caller's cap, or the model's documented one."""
    fake_openai.push(Behaviour(chunks=["a ", "b "], first_delay=0, delay=2, usage={"completion_tokens": 5009}))
    body = {"model": "o3", "messages": [{"role": "user", "content": "think"}], "stream": True, **cap}
    head, reader, writer = await open_raw(base_url, body, path="/v1/chat/completions", headers=headers())
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b"\n\n")
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    (row,) = await rows(app)
    assert row["estimated"] == 1 and row["output_tokens"] == charged and row["model"] == "o3"


DEFERRED = [
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "later", "background": True}),
    ("/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    ("/v1/realtime/client_secrets", {"session": {"type": "realtime", "model": "gpt-realtime"}}),
]


@pytest.mark.parametrize(("path", "body"), DEFERRED)
@pytest.mark.gen_test(timeout=30)
async def test_work_that_runs_after_the_request_is_refused_to_a_budgeted_token(proxy, app, fake_openai, path, body):
    response = await proxy.request(path, json_body=body, headers=headers(), auth=False)
    assert response.code == 403, response.body
    error = json.loads(response.body)["error"]
    assert error["code"] == "deferred_not_allowed" and "deferred = true" in error["message"]
    assert len(fake_openai.received) == 0


@pytest.mark.parametrize(("path", "body"), DEFERRED[:2])
@pytest.mark.gen_test(timeout=30)
async def test_allowed_deferred_work_is_charged_once_when_retrieved_finished(proxy, app, fake_openai, path, body):
    trusted = headers(**{"access-token": TRUSTED})
    fake_openai.push(Behaviour(usage={"input_tokens": 40, "output_tokens": 30}))
    created = await proxy.request(path, json_body=body, headers=trusted, auth=False)
    assert created.code == 200, created.body
    object_id = json.loads(created.body)["id"]
    # Retrieved while it runs, then finished, then again: charged once, with the usage it reports.
    for _ in range(3):
        response = await proxy.request(path + "/" + object_id, method="GET", headers=trusted, auth=False)
        assert response.code == 200
    # Its creation is a row of no tokens; the first retrieval that shows it finished, its usage.
    found = await rows(app, 2)
    assert [(r["route"], r["token"]) for r in found] == [("v1", "trusted")] * 2
    assert usage_of(found[0]) == (0, 0, 0, 0)
    assert usage_of(found[1]) == ((40, 0, 30, 0) if "responses" in path else (1000, 0, 500, 0))
    await asyncio.sleep(0.2)
    assert len(await rows(app, 3, timeout=0.5)) == len(found)


@pytest.mark.parametrize("style", ["compact", "spaced"])
@pytest.mark.gen_test(timeout=30)
async def test_a_realtime_session_is_charged_its_response_done_usage(http_server, app, fake_openai, base_url, style):
    styled(fake_openai, style)
    url = "ws" + base_url[len("http") :] + "/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url, additional_headers=headers()) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for _ in range(2):
            await ws.send(json.dumps({"type": "response.create"}))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "response.done":
                    usage = event["response"]["usage"]
                    break
    (row,) = await rows(app)
    assert usage_of(row) == (2 * usage["input_tokens"], 0, 2 * usage["output_tokens"], 0)
    assert row["model"] == "gpt-realtime"


@pytest.mark.gen_test(timeout=30)
async def test_an_alias_is_priced_as_the_model_the_upstream_runs(proxy, app, fake_openai, tmp_path):
    """The caller asks for "gpt-4o"; this upstream runs "gpt-4o-mini" under that name, and reports it."""
    path = tmp_path / "upstreams.toml"
    path.write_text(f'[cheap]\nbase_url = "{fake_openai.url}"\naliases = {{ "gpt-4o" = "gpt-4o-mini" }}\n')
    app.router = Router(app.config, parse_upstreams(str(path), app.config))
    fake_openai.push(Behaviour(usage={"prompt_tokens": 1000, "completion_tokens": 1000}))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    response = await proxy.request("/v1/chat/completions", json_body=body, headers=headers(), auth=False)
    assert response.code == 200 and fake_openai.received[-1].json["model"] == "gpt-4o-mini"
    (row,) = await rows(app)
    assert row["model"] == "gpt-4o-mini"
    assert row["usd"] == pytest.approx((1000 * 0.15 + 1000 * 0.60) / 1e6)


def raw_stream(
    *events: bytes, end: bytes = b"data: [DONE]\n\n", content_type: bytes = b"text/event-stream"
) -> Behaviour:
    """An upstream that writes exactly these SSE bytes (then closes): framings the fake would not write."""
    body = b"".join(events) + end
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (content_type, len(body))
    return Behaviour(kind="raw", raw=(head + body).decode("latin-1"))


def chat_chunk(fields: str) -> bytes:
    return b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",' + fields.encode() + b"}\n\n"


FINAL_USAGE = '"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5}'


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_whose_media_type_is_in_capitals_is_relayed_and_charged_as_a_stream(
    http_server, app, fake_openai, base_url
):
    """Media types are case-insensitive (RFC 9110 8.3.1)."""
    text = '"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null'
    fake_openai.push(raw_stream(chat_chunk(text), chat_chunk(FINAL_USAGE), content_type=b"Text/Event-Stream"))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    raw = await stream_bytes(base_url, "/v1/chat/completions", body)
    assert [e.data for e in parse_all(raw)][-1] == "[DONE]"
    (row,) = await rows(app)
    assert usage_of(row) == (10, 0, 5, 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_chunk_the_proxy_cannot_write_back_in_utf_8_is_escaped_not_a_500(
    http_server, app, fake_openai, base_url
):
    """Raw UTF-8 beside a lone surrogate escape (JSON.stringify of an emoji split across chunks)."""
    text = '"choices":[{"index":0,"delta":{"content":"\u00e9\\ud83d"}}],"usage":null'
    fake_openai.push(raw_stream(chat_chunk(text), chat_chunk(FINAL_USAGE)))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    raw = await stream_bytes(base_url, "/v1/chat/completions", body)
    (first, done) = [e.data for e in parse_all(raw)]
    assert json.loads(first)["choices"][0]["delta"]["content"] == "\u00e9\ud83d" and "usage" not in first
    assert done == "[DONE]"
    (row,) = await rows(app)
    assert usage_of(row) == (10, 0, 5, 0)


@pytest.mark.gen_test(timeout=30)
async def test_usage_beside_choices_is_taken_out_when_the_proxy_asked_for_it(http_server, app, fake_openai, base_url):
    """Some compatible servers put the usage on the last chunk that has choices."""
    last = '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4}'
    fake_openai.push(raw_stream(chat_chunk(last)))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    raw = await stream_bytes(base_url, "/v1/chat/completions", body)
    chunk = json.loads(parse_all(raw)[0].data)
    assert "usage" not in chunk and chunk["choices"][0]["finish_reason"] == "stop"
    (row,) = await rows(app)
    assert usage_of(row) == (3, 0, 4, 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_usage_event_the_upstream_never_ended_is_still_charged(http_server, app, fake_openai, base_url):
    """The upstream closes after the usage chunk's line, without the blank line that ends the event."""
    fake_openai.push(raw_stream(chat_chunk(FINAL_USAGE)[:-1], end=b""))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    await stream_bytes(base_url, "/v1/chat/completions", body)
    (row,) = await rows(app)
    assert usage_of(row) == (10, 0, 5, 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_stored_prompt_stream_left_early_is_charged_although_it_names_no_model(
    http_server, app, fake_openai, base_url
):
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c "], delay=1))
    body = {"prompt": {"id": "pmpt_1"}, "input": "x", "stream": True}
    head, reader, writer = await open_raw(base_url, body, path="/v1/responses", headers=headers())
    assert head.startswith("HTTP/1.1 200")
    await reader.readuntil(b"response.output_text.delta")
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    (row,) = await rows(app)
    # The model the upstream said it runs, and the most it may have generated by then.
    assert row["estimated"] == 1 and row["model"] == "gpt-4o-mini" and row["output_tokens"] == 16384


@pytest.mark.gen_test(timeout=30)
async def test_a_response_under_way_when_a_realtime_client_leaves_is_charged(http_server, app, fake_openai, base_url):
    fake_openai.push_realtime(RealtimeBehaviour(delay=0.3, chunks=["a ", "b "], audio_deltas=20))
    url = "ws" + base_url[len("http") :] + "/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url, additional_headers=headers()) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "response.create"}))
        while (event := json.loads(await ws.recv()))["type"] != "response.done":
            pass
        first = event["response"]["usage"]
        await ws.send(json.dumps({"type": "response.create"}))
        while json.loads(await ws.recv())["type"] != "response.output_text.delta":
            pass
    (row,) = await rows(app)
    # What the first response reported, and the most the second may have run (gpt-realtime's max_output).
    assert row["estimated"] == 1
    assert row["input_tokens"] == first["input_tokens"]
    assert row["output_tokens"] == first["output_tokens"] + 4096


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "x", "background": True, "stream": True}),
        ("/v1/realtime/calls", {"session": {"type": "realtime", "model": "gpt-realtime"}}),
        ("/v1/fine_tuning/jobs", {"model": "gpt-4o-mini", "training_file": "file-1"}),
        ("/v1/threads/runs", {"assistant_id": "asst_1"}),
        ("/v1/threads/thread_1/runs", {"assistant_id": "asst_1"}),
        ("/v1/evals/eval_1/runs", {"data_source": {}}),
        ("/v1/videos", {"model": "sora-2", "prompt": "x"}),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_every_kind_of_work_that_outlives_its_request_is_refused_to_a_budget(proxy, fake_openai, path, body):
    response = await proxy.request(path, json_body=body, headers=headers(), auth=False)
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "deferred_not_allowed"
    assert len(fake_openai.received) == 0


def test_the_cap_of_a_request_for_several_choices_counts_them_all():
    assert output_cap(b'{"n": 8, "max_completion_tokens": 1000}') == 8000
    assert output_cap({"max_tokens": 50}) == 50
    assert output_cap(b"not json") is None


HUGE = "1" + "0" * 309  # a valid JSON number, an int in Python, above any float


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.gen_test(timeout=30)
async def test_a_token_count_beyond_any_float_is_estimated_not_a_traceback(
    http_server, app, fake_openai, base_url, stream, caplog
):
    """An upstream reporting 10**309 tokens: the count is not believed (the estimate is charged), and
    nothing overflows (the price, the metrics), so the request is charged and its handler ends."""
    usage = '"usage":{"prompt_tokens":%s,"completion_tokens":5}' % HUGE
    if stream:
        fake_openai.push(raw_stream(chat_chunk('"choices":[],' + usage)))
    else:
        body = ('{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],%s}' % usage).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        fake_openai.push(Behaviour(kind="raw", raw=(head + body).decode("latin-1")))
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(base_url + "/v1/chat/completions", json=request, headers=headers())
    assert response.status_code == 200
    (row,) = await rows(app)
    assert row["estimated"] == 1 and row["input_tokens"] < 2**53
    async with httpx.AsyncClient(timeout=30) as client:
        metrics = await client.get(base_url + "/metrics")
    assert metrics.status_code == 200
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
