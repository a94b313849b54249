"""Named access tokens (ACCESS_TOKENS_FILE), their limits, the server-held OpenAI key, usage per token."""

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tornado.httpclient

from chat_gpt_proxy.access.tokens import TokenRegistry, TokensFileError, parse_tokens_file
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from settings import Settings, SettingsError
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY, OTHER_SECRETS, open_raw, proxy_settings
from tests.procs import ROOT, ServerProcess
from tests.test_allowed_models import raw_request
from tests.test_readme import all_documents_text, snippet

ALICE = "alice-TOKEN-4b9e2f71c0"  # use_server_key
BOB = "bob-TOKEN-8d1c3a55e7f0"  # given only as its SHA-256; allowed_models = ["gpt-4o"]
CAROL = "carol-TOKEN-1f7a9c3e2b"  # max_concurrent = 1
DAVE = "dave-TOKEN-6e0b4d8a1c"  # disabled
ERIN = "erin-TOKEN-3a5c7e9b1d"  # rate_limit_per_minute = 2
GRACE = "grace-TOKEN-5d7f9b1e3a"  # rate_limit_per_minute = 0: none, whatever RATE_LIMIT_PER_TOKEN says
FRANK = "frank-TOKEN-9c2e4a6b8d"  # only in the reloaded file
SHORT = "short-tok-12"  # too short to be accepted in plain text
SERVER_KEY = "sk-SERVERKEY-7e1d4c9a2b"
README_ALICE = "the-token-you-gave-alice"  # the README's example
NAMED = (ALICE, BOB, CAROL, DAVE, ERIN, GRACE, FRANK, SHORT, SERVER_KEY, README_ALICE)
NAMES = ("alice", "bob", "carol", "dave", "erin", "grace", "frank")


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS_TOML = f"""
[alice]
token = "{ALICE}"
use_server_key = true

[bob]
token_sha256 = "{sha256(BOB)}"
allowed_models = ["gpt-4o"]

[carol]
token = "{CAROL}"
max_concurrent = 1

[dave]
token = "{DAVE}"
disabled = true

[erin]
token = "{ERIN}"
rate_limit_per_minute = 2

[grace]
token = "{GRACE}"
rate_limit_per_minute = 0
"""

RELOADED_TOML = TOKENS_TOML.replace("[alice]", "[frank]").replace(ALICE, FRANK)


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    return path


@pytest.fixture
def config(request, fake_openai, tokens_file):
    """This module's proxy: one unnamed token, the file above, a server key, ALLOWED_MODELS=gpt-4o-mini."""
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tokens_file),
        openai_api_key=SERVER_KEY,
        allowed_models=("gpt-4o-mini",),
    )


def as_(token, key=None, **headers):
    """Headers of a caller with ``token`` and, if given, its own OpenAI key."""
    out = {"access-token": token, **headers}
    if key:
        out["openai-token"] = key
    return out


def assert_no_named_secret(*texts):
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        for secret in NAMED:
            assert secret not in text


def access_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "chat_gpt_proxy.access"]


def field(line, name):
    return dict(part.split("=", 1) for part in line.split(" "))[name]


async def metrics_text(proxy) -> str:
    response = await proxy.request("/metrics", method="GET", auth=False)
    return response.body.decode()


def test_every_value_used_here_is_scanned_for_in_the_run_log():
    assert set(NAMED) <= set(OTHER_SECRETS)


# -- the file


def test_file_forms_plain_and_hashed(tokens_file):
    registry = TokenRegistry(
        Settings(access_tokens=(ACCESS_TOKEN,), access_tokens_file=str(tokens_file), openai_api_key=SERVER_KEY)
    )
    assert registry.lookup(ALICE).name == "alice"
    assert registry.lookup(BOB).name == "bob"  # the file holds only its SHA-256
    assert registry.lookup(ACCESS_TOKEN).name == "-"
    assert registry.lookup(sha256(BOB)) is None  # the hash itself is no token
    assert registry.lookup(ALICE[:-1]) is None and registry.lookup("") is None
    assert registry.named == 6


