"""chat_gpt_proxy/request/strict_json.py: what it accepts, refuses and writes, rule by rule.

The rules every JSON reader and writer of the proxy shares (RFC 8259, and
what the callers catch): NaN and Infinity refused both ways, numbers that
overflow a double refused, big integers kept exact, the last duplicate key
wins, lone surrogates written escaped, compact UTF-8 out. Written for the
orjson trial (not adopted: bench/results/hot-path.md), which had
to keep every one of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import pytest

from chat_gpt_proxy.request import strict_json


def typed(value):
    """``value`` with every type spelled out, so that 1 != 1.0, 0.0 != -0.0 and key order counts."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


# -- reading: the rules by name


@pytest.mark.parametrize("text", [b"[NaN]", b'{"t": Infinity}', b"-Infinity", b'{"a": [1, {"b": NaN}]}'])
def test_nan_and_infinity_are_refused(text):
    with pytest.raises(ValueError):
        strict_json.loads(text)
    with pytest.raises(ValueError):
        strict_json.loads(text.decode())


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1.8e308", b"1E309", b"-17976931348623159e292"])
def test_numbers_that_overflow_a_double_are_refused(number):
    with pytest.raises(ValueError):
        strict_json.loads(b'{"temperature": ' + number + b"}")


def test_the_largest_double_and_underflow_are_read():
    assert strict_json.loads(b"[1.7976931348623157e308, 1e-400, 5e-324, -0.0]") == [
        1.7976931348623157e308,
        0.0,
        5e-324,
        -0.0,
    ]
    assert math.copysign(1, strict_json.loads(b"-0.0")) == -1
    assert strict_json.loads(b"-0") == 0 and type(strict_json.loads(b"-0")) is int


@pytest.mark.parametrize(
    "number",
    [
        123456789012345678901234567890,
        -123456789012345678901234567890,
        2**64,
        2**64 - 1,
        -(2**63) - 1,
        -(2**63),
        10**30,
    ],
)
def test_integers_beyond_64_bits_are_kept_exact(number):
    for text in (b'{"seed": %d}' % number, ("[%d]" % number).encode()):
        parsed = strict_json.loads(text)
        value = parsed["seed"] if isinstance(parsed, dict) else parsed[0]
        assert type(value) is int and value == number


def test_an_integer_too_long_for_python_is_refused_as_before():
    # Python refuses int() of more than 4300 digits (a ValueError).
    with pytest.raises(ValueError):
        strict_json.loads(b"[" + b"7" * 5000 + b"]")


def test_the_last_duplicate_key_wins_in_the_first_ones_place():
    parsed = strict_json.loads(b'{"model": "a", "n": 1, "model": "b"}')
    assert parsed == {"model": "b", "n": 1}
    assert list(parsed) == ["model", "n"]


def test_an_object_pairs_hook_sees_every_pair():
    seen = []

    def hook(pairs):
        seen.append(pairs)
        return dict(pairs)

    for text in (
        b'{"model": "a", "x": {"model": "b"}, "model": "c"}',
        '{"model": "a", "x": {"model": "b"}, "model": "c"}',
    ):
        seen.clear()
        assert strict_json.loads(text, object_pairs_hook=hook) == {"model": "c", "x": {"model": "b"}}
        assert seen == [[("model", "b")], [("model", "a"), ("x", {"model": "b"}), ("model", "c")]]


def test_an_object_pairs_hook_can_refuse():
    class Refused(ValueError):
        pass

    def hook(pairs):
        raise Refused

    with pytest.raises(Refused):
        strict_json.loads(b'{"a": 1}', object_pairs_hook=hook)


def test_lone_surrogates_are_read_as_json_reads_them():
    assert strict_json.loads(b'["\\ud800", "x\\udc00y", "\\ud83d\\ude00"]') == ["\ud800", "x\udc00y", "\U0001f600"]


