"""HTTP bounds against a real ``lastmile serve`` and a real broker (issue 13, HTTP side).

Slow request heads, too many connections, too many bodies at once, idle
keep-alive connections and long Idempotency-Keys: each driven past its limit
with raw sockets, while a well-behaved client keeps publishing and every 200 it
got is in Kafka.  Levels are read from the gateway's own /metrics, never RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import Broker
from tests.integration.http_support import Gateway, http_gateway, tenant

pytestmark = pytest.mark.integration

HEAD_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40
BUDGET = 256 << 10
MAX_BODY = 128 << 10
BODY = 100 << 10  # two fit in the budget, a third does not


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("http-bounds"), broker.bootstrap,
                      limits__http_header_timeout_s=HEAD_TIMEOUT_S,
                      limits__http_keepalive_timeout_s=2.0,
                      limits__http_max_inflight_body_bytes=BUDGET,
                      limits__http_max_body_bytes=MAX_BODY,
                      limits__http_body_timeout_s=3.0,
                      log__level="debug") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gw_conns(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    """Default head timeout (30 s): held connections stay open for the whole test."""
    with http_gateway(tmp_path_factory.mktemp("http-conns"), broker.bootstrap,
                      limits__http_max_connections=MAX_CONNECTIONS,
                      log__level="debug") as gateway:
        yield gateway


# --- helpers ------------------------------------------------------------------------


async def metrics(gw: Gateway) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{gw.ports['metrics']}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("lastmile_http"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def refused(reason: str) -> str:
    return f'lastmile_http_refused_total{{reason="{reason}"}}'


def state(name: str) -> str:
    return f"lastmile_http_{name}"


async def until(check: Callable[[], Awaitable[object]], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something true (the metrics pump ticks once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def metric_at_least(gw: Gateway, name: str, value: float, timeout: float = 30) -> float:
    async def check() -> float | None:
        got = (await metrics(gw)).get(name, 0.0)
        return got if got >= value else None

    return float(await until(check, timeout, f"{name} >= {value}"))  # type: ignore[arg-type]


async def metric_equals(gw: Gateway, name: str, value: float, timeout: float = 30) -> None:
    async def check() -> bool:
        return (await metrics(gw)).get(name) == value

    await until(check, timeout, f"{name} == {value}")


async def open_raw(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.ports["http"])


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes (b"" if closed without an answer)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def json_of(answer: bytes) -> dict[str, object]:
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert isinstance(body, dict)
    return body


class GoodClient:
    """Publishes one message after another on a kept-alive session; keeps every 200."""

    def __init__(self, gw: Gateway) -> None:
        self.url = f"{gw.url}/v1/publish/in/{tenant()}/good"
        self.topic = "t.http." + self.url.split("/in/")[1].split("/")[0]
        self.taken: list[bytes] = []
        self.other: list[int] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not self._stop.is_set():
                payload = f"good-{n}".encode()
                n += 1
                async with session.post(self.url, data=payload) as resp:
                    await resp.read()
                    (self.taken.append(payload) if resp.status == 200
                     else self.other.append(resp.status))
                await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()

    def check_in_kafka(self, broker: Broker) -> None:
        assert self.taken, "the well-behaved client got no 200 at all"
        assert not self.other, f"the well-behaved client was refused: {self.other}"
        got = {r.value() for r in broker.read(self.topic, len(self.taken), timeout=60)}
        assert set(self.taken) <= got


# --- request heads --------------------------------------------------------------------


async def test_slow_heads_are_answered_408_while_a_good_client_publishes(
        gw: Gateway, broker: Broker) -> None:
    good = GoodClient(gw)
    runner = asyncio.create_task(good.run())
    slow = [await open_raw(gw) for _ in range(30)]
    started = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # A head that never ends: a byte of a header every 100 ms (slowloris).
        writer.write(b"POST /v1/publish/in/slow/x HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(600):
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.1)

    trickles = [asyncio.create_task(trickle(w)) for _, w in slow]
    answers = await asyncio.gather(*(read_answer(r, 60) for r, _ in slow))
    elapsed = time.monotonic() - started
    for task in trickles:
        task.cancel()
    good.stop()
    await runner
    # Every slow head was closed, well before aiohttp's own hour; those that could
    # still read their answer got a 408 in the usual JSON shape.
    assert elapsed < 30, elapsed
    assert all(status_of(a) in (0, 408) for a in answers), answers
    timed_out = [a for a in answers if status_of(a) == 408]
    assert timed_out, "no slow client read its 408"
    assert json_of(timed_out[0])["error"] == "request_timeout"
    assert b"Connection: close" in timed_out[0]
    await metric_at_least(gw, refused("header_timeout"), len(slow))
    good.check_in_kafka(broker)


async def test_a_connection_that_sends_nothing_gets_408(gw: Gateway) -> None:
    reader, writer = await open_raw(gw)
    answer = await read_answer(reader, 30)
    writer.close()
    assert status_of(answer) == 408, answer


async def test_idle_keepalive_connection_is_closed(gw: Gateway) -> None:
    """After an answer, an idle connection waits for ``http_keepalive_timeout_s``, then
    closes without a word (nothing was asked); a head started later has its own clock."""
    before = (await metrics(gw)).get(refused("keepalive_timeout"), 0.0)
    reader, writer = await open_raw(gw)
    writer.write(b"POST /v1/publish/in/" + tenant().encode() + b"/ka HTTP/1.1\r\n"
                 b"Host: gw\r\nContent-Length: 2\r\n\r\nok")
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 200, head
    started = time.monotonic()
    rest = await read_answer(reader, 30)  # the 200's body, then EOF
    assert rest.startswith(b"{") and b"HTTP/1.1" not in rest, rest
    assert time.monotonic() - started > 1.5  # keep-alive's 2 s, not the 1 s head clock
    writer.close()
    await metric_at_least(gw, refused("keepalive_timeout"), before + 1)


# --- connections ------------------------------------------------------------------------


async def test_connections_over_the_limit_are_closed_at_once(
        gw_conns: Gateway, broker: Broker) -> None:
    gw = gw_conns
    before = (await metrics(gw)).get(refused("max_connections"), 0.0)
    # Connections that send nothing (within the 30 s head timeout for the whole test).
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    await metric_equals(gw, "lastmile_http_connections", 0)
    for _ in range(MAX_CONNECTIONS):
        held.append(await open_raw(gw))
    await metric_equals(gw, "lastmile_http_connections", MAX_CONNECTIONS)
    # One more: closed before a byte is read, no answer.
    reader, writer = await open_raw(gw)
    with contextlib.suppress(ConnectionError):
        writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert await read_answer(reader, 10) == b""
    writer.close()
    await metric_at_least(gw, refused("max_connections"), before + 1)
    # Once the others go, a well-behaved client is served again.
    for _, w in held:
        w.close()
    await metric_equals(gw, "lastmile_http_connections", 0)  # the gateway saw them go
    good = GoodClient(gw)
    runner = asyncio.create_task(good.run())
    await until(lambda: asyncio.sleep(0, len(good.taken) >= 5), 30, "five 200s")
    good.stop()
    await runner
    good.check_in_kafka(broker)


# --- bodies in flight --------------------------------------------------------------------


def body_head(t: str, length: int, key: str | None = None) -> bytes:
    extra = f"Idempotency-Key: {key}\r\n" if key else ""
    return (f"POST /v1/publish/in/{t}/big HTTP/1.1\r\nHost: gw\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()


async def test_bodies_over_the_budget_get_503_and_the_budget_comes_back(
        gw: Gateway, broker: Broker) -> None:
    t = tenant()
    await metric_equals(gw, state("inflight_body_bytes"), 0)
    before = (await metrics(gw)).get(refused("inflight_body_bytes"), 0.0)
    # Two slow uploads hold 2 x 100 KiB of the 256 KiB budget.
    uploads = [await open_raw(gw) for _ in range(2)]
    for _, w in uploads:
        w.write(body_head(t, BODY) + b"x" * 1000)
    await metric_equals(gw, state("inflight_body_bytes"), 2 * BODY)
    # A third would go over: 503 + Retry-After, answered from its head alone.
    reader, writer = await open_raw(gw)
    writer.write(body_head(t, BODY))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert status_of(head) == 503, head
    assert b"Retry-After: 1" in head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = json.loads(await reader.readexactly(length))
    assert body["error"] == "too_many_bodies_in_flight"
    writer.close()
    await metric_at_least(gw, refused("inflight_body_bytes"), before + 1)
    # A client that gives up mid-body and one that stalls past the body timeout give
    # their share back too.
    _, quitter = await open_raw(gw)
    quitter.write(body_head(t, 1000) + b"x" * 10)
    r2, staller = await open_raw(gw)
    staller.write(body_head(t, 1000) + b"x" * 10)
    # The two uploads finish: 200, in Kafka.
    for _, w in uploads:
        w.write(b"y" * (BODY - 1000))
    for r, _ in uploads:
        assert status_of(await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)) == 200
    quitter.close()
    assert status_of(await read_answer(r2, 30)) == 408  # http_body_timeout_s
    staller.close()
    for _, w in uploads:
        w.close()
    records = broker.read(f"t.http.{t}", 2)
    assert [len(r.value()) for r in records] == [BODY, BODY]
    await metric_equals(gw, state("inflight_body_bytes"), 0)


# --- Idempotency-Key -----------------------------------------------------------------------


async def test_long_idempotency_keys_are_refused_and_keys_are_counted(gw: Gateway) -> None:
    t = tenant()
    url = f"{gw.url}/v1/publish/in/{t}/idem"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"1", headers={"Idempotency-Key": "k" * 256}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "idempotency_key_too_long"
        before = (await metrics(gw)).get(state("idempotency_bytes"), 0.0)
        # The longest key is accepted, and counted with the entry (unit tests: scopes).
        async with session.post(url, data=b"1", headers={"Idempotency-Key": "k" * 255}) \
                as resp:
            assert resp.status == 200
    await metric_at_least(gw, state("idempotency_bytes"), before + 255 + 500)
    await metric_at_least(gw, refused("idempotency_key_too_long"), 1)


def test_config_rows_in_the_docs() -> None:
    root = Path(__file__).resolve().parents[2]
    readme, http_doc = (root / "README.md").read_text(), (root / "docs/http.md").read_text()
    for key in ("http_header_timeout_s", "http_keepalive_timeout_s", "http_max_connections",
                "http_max_inflight_body_bytes", "idempotency_max_key_bytes"):
        assert key in readme and f"limits.{key}" in http_doc, key
