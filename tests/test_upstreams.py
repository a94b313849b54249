"""Several upstreams (UPSTREAMS_FILE): weighted choice, failover only where it is safe, health, tiers,
aliases, Azure OpenAI, per-token upstreams, SIGHUP. Each upstream is a real fake OpenAI on its own port."""

import asyncio
import collections
import json
import signal
import time

import openai
import pytest
import tornado.httpclient
import websockets

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.upstream import routing
from chat_gpt_proxy.upstream.routing import Router, UpstreamsFileError, parse_upstreams
from settings import Settings
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, proxy_settings
from tests.egress_servers import TinyProxy
from tests.procs import ServerProcess, free_port
from tests.test_readme import snippet

SERVER_TOKEN = "team-TOKEN-5a7c9e1b3d"  # use_server_key: the upstreams' own keys
OTHER_SERVER_TOKEN = "other-team-TOKEN-7b9d1f3a5c"  # another tenant on the server key
ONLY_B = "only-b-TOKEN-2c4e6a8b0d"  # upstreams = ["b"]
KEY_A, KEY_B = "sk-upstream-a-key-0123", "sk-upstream-b-key-4567"
TOKENS_TOML = f"""
[team]
token = "{SERVER_TOKEN}"
use_server_key = true

[only-b]
token = "{ONLY_B}"
upstreams = ["b"]

[other-team]
token = "{OTHER_SERVER_TOKEN}"
use_server_key = true
"""


@pytest.fixture
def fakes(io_loop):
    """Three more fake upstreams (a, b, c) besides conftest's ``fake_openai``; all stopped at the end."""
    made = {}
    for name in ("a", "b", "c"):
        made[name] = FakeOpenAI()
        made[name].start()
    yield made
    for fake in made.values():
        io_loop.run_sync(fake.stop)


@pytest.fixture
def upstreams_toml(fakes):
    """The default file: a and b, caller keys, weights 1 and 3."""
    return f"""
[a]
base_url = "{fakes["a"].url}"
weight = 1

[b]
base_url = "{fakes["b"].url}"
weight = 3
"""


@pytest.fixture
def config(request, fake_openai, tmp_path, upstreams_toml):
    path = tmp_path / "upstreams.toml"
    path.write_text(upstreams_toml)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return proxy_settings(request, fake_openai, access_tokens_file=str(tokens), upstreams_file=str(path))


@pytest.fixture(autouse=True)
def quick_cool_down(monkeypatch):
    """Health's cool-down in tenths of a second, so that a test sees an upstream come back."""
    monkeypatch.setattr(routing, "COOL_DOWN", 0.5)


def counts(fakes) -> dict[str, int]:
    return {name: len(fake.received) for name, fake in fakes.items()}


async def chat(proxy, token=ACCESS_TOKEN, key=OPENAI_KEY, **body):
    headers = {"access-token": token}
    if key:
        headers["openai-token"] = key
    return await proxy.chat({"prompt": "hi", **body}, headers=headers, auth=False)


@pytest.mark.gen_test(timeout=60)
async def test_requests_spread_by_weight(proxy, fakes):
    total = 600
    for _ in range(total):
        response, _ = await chat(proxy)
        assert response.code == 200
    share_b = len(fakes["b"].received) / total
    # weight 3 of 4: 75 %, within ±10 % of it (binomial sd over 600 requests: 1.8 points).
    assert 0.675 <= share_b <= 0.825, counts(fakes)
    assert len(fakes["a"].received) + len(fakes["b"].received) == total


@pytest.fixture
def upstreams_first_b(fakes):
    """b in the first tier, a as the fallback: the order of tries is known."""
    return f"""
[b]
base_url = "{fakes["b"].url}"
api_key = "{KEY_B}"

[a]
base_url = "{fakes["a"].url}"
api_key = "{KEY_A}"
priority = 1
"""


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
@pytest.mark.gen_test(timeout=30)
async def test_an_error_status_moves_the_request_once(proxy, fakes, upstreams_first_b, app, status):
    use_upstreams(app, upstreams_first_b)
    fakes["b"].push(Behaviour(kind="error", status=status, message="busy"))
    response, body = await chat(proxy, token=SERVER_TOKEN, key=None)
    assert response.code == 200 and body["text"] == "Echo: hi"
    assert counts(fakes) == {"a": 1, "b": 1, "c": 0}  # each upstream received it once
    assert fakes["b"].received[0].headers["Authorization"] == "Bearer " + KEY_B
    assert fakes["a"].received[0].headers["Authorization"] == "Bearer " + KEY_A


