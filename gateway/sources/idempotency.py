"""Idempotency-Key: a retried request gets the first answer instead of a second produce.

A mobile app on a flaky network often cannot tell whether its POST arrived.
With an ``Idempotency-Key`` header it may simply retry: within the window the
same (caller, key) gets the stored answer, and a retry that arrives while the
first is still being produced waits for that first answer.

Rules, chosen so a retry never hides a failure the client could fix by retrying:
- only final answers are replayed.  An answer that says "retry" (408, 429, 5xx)
  is not; neither is a batch or REST Proxy answer in which some records failed
  retriably (a 207 with a 503 record, an ``error_code`` 2).  For those, the
  records whose outcome is final (taken, or refused for good) are remembered,
  and the retry produces only the others: nothing taken is produced twice, and
  nothing refused for a passing reason is refused forever;
- the same key with a different request (method, path, body) is refused (422),
  as Stripe does, instead of answering for a request that was not made;
- memory is bounded by entry count and stored bytes; the oldest go first.  The
  bytes are what an entry really holds: its key, the caller's scope (a client id
  may be 8 KB), the answer and its per-record results, and a fixed overhead per
  entry for the objects around them (``ENTRY_OVERHEAD``).  Keys longer than
  ``limits.idempotency_max_key_bytes`` never get here (400, ``http_server``).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

from gateway.sources.http_common import IdempotencyKeyReused

# (caller scope, idempotency key).  The caller scope is http_auth.Caller.scope: the
# verified identity (with its X-Client-Id), or the source address of an anonymous
# client; never a header alone, so no one replays another's stored answers.
Scope = tuple[Hashable, str]

# Bytes one kept entry holds besides its strings, body and results, measured once
# with tracemalloc on CPython 3.11 (20,000 entries through ``run``, 8-byte keys,
# anonymous scopes): 918 bytes per entry, of which 115 are the key and scope strings
# counted on their own (sys.getsizeof).  The rest: the OrderedDict slot, the
# (scope, key) tuple, _Entry, its Future, the fingerprint, Stored and its headers.
ENTRY_OVERHEAD = 832
# A per-record result (batch and REST Proxy answers) is a small dict holding what the
# answer body also says: measured 450 bytes beside its JSON for a batch result, 160 for
# a REST Proxy offset.  Charged as the body's bytes once more plus this per record.
RESULT_OVERHEAD = 512


def _strings(value: object) -> int:
    """Bytes held by the strings of a scope (nested tuples of str)."""
    if isinstance(value, str | bytes):
        return sys.getsizeof(value)
    if isinstance(value, tuple):
        return sys.getsizeof(value) + sum(_strings(v) for v in value)
    return 0


def entry_size(scope: Scope, stored: Stored) -> int:
    """What keeping ``stored`` under ``scope`` costs, in bytes."""
    return ENTRY_OVERHEAD + _strings(scope) + stored.size


class Stored:
    """A response as bytes, replayable any number of times.

    ``results`` is set by endpoints that answer per record: the final result of
    each record (reused by a retry), or None where the record must be produced
    again.
    """

    __slots__ = ("body", "headers", "results", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str],
                 results: list[object | None] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.results = results

    @property
    def size(self) -> int:
        """The answer's bytes: body, replayed headers, per-record results."""
        size = len(self.body) + sum(len(k) + len(v) for k, v in self.headers.items())
        if self.results:
            size += len(self.body) + RESULT_OVERHEAD * len(self.results)
        return size

    @property
    def final(self) -> bool:
        """True when a retry can only get this same answer."""
        if self.status >= 500 or self.status in (408, 429):
            return False
        return self.results is None or all(r is not None for r in self.results)

    @property
    def keep(self) -> bool:
        # A partial answer is kept for the records it settled; a retry produces the rest.
        return self.final or any(r is not None for r in self.results or ())


