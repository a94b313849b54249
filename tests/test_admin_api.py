"""The JSON admin API (/admin/api/): tokens made, changed, rotated, revoked and deleted at run time,
the audit of each action, and the rules it shares with the tokens file.

In process, against the fake upstream, with the real SQLite ledger (and the console's tables) in a
temporary folder; the token values the API hands out are used on /chat_complete right away.
"""

from __future__ import annotations

import asyncio
import datetime
import glob
import json
import os
import sqlite3
import subprocess

import pytest

from chat_gpt_proxy.console.runtime import TOKEN_PREFIX
from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import proxy_settings
from tests.test_readme import localize, snippet

ADMIN = "admin-API-token-6c1e9a2f7b"
LEAD = "lead-ADMIN-token-3e8b1d7c52"  # admin = true in the tokens file
FILE_USER = "filed-USER-token-94a2c7e1d3"
KEY = "sk-test-admin-api-5b7c"
OTHER_SECRETS = (ADMIN, LEAD, FILE_USER)
TOKENS_TOML = f"""
[lead]
token = "{LEAD}"
admin = true

[filed]
token = "{FILE_USER}"
"""


@pytest.fixture
def config(request, fake_openai, tmp_path):
    (tmp_path / "tokens.toml").write_text(TOKENS_TOML)
    return proxy_settings(
        request,
        fake_openai,
        access_tokens_file=str(tmp_path / "tokens.toml"),
        usage_database=str(tmp_path / "usage.sqlite3"),
        admin_token=ADMIN,
        openai_api_key="sk-SERVERKEY-7e1d4c9a2b",
    )


async def api(proxy, method: str, path: str, body=None, admin: str = ADMIN, headers=None, raw=None):
    """One admin API call; (status, parsed JSON body, response)."""
    all_headers = {"admin-token": admin} if admin else {}
    all_headers.update(headers or {})
    response = await proxy.request(
        "/admin/api" + path,
        method=method,
        json_body=body,
        body=raw if raw is not None else (b"" if method in ("POST", "PATCH") and body is None else None),
        headers=all_headers,
        auth=False,
    )
    assert response.headers["Cache-Control"] == "no-store", response.headers
    parsed = (
        json.loads(response.body) if response.headers.get("Content-Type", "").startswith("application/json") else None
    )
    return response.code, parsed, response


async def chat(proxy, token: str, check_status: int | None = None):
    response = await proxy.request(
        json_body={"prompt": "hi"}, headers={"access-token": token, "openai-token": KEY}, auth=False
    )
    if check_status is not None:
        assert response.code == check_status, response.body
    return response


def no_value_in(obj, *values: str) -> None:
    text = json.dumps(obj)
    for value in values:
        assert value not in text


@pytest.mark.gen_test(timeout=30)
async def test_create_use_list_rotate_disable_delete(proxy, app, config):
    status, made, response = await api(
        proxy, "POST", "/tokens", {"name": "alice", "budget_usd": 5, "allowed_models": ["gpt-4o-mini"]}
    )
    assert status == 201, made
    value = made["token"]
    assert value.startswith(TOKEN_PREFIX) and len(value) >= 40
    assert response.headers["Location"] == "/admin/api/tokens/alice"
    assert made["source"] == "page" and made["status"] == "active" and made["budget_usd"] == 5
    assert made["allowed_models"] == ["gpt-4o-mini"] and made["created_by"] == "ADMIN_TOKEN"
    await chat(proxy, value, 200)

    status, listed, _ = await api(proxy, "GET", "/tokens")
    assert status == 200 and listed["runtime_tokens"] is True
    names = {t["name"]: t for t in listed["tokens"]}
    assert set(names) == {"alice", "filed", "lead"}
    assert names["alice"]["source"] == "page" and names["filed"]["source"] == "file" and names["lead"]["admin"]
    assert names["alice"]["last_active"] is not None and names["alice"]["spend"]["spent_usd"] > 0
    assert names["alice"]["spend"]["remaining_usd"] < 5
    no_value_in(listed, value, FILE_USER, LEAD)
    assert "token" not in names["alice"] and "token_sha256" not in json.dumps(listed)

    status, rotated, _ = await api(proxy, "POST", "/tokens/alice/rotate")
    assert status == 200 and rotated["token"] != value
    await chat(proxy, value, 403)
    await chat(proxy, rotated["token"], 200)

    status, changed, _ = await api(proxy, "PATCH", "/tokens/alice", {"disabled": True})
    assert status == 200 and changed["status"] == "disabled" and "token" not in changed
    response = await chat(proxy, rotated["token"], 403)
    assert json.loads(response.body)["error"]["code"] == "access_token_disabled"
    status, changed, _ = await api(proxy, "PATCH", "/tokens/alice", {"disabled": False, "budget_usd": None})
    assert status == 200 and changed["status"] == "active" and changed["budget_usd"] is None
    assert changed["fields"] == {"allowed_models": ["gpt-4o-mini"], "disabled": False}
    await chat(proxy, rotated["token"], 200)

    status, deleted, _ = await api(proxy, "DELETE", "/tokens/alice")
    assert status == 200 and deleted == {"deleted": "alice"}
    await chat(proxy, rotated["token"], 403)
    status, _, _ = await api(proxy, "GET", "/tokens/alice")
    assert status == 404
    status, again, _ = await api(proxy, "DELETE", "/tokens/alice")
    assert status == 404 and again["error"]["code"] == "not_found"
    # Its spend stays in the ledger; the requests tab shows its refusal while it was disabled.
    status, found, _ = await api(proxy, "GET", "/requests?name=alice")
    assert status == 200 and not found["more"]
    assert [(r["status"], r["refusal"], r["usd"] > 0) for r in found["requests"]] == [
        (200, None, True),
        (403, "access_token_disabled", False),
        (200, None, True),
        (200, None, True),
    ]
    with sqlite3.connect(config.usage_database) as db:
        assert db.execute("SELECT COUNT(*) FROM usage WHERE token = 'alice'").fetchone()[0] == 3


