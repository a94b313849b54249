"""The upstream leg: the one HTTP call (``call``), what can go wrong on it (``errors``), the headers that
cross (``headers``), the process's client (``pool``), egress proxies (``egress``, ``tunnel``), the
retry policy (``retry``) and the upstream URL of a /v1 path (``urls``)."""
