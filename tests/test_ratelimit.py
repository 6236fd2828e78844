"""The shared rate limiter."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable

import httpx
import pytest

from reaper.converters import Rate
from reaper.http import RequestFailed, RetryPolicy, TargetHttp
from reaper.ratelimit import RateLimiter
from reaper.simulators import DataPipelineSimulator, Faults


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestSlots:
    def test_evenly_spaced(self) -> None:
        """Back-to-back reservations are one interval apart: no burst beyond `burst`."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), clock=clock)
        waits = [limiter.reserve() for _ in range(5)]
        assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])

    def test_burst_after_idle(self) -> None:
        """After idling, `burst` requests may go at once, then spacing resumes."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), burst=3, clock=clock)
        waits = [limiter.reserve() for _ in range(5)]
        assert waits == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2])

    def test_idle_time_is_not_banked_beyond_burst(self) -> None:
        """A long idle period does not allow more than `burst` immediate requests."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), burst=2, clock=clock)
        limiter.reserve()
        clock.now += 100
        waits = [limiter.reserve() for _ in range(4)]
        assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2])

    def test_pause_holds_everyone(self) -> None:
        """pause_until (a 429's Retry-After) delays every following slot."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), clock=clock)
        limiter.reserve()
        limiter.pause_until(clock.now + 2.0)
        assert limiter.reserve() == pytest.approx(2.0)
        assert limiter.reserve() == pytest.approx(2.1)

    def test_average_never_exceeds_rate(self) -> None:
        """Over any window the number of granted slots is at most rate*window + burst."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(20), burst=2, clock=clock)
        slots = []
        for step in range(400):
            clock.now = 1000.0 + step * 0.013  # callers arrive faster than the rate
            slots.append(clock.now + limiter.reserve())
        for start in range(len(slots)):
            window_end = slots[start] + 1.0
            in_window = sum(1 for s in slots[start:] if s < window_end)
            assert in_window <= 20 + 2

    def test_late_wake_ups_leave_spaced(self) -> None:
        """Slots booked before the event loop stalled do not all leave when it resumes: each
        departure keeps the rate's spacing from the one before (burst permitting)."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), clock=clock)
        assert [limiter.reserve() for _ in range(5)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
        clock.now += 0.5  # every booked slot has passed
        assert limiter.depart() == 0.0
        assert limiter.depart() == pytest.approx(0.1)
        clock.now += 0.1
        assert limiter.depart() == 0.0
        bursty = RateLimiter(Rate(10), burst=2, clock=clock)
        assert [bursty.depart(), bursty.depart()] == [0.0, 0.0]
        assert bursty.depart() == pytest.approx(0.1)

    def test_refuses_bad_burst(self) -> None:
        """A burst below 1 is a programming error."""
        with pytest.raises(ValueError, match="burst"):
            RateLimiter(Rate(1), burst=0)


class TestAcquire:
    def test_acquire_sleeps_for_the_slot(self) -> None:
        """acquire() waits for real time: 6 slots at 50/s take at least 0.1 s."""

        async def main() -> float:
            limiter = RateLimiter(Rate(50))
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.gather(*(limiter.acquire() for _ in range(6)))
            return loop.time() - start

        assert asyncio.run(main()) >= 0.09

    def test_a_stalled_event_loop_does_not_send_a_burst(self) -> None:
        """Workers whose slots passed while the event loop was busy leave one interval apart
        when it resumes, not all at once."""

        async def main() -> list[float]:
            limiter = RateLimiter(Rate(20))
            left: list[float] = []

            async def worker() -> None:
                await limiter.acquire()
                left.append(time.monotonic())

            workers = [asyncio.create_task(worker()) for _ in range(5)]
            await asyncio.sleep(0)  # each books its slot: 0, 50, ..., 200 ms from now
            time.sleep(0.4)  # the point: the loop is blocked past them all
            await asyncio.gather(*workers)
            return left

        left = asyncio.run(main())
        gaps = [later - earlier for earlier, later in itertools.pairwise(left)]
        assert min(gaps) >= 0.05 * 0.95


class TestAdaptive:
    def test_throttle_halves_and_recover_creeps_back(self) -> None:
        """A 429 halves the rate; successes bring it back, never above the configured rate."""
        limiter = RateLimiter(Rate(20), clock=FakeClock())
        limiter.throttle()
        assert limiter.current == pytest.approx(10)
        limiter.throttle()
        assert limiter.current == pytest.approx(5)
        for _ in range(100):
            limiter.recover()
        assert limiter.current == pytest.approx(20)

    def test_throttled_spacing(self) -> None:
        """After a throttle, slots are spaced at the reduced rate."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(10), clock=clock)
        limiter.throttle()
        waits = [limiter.reserve() for _ in range(3)]
        assert waits == pytest.approx([0.0, 0.2, 0.4])

    def test_floor(self) -> None:
        """The rate never drops below 0.1/s however often the server says 429."""
        limiter = RateLimiter(Rate(10), clock=FakeClock())
        for _ in range(50):
            limiter.throttle()
        assert limiter.current == pytest.approx(0.1)


