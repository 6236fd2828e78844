"""One request budget per endpoint: the policies that reach one API as one account share it.

A server limits its clients by account (Huawei's API gateway per user, GitLab per token, a
self-hosted service per client address), not by reaper policy. Two policies that each keep to the
server's limit would together exceed it, so every policy run in a process that reaches the same
*endpoint* takes its requests from one :class:`Budget`: one rate limiter
(:class:`~reaper.ratelimit.RateLimiter`, which also slows down for everyone when the server
answers 429) and one limit on requests in flight.

An endpoint is the API's origin (scheme, host and port) and the credential's identity
(:meth:`~reaper.targets.base.TargetConfig.credential`): the AK of an AK/SK pair (the SK only
proves it), a token or API key itself, a basic-auth user name, or no authentication. The
identifying value is kept only as a keyed hash (HMAC-SHA256 with a key drawn when the process
starts), so no secret appears in a key or a log line and no hash can be checked against a guess
outside the process.

The budget's limits: what the settings give the endpoint (``REAPER_ENDPOINT_BUDGETS``), and for
what they leave out the lowest the policies reaching it declare (``delete.rate``,
``delete.burst``, ``delete.concurrency``; requests in flight default to
:data:`DEFAULT_CONCURRENCY`). A policy whose own rate is below an explicit endpoint rate also keeps
to its own (:meth:`EndpointBudgets.pace`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from reaper.converters import Rate
from reaper.errors import ConfigError
from reaper.policy import LoadedPolicy
from reaper.ratelimit import RateLimiter
from reaper.settings import EndpointBudget

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Budget",
    "EndpointBudgets",
    "EndpointKey",
    "Limits",
    "RateConflict",
    "endpoint_key",
    "rate_conflicts",
]

log = structlog.get_logger("reaper.budgets")

#: Requests in flight at one endpoint when neither the settings nor any policy reaching it say:
#: the most an automatically sized policy uses (:func:`reaper.execute.auto_concurrency`).
DEFAULT_CONCURRENCY = 64

# Drawn once per process: the fingerprints mean nothing outside it.
_KEY = secrets.token_bytes(32)


def _fingerprint(value: str) -> str:
    return hmac.new(_KEY, value.encode(), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True, order=True)
class EndpointKey:
    """An API origin and the account requests to it are made as (a keyed hash, never a secret)."""

    origin: str
    credential: str  # "none", or the credential's kind and fingerprint: "aksk #3f2a..."

    def __str__(self) -> str:
        return self.origin if self.credential == "none" else f"{self.origin} as {self.credential}"


@dataclass(frozen=True)
class Limits:
    """What one endpoint's budget allows."""

    rate: Rate
    burst: int
    concurrency: int
    #: Which limits the settings gave (the rest are the lowest the policies declare).
    explicit: frozenset[str] = frozenset()


