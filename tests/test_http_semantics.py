"""HTTP semantics: HEAD, OPTIONS and Allow on every route, and the CORS policy."""

import json

import pytest

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.request.cors import CorsPolicy
from settings import Settings, SettingsError

GET_ROUTES = [
    ("/healthz", {}),
    ("/", {}),
    ("/", {"Accept": "text/html"}),
    ("/usage", {}),
    ("/metrics", {}),
    ("/chat_complete", {}),
    ("/v1/raw/x", None),  # None: with the proxy's token and a key; the fake answers any method there
]
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
ORIGIN = "http://app.example:8080"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "access-token, openai-token, content-type, x-stainless-os, x-stainless-arch",
}


@pytest.mark.parametrize("path,headers", GET_ROUTES)
@pytest.mark.gen_test
async def test_head_answers_like_get_without_a_body(proxy, fake_openai, path, headers):
    auth = headers is None
    get = await proxy.request(path, method="GET", headers=headers, auth=auth)
    head = await proxy.request(path, method="HEAD", headers=headers, auth=auth)
    assert get.code == 200 and head.code == 200, (get.code, head.code)
    assert head.body == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    if path == "/metrics":  # the GET itself changed the counters
        assert int(head.headers["Content-Length"]) > 0
    else:
        assert int(head.headers["Content-Length"]) == len(get.body) > 0
    if path.startswith("/v1/"):
        assert [r.method for r in fake_openai.received] == ["GET", "HEAD"]


@pytest.mark.parametrize("path", ["/healthz", "/", "/usage", "/metrics", "/chat_complete", "/v1/raw/x"])
@pytest.mark.gen_test
async def test_every_405_names_the_allowed_methods_and_they_are_allowed(proxy, fake_openai, path):
    """RFC 9110 section 15.5.6: a 405 carries Allow; and what Allow lists is never itself a 405."""
    refused = []
    for method in ALL_METHODS:
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        response = await proxy.request(path, method=method, body=body, check=method != "HEAD")
        if response.code == 405:
            refused.append(method)
            allowed = [m.strip() for m in response.headers["Allow"].split(",")]
            assert method not in allowed and "OPTIONS" in allowed
            assert json.loads(response.body)["error"]["code"] == "method_not_allowed"
    options = await proxy.request(path, method="OPTIONS", auth=False)
    assert options.code == 204 and options.body == b""
    allowed = {m.strip() for m in options.headers["Allow"].split(",")}
    assert allowed == set(ALL_METHODS) - set(refused)
    assert {"GET", "HEAD", "OPTIONS"} <= allowed


@pytest.mark.gen_test
async def test_trace_is_405_with_allow(proxy):
    response = await proxy.request("/chat_complete", method="TRACE")
    assert response.code == 405 and response.headers["Allow"] == "GET, HEAD, POST, OPTIONS"


# -- CORS


@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions"])
@pytest.mark.gen_test
async def test_no_cors_headers_by_default(proxy, fake_openai, path):
    preflight = await proxy.request(path, method="OPTIONS", headers=PREFLIGHT, auth=False)
    assert preflight.code == 204
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]
    response = await proxy.request(
        path, json_body={"prompt": "x", "model": "m", "messages": []}, headers={"Origin": ORIGIN}
    )
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    assert "Vary" not in response.headers


@pytest.mark.settings(cors_allow_origins=(ORIGIN, "http://other.example"), rate_limit_per_token=1)
@pytest.mark.parametrize("path", ["/chat_complete", "/v1/chat/completions"])
@pytest.mark.gen_test
async def test_preflight_for_a_listed_origin(proxy, fake_openai, path):
    for _ in range(3):  # no token, and no rate-limit unit taken
        response = await proxy.request(path, method="OPTIONS", headers=PREFLIGHT, auth=False)
        assert response.code == 204 and response.body == b""
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in response.headers.get_list("Vary")
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        sdk_headers = {
            "openai-organization",
            "openai-project",
            "openai-beta",
            "x-stainless-os",
            "x-stainless-arch",
        }
        ours = {
            "access-token",
            "openai-token",
            "authorization",
            "content-type",
            "accept",
            "idempotency-key",
            "x-request-id",
        }
        assert ours | sdk_headers <= allowed
        assert response.headers["Access-Control-Max-Age"] == "7200"
        assert "Access-Control-Allow-Credentials" not in response.headers
    response, _ = await proxy.chat({"prompt": "x"})
    assert response.code == 200, "the preflights took no rate-limit unit"
    assert fake_openai.received[-1].method == "POST" and len(fake_openai.received) == 1


