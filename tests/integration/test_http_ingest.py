"""POST /v1/publish against a real gateway process and a real broker."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import Broker
from tests.integration.http_support import Gateway, http_gateway, tenant

pytestmark = pytest.mark.integration

MAX_BODY = 65_536


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("http-ingest"), broker.bootstrap,
                      limits__http_body_timeout_s=1.0,
                      limits__http_max_body_bytes=MAX_BODY) as gateway:
        yield gateway


async def post(url: str, data: bytes = b"x", **kwargs: object) -> tuple[int, dict[str, object],
                                                                       dict[str, str]]:
    async with aiohttp.ClientSession() as session, \
            session.post(url, data=data, **kwargs) as resp:  # type: ignore[arg-type]
        assert resp.content_type == "application/json"
        return resp.status, await resp.json(), dict(resp.headers)


async def test_publish_answers_200_with_where_it_went(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    status, body, _ = await post(f"{gw.url}/v1/publish/in/{t}/temp", b"21.5",
                                 headers={"X-Client-Id": "phone-1"})
    assert status == 200, body
    [delivery] = body["deliveries"]  # type: ignore[misc]
    assert delivery["topic"] == f"t.http.{t}"
    [record] = broker.read(f"t.http.{t}", 1)
    assert record.value() == b"21.5"
    assert record.key() == b"phone-1"  # the X-Client-Id is the identity rules see
    assert (record.partition(), record.offset()) == (delivery["partition"], delivery["offset"])


async def test_async_answers_202_then_lands(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    status, body, _ = await post(f"{gw.url}/v1/publish/in/{t}/a?async=true", b"later")
    assert (status, body) == (202, {"accepted": True})
    [record] = broker.read(f"t.http.{t}", 1)
    assert record.value() == b"later"


async def test_async_refusal_is_not_202(gw: Gateway) -> None:
    status, body, _ = await post(f"{gw.url}/v1/publish/closed/a?async=true")
    assert status == 422 and body["error"] == "rejected"


async def test_gzip_body_is_inflated(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    payload = b'{"reading": 1}' * 100
    status, _, _ = await post(f"{gw.url}/v1/publish/in/{t}/gz", gzip.compress(payload),
                              headers={"Content-Encoding": "gzip"})
    assert status == 200
    [record] = broker.read(f"t.http.{t}", 1)
    assert record.value() == payload


@pytest.mark.parametrize(("path", "payload", "status", "code"), [
    ("closed/door", b"x", 422, "rejected"),
    ("nowhere/at/all", b"x", 404, "no_matching_rule"),
    ("json/{t}/doc", b"not json", 400, "payload_invalid"),
    ("in/{t}/+", b"x", 400, "topic_invalid"),
])
async def test_refusals_carry_status_and_code(gw: Gateway, path: str, payload: bytes,
                                              status: int, code: str) -> None:
    got, body, _ = await post(f"{gw.url}/v1/publish/{path.format(t=tenant())}", payload)
    assert (got, body["error"]) == (status, code)
    assert isinstance(body["message"], str) and body["message"]


async def test_unknown_route_and_method_are_json(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/nothing/here") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
        async with session.get(f"{gw.url}/v1/publish/in/a") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
            assert "POST" in resp.headers["Allow"]


async def test_body_over_limit_is_413(gw: Gateway) -> None:
    big = b"x" * (MAX_BODY + 1)
    status, body, _ = await post(f"{gw.url}/v1/publish/in/{tenant()}/big", big)
    assert (status, body["error"]) == (413, "body_too_large")

    async def chunks() -> object:  # no Content-Length: the limit holds while reading
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    status, body, _ = await post(f"{gw.url}/v1/publish/in/{tenant()}/big", chunks())  # type: ignore[arg-type]
    assert (status, body["error"]) == (413, "body_too_large")
    # A gzip bomb is measured after inflating.
    bomb = gzip.compress(b"\0" * (MAX_BODY * 20))
    status, body, _ = await post(f"{gw.url}/v1/publish/in/{tenant()}/bomb", bomb,
                                 headers={"Content-Encoding": "gzip"})
    assert (status, body["error"]) == (413, "body_too_large")


async def test_slow_body_times_out_with_408(gw: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports["http"])
    writer.write(b"POST /v1/publish/in/slow/x HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 30.0)  # body timeout is 1 s here
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b'"request_timeout"' in head


def test_curl_posts_a_file(gw: Gateway, broker: Broker, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    t = tenant()
    (tmp_path / "event.json").write_text('{"from": "curl"}')
    out = subprocess.run(
        [curl, "-sS", "-w", "\n%{http_code}", "-H", "X-Client-Id: curl-1",
         "--data-binary", f"@{tmp_path / 'event.json'}", f"{gw.url}/v1/publish/in/{t}/c"],
        capture_output=True, text=True, timeout=20, check=True)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out.stdout
    assert json.loads(body)["deliveries"][0]["topic"] == f"t.http.{t}"
    [record] = broker.read(f"t.http.{t}", 1)
    assert record.value() == b'{"from": "curl"}'


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, broker: Broker) -> None:
    with http_gateway(tmp_path, broker.bootstrap, limits__http_rate_per_client=1.0,
                      limits__http_rate_burst=2.0) as gateway:
        url = f"{gateway.url}/v1/publish/in/{tenant()}/r"
        statuses = [(await post(url, headers={"X-Client-Id": "greedy"}))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        status, body, headers = await post(url, headers={"X-Client-Id": "greedy"})
        assert (status, body["error"]) == (429, "quota_exceeded")
        assert int(headers["Retry-After"]) >= 1
        # Anonymous buckets are per source address: another X-Client-Id from the same
        # address is the same anonymous caller (per-identity buckets: test_http_auth.py).
        assert (await post(url, headers={"X-Client-Id": "polite"}))[0] == 429
