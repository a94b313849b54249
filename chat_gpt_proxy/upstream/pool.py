"""The upstream client of this process (one libcurl multi handle) and the calls in flight."""

from __future__ import annotations

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient

from chat_gpt_proxy.tornado_internals import curl_multi
from chat_gpt_proxy.upstream.call import UpstreamClient
from chat_gpt_proxy.upstream.retry import RetryPolicy


def make_client(settings) -> CurlAsyncHTTPClient:
    """One client per IOLoop; ``max_clients`` is our own concurrency cap, so
    Tornado's hidden queue (which has no timeout in the curl client) is never used."""
    client = UpstreamClient(
        force_instance=True,
        max_clients=settings.max_concurrent_upstream,
        # Our WRITEFUNCTION replaces Tornado's, so this limit would not apply;
        # set it to the largest value anyway for clarity.
        max_body_size=1 << 62,
    )
    # libcurl sizes its idle-connection cache at 4x the transfers running at
    # that moment; Tornado removes each finished transfer, so after a burst
    # the cache shrinks and closes warm connections (each a new TLS handshake
    # with the real API). Keep up to one idle connection per allowed request.
    curl_multi(client).setopt(pycurl.M_MAXCONNECTS, settings.max_concurrent_upstream)
    return client


class UpstreamPool:
    """The upstream client of this process and the handlers with a call in flight."""

    def __init__(self, config):
        self.config = config
        self.retry = RetryPolicy(config)
        self.streams = 0
        self.handlers: set = set()
        self._client = None

    def client(self):
        # Created on first use so that it belongs to the running IOLoop.
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