def test_every_policy_field_and_the_global_defaults(tokens_file):
    settings = Settings(
        access_tokens=(ACCESS_TOKEN,),
        access_tokens_file=str(tokens_file),
        openai_api_key=SERVER_KEY,
        rate_limit_per_token=7,
        allowed_models=("gpt-4o-mini",),
    )
    policies = {e.name: e.policy for e in TokenRegistry(settings).entries}
    assert policies["alice"].use_server_key and not policies["erin"].use_server_key
    assert policies["bob"].allowed_models == ("gpt-4o",)
    assert policies["alice"].allowed_models == ("gpt-4o-mini",)  # unset: ALLOWED_MODELS
    assert policies["carol"].max_concurrent == 1 and policies["alice"].max_concurrent == 0
    assert policies["dave"].disabled and not policies["alice"].disabled
    assert policies["erin"].rate_limit_per_minute == 2
    assert policies["alice"].rate_limit_per_minute == 7  # unset: RATE_LIMIT_PER_TOKEN
    assert policies["grace"].rate_limit_per_minute == 0  # 0: none
    assert not policies["-"].use_server_key and policies["-"].rate_limit_per_minute == 7


def test_limit_counts_carry_over_a_reload(tokens_file):
    registry = TokenRegistry(Settings(access_tokens=(), access_tokens_file=str(tokens_file), openai_api_key=SERVER_KEY))
    carol, erin = registry.lookup(CAROL), registry.lookup(ERIN)
    assert registry.admit(carol) is None and registry.admit(erin) is None and registry.admit(erin) is None
    registry.reload()
    assert registry.lookup(CAROL) is not carol, "a new snapshot of entries"
    assert registry.admit(registry.lookup(CAROL)).limit == "max_concurrent"
    assert registry.admit(registry.lookup(ERIN)).limit == "rate_limit_per_minute"
    registry.release(carol)
    assert registry.admit(registry.lookup(CAROL)) is None


def test_lookup_compares_digests_with_every_entry(tokens_file, monkeypatch):
    """Constant time: as many comparisons, of equal-length digests, whichever token (if any) matches."""
    settings = Settings(
        access_tokens=(ACCESS_TOKEN, "second-token-abc"), access_tokens_file=str(tokens_file), openai_api_key=SERVER_KEY
    )
    registry = TokenRegistry(settings)
    assert len(registry.entries) == 8
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    for presented, name in ((ACCESS_TOKEN, "-"), (GRACE, "grace"), (BOB, "bob"), ("wrong", None)):
        calls.clear()
        entry = registry.lookup(presented)
        assert (entry.name if entry else None) == name
        assert len(calls) == 8
        assert all(len(a) == len(b) == 32 for a, b in calls)
        assert {b for _, b in calls} == {e.digest for e in registry.entries}


@pytest.mark.parametrize(
    "body,problem",
    [
        ('["al ice"]\ntoken = "%s"\n' % ALICE, "a name is"),
        ('[alice]\ntoken = "%s"\n' % SHORT, "shorter than 16"),
        ('[alice]\ntoken = "has a space in it ok"\n', "visible ASCII"),
        ('[alice]\ntoken = "%s"\ntoken_sha256 = "%s"\n' % (ALICE, sha256(ALICE)), "exactly one of"),
        ("[alice]\nmax_concurrent = 1\n", "exactly one of"),
        ('[alice]\ntoken_sha256 = "abc"\n', "64 hexadecimal"),
        ('[alice]\ntoken = "%s"\nrate_limit = 5\n' % ALICE, "unknown field 'rate_limit'"),
        ('[alice]\ntoken = "%s"\nrate_limit_per_minute = -1\n' % ALICE, "rate_limit_per_minute must be an integer"),
        ('[alice]\ntoken = "%s"\nmax_concurrent = true\n' % ALICE, "max_concurrent must be an integer"),
        ('[alice]\ntoken = "%s"\nmax_concurrent = "4"\n' % ALICE, "max_concurrent must be an integer"),
        ('[alice]\ntoken = "%s"\nallowed_models = []\n' % ALICE, "allowed_models must be a non-empty list"),
        ('[alice]\ntoken = "%s"\nallowed_models = "gpt-4o"\n' % ALICE, "allowed_models must be a non-empty list"),
        ('[alice]\ntoken = "%s"\ndisabled = "yes"\n' % ALICE, "disabled must be true or false"),
        ('[alice]\ntoken = "%s"\n[bob]\ntoken_sha256 = "%s"\n' % (ALICE, sha256(ALICE)), "same token as token 'alice'"),
        ('[alice]\ntoken = "%s"\n' % ACCESS_TOKEN, "same token as one in ACCESS_TOKEN"),
        ('token = "%s"\n' % ALICE, "'token' is not a table"),
        ('[alice]\ntoken = "%s\n' % ALICE, "not valid TOML"),
    ],
    ids=lambda value: value if " " in value and "=" not in value else "",  # never a token in a test id
)
def test_broken_files_are_refused_with_one_line_naming_file_and_token(tmp_path, body, problem):
    path = tmp_path / "tokens.toml"
    path.write_text(body)
    with pytest.raises(TokensFileError) as info:
        TokenRegistry(Settings(access_tokens=(ACCESS_TOKEN,), access_tokens_file=str(path), openai_api_key=SERVER_KEY))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path) + ": ")
    assert problem in message, message
    if body.startswith("[") and problem != "not valid TOML":
        assert "token 'alice'" in message or "token 'bob'" in message or "token 'al ice'" in message, message
    assert_no_named_secret(message)
    assert ACCESS_TOKEN not in message


