"""Request and answer bodies: their separate limits, chunked uploads, compressed uploads."""

import asyncio
import gzip
import json
import tracemalloc
import zlib

import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.fake_openai.wire import completion
from chat_gpt_proxy.request.body import BodyNotDecodable, BodyTooLarge, RequestBody
from settings import Settings, SettingsError
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

V1_AUTH = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}


def big_completion(size: int) -> str:
    return json.dumps(completion("word " * (size // 5), "gpt-4o-mini"))


# -- answers have their own limit (point 4)


@pytest.mark.settings(max_body_bytes=1024)
@pytest.mark.gen_test
async def test_an_answer_larger_than_the_request_limit_is_relayed(proxy, fake_openai):
    """With a small MAX_BODY_BYTES a normal (paid) answer became 502 upstream_broken."""
    answer = big_completion(300_000)
    fake_openai.push(Behaviour(kind="garbage", status=200, body=answer, content_type="application/json"))
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 200, body
    assert body["text"] == json.loads(answer)["choices"][0]["message"]["content"]


@pytest.mark.settings(max_body_bytes=1024, max_answer_bytes=100_000)
@pytest.mark.gen_test
async def test_max_answer_bytes_bounds_what_chat_complete_holds(proxy, fake_openai):
    fake_openai.push(
        Behaviour(kind="garbage", status=200, body=big_completion(300_000), content_type="application/json")
    )
    response, body = await proxy.chat({"prompt": "x"})
    assert response.code == 502 and body["error"]["code"] == "upstream_broken"
    assert "larger than 100000 bytes" in body["text"]


@pytest.mark.settings(max_body_bytes=1024, max_answer_bytes=1024)
@pytest.mark.gen_test
async def test_v1_answers_are_relayed_as_they_arrive_whatever_the_limits(proxy, fake_openai):
    response = await proxy.request("/v1/files/file-abc/content?size=3000000", method="GET", headers=V1_AUTH)
    assert response.code == 200 and len(response.body) == 3_000_000
    fake_openai.push(
        Behaviour(kind="garbage", status=200, body=big_completion(500_000), content_type="application/json")
    )
    response = await proxy.request(
        "/v1/chat/completions", json_body={"model": "m", "messages": []}, headers=V1_AUTH, auth=False
    )
    assert response.code == 200 and len(response.body) > 500_000


def test_max_answer_bytes_setting():
    assert Settings.from_env({}).max_answer_bytes == 256 * 1024 * 1024
    assert Settings.from_env({"MAX_ANSWER_BYTES": "5000", "MAX_BODY_BYTES": "2048"}).max_answer_bytes == 5000
    with pytest.raises(SettingsError, match="^MAX_ANSWER_BYTES: "):
        Settings.from_env({"MAX_ANSWER_BYTES": "lots"})


# -- chunked uploads (point 9)


async def raw_post(base_url: str, head: bytes, body: bytes) -> tuple[bytes, bool]:
    """Send ``head`` and ``body`` as they are; the whole answer, and whether the server closed the connection."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(answer.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        answer += await asyncio.wait_for(reader.readexactly(length), 10)
        closed = await asyncio.wait_for(reader.read(1), 10) == b""
        return answer, closed
    finally:
        writer.close()


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("chunk_size", [100, 5000, 20000])
@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions"])
@pytest.mark.settings(max_body_bytes=4096)
@pytest.mark.gen_test
async def test_an_oversized_chunked_body_gets_the_413_json(proxy, fake_openai, base_url, path, chunk_size):
    """It got Tornado's bare '400 Bad Request' (or, at exactly one byte over, a traceback and no answer)."""
    body = json.dumps({"prompt": "x" * 10000}).encode()
    head = (
        b"POST %s HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        % (path.encode(), ACCESS_TOKEN.encode(), OPENAI_KEY.encode(), OPENAI_KEY.encode())
    )
    answer, closed = await raw_post(base_url, head, chunked(body, chunk_size))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"\r\nConnection: close\r\n" in answer and closed
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_too_large" and "larger than 4 KiB" in error["message"]
    assert fake_openai.received == []


@pytest.mark.settings(max_body_bytes=4096)
@pytest.mark.gen_test
async def test_a_declared_oversized_body_is_refused_before_it_is_sent(proxy, fake_openai, base_url):
    head = (
        b"POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\n"
        b"Content-Length: 10000000\r\n\r\n" % (ACCESS_TOKEN.encode(), OPENAI_KEY.encode())
    )
    answer, closed = await raw_post(base_url, head, b"")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"\r\nConnection: close\r\n" in answer and closed


@pytest.mark.settings(max_body_bytes=4096)
@pytest.mark.gen_test
async def test_a_chunked_body_within_the_limit_is_served(proxy, fake_openai, base_url):
    body = json.dumps({"prompt": "y" * 3000}).encode()
    head = (
        b"POST /chat_complete HTTP/1.1\r\nHost: x\r\nConnection: close\r\naccess-token: %s\r\nopenai-token: %s\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % (ACCESS_TOKEN.encode(), OPENAI_KEY.encode())
    )
    answer, _ = await raw_post(base_url, head, chunked(body, 700))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert fake_openai.received[0].json["messages"][0]["content"] == "y" * 3000


# -- compressed uploads (point 9)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZip", "x-gzip"])
@pytest.mark.gen_test
async def test_compressed_bodies_are_decoded(proxy, fake_openai, encoding):
    payload = json.dumps({"prompt": "Привет, сжатый мир"}).encode()
    body = zlib.compress(payload) if encoding == "deflate" else gzip.compress(payload)
    response = await proxy.request(body=body, headers={"Content-Encoding": encoding})
    assert response.code == 200, response.body
    assert json.loads(response.body)["text"] == "Echo: Привет, сжатый мир"


@pytest.mark.settings(allowed_models=("gpt-4o-mini",))
@pytest.mark.gen_test
async def test_v1_forwards_the_decoded_body_without_its_encoding(proxy, fake_openai):
    """The upstream never gets a compressed body without the header that says so, and ALLOWED_MODELS sees the model."""
    payload = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    response = await proxy.request(
        "/v1/chat/completions",
        body=gzip.compress(payload),
        headers={**V1_AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        auth=False,
    )
    assert response.code == 200, response.body
    [seen] = fake_openai.received
    assert seen.body == payload
    assert "content-encoding" not in {name.lower() for name in seen.headers}
    expensive = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    response = await proxy.request(
        "/v1/chat/completions",
        body=gzip.compress(expensive),
        headers={**V1_AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        auth=False,
    )
    assert response.code == 403 and json.loads(response.body)["error"]["code"] == "model_not_allowed"
    assert len(fake_openai.received) == 1


@pytest.mark.settings(max_body_bytes=64 * 1024)
@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions"])
@pytest.mark.gen_test
async def test_a_compression_bomb_is_413(proxy, fake_openai, path):
    bomb = gzip.compress(b'{"prompt": "' + b"0" * 20_000_000 + b'"}', compresslevel=9)
    assert len(bomb) < 64 * 1024 // 2
    response = await proxy.request(path, body=bomb, headers={**V1_AUTH, "Content-Encoding": "gzip"})
    assert response.code == 413
    error = json.loads(response.body)["error"]
    assert error["code"] == "request_too_large" and "once decompressed" in error["message"]
    assert fake_openai.received == []


@pytest.mark.parametrize(
    "body",
    [gzip.compress(b'{"prompt": "cut short"}')[:-12], b"\x1f\x8b not gzip at all", gzip.compress(b"{}") + b"trailing"],
)
@pytest.mark.gen_test
async def test_bodies_that_are_not_valid_gzip_are_400(proxy, fake_openai, body):
    response = await proxy.request(body=body, headers={"Content-Encoding": "gzip"})
    assert response.code == 400
    error = json.loads(response.body)["error"]
    assert error["code"] == "invalid_content_encoding" and "gzip" in error["message"]
    assert fake_openai.received == []


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions"])
@pytest.mark.gen_test
async def test_other_encodings_are_415_with_accept_encoding(proxy, fake_openai, path, encoding):
    """They were 'not valid JSON' on /chat_complete, and forwarded without their header on /v1/*."""
    response = await proxy.request(path, body=b"\x00\x01binary", headers={**V1_AUTH, "Content-Encoding": encoding})
    assert response.code == 415
    assert response.headers["Accept-Encoding"] == "gzip, deflate"
    assert "not supported" in json.loads(response.body)["error"]["message"]
    assert fake_openai.received == []


def test_request_body_never_expands_more_than_the_limit():
    """A unit test of the decoder: 256 MiB of zeros compressed to ~250 KB is refused after expanding ~the limit."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()
    limit = 1 << 20
    assert len(bomb) < limit
    body = RequestBody(limit, "gzip")
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            for i in range(0, len(bomb), 65536):
                body.feed(bomb[i : i + 65536])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, peak
    assert body.size <= limit + 1


def test_request_body_plain_and_truncated():
    body = RequestBody(10)
    body.feed(b"12345")
    body.feed(b"67890")
    assert body.finish() == b"1234567890"
    with pytest.raises(BodyTooLarge):
        body.feed(b"x")
    cut = RequestBody(1000, "gzip")
    cut.feed(gzip.compress(b"hello")[:-4])
    with pytest.raises(BodyNotDecodable):
        cut.finish()


def test_request_body_of_several_gzip_members():
    """RFC 1952 section 2.2: a gzip body is a series of members (what `cat a.gz b.gz` makes)."""
    members = gzip.compress(b'{"prompt": ') + gzip.compress(b'"hi"}')
    for split in (1, len(members) // 2, len(members)):  # the members' boundary anywhere in the chunks
        body = RequestBody(1000, "gzip")
        body.feed(members[:split])
        body.feed(members[split:])
        assert body.finish() == b'{"prompt": "hi"}'
    # The limit counts every member: a second member cannot slip past it.
    big = RequestBody(12, "gzip")
    with pytest.raises(BodyTooLarge):
        big.feed(gzip.compress(b"x" * 10) + gzip.compress(b"y" * 10))
    # deflate (zlib framing) has one stream only: anything after it is an error.
    trailing = RequestBody(1000, "deflate")
    with pytest.raises(BodyNotDecodable):
        trailing.feed(zlib.compress(b"a") + zlib.compress(b"b"))
