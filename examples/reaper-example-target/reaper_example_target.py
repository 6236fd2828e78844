"""An example reaper target plugin: the data_pipeline API, limited to one task id prefix.

Installed, it adds the target kind ``example_pipeline`` (the entry point in pyproject.toml). A
policy with ``target.type: example_pipeline`` lists and deletes data_pipeline tasks like the
built-in kind, except that only tasks whose id starts with ``id_prefix`` are listed (default
``task_``, the scheduled runs): manual runs (``manual_...``) are never listed, so never deleted,
and the id guard refuses them should one ever be asked for.

It shows the two halves of a kind: the settings a policy may give (a ``TargetConfig`` subclass
whose ``type`` is the kind's name) and the ``Target`` subclass, here overriding ``list_tasks``
and ``invalid_id_reason`` of the built-in class it extends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from pydantic import Field

from reaper.targets import ListRequest, Task
from reaper.targets.data_pipeline import DataPipelineConfig, DataPipelineTarget

__all__ = ["ExamplePipelineConfig", "ExamplePipelineTarget"]


class ExamplePipelineConfig(DataPipelineConfig):
    """``target:`` settings for ``type: example_pipeline``: data_pipeline's, plus ``id_prefix``."""

    # The kind's name, as policies write it: the entry point's name.
    type: Literal["example_pipeline"]  # type: ignore[assignment]
    id_prefix: Literal["task_", "manual_"] = Field(
        "task_", description="Only tasks whose id starts with this are listed (and deleted)."
    )


class ExamplePipelineTarget(DataPipelineTarget):
    """The data_pipeline API, limited to the tasks whose id starts with ``id_prefix``."""

    kind = "example_pipeline"
    config_model = ExamplePipelineConfig

    config: ExamplePipelineConfig

    async def list_tasks(self, request: ListRequest) -> AsyncIterator[Task]:
        async for task in super().list_tasks(request):
            if task.id.startswith(self.config.id_prefix):
                yield task

    def invalid_id_reason(self, task_id: str) -> str | None:
        if isinstance(task_id, str) and not task_id.startswith(self.config.id_prefix):
            return f"id does not start with {self.config.id_prefix!r}"
        return super().invalid_id_reason(task_id)
