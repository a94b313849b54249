"""Request ids and the usage page's address.

On both surfaces: ``x-request-id`` is OpenAI's id whenever the upstream
answered (what the SDKs report as ``request_id`` and OpenAI's support looks
up), the proxy's own id otherwise; ``x-proxy-request-id`` is always the
proxy's id, the ``request_id`` of the access log line.
"""

import ipaddress

import openai
import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

CALLER_ID = "caller-trace.42"


def access_records(caplog) -> list[dict]:
    records = []
    for record in caplog.records:
        if record.name == "chat_gpt_proxy.access":
            records.append(dict(part.split("=", 1) for part in record.getMessage().split(" ")))
    return records


async def call(proxy, surface: str, stream: bool = False, **kwargs):
    headers = {"x-request-id": CALLER_ID, **kwargs.pop("headers", {})}
    if surface == "chat_complete":
        body = {"prompt": "x", "generate_params": {"stream": stream}}
        path = "/chat_complete"
    else:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        path = "/v1/chat/completions"
        headers["Authorization"] = "Bearer " + OPENAI_KEY
    if stream:
        streamed = await proxy.stream(body, path=path, headers=headers, **kwargs)
        return streamed.response
    return await proxy.request(path, json_body=body, headers=headers, **kwargs)


def assert_ids(response, caplog, upstream: bool) -> None:
    [record] = access_records(caplog)
    proxy_id = response.headers["x-proxy-request-id"]
    # The caller's id is kept beside the proxy's, never as it: it
    # could pose as another request's id in the logs.
    assert proxy_id == record["request_id"] and len(proxy_id) == 32 and proxy_id != CALLER_ID
    assert record["client_request_id"] == CALLER_ID
    if upstream:
        assert response.headers["x-request-id"].startswith("req_fake_")
        assert response.headers["x-request-id"] == record["upstream_request_id"]
    else:
        assert response.headers["x-request-id"] == proxy_id and record["upstream_request_id"] == "-"


SURFACES = ["chat_complete", "v1"]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.gen_test
async def test_upstream_answer_carries_openai_id_and_proxy_id(proxy, fake_openai, caplog, surface, stream):
    response = await call(proxy, surface, stream=stream)
    assert response.code == 200
    assert_ids(response, caplog, upstream=True)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.gen_test
async def test_upstream_error_carries_openai_id_and_proxy_id(proxy, fake_openai, caplog, surface):
    fake_openai.push(Behaviour(kind="error", status=429, message="slow down"))
    response = await call(proxy, surface)
    assert response.code == 429
    assert_ids(response, caplog, upstream=True)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.gen_test
async def test_unusable_upstream_answer_still_carries_openai_id(proxy, fake_openai, caplog, surface):
    fake_openai.push(Behaviour(kind="garbage", status=200, body="not json", content_type="application/json"))
    response = await call(proxy, surface)
    # /chat_complete cannot use it (502); /v1 relays it as it is.
    assert response.code == (502 if surface == "chat_complete" else 200)
    assert_ids(response, caplog, upstream=True)


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.gen_test
async def test_proxy_own_error_carries_proxy_id_in_both_headers(proxy, fake_openai, caplog, surface):
    response = await call(proxy, surface, headers={"access-token": "wrong"})
    assert response.code == 403
    assert_ids(response, caplog, upstream=False)
    assert fake_openai.received == []


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.settings(openai_base_url="http://127.0.0.1:1/v1")
@pytest.mark.gen_test
async def test_unreachable_upstream_carries_proxy_id_in_both_headers(proxy, caplog, surface):
    response = await call(proxy, surface)
    assert response.code == 502
    assert_ids(response, caplog, upstream=False)


@pytest.mark.gen_test
async def test_upstream_answer_without_an_id_carries_proxy_id_in_both_headers(proxy, fake_openai):
    response = await proxy.request("/v1/models", method="GET", headers={"x-request-id": CALLER_ID})
    assert response.code == 200 and fake_openai.received[0].path == "/v1/models"
    assert response.headers["x-request-id"] == response.headers["x-proxy-request-id"] != CALLER_ID


@pytest.mark.gen_test
async def test_proxy_id_is_new_when_the_callers_is_missing_or_malformed(proxy, fake_openai, caplog):
    ids = []
    for headers in ({}, {"x-request-id": "bad id\twith space"}):
        response = await proxy.request("/healthz", method="GET", headers=headers)
        proxy_id = response.headers["x-proxy-request-id"]
        assert len(proxy_id) == 32 and response.headers["x-request-id"] == proxy_id
        ids.append(proxy_id)
    records = access_records(caplog)
    assert [r["request_id"] for r in records] == ids and ids[0] != ids[1]
    assert [r["client_request_id"] for r in records] == ["-", "-"]


