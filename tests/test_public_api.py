"""The package's public face."""

from __future__ import annotations

import reaper


class TestPublicApi:
    def test_all_names_exist(self) -> None:
        """Every name in reaper.__all__ is importable from reaper."""
        for name in reaper.__all__:
            assert hasattr(reaper, name), name

    def test_all_is_sorted_and_unique(self) -> None:
        """__all__ has no duplicates (and stays sorted for review)."""
        assert len(set(reaper.__all__)) == len(reaper.__all__)
        assert list(reaper.__all__) == sorted(reaper.__all__)
