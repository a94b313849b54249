"""Access log, request ids and Prometheus metrics."""

import ipaddress
import json

import pytest

from chat_gpt_proxy.fake_openai import Behaviour
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

ACCESS = "chat_gpt_proxy.access"


def access_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def fields(line):
    return dict(part.split("=", 1) for part in line.split(" "))


@pytest.mark.gen_test
async def test_one_access_line_per_request_without_content_or_secrets(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "секретный вопрос"})
    await proxy.stream(
        {"prompt": "streamed question", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}}
    )
    await proxy.chat({"prompt": "x"}, headers={"access-token": "nope"})
    lines = access_lines(caplog)
    assert len(lines) == 3
    plain, streamed, denied = (fields(line) for line in lines)
    assert plain["method"] == "POST" and plain["path"] == "/chat_complete" and plain["status"] == "200"
    assert plain["model"] == "gpt-4o-mini" and plain["prompt_tokens"] == "9" and int(plain["completion_tokens"]) > 0
    assert float(plain["ms"]) > 0 and float(plain["upstream_ms"]) > 0 and int(plain["bytes"]) > 100
    assert plain["upstream_request_id"].startswith("req_fake_") and plain["client"] == "127.0.0.1"
    assert float(streamed["ttfb_ms"]) > 0 and streamed["completion_tokens"] != "-"
    assert denied["status"] == "403" and denied["upstream_ms"] == "-"
    text = "\n".join(lines)
    for forbidden in ("секретный", "streamed question", "Echo", ACCESS_TOKEN, OPENAI_KEY, "nope"):
        assert forbidden not in text


@pytest.mark.settings(log_format="json")
@pytest.mark.gen_test
async def test_json_access_log(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "x"})
    [line] = access_lines(caplog)
    record = json.loads(line)
    assert record["status"] == 200 and record["model"] == "gpt-4o-mini" and record["request_id"]


@pytest.mark.gen_test
async def test_forwarded_for_ignored_from_untrusted_peers(proxy, fake_openai, caplog):
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "203.0.113.9"})
    assert fields(access_lines(caplog)[0])["client"] == "127.0.0.1"


@pytest.mark.settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
@pytest.mark.gen_test
async def test_forwarded_for_honoured_from_trusted_proxies(proxy, fake_openai, caplog):
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
    await proxy.request("/healthz", method="GET", headers={"X-Forwarded-For": "not an ip"})
    first, second = (fields(line)["client"] for line in access_lines(caplog))
    assert first == "203.0.113.9" and second == "127.0.0.1"


@pytest.mark.gen_test
async def test_request_ids(proxy, fake_openai, caplog):
    response = await proxy.request("/healthz", method="GET", headers={"x-request-id": "my-trace.42"})
    assert response.headers["x-request-id"] == "my-trace.42"
    response = await proxy.request("/healthz", method="GET", headers={"x-request-id": "bad id\twith space"})
    assert response.headers["x-request-id"] != "bad id\twith space" and len(response.headers["x-request-id"]) == 32
    response, _ = await proxy.chat({"prompt": "x"}, headers={"access-token": "wrong", "x-request-id": "abc"})
    assert response.headers["x-request-id"] == "abc"
    assert [fields(line)["request_id"] for line in access_lines(caplog)][0] == "my-trace.42"


@pytest.mark.gen_test
async def test_metrics(proxy, fake_openai):
    await proxy.chat({"prompt": "one two"})
    await proxy.chat({"prompt": "x"}, headers={"access-token": "wrong"})
    await proxy.stream({"prompt": "a", "generate_params": {"stream": True, "stream_options": {"include_usage": True}}})
    fake_openai.push(Behaviour(kind="garbage"))
    await proxy.chat({"prompt": "x"})
    response = await proxy.request("/metrics", method="GET", auth=False)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    assert 'proxy_requests_total{route="chat_complete",status="200",token="-"} 2.0' in text
    assert 'proxy_requests_total{route="chat_complete",status="403",token="-"} 1.0' in text
    assert 'proxy_requests_total{route="chat_complete",status="502",token="-"} 1.0' in text
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="-"} 18.0' in text
    assert 'proxy_stream_first_byte_seconds_count{route="chat_complete"} 1.0' in text
    assert 'proxy_added_seconds_count{route="chat_complete"} 2.0' in text
    assert 'proxy_upstream_errors_total{kind="invalid_json"} 1.0' in text
    assert "proxy_in_flight_requests 0.0" in text and "proxy_open_streams 0.0" in text
    assert OPENAI_KEY not in text


@pytest.mark.settings(metrics_enabled=False)
@pytest.mark.gen_test
async def test_metrics_can_be_disabled(proxy):
    response = await proxy.request("/metrics", method="GET", auth=False)
    assert response.code == 404
