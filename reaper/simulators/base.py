"""The reusable half of every simulator: an HTTP server, routing, fault injection and logs.

A target simulator subclasses :class:`SimulatorBase`, declares its routes and its error shape, and
acts on requests; this module does everything that is the same for all targets:

* a ``ThreadingHTTPServer`` on 127.0.0.1 speaking HTTP/1.1 with keep-alive, quiet, stoppable,
  and HTTPS when given an :class:`ssl.SSLContext` (to test certificate verification);
* fault injection from a :class:`Faults` value, applied to every API request in a fixed order
  (down -> rate limit -> latency -> drop before -> error -> malformed -> act -> drop after, or
  504 after acting); what a target's handler does wrong while acting (acknowledging a deletion
  it did not make, re-executing listed tasks, ...) is up to the subclass, switched by the same
  value;
* a server-side token bucket, so a client's own rate limiter can be checked from the outside;
* the request counters and the deletion log a test or a benchmark asserts on;
* admin endpoints under ``/_sim/`` (never faulted) so an out-of-process client can inspect it.
"""

from __future__ import annotations

import abc
import collections
import json
import math
import random
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "Faults",
    "Request",
    "Response",
    "Route",
    "RouteKind",
    "SimulatorBase",
]

RouteKind = Literal["list", "get", "delete", "other"]

