"""The ledger across restarts, the admin routes and the report command, with the real server process."""

import asyncio
import json
import subprocess
import sys

import pytest
import tornado.httpclient

from tests.procs import ROOT, ServerProcess

ALICE = "alice-TOKEN-7c1e9a3b5d"
ADMIN = "admin-TOKEN-4f2a8c6e0b1d"
KEY = "sk-test-usage-process-012345"
TOKENS_TOML = f"""
[alice]
token = "{ALICE}"
budget_tokens = 30
"""


async def fetch(url, method="GET", body=None, headers=None):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(url, method=method, body=body, headers=headers or {}, raise_error=False)
    finally:
        client.close()


async def chat(server, prompt="hi"):
    body = json.dumps({"prompt": prompt})
    return await fetch(server.url + "/chat_complete", "POST", body, {"access-token": ALICE, "openai-token": KEY})


def start(fake_openai, tmp_path, **env) -> ServerProcess:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    return ServerProcess(
        {
            "OPENAI_BASE_URL": fake_openai.url,
            "ACCESS_TOKENS_FILE": str(tokens),
            "USAGE_DATABASE": str(tmp_path / "usage.sqlite3"),
            **env,
        },
        str(tmp_path / "server.log"),
    )


@pytest.mark.gen_test(timeout=60)
async def test_a_restart_forgets_no_spend(fake_openai, tmp_path):
    server = start(fake_openai, tmp_path)
    try:
        await server.wait_ready()
        for _ in range(2):
            response = await chat(server)
            assert response.code == 200
        server.signal()
        assert await server.wait_exit(30) == 0
    finally:
        server.stop()
    # The rows written on the way out are what the next process starts from.
    server = start(fake_openai, tmp_path)
    try:
        await server.wait_ready()
        response = await fetch(server.url + "/usage", headers={"access-token": ALICE})
        usage = json.loads(response.body)
        assert usage["spent"]["month"]["tokens"] == 22 and usage["since_restart_only"] is False
        assert (await chat(server)).code == 200  # 22 of 30: admitted, ends at 33
        response = await chat(server)
        assert response.code == 429 and json.loads(response.body)["error"]["code"] == "budget_exceeded"
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_admin_routes_need_the_admin_token_and_csv_is_safe_for_spreadsheets(fake_openai, tmp_path):
    server = start(fake_openai, tmp_path, ADMIN_TOKEN=ADMIN)
    try:
        await server.wait_ready()
        body = json.dumps({"prompt": "hi", "generate_params": {"model_name": "=HYPERLINK(1)"}})
        response = await fetch(
            server.url + "/chat_complete", "POST", body, {"access-token": ALICE, "openai-token": KEY}
        )
        assert response.code == 200
        for headers in ({}, {"admin-token": "wrong-" + ADMIN}, {"admin-token": ADMIN[:-1]}):
            response = await fetch(server.url + "/admin/usage", headers=headers)
            assert response.code == 403 and json.loads(response.body)["error"]["code"] == "invalid_admin_token"
        rows = []
        for _ in range(50):  # the ledger writes every 0.5 s
            response = await fetch(server.url + "/admin/usage", headers={"admin-token": ADMIN})
            rows = json.loads(response.body)["rows"]
            if rows:
                break
            await asyncio.sleep(0.1)
        assert [(r["token"], r["model"], r["requests"], r["input_tokens"]) for r in rows] == [
            ("alice", "=HYPERLINK(1)", 1, 9)
        ]
        assert json.loads(response.body)["budgets"][0]["remaining_tokens"] == 19
        response = await fetch(server.url + "/admin/usage?format=csv", headers={"admin-token": ADMIN})
        assert response.headers["Content-Type"].startswith("text/csv")
        lines = response.body.decode().splitlines()
        assert lines[0].startswith("day,token,model,") and ",alice,'=HYPERLINK(1),1,9,0,2," in lines[1]
        for query in ("from=2026-13-01", "to=9999-12-31", "from=2026-12-02&to=2026-12-01", "format=xml"):
            response = await fetch(server.url + "/admin/usage?" + query, headers={"admin-token": ADMIN})
            assert response.code == 400, query
        page = await fetch(server.url + "/admin")
        assert page.code == 200 and "Content-Security-Policy" in page.headers
        server.signal()
        await server.wait_exit(30)
        # The same report without a server.
        report = subprocess.run(
            [sys.executable, "-m", "chat_gpt_proxy.usage", "--since", "2020-01-01", "--csv"],
            cwd=ROOT,
            env={"USAGE_DATABASE": str(tmp_path / "usage.sqlite3"), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert report.returncode == 0, report.stderr
        assert report.stdout.splitlines()[1:] == lines[1:]
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_admin_routes_do_not_exist_without_admin_token(fake_openai, tmp_path):
    server = start(fake_openai, tmp_path)
    try:
        await server.wait_ready()
        for path in ("/admin", "/admin/usage"):
            response = await fetch(server.url + path, headers={"admin-token": ADMIN})
            assert response.code == 404 and json.loads(response.body)["error"]["code"] == "not_found"
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_an_unreachable_database_stops_the_start_with_one_line(fake_openai, tmp_path):
    url = "postgresql://app:s3cret-pass@127.0.0.1:1/usage"
    server = start(fake_openai, tmp_path, USAGE_DATABASE=url)
    try:
        assert await server.wait_exit(30) == 2
        output = server.output()
        lines = [line for line in output.splitlines() if "USAGE_DATABASE" in line]
        assert len(lines) == 1 and lines[0].startswith("chat_gpt_proxy: invalid setting USAGE_DATABASE")
        assert "s3cret-pass" not in output and "Traceback" not in output
    finally:
        server.stop()


def test_the_report_command_explains_a_missing_database(tmp_path):
    report = subprocess.run(
        [sys.executable, "-m", "chat_gpt_proxy.usage", "--database", str(tmp_path / "none.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert report.returncode == 2 and "no such database file" in report.stderr and "Traceback" not in report.stderr


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("kind", ["junk", "directory"])
async def test_a_ledger_that_will_not_open_ends_the_process(fake_openai, tmp_path, kind):
    """A file that is no database, or a directory: one line and exit 2 within seconds, not a process that
    printed its last words and hangs on the driver's thread."""
    path = tmp_path / "ledger"
    if kind == "junk":
        path.write_bytes(b"this is not a database " * 100)
    else:
        path.mkdir()
    server = start(fake_openai, tmp_path, USAGE_DATABASE=str(path))
    try:
        assert await server.wait_exit(10) == 2, server.output()
        assert "invalid setting USAGE_DATABASE" in server.output() and "Traceback" not in server.output()
    finally:
        server.stop()
    report = subprocess.run(
        [sys.executable, "-m", "chat_gpt_proxy.usage", "--database", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert report.returncode == 2 and "Traceback" not in report.stderr, report.stderr
