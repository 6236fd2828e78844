"""A small, strict subset of JSON paths for configuration: where a value sits in a response.

``data.tasks``, ``data.tasks[*]`` (the same list), ``items[0].id``, ``$`` (the whole document),
``meta["next-page"]`` (a key that is not an identifier). Nothing else: no filters, no recursive
descent, no slices. A path that does not lead anywhere answers :data:`MISSING`, never raises, so a
caller can tell "absent" from ``null``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MISSING", "JsonPath"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()

_TOKEN = re.compile(
    r"""
    \.?(?P<key>[A-Za-z_][A-Za-z0-9_-]*)    # .key or a leading key
    | \[(?P<index>\d+)\]                   # [0]
    | \[(?P<star>\*)\]                     # [*]: the list itself
    | \[["'](?P<quoted>[^"'\]]+)["']\]     # ["any key"]
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class JsonPath:
    """A parsed path; ``JsonPath.parse("data.tasks")``."""

    text: str
    steps: tuple[str | int | None, ...]  # key, index, or None for [*]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        """Parse ``text``; ValueError for anything outside the subset."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a JSON path must be a non-empty string such as 'data.items'")
        body = text.strip()
        if body.startswith("$"):
            body = body[1:]
        steps: list[str | int | None] = []
        pos = 0
        while pos < len(body):
            match = _TOKEN.match(body, pos)
            if match is None or (match.group("key") and pos and body[pos] != "."):
                raise ValueError(
                    f"invalid JSON path {text!r} at position {pos}; use dotted keys, [0] or [*]"
                )
            if match.group("key") is not None:
                steps.append(match.group("key"))
            elif match.group("index") is not None:
                steps.append(int(match.group("index")))
            elif match.group("star") is not None:
                if match.end() != len(body):
                    raise ValueError(f"invalid JSON path {text!r}: [*] must come last")
                steps.append(None)
            else:
                steps.append(match.group("quoted"))
            pos = match.end()
        return cls(text, tuple(steps))

    def get(self, document: Any) -> Any:
        """The value at this path, or MISSING."""
        current = document
        for step in self.steps:
            if step is None:
                if not isinstance(current, list):
                    return MISSING
            elif isinstance(step, int):
                if not isinstance(current, list) or step >= len(current):
                    return MISSING
                current = current[step]
            else:
                if not isinstance(current, dict) or step not in current:
                    return MISSING
                current = current[step]
        return current

    def __str__(self) -> str:
        return self.text