def a_then_b(fakes) -> str:
    """a, with b as the fallback tier."""
    return f"""
[a]
base_url = "{fakes["a"].url}"
[b]
base_url = "{fakes["b"].url}"
priority = 1
"""


def use_upstreams(app, text: str) -> None:
    """The app now routes by the upstreams file ``text`` (written where its UPSTREAMS_FILE points)."""
    app.router = Router(app.config, parse_upstreams_text(app.config, text))


def parse_upstreams_text(config, text: str):
    path = config.upstreams_file
    with open(path, "w") as f:
        f.write(text)
    return parse_upstreams(path, config)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.gen_test(timeout=30)
async def test_a_refused_server_key_moves_the_request(proxy, fakes, upstreams_first_b, app, status):
    use_upstreams(app, upstreams_first_b)
    fakes["b"].push(Behaviour(kind="error", status=status, message="Incorrect API key provided"))
    response, _ = await chat(proxy, token=SERVER_TOKEN, key=None)
    assert response.code == 200 and counts(fakes) == {"a": 1, "b": 1, "c": 0}


@pytest.mark.gen_test(timeout=30)
async def test_a_dead_upstream_moves_the_request(proxy, fakes, upstreams_first_b, app, io_loop):
    await fakes["b"].stop()  # connection refused: nothing was sent
    use_upstreams(app, upstreams_first_b)
    response, _ = await chat(proxy, token=SERVER_TOKEN, key=None)
    assert response.code == 200 and len(fakes["a"].received) == 1


