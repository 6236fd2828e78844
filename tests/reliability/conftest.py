"""Fixtures of the reliability suite, and the fault matrix's table at the end of the session."""

from __future__ import annotations

import pytest
import yaml

from reaper.policy import LoadedPolicy, load_policy_text

from .drivers import DRIVERS, Secrets, pointed_policies


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from .test_fault_matrix import RESULTS, table

    if RESULTS:
        terminalreporter.section("reliability: fault matrix")
        terminalreporter.write_line(table(RESULTS))


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedPolicy]:
    """The first example policy of every target, aimed at an unreachable host, keeping nothing
    back (no keep.newest): whatever a broken answer could make deletable, it would."""
    directory = tmp_path_factory.mktemp("secrets")
    out = {}
    for kind, driver in DRIVERS.items():
        driver.write_secrets(Secrets(), directory)
        [doc, *_] = pointed_policies(
            driver,
            "http://sim.invalid",
            directory,
            target={"retries": {"attempts": 1}},
            delete={"rate": "1000/s", "burst": 10},
        )
        doc.pop("keep", None)
        if kind == "data_pipeline":
            # Every generated example is a world of its own, though they share one audit store:
            # an earlier example's 504 must not hold this one's task back.
            doc["target"]["settle_after"] = "0s"
        [out[kind]] = load_policy_text(yaml.safe_dump(doc))
    return out
