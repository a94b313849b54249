"""How the OpenAI-compatible surface (/v1/* over HTTP, and the realtime WebSocket) takes its key and
words its errors: as OpenAI does, so that SDKs raise their usual exception classes."""

from __future__ import annotations


class OpenAIStyle:
    """How /v1/* (HTTP and the realtime WebSocket) takes the key and words its errors: as OpenAI does."""

    missing_key_message = "Missing API key: send it as 'Authorization: Bearer <key>'."
    key_error_codes = ("missing_api_key", "invalid_api_key")

    def error_body(self, status: int, message: str, error: dict) -> dict:
        return {"error": error}

    # Set when the bearer credential is the proxy's access token, not an OpenAI key.
    bearer_is_access_token = False

    def bearer(self) -> str:
        auth = self.request.headers.get("Authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else ""

    def presented_access_token(self) -> str:
        token = self.request.headers.get("access-token")
        if token is None and self.bearer():
            # An SDK given only base_url and api_key sends the proxy's token as
            # its API key: such a request carries no OpenAI key of
            # its own, so its token's use_server_key decides.
            self.bearer_is_access_token = True
            return self.bearer()
        return token or ""

    def presented_key(self) -> str:
        if not self.bearer_is_access_token and self.bearer():
            return self.bearer()
        return super().presented_key()
