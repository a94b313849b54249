"""A fake OpenAI API: a real HTTP and WebSocket server on loopback that speaks OpenAI's wire format.

Used by the tests (in-process, on the test's IOLoop), by the benchmarks and by
the demo mode (inside the proxy's process), and on its own as
``python -m chat_gpt_proxy.fake_openai --port 8081``.

By default it echoes: the answer to a chat request is ``Echo: <last user
message>``, streamed word by word when ``stream`` is true. Tests script other
answers with ``FakeOpenAI.push(Behaviour(...))`` (or ``POST /_fake/script``
from another process); each request takes the next scripted behaviour.
``POST /v1/responses`` answers in the Responses API's shapes (JSON, or its
typed ``event:``/``data:`` stream).

It also answers as Azure OpenAI does (azure.py), on the same port, with the same
script and the same records: ``POST /openai/deployments/{deployment}/chat/completions``
and ``.../{deployment}/embeddings``, and ``POST /openai/responses`` (the body's
``model`` is the deployment), each with an ``?api-version=`` and an ``api-key``
header (``Authorization: Bearer`` is refused), for the deployments in
``FakeOpenAI.azure_deployments`` and the key in ``FakeOpenAI.azure_key`` (None:
any). Its endpoint is ``FakeOpenAI.azure_endpoint``.

It records what it received (the last
requests only, bodies cut: see ``RecentRequests``), counts TCP connections,
and notes every request whose client went away before the answer was
complete (an abort).
"""

from .app import FakeOpenAI
from .behaviours import Behaviour, RealtimeBehaviour, RealtimeRecord, Received, RecentRequests

__all__ = ["Behaviour", "FakeOpenAI", "RealtimeBehaviour", "RealtimeRecord", "Received", "RecentRequests"]