class InFlight:
    """Requests sent together by separate workers (tasks, as the executor's workers are).

    Each worker acquires a slot (its request leaves), then waits for its answer; answering it
    429 makes the worker call ``throttle`` and return whether the rate went down.
    """

    def __init__(self, limiter: RateLimiter, n: int) -> None:
        self.limiter = limiter
        self.answers = [asyncio.Event() for _ in range(n)]
        self._sent = 0
        self._all_sent = asyncio.Event()
        self.tasks = [asyncio.create_task(self._worker(answer)) for answer in self.answers]

    async def _worker(self, answer: asyncio.Event) -> bool:
        await self.limiter.acquire()
        self._sent += 1
        if self._sent == len(self.answers):
            self._all_sent.set()
        await answer.wait()
        return self.limiter.throttle()

    async def sent(self) -> InFlight:
        await self._all_sent.wait()
        return self

    async def refuse(self, which: slice = slice(None)) -> list[bool]:
        """Answer the chosen requests 429; return, per request, whether the rate went down."""
        for answer in self.answers[which]:
            answer.set()
        return list(await asyncio.gather(*self.tasks[which]))


class TestCongestionEpisodes:
    def test_concurrent_429s_halve_once(self) -> None:
        """Eight requests in flight together, all answered 429: the rate is halved once."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(100), burst=8, clock=clock)

        async def main() -> list[bool]:
            burst = await InFlight(limiter, 8).sent()
            clock.now += 0.005  # the answers come back a little later
            return await burst.refuse()

        lowered = asyncio.run(main())
        assert lowered.count(True) == 1
        assert limiter.current == pytest.approx(50)
        assert limiter.decreases == 1

    def test_a_request_sent_after_the_decrease_halves_again(self) -> None:
        """After the decrease, a request sent one interval later and refused halves again; a
        straggler of the first burst that comes back later still does not."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(100), burst=8, clock=clock)

        async def main() -> tuple[list[bool], list[bool], list[bool]]:
            burst = await InFlight(limiter, 8).sent()
            clock.now += 0.005
            first = await burst.refuse(slice(0, 7))
            assert limiter.current == pytest.approx(50)
            clock.now += 1 / 50  # one interval at the lowered rate
            later = await (await InFlight(limiter, 1).sent()).refuse()
            clock.now += 1.0
            straggler = await burst.refuse(slice(7, 8))
            return first, later, straggler

        first, later, straggler = asyncio.run(main())
        assert first.count(True) == 1
        assert later == [True]
        assert straggler == [False]
        assert limiter.current == pytest.approx(25)
        assert limiter.decreases == 2

    def test_a_decrease_during_the_wait_applies(self) -> None:
        """A request whose slot was booked before a decrease but which left after it belongs to
        the new episode: its 429 lowers the rate again."""
        clock = FakeClock()
        limiter = RateLimiter(Rate(100), clock=clock)

        async def main() -> bool:
            limiter.reserve()  # the next slot is 10 ms away
            waiting = asyncio.create_task(limiter.acquire())
            await asyncio.sleep(0)  # booked, now sleeping until its slot
            assert limiter.throttle()  # a 429 from elsewhere lowers the rate meanwhile
            await waiting
            return limiter.throttle()  # only this task's request, sent after the decrease

        assert asyncio.run(main()) is True
        assert limiter.current == pytest.approx(25)

    def test_floor_is_reached_once_per_episode(self) -> None:
        """Near the floor an episode still lowers the rate once, to 0.1/s and not below."""
        limiter = RateLimiter(Rate(0.15), burst=4, clock=FakeClock())

        async def main() -> list[bool]:
            return await (await InFlight(limiter, 4).sent()).refuse()

        assert asyncio.run(main()).count(True) == 1
        assert limiter.current == pytest.approx(0.1)

    def test_another_limiters_send_does_not_count(self) -> None:
        """A task's send through one target's limiter says nothing about another target's 429s."""
        clock = FakeClock()
        first, second = RateLimiter(Rate(100), clock=clock), RateLimiter(Rate(100), clock=clock)

        async def main() -> None:
            await first.acquire()
            assert second.throttle()
            assert second.throttle()  # no send through `second` is known: each 429 counts
            assert first.throttle()
            assert not first.throttle()  # this task's one request: its episode is answered

        asyncio.run(main())
        assert second.current == pytest.approx(25)
        assert first.current == pytest.approx(50)


class TestAgainstASimulator:
    def test_workers_refused_together_lower_the_rate_once(
        self, data_pipeline: Callable[..., tuple[DataPipelineSimulator, str]]
    ) -> None:
        """Eight workers whose requests a data_pipeline server refuses at once (429, its bucket
        empty) lower the shared limiter's rate once, not eight times."""
        # One token, refilled every 100 s: after the first request, everything is a 429.
        sim, url = data_pipeline(n=3, faults=Faults(rate_limit=0.01, rate_limit_burst=1))
        tasks_url = f"{url}/api/v0/data_pipeline/tasks"
        assert httpx.get(tasks_url, params={"limit": 1}).status_code == 200  # takes the token
        # A fresh limiter: its bucket is full, so the eight requests leave together.
        limiter = RateLimiter(Rate(100), burst=8)

        async def main() -> list[object]:
            async with httpx.AsyncClient(timeout=10) as client:
                http = TargetHttp(
                    client,
                    limiter,
                    # the second attempt is refused too and ends the request (no more throttles)
                    RetryPolicy(attempts=2, backoff=0.001, max_backoff=0.002),
                    max_retry_after=0.01,
                    rng=random.Random(1),
                )
                return await asyncio.gather(
                    *(http.send("GET", tasks_url, params={"limit": 1}) for _ in range(8)),
                    return_exceptions=True,
                )

        results = asyncio.run(main())
        assert all(isinstance(r, RequestFailed) and r.http_status == 429 for r in results)
        assert sim.stats["status_429"] == 16  # eight workers, two attempts each
        assert sim.stats["status_2xx"] == 1
        assert limiter.current == pytest.approx(50)
        assert limiter.decreases == 1