@pytest.mark.parametrize(
    "behaviour, key, expected",
    [
        (Behaviour(kind="error", status=400, message="bad"), None, 400),  # the request's own fault
        (Behaviour(kind="error", status=401, message="Incorrect API key provided"), OPENAI_KEY, 401),  # caller's key
        (Behaviour(kind="error", status=404, message="no such model"), None, 404),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_errors_of_the_request_itself_are_not_moved(proxy, fakes, app, behaviour, key, expected):
    toml = f"""
[b]
base_url = "{fakes["b"].url}"
{"" if key else 'api_key = "%s"' % KEY_B}

[a]
base_url = "{fakes["a"].url}"
{"" if key else 'api_key = "%s"' % KEY_A}
priority = 1
"""
    use_upstreams(app, toml)
    fakes["b"].push(behaviour)
    response, _ = await chat(proxy, token=SERVER_TOKEN if key is None else ACCESS_TOKEN, key=key)
    assert response.code == expected and counts(fakes) == {"a": 0, "b": 1, "c": 0}


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_that_started_is_never_moved(proxy, fakes, upstreams_first_b, app):
    use_upstreams(app, upstreams_first_b)
    fakes["b"].push(Behaviour(chunks=["one ", "two ", "three"], after=1, kind="drop"))
    streamed = await proxy.stream(
        {"prompt": "x", "generate_params": {"stream": True}}, headers={"access-token": SERVER_TOKEN}, auth=False
    )
    events = streamed.events()
    assert json.loads(events[-2])["error"]["code"] == "upstream_broken" and events[-1] == "[DONE]"
    assert counts(fakes) == {"a": 0, "b": 1, "c": 0}


@pytest.mark.gen_test(timeout=30)
async def test_a_failing_upstream_is_taken_out_then_tried_again_after_its_cool_down(
    proxy, fakes, upstreams_first_b, app, caplog
):
    use_upstreams(app, upstreams_first_b)
    # Two tenants' requests fail there (one tenant's error answers alone never take a route out).
    for token in (SERVER_TOKEN, OTHER_SERVER_TOKEN, SERVER_TOKEN):
        fakes["b"].push(Behaviour(kind="error", status=503, message="down"))
        assert (await chat(proxy, token=token, key=None))[0].code == 200
    assert counts(fakes) == {"a": 3, "b": 3, "c": 0}
    health = await proxy.request("/healthz", method="GET", auth=False)
    states = {u["name"]: u["state"] for u in json.loads(health.body)["upstreams"]}
    assert states == {"b": "down", "a": "up"}
    assert KEY_A not in health.body.decode() and KEY_B not in health.body.decode()
    # Out: the next requests go straight to a.
    assert (await chat(proxy, token=SERVER_TOKEN, key=None))[0].code == 200
    assert counts(fakes) == {"a": 4, "b": 3, "c": 0}
    # After its cool-down one request tries b again; it answers, and b is back.
    await asyncio.sleep(routing.COOL_DOWN + 0.1)
    assert (await chat(proxy, token=SERVER_TOKEN, key=None))[0].code == 200
    assert counts(fakes) == {"a": 4, "b": 4, "c": 0}
    downs = [r for r in caplog.records if "upstream down upstream=b" in r.getMessage()]
    ups = [r for r in caplog.records if "upstream 'b' is back" in r.getMessage()]
    assert len(downs) == 1 and len(ups) == 1


@pytest.mark.gen_test(timeout=30)
async def test_tiers_the_fallback_serves_only_while_the_first_tier_is_down(proxy, fakes, app):
    toml = f"""
[a]
base_url = "{fakes["a"].url}"
[b]
base_url = "{fakes["b"].url}"
[c]
base_url = "{fakes["c"].url}"
priority = 1
"""
    use_upstreams(app, toml)
    for _ in range(20):
        assert (await chat(proxy))[0].code == 200
    assert counts(fakes)["c"] == 0
    await fakes["a"].stop()
    await fakes["b"].stop()
    for _ in range(5):
        assert (await chat(proxy))[0].code == 200
    assert counts(fakes)["c"] == 5


@pytest.mark.gen_test(timeout=30)
async def test_aliases_models_and_the_allow_list_reads_the_callers_name(proxy, fakes, app):
    toml = f"""
[a]
base_url = "{fakes["a"].url}"
models = ["gpt-4o-mini"]
aliases = {{ "gpt-4o" = "provider-gpt-4o" }}
[b]
base_url = "{fakes["b"].url}"
models = ["o*"]
"""
    use_upstreams(app, toml)
    response, _ = await chat(proxy, generate_params={"model_name": "gpt-4o"})
    assert response.code == 200 and fakes["a"].received[-1].json["model"] == "provider-gpt-4o"
    response, _ = await chat(proxy, generate_params={"model_name": "o3"})
    assert response.code == 200 and fakes["b"].received[-1].json["model"] == "o3"
    response, body = await chat(proxy, generate_params={"model_name": "gpt-5"})
    assert response.code == 404 and body["error"]["code"] == "model_not_found" and "gpt-5" in body["text"]
    # /v1 too: the JSON body is renamed for the upstream.
    response = await proxy.request(
        "/v1/chat/completions",
        json_body={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer " + OPENAI_KEY},
    )
    assert response.code == 200 and fakes["a"].received[-1].json["model"] == "provider-gpt-4o"


@pytest.mark.gen_test(timeout=30)
async def test_azure_openai_json_stream_and_responses(proxy, fakes, app):
    azure = fakes["c"]
    azure.azure_key, azure.azure_deployments = KEY_B, {"my-gpt4o"}
    toml = f"""
[azure]
kind = "azure"
base_url = "{azure.azure_endpoint}"
api_key = "{KEY_B}"
api_version = "2024-10-21"
aliases = {{ "gpt-4o" = "my-gpt4o" }}
"""
    use_upstreams(app, toml)
    response, body = await chat(proxy, token=SERVER_TOKEN, key=None, generate_params={"model_name": "gpt-4o"})
    assert response.code == 200 and body["text"] == "Echo: hi"
    seen = azure.received[-1]
    assert seen.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert seen.query_arguments["api-version"] == ["2024-10-21"]
    assert seen.headers["api-key"] == KEY_B and "authorization" not in seen.headers
    streamed = await proxy.stream(
        {"prompt": "a b", "generate_params": {"model_name": "gpt-4o", "stream": True}},
        headers={"access-token": SERVER_TOKEN},
        auth=False,
    )
    assert streamed.events()[-1] == "[DONE]" and "Echo" in streamed.body.decode()
    response = await proxy.request(
        "/v1/responses",
        json_body={"model": "gpt-4o", "input": "hello"},
        headers={"access-token": SERVER_TOKEN},
        auth=False,
    )
    assert response.code == 200 and azure.received[-1].path == "/openai/responses"
    assert azure.received[-1].json["model"] == "my-gpt4o"


@pytest.mark.gen_test(timeout=30)
async def test_a_token_limited_to_some_upstreams(proxy, fakes):
    for _ in range(10):
        response, _ = await chat(proxy, token=ONLY_B)
        assert response.code == 200
    assert counts(fakes) == {"a": 0, "b": 10, "c": 0}


@pytest.mark.gen_test(timeout=30)
async def test_each_upstream_has_its_own_egress_proxy(proxy, fakes, app, tmp_path):
    tiny = TinyProxy(str(tmp_path))
    try:
        toml = f"""
[a]
base_url = "{fakes["a"].url}"
proxy = "{tiny.proxy().address}"
"""
        use_upstreams(app, toml)
        assert (await chat(proxy))[0].code == 200
        assert tiny.connections() == 1 and len(fakes["a"].received) == 1
    finally:
        tiny.stop()


@pytest.mark.gen_test(timeout=30)
async def test_the_official_sdk_through_two_upstreams(proxy, fakes, base_url):
    def run():
        client = openai.OpenAI(
            base_url=base_url + "/v1", api_key=OPENAI_KEY, default_headers={"access-token": ACCESS_TOKEN}
        )
        answers = [
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "n%d" % i}])
            for i in range(8)
        ]
        streamed = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "s"}], stream=True
            )
        )
        return answers, streamed

    answers, streamed = await proxy.in_thread(run)
    assert [a.choices[0].message.content for a in answers] == ["Echo: n%d" % i for i in range(8)]
    assert streamed and len(fakes["a"].received) + len(fakes["b"].received) == 9


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[a]\nkind = "openai"\n', "upstream 'a': base_url is missing"),
        ('[a]\nbase_url = "http://127.0.0.1:1/v1"\nkind = "bedrock"\n', 'kind must be one of "openai", "azure"'),
        ('[a]\nbase_url = "http://user:sk-secret@127.0.0.1:1/v1"\n', "must not hold a user or password"),
        ('[a]\nbase_url = "http://127.0.0.1:1/v1"\n[a]\nbase_url = "http://127.0.0.1:2/v1"\n', "not valid TOML"),
        ('[a]\nbase_url = "http://127.0.0.1:1/v1"\nweight = 0\n', "weight must be an integer from 1 to 1000"),
        ('[a]\nbase_url = "https://x.example"\nkind = "azure"\n', "an azure upstream needs its api_key"),
        ('[a]\nbase_url = "http://127.0.0.1:1/v1"\nproxy = "ftp://p:1"\n', "upstream 'a': proxy: the scheme"),
        ('[a]\nbase_url = "https://x.example"\nkind = "anthropic"\napi_version = "1"\n', "api_version is for"),
        ('[a]\nbase_url = "https://x.example/v1"\nkind = "anthropic"\n', "ends before /v1"),
        ("", "names no upstream"),
    ],
)
def test_a_bad_upstreams_file_is_one_line_naming_the_entry(tmp_path, toml, message):
    path = tmp_path / "upstreams.toml"
    path.write_text(toml)
    with pytest.raises(UpstreamsFileError) as error:
        parse_upstreams(str(path), Settings())
    text = str(error.value)
    assert message in text and "\n" not in text and "sk-secret" not in text, text