@pytest.mark.gen_test(timeout=30)
async def test_the_audit_names_who_did_what_without_a_token_value(proxy, app, config):
    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "bob", "rate_limit_per_minute": 10})
    _, rotated, _ = await api(proxy, "POST", "/tokens/bob/rotate", admin=LEAD)
    await api(proxy, "PATCH", "/tokens/bob", {"disabled": True}, admin=LEAD)
    await api(proxy, "PATCH", "/tokens/bob", {"budget_tokens": 1000})
    await api(proxy, "DELETE", "/tokens/bob")
    status, audit, _ = await api(proxy, "GET", "/audit")
    assert status == 200
    rows = audit["audit"]
    assert [(r["action"], r["actor"], r["name"]) for r in rows] == [
        ("delete", "ADMIN_TOKEN", "bob"),
        ("update", "ADMIN_TOKEN", "bob"),
        ("disable", "lead", "bob"),
        ("rotate", "lead", "bob"),
        ("create", "ADMIN_TOKEN", "bob"),
    ]
    assert rows[-1]["before"] is None and rows[-1]["after"] == {"rate_limit_per_minute": 10}
    assert rows[2]["before"] == {"rate_limit_per_minute": 10}
    assert rows[2]["after"] == {"rate_limit_per_minute": 10, "disabled": True}
    assert rows[0]["after"] is None and rows[0]["at"].endswith("Z") and all(r["request_id"] for r in rows)
    no_value_in(audit, made["token"], rotated["token"])
    status, page, _ = await api(proxy, "GET", "/audit?limit=2&before=%d" % rows[1]["id"])
    assert [r["action"] for r in page["audit"]] == ["disable", "rotate"]
    # Append-only: the database itself refuses to change or remove an audit row.
    with sqlite3.connect(config.usage_database) as db:
        for statement in ("UPDATE admin_audit SET actor = 'x'", "DELETE FROM admin_audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)


@pytest.mark.gen_test(timeout=30)
async def test_the_database_holds_no_token_value_nor_prompt(proxy, app, config):
    values = []
    for name in ("carol", "dave"):
        _, made, _ = await api(proxy, "POST", "/tokens", {"name": name})
        values.append(made["token"])
        _, rotated, _ = await api(proxy, "POST", "/tokens/%s/rotate" % name)
        values.append(rotated["token"])
        await chat(proxy, rotated["token"], 200)
        # A prompt and its answer (the fake echoes it) are never stored either.
        response = await proxy.request(
            json_body={"prompt": "a-PROMPT-nobody-may-store-7c1e"},
            headers={"access-token": rotated["token"], "openai-token": KEY},
            auth=False,
        )
        assert response.code == 200 and b"a-PROMPT-nobody-may-store-7c1e" in response.body
    await app.spend.ledger.flush()
    await app.console.flush_refusals()
    files = glob.glob(config.usage_database + "*")
    assert len(files) >= 2, files  # the database and its WAL
    data = b"".join(open(f, "rb").read() for f in files)  # noqa: SIM115
    assert b"carol" in data and b"dave" in data, "the scan reads the rows"
    assert b"a-PROMPT-nobody-may-store" not in data
    for value in values:
        assert value.encode() not in data
        # Nor a fragment long enough to help a guess.
        assert value[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + 12].encode() not in data


BAD_FIELDS = [
    ({"name": "bad name"}, "name"),
    ({"name": "zed\n"}, "name"),
    ({"name": "x", "expires": "9999-12-31T23:59:59-14:00"}, "expires"),
    ({"name": "x", "expires": "0001-01-01T00:00:00+14:00"}, "expires"),
    ({"budget_usd": 5}, "name"),
    ({"name": "x", "budget_usd": -1}, "budget_usd"),
    ({"name": "x", "budget_usd": "5"}, "budget_usd"),
    ({"name": "x", "budget_tokens": 1.5}, "budget_tokens"),
    ({"name": "x", "budget_usd": 1, "budget_period": "year"}, "budget_period"),
    ({"name": "x", "budget_period": "day"}, "budget_period"),
    ({"name": "x", "rate_limit_per_minute": -1}, "rate_limit_per_minute"),
    ({"name": "x", "max_concurrent": True}, "max_concurrent"),
    ({"name": "x", "allowed_models": []}, "allowed_models"),
    ({"name": "x", "allowed_models": "gpt-4o"}, "allowed_models"),
    ({"name": "x", "use_server_key": "yes"}, "use_server_key"),
    ({"name": "x", "cache": 1}, "cache"),
    ({"name": "x", "cache_ttl": 10**9}, "cache_ttl"),
    ({"name": "x", "expires": "tomorrow"}, "expires"),
    ({"name": "x", "disabled": "no"}, "disabled"),
    ({"name": "x", "upstreams": [1]}, "upstreams"),
    ({"name": "x", "colour": "red"}, "colour"),
    ({"name": "x", "token": "a-token-of-my-own-choice"}, "token"),
    ({"name": "x", "token_sha256": "00" * 32}, "token_sha256"),
    ({"name": "x", "admin": True}, "admin"),
]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(("body", "field"), BAD_FIELDS)
async def test_bad_input_is_400_naming_the_field(proxy, app, body, field):
    status, answer, _ = await api(proxy, "POST", "/tokens", body)
    assert status == 400, answer
    assert answer["error"]["param"] == field and field in answer["error"]["message"]
    if body.get("name") == "x":
        # The same field, changed on an existing token, is refused the same way.
        await api(proxy, "POST", "/tokens", {"name": "existing"})
        patch = {k: v for k, v in body.items() if k != "name"}
        status, patched, _ = await api(proxy, "PATCH", "/tokens/existing", patch)
        assert status == 400 and patched["error"]["param"] == field, patched
    status, listed, _ = await api(proxy, "GET", "/tokens")
    assert status == 200
    assert not {"x", "zed", "zed\n"} & {t["name"] for t in listed["tokens"]}
    # Nothing was committed for the refused input: no row, no audit entry.
    status, audit, _ = await api(proxy, "GET", "/audit")
    assert status == 200 and not [a for a in audit["audit"] if a["name"] != "existing"], audit


@pytest.mark.gen_test(timeout=30)
async def test_the_file_and_the_api_word_errors_alike(proxy, app, tmp_path):
    from chat_gpt_proxy.access.tokens import TokensFileError, parse_tokens_file

    (tmp_path / "bad.toml").write_text('[x]\ntoken = "%s"\nbudget_usd = -1\n' % ("t" * 20))
    with pytest.raises(TokensFileError) as file_error:
        parse_tokens_file(str(tmp_path / "bad.toml"), app.config)
    _, answer, _ = await api(proxy, "POST", "/tokens", {"name": "x", "budget_usd": -1})
    assert str(file_error.value).endswith(answer["error"]["message"])


@pytest.mark.gen_test(timeout=30)
async def test_malformed_bodies_and_queries(proxy, app):
    for raw in (b"{", b"[1]", b'"x"'):
        status, answer, _ = await api(proxy, "POST", "/tokens", raw=raw, headers={"Content-Type": "application/json"})
        assert status == 400 and answer["error"]["code"] == "invalid_json", raw
    await api(proxy, "POST", "/tokens", {"name": "erin"})
    status, answer, _ = await api(proxy, "PATCH", "/tokens/erin", {})
    assert status == 400 and "Nothing to change" in answer["error"]["message"]
    status, answer, _ = await api(proxy, "PATCH", "/tokens/erin", {"name": "frank"})
    assert status == 400 and answer["error"]["param"] == "name"
    status, answer, _ = await api(proxy, "PATCH", "/tokens/nobody", {"disabled": True})
    assert status == 404
    status, answer, _ = await api(proxy, "POST", "/tokens/nobody/rotate")
    assert status == 404
    sup2 = "%C2%B2"  # "²": str.isdigit() takes it, int() does not
    for query, param in (
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("before=x", "before"),
        ("limit=" + sup2, "limit"),
        ("before=" + sup2, "before"),
    ):
        status, answer, _ = await api(proxy, "GET", "/audit?" + query)
        assert status == 400 and answer["error"]["param"] == param, query
    for query, param in (
        ("status=6xx", "status"),
        ("status=" + sup2 * 3, "status"),
        ("limit=" + sup2, "limit"),
        ("offset=" + sup2, "offset"),
        ("from=yesterday", "from"),
        ("format=xml", "format"),
    ):
        status, answer, _ = await api(proxy, "GET", "/requests?" + query)
        assert status == 400 and answer["error"]["param"] == param, query
    status, answer, _ = await api(proxy, "PUT", "/tokens/erin", {"disabled": True})
    assert status == 405


@pytest.mark.gen_test(timeout=30)
async def test_names_taken_and_file_names_are_refused(proxy, app):
    assert (await api(proxy, "POST", "/tokens", {"name": "gina"}))[0] == 201
    status, answer, _ = await api(proxy, "POST", "/tokens", {"name": "gina"})
    assert status == 409 and answer["error"]["code"] == "name_taken"
    for method, path, body in (
        ("POST", "/tokens", {"name": "filed"}),
        ("PATCH", "/tokens/filed", {"disabled": True}),
        ("POST", "/tokens/filed/rotate", None),
        ("DELETE", "/tokens/filed", None),
    ):
        status, answer, _ = await api(proxy, method, path, body)
        assert status == 409, (method, path)
        assert answer["error"]["code"] == "defined_in_file" and "ACCESS_TOKENS_FILE" in answer["error"]["message"]
    await chat(proxy, FILE_USER, 200)


@pytest.mark.gen_test(timeout=30)
async def test_a_file_name_hiding_a_page_token_is_warned_about_once(proxy, app, config, caplog):
    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "zoe"})
    await chat(proxy, made["token"], 200)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "not in force" in r.getMessage()]

    with open(config.access_tokens_file, "a") as file:
        file.write('\n[zoe]\ntoken = "zoe-FILE-token-5d1c8e2a70"\n')
    app.tokens.reload()
    assert len(warnings()) == 1 and "'zoe'" in warnings()[0] and "same name" in warnings()[0]
    await chat(proxy, made["token"], 403)
    # A change on the page (another reload of the page's tokens) does not say it again.
    await api(proxy, "POST", "/tokens", {"name": "yan"})
    assert len(warnings()) == 1
    no_value_in(warnings(), made["token"], "zoe-FILE-token-5d1c8e2a70")


