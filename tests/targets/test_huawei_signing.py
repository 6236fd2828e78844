"""AK/SK signing: byte for byte what the official SDK's Signer produces, and what goes on the wire.

The SDK (``huaweicloudsdkcore``) is a test-only dependency: it is the reference implementation.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from pydantic import SecretStr

from reaper.targets.huawei_signing import (
    AkSkAuth,
    TokenAuth,
    canonical_query,
    canonical_request,
    canonical_uri,
    sign,
)

AK = "HPUAEXAMPLEAK0000001"
SK = "exampleSecretKey0123456789abcdefghijklmn"
WHEN = datetime(2026, 11, 1, 12, 30, 45, tzinfo=UTC)
PROJECT = "0123456789abcdef0123456789abcdef"


def _signed(request: httpx.Request, project_id: str | None = PROJECT) -> httpx.Request:
    """Run reaper's auth flow on ``request`` with a fixed clock."""
    flow = AkSkAuth(SecretStr(AK), SecretStr(SK), project_id=project_id, clock=lambda: WHEN)
    return next(flow.auth_flow(request))


def _sdk_authorization(
    method: str,
    host: str,
    resource_path: str,
    query: list[tuple[str, Any]],
    headers: dict[str, str],
    body: bytes | None,
) -> tuple[str, str]:
    """(Authorization, request URI) as the SDK's Signer produces them."""
    request = SdkRequest(
        method=method,
        schema="https",
        host=host,
        resource_path=resource_path,
        query_params=query,
        header_params=dict(headers),
        body=body,
    )
    Signer(BasicCredentials(AK, SK)).sign(request)
    return request.header_params["Authorization"], request.uri


def _sent_headers(request: httpx.Request) -> dict[str, str]:
    """The headers reaper signed, as the SDK would hold them (original case)."""
    names = request.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    canonical_case = {
        "host": "Host",
        "x-sdk-date": "X-Sdk-Date",
        "x-project-id": "X-Project-Id",
        "content-type": "Content-Type",
        "instance-id": "Instance-Id",
        "x-sdk-content-sha256": "X-Sdk-Content-Sha256",
    }
    return {canonical_case[name]: request.headers[name] for name in names}


# Each case: method, URL path as sent (encoded), the SDK's query params (decoded), httpx params,
# extra headers, JSON body or raw body with content type.
CASES: dict[str, dict[str, Any]] = {
    "dcs listing": {
        "method": "GET",
        "path": f"/v2/{PROJECT}/tasks",
        "query": [("offset", 0), ("limit", 1000), ("end_time", "20261001120000")],
    },
    "reserved characters in the query": {
        "method": "GET",
        "path": f"/v5/iot/{PROJECT}/batchtasks",
        "query": [
            ("task_type", "firmwareUpgrade"),
            ("q", "a b+c/d?e=f&g#h"),
            ("name", "ü~*'()!$,;:@"),
            ("empty", ""),
            ("k", "2"),
            ("k", "1"),
            ("%key", "100%"),
        ],
    },
    "json body": {
        "method": "DELETE",
        "path": f"/v2/{PROJECT}/tasks/8a2b6c1e-0000-4000-8000-000000000001",
        "query": [],
        "json": {"message": "retention: older than 30d ✓"},
    },
    "encoded path segments": {
        "method": "DELETE",
        "path": f"/v2/{PROJECT}/tasks/a%20b~c%C3%BC%25x",
        "query": [],
    },
    "encoded slash in a segment": {
        "method": "GET",
        "path": f"/v2/{PROJECT}/tasks/a%2Fb/",
        "query": [("x", "y")],
    },
    "instance header with spaces to trim": {
        "method": "DELETE",
        "path": f"/v5/iot/{PROJECT}/batchtasks/5f8a3c2e1b0d4e6f7a8b9c0d",
        "query": [],
        "headers": {"Instance-Id": "  inst-0001  "},
    },
    "non-json body is unsigned": {
        "method": "POST",
        "path": f"/v2/{PROJECT}/tasks",
        "query": [("a", "1")],
        "content": b"name=x",
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
    },
}


