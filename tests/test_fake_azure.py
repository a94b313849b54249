"""The fake's Azure OpenAI routes (chat_gpt_proxy/fake_openai/azure.py), tested directly.

Azure's shapes: ``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...``
(and ``.../embeddings``), ``{endpoint}/openai/responses?api-version=...`` with the deployment in the
body's ``model``, the key in an ``api-key`` header. The proxy's tests point an "azure" upstream at
``fake_openai.azure_endpoint`` and rely on what is checked here: the answers are the ``/v1`` ones,
scripted behaviours apply, refusals are Azure's, and ``received`` shows what arrived.
"""

from __future__ import annotations

import json

import openai
import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_openai.behaviours import Behaviour

KEY = "azure-KEY-for-the-fake-3c1e"
DEPLOYMENT = "gpt4o-prod"
API_VERSION = "2024-10-21"
CHAT = "/openai/deployments/%s/chat/completions"
EMBEDDINGS = "/openai/deployments/%s/embeddings"
RESPONSES = "/openai/responses"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def azure(fake_openai):
    """The shared fake, with one known deployment and one key."""
    fake_openai.azure_deployments = {DEPLOYMENT, "embed-small"}
    fake_openai.azure_key = KEY
    return fake_openai


async def post(fake, path, body, *, api_version=API_VERSION, headers=None, streaming_callback=None):
    """POST ``body`` (JSON) to the fake's ``path``, with the key in ``api-key`` unless ``headers`` is given."""
    url = fake.azure_endpoint + path
    if api_version is not None:
        url += "?api-version=" + api_version
    request = tornado.httpclient.HTTPRequest(
        url,
        method="POST",
        body=json.dumps(body),
        headers={"Content-Type": "application/json", **({"api-key": KEY} if headers is None else headers)},
        streaming_callback=streaming_callback,
    )
    return await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)