@pytest.mark.gen_test(timeout=30)
async def test_only_the_admin_header_is_a_credential(proxy, app):
    for headers in ({}, {"Cookie": "admin-token=%s" % ADMIN}, {"admin-token": FILE_USER}, {"admin-token": "x" * 20}):
        status, answer, _ = await api(proxy, "GET", "/tokens", admin="", headers=headers)
        assert status == 403 and answer["error"]["code"] == "invalid_admin_token", headers
    status, _, _ = await api(proxy, "GET", "/tokens", admin=LEAD)
    assert status == 200
    # A token made on the page is never an admin, whatever it is given.
    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "hank"})
    status, _, _ = await api(proxy, "GET", "/tokens", admin=made["token"])
    assert status == 403


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_token_is_refused(proxy, app):
    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "ivy", "expires": "2020-01-01"})
    assert made["status"] == "expired" and made["expires"] == "2020-01-01T00:00:00Z"
    response = await chat(proxy, made["token"], 403)
    assert json.loads(response.body)["error"]["code"] == "access_token_expired"
    _, changed, _ = await api(proxy, "PATCH", "/tokens/ivy", {"expires": "2999-12-31T23:00:00+01:00"})
    assert changed["status"] == "active" and changed["expires"] == "2999-12-31T22:00:00Z"
    await chat(proxy, made["token"], 200)


