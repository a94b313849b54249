"""The pages' strings (static/i18n/*.json): the same keys, forms and placeholders in each language,
every key a page uses present, none unused; the language a request gets; the usage text and the pages
rendered in it by the server."""

from __future__ import annotations

import html.parser
import json
import os
import re

import pytest

from handlers.pages import LANGUAGE_COOKIE, LANGUAGES, STATIC_DIR, STRINGS, accepted_language, load_strings

# The plural forms each language needs (CLDR's categories for integers and decimals).
PLURAL_FORMS = {"en": {"one", "other"}, "ru": {"one", "few", "many", "other"}}
PARTS = ("common", "playground", "admin", "usage")
KEY_RE = re.compile(r"""["']((?:%s)\.[a-z0-9_.]*)["']""" % "|".join(PARTS))


def placeholders(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(placeholders(form) for form in value.values()))
    if isinstance(value, list):
        return set().union(*(placeholders(line) for line in value))
    return set(re.findall(r"\{(\w+)\}", value))


def page_sources() -> dict[str, str]:
    """The templates and scripts that use the strings."""
    out = {}
    for name in sorted(os.listdir(STATIC_DIR)):
        if name.endswith((".html", ".js")):
            with open(os.path.join(STATIC_DIR, name), encoding="utf-8") as f:
                out[name] = f.read()
    return out


def used_keys() -> tuple[set[str], set[str]]:
    """(keys named in full, prefixes a key is made from, such as "admin.budget.per." + period)."""
    keys, prefixes = set(), set()
    for text in page_sources().values():
        for key in KEY_RE.findall(text):
            if key.endswith((".css", ".js", ".html")):
                continue  # a file (static_url('playground.css')), not a string
            (prefixes if key.endswith(".") else keys).add(key)
    keys.add("usage.text")  # read by handlers/usage_page.py
    return keys, prefixes


def test_both_languages_have_the_same_keys_forms_and_placeholders():
    english, russian = STRINGS["en"], STRINGS["ru"]
    assert sorted(english) == sorted(russian)
    for key, value in english.items():
        other = russian[key]
        assert type(value) is type(other), key
        if isinstance(value, dict):
            assert set(value) == PLURAL_FORMS["en"], key
            assert set(other) == PLURAL_FORMS["ru"], key
            assert all("{n}" in form for form in (*value.values(), *other.values())), key
        assert placeholders(value) == placeholders(other), key
        if isinstance(value, str):
            assert value.strip() and other.strip(), key


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_admin_token_errors_name_both_ways_to_set_it(language):
    for key in ("admin.error.admin_token", "admin.error.no_admin"):
        text = STRINGS[language][key]
        assert "ADMIN_TOKEN " in text or "ADMIN_TOKEN," in text, (language, key)
        assert "ADMIN_TOKEN_FILE" in text, (language, key)


def test_the_files_explain_how_to_add_a_string():
    with open(os.path.join(STATIC_DIR, "i18n", "en.json"), encoding="utf-8") as f:
        comment = json.load(f)["//"]
    assert "data-i18n" in comment and "I18N.t(" in comment and "ru.json" in comment
    assert "//" not in load_strings("en"), "the comment is no string of the pages"


def test_every_key_the_pages_use_exists_and_every_string_is_used():
    keys, prefixes = used_keys()
    for language in LANGUAGES:
        assert keys - set(STRINGS[language]) == set(), language
        for prefix in prefixes:
            assert any(key.startswith(prefix) for key in STRINGS[language]), prefix
    unused = [
        key for key in STRINGS["en"] if key not in keys and not any(key.startswith(prefix) for prefix in prefixes)
    ]
    assert unused == []


