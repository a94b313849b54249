"""docs/team.md's budgets path, pasted as written into a fresh copy of the checkout: the tokens file,
the start with `make run`, then the admin token, a member's call without a key of her own, her spend
and `make reload` from another shell. Only the port (a free one instead of 9081) and the upstream (the
fake, through OPENAI_BASE_URL, which the commands leave alone) differ from what a reader does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.procs import ROOT, free_port
from tests.test_readme import snippet
from tests.threaded import BackgroundStack

SERVER_KEY = "sk-test-team-path-server-key-4d1e"
# What the commands name: anna's token in the tokens file, the files they create.
ANNA = "anna-long-random-token-1"
# Settings a developer's shell may hold that the reader's would not.
# The proxy's own settings, and make's: under `make test` (CI) MAKELEVEL and MAKEFLAGS would make the
# pasted `make reload` a sub-make that prints "Entering directory" lines a reader's shell never shows.
NOT_INHERITED = (
    "ACCESS_TOKEN",
    "ACCESS_KEY",
    "ACCESS_TOKENS_FILE",
    "OPENAI_API_KEY_FILE",
    "ADMIN_TOKEN",
    "PID_FILE",
    "MAKELEVEL",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKEOVERRIDES",
)


def fresh_checkout(target) -> str:
    """The checkout's files (tracked, or new and not ignored) copied into ``target``, with the test's
    virtualenv as its .venv: what a reader has after `git clone` and a first `make run`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    repo = os.path.join(str(target), "chat_gpt_proxy")
    for name in filter(None, listed.split("\0")):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source) or name.startswith("tests/js/node_modules"):
            continue
        os.makedirs(os.path.dirname(os.path.join(repo, name)), exist_ok=True)
        shutil.copy2(source, os.path.join(repo, name))
    os.symlink(sys.prefix, os.path.join(repo, ".venv"))
    return repo


def as_pasted(code: str, port: int) -> str:
    """The commands with the test's port; `make` told not to (re)build the virtualenv, which is the
    shared one of the test run (make would otherwise compare its stamp with the copied requirements)."""
    return code.replace("127.0.0.1:9081", "127.0.0.1:%d" % port).replace("make run", "make -o .venv/.runtime run")


def get(url: str, headers: dict) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(what)


@pytest.fixture
def fake():
    """The fake OpenAI on a loop of its own (BackgroundStack's; its own proxy is not used)."""
    stack = BackgroundStack().start()
    yield stack.fake
    stack.stop()


def test_the_pasted_team_commands_work_from_a_fresh_checkout(tmp_path, fake):
    repo = fresh_checkout(tmp_path)
    pid = 0
    language, tokens_file = snippet("budgets-file")
    assert language == "toml"
    with open(os.path.join(repo, "tokens.toml"), "w", encoding="utf-8") as f:
        f.write(tokens_file)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(PORT=str(port), HOST="127.0.0.1", OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=SERVER_KEY)
    log_path = tmp_path / "proxy.log"
    _, start = snippet("team-start")
    with open(log_path, "wb") as log:
        # A session of its own: the shell, make and the server stop together at the end.
        shell = subprocess.Popen(
            ["bash", "-euc", as_pasted(start, port)],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = "http://127.0.0.1:%d" % port

        def up():
            assert shell.poll() is None, log_path.read_text()
            try:
                return get(url + "/readyz", {})[0] == 200
            except OSError:
                return False

        wait_until(up, 30, "the proxy did not start")
        startup = log_path.read_text()
        assert "ADMIN_TOKEN_FILE: wrote a new admin token to admin-token (read it there: cat admin-token)" in startup
        assert "playground %s/ · how to call the API %s/usage · admin page %s/admin" % (url, url, url) in startup
        with open(os.path.join(repo, "admin-token")) as f:
            admin_token = f.read().strip()
        assert admin_token and admin_token not in startup, "the admin token is never logged"
        assert oct(os.stat(os.path.join(repo, "admin-token")).st_mode & 0o777) == "0o600"

        _, check = snippet("team-check")
        result = subprocess.run(
            ["bash", "-euc", as_pasted(check, port)], cwd=repo, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        token_line, answer_line, usage_line, reload_line = result.stdout.splitlines()
        assert token_line == admin_token
        # anna called without a key of her own: the proxy's key went upstream.
        answer = json.loads(answer_line)
        assert answer["status"] == "ok" and answer["text"] == "Echo: Привет!", answer
        assert fake.received[-1].headers["Authorization"] == "Bearer " + SERVER_KEY
        usage = json.loads(usage_line)
        assert usage["token"] == "anna" and usage["budget"]["budget_usd"] == 20.0 and usage["metered"] is True
        assert re.fullmatch(
            r"make reload: sent SIGHUP to the proxy \(pid \d+\); its log says what it reloaded", reload_line
        )
        wait_until(
            lambda: "SIGHUP: reloaded tokens.toml: 3 named tokens" in log_path.read_text(), 10, "no reload logged"
        )
        status, body = get(url + "/admin/usage", {"admin-token": admin_token})
        assert status == 200 and json.loads(body)["budgets"][0]["token"] == "anna"
        assert os.path.exists(os.path.join(repo, "usage.sqlite3"))
        with open(os.path.join(repo, "chat_gpt_proxy.pid")) as f:
            pid = int(f.read())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            assert b"server.py" in f.read(), "the PID file names the server, not make"
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)
        try:
            shell.wait(30)
            # The server drains after the shell has gone: wait for it too.
            wait_until(lambda: not pid or not os.path.exists("/proc/%d" % pid), 30, "the server did not stop")
        except (subprocess.TimeoutExpired, AssertionError):
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(10)
            raise
    assert not os.path.exists(os.path.join(repo, "chat_gpt_proxy.pid")), "removed when the server stopped"


def test_make_reload_without_a_running_proxy_says_so(tmp_path):
    for content in (None, "%d\n" % os.getpid()):  # no file; a PID that is no proxy (this test)
        pid_file = tmp_path / "proxy.pid"
        if content is not None:
            pid_file.write_text(content)
        result = subprocess.run(
            ["make", "-s", "reload", "PID_FILE=%s" % pid_file], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0
        assert result.stderr.splitlines()[0] == (
            "make reload: no proxy running with its PID in %s; start it with make run" % pid_file
        )
