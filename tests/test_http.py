"""Retries, Retry-After, transport errors and body limits (httpx MockTransport)."""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.converters import Rate
from reaper.errors import TargetAuthError
from reaper.http import (
    RequestFailed,
    ResponseTooLarge,
    RetryPolicy,
    Stale,
    TargetHttp,
    loads_json,
    retry_after_seconds,
)
from reaper.ratelimit import RateLimiter

FAST = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.002)


def run(
    handler: Callable[[httpx.Request], httpx.Response],
    retry: RetryPolicy = FAST,
    **kwargs: object,
) -> tuple[TargetHttp, object]:
    async def main() -> tuple[TargetHttp, object]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            http = TargetHttp(
                client,
                RateLimiter(Rate(1000)),
                retry,
                rng=random.Random(1),
                **kwargs,  # type: ignore[arg-type]
            )
            try:
                return http, await http.send("DELETE", "http://target/x", json_body={"a": 1})
            except Exception as exc:
                return http, exc

    return asyncio.run(main())


class TestRetries:
    def test_5xx_then_success(self) -> None:
        """5xx answers are retried; the final answer says which earlier attempts may have been
        carried out (a 500/503 may come after the server acted)."""
        answers = iter([500, 503, 200])
        http, result = run(lambda request: httpx.Response(next(answers), json={}))
        assert result.status_code == 200  # type: ignore[attr-defined]
        assert result.attempts == 3  # type: ignore[attr-defined]
        assert result.earlier == ("HTTP 500", "HTTP 503")  # type: ignore[attr-defined]
        assert result.lost_attempts == 2  # type: ignore[attr-defined]
        assert http.stats.retries == 2

    def test_exhausted_5xx_retries_may_have_been_carried_out(self) -> None:
        """Every attempt answered 502: the server may have acted, so the outcome is unknown."""
        _, result = run(lambda request: httpx.Response(502, json={}))
        assert isinstance(result, RequestFailed)
        assert result.attempts == 4
        assert result.maybe_sent is True
        assert result.http_status == 502

    def test_429_is_not_an_attempt_that_acted(self) -> None:
        """429 means refused before any work: retries exhausted on 429 are not 'maybe sent'."""
        _, result = run(lambda request: httpx.Response(429, json={}))
        assert isinstance(result, RequestFailed)
        assert result.maybe_sent is False

    def test_4xx_is_not_retried(self) -> None:
        """A 400 is an answer: returned at once, not retried."""
        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return httpx.Response(400, json={})

        _, result = run(handler)
        assert result.status_code == 400  # type: ignore[attr-defined]
        assert len(calls) == 1

    @pytest.mark.parametrize("status", [401, 403])
    def test_auth_errors_stop(self, status: int) -> None:
        """401/403 raise TargetAuthError at once (retrying bad credentials only locks accounts)."""
        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return httpx.Response(status, json={"error_msg": "bad"})

        _, result = run(handler)
        assert isinstance(result, TargetAuthError)
        assert len(calls) == 1

    def test_retry_after_is_honoured(self) -> None:
        """A 429 with Retry-After: 1 delays the retry by at least one second."""
        stamps: list[float] = []
        loop_time = __import__("time").monotonic

        def handler(request: httpx.Request) -> httpx.Response:
            stamps.append(loop_time())
            if len(stamps) == 1:
                return httpx.Response(429, headers={"Retry-After": "1"}, json={})
            return httpx.Response(200, json={})

        _, result = run(handler)
        assert result.status_code == 200  # type: ignore[attr-defined]
        assert stamps[1] - stamps[0] >= 0.95

    def test_connect_error_is_not_sent(self) -> None:
        """Connection refused never reached the server: retried, and not 'maybe sent'."""

        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        _, result = run(handler)
        assert isinstance(result, RequestFailed)
        assert result.maybe_sent is False

    def test_read_timeout_may_have_been_sent(self) -> None:
        """A timeout after sending leaves the outcome unknown: maybe_sent, and counted as lost."""
        attempts = []

        def handler(request: httpx.Request) -> httpx.Response:
            attempts.append(1)
            if len(attempts) == 1:
                raise httpx.ReadTimeout("slow", request=request)
            return httpx.Response(200, json={})

        _, result = run(handler)
        assert result.status_code == 200  # type: ignore[attr-defined]
        assert result.lost_attempts == 1  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        "fail",
        [
            lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=request)),
            lambda request: httpx.Response(504, json={}),
            lambda request: httpx.Response(502, json={}),
        ],
        ids=["read-timeout", "504", "502"],
    )
    def test_not_repeated_while_the_server_may_still_be_working(self, fail: Any) -> None:
        """overlap_safe=False: after a timeout or a gateway's 502/504 the request is not sent
        again (a synchronous server may still be running the first one)."""
        calls = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            response: httpx.Response = fail(request)
            return response

        async def main() -> Any:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)), RetryPolicy(4, 0, 0))
                try:
                    return await http.send("DELETE", "http://target/x", overlap_safe=False)
                except RequestFailed as exc:
                    return exc

        result = asyncio.run(main())
        assert isinstance(result, RequestFailed)
        assert len(calls) == 1
        assert result.maybe_sent is True
        assert result.still_running is True

    @pytest.mark.parametrize("status", [500, 503])
    def test_answered_5xx_is_repeated_even_when_overlap_is_unsafe(self, status: int) -> None:
        """A 500/503 is the server's own answer: the first attempt is over, so it is retried."""
        answers = iter([status, 200])

        async def main() -> Any:
            transport = httpx.MockTransport(lambda r: httpx.Response(next(answers), json={}))
            async with httpx.AsyncClient(transport=transport) as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)), RetryPolicy(4, 0, 0))
                return await http.send("DELETE", "http://target/x", overlap_safe=False)

        result = asyncio.run(main())
        assert result.status_code == 200
        assert result.earlier == (f"HTTP {status}",)

    def test_no_retry_when_disabled(self) -> None:
        """retry=False sends exactly once."""
        calls = []

        async def main() -> object:
            def handler(request: httpx.Request) -> httpx.Response:
                calls.append(1)
                return httpx.Response(503)

            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)), FAST)
                try:
                    await http.send("GET", "http://target/", retry=False)
                except RequestFailed as exc:
                    return exc
            return None

        assert isinstance(asyncio.run(main()), RequestFailed)
        assert calls == [1]