@pytest.mark.gen_test(timeout=60)
async def test_startup_refuses_a_broken_file_and_sighup_under_load_loses_no_request(fakes, tmp_path):
    path = tmp_path / "upstreams.toml"
    path.write_text('[a]\nkind = "nope"\n')
    server = ServerProcess({"ACCESS_TOKEN": ACCESS_TOKEN, "UPSTREAMS_FILE": str(path)}, str(tmp_path / "broken.log"))
    try:
        assert await server.wait_exit(30) == 2
        lines = server.output().splitlines()
        assert lines == [line for line in lines if "UPSTREAMS_FILE" in line] and len(lines) == 1
    finally:
        server.stop()
    path.write_text(f'[a]\nbase_url = "{fakes["a"].url}"\n')
    server = ServerProcess({"ACCESS_TOKEN": ACCESS_TOKEN, "UPSTREAMS_FILE": str(path)}, str(tmp_path / "s.log"))
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    codes = collections.Counter()
    try:
        await server.wait_ready()

        async def load(deadline):
            while time.monotonic() < deadline:
                response = await client.fetch(
                    server.url + "/chat_complete",
                    method="POST",
                    body=json.dumps({"prompt": "hi"}),
                    headers={"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY},
                    raise_error=False,
                )
                codes[response.code] += 1

        deadline = time.monotonic() + 3
        loaders = [asyncio.ensure_future(load(deadline)) for _ in range(4)]
        await asyncio.sleep(0.5)
        path.write_text(f'[b]\nbase_url = "{fakes["b"].url}"\n')
        server.signal(signal.SIGHUP)
        await asyncio.sleep(1)
        path.write_text("[broken\n")  # kept out: b stays in force
        server.signal(signal.SIGHUP)
        await asyncio.gather(*loaders)
        assert set(codes) == {200}, codes
        b_before = len(fakes["b"].received)
        response = await client.fetch(
            server.url + "/chat_complete",
            method="POST",
            body=json.dumps({"prompt": "hi"}),
            headers={"access-token": ACCESS_TOKEN, "openai-token": OPENAI_KEY},
        )
        assert response.code == 200 and len(fakes["b"].received) == b_before + 1
        assert "upstreams file refused" in server.output()
    finally:
        client.close()
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_an_unreachable_egress_proxy_moves_the_request(proxy, fakes, app):
    toml = f"""
[a]
base_url = "{fakes["a"].url}"
proxy = "http://127.0.0.1:{free_port()}"
[b]
base_url = "{fakes["b"].url}"
priority = 1
"""
    use_upstreams(app, toml)
    response, _ = await chat(proxy)
    assert response.code == 200 and counts(fakes) == {"a": 0, "b": 1, "c": 0}
    metrics = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    assert 'proxy_upstream_failovers_total{reason="proxy_unreachable",upstream="a"} 1.0' in metrics
    assert 'proxy_upstream_requests_total{upstream="b"} 1.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_the_realtime_relay_fails_over_at_its_handshake(proxy, fakes, app, base_url):
    await fakes["a"].stop()
    use_upstreams(app, a_then_b(fakes))
    url = "ws" + base_url[len("http") :] + "/v1/realtime?model=gpt-realtime"
    headers = {"access-token": ACCESS_TOKEN, "Authorization": "Bearer " + OPENAI_KEY}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
    assert len(fakes["b"].realtime_sessions) == 1


@pytest.mark.parametrize(
    "name, expected",
    [
        ("upstreams-two-keys", [("key-1", "openai", 0), ("key-2", "openai", 0)]),
        ("upstreams-azure-fallback", [("openai", "openai", 0), ("azure", "azure", 1)]),
        ("upstreams-local-models", [("openai", "openai", 0), ("local", "openai", 0)]),
        (
            "upstreams-anthropic",
            [
                ("openai", "openai", 0),
                ("claude", "anthropic", 0),
                ("claude-2", "anthropic", 1),
                ("claude-callers", "anthropic", 0),
            ],
        ),
    ],
)
def test_the_documented_upstreams_files_parse_as_described(tmp_path, name, expected):
    language, code = snippet(name)
    assert language == "toml"
    for secret in ("openai-key-1", "openai-key-2", "openai-key", "azure-key", "anthropic-key", "anthropic-key-2"):
        (tmp_path / secret).write_text("sk-from-%s\n" % secret)
        code = code.replace('/run/secrets/%s"' % secret, '%s"' % (tmp_path / secret))
    path = tmp_path / "upstreams.toml"
    path.write_text(code)
    upstreams = parse_upstreams(str(path), Settings())
    assert [(u.name, u.kind, u.priority) for u in upstreams] == expected
    by_name = {u.name: u for u in upstreams}
    if name == "upstreams-azure-fallback":
        azure = by_name["azure"]
        assert azure.api_key == "sk-from-azure-key" and azure.serves("gpt-4o") and not azure.serves("o3")
        assert azure.url("chat/completions", "", "gpt-4o") == (
            "https://my-resource.openai.azure.com/openai/deployments/my-gpt4o-deployment/chat/completions"
            "?api-version=2024-10-21"
        )
        assert by_name["openai"].egress.scheme == "socks5h"
        router = Router(Settings(upstreams_file=str(path)), upstreams)
        assert [u.name for u in router.candidates("gpt-4o", server_key=True)] == ["openai", "azure"]
        assert [u.name for u in router.candidates("o3", server_key=True)] == ["openai"]
    if name == "upstreams-anthropic":
        router = Router(Settings(upstreams_file=str(path)), upstreams)
        anthropic = ("anthropic",)
        assert [u.name for u in router.candidates("claude-sonnet-4-5", server_key=True, kinds=anthropic)] == [
            "claude",
            "claude-2",
        ]
        assert [u.name for u in router.candidates("claude-sonnet-4-5", kinds=anthropic)] == ["claude-callers"]
        assert [u.name for u in router.candidates("gpt-4o", server_key=True)] == ["openai"]
        assert by_name["claude"].url("messages", "", None) == "https://api.anthropic.com/v1/messages"
    if name == "upstreams-local-models":
        assert by_name["local"].serves("llama-3-70b") and not by_name["local"].serves("gpt-4o")
        assert not by_name["local"].api_key and not by_name["local"].forward_caller_key
        router = Router(Settings(upstreams_file=str(path)), upstreams)
        assert [u.name for u in router.candidates("llama-3-8b")] == ["local"]
        assert [u.name for u in router.candidates("gpt-4o")] == ["openai"]
        assert [u.name for u in router.candidates(None)] == ["openai"]


def test_anthropic_upstreams_serve_anthropics_api_alone(tmp_path):
    """Each API goes to the upstreams that speak it, before the tiers and the catch-alls are weighed."""
    (tmp_path / "key").write_text("sk-ant-from-file\n")
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[openai]\nbase_url = "https://api.openai.com/v1"\napi_key = "sk-openai"\n'
        '[claude]\nkind = "anthropic"\nbase_url = "https://api.anthropic.com"\napi_key_file = "%s"\n'
        'models = ["claude-*"]\n' % (tmp_path / "key")
    )
    upstreams = parse_upstreams(str(path), Settings())
    router = Router(Settings(upstreams_file=str(path)), upstreams)
    claude = upstreams[1]
    assert claude.kind == "anthropic" and claude.api_key == "sk-ant-from-file"
    assert [u.name for u in router.candidates("claude-opus-5-5", server_key=True)] == ["openai"]
    assert [u.name for u in router.candidates("claude-opus-5-5", server_key=True, kinds=("anthropic",))] == ["claude"]
    assert router.candidates("gpt-4o", server_key=True, kinds=("anthropic",)) == []
    assert claude.url("messages", "beta=true", "claude-opus-5-5") == "https://api.anthropic.com/v1/messages?beta=true"
    assert claude.auth_headers("sk-ant-x") == {"x-api-key": "sk-ant-x"}
    assert Router(Settings()).candidates("claude-opus-5-5", kinds=("anthropic",)) == []


