"""Target drivers for the reliability suite: one entry per built-in target.

A driver knows how to start its target's simulator with a realistic, seeded inventory, how to
point the target's example policies (``policies/<kind>.yaml``) at it, which secrets the policies
need, and how to describe each simulated task to the independent oracle (:func:`expected`) that
says which tasks the policies may delete. Adding a target to the fault matrix and the security
tests is one more entry in :data:`DRIVERS`.

The oracle is written from the README's rules, not from ``reaper/plan.py``: it is what the plan
is checked against.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from reaper.policy import Policy, load_policy_text
from reaper.simulators import (
    DataPipelineSimulator,
    Faults,
    HuaweiDcsSimulator,
    HuaweiIotdaSimulator,
    SimulatorBase,
    generate_dcs_tasks,
    generate_iotda_tasks,
    generate_tasks,
)

REPO = Path(__file__).resolve().parents[2]
PROJECT = "0123456789abcdef0123456789abcdef"
MIN_AGE = timedelta(hours=1)  # REAPER_MIN_AGE's default
#: Records this close to a cutoff are left out of inventories: the oracle and the run read the
#: clock a few seconds apart, and a task on the edge may honestly go either way.
EDGE = timedelta(minutes=30)


@dataclass(frozen=True)
class Secrets:
    """Known secret values; the suite greps everything reaper produces for them."""

    ak: str = "RLBAKQ7Z3M9X4L1P0WVU"
    sk: str = "rlbSecretKey-9f1e7a5b3d2c4e6a8b0dXYZ"
    token: str = "MIIrlbToken-7c6b5a4f3e2d1c0b9a8SECRET"
    db_password: str = "rlb-Db-Pa55word-4e1f"

    def values(self) -> dict[str, str]:
        return {
            "ak": self.ak,
            "sk": self.sk,
            "token": self.token,
            "db_password": self.db_password,
        }


@dataclass(frozen=True)
class Record:
    """What the oracle knows about one simulated task, taken from the simulator's own data."""

    id: str
    status: str
    times: Mapping[str, datetime | None]
    fields: Mapping[str, str]
    gone: bool = False


@dataclass(frozen=True)
class Driver:
    """How the suite drives one target kind."""

    kind: str
    #: Statuses of running tasks (protected unless a policy opts in), per the README.
    live: frozenset[str]
    #: Statuses the API lets a client delete (None: any).
    deletable: frozenset[str] | None
    id_pattern: re.Pattern[str]
    time_fields: tuple[str, ...]
    #: (tasks, now, seed) -> a simulator holding them, and the oracle's records.
    build: Callable[[int, datetime, int, Faults, Secrets], tuple[SimulatorBase, list[Record]]]
    #: (target section of an example policy, simulator URL, secret files dir) -> new section.
    point: Callable[[dict[str, Any], str, Path], dict[str, Any]]
    #: Environment the policies read their secrets from (files are written by ``point``).
    env: Callable[[Secrets], dict[str, str]] = lambda _s: {}
    write_secrets: Callable[[Secrets, Path], None] = lambda _s, _d: None
    policy_file: str = ""
    #: Tasks per inventory in the fault matrix.
    size: int = 240
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def example(self) -> Path:
        return REPO / "policies" / (self.policy_file or f"{self.kind}.yaml")


# --- the oracle -------------------------------------------------------------------------------


def expected(
    driver: Driver, policies: Sequence[Policy], records: Iterable[Record], now: datetime
) -> set[str]:
    """Ids the policies may delete: the README's rules 1-9, applied to the simulator's data."""
    records = list(records)
    selected: set[str] = set()
    for policy in policies:
        selected |= _expected_one(driver, policy, records, now)
    return selected


def _expected_one(driver: Driver, policy: Policy, records: list[Record], now: datetime) -> set[str]:
    age_field = policy.select.age_field or driver.time_fields[0]
    cutoff = now - policy.select.older_than
    live = set() if policy.select.allow_live else set(driver.live)
    protected_status = set(policy.protect.status) | live
    if driver.deletable is not None:
        protected_status |= {r.status for r in records} - set(driver.deletable)
    pool: list[Record] = []
    for record in records:
        if record.gone or record.id in policy.protect.ids or record.status in protected_status:
            continue
        if any(
            re.search(pattern, record.fields.get(name, ""))
            for name, pattern in policy.protect.match.items()
        ):
            continue
        if record.status not in policy.select.status:
            continue
        if not all(
            re.search(pattern, record.fields.get(name, ""))
            for name, pattern in policy.select.match.items()
        ):
            continue
        pool.append(record)
    timed = [r for r in pool if r.times.get(age_field) is not None]
    newest = sorted(timed, key=lambda r: r.times[age_field], reverse=True)  # type: ignore[arg-type, return-value]
    kept = {r.id for r in newest[: policy.keep.newest]}
    out = set()
    for record in timed:
        stamp = record.times[age_field]
        assert stamp is not None
        if record.id in kept or stamp >= cutoff or now - stamp < MIN_AGE:
            continue
        if not driver.id_pattern.fullmatch(record.id):
            continue
        out.add(record.id)
    return out


