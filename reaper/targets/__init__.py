"""Target kinds: one module each, registered here by their ``type`` name."""

from __future__ import annotations

from reaper.targets.aparavi import AparaviTarget
from reaper.targets.base import (
    BatchResult,
    DeleteOptions,
    DeleteResult,
    ListRequest,
    Outcome,
    Target,
    TargetConfig,
    Task,
)
from reaper.targets.data_pipeline import DataPipelineTarget
from reaper.targets.generic_http import GenericHttpTarget
from reaper.targets.huawei_dcs import HuaweiDcsTarget
from reaper.targets.huawei_iotda import HuaweiIotdaTarget

__all__ = [
    "TARGETS",
    "BatchResult",
    "DeleteOptions",
    "DeleteResult",
    "ListRequest",
    "Outcome",
    "Target",
    "TargetConfig",
    "Task",
    "target_class",
]

#: Every target kind, by the ``target.type`` a policy names. Adding a kind: one line here.
TARGETS: dict[str, type[Target]] = {
    cls.kind: cls
    for cls in (
        DataPipelineTarget,
        HuaweiDcsTarget,
        HuaweiIotdaTarget,
        AparaviTarget,
        GenericHttpTarget,
    )
}


def target_class(kind: str) -> type[Target]:
    """The target class for ``kind``; raises KeyError for an unknown kind."""
    return TARGETS[kind]
