"""What the proxy keeps in memory stays bounded over a long run (bench/soak.py --usage measures the whole):
the response cache holds no expired answer, and the map of upstream sockets no closed connection."""

import os
import time

import pytest

from chat_gpt_proxy.cache import Entry, MemoryStore
from chat_gpt_proxy.fake_openai.behaviours import Behaviour


def answer(expires: float, size: int = 100) -> Entry:
    return Entry("json", "application/json", body=b"x" * size, expires=expires)


@pytest.mark.gen_test
async def test_expired_answers_leave_the_memory_cache_though_nobody_asks_for_them_again():
    store = MemoryStore(max_bytes=1 << 30)
    now = time.time()
    for i in range(1000):
        await store.put("old%d" % i, answer(now + 0.2))
    await store.put("long", answer(now + 3600))
    assert len(store.entries) == 1001
    time.sleep(0.3)
    # Different requests from now on: the expired ones are never asked for again.
    for i in range(10):
        await store.put("new%d" % i, answer(time.time() + 60))
    assert sorted(store.entries) == sorted(["long", *("new%d" % i for i in range(10))])
    assert store.bytes == sum(e.size for e in store.entries.values())


@pytest.mark.gen_test
async def test_the_expiry_heap_never_outgrows_twice_the_entries():
    store = MemoryStore(max_bytes=20 * answer(0).size)
    for i in range(5000):
        # Replaced and pushed out long before they expire: each leaves a stale item behind.
        await store.put("k%d" % (i % 50), answer(time.time() + 3600))
        assert len(store.expiries) <= 2 * len(store.entries) + 64
    assert len(store.entries) == 20


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.gen_test(timeout=60)
async def test_the_upstream_socket_map_holds_no_more_than_the_open_descriptors(proxy, fake_openai, app):
    """Every answer closes its connection: each request opens a new one, from a new local port."""
    payload = b'{"id":"x","object":"chat.completion","choices":[],"usage":null}'
    raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(payload),
        payload.decode(),
    )
    requests = 300
    for _ in range(requests):
        fake_openai.push(Behaviour(kind="raw", raw=raw))
        response = await proxy.request("/v1/chat/completions", json_body={"model": "gpt-4o-mini", "messages": []})
        assert response.code == 200
    assert fake_openai.connections >= requests
    client = app.pool.client()
    assert len(client.sockets) <= open_descriptors(), (len(client.sockets), open_descriptors())
    assert len(client.sockets) < 50