def away_from_edges(records: list[Record], policies: Sequence[Policy], now: datetime) -> set[str]:
    """Ids of records whose timestamps are not within EDGE of any cutoff (policy or min age)."""
    edges = [now - p.select.older_than for p in policies] + [now - MIN_AGE]
    return {
        r.id
        for r in records
        if all(t is None or abs(t - edge) > EDGE for t in r.times.values() for edge in edges)
    }


# --- policies ---------------------------------------------------------------------------------


def example_policies(driver: Driver) -> list[dict[str, Any]]:
    """The example policy file's documents, as plain data."""
    docs = [d for d in yaml.safe_load_all(driver.example.read_text(encoding="utf-8")) if d]
    out: list[dict[str, Any]] = []
    for doc in docs:
        out.extend(doc if isinstance(doc, list) else [doc])
    return out


def pointed_policies(
    driver: Driver,
    url: str,
    secrets_dir: Path,
    *,
    target: Mapping[str, Any] | None = None,
    delete: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The example policies aimed at a simulator, guards raised, select/protect untouched."""
    out = []
    for doc in example_policies(driver):
        doc = dict(doc)
        doc["target"] = {**driver.point(dict(doc["target"]), url, secrets_dir), **(target or {})}
        doc["delete"] = {
            **doc.get("delete", {}),
            "max_fraction": 1.0,
            "max_deletions": 1_000_000,
            "anomaly": {"floor": 1_000_000},
            **(delete or {}),
        }
        out.append(doc)
    return out


def load(docs: Sequence[Mapping[str, Any]]) -> list[Policy]:
    """Load policy documents through reaper's loader (the oracle reads the typed values)."""
    return [item.policy for item in load_policy_text(yaml.safe_dump(list(docs)))]


# --- data_pipeline ----------------------------------------------------------------------------


def _dp_build(
    n: int, now: datetime, seed: int, faults: Faults, _secrets: Secrets
) -> tuple[SimulatorBase, list[Record]]:
    tasks = generate_tasks(
        n, seed=seed, now=now, timezone="Asia/Shanghai", span=timedelta(days=90), cleaned_rate=0.05
    )
    for index, task in enumerate(tasks):
        if task.status == "failed" and index % 5 == 0:
            task.task_name = "KEEP for the incident review"  # pipeline-failed-7d protects these
    records = [
        Record(
            t.task_id,
            t.status,
            {
                "created_at": t.created_at,
                "started_at": t.started_at,
                "completed_at": t.completed_at,
                "updated_at": t.updated_at,
            },
            {
                "task_id": t.task_id,
                "task_name": t.task_name or "",
                "created_by": t.created_by,
                "db_name": t.db_name,
                "business_context": t.business_context,
            },
            gone=not t.directory_exists,
        )
        for t in tasks
    ]
    keep = away_from_edges(records, load(pointed_policies(DATA_PIPELINE, "http://x", Path())), now)
    sim = DataPipelineSimulator(
        [t for t in tasks if t.task_id in keep], timezone="Asia/Shanghai", faults=faults, seed=seed
    )
    return sim, [r for r in records if r.id in keep]


def _dp_point(target: dict[str, Any], url: str, _dir: Path) -> dict[str, Any]:
    return {**target, "base_url": url}


DATA_PIPELINE = Driver(
    kind="data_pipeline",
    live=frozenset({"pending", "in_progress"}),
    deletable=None,
    id_pattern=re.compile(r"(task|manual)_\d{8}_\d{6}"),
    time_fields=("created_at", "started_at", "completed_at", "updated_at"),
    build=_dp_build,
    point=_dp_point,
    size=300,
)


# --- huawei_dcs -------------------------------------------------------------------------------


def _dcs_build(
    n: int, now: datetime, seed: int, faults: Faults, secrets: Secrets
) -> tuple[SimulatorBase, list[Record]]:
    tasks = generate_dcs_tasks(n, seed=seed, now=now)
    # Some tasks older than 90 days, so that dcs-tasks-token-90d has work too.
    tasks = [
        replace(t, created_at=t.created_at - timedelta(days=60), updated_at=None)
        if i % 3 == 0
        else t
        for i, t in enumerate(tasks)
    ]
    records = [
        Record(
            t.id,
            t.status,
            {"created_at": t.created_at, "updated_at": t.updated_at or t.created_at},
            {
                "task_id": t.id,
                "name": t.name,
                "details": t.details,
                "user_name": t.user_name,
                "user_id": t.user_id,
                "job_id": t.job_id,
                "error_code": t.error_code or "",
                "params": t.params,
            },
        )
        for t in tasks
    ]
    keep = away_from_edges(records, load(pointed_policies(HUAWEI_DCS, "http://x", Path())), now)
    sim = HuaweiDcsSimulator(
        [t for t in tasks if t.id in keep],
        project_id=PROJECT,
        credentials={secrets.ak: secrets.sk},
        tokens=[secrets.token],
        faults=faults,
        seed=seed,
    )
    return sim, [r for r in records if r.id in keep]


def _dcs_point(target: dict[str, Any], url: str, secrets_dir: Path) -> dict[str, Any]:
    target = {k: v for k, v in target.items() if k != "region"}
    auth = dict(target["auth"])
    for key in ("ak_file", "sk_file", "token_file"):
        if key in auth:
            auth[key] = str(secrets_dir / key)
    return {**target, "endpoint": url, "project_id": PROJECT, "auth": auth}


def _huawei_secret_files(secrets: Secrets, directory: Path) -> None:
    for name, value in (
        ("ak_file", secrets.ak),
        ("sk_file", secrets.sk),
        ("token_file", secrets.token),
    ):
        (directory / name).write_text(value + "\n", encoding="utf-8")


def _huawei_env(secrets: Secrets) -> dict[str, str]:
    return {"HUAWEICLOUD_SDK_AK": secrets.ak, "HUAWEICLOUD_SDK_SK": secrets.sk}


HUAWEI_DCS = Driver(
    kind="huawei_dcs",
    live=frozenset({"EXECUTING"}),
    deletable=None,
    id_pattern=re.compile(r"[A-Za-z0-9_-]{1,64}"),
    time_fields=("created_at", "updated_at"),
    build=_dcs_build,
    point=_dcs_point,
    env=_huawei_env,
    write_secrets=_huawei_secret_files,
    size=240,
)


# --- huawei_iotda -----------------------------------------------------------------------------

IOTDA_INSTANCE = "1a2b3c4d-0000-4000-8000-00000000abcd"


def _iotda_build(
    n: int, now: datetime, seed: int, faults: Faults, secrets: Secrets
) -> tuple[SimulatorBase, list[Record]]:
    tasks = generate_iotda_tasks(
        n,
        seed=seed,
        now=now,
        # createDevices and updateDevices are not in the policy's task_types: never listed.
        task_types=(
            "firmwareUpgrade",
            "softwareUpgrade",
            "createCommands",
            "createMessages",
            "createDevices",
            "updateDevices",
        ),
    )
    for index, task in enumerate(tasks):
        if index % 9 == 0:
            task.task_name = f"keep: golden rollout {index}"
    covered = {"firmwareUpgrade", "softwareUpgrade", "createCommands", "createMessages"}
    records = [
        Record(
            t.task_id,
            t.status,
            {"create_time": t.create_time.replace(microsecond=0)},
            {
                "task_id": t.task_id,
                "task_name": t.task_name,
                "task_type": t.task_type,
                "status_desc": t.status_desc,
            },
            # A type the policy does not cover is never listed: to the oracle it does not exist.
            gone=t.task_type not in covered,
        )
        for t in tasks
    ]
    keep = away_from_edges(records, load(pointed_policies(HUAWEI_IOTDA, "http://x", Path())), now)
    sim = HuaweiIotdaSimulator(
        [t for t in tasks if t.task_id in keep],
        project_id=PROJECT,
        instance_id=IOTDA_INSTANCE,
        credentials={secrets.ak: secrets.sk},
        tokens=[secrets.token],
        faults=faults,
        seed=seed,
    )
    return sim, [r for r in records if r.id in keep]


def _iotda_point(target: dict[str, Any], url: str, _dir: Path) -> dict[str, Any]:
    return {**target, "endpoint": url, "project_id": PROJECT, "instance_id": IOTDA_INSTANCE}


HUAWEI_IOTDA = Driver(
    kind="huawei_iotda",
    live=frozenset({"Initializing", "Waitting", "Processing", "Stopping"}),
    deletable=frozenset({"Success", "Fail", "PartialSuccess", "Stopped"}),
    id_pattern=re.compile(r"[0-9a-f]{24}"),
    time_fields=("create_time",),
    build=_iotda_build,
    point=_iotda_point,
    env=_huawei_env,
    write_secrets=_huawei_secret_files,
    size=240,
)

#: Every built-in target; the Aparavi and generic targets get one entry each when they land.
DRIVERS: dict[str, Driver] = {d.kind: d for d in (DATA_PIPELINE, HUAWEI_DCS, HUAWEI_IOTDA)}


def utcnow() -> datetime:
    return datetime.now(UTC)


@contextmanager
def secrets_in_env(secrets: Secrets | None = None) -> Iterator[None]:
    """The Huawei policies' secrets in the environment, e.g. while a target is built."""
    saved = dict(os.environ)
    os.environ.update(_huawei_env(secrets or Secrets()))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
