"""OpenAI's wire shapes as the fake writes them: completions, chunks, Responses objects, errors."""

from __future__ import annotations

import json
import time
import uuid

from chat_gpt_proxy.fake_openai.behaviours import Behaviour


def to_json(obj, spaced: bool = False) -> bytes:
    """Compact JSON in UTF-8, as OpenAI writes it (escaped only where UTF-8 cannot hold a lone surrogate);
    ``spaced``: with ``json.dumps``'s default spaces, as some OpenAI-compatible Python servers write it."""
    separators = (", ", ": ") if spaced else (",", ":")
    try:
        return json.dumps(obj, ensure_ascii=False, separators=separators).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=separators).encode("ascii")


def completion(content: str, model: str) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_for(content),
    }


def usage_for(content: str) -> dict:
    completion_tokens = max(1, len(content.split()))
    return {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens}


def chunk(
    cid: str,
    model: str,
    delta: dict,
    finish_reason=None,
    usage=None,
    choices=True,
    with_usage=False,
    spaced=False,
    obfuscation=False,
) -> bytes:
    """One chat.completion.chunk event. As OpenAI does, a stream asked for its usage
    (``stream_options.include_usage``) carries ``"usage": null`` in every chunk but the last;
    ``obfuscation``: as OpenAI's streams do by default, each chunk ends with random characters
    (``stream_options.include_obfuscation``), after the usage."""
    obj = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else [],
    }
    if with_usage or usage is not None:
        obj["usage"] = usage
    if obfuscation:
        obj["obfuscation"] = uuid.uuid4().hex[: 4 + len(json.dumps(delta)) % 12]
    return b"data: " + to_json(obj, spaced) + b"\n\n"


def error_object(behaviour: Behaviour) -> dict:
    return {
        "error": {
            "message": behaviour.message,
            "type": behaviour.error_type,
            "param": None,
            "code": behaviour.error_code,
        }
    }


def echo_text(body: dict) -> str:
    messages = body.get("messages") or []
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return "Echo: " + (content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return "Echo: (no user message)"


def responses_input_text(body: dict) -> str:
    """The text of the last user input of a Responses API request (a string or input items)."""
    given = body.get("input")
    if isinstance(given, str):
        return given
    for item in reversed(given if isinstance(given, list) else []):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "(no user input)"


def responses_usage(text: str) -> dict:
    output = max(1, len(text.split()))
    return {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9 + output,
    }


def response_object(rid: str, body: dict, model: str, created_at: int, status: str, output: list, usage) -> dict:
    """A Responses API ``response`` object (openai/types/responses/response.py)."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def output_message(item_id: str, text: str, status: str) -> dict:
    parts = [output_text_part(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def realtime_event(type_: str, **fields) -> str:
    return json.dumps({"type": type_, "event_id": "event_" + uuid.uuid4().hex[:16], **fields}, separators=(",", ":"))