class _Entry:
    __slots__ = ("expires", "fingerprint", "future", "size")

    def __init__(self, fingerprint: bytes, expires: float) -> None:
        self.fingerprint = fingerprint
        self.expires = expires
        self.size = 0  # bytes charged to the cache while its answer is kept
        self.future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    digest = hashlib.sha256(method.encode() + b" " + path.encode() + b"\n")
    digest.update(body)
    return digest.digest()


class IdempotencyCache:
    def __init__(self, window_s: float, max_keys: int = 100_000,
                 max_bytes: int = 64 << 20) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Scope, _Entry] = OrderedDict()
        self._bytes = 0
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes held by kept answers (see ENTRY_OVERHEAD), at most ``max_bytes``."""
        return self._bytes

    async def run(self, scope: Scope, print_: bytes,
                  produce: Callable[[Stored | None], Awaitable[Stored]]) -> Stored:
        """The stored answer for ``scope``, or ``produce()``'s, which is then stored.

        ``produce`` gets the earlier, not final answer (None on a first attempt),
        whose settled records it must not produce again.
        """
        while True:
            self._expire(time.monotonic())
            entry = self._entries.get(scope)
            if entry is None:
                return await self._first(scope, print_, produce, None)
            if entry.fingerprint != print_:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used for a different request", key=scope[1])
            if entry.future.done() and not entry.future.cancelled():
                earlier = entry.future.result()
                if not earlier.final:  # a retry after a passing failure: retry the rest
                    return await self._first(scope, print_, produce, earlier)
            try:
                stored = await asyncio.shield(entry.future)
            except asyncio.CancelledError:
                if not entry.future.cancelled():
                    raise  # we were cancelled ourselves
                continue  # the first attempt died without an answer: try again
            self.replayed += 1
            return stored

    async def _first(self, scope: Scope, print_: bytes,
                     produce: Callable[[Stored | None], Awaitable[Stored]],
                     earlier: Stored | None) -> Stored:
        old = self._entries.get(scope)
        if old is not None:
            self._drop(scope, old)
        entry = _Entry(print_, time.monotonic() + self.window_s)
        self._entries[scope] = entry
        try:
            stored = await produce(earlier)
        except BaseException:
            self._drop(scope, entry)
            entry.future.cancel()  # waiters retry as the first attempt
            if earlier is not None and earlier.keep:
                self._put_back(scope, print_, earlier)
            raise
        if (earlier is not None and earlier.results is not None and stored.results is None
                and not stored.final):
            # Refused as a whole this time (busy): what the earlier attempt settled stays.
            stored.results = earlier.results
        entry.future.set_result(stored)
        if stored.keep:
            self._charge(scope, entry, stored)
            self._evict()
        else:
            self._drop(scope, entry)
        return stored

    def _charge(self, scope: Scope, entry: _Entry, stored: Stored) -> None:
        entry.size = entry_size(scope, stored)
        self._bytes += entry.size

    def _put_back(self, scope: Scope, print_: bytes, stored: Stored) -> None:
        entry = _Entry(print_, time.monotonic() + self.window_s)
        entry.future.set_result(stored)
        self._entries[scope] = entry
        self._charge(scope, entry, stored)
        self._evict()

    def _drop(self, scope: Scope, entry: _Entry) -> None:
        if self._entries.get(scope) is entry:
            del self._entries[scope]
            self._bytes -= entry.size
            entry.size = 0

    def _expire(self, now: float) -> None:
        # Entries are in arrival order with the same window, so expiry is FIFO.
        while self._entries:
            scope, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            if not entry.future.done():
                return  # an answer still on its way keeps its place
            self._drop(scope, entry)

    def _evict(self) -> None:
        keys = len(self._entries) - self.max_keys
        extra = self._bytes - self.max_bytes
        if keys <= 0 and extra <= 0:
            return
        victims = []
        for scope, entry in self._entries.items():  # oldest first; stops when enough
            if keys <= 0 and extra <= 0:
                break
            # A request in progress is never forgotten; those are bounded by concurrency.
            if entry.future.done():
                victims.append((scope, entry))
                keys -= 1
                extra -= entry.size
        for scope, entry in victims:
            self._drop(scope, entry)
