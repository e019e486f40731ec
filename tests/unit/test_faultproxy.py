"""The fault proxy itself (tests/support/faultproxy.py), on real loopback sockets.

Bytes arrive intact and in order through splits, latency and jitter; a stall holds bytes
(and the FIN) without closing; reset-after-N forwards N bytes then resets both peers; cut_all
resets every connection; the same seed gives the same split points.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from tests.support.faultproxy import FaultProxy, Faults, Link

pytestmark = pytest.mark.unit


class Echo:
    """A loopback target that echoes and keeps what it received per connection."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.ended: list[str] = []  # "eof" or "reset", per connection
        self.server: asyncio.Server | None = None

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            while chunk := await reader.read(65536):
                got += chunk
                writer.write(chunk)
                await writer.drain()
            self.ended.append("eof")
        except ConnectionError:
            self.ended.append("reset")
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    target = await Echo().start()
    yield target
    assert target.server is not None
    target.server.close()


async def until(predicate: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def read_n(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 30)


async def test_bytes_arrive_intact_and_in_order_through_splits_and_jitter(echo: Echo) -> None:
    faults = Faults(latency_ms=20, jitter_ms=15, split=True, split_max=700, split_gap_ms=0)
    proxy = await FaultProxy(("127.0.0.1", echo.port), faults, seed=3).start()
    data = random.Random(1).randbytes(200_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for start in range(0, len(data), 9_000):  # many chunks, each with its own jitter
        writer.write(data[start:start + 9_000])
        await writer.drain()
    back = await read_n(reader, len(data))
    assert bytes(echo.received[0]) == data  # client -> target
    assert back == data                     # target -> client
    link = proxy.links[0]
    assert len(link.up.cuts) > 200 and len(link.down.cuts) > 200  # really split
    writer.close()
    await until(lambda: link.closed.is_set())
    await proxy.close()


async def test_stall_holds_bytes_and_fin_until_resumed(echo: Echo) -> None:
    proxy = await FaultProxy(("127.0.0.1", echo.port), seed=1).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"hello")
    assert await read_n(reader, 5) == b"hello"
    link = proxy.links[0]
    link.stall()
    writer.write(b"held bytes")
    writer.write_eof()
    await until(lambda: link.held("up") == 10)
    with pytest.raises(TimeoutError):  # a stalled peer says nothing, and does not close
        await asyncio.wait_for(reader.read(1), 0.5)
    assert bytes(echo.received[0]) == b"hello" and not echo.ended and not link.closed.is_set()
    link.resume()
    assert await read_n(reader, 10) == b"held bytes"
    await until(lambda: echo.ended == ["eof"])
    assert bytes(echo.received[0]) == b"hellohold bytes".replace(b"hold", b"held")
    await proxy.close()


async def test_one_direction_stalled_forwards_the_other(echo: Echo) -> None:
    proxy = await FaultProxy(("127.0.0.1", echo.port), seed=1).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    assert await read_n(reader, 1) == b"x"
    link = proxy.links[0]
    link.stall("down")
    writer.write(b"abc")
    await until(lambda: bytes(echo.received[0]) == b"xabc")  # up still flows
    await until(lambda: link.held("down") == 3)               # the echo is held
    link.resume("down")
    assert await read_n(reader, 3) == b"abc"
    await proxy.close()


async def test_reset_after_n_bytes_forwards_n_then_resets_both_peers(echo: Echo) -> None:
    proxy = await FaultProxy(("127.0.0.1", echo.port), Faults(reset_after_bytes=100)).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a" * 1000)
    with pytest.raises(ConnectionResetError):
        while await asyncio.wait_for(reader.read(65536), 30):
            pass
    await until(lambda: echo.ended == ["reset"])
    assert bytes(echo.received[0]) == b"a" * 100
    assert proxy.links[0].was_reset and proxy.resets == 1
    await proxy.close()


async def test_reset_rate_resets_deterministically_by_seed(echo: Echo) -> None:
    """With reset_rate the chunk that resets a connection is the seed's choice."""
    counts = []
    for _ in range(2):
        proxy = await FaultProxy(("127.0.0.1", echo.port), Faults(reset_rate=0.2), seed=9).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = 0
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            while True:  # one chunk at a time, each echoed before the next
                writer.write(b"z")
                await read_n(reader, 1)
                sent += 1
        counts.append(sent)
        await proxy.close()
    assert counts[0] == counts[1]


async def test_cut_all_resets_every_connection(echo: Echo) -> None:
    proxy = await FaultProxy(("127.0.0.1", echo.port)).start()
    clients = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
    for reader, writer in clients:
        writer.write(b"p")
        assert await read_n(reader, 1) == b"p"
    assert proxy.cut_all() == 20
    for reader, _ in clients:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 30)
    await until(lambda: echo.ended == ["reset"] * 20)
    assert proxy.open_links == [] and proxy.resets == 20
    await proxy.close()


async def _cuts(echo: Echo, seed: int, data: bytes) -> tuple[list[int], bytes]:
    proxy = await FaultProxy(("127.0.0.1", echo.port),
                             Faults(split=True, split_max=50, split_gap_ms=0), seed=seed).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    # Written in different chunkings: the cuts depend on the seed and the offset only.
    step = 1000 + seed
    for start in range(0, len(data), step):
        writer.write(data[start:start + step])
        await writer.drain()
    back = await read_n(reader, len(data))
    link: Link = proxy.links[0]
    await proxy.close()
    return link.up.cuts, back


async def test_same_seed_same_split_points(echo: Echo) -> None:
    data = random.Random(2).randbytes(20_000)
    first, back1 = await _cuts(echo, 5, data)
    again, back2 = await _cuts(echo, 5, data)
    other, _ = await _cuts(echo, 6, data)
    assert back1 == back2 == data
    assert first == again and len(first) > 300
    assert first != other  # another seed cuts elsewhere


def test_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("10.0.0.1", 1883))
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("127.0.0.1", 1883), listen=("0.0.0.0", 0))


async def test_cli_proxies_with_latency_and_splits(echo: Echo) -> None:
    """``python -m tests.support.faultproxy`` as an operator runs it."""
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).parents[2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.faultproxy", "--listen", f"127.0.0.1:{port}",
        "--target", f"127.0.0.1:{echo.port}", "--latency-ms", "50", "--jitter-ms", "20",
        "--split", "--seed", "4", cwd=root, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        banner = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert banner.startswith(b"faultproxy 127.0.0.1:%d -> " % port), banner
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = random.Random(3).randbytes(5000)
        writer.write(data)
        assert await read_n(reader, len(data)) == data
        writer.close()
    finally:
        proc.terminate()
        await proc.wait()


async def test_latency_and_bandwidth_delay_and_change_while_traffic_flows(echo: Echo) -> None:
    """Lower bounds only (a sleep never ends early): 100 ms each way, then 20 kB/s."""
    loop = asyncio.get_running_loop()
    proxy = await FaultProxy(("127.0.0.1", echo.port), Faults(latency_ms=100)).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    start = loop.time()
    writer.write(b"ping")
    assert await read_n(reader, 4) == b"ping"
    assert loop.time() - start >= 0.2
    proxy.links[0].set_faults(Faults(bandwidth_bps=20_000))
    start = loop.time()
    writer.write(bytes(10_000))
    assert await read_n(reader, 10_000) == bytes(10_000)
    assert loop.time() - start >= 0.45  # 10 kB at 20 kB/s: the last 400 B slice at 0.48 s
    await proxy.close()
