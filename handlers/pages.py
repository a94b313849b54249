"""What every HTML page of the proxy (the playground, the admin page) is served with, and in which language.

The strings live in static/i18n/<language>.json (the head of en.json says how a page adds one). A page is
in the language of the switch on it (a cookie), else the first language of ``Accept-Language`` the proxy
has (RFC 9110 section 12.5.4), else English. The server renders the page's text for the first paint and
embeds the strings of both languages, so that the switch changes the page in place (static/i18n.js)
without losing what was typed.
"""

from __future__ import annotations

import json
import os

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
LANGUAGES = ("en", "ru")
DEFAULT_LANGUAGE = "en"
# Set by the switch on a page (static/i18n.js). Cookies are per host, not per port: a name of its own.
LANGUAGE_COOKIE = "chat_gpt_proxy_lang"

# No inline script or style, nothing from other hosts, no framing. The strings are embedded as a JSON
# data block (<script type="application/json">), which is never run, so script-src needs no exception.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def load_strings(language: str) -> dict:
    with open(os.path.join(STATIC_DIR, "i18n", language + ".json"), encoding="utf-8") as f:
        strings = json.load(f)
    strings.pop("//", None)  # the file's comment
    return strings


STRINGS = {language: load_strings(language) for language in LANGUAGES}


def accepted_language(header: str) -> str | None:
    """The language of ours that ``Accept-Language`` prefers most, or None: by q-value, then by order;
    ``ru-RU`` counts as ``ru``, ``*`` as English, ``q=0`` as "not this one"."""
    ranked = []
    for position, item in enumerate(header.split(",")[:50]):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        language = tag.strip().lower().split("-")[0]
        language = DEFAULT_LANGUAGE if language == "*" else language
        if language in LANGUAGES and 0 < quality <= 1:
            ranked.append((-quality, position, language))
    return min(ranked)[2] if ranked else None


def language_of(request) -> str:
    """The language to answer ``request`` in: the page switch's cookie, then ``Accept-Language``."""
    chosen = request.cookies.get(LANGUAGE_COOKIE)
    if chosen is not None and chosen.value in LANGUAGES:
        return chosen.value
    return accepted_language(request.headers.get("Accept-Language", "")) or DEFAULT_LANGUAGE


def set_language_headers(handler, language: str) -> None:
    handler.set_header("Content-Language", language)
    # A shared cache must not give one reader's language to another.
    handler.set_header("Vary", "Accept-Language, Cookie")


def script_json(value) -> str:
    """JSON that cannot end the <script> block it sits in, whatever the strings hold."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(handler, template: str, parts: tuple[str, ...], **kwargs) -> None:
    """Renders ``template`` in the reader's language with the page headers; ``parts``: the key prefixes
    (before the first dot) of the strings the page uses, besides ``common``."""
    language = language_of(handler.request)
    strings = STRINGS[language]
    for name, value in PAGE_HEADERS.items():
        handler.set_header(name, value)
    handler.set_header("Cache-Control", "no-cache")
    set_language_headers(handler, language)
    wanted = ("common", *parts)
    embedded = {
        code: {key: text for key, text in STRINGS[code].items() if key.split(".")[0] in wanted} for code in LANGUAGES
    }
    handler.render(
        template,
        lang=language,
        languages=LANGUAGES,
        t=lambda key: strings[key],
        strings_json=script_json(embedded),
        **kwargs,
    )
