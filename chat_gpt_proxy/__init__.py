"""The parts of chat_gpt_proxy that are not request handlers (those live in handlers/).

- ``upstream``: the one upstream call (libcurl through Tornado's CurlAsyncHTTPClient);
- ``observability``: the access log line and the Prometheus metrics;
- ``limits``: per-token request limits;
- ``generate_params``: the rules for /chat_complete's generate_params (requests and DEFAULT_GENERATE_PARAMS);
- ``fake_openai``: a fake OpenAI server for the demo mode, the tests and the benchmarks.
"""
