"""Target kinds: the :class:`Target` interface, the records it hands inward, and the registry.

Each kind is one module (the built-ins: ``data_pipeline``, ``huawei_dcs``, ``huawei_iotda``,
``aparavi``, ``generic_http``), found through its entry point in the group ``reaper.targets``
like any plugin's (:mod:`reaper.targets.registry`). Importing this package imports none of them.
"""

from __future__ import annotations

from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Recheck,
    RecheckRequest,
    Target,
    TargetConfig,
    Task,
    task_reader,
)
from reaper.targets.registry import Kind, Registry, installed_kinds
from reaper.targets.state import TargetState, TaskInventory, TrackedTask

__all__ = [
    "BatchResult",
    "DeleteOptions",
    "DeleteResult",
    "Kind",
    "ListRequest",
    "Outcome",
    "Recheck",
    "RecheckRequest",
    "Registry",
    "Target",
    "TargetConfig",
    "TargetState",
    "Task",
    "TaskInventory",
    "TrackedTask",
    "installed_kinds",
    "target_class",
    "task_reader",
]


def target_class(kind: str) -> type[Target]:
    """The target class for ``kind``; raises KeyError for an unknown or unusable kind."""
    return installed_kinds().target(kind)