def test_use_server_key_needs_a_server_key(tokens_file):
    with pytest.raises(TokensFileError, match="token 'alice': use_server_key = true, but neither OPENAI_API_KEY"):
        TokenRegistry(Settings(access_tokens_file=str(tokens_file)))


def test_unreadable_file(tmp_path):
    with pytest.raises(TokensFileError, match="cannot read it: No such file"):
        parse_tokens_file(str(tmp_path / "missing.toml"), Settings())


# -- settings


def test_tokens_file_replaces_the_default_token(tokens_file):
    s = Settings.from_env({"ACCESS_TOKENS_FILE": str(tokens_file)})
    assert s.access_tokens == () and not s.default_token_in_use and s.access_tokens_file == str(tokens_file)
    s = Settings.from_env({"ACCESS_TOKENS_FILE": str(tokens_file), "ACCESS_KEY": "legacy-token"})
    assert s.access_tokens == ("legacy-token",)


def test_server_key_from_env_or_file_never_shown(tmp_path):
    key_file = tmp_path / "openai.key"
    # The first line is the key (docs/team.md): a note after it is fine.
    key_file.write_text(SERVER_KEY + "\n# rotated 2026-11, ask ops\n")
    for env in ({"OPENAI_API_KEY": SERVER_KEY}, {"OPENAI_API_KEY_FILE": str(key_file)}):
        s = Settings.from_env(env)
        assert s.openai_api_key == SERVER_KEY
        assert s.masked()["openai_api_key"] == "***"
        assert SERVER_KEY not in repr(s) and SERVER_KEY not in json.dumps(s.masked(), default=str)
    assert Settings.from_env({}).openai_api_key == ""


@pytest.mark.parametrize(
    "env,message",
    [
        ({"OPENAI_API_KEY": SERVER_KEY, "OPENAI_API_KEY_FILE": "/x"}, "OPENAI_API_KEY_FILE: set OPENAI_API_KEY or"),
        ({"OPENAI_API_KEY_FILE": "/nonexistent/key"}, "OPENAI_API_KEY_FILE: cannot read '/nonexistent/key'"),
        ({"OPENAI_API_KEY": SERVER_KEY + " tail"}, "OPENAI_API_KEY: must be one line of visible ASCII"),
    ],
)
def test_bad_server_key_settings(env, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message) and SERVER_KEY not in str(info.value)


def test_empty_server_key_file(tmp_path):
    (tmp_path / "k").write_text("\n")
    with pytest.raises(SettingsError, match="OPENAI_API_KEY_FILE: .* is empty"):
        Settings.from_env({"OPENAI_API_KEY_FILE": str(tmp_path / "k")})


