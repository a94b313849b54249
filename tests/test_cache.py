"""The opt-in response cache: a repeat is one upstream call, anything else is a miss; streams replayed.

Against the fake upstream (counting what it receives), in memory, and in
Debian's redis-server shared by two instances.
"""

import asyncio
import dataclasses
import json
import re
import time

import pytest
import tornado.httpclient
from tornado.testing import bind_unused_port

from chat_gpt_proxy.cache import ENTRY_OVERHEAD, MemoryStore
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from server import make_app, make_server
from settings import Settings
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, open_raw, proxy_settings
from tests.test_readme import snippet

CACHED = "cached-TOKEN-1a3c5e7b9d"  # cache = true
OTHER = "other-TOKEN-2b4d6f8a0c"  # cache = true, another partition
NEVER = "never-TOKEN-3c5e7a9b1d"  # cache = false
TOKENS_TOML = f"""
[cached]
token = "{CACHED}"
cache = true
cache_ttl = 60
budget_tokens = 1000
deferred = true

[other]
token = "{OTHER}"
cache = true

[never]
token = "{NEVER}"
cache = false
"""


@pytest.fixture
def config(request, fake_openai, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return proxy_settings(request, fake_openai, access_tokens_file=str(tokens))


def as_(token, **headers):
    return {"access-token": token, "openai-token": OPENAI_KEY, **headers}


async def ask(proxy, token=CACHED, prompt="hi", headers=None, **params):
    body = {"prompt": prompt}
    if params:
        body["generate_params"] = params
    response, answer = await proxy.chat(body, headers=as_(token, **(headers or {})), auth=False)
    return response, answer


@pytest.mark.gen_test(timeout=30)
async def test_a_repeat_is_answered_from_the_cache_and_not_charged(proxy, fake_openai):
    first, answer = await ask(proxy)
    second, again = await ask(proxy)
    assert first.code == second.code == 200 and len(fake_openai.received) == 1
    assert first.headers["x-proxy-cache"] == "miss" and second.headers["x-proxy-cache"] == "hit"
    assert again == answer
    # The hit is not charged against the token's budget: 11 tokens spent, by the miss alone.
    third, _ = await ask(proxy, prompt="next")
    assert third.headers["x-proxy-budget-remaining-tokens"] == "989"
    # Key order does not count.
    body = json.dumps({"generate_params": {"temperature": 0, "max_tokens": 5}, "prompt": "o"})
    reordered = json.dumps({"prompt": "o", "generate_params": {"max_tokens": 5, "temperature": 0}})
    for raw in (body, reordered):
        response = await proxy.request(body=raw.encode(), headers=as_(CACHED), auth=False)
        assert response.code == 200
    assert len(fake_openai.received) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "other text"},
        {"temperature": 0.7},
        {"max_tokens": 7},
        {"model_name": "gpt-4o"},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_any_change_of_the_request_is_a_miss(proxy, fake_openai, change):
    await ask(proxy)
    params = {k: v for k, v in change.items() if k != "prompt"}
    response, _ = await ask(proxy, prompt=change.get("prompt", "hi"), **params)
    assert response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2


@pytest.mark.gen_test(timeout=30)
async def test_one_partition_never_sees_anothers_answers(proxy, fake_openai):
    await ask(proxy, token=CACHED)
    response, _ = await ask(proxy, token=OTHER)
    assert response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2
    # Unnamed tokens asking for the cache: partitioned by a hash of the caller's own key.
    headers = {"x-proxy-cache": "use"}
    for key in ("sk-caller-one-0001", "sk-caller-two-0002", "sk-caller-one-0001"):
        await proxy.chat(
            {"prompt": "shared"},
            headers={"access-token": ACCESS_TOKEN, "openai-token": key, **headers},
            auth=False,
        )
    assert len(fake_openai.received) == 4


@pytest.mark.gen_test(timeout=30)
async def test_off_unless_asked_and_skip_or_no_cache_refuse_it(proxy, fake_openai):
    for token in (NEVER, NEVER):
        response, _ = await ask(proxy, token=token)
        assert "x-proxy-cache" not in response.headers
    response, _ = await proxy.chat({"prompt": "hi"}, auth=True)  # ACCESS_TOKEN, nothing asked
    assert "x-proxy-cache" not in response.headers
    assert len(fake_openai.received) == 3
    await ask(proxy)
    for headers in ({"x-proxy-cache": "skip"}, {"Cache-Control": "no-cache"}, {"Cache-Control": "no-store"}):
        response, _ = await ask(proxy, headers=headers)
        assert "x-proxy-cache" not in response.headers
    assert len(fake_openai.received) == 7
    # Several answers asked for: not cached by default.
    for _ in range(2):
        await ask(proxy, n=2)
    assert len(fake_openai.received) == 9


@pytest.mark.settings(cache_ttl=1)
@pytest.mark.gen_test(timeout=30)
async def test_an_answer_expires_after_its_ttl(proxy, fake_openai):
    response, _ = await proxy.chat({"prompt": "ttl"}, auth=True)  # CACHE_TTL=1 for everyone
    assert response.headers["x-proxy-cache"] == "miss"
    response, _ = await proxy.chat({"prompt": "ttl"}, auth=True)
    assert response.headers["x-proxy-cache"] == "hit"
    await asyncio.sleep(1.1)
    response, _ = await proxy.chat({"prompt": "ttl"}, auth=True)
    assert response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2


