"""The shared rate limiter."""

from __future__ import annotations

import asyncio

import pytest

from reaper.converters import Rate
from reaper.ratelimit import RateLimiter


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
