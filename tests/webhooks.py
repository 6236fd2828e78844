"""A webhook receiver on 127.0.0.1 for the notification tests: a real HTTP server in a thread
that keeps every request and checks its signature with the `standardwebhooks` package's own
verifier (independent of reaper's signing)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

#: A Standard Webhooks secret: "whsec_" and the base64 of the HMAC key.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    #: The payload if the signature verified (standardwebhooks' Webhook.verify), else None.
    verified: Any
    error: str | None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200), after ``hold`` is set
    when ``wait`` is on; verifies every request with ``secret``."""

    def __init__(self, secret: str = SECRET, statuses: tuple[int, ...] = ()) -> None:
        self.secret = secret
        self.statuses = list(statuses)
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.wait = False
        self.hold = threading.Event()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    verified, error = Webhook(receiver.secret).verify(body, headers), None
                except WebhookVerificationError as exc:
                    verified, error = None, str(exc)
                with receiver.lock:
                    receiver.requests.append(Received(self.path, headers, body, verified, error))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.arrived.notify_all()
                if receiver.wait:
                    receiver.hold.wait(timeout=30)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks/reaper"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        """The payloads received (standard format), in order."""
        with self.lock:
            return [r.json for r in self.requests]

    def of_type(self, kind: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.json.get("type") == kind]

    def wait_for(self, count: int, timeout: float = 30) -> None:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= count, timeout=timeout)

    def __iter__(self) -> Iterator[Received]:
        with self.lock:
            return iter(list(self.requests))
