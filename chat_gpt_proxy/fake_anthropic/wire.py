"""Anthropic's wire shapes as the fake writes them: messages, stream events, errors, models, token counts.

Field by field as the Messages API documents them and its SDKs parse them
(anthropic/types/message.py, raw_message_stream_event.py, usage.py).
"""

from __future__ import annotations

import json
import uuid

from chat_gpt_proxy.fake_openai.wire import to_json

# The versions the fake takes in ``anthropic-version``: Node's SDK and Claude
# Code send 2023-06-01, the Python SDK 2026-10-21; 2023-01-01 is the first one.
KNOWN_VERSIONS = frozenset(("2023-01-01", "2023-06-01", "2026-10-21"))

# What each error type's status is (Anthropic's "Errors" page).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# GET /v1/models: newest first, as Anthropic lists them.
MODELS = (
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
)

# An alias names the latest snapshot; the answer's ``model`` is the snapshot that ran.
ALIASES = {
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}


def error_body(error_type: str, message: str, request_id: str) -> dict:
    """``{"type":"error","error":{"type","message"},"request_id"}``, as every error answer."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def sse(event: str, data: dict) -> bytes:
    """One event as Anthropic writes it: an ``event:`` line naming the type, then its ``data:``."""
    return b"event: " + event.encode() + b"\ndata: " + to_json(data) + b"\n\n"


# Anthropic's keep-alive: a named event with a body of its own (note the space).
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def block_text(content) -> str:
    """The text of a message's ``content``: a string, or blocks (text; a tool_result's content)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append("tool_result " + block_text(block.get("content")))
    return " ".join(parts)


def echo_text(body: dict) -> str:
    """``Echo: `` and the last user turn's text (a tool result's, after a tool call)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return "Echo: " + (block_text(message.get("content")) or "(no text)")
    return "Echo: (no user message)"


def count_input_tokens(body: dict) -> int:
    """A stand-in for the tokenizer: about four bytes of system, messages and tools per token."""
    counted = {key: body.get(key) for key in ("system", "messages", "tools") if key in body}
    return max(1, len(json.dumps(counted, separators=(",", ":"))) // 4)


def usage(input_tokens: int, output_tokens: int, cache_creation: int, cache_read: int) -> dict:
    """A ``usage`` object: ``input_tokens`` counts only the input read neither from nor into the cache."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": cache_creation, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message(mid: str, model: str, content: list, stop_reason: str | None, usage_: dict) -> dict:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage_,
    }


def model_object(model_id: str, name: str, created: str) -> dict:
    return {"type": "model", "id": model_id, "display_name": name, "created_at": created}


def model_page(limit: int, after_id: str | None, before_id: str | None) -> dict:
    """GET /v1/models: a page of ``limit`` models after ``after_id`` (or before ``before_id``)."""
    ids = [m[0] for m in MODELS]
    start, stop = 0, len(ids)
    if after_id in ids:
        start = ids.index(after_id) + 1
    if before_id in ids:
        stop = ids.index(before_id)
        start = max(start, stop - limit)
    chosen = MODELS[start:stop][:limit]
    data = [model_object(*m) for m in chosen]
    return {
        "data": data,
        "has_more": start + len(chosen) < stop,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
