"""Running many policies at once: a bound on how many, and an order spread over endpoints.

``reaper run`` starts up to ``REAPER_MAX_PARALLEL_POLICIES`` policy runs at once, each an asyncio
task of its own (so each has its own structlog context: ``run_id`` and ``policy`` on every line).
Policies reaching one endpoint share its request budget (:mod:`reaper.budgets`): a second run
there gains little while another endpoint with no run at all would sit idle. So the next run to
start is at the endpoint with the fewest runs going, then with the most policies still waiting
(likely the longest to finish), then the first loaded. Results come back in the order given.

Once ``stop`` is set no further run starts; runs going on finish (they see the same event). A run
that raises lets the others finish, starts no more, and its exception is raised at the end.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import TypeVar

__all__ = ["run_spread"]

T = TypeVar("T")
R = TypeVar("R")


async def run_spread(
    items: Sequence[T],
    run: Callable[[T], Coroutine[object, object, R]],
    *,
    limit: int,
    group: Callable[[T], Hashable],
    stop: asyncio.Event | None = None,
) -> list[R]:
    """``run`` each item, at most ``limit`` at once, spread over ``group`` (the endpoint);
    the results of the runs that started, in the order of ``items``."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    keys = [group(item) for item in items]
    pending = list(range(len(items)))
    waiting = Counter(keys)
    going: Counter[Hashable] = Counter()
    tasks: dict[asyncio.Task[R], int] = {}
    results: dict[int, R] = {}
    error: BaseException | None = None

    def may_start() -> bool:
        return bool(pending) and error is None and not (stop is not None and stop.is_set())

    try:
        while may_start() or tasks:
            while may_start() and len(tasks) < limit:
                index = min(pending, key=lambda i: (going[keys[i]], -waiting[keys[i]], i))
                pending.remove(index)
                waiting[keys[index]] -= 1
                going[keys[index]] += 1
                tasks[asyncio.create_task(run(items[index]))] = index
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = tasks.pop(task)
                going[keys[index]] -= 1
                try:
                    results[index] = task.result()
                except Exception as exc:  # raised below, once the others have ended
                    error = error or exc
    finally:
        for task in tasks:
            task.cancel()  # only when this coroutine itself is cancelled
    if error is not None:
        raise error
    return [results[index] for index in sorted(results)]
