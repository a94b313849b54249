"""The examples of the README and docs/ work as written against a running proxy and the fake upstream."""

import ast
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ACCESS_TOKEN, OPENAI_KEY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")


def documents() -> list[str]:
    """The README, its Russian version and every page of docs/: where the examples live."""
    docs = os.path.join(ROOT, "docs")
    return [README, os.path.join(ROOT, "README.ru.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md")
    )


def all_documents_text() -> str:
    parts = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def snippet(name: str) -> tuple[str, str]:
    """The snippet tagged ``<!-- readme-snippet: name -->``; where several pages show it, every copy
    must be the same, so that the one the tests run is the one each reader sees."""
    found = re.findall(r"<!-- readme-snippet: %s -->\n```(\w+)\n(.*?)```" % re.escape(name), all_documents_text(), re.S)
    assert found, "no page holds the snippet %s" % name
    assert all(copy == found[0] for copy in found), "the copies of the snippet %s differ" % name
    return found[0]


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
    language, code = snippet("js-sdk")
    assert language == "javascript"
    script = os.path.join(JS_DIR, ".snippet-%d.mjs" % os.getpid())
    with open(script, "w", encoding="utf-8") as f:
        f.write(localize(code, base_url))
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


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of the README and docs/ names a file that exists, and a heading that exists."""
    broken = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(linked):
                broken.append("%s: %s (no such file)" % (os.path.relpath(path, ROOT), target))
                continue
            if anchor:
                with open(linked, encoding="utf-8") as f:
                    anchors = {heading_anchor(line.lstrip("#")) for line in f if line.startswith("#")}
                if anchor not in anchors:
                    broken.append("%s: %s (no such heading)" % (os.path.relpath(path, ROOT), target))
    assert broken == []


def test_the_readme_says_what_its_python_examples_need():
    """Each third-party module a Python example imports is in the README's pip install line, and not
    among the proxy's own requirements: the reader must install it (a ModuleNotFoundError otherwise)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    install = re.search(r"`pip install ([a-z ]+)`", text).group(1).split()
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        runtime = {line.split("==")[0].split("[")[0].strip() for line in f if line.strip() and line[0] != "#"}
    imported = set()
    for code in re.findall(r"```python\n(.*?)```", text, re.S):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party == set(install) == {"requests", "openai"}
    assert not third_party & runtime
    assert 'pip install "openai[realtime]"' in text


FENCE_RE = re.compile(r"(?:<!-- readme-snippet: [\w-]+ -->\n)?```\w*\n.*?```\n", re.S)


def sections(path: str) -> list[dict]:
    """A README cut at its headings (outside code): each part's heading level, code blocks (with their
    snippet markers), images, relative links and prose."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = FENCE_RE.findall(text)
    prose = FENCE_RE.sub("\n", text)
    parts = []
    for chunk in re.split(r"(?m)^(?=#{1,6} )", prose):
        if not chunk.strip():
            continue
        level = len(chunk) - len(chunk.lstrip("#"))
        parts.append(
            {
                "level": level,
                "images": re.findall(r"!\[[^\]]*\]\(([^)]+)\)", chunk),
                "links": [t for t in re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)", chunk) if "://" not in t],
                "prose": chunk,
                "blocks": [],
            }
        )
    # Each code block belongs to the section it stands in.
    for block in blocks:
        before = text[: text.index(block)]
        index = len(re.findall(r"(?m)^#{1,6} ", FENCE_RE.sub("\n", before))) - 1
        parts[index]["blocks"].append(block)
    return parts


def test_the_russian_readme_runs_parallel_to_the_english_one():
    """Same sections at the same levels, the same code blocks in each (byte for byte, snippet markers
    included), the same screenshots in Russian, links to the same pages, and Russian prose."""
    english, russian = sections(README), sections(os.path.join(ROOT, "README.ru.md"))
    assert [s["level"] for s in russian] == [s["level"] for s in english]
    for en, ru in zip(english, russian, strict=True):
        heading = en["prose"].splitlines()[0]
        assert ru["blocks"] == en["blocks"], heading
        assert [image.replace("-ru-", "-en-") for image in ru["images"]] == en["images"], heading
        assert all("-ru-" in image for image in ru["images"]), heading
        swapped = [link.replace("README.md", "README.ru.md") for link in ru["links"] if link != "README.md"]
        assert set(swapped) | {"README.ru.md"} >= set(en["links"]) - {"README.ru.md"}, heading
        assert set(swapped) <= set(en["links"]) | {"README.ru.md"}, heading
        words = re.findall(r"[A-Za-zА-Яа-яЁё]+", re.sub(r"`[^`]*`|\([^)]*\)", "", ru["prose"]))
        cyrillic = [w for w in words if re.match(r"[А-Яа-яЁё]", w)]
        assert len(cyrillic) >= 0.6 * len(words), heading
