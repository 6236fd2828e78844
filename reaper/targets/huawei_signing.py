"""Huawei Cloud request authentication: ``SDK-HMAC-SHA256`` AK/SK signing and IAM tokens.

The signature is computed exactly as the official SDK's ``Signer`` (``huaweicloudsdkcore``) does,
so that the API gateway accepts it; ``tests/targets/test_huawei_signing.py`` signs the same
requests with both and compares the bytes. The canonical request is six lines: the method, the
canonical URI, the canonical query, the canonical headers, the signed names, the body hash.

* canonical URI: the path percent-decoded, split on ``/``, every segment percent-encoded with only
  ``~`` safe, joined again, and always ending in ``/``;
* canonical query: ``key=value`` pairs (decoded, then encoded like path segments) sorted by the
  decoded key and value, joined by ``&``;
* canonical headers: ``name:value`` per signed header, names lower-cased, values stripped of
  surrounding whitespace, sorted by name; header names containing ``_`` are never signed;
* body hash: of the empty string when there is no body; ``X-Sdk-Content-Sha256`` replaces it when
  set (``UNSIGNED-PAYLOAD`` for bodies that are neither JSON nor BSON).

:class:`AkSkAuth` and :class:`TokenAuth` are ``httpx.Auth`` flows: httpx runs them for every
attempt of a request, so each retry carries a fresh ``X-Sdk-Date`` and signature. The query string
sent is rewritten to the canonical form, so what is signed is byte for byte what goes on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Generator, Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote

import httpx
from pydantic import SecretStr

__all__ = [
    "ALGORITHM",
    "DATE_FORMAT",
    "AkSkAuth",
    "TokenAuth",
    "authorization",
    "canonical_query",
    "canonical_request",
    "canonical_uri",
    "sign",
    "signed_header_names",
]

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
CONTENT_SHA256_HEADER = "X-Sdk-Content-Sha256"

#: The headers AkSkAuth signs when a request carries them. Host and X-Sdk-Date are always there.
#: Transport headers (Accept-Encoding, Connection, User-Agent, Content-Length) are left out: a
#: proxy may rewrite them, and the gateway only checks the names listed in SignedHeaders.
SIGNED_HEADERS = frozenset(
    {
        "host",
        "x-sdk-date",
        "x-project-id",
        "instance-id",
        "content-type",
        "x-sdk-content-sha256",
        "x-security-token",
    }
)


def _encode(text: str) -> str:
    return quote(text, safe="~")


def canonical_uri(raw_path: str) -> str:
    """The canonical URI of a (percent-encoded) request path; it always ends in ``/``."""
    path = "/".join(_encode(segment) for segment in unquote(raw_path).split("/"))
    return path if path.endswith("/") else path + "/"


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The canonical query string of decoded ``(key, value)`` pairs."""
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(pairs))


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """The names that are signed: lower-cased and sorted, never one containing ``_``."""
    return sorted({name.lower() for name in headers if "_" not in name})


def _payload_hash(body: bytes, headers: Mapping[str, str]) -> str:
    if not body:
        return EMPTY_BODY_SHA256
    for name, value in headers.items():
        if name.lower() == CONTENT_SHA256_HEADER.lower() and value:
            return value
    return hashlib.sha256(body).hexdigest()


def canonical_request(
    method: str,
    raw_path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    """The canonical request over exactly ``headers`` (all of them are signed)."""
    values = {name.lower(): str(value).strip() for name, value in headers.items()}
    names = signed_header_names(headers)
    canonical_headers = "".join(f"{name}:{values[name]}\n" for name in names)
    return "\n".join(
        (
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(query),
            canonical_headers,
            ";".join(names),
            _payload_hash(body, headers),
        )
    )


def sign(
    sk: str,
    method: str,
    raw_path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    """The hex signature of a request; ``headers`` must hold X-Sdk-Date and Host."""
    sdk_date = next((v for k, v in headers.items() if k.lower() == "x-sdk-date"), None)
    if sdk_date is None:
        raise ValueError("the request has no X-Sdk-Date header")
    # The SDK parses the date and formats it again: a malformed one is refused, not signed.
    sdk_date = datetime.strptime(sdk_date.strip(), DATE_FORMAT).strftime(DATE_FORMAT)  # noqa: DTZ007
    request_hash = hashlib.sha256(
        canonical_request(method, raw_path, query, headers, body).encode("utf-8")
    ).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{sdk_date}\n{request_hash}"
    return hmac.new(sk.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization(ak: str, signed_names: Iterable[str], signature: str) -> str:
    """The Authorization header value."""
    return f"{ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed_names)}, Signature={signature}"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AkSkAuth(httpx.Auth):
    """Sign every attempt of every request with an AK/SK pair (``SDK-HMAC-SHA256``)."""

    requires_request_body = True

    def __init__(
        self,
        ak: SecretStr,
        sk: SecretStr,
        *,
        project_id: str | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._ak = ak
        self._sk = sk
        self.project_id = project_id
        self._clock = clock

    def __repr__(self) -> str:
        return f"AkSkAuth(project_id={self.project_id!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        headers = request.headers
        headers["X-Sdk-Date"] = self._clock().astimezone(UTC).strftime(DATE_FORMAT)
        if self.project_id:
            headers["X-Project-Id"] = self.project_id
        content_type = headers.get("Content-Type")
        if (
            request.content
            and content_type
            and not content_type.startswith(("application/json", "application/bson"))
        ):
            headers[CONTENT_SHA256_HEADER] = UNSIGNED_PAYLOAD
        # Send the canonical query itself ('+' from httpx's form encoding means a space).
        pairs = parse_qsl(request.url.query.decode("ascii"), keep_blank_values=True)
        query = canonical_query(pairs)
        request.url = request.url.copy_with(query=query.encode("ascii") if query else None)
        signed = {name: headers[name] for name in SIGNED_HEADERS if name in headers}
        raw_path = request.url.raw_path.split(b"?", 1)[0].decode("ascii")
        signature = sign(
            self._sk.get_secret_value(), request.method, raw_path, pairs, signed, request.content
        )
        headers["Authorization"] = authorization(
            self._ak.get_secret_value(), signed_header_names(signed), signature
        )
        yield request


class TokenAuth(httpx.Auth):
    """Send an IAM token (``X-Auth-Token``) with every request."""

    def __init__(self, token: SecretStr, *, project_id: str | None = None) -> None:
        self._token = token
        self.project_id = project_id

    def __repr__(self) -> str:
        return f"TokenAuth(project_id={self.project_id!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["X-Auth-Token"] = self._token.get_secret_value()
        if self.project_id:
            request.headers["X-Project-Id"] = self.project_id
        yield request