def sse_data(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE stream, in order (events end with a blank line)."""
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "the stream ends with a complete event"
    out = []
    for event in events[:-1]:
        lines = event.split("\n")
        out += [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    return out


@pytest.mark.gen_test
async def test_chat_completion_names_the_deployment_and_is_recorded(azure):
    response = await post(azure, CHAT % DEPLOYMENT, {"messages": MESSAGES})
    assert response.code == 200, response.body
    answer = json.loads(response.body)
    assert answer["object"] == "chat.completion" and answer["model"] == DEPLOYMENT
    assert answer["choices"][0]["message"]["content"] == "Echo: hello there"
    assert answer["usage"]["total_tokens"] > 0
    assert response.headers["x-request-id"].startswith("req_fake_")

    [record] = azure.received
    assert record.method == "POST" and record.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert record.query == "api-version=2024-10-21"
    assert record.query_arguments == {"api-version": [API_VERSION]}
    assert record.headers["Api-Key"] == KEY
    assert "Authorization" not in record.headers
    # Looked up whatever the case, so that a check for an absent header cannot pass by a misspelling.
    assert record.headers["api-key"] == record.headers.get("API-KEY") == KEY and "api-key" in record.headers
    assert "authorization" not in record.headers and record.headers.get("authorization") is None
    assert record.json == {"messages": MESSAGES}


@pytest.mark.gen_test
async def test_streamed_chat_completion_is_sse_ending_in_done_with_usage(azure):
    pieces = []
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    response = await post(azure, CHAT % DEPLOYMENT, body, streaming_callback=pieces.append)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = sse_data(b"".join(pieces))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["model"] for c in chunks} == {DEPLOYMENT}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip() == "Echo: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # include_usage: a last chunk with no choices carries the usage, the others "usage": null.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.gen_test
async def test_scripted_behaviours_apply_to_azure_routes(azure):
    azure.push(
        Behaviour(
            kind="error", status=429, message="Slow down", error_type="rate_limit_error", headers={"retry-after": "2"}
        ),
        Behaviour(chunks=["one ", "two"]),
    )
    response = await post(azure, CHAT % DEPLOYMENT, {"messages": MESSAGES})
    assert response.code == 429 and response.headers["retry-after"] == "2"
    assert json.loads(response.body)["error"]["message"] == "Slow down"

    pieces = []
    response = await post(
        azure, CHAT % DEPLOYMENT, {"messages": MESSAGES, "stream": True}, streaming_callback=pieces.append
    )
    data = sse_data(b"".join(pieces))
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]) == "one two"

    # by_model is keyed by the deployment, the model of an Azure request.
    azure.by_model[DEPLOYMENT] = Behaviour(kind="error", status=500, message="deployment down")
    response = await post(azure, CHAT % DEPLOYMENT, {"messages": MESSAGES, "model": "ignored"})
    assert response.code == 500 and json.loads(response.body)["error"]["message"] == "deployment down"


@pytest.mark.gen_test
async def test_bad_chat_body_is_openais_400(azure):
    response = await post(azure, CHAT % DEPLOYMENT, {"messages": "not a list"})
    assert response.code == 400
    assert json.loads(response.body)["error"]["type"] == "invalid_request_error"


@pytest.mark.gen_test
async def test_embeddings(azure):
    response = await post(azure, EMBEDDINGS % "embed-small", {"input": ["a", "b"]})
    assert response.code == 200
    answer = json.loads(response.body)
    assert answer["object"] == "list" and answer["model"] == "embed-small"
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert azure.received[-1].path == "/openai/deployments/embed-small/embeddings"


@pytest.mark.gen_test
async def test_responses_json_and_stream_take_the_deployment_from_the_body(azure):
    response = await post(azure, RESPONSES, {"model": DEPLOYMENT, "input": "hi you"})
    assert response.code == 200
    answer = json.loads(response.body)
    assert answer["object"] == "response" and answer["model"] == DEPLOYMENT and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["text"] == "Echo: hi you"
    assert azure.received[-1].path == RESPONSES and azure.received[-1].query_arguments["api-version"] == [API_VERSION]

    pieces = []
    body = {"model": DEPLOYMENT, "input": "hi you", "stream": True}
    response = await post(azure, RESPONSES, body, streaming_callback=pieces.append)
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(d) for d in sse_data(b"".join(pieces))]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["model"] == DEPLOYMENT
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas.strip() == "Echo: hi you"

    response = await post(azure, RESPONSES, {"model": "not-deployed", "input": "x"})
    assert response.code == 404 and json.loads(response.body)["error"]["code"] == "DeploymentNotFound"
    response = await post(azure, RESPONSES, {"input": "x"})
    assert response.code == 400 and "'model'" in json.loads(response.body)["error"]["message"]


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "headers",
    [{}, {"api-key": ""}, {"Authorization": "Bearer " + KEY}, {"api-key": "another-key"}],
    ids=["no-key", "empty-key", "bearer-instead", "wrong-key"],
)
async def test_key_must_be_the_api_key_header(azure, headers):
    azure.push(Behaviour(chunks=["kept"]))
    for path, body in [
        (CHAT % DEPLOYMENT, {"messages": MESSAGES}),
        (EMBEDDINGS % DEPLOYMENT, {"input": "x"}),
        (RESPONSES, {"model": DEPLOYMENT, "input": "x"}),
    ]:
        response = await post(azure, path, body, headers=headers)
        assert response.code == 401, path
        error = json.loads(response.body)["error"]
        assert error["code"] == "401" and error["message"].startswith("Access denied due to invalid subscription key")
        assert response.headers["Content-Type"] == "application/json"
    # Refused requests are recorded, and take no scripted behaviour.
    assert len(azure.received) == 3 and len(azure.script) == 1


@pytest.mark.gen_test
async def test_any_non_empty_key_when_azure_key_is_none(fake_openai):
    assert fake_openai.azure_key is None and fake_openai.azure_deployments is None
    response = await post(
        fake_openai, CHAT % "any-name-at-all", {"messages": MESSAGES}, headers={"api-key": "whatever"}
    )
    assert response.code == 200 and json.loads(response.body)["model"] == "any-name-at-all"
    response = await post(fake_openai, CHAT % "x", {"messages": MESSAGES}, headers={"Authorization": "Bearer k"})
    assert response.code == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("api_version", [None, ""])
async def test_missing_api_version_is_resource_not_found(azure, api_version):
    for path, body in [
        (CHAT % DEPLOYMENT, {"messages": MESSAGES}),
        (EMBEDDINGS % DEPLOYMENT, {"input": "x"}),
        (RESPONSES, {"model": DEPLOYMENT, "input": "x"}),
    ]:
        response = await post(azure, path, body, api_version=api_version)
        assert response.code == 404, path
        assert json.loads(response.body) == {"error": {"code": "404", "message": "Resource not found"}}


@pytest.mark.gen_test
async def test_unknown_deployment(azure):
    for path in (CHAT, EMBEDDINGS):
        response = await post(azure, path % "gpt-4o", {"messages": MESSAGES, "input": "x"})
        assert response.code == 404
        error = json.loads(response.body)["error"]
        assert error["code"] == "DeploymentNotFound"
        assert error["message"].startswith("The API deployment for this resource does not exist")
    # The set may change while the fake runs.
    azure.azure_deployments.add("gpt-4o")
    assert (await post(azure, CHAT % "gpt-4o", {"messages": MESSAGES})).code == 200


@pytest.mark.gen_test
async def test_other_paths_under_openai_are_azures_404_and_v1_still_answers(azure):
    for path in ("/openai/deployments/%s/completions" % DEPLOYMENT, "/openai/v1/chat/completions", "/openai/models"):
        response = await post(azure, path, {"messages": MESSAGES})
        assert response.code == 404, path
        assert json.loads(response.body)["error"]["code"] == "404"
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        azure.url + "/chat/completions",
        method="POST",
        body=json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}),
        headers={"Authorization": "Bearer sk-any"},
    )
    assert json.loads(response.body)["model"] == "gpt-4o-mini"


@pytest.mark.gen_test
async def test_routes_on_the_decoded_path_and_records_it_as_it_arrived(azure):
    response = await post(azure, "/openai/deployments/gpt4o-prod/chat/c%6Fmpletions", {"messages": MESSAGES})
    assert response.code == 200 and json.loads(response.body)["model"] == DEPLOYMENT
    assert azure.received[-1].path == "/openai/deployments/gpt4o-prod/chat/c%6Fmpletions"


@pytest.mark.gen_test
async def test_the_openai_sdks_azure_client_talks_to_it(azure):
    """The official client builds the same paths, query and header as the fake expects."""
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=azure.azure_endpoint, api_key=KEY, api_version=API_VERSION, max_retries=0
    )
    try:
        completion = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        assert completion.model == DEPLOYMENT and completion.choices[0].message.content == "Echo: hello there"
        stream = await client.chat.completions.create(
            model=DEPLOYMENT, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == "Echo: hello there"
        assert chunks[-1].usage.total_tokens > 0
        embeddings = await client.embeddings.create(model="embed-small", input=["a"])
        assert embeddings.model == "embed-small"
        response = await client.responses.create(model=DEPLOYMENT, input="hi")
        assert response.output_text == "Echo: hi"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)
    finally:
        await client.close()
    paths = [(r.path, r.query_arguments["api-version"], r.headers["Api-Key"]) for r in azure.received]
    assert paths == [
        (CHAT % DEPLOYMENT, [API_VERSION], KEY),
        (CHAT % DEPLOYMENT, [API_VERSION], KEY),
        (EMBEDDINGS % "embed-small", [API_VERSION], KEY),
        (RESPONSES, [API_VERSION], KEY),
        (CHAT % "nope", [API_VERSION], KEY),
    ]
    assert not any("Authorization" in r.headers for r in azure.received)

    bearer = openai.AsyncAzureOpenAI(
        azure_endpoint=azure.azure_endpoint, azure_ad_token="an-entra-token", api_version=API_VERSION, max_retries=0
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            await bearer.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
    finally:
        await bearer.close()
    assert azure.received[-1].headers["Authorization"] == "Bearer an-entra-token"