@pytest.mark.gen_test(timeout=30)
async def test_usage_refuses_a_disabled_or_expired_token_as_every_route_does(proxy, app):
    async def usage(token: str):
        response = await proxy.request("/usage", method="GET", auth=False, headers={"access-token": token})
        return response.code, json.loads(response.body)

    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "uma", "budget_usd": 5})
    status, body = await usage(made["token"])
    assert status == 200 and body["token"] == "uma"
    await api(proxy, "PATCH", "/tokens/uma", {"disabled": True})
    for answer in (await usage(made["token"]), (await chat(proxy, made["token"], 403)).body):
        status, body = answer if isinstance(answer, tuple) else (403, json.loads(answer))
        assert status == 403 and body["error"]["code"] == "access_token_disabled", body
        assert "spent" not in body
    await api(proxy, "PATCH", "/tokens/uma", {"disabled": False, "expires": "2020-01-01"})
    status, body = await usage(made["token"])
    assert status == 403 and body["error"]["code"] == "access_token_expired" and "spent" not in body


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_open_when_its_token_is_revoked_runs_to_its_end(proxy, app, fake_openai):
    """team.md: revoking refuses what starts after it; what is already open runs to its end."""
    _, made, _ = await api(proxy, "POST", "/tokens", {"name": "ned"})
    fake_openai.push(Behaviour(chunks=["one ", "two ", "three ", "four"], delay=0.3))
    chunks: list[bytes] = []
    stream = asyncio.ensure_future(
        proxy.request(
            json_body={"prompt": "hi", "generate_params": {"stream": True}},
            headers={"access-token": made["token"], "openai-token": KEY},
            auth=False,
            streaming_callback=chunks.append,
        )
    )
    for _ in range(200):  # bounded: 10 s
        if b"one " in b"".join(chunks):
            break
        await asyncio.sleep(0.05)
    assert b"one " in b"".join(chunks), chunks
    status, changed, _ = await api(proxy, "PATCH", "/tokens/ned", {"disabled": True})
    assert status == 200 and changed["status"] == "disabled"
    await chat(proxy, made["token"], 403)
    response = await stream
    body = b"".join(chunks)
    assert response.code == 200 and all(word in body for word in (b"one ", b"two ", b"three ", b"four"))
    assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(openai_api_key="")