class Budget:
    """One endpoint's rate limiter and in-flight limit, shared by every request to it."""

    def __init__(
        self, key: EndpointKey, limits: Limits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.key = key
        self.limits = limits
        self.limiter = RateLimiter(limits.rate, limits.burst, clock=clock)
        self.inflight = asyncio.Semaphore(limits.concurrency)


def endpoint_key(loaded: LoadedPolicy) -> EndpointKey:
    """The endpoint a policy reaches (reads the credential: ConfigError when it is missing).

    A target kind that does not say which API it reaches gets a key of the policy's own.
    """
    config = loaded.policy.target_config
    origin = config.origin()
    if origin is None:
        return EndpointKey(f"policy {loaded.name}", "none")
    credential = config.credential()
    if credential.read is None:
        return EndpointKey(origin, credential.kind)
    return EndpointKey(
        origin, f"{credential.kind} #{_fingerprint(credential.kind + chr(0) + credential.read())}"
    )


class EndpointBudgets:
    """The budgets of one process (one event loop), by endpoint.

    :meth:`register` tells it which policies run; :meth:`budget` hands a policy's run the
    budget of its endpoint. A budget whose limits change (a reload of the policies) is replaced:
    runs in progress keep the old one until they end.
    """

    def __init__(
        self,
        explicit: Mapping[str, EndpointBudget] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.explicit = dict(explicit or {})
        self._clock = clock
        self._members: dict[str, tuple[EndpointKey, LoadedPolicy]] = {}
        self._budgets: dict[EndpointKey, Budget] = {}

    def register(self, loaded: Iterable[LoadedPolicy]) -> None:
        """Budget for exactly these policies (replacing any registered before)."""
        members: dict[str, tuple[EndpointKey, LoadedPolicy]] = {}
        for item in loaded:
            try:
                members[item.name] = (endpoint_key(item), item)
            except ConfigError:
                continue  # its run fails on the missing credential before sending anything
        self._members = members
        self._refresh()

    def budget(self, loaded: LoadedPolicy) -> Budget:
        """The budget of the endpoint ``loaded`` reaches (registering it if it is new)."""
        key = endpoint_key(loaded)
        known = self._members.get(loaded.name)
        if known is None or known != (key, loaded):
            self._members[loaded.name] = (key, loaded)
            self._refresh()
        return self._budgets[key]

    def pace(self, loaded: LoadedPolicy, budget: Budget) -> RateLimiter | None:
        """The policy's own limiter, when its rate is below the endpoint's (an explicit one)."""
        delete = loaded.policy.delete
        if delete.rate.per_second >= budget.limits.rate.per_second:
            return None
        return RateLimiter(delete.rate, delete.burst, clock=self._clock)

    def keys(self) -> dict[EndpointKey, list[str]]:
        """Each endpoint and the policies reaching it, in registration order."""
        grouped: dict[EndpointKey, list[str]] = {}
        for name, (key, _) in self._members.items():
            grouped.setdefault(key, []).append(name)
        return grouped

    def _refresh(self) -> None:
        grouped: dict[EndpointKey, list[LoadedPolicy]] = {}
        for key, item in self._members.values():
            grouped.setdefault(key, []).append(item)
        budgets: dict[EndpointKey, Budget] = {}
        for key, items in grouped.items():
            limits = self._limits(key, items)
            current = self._budgets.get(key)
            if current is not None and current.limits == limits:
                budgets[key] = current
                continue
            budgets[key] = Budget(key, limits, self._clock)
            rates = sorted({item.policy.delete.rate.per_second for item in items})
            log.info(
                "endpoint_budget",
                endpoint=str(key),
                rate=str(limits.rate),
                burst=limits.burst,
                concurrency=limits.concurrency,
                from_settings=sorted(limits.explicit),
                policies=[item.name for item in items],
            )
            if len(rates) > 1 and "rate" not in limits.explicit:
                log.warning(
                    "endpoint_rates_differ",
                    endpoint=str(key),
                    rates={item.name: str(item.policy.delete.rate) for item in items},
                    using=str(limits.rate),
                    hint="policies reaching one endpoint as one account share its lowest rate",
                )
        self._budgets = budgets

    def _limits(self, key: EndpointKey, items: list[LoadedPolicy]) -> Limits:
        given = self.explicit.get(key.origin, EndpointBudget())
        deletes = [item.policy.delete for item in items]
        declared = [d.concurrency for d in deletes if d.concurrency is not None]
        return Limits(
            rate=given.rate or min((d.rate for d in deletes), key=lambda r: r.per_second),
            burst=given.burst or min(d.burst for d in deletes),
            concurrency=given.concurrency or min(declared, default=DEFAULT_CONCURRENCY),
            explicit=frozenset(
                name for name in ("rate", "burst", "concurrency") if getattr(given, name)
            ),
        )


@dataclass(frozen=True)
class RateConflict:
    """Policies that reach one endpoint with one credential source but declare different rates."""

    origin: str
    credential: str  # its kind and where it is read from: never the value
    rates: dict[str, Rate]  # by policy name
    #: The rate the endpoint is given by the settings, if any.
    explicit: Rate | None = None

    @property
    def lowest(self) -> Rate:
        return min(self.rates.values(), key=lambda r: r.per_second)


def rate_conflicts(
    loaded: Iterable[LoadedPolicy], explicit: Mapping[str, EndpointBudget] | None = None
) -> list[RateConflict]:
    """Groups of policies whose rates differ although they share an endpoint's budget.

    Without reading any secret (``validate`` runs where they are not): the credential is told
    apart by its kind and where it is read from. At run time two sources holding the same
    credential share a budget too.
    """
    groups: dict[tuple[str, str], dict[str, Rate]] = {}
    for item in loaded:
        config = item.policy.target_config
        origin = config.origin()
        if origin is None:
            continue  # a budget of its own
        credential = config.credential()
        name = credential.kind + (f" ({credential.source})" if credential.source else "")
        groups.setdefault((origin, name), {})[item.name] = item.policy.delete.rate
    conflicts = []
    for (origin, account), rates in groups.items():
        if len({rate.per_second for rate in rates.values()}) > 1:
            given = (explicit or {}).get(origin)
            conflicts.append(RateConflict(origin, account, rates, given.rate if given else None))
    return conflicts
