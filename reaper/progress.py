"""How a run shows its progress: a bar per running policy on a terminal, log lines otherwise.

On a TTY, ``reaper run`` draws one transient bar per policy deleting (rich), in one live display
that log lines print above; elsewhere (journald, a CronJob's log) each batch is one structured
``batch_done`` line with its outcomes and what is left.
"""

from __future__ import annotations

from typing import Any

import structlog
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reaper.execute import BatchEvent
from reaper.plan import Plan

__all__ = ["BatchReporter", "ProgressBars"]

log = structlog.get_logger("reaper.cli")


class ProgressBars:
    """On a TTY, one progress bar per running policy, in one live display."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None

    def add(self, name: str, total: int) -> Any:
        """A bar for a policy about to delete (None when stderr is not a TTY)."""
        if not self.console.is_terminal:
            return None
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
                # Log lines written meanwhile go through the console, above the bar: reaper.logs
                # writes to whatever sys.stderr is, and this swaps in rich's proxy.
                redirect_stderr=True,
            )
            self.progress.start()
        # Descriptions are markup: a template instance's name has brackets.
        return self.progress.add_task(escape(name), total=total)

    def advance(self, bar: Any, size: int) -> None:
        if self.progress is not None:
            self.progress.advance(bar, size)

    def remove(self, bar: Any) -> None:
        if self.progress is not None:
            self.progress.remove_task(bar)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class BatchReporter:
    """A policy's progress bar on a TTY; one structured log line per batch otherwise."""

    def __init__(self, console: Console, bars: ProgressBars | None = None) -> None:
        # A reporter of its own (one policy) owns its display; in a fleet run the bars are shared.
        self.owns_bars = bars is None
        self.bars = bars or ProgressBars(console)
        self.bar: Any = None

    def plan(self, plan: Plan) -> None:
        if plan.eligible:
            self.bar = self.bars.add(plan.policy.name, plan.eligible)

    def batch(self, event: BatchEvent) -> None:
        if self.bar is not None:
            self.bars.advance(self.bar, event.size)
            return
        outcomes: dict[str, int] = {}
        for result in event.results:
            outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1
        log.info(
            "batch_done",
            batch=event.batch_no,
            size=event.size,
            **outcomes,
            deleted_total=event.summary.deleted,
            failed_total=event.summary.failed,
            remaining=event.total
            - event.summary.deleted
            - event.summary.already_gone
            - event.summary.failed
            - event.summary.unknown,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bars.remove(self.bar)
            self.bar = None
        if self.owns_bars:
            self.bars.close()