async def test_use_server_key_needs_a_key_on_the_proxy(proxy, app):
    """team.md's curl example: use_server_key needs OPENAI_API_KEY (or an upstream's key)."""
    status, answer, _ = await api(proxy, "POST", "/tokens", {"name": "dana", "use_server_key": True})
    assert status == 400 and answer["error"]["param"] == "use_server_key"
    assert "OPENAI_API_KEY" in answer["error"]["message"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(workers=2)
async def test_several_workers_without_redis_refuse_limits(proxy, app):
    status, answer, _ = await api(proxy, "POST", "/tokens", {"name": "jay", "max_concurrent": 2})
    assert status == 409 and "REDIS_URL" in answer["error"]["message"]
    assert (await api(proxy, "POST", "/tokens", {"name": "jay"}))[0] == 201
    status, answer, _ = await api(proxy, "PATCH", "/tokens/jay", {"budget_usd": 3})
    assert status == 409 and "REDIS_URL" in answer["error"]["message"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(usage_database="")
async def test_without_a_database_the_api_says_what_to_set(proxy, app):
    status, listed, _ = await api(proxy, "GET", "/tokens")
    assert status == 200 and listed["runtime_tokens"] is False
    assert {t["name"] for t in listed["tokens"]} == {"filed", "lead"}
    for method, path, body in (
        ("POST", "/tokens", {"name": "kim"}),
        ("PATCH", "/tokens/kim", {"disabled": True}),
        ("POST", "/tokens/kim/rotate", None),
        ("DELETE", "/tokens/kim", None),
        ("GET", "/audit", None),
        ("GET", "/requests", None),
    ):
        status, answer, _ = await api(proxy, method, path, body)
        assert status == 409, (method, path)
        assert "USAGE_DATABASE" in answer["error"]["message"] and answer["error"]["code"] == "usage_database_unset"


@pytest.mark.gen_test(timeout=60)
async def test_the_curl_examples_of_team_md(proxy, app, base_url):
    language, code = snippet("admin-api-curl")
    assert language == "bash"
    result = await proxy.in_thread(
        subprocess.run,
        ["bash", "-ec", localize(code, base_url)],
        env=dict(os.environ, ADMIN_TOKEN=ADMIN),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # One answer a line.
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    made, raised, disabled, rotated, enabled, requests, audit, deleted = answers
    assert made["name"] == "dana" and made["token"].startswith(TOKEN_PREFIX) and made["budget_usd"] == 20
    assert made["use_server_key"] is True and raised["budget_usd"] == 30 and disabled["status"] == "disabled"
    assert rotated["token"] != made["token"] and rotated["status"] == "disabled"
    assert enabled["status"] == "active" and requests["requests"] == []
    assert [a["action"] for a in audit["audit"]] == ["enable", "rotate", "disable", "update", "create"]
    assert deleted == {"deleted": "dana"}


@pytest.mark.gen_test(timeout=30)
@pytest.mark.settings(admin_token="")
async def test_named_admins_alone_open_the_admin_routes(proxy, app):
    """Without ADMIN_TOKEN, the tokens file's admin opens the routes; an empty or missing header does
    not pass for the unset ADMIN_TOKEN."""
    status, _, _ = await api(proxy, "GET", "/tokens", admin=LEAD)
    assert status == 200
    for headers in ({}, {"admin-token": ""}):
        status, answer, _ = await api(proxy, "GET", "/tokens", admin="", headers=headers)
        assert status == 403 and answer["error"]["code"] == "invalid_admin_token", headers
    status, made, _ = await api(proxy, "POST", "/tokens", {"name": "lena"}, admin=LEAD)
    assert status == 201 and made["created_by"] == "lead"
    response = await proxy.request("/admin", method="GET", auth=False)
    assert response.code == 200 and response.headers["Cache-Control"] == "no-store"


def test_the_tokens_file_takes_expires_and_admin(tmp_path):
    from chat_gpt_proxy.access.tokens import TokensFileError, parse_tokens_file
    from settings import Settings

    path = tmp_path / "tokens.toml"
    path.write_text(
        '[a]\ntoken = "%s"\nexpires = 2027-01-31\nadmin = true\n'
        '[b]\ntoken = "%s"\nexpires = 2027-01-31T18:00:00+03:00\n'
        '[c]\ntoken = "%s"\nexpires = 2027-01-31T18:00:00\n' % ("a" * 20, "b" * 20, "c" * 20)
    )
    a, b, c = parse_tokens_file(str(path), Settings())
    assert a.admin and not b.admin and a.source == "file"
    midnight = datetime.datetime(2027, 1, 31, tzinfo=datetime.UTC).timestamp()
    assert a.policy.expires == midnight
    assert b.policy.expires == midnight + 15 * 3600
    assert c.policy.expires == midnight + 18 * 3600  # no offset: UTC
    for field, value, message in (
        ("admin", '"yes"', "admin must be true or false"),
        ("expires", "12", "expires must be a date"),
        ("expires", '"next week"', "expires must be a date"),
    ):
        path.write_text('[d]\ntoken = "%s"\n%s = %s\n' % ("d" * 20, field, value))
        with pytest.raises(TokensFileError, match=message) as error:
            parse_tokens_file(str(path), Settings())
        assert str(error.value).startswith("%s: token 'd': " % path)


def test_the_tokens_file_refuses_a_final_newline_and_dates_out_of_range(tmp_path):
    from chat_gpt_proxy.access.tokens import TokensFileError, parse_tokens_file
    from settings import Settings

    path = tmp_path / "tokens.toml"
    for text, message in (
        ('["zed\\n"]\ntoken = "%s"\n' % ("z" * 20), "a name is 1-64"),
        ('[zed]\ntoken = "%s\\n"\n' % ("z" * 20), "token must be a string of visible ASCII"),
        ('[zed]\ntoken_sha256 = "%s\\n"\n' % ("0" * 64), "token_sha256 must be 64"),
        ('[zed]\ntoken = "%s"\nexpires = 9999-12-31T23:59:59-14:00\n' % ("z" * 20), "expires must be in UTC"),
        ('[zed]\ntoken = "%s"\nexpires = 0001-01-01T00:00:00+14:00\n' % ("z" * 20), "expires must be in UTC"),
    ):
        path.write_text(text)
        with pytest.raises(TokensFileError, match=message):
            parse_tokens_file(str(path), Settings())
