"""What the Huawei Cloud targets (DCS task center, IoTDA batch tasks) share.

* ``target.auth``: AK/SK signing or an IAM token, each secret read from an environment variable
  or a file the policy names (never inline). Secrets are read when the target is built, registered
  for log redaction, and held as :class:`~pydantic.SecretStr`; a missing variable or file is a
  :class:`~reaper.errors.ConfigError` naming it.
* the error body of both services and their API gateway, ``{"error_code", "error_msg"}``;
* exact parsing of their two timestamp formats;
* one delete request per id (:meth:`~reaper.targets.base.Target.delete_each`): 200/204 deleted,
  404 already gone (unless the *gateway* says the API does not exist; and ``deleted`` when an
  earlier attempt of the same request was answered 5xx or lost: the service may have acted, then
  timed out), anything else a failure that keeps the service's error code and message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import structlog
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, model_validator

from reaper.errors import ConfigError
from reaper.logs import register_secret
from reaper.targets.base import (
    BatchResult,
    Credential,
    DeleteOptions,
    DeleteResult,
    Outcome,
    Target,
    TargetConfig,
    gone_result,
    origin_of,
)
from reaper.targets.huawei_signing import AkSkAuth, TokenAuth

__all__ = [
    "HuaweiAuth",
    "HuaweiConfig",
    "HuaweiTarget",
    "error_fields",
    "parse_compact_time",
    "parse_iso_millis_time",
]

log = structlog.get_logger("reaper.targets.huawei")

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: Keys someone might use to put a credential straight into a policy file.
_INLINE_KEYS = frozenset(
    {"ak", "sk", "token", "access_key", "secret_key", "secret", "password", "key", "value"}
)
PROJECT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$"


def _one_source(env: str | None, file: str | None, what: str) -> None:
    if (env is None) == (file is None):
        raise ValueError(f"give exactly one of {what}_env or {what}_file")


class HuaweiAuth(BaseModel):
    """``target.auth``: AK/SK signing or an IAM token, each secret from a variable or a file.

    ``{type: aksk, ak_env: HW_AK, sk_file: /run/secrets/hw_sk}`` or
    ``{type: token, token_env: HW_TOKEN}``. A key given inline is refused.
    """

    # hide_input_in_errors: a mistyped credential must not be echoed back in a validation error.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    type: Literal["aksk", "token"] = Field(
        description="aksk: SDK-HMAC-SHA256 request signing; token: an IAM token (X-Auth-Token)."
    )
    ak_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable holding the AK.")
    ak_file: str | None = Field(None, min_length=1, description="File holding the AK.")
    sk_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable holding the SK.")
    sk_file: str | None = Field(None, min_length=1, description="File holding the SK.")
    token_env: str | None = Field(
        None, pattern=_ENV_NAME, description="Variable holding the IAM token."
    )
    token_file: str | None = Field(None, min_length=1, description="File holding the IAM token.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = sorted(key for key in data if isinstance(key, str) and key in _INLINE_KEYS)
            if inline:
                raise ValueError(
                    f"credentials never go in a policy file ({', '.join(inline)}): name an "
                    "environment variable (ak_env, sk_env, token_env) or a file (ak_file, ...)"
                )
        return data

    @model_validator(mode="after")
    def _sources(self) -> HuaweiAuth:
        if self.type == "aksk":
            _one_source(self.ak_env, self.ak_file, "ak")
            _one_source(self.sk_env, self.sk_file, "sk")
            if self.token_env or self.token_file:
                raise ValueError("token_env/token_file belong to type: token")
        else:
            _one_source(self.token_env, self.token_file, "token")
            if self.ak_env or self.ak_file or self.sk_env or self.sk_file:
                raise ValueError("ak_*/sk_* belong to type: aksk")
        return self

    def build(self, project_id: str | None) -> httpx.Auth:
        """Read the secrets and return the flow that authenticates every request.

        Raises ConfigError naming the variable or file when one is missing or empty.
        """
        if self.type == "aksk":
            ak = read_secret(self.ak_env, self.ak_file, "the AK")
            sk = read_secret(self.sk_env, self.sk_file, "the SK")
            return AkSkAuth(ak, sk, project_id=project_id)
        token = read_secret(self.token_env, self.token_file, "the IAM token")
        return TokenAuth(token, project_id=project_id)

    def credential(self) -> Credential:
        """The account: the AK (not secret; the SK only proves it), or the IAM token."""
        if self.type == "aksk":
            ak_env, ak_file = self.ak_env, self.ak_file
            return Credential(
                "aksk",
                f"AK from {secret_source(ak_env, ak_file)}",
                lambda: read_secret(ak_env, ak_file, "the AK").get_secret_value(),
            )
        token_env, token_file = self.token_env, self.token_file
        return Credential(
            "token",
            f"IAM token from {secret_source(token_env, token_file)}",
            lambda: read_secret(token_env, token_file, "the IAM token").get_secret_value(),
        )


def secret_source(env: str | None, file: str | None) -> str:
    """Where a secret is read from, for messages: never its value."""
    return f"environment variable {env}" if env is not None else f"file {file}"


def read_secret(env: str | None, file: str | None, what: str) -> SecretStr:
    """Read one secret from the environment or a file; register it for log redaction."""
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        where = f"environment variable {env}"
    else:
        assert file is not None
        where = f"file {file}"
        try:
            value = Path(file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: {where} is not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {where}: {exc.strerror}") from None
    value = value.strip()
    if not value:
        raise ConfigError(f"{what}: {where} is empty")
    register_secret(value)
    return SecretStr(value)


class HuaweiConfig(TargetConfig):
    """Settings both Huawei targets share."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, hide_input_in_errors=True
    )

    project_id: str = Field(pattern=PROJECT_ID_PATTERN, description="The project (tenant) id.")
    auth: HuaweiAuth = Field(description="AK/SK signing or an IAM token; never inline.")

    def base_url(self) -> str:
        """The service endpoint without a trailing slash."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.base_url()} project {self.project_id}"

    def origin(self) -> str:
        return origin_of(self.base_url())

    def credential(self) -> Credential:
        return self.auth.credential()


def check_endpoint(value: AnyHttpUrl) -> AnyHttpUrl:
    """Refuse credentials, a query or a fragment in an endpoint URL."""
    if value.username or value.password:
        raise ValueError("credentials do not belong in the endpoint")
    if value.query or value.fragment:
        raise ValueError("the endpoint must not have a query or fragment")
    return value


# --- responses --------------------------------------------------------------------------------


def error_fields(body: bytes) -> tuple[str | None, str | None]:
    """``(error_code, error_msg)`` from a Huawei error body, or Nones."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]  # some gateways nest it: {"error": {"code", "message"}}
    if not isinstance(data, dict):
        return None, None
    code = data.get("error_code", data.get("code"))
    message = data.get("error_msg", data.get("message"))
    return (
        str(code) if code is not None else None,
        str(message) if message is not None else None,
    )