# A request body larger than this is refused: the simulator holds bodies in memory.
_MAX_BODY = 64 * 1024 * 1024
# Characters that would make a task id escape the directory the real server joins it into.
_TRAVERSAL_MARKERS = ("/", "\\", "..")


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often; every fault is off by default.

    Rates are fractions of API requests in ``[0, 1]``; times are milliseconds. ``rate_limit`` is
    requests per second over all API requests (0: no limit) and ``rate_limit_burst`` the bucket
    capacity (0: ``max(2, ceil(rate_limit * 0.1))``).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    spike_rate: float = 0.0
    spike_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float = 0.0
    rate_limit_burst: int = 0
    drop_before_rate: float = 0.0
    drop_after_rate: float = 0.0
    malformed_rate: float = 0.0
    partial_failure_rate: float = 0.0
    #: Deletes the service carried out, then answered 504 (a gateway that timed out).
    act_then_504_rate: float = 0.0
    #: Ids a delete reports as deleted although nothing was done (every simulator).
    ack_without_effect_rate: float = 0.0
    #: data_pipeline: finished tasks on a listed page re-executed (back to in_progress) right
    #: after the page is served.
    reexecute_rate: float = 0.0
    #: data_pipeline: deletions whose database update fails after the directory was removed; the
    #: id is still reported deleted and its row keeps ``directory_exists: true`` (the real
    #: server swallows that error).
    db_update_failure_rate: float = 0.0
    #: data_pipeline: milliseconds of synchronous work per id of a delete request (the real
    #: server walks each directory and opens a database connection per id).
    delete_ms_per_id: float = 0.0
    #: Seconds added to the HTTP ``Date`` header of every answer (negative: behind): a server
    #: whose clock disagrees with the client's.
    clock_skew_s: float = 0.0
    down: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "down":
                if not isinstance(value, bool):
                    raise ValueError(f"down must be a boolean, got {value!r}")
                continue
            # bool is an int: refuse it so that {"error_rate": true} is not silently 1.0.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or (value < 0 and f.name != "clock_skew_s"):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
            if f.name.endswith("_rate") and value > 1:
                raise ValueError(f"{f.name} must be between 0 and 1, got {value!r}")
        if not isinstance(self.rate_limit_burst, int):
            raise ValueError(f"rate_limit_burst must be an integer, got {self.rate_limit_burst!r}")

    @property
    def effective_burst(self) -> int:
        """The token bucket capacity actually used."""
        if self.rate_limit_burst:
            return self.rate_limit_burst
        return max(2, math.ceil(self.rate_limit * 0.1))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Faults:
        """Build faults from a JSON object, refusing unknown fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        return cls(**data)  # type: ignore[arg-type]  # values are checked in __post_init__

    def to_dict(self) -> dict[str, Any]:
        """The faults as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed HTTP request, as a route handler sees it."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names lower-cased
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)  # named groups of the route pattern

    def arg(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError when it is not JSON."""
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True, slots=True)
class Response:
    """What to send back; ``drop`` closes the connection without sending anything."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)
    drop: bool = False

    @classmethod
    def json(
        cls, payload: object, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A JSON response, UTF-8 and unescaped like Flask's ``jsonify`` with ensure_ascii off."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return cls(status=status, body=body, headers=dict(headers or {}))


_DROP = Response(status=0, drop=True)

# Bodies a broken server or proxy sends with a 200: cut short mid-write, empty, or an HTML page.
_MALFORMED_BODIES = (
    ("application/json; charset=utf-8", b'{"success": true, "code": 200, "message": "'),
    ("application/json; charset=utf-8", b""),
    ("text/html", b"<html><head><title>502 Bad Gateway</title></head><body></body></html>"),
)


@dataclass(frozen=True, slots=True)
class Route:
    """A method and a path pattern (a regex matched in full) bound to a handler."""

    method: str
    pattern: str
    handler: Callable[[Request], Response]
    kind: RouteKind = "other"


class _TokenBucket:
    """Classic token bucket; ``take`` answers how long to wait (0 when a token was taken)."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.updated = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default backlog of 5 makes concurrent benchmark clients wait for SYN retransmits.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        simulator: SimulatorBase,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.simulator = simulator
        self.ssl_context = ssl_context
        # Open connections, so stop() can end keep-alive connections that would otherwise keep
        # being served by their handler threads after the listening socket is closed.
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens in the handler thread (Handler.setup): a client that never
            # completes it must not block the accept loop.
            connection = self.ssl_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-response is normal here (drop tests, stop()); anything else
        # is a simulator bug and is kept for tests to see instead of being printed to stderr.
        if not isinstance(sys.exc_info()[1], OSError):
            self.simulator.record_handler_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm and the client's delayed
    # ACK, every response would wait ~40 ms for the second write.
    disable_nagle_algorithm = True
    # Idle keep-alive connections are closed after this many seconds, so threads do not pile up.
    timeout = 60
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            # A client that refuses our certificate ends here, with an SSLError (an OSError that
            # handle_error ignores); no request of its is ever served.
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: simulators run inside test and benchmark output."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, shifted by the ``clock_skew_s`` fault."""
        if timestamp is None:
            timestamp = time.time() + self.server.simulator.faults.clock_skew_s
        return super().date_time_string(timestamp)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Skip trailers up to the empty line that ends the message.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError(f"bad Content-Length {length}")
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(Response.json({"error": "unreadable request body"}, status=400))
            return
        url = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        response = self.server.simulator.handle(request)
        if response.drop:
            # Nothing is written: the client sees the connection close without a response.
            self.close_connection = True
            return
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        # RFC 9110 forbids a Content-Length on 204 and 304.
        if response.status not in (204, 304):
            self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if response.body and self.command != "HEAD":
            self.wfile.write(response.body)


class SimulatorBase(abc.ABC):
    """A simulated target API served over real HTTP on 127.0.0.1.

    Subclasses implement :meth:`routes`, :meth:`error_response` and :meth:`add_tasks_from_json`,
    and call :meth:`roll`, :meth:`record_delete_request`, :meth:`record_deleted` while acting.
    All state is guarded by ``self.lock``; route handlers are called with it *not* held.
    """

    #: Name of the simulated target, used by the CLI.
    name: ClassVar[str] = "base"

    def __init__(self, *, faults: Faults | None = None, seed: int = 0) -> None:
        self.lock = threading.RLock()
        self._faults = faults or Faults()
        self._rng = random.Random(seed)
        self._bucket: _TokenBucket | None = None
        self._reset_bucket()
        self._routes = [(re.compile(route.pattern), route) for route in self.routes()]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._url: str | None = None
        self._stats: collections.Counter[str] = collections.Counter()
        self._deleted_ids: list[str] = []
        self._deleted_set: set[str] = set()
        self.delete_requests_by_id: collections.Counter[str] = collections.Counter()
        #: Ids a delete reported deleted although nothing was done (ack_without_effect_rate).
        self.acknowledged_not_done: list[str] = []
        #: Ids whose data was deleted while the task was live (must stay empty).
        self.live_deleted: list[str] = []
        self.traversal_attempts: list[str] = []
        self.handler_errors: list[str] = []

    # -- what a subclass provides ------------------------------------------------------------

    @abc.abstractmethod
    def routes(self) -> Sequence[Route]:
        """The target's API routes (called once, from ``__init__``)."""

    @abc.abstractmethod
    def error_response(self, request: Request, status: int, detail: str) -> Response:
        """An error in the target's own shape (used for 400, 404, 405, 429 and 500)."""

    @abc.abstractmethod
    def add_tasks_from_json(self, payload: Any) -> int:
        """Add tasks given as JSON (``POST /_sim/tasks``); return how many were added."""

    def malformed_response(self, request: Request) -> Response:
        """A 200 whose body is not valid JSON; one of a few realistic variants."""
        variant = _MALFORMED_BODIES[self._rng_choice(len(_MALFORMED_BODIES))]
        return Response(body=variant[1], content_type=variant[0])

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Start serving in a background daemon thread; return the base URL (no trailing /).

        With ``ssl_context`` (a server-side context holding the certificate) it serves HTTPS.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        server = _Server((host, port), self, ssl_context)
        bound_host, bound_port = server.server_address[:2]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}-simulator",
            daemon=True,
        )
        self._thread.start()
        scheme = "https" if ssl_context is not None else "http"
        self._url = f"{scheme}://{bound_host!s}:{bound_port}"
        return self._url

    def stop(self) -> None:
        """Stop serving and close every connection; a no-op when not started."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes handlers sleeping on injected latency
        server.shutdown()
        thread.join()
        with server.connections_lock:
            open_connections = list(server.connections)
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        server.server_close()
        # Give handler threads a moment to close their sockets themselves.
        deadline = time.monotonic() + 2
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        self._server = self._thread = None
        self._url = None

    @contextmanager
    def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> Iterator[str]:
        """Serve for the duration of a ``with`` block, yielding the base URL."""
        url = self.start(host, port, ssl_context=ssl_context)
        try:
            yield url
        finally:
            self.stop()

    @property
    def url(self) -> str:
        """The base URL while serving."""
        if self._url is None:
            raise RuntimeError("simulator not started")
        return self._url

    # -- faults and logs ---------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults; the rate-limit bucket starts full again."""
        with self.lock:
            self._faults = faults
            self._reset_bucket()

    @property
    def deleted_ids(self) -> list[str]:
        """Ids whose data the server actually deleted, in order, each once."""
        with self.lock:
            return list(self._deleted_ids)

    @property
    def stats(self) -> dict[str, int]:
        """Request counters (a copy)."""
        keys = (
            "requests",
            "list_requests",
            "get_requests",
            "delete_requests",
            "status_2xx",
            "status_4xx",
            "status_429",
            "status_5xx",
            "dropped",
            "malformed",
            "admin_requests",
            "handler_errors",
        )
        with self.lock:
            stats = {key: self._stats[key] for key in keys}
            stats["deleted"] = len(self._deleted_ids)
            stats["acknowledged_not_done"] = len(self.acknowledged_not_done)
            stats["live_deleted"] = len(self.live_deleted)
            return stats

    def record_handler_error(self, text: str) -> None:
        """Keep a simulator bug's traceback for tests to see."""
        with self.lock:
            self._stats["handler_errors"] += 1
            self.handler_errors.append(text)

    # -- helpers for subclasses --------------------------------------------------------------

    def roll(self, rate: float) -> bool:
        """True with probability ``rate``, from the seeded generator (no draw when rate is 0)."""
        if rate <= 0:
            return False
        if rate >= 1:
            return True
        with self.lock:
            return self._rng.random() < rate

    def record_delete_request(self, task_id: str) -> None:
        """Count a processed delete request naming ``task_id``; note path-traversal attempts."""
        with self.lock:
            self.delete_requests_by_id[task_id] += 1
            if any(marker in task_id for marker in _TRAVERSAL_MARKERS):
                self.traversal_attempts.append(task_id)

    def record_deleted(self, task_id: str, *, live: bool = False) -> None:
        """Note that the server deleted ``task_id``'s data (once per id); ``live``: while the
        task was still running (a reaper bug if reaper sent it)."""
        with self.lock:
            if task_id not in self._deleted_set:
                self._deleted_set.add(task_id)
                self._deleted_ids.append(task_id)
            if live:
                self.live_deleted.append(task_id)

    def acknowledge_without_effect(self, task_id: str) -> bool:
        """Roll ``ack_without_effect_rate`` for one id about to be deleted; True means: report
        it deleted and do nothing (the id is noted)."""
        if not self.roll(self._faults.ack_without_effect_rate):
            return False
        with self.lock:
            self.acknowledged_not_done.append(task_id)
        return True

    # -- request handling --------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request: admin endpoints directly, API routes through the faults."""
        if request.path.startswith("/_sim/"):
            with self.lock:
                self._stats["admin_requests"] += 1
            return self._admin(request)
        route, matched = self._match(request)
        with self.lock:
            self._stats["requests"] += 1
            if route is not None and route.kind != "other":
                self._stats[f"{route.kind}_requests"] += 1
            faults = self._faults
        try:
            response = self._faulted(request, route, matched, faults)
        except Exception:
            self.record_handler_error(traceback.format_exc())
            response = self.error_response(request, 500, "simulator error")
        with self.lock:
            if response.drop:
                self._stats["dropped"] += 1
            else:
                self._stats[f"status_{response.status // 100}xx"] += 1
                if response.status == 429:
                    self._stats["status_429"] += 1
        return response

    def _faulted(
        self, request: Request, route: Route | None, matched: Request | None, faults: Faults
    ) -> Response:
        if faults.down:
            return _DROP
        with self.lock:
            # The bucket, not the faults snapshot: set_faults may have swapped both meanwhile.
            wait = self._bucket.take() if self._bucket is not None else 0.0
        if wait > 0:
            response = self.error_response(request, 429, "rate limit exceeded")
            retry_after = str(max(1, math.ceil(wait)))
            return replace(response, headers={**response.headers, "Retry-After": retry_after})
        self._sleep(faults)
        if self.roll(faults.drop_before_rate):
            return _DROP
        if self.roll(faults.error_rate):
            return self.error_response(request, 500, "injected server error")
        if self.roll(faults.malformed_rate):
            with self.lock:
                self._stats["malformed"] += 1
            return self.malformed_response(request)
        if route is None or matched is None:
            if any(pattern.fullmatch(request.path) for pattern, _ in self._routes):
                return self.error_response(request, 405, f"method {request.method} not allowed")
            return self.error_response(request, 404, f"no route for {request.path}")
        response = route.handler(matched)
        if route.kind == "delete" and self.roll(faults.drop_after_rate):
            return _DROP
        if (
            route.kind == "delete"
            and 200 <= response.status < 300
            and self.roll(faults.act_then_504_rate)
        ):
            # The service did the work; the gateway in front of it gave up waiting.
            return self.error_response(request, 504, "gateway timeout: the service was too slow")
        return response

    def _match(self, request: Request) -> tuple[Route | None, Request | None]:
        for pattern, route in self._routes:
            if route.method != request.method:
                continue
            match = pattern.fullmatch(request.path)
            if match is not None:
                return route, replace(request, params=match.groupdict())
        return None, None

    def _sleep(self, faults: Faults) -> None:
        delay_ms = faults.latency_ms
        if faults.latency_jitter_ms > 0:
            with self.lock:
                delay_ms += self._rng.uniform(0, faults.latency_jitter_ms)
        if self.roll(faults.spike_rate):
            delay_ms += faults.spike_ms
        if delay_ms > 0:
            # An Event wait rather than time.sleep, so stop() is not held up by long spikes.
            self._stopping.wait(delay_ms / 1000)

    def _reset_bucket(self) -> None:
        faults = self._faults
        self._bucket = (
            _TokenBucket(faults.rate_limit, faults.effective_burst) if faults.rate_limit else None
        )

    def _rng_choice(self, n: int) -> int:
        with self.lock:
            return self._rng.randrange(n)

    # -- admin endpoints (never faulted) -----------------------------------------------------

    def _admin(self, request: Request) -> Response:
        key = (request.method, request.path.rstrip("/"))
        try:
            if key == ("GET", "/_sim/stats"):
                return Response.json(self.stats)
            if key == ("GET", "/_sim/deletions"):
                with self.lock:
                    payload = {
                        "deleted_ids": list(self._deleted_ids),
                        "delete_requests_by_id": dict(self.delete_requests_by_id),
                        "traversal_attempts": list(self.traversal_attempts),
                        "acknowledged_not_done": list(self.acknowledged_not_done),
                        "live_deleted": list(self.live_deleted),
                    }
                return Response.json(payload)
            if key == ("GET", "/_sim/faults"):
                return Response.json(self.faults.to_dict())
            if key == ("PUT", "/_sim/faults"):
                data = request.json()
                if not isinstance(data, dict):
                    raise ValueError("faults must be a JSON object")
                self.set_faults(Faults.from_mapping(data))
                return Response.json(self.faults.to_dict())
            if key == ("POST", "/_sim/tasks"):
                added = self.add_tasks_from_json(request.json())
                return Response.json({"added": added})
        except (ValueError, TypeError, KeyError) as exc:
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
            return Response.json({"error": str(exc)}, status=400)
        return Response.json({"error": f"no admin endpoint {request.method} {request.path}"}, 404)
