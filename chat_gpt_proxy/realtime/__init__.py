"""The Realtime API relay: one session between the client's WebSocket and the upstream's (``session``),
and how the upstream WebSocket is opened (``connect``)."""
