"""Saved plans: what a reviewed ``reaper plan --save`` promised, and the checks before applying it.

A saved plan holds, per policy, the exact ids to delete with the reason for each, the policy's
content hash and the time it was made. ``reaper apply`` deletes only ids that are in the plan *and
still eligible* when the target is listed again just before deletion; it refuses a plan whose
policy changed since (the hash differs) or that is older than a maximum age.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reaper.converters import parse_timestamp
from reaper.errors import ConfigError
from reaper.plan import Plan
from reaper.policy import LoadedPolicy

__all__ = [
    "FORMAT",
    "PlanDiff",
    "SavedPlan",
    "diff_plan",
    "load_saved",
    "not_eligible_now",
    "refusal",
    "save_plans",
]

FORMAT = "reaper-plan/1"


@dataclass(frozen=True)
class SavedPlan:
    """One policy's part of a saved plan file."""

    policy: str
    policy_hash: str
    created_at: datetime
    target: str
    #: task id -> the reason it was selected, in the plan's order (oldest first).
    items: dict[str, str]


def _plan_entry(plan: Plan) -> dict[str, Any]:
    return {
        "policy": plan.policy.name,
        "policy_hash": plan.policy.digest,
        "target": plan.policy.policy.target_config.describe(),
        "created_at": plan.created_at.isoformat(),
        "cutoff": plan.cutoff.isoformat(),
        "listed": plan.listed,
        "counts": [
            {"verdict": verdict.value, "reason": reason, "count": count}
            for (verdict, reason), count in sorted(plan.counts.items())
        ],
        "items": [
            {
                "task_id": c.task_id,
                "status": c.status,
                "timestamp": c.timestamp.isoformat(),
                "reason": c.reason,
            }
            for c in plan.candidates()
        ],
    }


def save_plans(path: Path, plans: Sequence[Plan]) -> None:
    """Write ``plans`` to ``path`` (JSON), atomically."""
    document = {"format": FORMAT, "plans": [_plan_entry(plan) for plan in plans]}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    temporary.replace(path)


def load_saved(path: Path) -> list[SavedPlan]:
    """Read a saved plan file; a file that is not one is a ConfigError naming the problem."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable saved plan: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a saved plan (expected format {FORMAT!r})")
    plans: list[SavedPlan] = []
    try:
        for entry in document["plans"]:
            items: dict[str, str] = {}
            for item in entry["items"]:
                task_id, reason = item["task_id"], item["reason"]
                if not isinstance(task_id, str) or not isinstance(reason, str):
                    raise TypeError("task_id and reason must be strings")
                items[task_id] = reason
            plans.append(
                SavedPlan(
                    policy=str(entry["policy"]),
                    policy_hash=str(entry["policy_hash"]),
                    created_at=parse_timestamp(entry["created_at"]),
                    target=str(entry["target"]),
                    items=items,
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: malformed saved plan: {exc!r}") from None
    return plans


def refusal(
    saved: SavedPlan, loaded: LoadedPolicy | None, now: datetime, max_age: timedelta
) -> str | None:
    """Why ``saved`` must not be applied now, or None when it may be."""
    if loaded is None:
        return f"the plan is for policy {saved.policy!r}, which no policy file defines any more"
    if loaded.digest != saved.policy_hash:
        return (
            f"policy {saved.policy!r} changed since the plan was made (content hash "
            f"{saved.policy_hash[:12]} then, {loaded.digest[:12]} now): make and review a new plan"
        )
    age = now - saved.created_at
    if age > max_age:
        return (
            f"the plan for {saved.policy!r} is {_hours(age)} old, more than the maximum "
            f"{_hours(max_age)}: make and review a new plan"
        )
    if age < -timedelta(minutes=5):
        return f"the plan for {saved.policy!r} was made in the future ({saved.created_at})"
    return None


def _hours(value: timedelta) -> str:
    return f"{value.total_seconds() / 3600:.1f}h"


@dataclass(frozen=True)
class PlanDiff:
    """How a fresh plan differs from a saved one."""

    policy: str
    added: list[str]  # eligible now, not in the saved plan
    removed: list[str]  # in the saved plan, not eligible now
    unchanged: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "added": self.added,
            "removed": self.removed,
            "unchanged": self.unchanged,
        }


def diff_plan(saved: SavedPlan, plan: Plan) -> PlanDiff:
    """Compare a fresh plan with a saved one."""
    fresh = list(plan.task_ids())
    fresh_set = set(fresh)
    return PlanDiff(
        policy=saved.policy,
        added=[task_id for task_id in fresh if task_id not in saved.items],
        removed=[task_id for task_id in saved.items if task_id not in fresh_set],
        unchanged=sum(1 for task_id in fresh if task_id in saved.items),
    )


def not_eligible_now(saved: SavedPlan, plan: Plan) -> list[str]:
    """Approved ids the fresh plan no longer deletes (they became protected, vanished, ...)."""
    fresh = set(plan.task_ids())
    return [task_id for task_id in saved.items if task_id not in fresh]
