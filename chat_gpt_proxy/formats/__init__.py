"""What each API format knows, one small object per format, so that the relay, the cache and the meter
stay format-free: where a JSON answer and a stream's events keep the usage and the model that ran, what
the proxy adds to a stream and takes out again, and how the format words an error.

``sse`` parses every stream; ``base`` is what every format shares (``ApiFormat``, ``StreamMeter``, the
incremental JSON usage reader); ``openai`` holds OpenAI's formats (chat, Responses, the other JSON
routes) and ``anthropic`` the Messages API.
"""