class TestMatchesTheSdk:
    @pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
    def test_same_authorization_and_wire_query(self, case: dict[str, Any]) -> None:
        """reaper's signature equals the SDK's, and the query sent is the SDK's, byte for byte."""
        host = "dcs.cn-north-4.myhuaweicloud.com"
        url = f"https://{host}{case['path']}"
        request = httpx.Request(
            case["method"],
            url,
            params=[(k, str(v)) for k, v in case["query"]] or None,
            headers=case.get("headers"),
            json=case.get("json"),
            content=case.get("content"),
        )
        signed = _signed(request)
        body = signed.content or None
        expected, sdk_uri = _sdk_authorization(
            case["method"], host, case["path"], list(case["query"]), _sent_headers(signed), body
        )
        assert signed.headers["Authorization"] == expected
        assert signed.url.raw_path.decode("ascii") == sdk_uri

    def test_signature_covers_the_sdk_default_headers(self) -> None:
        """With the headers the SDK client itself sends (User-Agent included), still equal."""
        headers = {
            "User-Agent": "huaweicloud-usdk-python/3.0",
            "Content-Type": "application/json",
            "X-Project-Id": PROJECT,
            "X-Sdk-Date": WHEN.strftime("%Y%m%dT%H%M%SZ"),
            "Host": "iotda.cn-north-4.myhuaweicloud.com",
        }
        path = f"/v5/iot/{PROJECT}/batchtasks"
        query = [("task_type", "createCommands"), ("limit", "50")]
        ours = sign(SK, "GET", path, query, headers, b"")
        expected, _ = _sdk_authorization("GET", headers["Host"], path, query, headers, None)
        assert expected.endswith(f"Signature={ours}")

    def test_canonical_uri_always_ends_in_a_slash(self) -> None:
        """/v2/p/tasks and /v2/p/tasks/ have the same canonical URI."""
        assert canonical_uri("/v2/p/tasks") == "/v2/p/tasks/"
        assert canonical_uri("/v2/p/tasks/") == "/v2/p/tasks/"
        assert canonical_uri("/a%7Eb/c d") == "/a~b/c%20d/"

    def test_canonical_query_sorts_decoded_pairs(self) -> None:
        """Pairs sort by decoded key then value, and are encoded with only ~ safe."""
        assert canonical_query([("b", "2"), ("a", "x y"), ("a", "+")]) == "a=%2B&a=x%20y&b=2"


class TestAuthFlow:
    def test_each_attempt_is_signed_afresh(self) -> None:
        """A retry gets a new X-Sdk-Date and signature: the gateway refuses stale dates."""
        times = iter([WHEN, WHEN + timedelta(seconds=7)])
        flow = AkSkAuth(SecretStr(AK), SecretStr(SK), clock=lambda: next(times))
        first = next(flow.auth_flow(httpx.Request("GET", "https://h/v2/p/tasks")))
        second = next(flow.auth_flow(httpx.Request("GET", "https://h/v2/p/tasks")))
        assert first.headers["X-Sdk-Date"] == "20261101T123045Z"
        assert second.headers["X-Sdk-Date"] == "20261101T123052Z"
        assert first.headers["Authorization"] != second.headers["Authorization"]

    def test_authorization_shape(self) -> None:
        """Authorization names the algorithm, the AK, the sorted signed headers and a hex MAC."""
        signed = _signed(httpx.Request("GET", "https://h/v2/p/tasks"))
        value = signed.headers["Authorization"]
        assert value.startswith(f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders=host;x-project-id;")
        assert len(value.split("Signature=")[1]) == 64

    def test_the_body_hash_is_of_the_bytes_sent(self) -> None:
        """The canonical request ends with the SHA-256 of exactly the JSON bytes httpx sends."""
        signed = _signed(httpx.Request("DELETE", "https://h/v2/p/tasks/x", json={"message": "m"}))
        assert signed.content == b'{"message":"m"}'
        headers = {"host": "h", "x-sdk-date": "20261101T123045Z"}
        canonical = canonical_request("DELETE", "/v2/p/tasks/x", [], headers, signed.content)
        assert canonical.endswith("\n" + hashlib.sha256(signed.content).hexdigest())
        empty = canonical_request("DELETE", "/v2/p/tasks/x", [], headers, b"")
        assert empty.endswith("\n" + hashlib.sha256(b"").hexdigest())

    def test_no_secret_in_repr(self) -> None:
        """Neither flow shows a secret in its repr."""
        flow = AkSkAuth(SecretStr(AK), SecretStr(SK), project_id=PROJECT)
        token = TokenAuth(SecretStr("tok-secret-value"))
        assert AK not in repr(flow) and SK not in repr(flow)
        assert "tok-secret-value" not in repr(token)

    def test_token_flow(self) -> None:
        """The token flow sends X-Auth-Token and no Authorization header."""
        token = TokenAuth(SecretStr("tok-secret-value"), project_id=PROJECT)
        request = next(token.auth_flow(httpx.Request("GET", "https://h/x")))
        assert request.headers["X-Auth-Token"] == "tok-secret-value"
        assert request.headers["X-Project-Id"] == PROJECT
        assert "Authorization" not in request.headers

    def test_missing_date_is_refused(self) -> None:
        """sign() without X-Sdk-Date raises rather than signing something unverifiable."""
        with pytest.raises(ValueError, match="X-Sdk-Date"):
            sign(SK, "GET", "/", [], {"host": "h"}, b"")
