"""The fake's Azure OpenAI routes: the same answers as its ``/v1`` ones, behind Azure's rules.

- ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``: as
  ``/v1/chat/completions`` (JSON or SSE, scripted behaviours), the deployment standing for the
  model (the answer's ``model``, and the key of ``FakeOpenAI.by_model``).
- ``POST /openai/deployments/{deployment}/embeddings?api-version=...``: as ``/v1/embeddings``.
- ``POST /openai/responses?api-version=...``: as ``/v1/responses``; the body's ``model`` is the
  deployment.
- Any other path under ``/openai/``: 404 ``Resource not found``.

Azure's rules, checked in this order, each refusal an Azure-shaped error object
(``{"error": {"code": ..., "message": ...}}``):

- the key is in an ``api-key`` header, never ``Authorization: Bearer`` (an Entra ID token there is
  not accepted by the fake): missing, empty or, when ``FakeOpenAI.azure_key`` is set, another key
  is a 401 with code ``"401"``;
- no ``api-version`` query parameter: 404 ``Resource not found``;
- a deployment not in ``FakeOpenAI.azure_deployments`` (when it is not None): 404
  ``DeploymentNotFound``.

Every request is recorded in ``FakeOpenAI.received`` like any other (path, query, headers, body).
"""

from __future__ import annotations

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from chat_gpt_proxy.fake_openai.http import ChatCompletions, Embeddings, FakeHandler, Responses
from chat_gpt_proxy.fake_openai.wire import error_object

ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
RESOURCE_NOT_FOUND = "Resource not found"
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again."
)


class AzureRules(FakeHandler):
    """Azure's key, ``api-version`` and deployment checks, shared by the Azure routes."""

    def azure_error(self, status: int, code: str, message: str) -> None:
        self.write_json({"error": {"code": code, "message": message}}, status)

    def refused(self) -> bool:
        """Answers a request without the right ``api-key`` or without an ``api-version``; True if it did."""
        key = self.request.headers.get("api-key", "")
        expected = self.fake.azure_key
        if not key or (expected is not None and key != expected):
            self.azure_error(401, "401", ACCESS_DENIED)
            return True
        if not self.get_query_argument("api-version", ""):
            self.azure_error(404, "404", RESOURCE_NOT_FOUND)
            return True
        return False

    def unknown_deployment(self, deployment: str) -> bool:
        """Answers a request for a deployment the fake does not have; True if it did."""
        known = self.fake.azure_deployments
        if known is not None and deployment not in known:
            self.azure_error(404, "DeploymentNotFound", DEPLOYMENT_NOT_FOUND)
            return True
        return False


class AzureChatCompletions(AzureRules, ChatCompletions):
    async def post(self, deployment: str) -> None:
        if self.refused() or self.unknown_deployment(deployment):
            return
        await self.complete(deployment)


class AzureEmbeddings(AzureRules, Embeddings):
    def post(self, deployment: str) -> None:
        if self.refused() or self.unknown_deployment(deployment):
            return
        body = self.json_body()
        if body is None:
            self.write_json(error_object(Behaviour(message="We could not parse the JSON body of your request.")), 400)
            return
        self.embed(body, deployment)


class AzureResponses(AzureRules, Responses):
    async def post(self) -> None:
        if self.refused():
            return
        body = self.json_body()
        model = body.get("model") if body is not None else None
        if body is not None and not isinstance(model, str):
            missing = Behaviour(message="Missing required parameter: 'model'.", error_code="missing_required_parameter")
            self.write_json(error_object(missing), 400)
            return
        if model is not None and self.unknown_deployment(model):
            return
        await self.respond(body)


class AzureNotFound(AzureRules):
    """Any other path under ``/openai/``: Azure's 404."""

    def any_method(self, *args) -> None:
        self.azure_error(404, "404", RESOURCE_NOT_FOUND)

    get = head = post = put = patch = delete = options = any_method
