"""Request handlers, one module per concern; each module ends with its routes."""

from . import chat, info

routes = [*info.routes, *chat.routes]
