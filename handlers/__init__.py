"""Request handlers, one module per concern; each module ends with its routes.

Their shared bases: ``base`` (request ids, bodies, HEAD/OPTIONS, disconnects),
``admission`` (access token, limits, key, allow-list, concurrency cap),
``errors`` (JSON errors), ``relay`` (calling the upstream and relaying its
answer), ``openai_style`` (how /v1/* takes the key and words its errors) and
``usage_page`` and ``pages`` (what HTML pages are served with).
"""

from . import admin, chat, passthrough, playground, public, realtime

routes = [
    *playground.routes,
    *public.routes,
    *admin.routes,
    *chat.routes,
    *realtime.routes,
    *passthrough.routes,
]
