"""Running many policies at once: a bound on how many, and an order spread over endpoints.

``reaper run`` starts up to ``REAPER_MAX_PARALLEL_POLICIES`` policy runs at once, each an asyncio
task of its own (so each has its own structlog context: ``run_id`` and ``policy`` on every line).
Policies reaching one endpoint share its request budget (:mod:`reaper.budgets`): a second run
there gains little while another endpoint with no run at all would sit idle. So the next run to
start is at the endpoint with the fewest runs going, then with the most policies still waiting
(likely the longest to finish), then the first loaded. Results come back in the order given.

Policies over the same tasks (one target: same kind, same URL, same project or instance, as
:func:`same_tasks` says) take turns, here and in ``reaper serve`` (:class:`Turns`): run together,
two of them would send the same ids twice, at times in overlapping requests, and one's listing
and verification would interleave with the other's deletions (a deletion the target acknowledged
without effect, then done by the other policy's request, would look done to the first). Their
shared endpoint budget sets their pace anyway, so taking turns costs next to nothing.

Once ``stop`` is set no further run starts; runs going on finish (they see the same event). A run
that raises lets the others finish, starts no more, and its exception is raised at the end.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from reaper.policy import LoadedPolicy

__all__ = ["Turns", "run_spread", "same_tasks"]

T = TypeVar("T")
R = TypeVar("R")


async def run_spread(
    items: Sequence[T],
    run: Callable[[T], Coroutine[object, object, R]],
    *,
    limit: int,
    group: Callable[[T], Hashable],
    exclusive: Callable[[T], Hashable] | None = None,
    stop: asyncio.Event | None = None,
) -> list[R]:
    """``run`` each item, at most ``limit`` at once, spread over ``group`` (the endpoint), never
    two items of one ``exclusive`` key at once; the results of the runs that started, in the
    order of ``items``."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    keys = [group(item) for item in items]
    turns = [
        exclusive(item) if exclusive is not None else index for index, item in enumerate(items)
    ]
    busy: set[Hashable] = set()
    pending = list(range(len(items)))
    waiting = Counter(keys)
    going: Counter[Hashable] = Counter()
    tasks: dict[asyncio.Task[R], int] = {}
    results: dict[int, R] = {}
    error: BaseException | None = None

    def may_start() -> bool:
        return bool(pending) and error is None and not (stop is not None and stop.is_set())

    def startable() -> list[int]:
        return [i for i in pending if turns[i] not in busy] if len(tasks) < limit else []

    try:
        while may_start() or tasks:
            while may_start() and (ready := startable()):
                index = min(ready, key=lambda i: (going[keys[i]], -waiting[keys[i]], i))
                pending.remove(index)
                waiting[keys[index]] -= 1
                going[keys[index]] += 1
                busy.add(turns[index])
                tasks[asyncio.create_task(run(items[index]))] = index
            if not tasks:
                break
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = tasks.pop(task)
                going[keys[index]] -= 1
                busy.discard(turns[index])
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


def same_tasks(item: LoadedPolicy) -> Hashable:
    """The tasks a policy's target shows: its kind and its secret-free description (URL,
    project, instance). Policies with one key take turns; a target kind whose description does
    not say more than its name makes all its policies take turns (the safe side)."""
    config = item.policy.target_config
    return (config.type, config.describe())


class Turns:
    """One turn at a time per key, for runs started independently (``reaper serve``)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._waiting: Counter[Hashable] = Counter()

    @asynccontextmanager
    async def of(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._waiting[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                self._locks.pop(key, None)