@pytest.mark.parametrize("model", ["gpt-4o/../../evil?x=", "..", "gpt 4o", "a#b", "x/y"])
@pytest.mark.gen_test(timeout=30)
async def test_an_azure_deployment_is_never_a_path_the_caller_writes(proxy, fakes, app, model):
    azure = fakes["c"]
    toml = f"""
[azure]
kind = "azure"
base_url = "{azure.azure_endpoint}"
api_key = "{KEY_B}"
"""
    use_upstreams(app, toml)
    response = await proxy.request(
        "/v1/chat/completions",
        json_body={"model": model, "messages": [{"role": "user", "content": "x"}]},
        headers={"access-token": SERVER_TOKEN},
        auth=False,
    )
    assert response.code == 400 and json.loads(response.body)["error"]["code"] == "invalid_model"
    assert len(azure.received) == 0


def test_an_alias_that_is_no_path_name_is_refused(tmp_path):
    path = tmp_path / "upstreams.toml"
    path.write_text('[a]\nbase_url = "http://127.0.0.1:1/v1"\naliases = { "gpt-4o" = ".." }\n')
    with pytest.raises(UpstreamsFileError, match="aliases must map"):
        parse_upstreams(str(path), Settings())


@pytest.mark.gen_test(timeout=30)
async def test_a_probe_whose_client_left_gives_its_turn_to_the_next_request(proxy, fakes, upstreams_first_b, app):
    use_upstreams(app, upstreams_first_b)
    for token in (SERVER_TOKEN, OTHER_SERVER_TOKEN, SERVER_TOKEN):
        fakes["b"].push(Behaviour(kind="error", status=503, message="down"))
        assert (await chat(proxy, token=token, key=None))[0].code == 200
    await asyncio.sleep(routing.COOL_DOWN + 0.1)
    # The probe hangs, and its client gives up.
    fakes["b"].push(Behaviour(kind="hang"))
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await proxy.request(
            json_body={"prompt": "hi"}, headers={"access-token": SERVER_TOKEN}, auth=False, request_timeout=0.5
        )
    deadline = time.monotonic() + 5
    while app.router.health["b"].probing and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    before = len(fakes["b"].received)
    assert (await chat(proxy, token=SERVER_TOKEN, key=None))[0].code == 200
    assert len(fakes["b"].received) == before + 1  # the next request probed b, which answered
    assert json.loads((await proxy.request("/healthz", method="GET", auth=False)).body)["upstreams"][0]["state"] == "up"


