"""A fake Anthropic API: a real HTTP server on loopback that speaks Anthropic's Messages API wire format.

Built on the fake OpenAI (chat_gpt_proxy/fake_openai/): the same server,
script (``push``, ``by_model``, ``POST /_fake/script``), records
(``received``, with every header) and counters (``aborts``, ``completed``),
with Anthropic's routes: ``POST /v1/messages`` (a ``message``, or with
``"stream": true`` its named events ``message_start``, ``content_block_start``,
``ping``, ``content_block_delta`` with ``text_delta``, ``input_json_delta``,
``thinking_delta`` and ``signature_delta``, ``content_block_stop``,
``message_delta``, ``message_stop``), ``POST /v1/messages/count_tokens`` and
``GET /v1/models`` in Anthropic's list shape. It wants a key (``x-api-key``,
or ``Authorization: Bearer``) and a known ``anthropic-version``, answers
errors as ``{"type":"error","error":{"type","message"}}`` with their status
(529 for ``overloaded_error``), and reports usage with the prompt cache's
``cache_creation_input_tokens`` and ``cache_read_input_tokens``.

On its own: ``python -m chat_gpt_proxy.fake_anthropic --port 8082``.
"""

from .app import Behaviour, FakeAnthropic

__all__ = ["Behaviour", "FakeAnthropic"]
