"""Mass-deletion guards: refuse a whole policy run when its plan looks like an accident.

Retention tools make the news when a typo or a surprise deletes everything. Each guard compares
the plan with a limit and, when the limit is exceeded, the policy deletes *nothing* and the run
says which guard tripped and the numbers. Limits come from the policy (safe defaults) and can be
raised for one invocation on the command line.

- ``max_deletions``: more eligible tasks than this;
- ``max_fraction``: a larger share than this of everything the target listed;
- anomaly: far more eligible tasks than the policy's recent runs had (``factor`` x their median),
  above a ``floor`` so small numbers never trip it; lifted only with ``--confirm-anomaly``;
- clock_skew: the target's clock (the HTTP ``Date`` of its answers) and this host's disagree by
  more than ``REAPER_MAX_CLOCK_SKEW``: every age is off by as much, so no plan can be trusted
  (observed and explained by :mod:`reaper.clocks`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from reaper.converters import format_duration
from reaper.policy import Policy

__all__ = [
    "GuardOverrides",
    "GuardTrip",
    "check_clock_skew",
    "check_guards",
    "describe_offset",
    "format_offset",
]


@dataclass(frozen=True)
class GuardOverrides:
    """Limits raised (or an anomaly confirmed) for one invocation, from the command line."""

    max_deletions: int | None = None
    max_fraction: float | None = None
    confirm_anomaly: bool = False


@dataclass(frozen=True)
class GuardTrip:
    """A guard that refused the run."""

    guard: str
    message: str


def check_guards(
    policy: Policy,
    eligible: int,
    listed: int,
    history: Sequence[int],
    overrides: GuardOverrides = GuardOverrides(),
) -> GuardTrip | None:
    """The first guard the plan trips, or None when it may go ahead."""
    delete = policy.delete
    limit = overrides.max_deletions or delete.max_deletions
    if eligible > limit:
        return GuardTrip(
            "max_deletions",
            f"guard max_deletions tripped: {eligible} tasks are eligible, the limit is {limit}; "
            "nothing was deleted (raise delete.max_deletions, or run once with "
            f"--max-deletions {eligible} after reviewing `reaper plan`)",
        )
    fraction = overrides.max_fraction or delete.max_fraction
    if listed and eligible / listed > fraction:
        return GuardTrip(
            "max_fraction",
            f"guard max_fraction tripped: {eligible} of {listed} listed tasks "
            f"({eligible / listed:.1%}) are eligible, the limit is {fraction:.0%}; nothing was "
            "deleted (raise delete.max_fraction, or run once with --max-fraction "
            f"{min(1.0, eligible / listed):.2f} after reviewing `reaper plan`)",
        )
    anomaly = delete.anomaly
    recent = list(history)[: anomaly.history]
    if recent and eligible > anomaly.floor and not overrides.confirm_anomaly:
        median = statistics.median(recent)
        threshold = max(anomaly.floor, anomaly.factor * median)
        if eligible > threshold:
            return GuardTrip(
                "anomaly",
                f"guard anomaly tripped: {eligible} tasks are eligible, more than "
                f"{anomaly.factor:g}x the median ({median:g}) of the last {len(recent)} run(s); "
                "nothing was deleted (review `reaper plan`, then run with --confirm-anomaly)",
            )
    return None


def check_clock_skew(offset: float | None, answers: int, limit: timedelta) -> GuardTrip | None:
    """The clock guard: ``offset`` is the target's clock minus ours in seconds (the median of
    ``answers``), None when no answer had a ``Date``."""
    if offset is None or abs(offset) <= limit.total_seconds():
        return None
    return GuardTrip(
        "clock_skew",
        f"guard clock_skew tripped: the target's clock (HTTP Date) is {describe_offset(offset)} "
        f"this host's (median of {answers} answer(s)), more than REAPER_MAX_CLOCK_SKEW "
        f"({format_duration(limit)}); every task would look {format_offset(offset)} "
        f"{'older' if offset < 0 else 'younger'} than it is, so no age can be trusted; nothing "
        "was deleted (set this host's and the target's clocks right (NTP), or raise "
        "REAPER_MAX_CLOCK_SKEW)",
    )


def describe_offset(seconds: float) -> str:
    """``-5400`` → ``1h30m behind``; ``+12`` → ``12s ahead of``."""
    return f"{format_offset(seconds)} {'ahead of' if seconds > 0 else 'behind'}"


def format_offset(seconds: float) -> str:
    """The size of a clock offset: to the second below 10 minutes, else to the minute (an
    offset is measured to about a second: ``86399.2`` reads ``1d``, not ``23h59m59s``)."""
    size = abs(seconds)
    unit = 1 if size < 600 else 60
    return format_duration(timedelta(seconds=round(size / unit) * unit))
