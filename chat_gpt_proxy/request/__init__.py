"""The caller's leg: what a request carries and how the proxy reads it."""