_ISO_MILLIS = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z")
_COMPACT = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")


def parse_iso_millis_time(text: Any) -> datetime:
    """``2020-06-17T07:38:42.503Z`` (DCS) as aware UTC; ValueError for anything else."""
    match = _ISO_MILLIS.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not of the form 2020-06-17T07:38:42.503Z")
    *parts, fraction = match.groups()
    micros = int((fraction or "0").ljust(6, "0"))
    year, month, day, hour, minute, second = (int(p) for p in parts)
    return datetime(year, month, day, hour, minute, second, micros, tzinfo=UTC)


def parse_compact_time(text: Any) -> datetime:
    """``20151212T121212Z`` (IoTDA) as aware UTC; ValueError for anything else."""
    match = _COMPACT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not of the form 20151212T121212Z")
    year, month, day, hour, minute, second = (int(p) for p in match.groups())
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- the shared target ------------------------------------------------------------------------


class HuaweiTarget(Target):
    """A Huawei Cloud task API: authenticated requests, one delete request per id."""

    config: HuaweiConfig
    #: Status codes of a successful deletion.
    deleted_statuses: ClassVar[frozenset[int]] = frozenset({200, 204})

    @classmethod
    def client_auth(cls, config: TargetConfig) -> httpx.Auth:
        """The authentication flow for every request to this target (reads the secrets)."""
        assert isinstance(config, HuaweiConfig)
        return config.auth.build(config.project_id)

    def delete_url(self, task_id: str) -> str:
        """The URL of one task."""
        raise NotImplementedError

    def request_headers(self) -> dict[str, str] | None:
        """Headers every request to this service carries (besides authentication)."""
        return None

    def delete_body(self, options: DeleteOptions) -> Any:
        """The JSON body of a delete request (None: no body)."""
        return None

    async def delete(self, task_ids: Sequence[str], options: DeleteOptions) -> BatchResult:
        # max_batch_size is 1; a longer batch is still sent one id per request.
        return await self.delete_each(task_ids, lambda task_id: self.delete_one(task_id, options))

    async def delete_one(self, task_id: str, options: DeleteOptions) -> DeleteResult:
        """Send one delete request and read its outcome."""
        exchange = await self.http.send(
            "DELETE",
            self.delete_url(task_id),
            json_body=self.delete_body(options),
            headers=self.request_headers(),
        )
        status = exchange.status_code
        if status in self.deleted_statuses:
            if exchange.body.strip() and not _is_json(exchange.body):
                # Success has an empty or JSON body; a proxy's HTML page or a cut-off answer
                # says nothing true about the deletion: reconciliation will settle it.
                return DeleteResult(
                    task_id,
                    Outcome.UNKNOWN,
                    status,
                    error_message=f"HTTP {status} with a body that is not JSON",
                )
            return DeleteResult(task_id, Outcome.DELETED, status)
        code, message = error_fields(exchange.body)
        if status == 404 and not (code or "").startswith("APIGW."):
            return gone_result(
                task_id, exchange.earlier, status, code, message, note="404: no such task"
            )
        if 200 <= status < 300:
            return DeleteResult(
                task_id,
                Outcome.UNKNOWN,
                status,
                code,
                message or f"undocumented success status {status}",
            )
        return DeleteResult(
            task_id, Outcome.FAILED, status, code, message or f"HTTP {status} without error body"
        )


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
