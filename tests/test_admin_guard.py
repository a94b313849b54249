"""The admin routes and /usage leak nothing: no cache keeps any of their answers (errors included), and
wrong admin tokens are limited per client address and counted, while the right one never is."""

import ipaddress
import json

import pytest

from chat_gpt_proxy.access.attempts import MAX_FAILURES, WINDOW, FailedAttempts, address_key
from tests.conftest import ACCESS_TOKEN, proxy_settings
from tests.test_circuit_breaker import metric_value

ADMIN = "admin-TOKEN-9b3d5f7a1c2e"
NAMED = "named-TOKEN-6e8a0c2d4f"
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.fixture
def config(request, fake_openai, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[named]\ntoken = "%s"\nbudget_tokens = 1000\n' % NAMED)
    return proxy_settings(
        request,
        fake_openai,
        admin_token=ADMIN,
        usage_database=str(tmp_path / "usage.sqlite3"),
        access_tokens_file=str(tokens),
        access_tokens=(ACCESS_TOKEN,),
    )


async def get(proxy, path, method="GET", **headers):
    return await proxy.request(path, method=method, headers=headers, auth=False, check=False)


@pytest.mark.gen_test(timeout=30)
async def test_no_admin_or_usage_answer_is_stored_by_a_cache(proxy):
    answers = {
        "admin page": await get(proxy, "/admin"),
        "admin usage": await get(proxy, "/admin/usage", **{"admin-token": ADMIN}),
        "admin csv": await get(proxy, "/admin/usage?format=csv", **{"admin-token": ADMIN}),
        "admin bad date": await get(proxy, "/admin/usage?from=2026-13-01", **{"admin-token": ADMIN}),
        "admin wrong token": await get(proxy, "/admin/usage", **{"admin-token": "wrong"}),
        "admin no token": await get(proxy, "/admin/usage"),
        "admin POST": await get(proxy, "/admin/usage", method="POST", **{"admin-token": ADMIN}),
        "admin HEAD": await get(proxy, "/admin", method="HEAD"),
        "usage page": await get(proxy, "/usage"),
        "usage JSON": await get(proxy, "/usage", **{"access-token": NAMED}),
        "usage wrong token": await get(proxy, "/usage", **{"access-token": "wrong-token-123"}),
        "usage HEAD": await get(proxy, "/usage", method="HEAD"),
    }
    statuses = {name: r.code for name, r in answers.items()}
    assert statuses == {
        "admin page": 200,
        "admin usage": 200,
        "admin csv": 200,
        "admin bad date": 400,
        "admin wrong token": 403,
        "admin no token": 403,
        "admin POST": 405,
        "admin HEAD": 200,
        "usage page": 200,
        "usage JSON": 200,
        "usage wrong token": 403,
        "usage HEAD": 200,
    }
    stored = {
        name: r.headers.get("Cache-Control")
        for name, r in answers.items()
        if r.headers.get("Cache-Control") != "no-store"
    }
    assert not stored


@pytest.mark.settings(admin_token="")
@pytest.mark.gen_test(timeout=30)
async def test_not_even_the_404_of_absent_admin_routes_is_stored(proxy):
    response = await get(proxy, "/admin/usage", **{"admin-token": ADMIN})
    assert response.code == 404 and response.headers["Cache-Control"] == "no-store"


async def metrics_text(proxy) -> str:
    return (await proxy.request("/metrics", method="GET", auth=False)).body.decode()


@pytest.mark.settings(trusted_proxies=TRUSTED)
@pytest.mark.gen_test(timeout=30)
async def test_wrong_admin_tokens_are_limited_per_address_and_counted_the_right_one_never(proxy):
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    admin = {"X-Forwarded-For": "198.51.100.20"}
    # The admin's page polls: successes are never counted, however many.
    for _ in range(3 * MAX_FAILURES):
        assert (await get(proxy, "/admin/usage", **admin, **{"admin-token": ADMIN})).code == 200
    for i in range(MAX_FAILURES):
        response = await get(proxy, "/admin/usage", **guesser, **{"admin-token": "guess-%d" % i})
        assert response.code == 403, i
    # Limited: each further wrong token is a 429.
    for token in ("guess-next", "guess-after"):
        response = await get(proxy, "/admin/usage", **guesser, **{"admin-token": token})
        assert response.code == 429 and 1 <= int(response.headers["Retry-After"]) <= WINDOW
        error = json.loads(response.body)["error"]
        assert error["code"] == "admin_token_attempts" and response.headers["Cache-Control"] == "no-store"
    # The right token always passes, from that address too: nobody can lock the admin out.
    assert (await get(proxy, "/admin/usage", **guesser, **{"admin-token": ADMIN})).code == 200
    # Another address, and the admin's, are not affected.
    assert (await get(proxy, "/admin/usage", **admin, **{"admin-token": ADMIN})).code == 200
    other = {"X-Forwarded-For": "192.0.2.99"}
    assert (await get(proxy, "/admin/usage", **other, **{"admin-token": "one-wrong"})).code == 403
    text = await metrics_text(proxy)
    assert metric_value(text, "proxy_admin_token_failures_total", answer="wrong") == MAX_FAILURES + 1
    assert metric_value(text, "proxy_admin_token_failures_total", answer="limited") == 2
    # The usage API with an access token is another matter: never limited by admin guesses.
    response = await get(proxy, "/usage", **guesser, **{"access-token": NAMED})
    assert response.code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_forwarded_address_from_an_untrusted_peer_does_not_escape_the_limit_nor_lock_the_admin_out(proxy):
    # Without TRUSTED_PROXIES every client behind a proxy is its address: one client for the limit.
    for i in range(MAX_FAILURES):
        headers = {"X-Forwarded-For": "203.0.113.%d" % i, "admin-token": "guess-%d" % i}
        assert (await get(proxy, "/admin/usage", **headers)).code == 403
    headers = {"X-Forwarded-For": "203.0.113.200", "admin-token": "guess-more"}
    assert (await get(proxy, "/admin/usage", **headers)).code == 429
    # The admin behind the same proxy is not locked out.
    headers = {"X-Forwarded-For": "198.51.100.20", "admin-token": ADMIN}
    assert (await get(proxy, "/admin/usage", **headers)).code == 200


@pytest.mark.settings(trusted_proxies=TRUSTED)
@pytest.mark.gen_test(timeout=30)
async def test_an_ipv6_client_is_limited_by_its_64_whatever_address_it_takes_in_it(proxy):
    for i in range(MAX_FAILURES):
        headers = {"X-Forwarded-For": "2001:db8:1:2::%x" % (i + 1), "admin-token": "guess-%d" % i}
        assert (await get(proxy, "/admin/usage", **headers)).code == 403
    headers = {"X-Forwarded-For": "2001:db8:1:2:ffff:1:2:3", "admin-token": "guess-more"}
    assert (await get(proxy, "/admin/usage", **headers)).code == 429
    headers = {"X-Forwarded-For": "2001:db8:1:3::1", "admin-token": "another-net"}
    assert (await get(proxy, "/admin/usage", **headers)).code == 403


def test_clients_are_counted_by_ipv4_address_and_ipv6_64():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("-") == "-"


@pytest.mark.gen_test(timeout=30)
async def test_no_answer_under_admin_or_usage_is_stored_even_for_a_path_that_does_not_exist(proxy):
    for method, path in (
        ("GET", "/admin/"),
        ("GET", "/admin/x"),
        ("GET", "/admin/usage/x"),
        ("POST", "/admin/nothing"),
        ("PROPFIND", "/admin/x"),
        ("PROPFIND", "/admin/usage"),
        ("GET", "/usage/"),
        ("GET", "/usage/x"),
        ("PROPFIND", "/usage"),
    ):
        response = await get(proxy, path, method=method, **{"admin-token": ADMIN})
        assert response.code in (404, 405), (method, path, response.code)
        assert response.headers.get("Cache-Control") == "no-store", (method, path, response.code)


def test_failures_leave_the_window_and_the_table_is_bounded():
    assert (MAX_FAILURES, WINDOW) == (10, 300.0)  # as docs/team.md says
    attempts = FailedAttempts(max_failures=3, window=10.0, max_addresses=100)
    for t in (0.0, 1.0, 2.0):
        assert attempts.retry_after("a", t) == 0
        attempts.failed("a", t)
    assert attempts.retry_after("a", 2.5) == 8  # until the failure at 0 leaves the window
    assert attempts.retry_after("a", 10.0) == 0  # it has
    for i in range(1000):
        attempts.failed("addr-%d" % i, 20.0)
    assert len(attempts.failures) == 100
