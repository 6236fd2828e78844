"""What a target that keeps state is handed: the interfaces of reaper's stores.

Most task APIs list their own tasks, and their targets need nothing but HTTP. A kind that must
remember something between runs declares ``Target.keeps_state``; the runner then hands it a
:class:`TargetState` (its constructor's ``state``), whose stores reaper implements over its own
database (:class:`reaper.inventory.Inventory` implements :class:`TaskInventory`). Targets never
open a database, and the dependencies run one way: targets know these interfaces, the stores
implement them, and the runner puts the two together.

Listing never writes. A target reads its state while listing, keeps what it learnt, and writes
it in :meth:`~reaper.targets.base.Target.save_state`, which the runner calls after a complete
listing in a run that may delete; ``reaper plan`` and dry runs only describe it
(:meth:`~reaper.targets.base.Target.state_changes`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["TargetState", "TaskInventory", "TrackedTask"]


@dataclass(frozen=True)
class TrackedTask:
    """One task registered with reaper because its API cannot list it (an inventory entry)."""

    #: The store's handle for the entry.
    id: int
    base_url: str
    token: str
    type: str
    name: str | None
    registered_at: datetime
    retired_at: datetime | None = None
    retired_reason: str | None = None
    last_status: str | None = None
    last_checked_at: datetime | None = None

    @property
    def task_id(self) -> str:
        """The id plans and the audit use: ``<type>:<token>``."""
        return f"{self.type}:{self.token}"

    def as_dict(self) -> dict[str, Any]:
        return {
            key: (value.isoformat() if isinstance(value, datetime) else value)
            for key, value in self.__dict__.items()
        }


class TaskInventory(ABC):
    """The tasks registered with reaper per deployment, for APIs without a list endpoint.

    An entry is retired (kept, but no longer listed) only after an audit row says its task is
    gone; reads never change anything. Failures raise :class:`~reaper.errors.AuditError`.
    """

    @abstractmethod
    def entries(
        self, base_url: str | None = None, *, types: Iterable[str], include_retired: bool = False
    ) -> list[TrackedTask]:
        """Entries of one deployment (or all) of the given types, oldest registration first."""

    @abstractmethod
    def gone_per_audit(self, base_url: str) -> list[tuple[TrackedTask, str]]:
        """Active entries whose task an audit row records as gone, each with the reason to
        retire it (naming the row)."""

    @abstractmethod
    def retire(self, retirements: Sequence[tuple[TrackedTask, str]]) -> list[TrackedTask]:
        """Retire entries, each with its reason; returns those this call retired."""

    @abstractmethod
    def note_statuses(self, checked: Sequence[tuple[int, str | None]]) -> None:
        """Store the status each entry (by id) had when last checked (None: not found)."""

    @abstractmethod
    def record_gone(
        self, base_url: str, gone: Sequence[tuple[TrackedTask, str]]
    ) -> list[TrackedTask]:
        """Audit tasks the target reports as not found (``already_gone``, with the target's
        words), then retire their entries from those rows; returns the retired entries."""


@dataclass(frozen=True)
class TargetState:
    """reaper's stores, as a target that keeps state sees them."""

    inventory: TaskInventory
