import pytest


@pytest.mark.gen_test
async def test_json_round_trip(proxy, fake_openai):
    response, body = await proxy.chat({"prompt": "Привет"})
    assert response.code == 200
    assert body["text"] == "Echo: Привет"


@pytest.mark.gen_test
async def test_stream(proxy, fake_openai):
    s = await proxy.stream({"prompt": "a b c", "generate_params": {"stream": True}})
    assert s.response.code == 200
    print(s.chunks)
    assert s.events()[-1] == "[DONE]"
