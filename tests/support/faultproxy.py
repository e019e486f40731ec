"""A fault-injecting TCP proxy for rehearsing bad networks on loopback (docs/faultproxy.md).

    proxy = FaultProxy(target=("127.0.0.1", 1883), faults=Faults(latency_ms=200, jitter_ms=100,
                       split=True, reset_rate=0.01), seed=7)
    await proxy.start()                  # listens on 127.0.0.1:<proxy.port>
    link = proxy.links[-1]               # one Link per accepted connection, in accept order
    link.stall()                         # a half-open peer: nothing forwarded, nothing closed
    link.reset()                         # RST both ways (SO_LINGER 0)
    proxy.cut_all()                      # a cell going away: every connection reset at once
    await proxy.close()

Per connection and per direction ("up": client to target, "down": target to client) a
pump reads chunks and a writer forwards them:

- latency/jitter: each chunk is due at ``now + latency +- jitter``, never before the
  chunk read before it (order is kept per direction, as TCP keeps it);
- split: the byte stream is cut at offsets drawn from the direction's own random
  generator (pieces of 1..split_max bytes), each piece written on its own with
  ``split_gap_ms`` between pieces: where the cuts fall depends only on the seed and the
  byte offset, not on how the kernel handed the bytes over;
- bandwidth: at most ``bandwidth_bps`` bytes per second per direction;
- stall: forwarding stops (bytes and the peer's FIN are held, nothing is closed);
  ``resume`` forwards what was held;
- reset: ``reset_rate`` is the chance per chunk read (either direction) that the
  connection is reset instead of forwarding it; ``reset_after_bytes`` resets once that
  many bytes (both directions together) went through. A reset sets SO_LINGER 0 on both
  sockets and aborts them: both peers get an RST, what the proxy held is dropped.

Every random choice of connection ``n`` comes from ``random.Random(f"{seed}/{n}/...")``:
the same seed gives the same split points and the same reset decisions for the same bytes.
Loopback only: ``listen`` and ``target`` must be loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass, field

_READ = 65536
_EOF = b""


@dataclass(frozen=True)
class Faults:
    """What to do to each connection (a proxy's default; ``Link.faults`` may differ)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    split: bool = False
    split_max: int = 64          # largest piece when splitting
    split_gap_ms: float = 1.0    # pause between the pieces of one chunk
    bandwidth_bps: float = 0.0   # bytes per second per direction; 0 = unlimited
    reset_rate: float = 0.0      # chance per chunk read that the connection is reset
    reset_after_bytes: int = 0   # reset once this many bytes went through; 0 = never


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Direction:
    name: str
    rng: random.Random
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    due_last: float = 0.0
    offset: int = 0          # bytes forwarded so far
    next_cut: int = 0        # stream offset of the next split point
    cuts: list[int] = field(default_factory=list)  # split points drawn (stream offsets)
    held: int = 0            # bytes read and not yet forwarded
    eof: bool = False        # the source closed (held as a sentinel until forwarded)
    free_at: float = 0.0     # bandwidth: when the next byte may go


class Link:
    """One proxied connection: client <-> proxy <-> target."""

    def __init__(self, proxy: FaultProxy, index: int, faults: Faults,
                 client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.index = index
        self.faults = faults
        self.client_reader, self.client_writer = client
        peer = self.client_writer.get_extra_info("peername")
        self.client_port: int = peer[1] if peer else 0
        self.upstream_writer: asyncio.StreamWriter | None = None
        seed = proxy.seed
        self.rng = random.Random(f"{seed}/{index}/reset")
        self.up = _Direction("up", random.Random(f"{seed}/{index}/up"))
        self.down = _Direction("down", random.Random(f"{seed}/{index}/down"))
        self._stalled = {"up": False, "down": False}
        self.transferred = 0     # bytes forwarded, both directions
        self.was_reset = False
        self.closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- controls ------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return self._stalled["up"] and self._stalled["down"]

    def stall(self, direction: str = "both") -> None:
        """Stop forwarding (``up``, ``down`` or both) without closing anything."""
        for name in ("up", "down") if direction == "both" else (direction,):
            self._stalled[name] = True

    def resume(self, direction: str = "both") -> None:
        """Forward again, what was held first."""
        for name in ("up", "down") if direction == "both" else (direction,):
            self._stalled[name] = False
            self._dir(name).wake.set()

    def set_faults(self, faults: Faults) -> None:
        """Change this connection's faults while traffic flows (from the next chunk on)."""
        self.faults = faults

    def held(self, direction: str) -> int:
        """Bytes read from one side and not yet forwarded to the other."""
        return self._dir(direction).held

    def reset(self) -> None:
        """RST to both peers now; whatever the proxy held is dropped."""
        if self.closed.is_set():
            return
        self.was_reset = True
        self.proxy.resets += 1
        for writer in (self.client_writer, self.upstream_writer):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._finish()

    def close(self) -> None:
        """An orderly close (FIN) of both sides."""
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.close()
        self._finish()

    # --- the pumps -----------------------------------------------------------------------

    def _dir(self, name: str) -> _Direction:
        return self.up if name == "up" else self.down

    def _finish(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.proxy._links_open.discard(self)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def run(self) -> None:
        host, port = self.proxy.target
        try:
            up_reader, self.upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            self.client_writer.transport.abort()
            self._finish()
            return
        for writer in (self.client_writer, self.upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tasks = [
            asyncio.ensure_future(self._read(self.client_reader, self.up)),
            asyncio.ensure_future(self._write(self.up, self.upstream_writer)),
            asyncio.ensure_future(self._read(up_reader, self.down)),
            asyncio.ensure_future(self._write(self.down, self.client_writer)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await self.closed.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader, d: _Direction) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    chunk = await reader.read(_READ)
                except OSError:
                    chunk = _EOF
                f = self.faults  # read per chunk: set_faults applies while traffic flows
                if chunk and f.reset_rate and self.rng.random() < f.reset_rate:
                    self.reset()
                    return
                delay = f.latency_ms
                if f.jitter_ms:
                    delay += d.rng.uniform(-f.jitter_ms, f.jitter_ms)
                due = max(loop.time() + max(delay, 0.0) / 1000.0, d.due_last)
                d.due_last = due
                d.queue.append((due, chunk))
                d.held += len(chunk)
                d.wake.set()
                if not chunk:
                    return
        except asyncio.CancelledError:
            pass

    async def _write(self, d: _Direction, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not d.queue or self._stalled[d.name]:
                    d.wake.clear()
                    await d.wake.wait()
                due, chunk = d.queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # stalled meanwhile?
                d.queue.popleft()
                if not chunk:  # the source closed: pass the FIN on
                    d.eof = True
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    if self.up.eof and self.down.eof:
                        self.close()
                    return
                await self._forward(d, writer, chunk)
        except (asyncio.CancelledError, ConnectionError, OSError):
            if not self.closed.is_set():
                self.reset()

    async def _forward(self, d: _Direction, writer: asyncio.StreamWriter, chunk: bytes) -> None:
        f = self.faults
        limit = f.reset_after_bytes
        if limit and self.transferred + len(chunk) >= limit:
            chunk = chunk[:limit - self.transferred]
            if chunk:
                writer.write(chunk)
                await writer.drain()
                self.transferred += len(chunk)
                d.offset += len(chunk)
            self.reset()
            return
        pieces = [chunk]
        if f.split:
            pieces = []
            start = 0
            while start < len(chunk):
                if d.next_cut <= d.offset + start:
                    d.next_cut = d.offset + start + d.rng.randint(1, max(1, f.split_max))
                    d.cuts.append(d.next_cut)
                end = min(len(chunk), d.next_cut - d.offset)
                pieces.append(chunk[start:end])
                start = end
        if f.bandwidth_bps:  # slices of 20 ms at the rate, each sent when the link is free
            size = max(1, int(f.bandwidth_bps / 50))
            pieces = [piece[i:i + size] for piece in pieces for i in range(0, len(piece), size)]
        loop = asyncio.get_running_loop()
        for n, piece in enumerate(pieces):
            if n and f.split_gap_ms and f.split:
                await asyncio.sleep(f.split_gap_ms / 1000.0)
            if f.bandwidth_bps:
                wait = d.free_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                d.free_at = max(d.free_at, loop.time()) + len(piece) / f.bandwidth_bps
            writer.write(piece)
            await writer.drain()
            d.offset += len(piece)
            d.held -= len(piece)
            self.transferred += len(piece)


class FaultProxy:
    """Listens on loopback and proxies every accepted connection to ``target``."""

    def __init__(self, target: tuple[str, int], faults: Faults | None = None, seed: int = 0,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        for host in (target[0], listen[0]):
            if not _is_loopback(host):
                raise ValueError(f"{host}: the fault proxy is for loopback only")
        self.target = target
        self.listen = listen
        self.faults = faults or Faults()
        self.seed = seed
        self.links: list[Link] = []
        self._links_open: set[Link] = set()
        self.resets = 0  # links reset (at random, after N bytes, by reset() or cut_all())
        self._server: asyncio.Server | None = None
        self._runs: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_links(self) -> list[Link]:
        return [link for link in self.links if not link.closed.is_set()]

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen, backlog=4096)
        return self

    def link_for(self, client_port: int) -> Link | None:
        """The link of the client whose local port is ``client_port``."""
        for link in reversed(self.links):
            if link.client_port == client_port:
                return link
        return None

    def set_faults(self, faults: Faults) -> None:
        """The faults of connections accepted from now on (open ones keep theirs)."""
        self.faults = faults

    def cut_all(self) -> int:
        """Reset every open connection at once (a cell going away); how many were cut."""
        links = list(self._links_open)
        for link in links:
            link.reset()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self, len(self.links), self.faults, (reader, writer))
        self.links.append(link)
        self._links_open.add(link)
        task = asyncio.current_task()
        assert task is not None
        self._runs.add(task)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # close(): asyncio's stream callback must not see a cancelled task
        finally:
            self._runs.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut_all()
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.faultproxy",
        description="A fault-injecting TCP proxy (loopback only); see docs/faultproxy.md.")
    ap.add_argument("--listen", type=_address, default=("127.0.0.1", 18830))
    ap.add_argument("--target", type=_address, default=("127.0.0.1", 1883))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--split", action="store_true", help="split writes at random boundaries")
    ap.add_argument("--split-max", type=int, default=64)
    ap.add_argument("--split-gap-ms", type=float, default=1.0)
    ap.add_argument("--bandwidth-bps", type=float, default=0.0)
    ap.add_argument("--reset-rate", type=float, default=0.0,
                    help="chance per chunk read that the connection is reset")
    ap.add_argument("--reset-after-bytes", type=int, default=0)
    ap.add_argument("--cut-every-s", type=float, default=0.0,
                    help="reset every open connection at this interval (cell handover)")
    ap.add_argument("--stall-after-s", type=float, default=0.0,
                    help="stall each connection this long after it opened (half-open peer)")
    return ap.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    faults = Faults(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, split=args.split,
                    split_max=args.split_max, split_gap_ms=args.split_gap_ms,
                    bandwidth_bps=args.bandwidth_bps, reset_rate=args.reset_rate,
                    reset_after_bytes=args.reset_after_bytes)
    proxy = await FaultProxy(args.target, faults, args.seed, args.listen).start()
    print(f"faultproxy {args.listen[0]}:{proxy.port} -> {args.target[0]}:{args.target[1]} "
          f"seed={args.seed} {faults}", flush=True)
    loop = asyncio.get_running_loop()
    seen = 0
    try:
        next_cut = loop.time() + args.cut_every_s
        while True:
            await asyncio.sleep(0.1)
            if args.stall_after_s:
                for link in proxy.links[seen:]:
                    loop.call_later(args.stall_after_s, link.stall)
                seen = len(proxy.links)
            if args.cut_every_s and loop.time() >= next_cut:
                cut = proxy.cut_all()
                print(f"cut {cut} connections", flush=True)
                next_cut = loop.time() + args.cut_every_s
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


__all__ = ["FaultProxy", "Faults", "Link", "main"]

if __name__ == "__main__":
    sys.exit(main())
