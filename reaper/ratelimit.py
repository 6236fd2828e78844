"""A rate limiter shared by every worker that talks to one target.

It hands out evenly spaced send slots (a virtual-time token bucket, also known as GCRA): at most
``burst`` requests may go at once after an idle period, and over any longer window the average
never exceeds the rate. Spacing requests evenly, rather than bursting a whole second's budget, is
what keeps a server-side limiter of the same rate from ever answering 429.

When the server answers 429 anyway (its limit is lower than configured, or shared with other
clients), the limiter halves its rate and then recovers additively with each success, never above
the configured rate: waiting out ``Retry-After`` alone would hit the same wall again.

Slots are booked ahead and slept for, and a busy event loop wakes sleepers late, several at once:
the requests of several slots would then leave together, and a server counts what arrives, not
what was booked. So a request also leaves no closer to the ones before it than the rate and
``burst`` allow (the same token bucket, over departures), waiting a little more if it must.

It halves once per congestion episode, as TCP does once per window: N requests in flight when the
server starts refusing come back as N 429s, but they are one signal, sent before the rate went
down. Each request remembers which decrease it was sent after (a context variable set by
:meth:`RateLimiter.acquire`, read by :meth:`RateLimiter.throttle` in the same task), and only a
429 to a request sent after the latest decrease lowers the rate again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import ContextVar

from reaper.converters import Rate

__all__ = ["RateLimiter"]

#: The limiter the current task last acquired a slot from, and its decrease count at that time.
_SENT: ContextVar[tuple[RateLimiter, int] | None] = ContextVar("reaper_limiter_sent", default=None)


class RateLimiter:
    """Grant send slots at ``rate``; ``pause_until`` holds every worker back (e.g. Retry-After)."""

    def __init__(
        self,
        rate: Rate,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._interval = rate.interval
        self._floor = min(rate.per_second, 0.1)
        self.current = rate.per_second
        #: How often the rate was lowered; a request sent after the n-th decrease carries n.
        self.decreases = 0
        self._next_slot = 0.0  # virtual time of the next free slot
        self._departure = 0.0  # the same, over the times requests actually left
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def reserve(self) -> float:
        """Reserve the next slot and return how long the caller must wait for it."""
        now = self._clock()
        # After an idle period the bucket is full: up to `burst` slots are available at once.
        earliest = max(now - (self.burst - 1) * self._interval, self._paused_until)
        slot = max(self._next_slot, earliest)
        self._next_slot = slot + self._interval
        return max(0.0, slot - now)

    def depart(self) -> float:
        """Record a departure now if it keeps to the rate, and return 0; otherwise return how
        long to wait before trying again (after a late wake-up, say)."""
        now = self._clock()
        earliest = self._departure - (self.burst - 1) * self._interval
        if now < earliest:
            return earliest - now
        self._departure = max(self._departure, now) + self._interval
        return 0.0

    async def acquire(self) -> None:
        """Wait until this caller may send one request."""
        async with self._lock:
            delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
        while (late := self.depart()) > 0:
            await asyncio.sleep(late)
        # Recorded when the request leaves, not when its slot was booked: a decrease during the
        # wait already applies to it.
        _SENT.set((self, self.decreases))

    def throttle(self) -> bool:
        """The server said 429: halve the rate (down to 0.1/s), once per congestion episode.

        A 429 to a request this task sent before the latest decrease is part of the episode that
        decrease answered, and is ignored. Without a known send (no :meth:`acquire` of this
        limiter in the calling task) every call halves. Returns whether the rate went down.
        """
        sent = _SENT.get()
        if sent is not None and sent[0] is self and sent[1] < self.decreases:
            return False
        self.decreases += 1
        self._set(max(self._floor, self.current / 2))
        return True

    def recover(self) -> None:
        """A request succeeded: creep back towards the configured rate."""
        if self.current < self.rate.per_second:
            self._set(min(self.rate.per_second, self.current + self.rate.per_second / 20))

    def _set(self, per_second: float) -> None:
        self.current = per_second
        self._interval = 1.0 / per_second

    def pause_until(self, deadline: float) -> None:
        """Grant no slot before ``deadline`` (monotonic seconds), e.g. after a 429 Retry-After."""
        if deadline > self._paused_until:
            self._paused_until = deadline
            self._next_slot = max(self._next_slot, deadline)
