"""reaper: scheduled retention for task-management APIs, with an audit row for every deletion.

The data flow: policy files (:mod:`reaper.policy`) → a target's listing (:mod:`reaper.targets`)
→ a plan with a reason per task (:mod:`reaper.plan`) → batched, rate-limited deletes
(:mod:`reaper.execute`) → the audit log (:mod:`reaper.audit`). :mod:`reaper.runner` ties one
policy run together; :mod:`reaper.cli` drives it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from reaper.audit import AuditStore, RunSummary
from reaper.errors import (
    AuditError,
    ConfigError,
    ListingError,
    PolicyError,
    ReaperError,
    RunAborted,
    TargetAuthError,
    TargetError,
    TargetResponseError,
)
from reaper.plan import Plan, Verdict
from reaper.policy import LoadedPolicy, Policy, load_policies
from reaper.runner import Mode, PolicyRun, RunStatus, run_policy
from reaper.targets import Outcome, Target, Task
from reaper.track import track

__all__ = [
    "AuditError",
    "AuditStore",
    "ConfigError",
    "ListingError",
    "LoadedPolicy",
    "Mode",
    "Outcome",
    "Plan",
    "Policy",
    "PolicyError",
    "PolicyRun",
    "ReaperError",
    "RunAborted",
    "RunStatus",
    "RunSummary",
    "Target",
    "TargetAuthError",
    "TargetError",
    "TargetResponseError",
    "Task",
    "Verdict",
    "__version__",
    "load_policies",
    "run_policy",
    "track",
]
