"""The README's examples work as written against a running proxy and the fake upstream."""

import contextlib
import io
import os
import re
import subprocess

import pytest

from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")


def snippet(name: str) -> tuple[str, str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- readme-snippet: %s -->\n```(\w+)\n(.*?)```" % re.escape(name), text, re.S)
    assert match, "README has no snippet %s" % name
    return match.group(1), match.group(2)


def localize(code: str, base_url: str) -> str:
    """Point the snippet at the test proxy with the test's tokens; nothing else changes."""
    return (
        code.replace("http://127.0.0.1:9081", base_url)
        .replace('"123456"', repr(ACCESS_TOKEN))
        .replace("'access-token: 123456'", "'access-token: %s'" % ACCESS_TOKEN)
        .replace('"sk-..."', repr(OPENAI_KEY))
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("python-requests", "Echo: Привет, какая ты версия модели?"),
        ("python-stream", "Echo: Count to five"),
        ("python-sdk", "Echo: Привет!\nEcho: Count to five"),
    ],
)
@pytest.mark.gen_test
async def test_python_snippets(proxy, fake_openai, base_url, name, expected):
    language, code = snippet(name)
    assert language == "python"
    code = localize(code, base_url)
    out = io.StringIO()

    def run():
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {})

    await proxy.in_thread(run)
    assert out.getvalue().strip() == expected


@pytest.mark.gen_test(timeout=30)
async def test_javascript_sdk_snippet(proxy, fake_openai, base_url):
    """The JavaScript snippet, run by Node with the openai package (tests/js, installed by make test)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"```javascript\n(.*?)```", text, re.S)
    assert match, "README has no JavaScript snippet"
    script = os.path.join(JS_DIR, ".snippet-%d.mjs" % os.getpid())
    with open(script, "w", encoding="utf-8") as f:
        f.write(localize(match.group(1), base_url))
    try:
        env = dict(os.environ, OPENAI_API_KEY=OPENAI_KEY)
        result = await proxy.in_thread(
            subprocess.run, ["node", script], env=env, capture_output=True, text=True, timeout=30
        )
    finally:
        os.unlink(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Echo: Count to five"


@pytest.mark.parametrize("name", ["curl-stream", "curl-v1"])
@pytest.mark.gen_test
async def test_curl_snippets(proxy, fake_openai, base_url, name):
    language, code = snippet(name)
    assert language == "bash"
    env = dict(os.environ, OPENAI_API_KEY=OPENAI_KEY)
    result = await proxy.in_thread(
        subprocess.run, ["bash", "-c", localize(code, base_url)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("data: [DONE]")
    assert '"content":"Echo:' in result.stdout
