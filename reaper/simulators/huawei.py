"""What the Huawei Cloud simulators share: the API gateway's authentication and error shape.

The gateway accepts a request when it carries a known IAM token (``X-Auth-Token``) or a valid
``SDK-HMAC-SHA256`` signature: a known AK, ``host`` and ``x-sdk-date`` among the signed headers,
an ``X-Sdk-Date`` within 15 minutes of the server's clock, and the signature the SK gives over the
request *as received* (raw path, decoded query, the signed headers' values, the body). Anything
else is a 401 in the gateway's shape (``{"error_code": "APIGW.03xx", "error_msg": ...}``).

The verifier is written from the wire format, independently of reaper's signer, so that the two
check each other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from reaper.simulators.base import Faults, Request, Response, Route, SimulatorBase

__all__ = ["GatewayAuth", "HuaweiSimulatorBase"]

_AUTHORIZATION = re.compile(
    r"SDK-HMAC-SHA256\s+Access=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]{64})"
)
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW = timedelta(minutes=15)
Handler = Callable[[Request], Response]


def _pct(text: str) -> str:
    return quote(text, safe="~")


class GatewayAuth:
    """Checks credentials the way the API gateway does; ``check`` answers None or a 401."""

    def __init__(
        self,
        credentials: Mapping[str, str] | None = None,
        tokens: Iterable[str] = (),
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.credentials = dict(credentials or {})
        self.tokens = set(tokens)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.refused = 0

    def check(self, request: Request) -> str | None:
        """None when the request is authenticated, else why not."""
        token = request.headers.get("x-auth-token")
        if token is not None:
            return None if token in self.tokens else "the token is invalid or expired"
        header = request.headers.get("authorization")
        if header is None:
            return "no X-Auth-Token or Authorization header"
        match = _AUTHORIZATION.fullmatch(header.strip())
        if match is None:
            return "the Authorization header is malformed"
        access, names_text, signature = match.groups()
        secret = self.credentials.get(access)
        if secret is None:
            return "the access key is unknown"
        names = names_text.split(";")
        if "host" not in names or "x-sdk-date" not in names:
            return "host and x-sdk-date must be signed"
        if names != sorted(names):
            return "SignedHeaders are not sorted"
        missing = [name for name in names if name not in request.headers]
        if missing:
            return f"signed header(s) missing: {', '.join(missing)}"
        sdk_date = request.headers["x-sdk-date"].strip()
        try:
            when = datetime.strptime(sdk_date, _DATE_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return "X-Sdk-Date is malformed"
        if abs(self.clock() - when) > MAX_SKEW:
            return "X-Sdk-Date is more than 15 minutes away from the server's time"
        expected = self.signature(request, names, secret, sdk_date)
        if not hmac.compare_digest(expected, signature):
            return "the signature does not match"
        return None

    @staticmethod
    def signature(request: Request, names: Sequence[str], secret: str, sdk_date: str) -> str:
        """The signature the gateway expects for ``request`` (headers as received)."""
        segments = unquote(request.path).split("/")
        uri = "/".join(_pct(s) for s in segments)
        if not uri.endswith("/"):
            uri += "/"
        pairs = sorted((k, v) for k, values in request.query.items() for v in values)
        query = "&".join(f"{_pct(k)}={_pct(v)}" for k, v in pairs)
        headers = "".join(f"{name}:{request.headers[name].strip()}\n" for name in names)
        declared = request.headers.get("x-sdk-content-sha256")
        if not request.body:
            body_hash = hashlib.sha256(b"").hexdigest()
        elif declared:
            body_hash = declared
        else:
            body_hash = hashlib.sha256(request.body).hexdigest()
        canonical = "\n".join(
            (request.method.upper(), uri, query, headers, ";".join(names), body_hash)
        )
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        to_sign = f"SDK-HMAC-SHA256\n{sdk_date}\n{digest}"
        return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


class HuaweiSimulatorBase(SimulatorBase):
    """A Huawei Cloud service behind its API gateway: authenticated routes, Huawei errors."""

    name: ClassVar[str] = "huawei"
    #: Whether error bodies carry ``error_ext_msg`` (DCS does, IoTDA does not).
    ext_msg: ClassVar[bool] = False

    def __init__(
        self,
        *,
        project_id: str,
        credentials: Mapping[str, str] | None = None,
        tokens: Iterable[str] = (),
        faults: Faults | None = None,
        seed: int = 0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.project_id = project_id
        self.auth = GatewayAuth(credentials, tokens, clock=clock)
        super().__init__(faults=faults, seed=seed)

    def authenticated(self, handler: Handler) -> Handler:
        """Wrap a route handler: 401 unless authenticated, 403 for another project's path."""

        def check(request: Request) -> Response:
            why = self.auth.check(request)
            if why is not None:
                with self.lock:
                    self.auth.refused += 1
                return self.error(
                    401, "APIGW.0301", f"Incorrect IAM authentication information: {why}"
                )
            project = request.params.get("project_id")
            if project is not None and project != self.project_id:
                return self.error(
                    403, "APIGW.0302", "The IAM user is not authorized for this project"
                )
            header_project = request.headers.get("x-project-id")
            if header_project is not None and header_project != self.project_id:
                return self.error(403, "APIGW.0302", "X-Project-Id does not match the path")
            return handler(request)

        return check

    def guarded(self, routes: Sequence[Route]) -> list[Route]:
        """The routes, each behind the gateway's authentication."""
        return [replace(route, handler=self.authenticated(route.handler)) for route in routes]

    def error(self, status: int, code: str, message: str, **extra: Any) -> Response:
        """An error in the service's shape."""
        payload: dict[str, Any] = {"error_msg": message, "error_code": code}
        if self.ext_msg:
            payload["error_ext_msg"] = None
        payload.update(extra)
        return Response.json(payload, status=status)

    def error_response(self, request: Request, status: int, detail: str) -> Response:
        """Gateway errors for 404 (no such API), 405, 429; the service's own for 400/500."""
        if status == 429:
            return self.error(429, "APIGW.0308", "The throttling threshold has been reached")
        if status in (404, 405):
            return self.error(status, "APIGW.0101", f"The API does not exist: {detail}")
        return self.error(status, self.service_code(status), detail)

    def service_code(self, status: int) -> str:
        """The service's generic error code for a status (overridden per service)."""
        return f"SIM.{status}"

    def malformed_response(self, request: Request) -> Response:
        """A broken 200; never an empty one to a DELETE, whose documented success is empty.

        An empty 200 *is* the answer of a deletion that happened: sending it for a deletion that
        did not happen would be a lying server, not a broken body.
        """
        response = super().malformed_response(request)
        while request.method == "DELETE" and not response.body:
            response = super().malformed_response(request)
        return response