class TestBodies:
    def test_oversized_body_is_cut_off(self) -> None:
        """A body larger than max_response_bytes raises instead of being read into memory."""
        _, result = run(
            lambda request: httpx.Response(200, content=b"x" * 5000), max_response_bytes=1024
        )
        assert isinstance(result, ResponseTooLarge)


class TestRetryAfter:
    def test_seconds(self) -> None:
        """Delta-seconds parse as seconds."""
        assert retry_after_seconds("3") == 3.0

    def test_http_date(self) -> None:
        """An HTTP date is converted to the seconds until then."""
        now = datetime(2026, 1, 1, tzinfo=UTC)
        header = format_datetime(now + timedelta(seconds=10), usegmt=True)
        assert retry_after_seconds(header, now) == pytest.approx(10.0)

    def test_garbage(self) -> None:
        """Unparseable values are ignored (None)."""
        assert retry_after_seconds("soon") is None
        assert retry_after_seconds(None) is None


class TestTransportOverhead:
    def test_a_request_searches_no_import_path(self) -> None:
        """httpcore runs ``import sniffio`` several times per request. Without sniffio installed
        every one searched sys.path (a failed import is not cached); with it, none does."""
        searched: list[str] = []

        class Spy(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname: str, path: object, target: object = None) -> None:
                searched.append(fullname)

        closed = asyncio.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass  # the client closed the connection
            writer.close()
            await writer.wait_closed()
            closed.set()

        async def main() -> None:
            server = await asyncio.start_server(answer, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with httpx.AsyncClient() as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)), FAST)
                await http.send("GET", f"http://127.0.0.1:{port}/")  # lazy imports happen here
                spy = Spy()
                sys.meta_path.insert(0, spy)
                try:
                    exchange = await http.send("GET", f"http://127.0.0.1:{port}/")
                finally:
                    sys.meta_path.remove(spy)
            await closed.wait()  # one keep-alive connection, closed with the client
            server.close()
            await server.wait_closed()
            assert exchange.json() == {}

        asyncio.run(main())
        assert searched == []