def test_server_refuses_a_broken_tokens_file_with_one_line(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text('[alice]\ntoken = "%s"\n' % SHORT)
    env = {k: v for k, v in os.environ.items() if k not in ("ACCESS_TOKEN", "ACCESS_KEY", "OPENAI_API_KEY")}
    env.update(ACCESS_TOKENS_FILE=str(path), PORT="1")
    proc = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("chat_gpt_proxy: invalid setting ACCESS_TOKENS_FILE: %s: token 'alice': " % path)
    assert SHORT not in proc.stderr


# -- requests


@pytest.mark.gen_test
async def test_usage_per_token_name_in_log_and_metrics(proxy, fake_openai, caplog):
    usage = {"include_usage": True}
    await proxy.chat({"prompt": "one two"}, headers=as_(ALICE, OPENAI_KEY))
    await proxy.chat({"prompt": "x", "generate_params": {"model_name": "gpt-4o"}}, headers=as_(BOB, OPENAI_KEY))
    await proxy.chat({"prompt": "x"})
    await proxy.chat({"prompt": "x"}, headers=as_("wrong-token-value"))
    streamed = await proxy.stream(
        {"prompt": "a b", "generate_params": {"stream": True, "stream_options": usage}}, headers=as_(ERIN, OPENAI_KEY)
    )
    assert streamed.response.code == 200
    response = await proxy.request(
        "/v1/chat/completions",
        headers=as_(GRACE, Authorization="Bearer " + OPENAI_KEY),
        json_body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.code == 200
    lines = access_lines(caplog)
    assert [field(line, "token") for line in lines] == ["alice", "bob", "-", "-", "erin", "grace"]
    assert [field(line, "status") for line in lines] == ["200", "200", "200", "403", "200", "200"]
    text = await metrics_text(proxy)
    for name in ("alice", "bob", "erin"):
        assert 'proxy_requests_total{route="chat_complete",status="200",token="%s"} 1.0' % name in text
    assert 'proxy_requests_total{route="chat_complete",status="200",token="-"} 1.0' in text
    assert 'proxy_requests_total{route="chat_complete",status="403",token="-"} 1.0' in text
    assert 'proxy_requests_total{route="v1",status="200",token="grace"} 1.0' in text
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="alice"} 9.0' in text
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o",token="bob"} 9.0' in text
    assert 'proxy_tokens_total{kind="completion",model="gpt-4o-mini",token="erin"}' in text  # from the stream
    assert 'proxy_tokens_total{kind="prompt",model="gpt-4o-mini",token="grace"}' in text
    assert_no_named_secret("\n".join(lines), text)
    assert "wrong-token-value" not in "\n".join(lines) + text


@pytest.mark.settings(log_format="json")
@pytest.mark.gen_test
async def test_json_access_log_carries_the_token_name(proxy, fake_openai, caplog):
    await proxy.chat({"prompt": "x"}, headers=as_(ALICE, OPENAI_KEY))
    await proxy.chat({"prompt": "x"})
    assert [json.loads(line)["token"] for line in access_lines(caplog)] == ["alice", "-"]


@pytest.mark.gen_test
async def test_server_key_only_without_a_callers_key_and_only_with_permission(proxy, fake_openai):
    chat = {"prompt": "x"}
    v1_body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    calls = [
        # (token, headers, path, body, expected status, key the upstream must get)
        (ALICE, {}, "/chat_complete", chat, 200, SERVER_KEY),
        (ALICE, {"openai-token": OPENAI_KEY}, "/chat_complete", chat, 200, OPENAI_KEY),
        (ALICE, {}, "/v1/chat/completions", v1_body, 200, SERVER_KEY),
        (ALICE, {"Authorization": "Bearer " + OPENAI_KEY}, "/v1/chat/completions", v1_body, 200, OPENAI_KEY),
        (ALICE, {"openai-token": OPENAI_KEY}, "/v1/chat/completions", v1_body, 200, OPENAI_KEY),
        (ALICE, {}, "/v1/models", None, 200, SERVER_KEY),
        # A caller's key wins even when it is malformed: 401, never the server key instead.
        (ALICE, {"openai-token": "x" * 600}, "/chat_complete", chat, 401, None),
        (ERIN, {}, "/chat_complete", chat, 401, None),
        (ERIN, {}, "/v1/models", None, 401, None),
        (ACCESS_TOKEN, {}, "/chat_complete", chat, 401, None),
    ]
    for token, headers, path, body, status, upstream_key in calls:
        before = len(fake_openai.received)
        response = await proxy.request(
            path, method="GET" if body is None else "POST", json_body=body, auth=False, headers=as_(token, **headers)
        )
        assert response.code == status, (path, headers, response.body)
        assert_no_named_secret(response.body, repr(response.headers.get_all()))
        if upstream_key is None:
            assert len(fake_openai.received) == before
            assert json.loads(response.body)["error"]["code"] in (
                "missing_openai_token",
                "missing_api_key",
                "invalid_openai_token",
            )
        else:
            assert fake_openai.received[-1].headers["Authorization"] == "Bearer " + upstream_key


@pytest.mark.gen_test
async def test_a_refused_server_key_is_the_operators_problem_and_never_shown(proxy, fake_openai, caplog):
    """OpenAI's 401 quotes the key's ends ("sk-SERV***2b"): a caller of the shared key gets a 502 of ours instead."""
    quoted = "Incorrect API key provided: %s***%s." % (SERVER_KEY[:7], SERVER_KEY[-4:])
    refusal = Behaviour(kind="error", status=401, message=quoted, error_code="invalid_api_key")
    v1_body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    for path, body in (("/chat_complete", {"prompt": "x"}), ("/v1/chat/completions", v1_body)):
        fake_openai.push(refusal)
        response = await proxy.request(path, json_body=body, auth=False, headers=as_(ALICE))
        assert response.code == 502, response.body
        assert json.loads(response.body)["error"]["code"] == "server_key_refused"
        assert SERVER_KEY[-4:].encode() not in response.body
    # A caller's own key refused is the caller's business: OpenAI's answer, unchanged.
    fake_openai.push(refusal)
    response = await proxy.request(
        "/chat_complete", json_body={"prompt": "x"}, auth=False, headers=as_(ALICE, OPENAI_KEY)
    )
    assert response.code == 401 and json.loads(response.body)["error"]["code"] == "invalid_api_key"
    assert sum("server key refused by the upstream" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.gen_test
async def test_allowed_models_per_token_override_allowed_models(proxy, fake_openai):
    def v1(model):
        return {"model": model, "messages": [{"role": "user", "content": "x"}]}

    def chat(model):
        return {"prompt": "x", "generate_params": {"model_name": model}}

    # (token, model, allowed): ALLOWED_MODELS is gpt-4o-mini; bob's own list is gpt-4o.
    for token, model, allowed in (
        (BOB, "gpt-4o", True),
        (BOB, "gpt-4o-mini", False),
        (ALICE, "gpt-4o-mini", True),
        (ALICE, "gpt-4o", False),
        (ACCESS_TOKEN, "gpt-4o", False),
    ):
        for path, body in (("/chat_complete", chat(model)), ("/v1/chat/completions", v1(model))):
            response = await proxy.request(path, json_body=body, headers=as_(token, OPENAI_KEY))
            assert response.code == (200 if allowed else 403), (token, model, path)
            if not allowed:
                assert json.loads(response.body)["error"]["code"] == "model_not_allowed"
    assert len(fake_openai.received) == 4


@pytest.mark.gen_test
async def test_a_server_key_token_cannot_reach_a_model_choosing_endpoint_through_an_encoded_path(
    proxy, fake_openai, base_url
):
    """Alice (server key, ALLOWED_MODELS) named no model on an encoded path."""
    for path in ("/v1/images/%67enerations", "/v1/re%73ponses", "/v1/chat/%63ompletions"):
        head = "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n" % (
            path,
            ALICE,
        )
        status, answer = await raw_request(base_url, head, b'{"prompt": "a cat", "input": "x"}')
        assert status == 400 and answer["error"]["code"] == "model_undetermined", (path, answer)
    assert fake_openai.received == []


@pytest.mark.settings(rate_limit_per_token=3)
@pytest.mark.gen_test
async def test_rate_limit_per_minute_per_token(proxy, fake_openai):
    async def chat(token):
        response, body = await proxy.chat({"prompt": "x"}, headers=as_(token, OPENAI_KEY))
        return response, body

    for token, allowed in ((ERIN, 2), (ALICE, 3), (ACCESS_TOKEN, 3), (GRACE, 8)):
        for _ in range(allowed):
            response, _ = await chat(token)
            assert response.code == 200, token
        if token == GRACE:
            continue  # rate_limit_per_minute = 0: no limit, whatever RATE_LIMIT_PER_TOKEN says
        response, body = await chat(token)
        assert response.code == 429 and body["error"]["code"] == "proxy_rate_limited", token
        assert int(response.headers["Retry-After"]) >= 1
        if token == ERIN:
            assert int(response.headers["Retry-After"]) >= 25  # 2 per minute: one every 30 s
            assert "2 requests per minute" in body["text"]
        for name in NAMES:
            assert name not in body["text"]
    assert len(fake_openai.received) == 2 + 3 + 3 + 8
    text = await metrics_text(proxy)
    for name in ("erin", "alice", "-"):
        assert 'proxy_limited_total{limit="rate_limit_per_minute",token="%s"} 1.0' % name in text
    assert 'token="grace"' in text and 'limit="rate_limit_per_minute",token="grace"' not in text


@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_counts_requests_and_streams_in_flight(proxy, fake_openai, base_url):
    stream = {"prompt": "x", "generate_params": {"stream": True, "model_name": "gpt-4o-mini"}}
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c ", "d "], delay=0.3))
    chunks = []
    first = asyncio.ensure_future(
        proxy.request(json_body=stream, headers=as_(CAROL, OPENAI_KEY), streaming_callback=chunks.append, check=False)
    )
    deadline = time.monotonic() + 10
    while not chunks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    response, body = await proxy.chat({"prompt": "x"}, headers=as_(CAROL, OPENAI_KEY))
    assert response.code == 429 and body["error"]["code"] == "proxy_concurrency_limited"
    assert response.headers["Retry-After"] == "1" and "max_concurrent" in body["text"]
    for name in NAMES:
        assert name not in body["text"]
    # Another token is not affected.
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(ALICE, OPENAI_KEY))
    assert response.code == 200
    assert (await first).code == 200 and b"data: [DONE]" in b"".join(chunks)
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(CAROL, OPENAI_KEY))
    assert response.code == 200, "the finished stream freed its slot"

    # A client that leaves mid-stream frees its slot too.
    fake_openai.push(Behaviour(chunks=["tok "] * 50, delay=0.2))
    _, reader, writer = await open_raw(base_url, stream, headers={"access-token": CAROL})
    await reader.readuntil(b'"content"')
    writer.close()
    await fake_openai.wait_abort(timeout=5)
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(CAROL, OPENAI_KEY))
    assert response.code == 200
    text = await metrics_text(proxy)
    assert 'proxy_limited_total{limit="max_concurrent",token="carol"} 1.0' in text