@pytest.mark.gen_test(timeout=30)
async def test_a_callers_own_key_out_of_quota_does_not_take_the_route_out(proxy, fakes, app):
    use_upstreams(app, a_then_b(fakes))
    for _ in range(5):
        fakes["a"].push(Behaviour(kind="error", status=429, message="You exceeded your current quota"))
        assert (await chat(proxy))[0].code == 200  # moved to b
    assert app.router.health_of(app.router.upstreams[0]).state == "up"
    assert (await chat(proxy))[0].code == 200
    assert counts(fakes) == {"a": 6, "b": 5, "c": 0}


@pytest.mark.gen_test(timeout=30)
async def test_a_local_server_never_sees_a_callers_key_and_model_free_requests_go_to_openai(proxy, fakes, app):
    toml = f"""
[openai]
base_url = "{fakes["a"].url}"
[local]
base_url = "{fakes["b"].url}"
models = ["llama-3*"]
forward_caller_key = false
"""
    use_upstreams(app, toml)
    response, _ = await chat(proxy, generate_params={"model_name": "llama-3-8b"})
    assert response.code == 200 and "authorization" not in fakes["b"].received[-1].headers
    for _ in range(6):
        response = await proxy.request("/v1/models", method="GET", headers={"Authorization": "Bearer " + OPENAI_KEY})
        assert response.code == 200
    assert counts(fakes) == {"a": 6, "b": 1, "c": 0}
    assert fakes["a"].received[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY
    # The team's server-key requests go only to upstreams with keys of their own: none here.
    response, body = await chat(proxy, token=SERVER_TOKEN, key=None)
    assert response.code == 403 and body["error"]["code"] == "upstream_not_allowed"
