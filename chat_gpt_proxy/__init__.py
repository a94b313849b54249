"""chat_gpt_proxy: the parts of the proxy that are not request handlers (those are in handlers/),
arranged by the two legs of a request.

- ``request``: what arrives from the caller (body decoding, the model it names, generate_params,
  strict JSON, CORS);
- ``access``: who may call and how much (named tokens, rate and concurrency limits, limits shared in Redis);
- ``upstream``: the leg to OpenAI (the libcurl call, its error vocabulary, headers, egress proxies and
  tunnels, the retry policy, the upstream URL);
- ``realtime``: the Realtime WebSocket relay (the session, its upstream connection);
- ``observability``: the access log line and the Prometheus metrics;
- ``application``: ``ProxyApplication``, the runtime state every handler shares;
- ``tornado_internals``: the one seam to Tornado's private attributes;
- ``fake_openai``: a fake OpenAI server for the demo mode, the tests and the benchmarks.
"""
