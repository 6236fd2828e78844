"""Plain HTTP authentication for targets: none, a bearer token, a named header, or basic.

A policy names where each secret is (an environment variable or a file), never the secret itself:
an inline value does not load. Secrets are read when the target is built (a missing one is a
:class:`~reaper.errors.ConfigError` naming the variable or file) and registered for log redaction.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Annotated, Any, Literal, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reaper.targets.base import Credential
from reaper.targets.huawei import read_secret, secret_source

__all__ = ["BasicAuth", "BearerAuth", "HeaderAuth", "HttpAuth", "NamedHeaderAuth", "NoAuth"]

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_HEADER_NAME = r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$"
_INLINE = frozenset({"token", "password", "value", "secret", "key", "api_key"})


class HeaderAuth(httpx.Auth):
    """Set one header on every request (the value is a secret: never logged, never repr'd)."""

    def __init__(self, name: str, value: str) -> None:
        self._name = name
        self._value = value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._name] = self._value
        yield request

    def __repr__(self) -> str:
        return f"HeaderAuth({self._name!r}, ***)"


def _source(env: str | None, file: str | None, what: str) -> None:
    if (env is None) == (file is None):
        raise ValueError(f"give exactly one of {what}_env or {what}_file")


class _Auth(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = sorted(k for k in data if isinstance(k, str) and k in _INLINE)
            if inline:
                raise ValueError(
                    f"secrets never go in a policy file ({', '.join(inline)}): name an "
                    "environment variable (*_env) or a file (*_file)"
                )
        return data

    def build(self) -> httpx.Auth | None:
        """Read the secrets; the auth flow for every request (None: no authentication)."""
        raise NotImplementedError

    def credential(self) -> Credential:
        """Which account the requests are made as (see :class:`~reaper.targets.base.Credential`)."""
        raise NotImplementedError


class NoAuth(_Auth):
    """No authentication."""

    type: Literal["none"]

    def build(self) -> httpx.Auth | None:
        return None

    def credential(self) -> Credential:
        return Credential.none()


class BearerAuth(_Auth):
    """``Authorization: Bearer <token>``."""

    type: Literal["bearer"]
    token_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable with the token.")
    token_file: str | None = Field(None, min_length=1, description="File with the token.")

    @model_validator(mode="after")
    def _check(self) -> BearerAuth:
        _source(self.token_env, self.token_file, "token")
        return self

    def build(self) -> httpx.Auth:
        token = read_secret(self.token_env, self.token_file, "the bearer token")
        return HeaderAuth("Authorization", f"Bearer {token.get_secret_value()}")

    def credential(self) -> Credential:
        env, file = self.token_env, self.token_file
        return Credential(
            "bearer",
            f"bearer token from {secret_source(env, file)}",
            lambda: read_secret(env, file, "the bearer token").get_secret_value(),
        )


class NamedHeaderAuth(_Auth):
    """A named header carrying a secret, e.g. ``X-Auth-Token: <value>`` or ``X-Api-Key``."""

    type: Literal["header"]
    name: str = Field(pattern=_HEADER_NAME, description="The header, e.g. X-Api-Key.")
    prefix: str = Field("", max_length=32, description="Text before the value, e.g. 'Token '.")
    value_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable with the value.")
    value_file: str | None = Field(None, min_length=1, description="File with the value.")

    @model_validator(mode="after")
    def _check(self) -> NamedHeaderAuth:
        _source(self.value_env, self.value_file, "value")
        return self

    def build(self) -> httpx.Auth:
        value = read_secret(self.value_env, self.value_file, f"the {self.name} header")
        return HeaderAuth(self.name, self.prefix + value.get_secret_value())

    def credential(self) -> Credential:
        env, file, what = self.value_env, self.value_file, f"the {self.name} header"
        return Credential(
            f"header {self.name.lower()}",
            f"{self.name} from {secret_source(env, file)}",
            lambda: read_secret(env, file, what).get_secret_value(),
        )


class BasicAuth(_Auth):
    """HTTP basic authentication; the user name may be inline, the password may not."""

    type: Literal["basic"]
    username: str | None = Field(None, min_length=1, description="The user name.")
    username_env: str | None = Field(None, pattern=_ENV_NAME, description="... or its variable.")
    password_env: str | None = Field(None, pattern=_ENV_NAME, description="Variable, password.")
    password_file: str | None = Field(None, min_length=1, description="File with the password.")

    @model_validator(mode="after")
    def _check(self) -> BasicAuth:
        if (self.username is None) == (self.username_env is None):
            raise ValueError("give exactly one of username or username_env")
        _source(self.password_env, self.password_file, "password")
        return self

    def build(self) -> httpx.Auth:
        username = self.username
        if username is None:
            username = read_secret(self.username_env, None, "the user name").get_secret_value()
        password = read_secret(self.password_env, self.password_file, "the password")
        return httpx.BasicAuth(username, password.get_secret_value())

    def credential(self) -> Credential:
        """The account: the user name (the password only proves it)."""
        username, env = self.username, self.username_env
        if username is not None:
            return Credential("basic", f"user {username}", lambda: username)
        return Credential(
            "basic",
            f"user from {secret_source(env, None)}",
            lambda: read_secret(env, None, "the user name").get_secret_value(),
        )


HttpAuth = Annotated[
    Union[NoAuth, BearerAuth, NamedHeaderAuth, BasicAuth],  # noqa: UP007 - a discriminated union
    Field(discriminator="type"),
]
