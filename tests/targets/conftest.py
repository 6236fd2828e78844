"""Fixtures for the Huawei targets: credentials in the environment, simulators, policies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import yaml
from conftest import NOW

from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import build_target
from reaper.simulators import (
    DcsSimTask,
    Faults,
    HuaweiDcsSimulator,
    HuaweiIotdaSimulator,
    IotdaSimTask,
)
from reaper.targets.base import ListRequest, Target, Task

PROJECT = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Credentials:
    """The test credentials, and the environment variables that hold them."""

    ak: str = "HWTESTAK7Q2M9X4L1P0Z"
    sk: str = "hwTestSecretKey-5c1e9a7b3d2f4e6a8b0c"
    token: str = "MIIhwTestToken-0f9e8d7c6b5a4"
    ak_env: str = "REAPER_TEST_HW_AK"
    sk_env: str = "REAPER_TEST_HW_SK"
    token_env: str = "REAPER_TEST_HW_TOKEN"

    def aksk(self) -> dict[str, str]:
        return {"type": "aksk", "ak_env": self.ak_env, "sk_env": self.sk_env}

    def token_auth(self) -> dict[str, str]:
        return {"type": "token", "token_env": self.token_env}


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> Credentials:
    """Test credentials, exported in the environment the policies name."""
    credentials = Credentials()
    monkeypatch.setenv(credentials.ak_env, credentials.ak)
    monkeypatch.setenv(credentials.sk_env, credentials.sk)
    monkeypatch.setenv(credentials.token_env, credentials.token)
    return credentials


def dcs_task(
    task_id: str, status: str = "SUCCESS", age: timedelta = timedelta(days=40), **extra: Any
) -> DcsSimTask:
    """A DCS task created ``age`` before the tests' NOW."""
    return DcsSimTask(id=task_id, status=status, created_at=NOW - age, **extra)


_COUNTER = iter(range(1, 1_000_000))


def iotda_task(
    status: str = "Success",
    age: timedelta = timedelta(days=40),
    task_type: str = "firmwareUpgrade",
    **extra: Any,
) -> IotdaSimTask:
    """An IoTDA task created ``age`` before NOW, with a fresh ObjectId-like id."""
    created = NOW - age
    task_id = f"{int(created.timestamp()):08x}{next(_COUNTER):016x}"
    return IotdaSimTask(task_id, task_type, status, created.replace(microsecond=0), **extra)


@pytest.fixture
def dcs_sim(creds: Credentials) -> Iterator[Callable[..., tuple[HuaweiDcsSimulator, str]]]:
    """Start DCS simulators that accept the test AK/SK and token; stopped after the test."""
    started: list[HuaweiDcsSimulator] = []

    def start(
        tasks: list[DcsSimTask] | None = None, *, faults: Faults | None = None, **kwargs: Any
    ) -> tuple[HuaweiDcsSimulator, str]:
        kwargs.setdefault("credentials", {creds.ak: creds.sk})
        kwargs.setdefault("tokens", [creds.token])
        sim = HuaweiDcsSimulator(tasks or [], project_id=PROJECT, faults=faults, seed=1, **kwargs)
        url = sim.start()
        started.append(sim)
        return sim, url

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def iotda_sim(creds: Credentials) -> Iterator[Callable[..., tuple[HuaweiIotdaSimulator, str]]]:
    """Start IoTDA simulators that accept the test AK/SK and token; stopped after the test."""
    started: list[HuaweiIotdaSimulator] = []

    def start(
        tasks: list[IotdaSimTask] | None = None, *, faults: Faults | None = None, **kwargs: Any
    ) -> tuple[HuaweiIotdaSimulator, str]:
        kwargs.setdefault("credentials", {creds.ak: creds.sk})
        kwargs.setdefault("tokens", [creds.token])
        sim = HuaweiIotdaSimulator(tasks or [], project_id=PROJECT, faults=faults, seed=1, **kwargs)
        url = sim.start()
        started.append(sim)
        return sim, url

    yield start
    for sim in started:
        sim.stop()


def _policy(target: dict[str, Any], statuses: list[str], sections: dict[str, Any]) -> LoadedPolicy:
    doc: dict[str, Any] = {
        "name": "huawei-test",
        "target": target,
        "select": {"status": statuses, "older_than": "30d"},
        "delete": {"rate": "200/s", "max_fraction": 1.0},
    }
    for key, value in sections.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


@pytest.fixture
def dcs_policy(creds: Credentials) -> Callable[..., LoadedPolicy]:
    """A huawei_dcs policy for a simulator URL; keywords replace sections or target keys."""

    def make(url: str, *, target: dict[str, Any] | None = None, **sections: Any) -> LoadedPolicy:
        settings = {
            "type": "huawei_dcs",
            "endpoint": url,
            "project_id": PROJECT,
            "auth": creds.aksk(),
            **(target or {}),
        }
        return _policy(settings, ["SUCCESS", "FAILED"], sections)

    return make


@pytest.fixture
def iotda_policy(creds: Credentials) -> Callable[..., LoadedPolicy]:
    """A huawei_iotda policy covering firmwareUpgrade and createCommands."""

    def make(url: str, *, target: dict[str, Any] | None = None, **sections: Any) -> LoadedPolicy:
        settings = {
            "type": "huawei_iotda",
            "endpoint": url,
            "project_id": PROJECT,
            "task_types": ["firmwareUpgrade", "createCommands"],
            "auth": creds.aksk(),
            **(target or {}),
        }
        return _policy(settings, ["Success", "Fail", "PartialSuccess", "Stopped"], sections)

    return make


def list_all(loaded: LoadedPolicy, request: ListRequest | None = None) -> list[Task]:
    """Every task the policy's target lists."""

    async def main() -> list[Task]:
        target, client = build_target(loaded)
        try:
            req = request or ListRequest(loaded.policy.age_field)
            return [task async for task in target.list_tasks(req)]
        finally:
            await client.aclose()

    return asyncio.run(main())


async def _with_target(loaded: LoadedPolicy, use: Callable[[Target], Any]) -> Any:
    target, client = build_target(loaded)
    try:
        return await use(target)
    finally:
        await client.aclose()


@pytest.fixture
def lister() -> Callable[..., list[Task]]:
    """list_all(loaded, request=None): every task the policy's target lists."""
    return list_all


@pytest.fixture
def with_target() -> Callable[[LoadedPolicy, Callable[[Target], Any]], Any]:
    """Run ``use(target)`` (a coroutine function) against a freshly built target."""

    def run(loaded: LoadedPolicy, use: Callable[[Target], Any]) -> Any:
        return asyncio.run(_with_target(loaded, use))

    return run


@pytest.fixture
def make_dcs_task() -> Callable[..., DcsSimTask]:
    return dcs_task


@pytest.fixture
def make_iotda_task() -> Callable[..., IotdaSimTask]:
    return iotda_task
