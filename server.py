"""chat_gpt_proxy: a fast, safe proxy for the OpenAI chat API.

``make_app(settings)`` builds the Tornado application (tests and benchmarks
import it); ``main()`` reads the settings from the environment and serves.
"""

from __future__ import annotations

import logging
import sys

import tornado.httpserver
import tornado.ioloop
import tornado.web

from handlers import routes
from handlers.base import BaseHandler
from handlers.proxy import UpstreamPool
from settings import Settings, SettingsError

log = logging.getLogger("chat_gpt_proxy")


class NotFoundHandler(BaseHandler):
    """Any other path: a JSON 404, never Tornado's HTML page."""

    requires_access_token = False

    def prepare(self) -> None:
        from handlers.base import ApiError

        raise ApiError(404, "No such route: %s. See GET / for usage." % self.request.path[:200], code="not_found")


def make_app(settings: Settings) -> tornado.web.Application:
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        config=settings,
        pool=UpstreamPool(settings),
        # Access logging is ours (no secrets, one line per request).
        log_function=lambda handler: None,
    )


def make_server(app: tornado.web.Application, settings: Settings) -> tornado.httpserver.HTTPServer:
    return tornado.httpserver.HTTPServer(
        app,
        xheaders=False,
        max_body_size=settings.max_body_bytes + 1,
        idle_connection_timeout=3600,
        body_timeout=60,
    )


def main() -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print("chat_gpt_proxy: invalid setting %s" % exc, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.default_token_in_use:
        log.warning("ACCESS_TOKEN is not set: the default access token 123456 is in use. Set ACCESS_TOKEN!")
    log.info("configuration: %s", settings.masked())
    app = make_app(settings)
    server = make_server(app, settings)
    server.listen(settings.port, settings.host)
    log.info("listening on %s:%d", settings.host, settings.port)
    tornado.ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
