"""Demo mode and the built-in fake OpenAI.

The Responses API through /v1/* with the official SDK, the demo process
listening on loopback unless HOST is set, and the fake's bounded memory.
"""

import http.client
import time

import openai
import pytest

from chat_gpt_proxy.fake_openai.app import FakeOpenAI
from chat_gpt_proxy.fake_openai.behaviours import KEPT_REQUESTS, MAX_KEPT_BODY, Behaviour
from tests.conftest import ACCESS_TOKEN, OPENAI_KEY
from tests.procs import ServerProcess

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def sdk(base_url, cls=openai.OpenAI):
    return cls(
        base_url=base_url + "/v1",
        api_key=OPENAI_KEY,
        default_headers={"access-token": ACCESS_TOKEN},
        max_retries=0,
        timeout=20,
    )


@pytest.mark.gen_test
async def test_sdk_responses_api_json(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            plain = client.responses.create(model="gpt-4o-mini", input="Привет, мир")
            items = client.responses.create(
                model="gpt-4o-mini",
                instructions="Be brief.",
                input=[{"role": "user", "content": [{"type": "input_text", "text": "list input"}]}],
            )
            return plain, items

    plain, items = await proxy.in_thread(run)
    assert plain.output_text == "Echo: Привет, мир" and plain.status == "completed"
    assert plain.id.startswith("resp_") and plain.model == "gpt-4o-mini"
    assert plain.usage.output_tokens == 3 and plain.usage.total_tokens == 12
    assert plain._request_id.startswith("req_fake_")
    assert items.output_text == "Echo: list input" and items.instructions == "Be brief."
    assert [r.path for r in fake_openai.received] == ["/v1/responses", "/v1/responses"]


@pytest.mark.gen_test
async def test_sdk_responses_api_stream(proxy, fake_openai, base_url):
    def run():
        with sdk(base_url) as client:
            events = list(client.responses.create(model="gpt-4o-mini", input="раз два три", stream=True))
            # The helper that rebuilds the response from the events checks their order and shapes.
            with client.responses.stream(model="gpt-4o-mini", input="four five") as stream:
                deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                final = stream.get_final_response()
            return events, deltas, final

    events, deltas, final = await proxy.in_thread(run)
    types = [e.type for e in events]
    assert [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Echo: раз два три "
    completed = events[-1].response
    assert completed.status == "completed" and completed.output_text == "Echo: раз два три "
    assert completed.usage.total_tokens == 9 + 4
    assert deltas == ["Echo: ", "four ", "five "] and final.output_text == "Echo: four five "


@pytest.mark.gen_test
async def test_async_sdk_responses_stream_is_live(proxy, fake_openai, base_url):
    fake_openai.push(Behaviour(chunks=["a ", "b ", "c "], delay=0.3))
    client = sdk(base_url, openai.AsyncOpenAI)
    try:
        arrivals = []
        stream = await client.responses.create(model="gpt-4o-mini", input="x", stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                arrivals.append(time.monotonic())
    finally:
        await client.close()
    assert len(arrivals) == 3 and arrivals[2] - arrivals[0] > 0.3


@pytest.mark.gen_test
async def test_fake_keeps_a_bounded_record_of_requests(io_loop):
    fake = FakeOpenAI(keep=5, max_body=1000)
    fake.start()
    try:
        big = b'{"model": "m", "input": "' + b"x" * 5_000_000 + b'"}'
        for index in range(12):
            conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
            body = big if index % 2 else b'{"model": "m", "input": "small %d"}' % index

            def post(conn=conn, body=body):
                conn.request("POST", "/v1/responses", body=body, headers={"Content-Type": "application/json"})
                return conn.getresponse().read()

            await io_loop.run_in_executor(None, post)
            conn.close()
        received = fake.received
        assert len(received) == 12 and received.dropped == 7 and len(list(received)) == 5
        assert all(len(r.body) <= 1000 for r in received)
        small = len(b'{"model": "m", "input": "small 8"}')
        assert [r.size for r in received] == [len(big), small, len(big), small + 1, len(big)]
        assert received[-2].json == {"model": "m", "input": "small 10"} and received[10] is received[-2]
        assert [r.size for r in received[9:]] == [len(big), small + 1, len(big)]
        with pytest.raises(IndexError):
            received[0]
    finally:
        await fake.stop()


def test_default_fake_bounds_hold_a_few_mib_at_most():
    assert KEPT_REQUESTS * MAX_KEPT_BODY <= 16 * 1024 * 1024
    fake = FakeOpenAI()
    assert fake.received.keep == KEPT_REQUESTS and fake.received.max_body == MAX_KEPT_BODY


def listening_addresses(port: int) -> set[str]:
    """The local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
ANY = "00000000"


@pytest.mark.parametrize("host,expected", [(None, LOOPBACK), ("0.0.0.0", ANY)])
@pytest.mark.gen_test(timeout=30)
async def test_demo_listens_on_loopback_unless_host_is_set(tmp_path, host, expected):
    server = ServerProcess({"DEMO_UPSTREAM": "true"}, str(tmp_path / "log"), host=host)
    try:
        await server.wait_ready()
        assert listening_addresses(server.port) == {expected}
    finally:
        server.stop()
