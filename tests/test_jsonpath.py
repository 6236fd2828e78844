"""The JSON path subset used by configurations."""

from __future__ import annotations

import pytest

from reaper.jsonpath import MISSING, JsonPath

DOC = {"data": {"tasks": [{"id": "a", "n": None}], "next-page": "p2"}, "ok": False}


class TestJsonPath:
    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("data.tasks", [{"id": "a", "n": None}]),
            ("data.tasks[*]", [{"id": "a", "n": None}]),
            ("$.data.tasks[0].id", "a"),
            ("data.tasks[0].n", None),
            ('data["next-page"]', "p2"),
            ("ok", False),
            ("$", DOC),
        ],
    )
    def test_get(self, path: str, expected: object) -> None:
        """Dotted keys, indexes, [*] and quoted keys."""
        assert JsonPath.parse(path).get(DOC) == expected

    @pytest.mark.parametrize("path", ["data.missing", "data.tasks[3]", "ok.x", "data.tasks.id"])
    def test_missing(self, path: str) -> None:
        """A path that leads nowhere is MISSING (not None, not an exception)."""
        assert JsonPath.parse(path).get(DOC) is MISSING

    @pytest.mark.parametrize("path", ["", "data..tasks", "data.tasks[*].id", "a[b]", "a.[0]x"])
    def test_invalid(self, path: str) -> None:
        """Anything outside the subset is refused when the configuration loads."""
        with pytest.raises(ValueError):
            JsonPath.parse(path)