def normalised(body: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb'"id":"[^"]+"', b'"id":""', body))


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_is_replayed_byte_for_byte_and_still_incremental(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["one ", "two ", "three ", "four"], delay=0.05))
    body = {"prompt": "s", "generate_params": {"stream": True}}
    first = await proxy.stream(body, headers=as_(CACHED), auth=False)
    second = await proxy.stream(body, headers=as_(CACHED), auth=False)
    assert len(fake_openai.received) == 1
    assert first.response.headers["x-proxy-cache"] == "miss" and second.response.headers["x-proxy-cache"] == "hit"
    assert second.body == first.body  # the very bytes, ids and all
    assert second.response.headers["Content-Type"].startswith("text/event-stream")
    assert second.events()[-1] == "[DONE]"
    # Event by event as the client reads: one HTTP chunk per event (a fast reader may receive them together).
    head, reader, writer = await open_raw(proxy.base_url, body, headers=as_(CACHED))
    try:
        assert "transfer-encoding: chunked" in head.lower() and "x-proxy-cache: hit" in head.lower()
        sizes = []
        while True:
            size = int((await reader.readline()).strip(), 16)
            sizes.append(size)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    finally:
        writer.close()
    assert len(sizes) - 1 == len(first.body.split(b"\n\n")) - 1  # every event its own chunk
    # /v1 streams too.
    v1 = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "v"}], "stream": True}
    a = await proxy.stream(v1, path="/v1/chat/completions", headers=as_(CACHED), auth=False)
    b = await proxy.stream(v1, path="/v1/chat/completions", headers=as_(CACHED), auth=False)
    assert b.body == a.body and b.response.headers["x-proxy-cache"] == "hit" and len(fake_openai.received) == 2


@pytest.mark.gen_test(timeout=30)
async def test_an_aborted_stream_or_an_error_is_never_stored(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["tok "] * 30, delay=0.1))
    # A cap of its own keeps the left stream's estimate within the token's budget.
    body = {"prompt": "abort", "generate_params": {"stream": True, "max_tokens": 40}}
    head, reader, writer = await open_raw(proxy.base_url, body, headers=as_(CACHED))
    await reader.readuntil(b'"content":"tok "')
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    streamed = await proxy.stream(body, headers=as_(CACHED), auth=False)
    assert streamed.response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2
    fake_openai.push(Behaviour(kind="error", status=500, message="boom"))
    response, _ = await ask(proxy, prompt="err")
    assert response.code == 500
    response, _ = await ask(proxy, prompt="err")
    assert response.code == 200 and response.headers["x-proxy-cache"] == "miss"


@pytest.mark.gen_test(timeout=30)
async def test_v1_json_routes_and_a_hit_costs_nothing(proxy, fake_openai, app):
    for path, body in (
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "j"}]}),
        ("/v1/responses", {"model": "gpt-4o", "input": "r", "store": False}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "e"}),
    ):
        first = await proxy.request(path, json_body=body, headers=as_(CACHED), auth=False)
        second = await proxy.request(path, json_body=body, headers=as_(CACHED), auth=False)
        assert second.headers["x-proxy-cache"] == "hit" and second.body == first.body, path
    assert len(fake_openai.received) == 3
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_cache_total{result="hit",token="cached"} 3.0' in metrics
    assert 'proxy_cache_total{result="miss",token="cached"} 3.0' in metrics
    saved = [line for line in metrics.splitlines() if line.startswith('proxy_cache_saved_usd_total{token="cached"}')]
    assert saved and float(saved[0].split()[-1]) > 0


@pytest.mark.gen_test(timeout=60)
async def test_a_hundred_identical_requests_at_once_make_one_upstream_call(proxy, fake_openai):
    fake_openai.push(Behaviour(first_delay=0.3))
    results = await asyncio.gather(*(ask(proxy, prompt="burst") for _ in range(100)))
    assert all(r.code == 200 for r, _ in results)
    assert len({json.dumps(a, sort_keys=True) for _, a in results}) == 1
    assert len(fake_openai.received) == 1


@pytest.mark.gen_test
async def test_the_memory_store_keeps_within_its_bytes():
    from chat_gpt_proxy.cache import Entry

    store = MemoryStore(max_bytes=10_000)
    for i in range(100):
        await store.put("k%d" % i, Entry("json", "application/json", body=b"x" * 800, expires=time.time() + 60))
        assert store.bytes <= 10_000
    assert len(store.entries) == 10_000 // (800 + ENTRY_OVERHEAD)
    assert await store.get("k99") is not None and await store.get("k0") is None


