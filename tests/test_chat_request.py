"""Unit tests of build_chat_request: how a /chat_complete body becomes the upstream payload."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.chat import answer_text, build_chat_request
from handlers.errors import ApiError
from settings import Settings

CONFIG = Settings()


def build(body, **overrides):
    return build_chat_request(body, dataclasses.replace(CONFIG, **overrides))


def test_prompt_becomes_one_user_message_with_default_model():
    assert build({"prompt": "Привет"}) == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Привет"}]}


def test_messages_pass_through_as_given():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert build({"messages": messages})["messages"] == messages


def test_model_name_maps_to_model_and_other_keys_pass_verbatim():
    params = {
        "model_name": "gpt-4o",
        "max_tokens": 5,
        "temperature": 0.1,
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_object"},
        "some_future_param": {"x": [1, None]},
    }
    payload = build({"prompt": "x", "generate_params": params})
    assert payload["model"] == "gpt-4o" and "model_name" not in payload
    for key in ("max_tokens", "temperature", "tools", "response_format", "some_future_param"):
        assert payload[key] == params[key]


def test_model_is_accepted_and_equal_values_are_fine():
    assert build({"prompt": "x", "generate_params": {"model": "m1"}})["model"] == "m1"
    assert build({"prompt": "x", "generate_params": {"model": "m1", "model_name": "m1"}})["model"] == "m1"


def test_defaults_are_merged_under_callers_params():
    payload = build(
        {"prompt": "x", "generate_params": {"temperature": 1}},
        default_model="dm",
        default_generate_params={"temperature": 0, "max_tokens": 7},
    )
    assert payload["model"] == "dm" and payload["temperature"] == 1 and payload["max_tokens"] == 7


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "a"}]},
        {"prompt": ""},
        {"prompt": 5},
        {"prompt": None},
        {"messages": []},
        {"messages": "hi"},
        {"messages": ["hi"]},
        {"prompt": "x", "generate_params": "gpt-4o"},
        {"prompt": "x", "generate_params": [1]},
        {"prompt": "x", "generate_params": {"messages": []}},
        {"prompt": "x", "generate_params": {"model": "a", "model_name": "b"}},
        {"prompt": "x", "generate_params": {"model_name": 5}},
        {"prompt": "x", "generate_params": {"stream": "yes"}},
    ],
)
def test_invalid_bodies_are_400_saying_what_to_send(body):
    with pytest.raises(ApiError) as info:
        build(body)
    assert info.value.status_code == 400
    assert info.value.message


def test_allowed_models():
    assert build({"prompt": "x"}, allowed_models=("gpt-4o-mini",))["model"] == "gpt-4o-mini"
    with pytest.raises(ApiError) as info:
        build({"prompt": "x", "generate_params": {"model_name": "gpt-5"}}, allowed_models=("gpt-4o-mini",))
    assert info.value.status_code == 403


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=6))
def test_any_other_param_passes_through_verbatim(params):
    params = {k: v for k, v in params.items() if k not in ("messages", "model", "model_name", "stream")}
    payload = build({"prompt": "x", "generate_params": params})
    for key, value in params.items():
        assert payload[key] == value


def test_answer_text():
    assert answer_text({"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert answer_text({"choices": [{"message": {"content": None, "tool_calls": []}}]}) is None
    assert answer_text({"choices": []}) is None
    assert answer_text({}) is None