def same_json(a: object, b: object) -> bool:
    """Equal values of the same types all the way down (1 == 1.0 == True is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b  # NaN
    return a == b


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


class TestLoadsJson:
    @settings(max_examples=300, deadline=None)
    @given(value=json_values, ensure_ascii=st.booleans())
    def test_decodes_as_the_json_module_does(self, value: object, ensure_ascii: bool) -> None:
        """Whatever json.dumps writes, loads_json reads back exactly as json.loads does."""
        body = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
        assert same_json(loads_json(body), json.loads(body))

    @pytest.mark.parametrize(
        "body",
        [
            b'{"total": 18446744073709551616}',  # 2**64: orjson alone reads a float
            b"[-9223372036854775809]",  # below -2**63
            b"[12345678901234567890123]",
            b'{"a": 1, "a": 2}',
            b"\xef\xbb\xbf{}",  # a UTF-8 BOM
            '{"a": "\u00e9"}'.encode("utf-16"),
            b"[NaN, Infinity, -Infinity]",
            b"[1e400]",
            b'"\\ud800"',  # a lone surrogate escape
            b'{"task_id": "task_20260101_000000", "n": 9223372036854775807}',
        ],
    )
    def test_edge_cases_match_the_json_module(self, body: bytes) -> None:
        """Inputs orjson refuses or reads differently are decoded as json.loads decodes them."""
        assert same_json(loads_json(body), json.loads(body))

    @pytest.mark.parametrize("body", [b"", b"{", b"[1,]", b"{'a': 1}", b"\xff\xfe\xfd", b"nul"])
    def test_not_json_is_a_value_error(self, body: bytes) -> None:
        """What json.loads refuses, loads_json refuses with a ValueError."""
        with pytest.raises(ValueError):
            json.loads(body)
        with pytest.raises(ValueError):
            loads_json(body)


class TestDeadline:
    """TargetHttp.deadline bounds when any attempt of a request may still leave."""

    @staticmethod
    def send_under(deadline_in: float, handler: Callable[[httpx.Request], httpx.Response]) -> Any:
        async def main() -> Any:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)), RetryPolicy(4, 0.05, 0.05))
                loop_time = __import__("time").monotonic
                with http.deadline(loop_time() + deadline_in):
                    try:
                        return await http.send("DELETE", "http://target/x")
                    except Stale as exc:
                        return exc

        return asyncio.run(main())

    def test_past_deadline_sends_nothing(self) -> None:
        """An attempt due after the deadline is not sent: Stale, with no earlier attempt."""
        calls: list[httpx.Request] = []
        result = self.send_under(-1.0, lambda r: calls.append(r) or httpx.Response(200))
        assert isinstance(result, Stale)
        assert result.earlier == ()
        assert calls == []

    def test_retry_after_the_deadline_reports_the_attempt_that_may_have_acted(self) -> None:
        """A 504, then the deadline passes during the backoff: Stale names the 504."""
        calls: list[httpx.Request] = []
        result = self.send_under(0.02, lambda r: calls.append(r) or httpx.Response(504))
        assert isinstance(result, Stale)
        assert result.earlier == ("HTTP 504",)
        assert len(calls) == 1

    def test_within_the_deadline_nothing_changes(self) -> None:
        """A request that leaves in time is answered as usual."""
        result = self.send_under(30.0, lambda r: httpx.Response(200, json={}))
        assert result.status_code == 200

    def test_per_request_timeout(self) -> None:
        """send(timeout=...) replaces the client's timeout for that request only."""
        seen: list[dict[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.extensions["timeout"])
            return httpx.Response(200, json={})

        async def main() -> None:
            transport = httpx.MockTransport(handler)
            async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
                http = TargetHttp(client, RateLimiter(Rate(1000)))
                await http.send("GET", "http://target/x", timeout=80.0)
                await http.send("GET", "http://target/x")

        asyncio.run(main())
        assert seen[0]["read"] == 80.0
        assert seen[1]["read"] == 5.0