@pytest.fixture
def shared(fake_openai, redis_server, tmp_path, io_loop):
    """Two instances on one Redis, both with CACHE_TTL."""
    config = dataclasses.replace(
        Settings(),
        access_tokens=(ACCESS_TOKEN,),
        openai_base_url=fake_openai.url,
        redis_url=redis_server.url,
        cache_ttl=60,
        port=0,
        host="127.0.0.1",
    )
    started = []
    for _ in range(2):
        app = make_app(config)
        sock, port = bind_unused_port()
        server = make_server(app, config)
        server.add_socket(sock)
        started.append((app, server, "http://127.0.0.1:%d" % port))
    yield [url for _, _, url in started]
    for app, server, _ in started:
        server.stop()
        io_loop.run_sync(server.close_all_connections, timeout=10)
        app.pool.close()
        io_loop.run_sync(app.shared_limits.close)


async def post(url, prompt):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            url + "/chat_complete",
            method="POST",
            body=json.dumps({"prompt": prompt}),
            headers={"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY},
            raise_error=False,
        )
    finally:
        client.close()


@pytest.mark.gen_test(timeout=60)
async def test_redis_is_shared_by_two_instances_and_its_failure_is_only_a_miss(shared, fake_openai, redis_server):
    a, b = shared
    first = await post(a, "shared")
    await asyncio.sleep(0.2)  # the write to Redis is not awaited by the answer
    second = await post(b, "shared")
    assert first.headers["x-proxy-cache"] == "miss" and second.headers["x-proxy-cache"] == "hit"
    assert len(fake_openai.received) == 1
    redis_server.stop()
    try:
        for url in (a, b, a):
            response = await post(url, "shared")
            assert response.code == 200 and response.headers["x-proxy-cache"] == "miss"
        assert len(fake_openai.received) == 4
    finally:
        redis_server.start()


def test_the_documented_cache_token_turns_the_cache_on_for_a_day(tmp_path):
    from chat_gpt_proxy.access.tokens import parse_tokens_file

    language, code = snippet("cache-token")
    assert language == "toml"
    path = tmp_path / "tokens.toml"
    path.write_text(code)
    (entry,) = parse_tokens_file(str(path), Settings())
    assert entry.name == "eval-suite" and entry.policy.cache is True and entry.policy.cache_ttl == 86400


@pytest.mark.gen_test(timeout=30)
async def test_a_named_token_with_another_callers_key_is_another_partition(proxy, fake_openai):
    await ask(proxy)
    response, _ = await proxy.chat(
        {"prompt": "hi"}, headers={"access-token": CACHED, "openai-token": "sk-NOTAREALKEY-000000"}, auth=False
    )
    assert response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_that_did_not_finish_is_not_kept(proxy, fake_openai):
    body = {"prompt": "cut", "generate_params": {"stream": True}}
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    error = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    for ending in (b"", error):  # closed cleanly without [DONE]; an error event (OpenAI's mid-stream failure)
        before = len(fake_openai.received)
        for _ in range(2):
            fake_openai.push(Behaviour(kind="garbage", content_type="text/event-stream", body=chunk + ending))
            streamed = await proxy.stream(body, headers=as_(CACHED), auth=False)
            assert streamed.response.headers["x-proxy-cache"] == "miss"
        assert len(fake_openai.received) == before + 2


@pytest.mark.settings(cache_max_entry_bytes=2048)
@pytest.mark.gen_test(timeout=30)
async def test_a_stream_larger_than_an_entry_is_relayed_and_not_kept(proxy, fake_openai):
    body = {"prompt": "big", "generate_params": {"stream": True}}
    fake_openai.push(Behaviour(chunks=["x" * 500] * 10))
    first = await proxy.stream(body, headers=as_(CACHED), auth=False)
    assert first.events()[-1] == "[DONE]" and len(first.body) > 5000
    second = await proxy.stream(body, headers=as_(CACHED), auth=False)
    assert second.response.headers["x-proxy-cache"] == "miss" and len(fake_openai.received) == 2


@pytest.mark.gen_test(timeout=30)
async def test_v1_query_and_forwarded_headers_are_part_of_the_key(proxy, fake_openai):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q"}]}
    for path, headers in (
        ("/v1/chat/completions", {"OpenAI-Project": "proj_A"}),
        ("/v1/chat/completions", {"OpenAI-Project": "proj_B"}),
        ("/v1/chat/completions?api-version=2", {"OpenAI-Project": "proj_A"}),
        ("/v1/chat/completions", {"OpenAI-Project": "proj_A"}),
    ):
        response = await proxy.request(path, json_body=body, headers=as_(CACHED, **headers), auth=False)
        assert response.code == 200
    assert len(fake_openai.received) == 3 and response.headers["x-proxy-cache"] == "hit"


@pytest.mark.gen_test(timeout=30)
async def test_responses_that_keep_state_upstream_are_not_cached(proxy, fake_openai):
    for body in (
        {"model": "gpt-4o", "input": "s"},  # store defaults to true
        {"model": "gpt-4o", "input": "s", "store": False, "background": True},
        {"model": "gpt-4o", "input": "s", "store": False, "conversation": "conv_1"},
    ):
        for _ in range(2):
            response = await proxy.request("/v1/responses", json_body=body, headers=as_(CACHED), auth=False)
            assert "x-proxy-cache" not in response.headers
    assert len(fake_openai.received) == 6