@pytest.mark.gen_test
async def test_two_callers_sending_one_id_get_two_proxy_ids(proxy, fake_openai, caplog):
    first = await call(proxy, "v1")
    second = await call(proxy, "v1")
    assert first.headers["x-proxy-request-id"] != second.headers["x-proxy-request-id"]
    assert [r["client_request_id"] for r in access_records(caplog)] == [CALLER_ID, CALLER_ID]


@pytest.mark.gen_test
async def test_upstream_cannot_set_the_proxy_id(proxy, fake_openai):
    fake_openai.push(Behaviour(headers={"x-proxy-request-id": "forged"}))
    response = await call(proxy, "v1")
    [proxy_id] = response.headers.get_list("x-proxy-request-id")
    assert proxy_id != "forged" and len(proxy_id) == 32


@pytest.mark.gen_test
async def test_sdk_reports_openai_request_id(proxy, fake_openai, base_url):
    def run():
        with openai.OpenAI(
            base_url=base_url + "/v1", api_key=OPENAI_KEY, default_headers={"access-token": ACCESS_TOKEN}, max_retries=0
        ) as client:
            return client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])

    completion = await proxy.in_thread(run)
    assert completion._request_id.startswith("req_fake_")


# -- the usage page shows the address the caller used


@pytest.mark.parametrize("path", ["/usage", "/chat_complete", "/"])
@pytest.mark.gen_test
async def test_usage_page_shows_the_callers_address(proxy, path):
    response = await proxy.request(path, method="GET", auth=False, headers={"Host": "proxy.example.org:8443"})
    text = response.body.decode()
    assert "curl -s http://proxy.example.org:8443/chat_complete" in text
    assert 'base_url="http://proxy.example.org:8443/v1"' in text
    assert "HOST:9081" not in text and "BASE_URL" not in text


@pytest.mark.gen_test
async def test_usage_page_ignores_forwarded_headers_from_untrusted_peers(proxy):
    headers = {"Host": "10.0.0.5:9081", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    response = await proxy.request("/usage", method="GET", auth=False, headers=headers)
    assert b"http://10.0.0.5:9081/chat_complete" in response.body and b"evil" not in response.body


@pytest.mark.settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.gen_test
async def test_usage_page_honours_forwarded_headers_from_trusted_proxies(proxy):
    headers = {"Host": "127.0.0.1:9081", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example.org"}
    response = await proxy.request("/usage", method="GET", auth=False, headers=headers)
    assert b"curl -s https://chat.example.org/chat_complete" in response.body
    # nginx's config sends Host (no X-Forwarded-Host) and X-Forwarded-Proto.
    headers = {"Host": "chat.example.org", "X-Forwarded-Proto": "https"}
    response = await proxy.request("/usage", method="GET", auth=False, headers=headers)
    assert b"curl -s https://chat.example.org/chat_complete" in response.body


# Tornado itself refuses a Host with spaces, "/" or "<" (bare 400); these get through it.
HOSTILE_HOSTS = ["$(reboot)", "x';reboot;'", "a&b=c", "evil%0d%0aX:1", "[::1", "a:b:c", "a" * 300]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
@pytest.mark.gen_test
async def test_usage_page_does_not_reflect_a_hostile_host(proxy, config, host):
    response = await proxy.request("/usage", method="GET", auth=False, headers={"Host": host})
    text = response.body.decode()
    assert host not in text
    assert "curl -s http://127.0.0.1:%d/chat_complete" % config.port in text


@pytest.mark.settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.parametrize("host", [*HOSTILE_HOSTS, "evil.example/<script>alert(1)</script>", "a b", "é.example"])
@pytest.mark.gen_test
async def test_usage_page_does_not_reflect_a_hostile_forwarded_host(proxy, config, host):
    headers = {"Host": "127.0.0.1", "X-Forwarded-Host": host, "X-Forwarded-Proto": "javascript"}
    response = await proxy.request("/usage", method="GET", auth=False, headers=headers)
    text = response.body.decode()
    assert host not in text and "javascript" not in text
    assert "curl -s http://127.0.0.1:%d/chat_complete" % config.port in text