@pytest.mark.settings(cors_allow_origins=(ORIGIN,))
@pytest.mark.gen_test
async def test_preflight_for_another_origin_gets_no_cors_headers(proxy):
    response = await proxy.request(
        "/chat_complete", method="OPTIONS", headers={**PREFLIGHT, "Origin": "http://evil.example"}, auth=False
    )
    assert response.code == 204
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Headers" not in response.headers
    assert response.headers["Vary"] == "Origin"


@pytest.mark.settings(cors_allow_origins=(ORIGIN,))
@pytest.mark.gen_test
async def test_answers_errors_and_streams_carry_cors_headers(proxy, fake_openai):
    def check(response):
        assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
        exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"x-request-id", "retry-after", "openai-processing-ms", "x-ratelimit-remaining-tokens"} <= exposed
        assert "Origin" in response.headers.get_list("Vary")
        return exposed

    response, _ = await proxy.chat({"prompt": "x"}, headers={"Origin": ORIGIN})
    assert response.code == 200
    check(response)
    response, _ = await proxy.chat({"prompt": "x"}, headers={"Origin": ORIGIN, "access-token": "wrong"})
    assert response.code == 403
    check(response)
    fake_openai.push(
        Behaviour(kind="error", status=429, headers={"Retry-After": "7", "x-ratelimit-reset-project-tokens": "1s"})
    )
    response = await proxy.request(
        "/v1/chat/completions", json_body={"model": "m", "messages": []}, headers={"Origin": ORIGIN}
    )
    assert response.code == 429 and response.headers["Retry-After"] == "7"
    assert "x-ratelimit-reset-project-tokens" in check(response), "x-ratelimit-* headers not in the fixed list too"
    streamed = await proxy.stream({"prompt": "a b", "generate_params": {"stream": True}}, headers={"Origin": ORIGIN})
    assert streamed.response.code == 200 and streamed.events()[-1] == "[DONE]"
    check(streamed.response)
    response = await proxy.request("/healthz", method="GET", auth=False, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers and response.headers["Vary"] == "Origin"


@pytest.mark.settings(cors_allow_origins=("*",))
@pytest.mark.gen_test
async def test_star_allows_any_origin_without_credentials(proxy, fake_openai):
    response = await proxy.request(
        "/v1/chat/completions", method="OPTIONS", headers={**PREFLIGHT, "Origin": "http://any.example"}, auth=False
    )
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers
    response, _ = await proxy.chat({"prompt": "x"}, headers={"Origin": "https://whatever.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in response.headers


def test_cors_allow_origins_setting():
    parsed = Settings.from_env({"CORS_ALLOW_ORIGINS": " https://App.Example.com/ , http://127.0.0.1:3000,*"})
    assert parsed.cors_allow_origins == ("https://app.example.com", "http://127.0.0.1:3000", "*")
    assert Settings.from_env({}).cors_allow_origins == ()
    assert not CorsPolicy(()).enabled
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x.example", "https://a b"):
        with pytest.raises(SettingsError, match="^CORS_ALLOW_ORIGINS: "):
            Settings.from_env({"CORS_ALLOW_ORIGINS": bad})


UPSTREAM_CORS_ANSWER = (
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nAccess-Control-Allow-Origin: *\r\n"
    "Access-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: *\r\nContent-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize("origins", [(), (ORIGIN,)])
@pytest.mark.gen_test
async def test_the_upstreams_cors_headers_never_reach_the_browser(proxy, fake_openai, app, origins):
    """CORS is the proxy's own policy: OpenAI's Access-Control-* headers are not relayed on /v1/*."""
    app.cors = CorsPolicy(origins)
    fake_openai.push(Behaviour(kind="raw", raw=UPSTREAM_CORS_ANSWER))
    response = await proxy.request(
        "/v1/raw/x", method="GET", headers={"Origin": ORIGIN, "Authorization": "Bearer sk-x"}
    )
    assert response.code == 200 and response.body == b"{}"
    cors = {name.lower(): value for name, value in response.headers.get_all() if name.lower().startswith("access-")}
    if origins:
        assert response.headers.get_list("Access-Control-Allow-Origin") == [ORIGIN]
        assert "access-control-allow-credentials" not in cors and cors["access-control-expose-headers"] != "*"
    else:
        assert cors == {}


@pytest.mark.parametrize("path", ["/static/playground.css", "/v1/realtime"])
@pytest.mark.gen_test
async def test_static_files_and_the_realtime_socket_answer_options_and_405_like_every_route(proxy, path):
    response = await proxy.request(path, method="OPTIONS", auth=False)
    assert response.code == 204 and "GET" in response.headers["Allow"]
    if path.startswith("/static/"):
        response = await proxy.request(path, method="POST", body=b"x", auth=False)
        assert response.code == 405 and response.headers["Allow"] == "GET, HEAD, OPTIONS"
        assert json.loads(response.body)["error"]["code"] == "method_not_allowed"
