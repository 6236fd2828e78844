"""Shards: splitting the policies between N machines that each run ``reaper run --shard K/N``.

A policy belongs to shard ``sha256(name) mod N``, its (instance) name read as UTF-8 and the whole
digest as one big-endian number. The rule is stable across processes, hosts, Python versions and
hash seeds (Python's ``hash()`` is salted per process, so it never decides this), and every
policy is in exactly one shard for any N. Shards are numbered from 0, as Kubernetes numbers the
pods of an Indexed Job (``JOB_COMPLETION_INDEX``).

Adding or removing a policy moves no other policy; changing N moves most of them, which is
harmless: a shard is only which process runs a policy, and the run ledger and the policy lock
still allow one run per slot.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from reaper.errors import ConfigError

__all__ = ["COUNT_VARIABLE", "INDEX_VARIABLE", "Shard", "parse_shard", "shard_of"]

#: What Kubernetes sets in every pod of an Indexed Job: the pod's completion index, from 0.
INDEX_VARIABLE = "JOB_COMPLETION_INDEX"
#: The setting that carries the number of shards to ``--shard auto`` (Kubernetes does not tell a
#: pod its Job's ``spec.completions``: the manifest sets this to the same number).
COUNT_VARIABLE = "REAPER_SHARD_COUNT"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=_Named)


def shard_of(name: str, count: int) -> int:
    """The shard (0 to count-1) a policy of this name belongs to."""
    if count < 1:
        raise ValueError("the number of shards must be at least 1")
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} does not exist")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, name: str) -> bool:
        """Whether the policy of this name is in this shard."""
        return shard_of(name, self.count) == self.index

    def select(self, items: Iterable[T]) -> list[T]:
        """The items (policies) whose name is in this shard, in their order."""
        return [item for item in items if self.holds(item.name)]


_SPEC = re.compile(r"(\d{1,6})/(\d{1,6})")


def parse_shard(text: str, environ: Mapping[str, str], count: int | None = None) -> Shard:
    """``K/N`` (K from 0), or ``auto``: K from ``JOB_COMPLETION_INDEX`` and N from ``count``
    (the ``REAPER_SHARD_COUNT`` setting). Raises ConfigError saying what is wrong."""
    if text == "auto":
        raw = environ.get(INDEX_VARIABLE)
        if raw is None:
            raise ConfigError(
                f"--shard auto reads {INDEX_VARIABLE}, which is not set: it is set in the pods "
                "of a Kubernetes Indexed Job (completionMode: Indexed); elsewhere give --shard K/N"
            )
        if not raw.isdigit():
            raise ConfigError(f"{INDEX_VARIABLE}={raw!r} is not a completion index")
        if count is None:
            raise ConfigError(
                f"--shard auto needs the number of shards: set {COUNT_VARIABLE} to the Job's "
                "spec.completions"
            )
        index = int(raw)
        if index >= count:
            raise ConfigError(
                f"{INDEX_VARIABLE}={index} is not below {COUNT_VARIABLE}={count}: set "
                f"{COUNT_VARIABLE} to the Job's spec.completions"
            )
        return Shard(index, count)
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ConfigError(f"--shard {text!r}: expected K/N (e.g. 0/4) or auto")
    index, total = int(match.group(1)), int(match.group(2))
    if total < 1:
        raise ConfigError(f"--shard {text}: N must be at least 1")
    if index >= total:
        raise ConfigError(
            f"--shard {text}: shards are numbered from 0, so K must be below N "
            f"(0/{total} to {total - 1}/{total})"
        )
    return Shard(index, total)