@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_slot_freed_by_a_client_that_leaves_before_its_body(proxy, fake_openai, base_url):
    """The token is checked as soon as the headers arrive; a body that never comes must not hold the slot."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /chat_complete HTTP/1.1\r\nHost: x\r\naccess-token: %s\r\nopenai-token: %s\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'
        % (CAROL.encode(), OPENAI_KEY.encode())
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(CAROL, OPENAI_KEY))
    assert response.code == 429, "the half-sent request holds carol's one slot"
    writer.close()
    deadline = time.monotonic() + 5
    while True:
        await asyncio.sleep(0.05)
        response, _ = await proxy.chat({"prompt": "x"}, headers=as_(CAROL, OPENAI_KEY))
        if response.code == 200 or time.monotonic() > deadline:
            break
    assert response.code == 200


@pytest.mark.gen_test
async def test_a_disabled_token_is_refused(proxy, fake_openai, caplog):
    for path in ("/chat_complete", "/v1/chat/completions"):
        response = await proxy.request(
            path,
            json_body={"prompt": "x", "model": "gpt-4o-mini", "messages": []},
            headers=as_(DAVE, OPENAI_KEY),
        )
        assert response.code == 403
        assert json.loads(response.body)["error"]["code"] == "access_token_disabled"
    assert fake_openai.received == []
    assert [field(line, "token") for line in access_lines(caplog)] == ["dave", "dave"]


@pytest.mark.gen_test
async def test_reload_swaps_the_tokens_and_a_broken_file_keeps_them(proxy, fake_openai, app, tokens_file):
    tokens = app.tokens
    for _ in range(2):
        response, _ = await proxy.chat({"prompt": "x"}, headers=as_(ERIN, OPENAI_KEY))
        assert response.code == 200
    tokens_file.write_text(RELOADED_TOML)
    tokens.reload()
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(ERIN, OPENAI_KEY))
    assert response.code == 429, "erin's rate limit carries over the reload"
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(ALICE, OPENAI_KEY))
    assert response.code == 403
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(FRANK), auth=False)
    assert response.code == 200 and fake_openai.received[-1].headers["Authorization"] == "Bearer " + SERVER_KEY
    tokens_file.write_text("[frank\n")
    with pytest.raises(TokensFileError):
        tokens.reload()
    response, _ = await proxy.chat({"prompt": "x"}, headers=as_(FRANK), auth=False)
    assert response.code == 200


@pytest.mark.settings(max_concurrent_upstream=1)
@pytest.mark.gen_test(timeout=30)
async def test_max_concurrent_upstream_refusals_are_counted_per_token(proxy, fake_openai):
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c "], delay=0.3))
    chunks = []
    first = asyncio.ensure_future(
        proxy.request(
            json_body={"prompt": "x", "generate_params": {"stream": True}},
            headers=as_(GRACE, OPENAI_KEY),
            streaming_callback=chunks.append,
            check=False,
        )
    )
    deadline = time.monotonic() + 10
    while not chunks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    response, body = await proxy.chat({"prompt": "x"}, headers=as_(ALICE, OPENAI_KEY))
    assert response.code == 503 and body["error"]["code"] == "proxy_overloaded"
    assert (await first).code == 200
    text = await metrics_text(proxy)
    assert 'proxy_limited_total{limit="max_concurrent_upstream",token="alice"} 1.0' in text


# -- docs/team.md's examples


def test_readme_tokens_file_and_hash_command(tmp_path):
    language, text = snippet("tokens-file")
    assert language == "toml"
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    registry = TokenRegistry(Settings(access_tokens=(), access_tokens_file=str(path), openai_api_key=SERVER_KEY))
    alice = registry.lookup(README_ALICE)
    assert alice.name == "alice" and alice.policy.use_server_key and alice.policy.max_concurrent == 4
    assert alice.policy.rate_limit_per_minute == 60 and alice.policy.allowed_models == ("gpt-4o-mini", "gpt-4o")
    assert registry.lookup("a-long-random-token-of-16-or-more-characters").name == "ci-bot"
    assert [e.policy.disabled for e in registry.entries] == [False, False, True]
    lines = all_documents_text().splitlines()
    command = next(line for line in lines if "| sha256sum | cut" in line).split("#")[0]
    command = command.replace("the-token-you-gave-alice", README_ALICE)
    digest = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout.strip()
    assert bytes.fromhex(digest) == alice.digest


@pytest.mark.gen_test
async def test_readme_sdk_snippet_with_a_named_token_as_the_api_key(proxy, fake_openai, base_url):
    import contextlib
    import io

    import openai

    _, code = snippet("python-sdk-team")
    code = code.replace("http://127.0.0.1:9081", base_url)

    def run(token):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace('"your-token-from-the-operator"', repr(token)), "snippet", "exec"), {})
        return out.getvalue().strip()

    assert await proxy.in_thread(run, ALICE) == "Echo: Привет!"
    assert fake_openai.received[-1].headers["Authorization"] == "Bearer " + SERVER_KEY
    # Without use_server_key, the request has no OpenAI key: the SDK's usual AuthenticationError.
    with pytest.raises(openai.AuthenticationError):
        await proxy.in_thread(run, ERIN)
    # With an access-token header, the bearer is the caller's own OpenAI key, as before.
    client = openai.OpenAI(
        base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0, default_headers={"access-token": ALICE}
    )
    await proxy.in_thread(client.models.list)
    assert fake_openai.received[-1].headers["Authorization"] == "Bearer " + OPENAI_KEY
    assert len(fake_openai.received) == 2


# -- the real process: SIGHUP under load


async def fetch(client, url, token, key=OPENAI_KEY, body=None, **kwargs):
    headers = {"access-token": token, "Content-Type": "application/json"}
    if key:
        headers["openai-token"] = key
    return await client.fetch(
        url + "/chat_complete",
        method="POST",
        body=json.dumps(body or {"prompt": "x"}),
        headers=headers,
        raise_error=False,
        request_timeout=30,
        **kwargs,
    )


async def wait_for_output(server, text, timeout=10):
    deadline = time.monotonic() + timeout
    while text not in server.output():
        assert time.monotonic() < deadline, "%r not in the log:\n%s" % (text, server.output())
        await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=60)
async def test_sighup_reloads_under_load(fake_openai, tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    server = ServerProcess(
        {
            "OPENAI_BASE_URL": fake_openai.url,
            "ACCESS_TOKEN": ACCESS_TOKEN,
            "ACCESS_TOKENS_FILE": str(path),
            "OPENAI_API_KEY": SERVER_KEY,
        },
        str(tmp_path / "server.log"),
    )
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    stop = asyncio.Event()
    load_codes = []

    async def load(token):
        for _ in range(2000):
            if stop.is_set():
                return
            load_codes.append((await fetch(client, server.url, token)).code)

    try:
        await server.wait_ready()
        # Alice's stream (on the server key) is slow, whatever else the fake is asked.
        fake_openai.by_model["slow"] = Behaviour(chunks=["s%d " % i for i in range(10)], delay=0.25)
        chunks = []
        alice_stream = asyncio.ensure_future(
            fetch(
                client,
                server.url,
                ALICE,
                key=None,
                body={"prompt": "x", "generate_params": {"stream": True, "model_name": "slow"}},
                streaming_callback=chunks.append,
            )
        )
        workers = [asyncio.ensure_future(load(t)) for t in (GRACE, ACCESS_TOKEN, GRACE)]
        deadline = time.monotonic() + 10
        while not any(b"s0 " in c for c in chunks):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

        # Revoke alice, add frank, reload while the stream and the load run.
        path.with_suffix(".new").write_text(RELOADED_TOML)
        os.replace(path.with_suffix(".new"), path)
        server.signal(signal.SIGHUP)
        await wait_for_output(server, "SIGHUP: reloaded %s: 6 named tokens" % path)
        assert (await fetch(client, server.url, ALICE)).code == 403
        assert (await fetch(client, server.url, FRANK)).code == 200
        assert not alice_stream.done(), "the stream started before the reload is still running"
        response = await alice_stream
        body = b"".join(chunks)
        assert response.code == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
        assert b'"content":"s9 "' in body

        # A broken file: one error line, the tokens in force stay.
        path.write_text('[frank]\ntoken = "%s"\nmax_concurrent = "lots"\n' % FRANK)
        server.signal(signal.SIGHUP)
        await wait_for_output(server, "tokens file refused")
        assert (await fetch(client, server.url, FRANK)).code == 200
        assert (await fetch(client, server.url, ALICE)).code == 403
        stop.set()
        await asyncio.gather(*workers)
        assert len(load_codes) > 10 and set(load_codes) == {200}, load_codes
        assert server.proc.poll() is None

        metrics = (await client.fetch(server.url + "/metrics")).body.decode()
        assert 'proxy_requests_total{route="chat_complete",status="200",token="frank"} 2.0' in metrics
        assert 'proxy_requests_total{route="chat_complete",status="200",token="alice"} 1.0' in metrics
        assert 'proxy_requests_total{route="chat_complete",status="403",token="-"} 2.0' in metrics
        out = server.output()
        errors = [line for line in out.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "token 'frank': max_concurrent must be an integer" in errors[0], errors
        assert '"openai_api_key": "***"' in out
        assert_no_named_secret(out)
        assert ACCESS_TOKEN not in out and OPENAI_KEY not in out
    finally:
        stop.set()
        client.close()
        server.stop()
