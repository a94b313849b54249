"""Request handlers, one module per concern; each module ends with its routes."""

from . import chat, info, openai_compat, playground, realtime

routes = [*playground.routes, *info.routes, *chat.routes, *realtime.routes, *openai_compat.routes]
