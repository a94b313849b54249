"""A route shared by tenants on the server key (the usual team set-up, docs/deploy.md "Health"): what
one tenant's requests make the upstream do never takes it out for the others, and an upstream that
comes back is used again within one cool-down of its return, whatever its probe's request does.

The proxy runs in-process with two real fakes: ``primary`` (stopped and started again on its port)
and ``fallback`` (tier 1), each with its own key; two named tokens use the server key."""

import asyncio
import json
import time

import pytest

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.upstream import routing
from tests.conftest import proxy_settings
from tests.procs import free_port
from tests.test_circuit_breaker import metric_value

TENANT_A, TENANT_B = "tenant-a-TOKEN-5e1c7a9d3b", "tenant-b-TOKEN-8f2d4b6a0e"
KEY_PRIMARY, KEY_FALLBACK = "sk-primary-own-key-1111", "sk-fallback-own-key-2222"


class Restartable:
    """A fake OpenAI on a fixed port that can be stopped (connections closed, port refused) and started again."""

    def __init__(self):
        self.port = free_port()
        self.fake: FakeOpenAI | None = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/v1" % self.port

    def start(self, scripts: dict | None = None) -> None:
        self.fake = FakeOpenAI()
        self.fake.by_model.update(scripts or {})
        self.fake.start(port=self.port)

    async def stop(self) -> None:
        if self.fake is not None:
            await self.fake.stop()

    def models(self) -> list[str]:
        return [r.json.get("model") for r in self.fake.received]


@pytest.fixture
def primary(io_loop):
    upstream = Restartable()
    upstream.start()
    yield upstream
    io_loop.run_sync(upstream.stop)


@pytest.fixture
def config(request, fake_openai, primary, tmp_path):
    path = tmp_path / "upstreams.toml"
    path.write_text(
        f'[primary]\nbase_url = "{primary.url}"\napi_key = "{KEY_PRIMARY}"\n\n'
        f'[fallback]\nbase_url = "{fake_openai.url}"\napi_key = "{KEY_FALLBACK}"\npriority = 1\n'
    )
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[tenant-a]\ntoken = "{TENANT_A}"\nuse_server_key = true\n\n'
        f'[tenant-b]\ntoken = "{TENANT_B}"\nuse_server_key = true\n'
    )
    return proxy_settings(
        request, fake_openai, upstreams_file=str(path), access_tokens_file=str(tokens), request_timeout=30.0
    )


async def ask(proxy, token: str, model: str, **kwargs):
    return await proxy.request(
        json_body={"prompt": "hi", "generate_params": {"model_name": model}},
        headers={"access-token": token},
        auth=False,
        check=False,
        **kwargs,
    )


def fallback_models(fake_openai) -> list[str]:
    return [r.json.get("model") for r in fake_openai.received]


@pytest.mark.gen_test(timeout=60)
async def test_one_tenant_on_the_server_key_never_takes_a_shared_route_out(proxy, primary, fake_openai, app):
    fake = primary.fake
    fake.by_model["a-fails"] = Behaviour(kind="error", status=500, message="the model crashed")
    fake.by_model["a-busy"] = Behaviour(kind="error", status=503, message="overloaded")
    fake.by_model["a-limited"] = Behaviour(
        kind="error", status=429, message="rate limited", error_type="rate_limit_error", headers={"Retry-After": "300"}
    )
    health = app.router.health_of(app.router.upstreams[0])
    # Tenant a alone: error answers in parallel and in a row, each moved to the fallback.
    for _ in range(4):
        answers = await asyncio.gather(*(ask(proxy, TENANT_A, "a-fails" if i % 2 else "a-busy") for i in range(6)))
        assert [r.code for r in answers] == [200] * 6
    assert health.state == "up" and health.failures == 24
    # Counted as the route's failures all the same, for an operator to see.
    text = (await proxy.request("/metrics", method="GET", auth=False)).body.decode()
    for kind in ("status_500", "status_503"):
        assert metric_value(text, "proxy_upstream_failures_total", upstream="primary", kind=kind) == 12
    for _ in range(5):
        assert (await ask(proxy, TENANT_B, "gpt-4o-mini")).code == 200
    assert primary.models().count("gpt-4o-mini") == 5 and "gpt-4o-mini" not in fallback_models(fake_openai)
    # One 429 with Retry-After: 300 for one model sets that model aside on the primary, and nothing else.
    assert (await ask(proxy, TENANT_A, "a-limited")).code == 200
    assert (await ask(proxy, TENANT_A, "a-limited")).code == 200
    assert primary.models().count("a-limited") == 1 and fallback_models(fake_openai).count("a-limited") == 2
    assert health.state == "up"
    for _ in range(3):
        assert (await ask(proxy, TENANT_B, "gpt-4o-mini")).code == 200
    assert primary.models().count("gpt-4o-mini") == 8 and "gpt-4o-mini" not in fallback_models(fake_openai)
    # Both tenants answered 5xx in a row: that is the route's, and it opens.
    fake.by_model["gpt-4o"] = Behaviour(kind="error", status=500, message="everything fails")
    for token in (TENANT_A, TENANT_A, TENANT_B):
        assert (await ask(proxy, token, "gpt-4o")).code == 200
    assert health.state == "down"


@pytest.mark.gen_test(timeout=90)
async def test_a_returned_upstream_is_used_again_within_one_cool_down_whatever_its_probe_request_does(
    proxy, primary, fake_openai, app, caplog
):
    # Tenant a's requests make the primary think for 20 s before its headers.
    glacial = {"glacial": Behaviour(first_delay=20)}
    primary.fake.by_model.update(glacial)
    health = app.router.health_of(app.router.upstreams[0])
    stop = asyncio.Event()

    async def slow_tenant():
        while not stop.is_set():
            await ask(proxy, TENANT_A, "glacial", request_timeout=40)
            await asyncio.sleep(0.05)

    slow = [asyncio.ensure_future(slow_tenant()) for _ in range(2)]
    try:
        await asyncio.sleep(1.0)
        assert primary.models().count("glacial") == 2
        await primary.stop()
        deadline = time.monotonic() + 10
        while health.state != "down":
            assert time.monotonic() < deadline, "the primary was never marked down"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        primary.start(glacial)
        returned = time.monotonic()
        # Tenant a, always sending, is the first to try it: its probe will not be answered for 20 s.
        while "glacial" not in primary.models():
            assert time.monotonic() - returned < routing.COOL_DOWN + 2.5, "never probed"
            await asyncio.sleep(0.02)
        # Tenant b is served by the primary again within one cool-down (5 s) of its return;
        # the margin is for a loaded machine.
        while "gpt-4o-mini" not in primary.models():
            assert time.monotonic() - returned < routing.COOL_DOWN + 2.5, "not used again in time"
            assert (await ask(proxy, TENANT_B, "gpt-4o-mini")).code == 200
            await asyncio.sleep(0.1)
        reused = time.monotonic() - returned
        print("used again %.2f s after its return, its probe still waiting for its answer" % reused)
        assert health.state == "up"
        assert len([r for r in caplog.records if "upstream 'primary' is back" in r.getMessage()]) == 1
    finally:
        stop.set()
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


@pytest.mark.gen_test(timeout=30)
async def test_healthz_shows_the_upstreams_states_with_a_file(proxy, app):
    body = json.loads((await proxy.request("/healthz", method="GET", auth=False)).body)
    assert [(u["name"], u["state"]) for u in body["upstreams"]] == [("primary", "up"), ("fallback", "up")]
