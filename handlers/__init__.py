"""Request handlers, one module per concern; each module ends with its routes.

Their shared bases: ``base`` (request ids, bodies, HEAD/OPTIONS, disconnects),
``admission`` (access token, limits, key, allow-list, concurrency cap),
``errors`` (JSON errors), ``relay`` (calling the upstream and relaying its
answer), ``forwarding`` (a request forwarded as it came, its answer relayed
as it came), ``openai_style`` (how /v1/* takes the key and words its errors) and
``usage_page`` and ``pages`` (what HTML pages are served with).
"""

from . import admin, admin_api, anthropic, chat, passthrough, playground, public, realtime

routes = [
    *playground.routes,
    *public.routes,
    *admin.routes,
    *admin_api.routes,
    *chat.routes,
    *realtime.routes,
    # Before /v1/*: Anthropic's routes, and /v1/models for an Anthropic client.
    *anthropic.routes,
    *passthrough.routes,
]