def test_errors_are_the_ones_callers_catch():
    with pytest.raises(json.JSONDecodeError):
        strict_json.loads(b'{"a": ')
    with pytest.raises(json.JSONDecodeError):
        strict_json.loads(b"")
    with pytest.raises(ValueError):
        strict_json.loads(b'{"a": "\xff"}')  # not UTF-8
    with pytest.raises(RecursionError):
        strict_json.loads(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(TypeError):
        strict_json.loads(memoryview(b"{}"))


@pytest.mark.parametrize("depth", [10, 253, 254, 255, 256, 300, 600])
def test_deep_nesting_within_pythons_limit_is_read(depth):
    assert strict_json.loads(b"[" * depth + b"1" + b"]" * depth) is not None
    value = strict_json.loads(b'{"a":' * depth + b"1" + b"}" * depth)
    for _ in range(depth):
        value = value["a"]
    assert value == 1


@pytest.mark.parametrize("depth", [1000, 1020, 1024, 1025])
def test_nesting_beyond_pythons_limit_is_refused_as_before(depth):
    with pytest.raises(RecursionError):
        strict_json.loads(b"[" * depth + b"]" * depth)


# -- writing: the rules by name


def test_output_is_compact_utf8_without_escapes():
    out = strict_json.dumps({"prompt": "Привет", "generate_params": {"model_name": "gpt-4o-mini"}, "n": [1, 2.5]})
    assert out == '{"prompt":"Привет","generate_params":{"model_name":"gpt-4o-mini"},"n":[1,2.5]}'.encode()
    assert type(out) is bytes


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -math.inf,
        [1.0, math.nan],
        {"temperature": math.inf},
        {"a": [{"b": -math.inf}]},
        {"a": None, "b": math.nan},
    ],
)
def test_nan_and_infinity_are_refused_on_output(value):
    with pytest.raises(ValueError, match="not JSON compliant"):
        strict_json.dumps(value)


def test_lone_surrogates_are_written_escaped_in_ascii():
    value = {"s": "a\ud800b", "t": "Привет", "u": "\udfff"}
    out = strict_json.dumps(value)
    assert out == b'{"s":"a\\ud800b","t":"\\u041f\\u0440\\u0438\\u0432\\u0435\\u0442","u":"\\udfff"}'
    assert json.loads(out) == value


@pytest.mark.parametrize(
    "number", [123456789012345678901234567890, -(10**40), 2**64, 2**64 - 1, -(2**63) - 1, -(2**63)]
)
def test_integers_beyond_64_bits_are_written_exact(number):
    assert strict_json.dumps({"seed": number}) == b'{"seed":%d}' % number


def test_keys_that_are_not_strings_are_written_as_before():
    value = {1: "a", 1.5: "b", False: "c", None: "d", "e": {2: [3]}}
    assert strict_json.dumps(value) == b'{"1":"a","1.5":"b","false":"c","null":"d","e":{"2":[3]}}'


@dataclasses.dataclass
class Point:
    x: int = 1


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        b"bytes",
        object(),
        datetime.date(2020, 1, 1),
        Point(),
        {"a": [datetime.datetime(2020, 1, 1)], "b": None},
    ],
    ids=repr,
)
def test_what_is_not_json_is_refused_as_before(value):
    with pytest.raises(TypeError):
        strict_json.dumps(value)


def test_a_circular_value_is_refused_as_before():
    value = []
    value.append(value)
    with pytest.raises(ValueError, match="Circular reference"):
        strict_json.dumps(value)


FLOATS = [0.1, 0.30000000000000004, 1e16, 1e15, 1e-4, 1e-5, 1e-7, 1.2e-9, 1e22, 1.5e300, 5e-324, 1.7976931348623157e308]


@pytest.mark.parametrize("value", FLOATS + [-x for x in FLOATS] + [-0.0, 100.0, 1234567.0])
def test_floats_keep_their_value(value):
    out = strict_json.dumps({"x": value})
    assert typed(json.loads(out)) == typed({"x": value})  # the same double, -0.0 included