@pytest.mark.parametrize(
    "header,expected",
    [
        ("", None),
        ("ru", "ru"),
        ("ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7", "ru"),
        ("en-US,en;q=0.9,ru;q=0.8", "en"),
        ("de-DE,de;q=0.9,ru;q=0.5,en;q=0.3", "ru"),
        ("en;q=0.5, ru;q=0.8", "ru"),
        ("ru;q=0, en", "en"),
        ("fr, de", None),
        ("*", "en"),
        ("RU-ru", "ru"),
        ("ru;q=abc", None),
        ("ru;q=2", None),
    ],
)
def test_accept_language(header, expected):
    assert accepted_language(header) == expected


class Texts(html.parser.HTMLParser):
    """The server-rendered text and attributes of every element that names a string."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str]] = []  # (what, key, rendered)
        self.open: list[tuple[str, str]] = []
        self.data = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in ("placeholder", "title", "aria-label"):
            if "data-i18n-" + name in attributes:
                self.found.append((name, attributes["data-i18n-" + name], attributes.get(name, "")))
        if "data-i18n" in attributes:
            self.open.append((tag, attributes["data-i18n"]))
            self.data = ""

    def handle_data(self, data):
        self.data += data

    def handle_endtag(self, tag):
        if self.open and self.open[-1][0] == tag:
            self.found.append(("text", self.open.pop()[1], self.data))


def embedded_strings(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="i18n-strings">(.*?)</script>', page, re.S)
    assert match
    return json.loads(match.group(1))


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.gen_test
async def test_the_playground_is_rendered_in_the_asked_language(proxy, language):
    headers = {"Accept": "text/html", "Accept-Language": "%s;q=0.9, xx" % language}
    response = await proxy.request("/", method="GET", auth=False, headers=headers)
    assert response.code == 200
    assert response.headers["Content-Language"] == language
    assert response.headers["Vary"] == "Accept-Language, Cookie"
    page = response.body.decode()
    assert '<html lang="%s">' % language in page
    texts = Texts()
    texts.feed(page)
    assert len(texts.found) > 20
    for what, key, rendered in texts.found:
        assert rendered.strip() == STRINGS[language][key], (what, key)
    embedded = embedded_strings(page)
    assert set(embedded) == set(LANGUAGES)
    assert {key.split(".")[0] for key in embedded["ru"]} == {"common", "playground"}
    assert embedded["ru"]["playground.title"] == STRINGS["ru"]["playground.title"]


@pytest.mark.gen_test
async def test_the_switch_cookie_wins_over_accept_language(proxy):
    headers = {"Accept": "text/html", "Accept-Language": "ru", "Cookie": "%s=en" % LANGUAGE_COOKIE}
    response = await proxy.request("/", method="GET", auth=False, headers=headers)
    assert response.headers["Content-Language"] == "en"
    headers["Cookie"] = "%s=xx" % LANGUAGE_COOKIE  # not a language of ours: Accept-Language decides
    response = await proxy.request("/", method="GET", auth=False, headers=headers)
    assert response.headers["Content-Language"] == "ru"


@pytest.mark.gen_test
async def test_the_usage_text_in_each_language(proxy, base_url):
    for path in ("/usage", "/chat_complete", "/"):
        response = await proxy.request(path, method="GET", auth=False, headers={"Accept-Language": "ru-RU,ru"})
        text = response.body.decode()
        assert response.code == 200 and response.headers["Content-Language"] == "ru"
        assert text.startswith("chat_gpt_proxy: прокси к OpenAI Chat API.")
        assert "curl -s %s/chat_complete" % base_url in text and "{base_url}" not in text
    response = await proxy.request("/usage", method="GET", auth=False)
    assert response.headers["Content-Language"] == "en"
    assert response.headers["Vary"] == "Accept-Language, Cookie"
    assert response.body.decode().startswith("chat_gpt_proxy: a proxy for the OpenAI chat API.")


def test_strings_cannot_end_the_script_block():
    from handlers.pages import script_json

    assert "<" not in script_json({"x": "</script><script>alert(1)</script>&"})
    assert json.loads(script_json({"x": "</script>&"})) == {"x": "</script>&"}
