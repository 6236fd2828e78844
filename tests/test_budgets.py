"""Endpoint budgets: which policies share one, what it allows, and that it holds on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import policy_doc, sim_task

from reaper.audit import AuditStore
from reaper.budgets import DEFAULT_CONCURRENCY, EndpointBudgets, endpoint_key, rate_conflicts
from reaper.converters import Rate
from reaper.daemon import Daemon, DaemonConfig
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import RunStatus, run_policy
from reaper.settings import EndpointBudget, Settings
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.targets.base import origin_of

Start = Callable[..., tuple[DataPipelineSimulator, str]]

AK, OTHER_AK = "HWBUDGETAK0000000001", "HWBUDGETAK0000000002"
SK = "hwBudgetSecretKey-3e5d7c9b1a"
TOKEN = "MIIbudget-token-secret-7f6e5d"
PROJECT = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two variables holding the same AK, one holding another, an SK, a token, a password."""
    monkeypatch.setenv("BUDGET_AK", AK)
    monkeypatch.setenv("BUDGET_AK_COPY", AK)
    monkeypatch.setenv("BUDGET_OTHER_AK", OTHER_AK)
    monkeypatch.setenv("BUDGET_SK", SK)
    monkeypatch.setenv("BUDGET_OTHER_SK", SK + "-other")
    monkeypatch.setenv("BUDGET_TOKEN", TOKEN)
    monkeypatch.setenv("BUDGET_TOKEN_2", TOKEN + "-two")
    monkeypatch.setenv("BUDGET_PASSWORD", "pw-one-secret")
    monkeypatch.setenv("BUDGET_PASSWORD_2", "pw-two-secret")


def load(doc: dict[str, Any]) -> LoadedPolicy:
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


def pipeline(name: str, url: str = "http://127.0.0.1:8084", **delete: Any) -> LoadedPolicy:
    return load(policy_doc(url, name=name, delete={"batch_size": 10, "rate": "10/s", **delete}))


def dcs(name: str, endpoint: str, auth: dict[str, str], **delete: Any) -> LoadedPolicy:
    return load(
        {
            "name": name,
            "target": {
                "type": "huawei_dcs",
                "endpoint": endpoint,
                "project_id": PROJECT,
                "auth": auth,
            },
            "select": {"status": ["SUCCESS"], "older_than": "30d"},
            "delete": {"rate": "10/s", **delete},
        }
    )


def generic(name: str, auth: dict[str, str]) -> LoadedPolicy:
    doc = yaml.safe_load(
        (Path(__file__).parent.parent / "policies" / "generic_http.yaml").read_text()
    )
    doc["name"] = name
    doc["target"]["auth"] = auth
    return load(doc)


def aksk(ak_env: str, sk_env: str = "BUDGET_SK") -> dict[str, str]:
    return {"type": "aksk", "ak_env": ak_env, "sk_env": sk_env}


class TestOrigin:
    @pytest.mark.parametrize(
        ("url", "origin"),
        [
            ("https://dcs.cn-north-4.myhuaweicloud.com", "https://dcs.cn-north-4.myhuaweicloud.com:443"),
            ("https://DCS.cn-north-4.MyHuaweiCloud.com/", "https://dcs.cn-north-4.myhuaweicloud.com:443"),
            ("http://127.0.0.1:8084/api/v0", "http://127.0.0.1:8084"),
            ("http://example.com", "http://example.com:80"),
            ("https://example.com:8443/x", "https://example.com:8443"),
            ("http://[::1]:9000/", "http://[::1]:9000"),
        ],
    )  # fmt: skip
    def test_origin_is_scheme_host_and_port(self, url: str, origin: str) -> None:
        """An origin is the scheme, the host in lower case and the port, default ports written
        out (RFC 6454 §4: the path is not part of it)."""
        assert origin_of(url) == origin


@pytest.mark.usefixtures("secrets_env")
class TestEndpointKey:
    def test_same_ak_from_two_variables_is_one_endpoint(self) -> None:
        """The AK identifies the account: two variables holding it reach one endpoint, and the
        SK (which only proves the AK) does not matter."""
        url = "https://dcs.cn-north-4.myhuaweicloud.com"
        first = endpoint_key(dcs("a", url, aksk("BUDGET_AK")))
        copy = endpoint_key(dcs("b", url, aksk("BUDGET_AK_COPY", "BUDGET_OTHER_SK")))
        assert first == copy

    def test_another_account_or_host_is_another_endpoint(self) -> None:
        """Another AK, another host or another port is another endpoint."""
        url = "https://dcs.cn-north-4.myhuaweicloud.com"
        base = endpoint_key(dcs("a", url, aksk("BUDGET_AK")))
        assert endpoint_key(dcs("b", url, aksk("BUDGET_OTHER_AK"))) != base
        other_region = "https://dcs.cn-south-1.myhuaweicloud.com"
        assert endpoint_key(dcs("c", other_region, aksk("BUDGET_AK"))) != base
        assert endpoint_key(dcs("d", url + ":8443", aksk("BUDGET_AK"))) != base

    def test_region_and_endpoint_spellings_are_one_endpoint(self) -> None:
        """`region: cn-north-4` and the endpoint URL it stands for are the same endpoint."""
        by_url = dcs("a", "https://dcs.cn-north-4.myhuaweicloud.com/", aksk("BUDGET_AK"))
        doc = {
            "name": "b",
            "target": {
                "type": "huawei_dcs",
                "region": "cn-north-4",
                "project_id": PROJECT,
                "auth": aksk("BUDGET_AK"),
            },
            "select": {"status": ["SUCCESS"], "older_than": "30d"},
        }
        assert endpoint_key(load(doc)) == endpoint_key(by_url)

    def test_no_secret_in_a_key(self) -> None:
        """Neither an SK, nor a token, nor a password, nor even the AK appears in a key or its
        rendering: only a keyed hash of what identifies the account."""
        url = "https://dcs.cn-north-4.myhuaweicloud.com"
        keys = [
            endpoint_key(dcs("a", url, aksk("BUDGET_AK"))),
            endpoint_key(dcs("b", url, {"type": "token", "token_env": "BUDGET_TOKEN"})),
            endpoint_key(generic("c", {"type": "bearer", "token_env": "BUDGET_TOKEN"})),
            endpoint_key(
                generic("d", {"type": "basic", "username": "u", "password_env": "BUDGET_PASSWORD"})
            ),
        ]
        for key in keys:
            text = f"{key} {key!r}"
            for secret in (AK, SK, TOKEN, "pw-one-secret"):
                assert secret not in text
        assert keys[0].credential.startswith("aksk #")
        assert keys[1].credential.startswith("token #")

    def test_tokens_and_users(self) -> None:
        """Different tokens are different accounts; for basic auth the user is the account
        whatever password proves it; no authentication is one account per origin."""

        def bearer(env: str) -> dict[str, str]:
            return {"type": "bearer", "token_env": env}

        def basic(password_env: str, user: str = "alice") -> dict[str, str]:
            return {"type": "basic", "username": user, "password_env": password_env}

        assert endpoint_key(generic("a", bearer("BUDGET_TOKEN"))) != endpoint_key(
            generic("b", bearer("BUDGET_TOKEN_2"))
        )
        assert endpoint_key(generic("c", basic("BUDGET_PASSWORD"))) == endpoint_key(
            generic("d", basic("BUDGET_PASSWORD_2"))
        )
        assert endpoint_key(generic("e", basic("BUDGET_PASSWORD"))) != endpoint_key(
            generic("f", basic("BUDGET_PASSWORD", "bob"))
        )
        none = endpoint_key(generic("g", {"type": "none"}))
        assert none == endpoint_key(pipeline("h"))
        assert str(none) == "http://127.0.0.1:8084"

    def test_a_target_kind_that_names_no_endpoint_keeps_its_own_budget(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A target kind (a plugin's, say) whose config does not give its origin: each of its
        policies has a budget of its own, and validate has nothing to compare."""
        from reaper.targets.data_pipeline import DataPipelineConfig

        monkeypatch.setattr(DataPipelineConfig, "origin", lambda self: None)
        first, second = pipeline("a", rate="1/s"), pipeline("b", rate="9/s")
        assert endpoint_key(first) != endpoint_key(second)
        budgets = EndpointBudgets()
        budgets.register([first, second])
        assert budgets.budget(first).limits.rate == Rate(1.0)
        assert budgets.budget(second).limits.rate == Rate(9.0)
        assert rate_conflicts([first, second]) == []


class TestLimits:
    def test_lowest_declared_limits_win(self) -> None:
        """Policies on one endpoint share the lowest rate, burst and concurrency they declare;
        requests in flight default to DEFAULT_CONCURRENCY when none declares any."""
        budgets = EndpointBudgets()
        fast = pipeline("fast", rate="20/s", burst=5)
        slow = pipeline("slow", rate="5/s", burst=3, concurrency=4)
        alone = pipeline("alone", "http://127.0.0.1:9999", rate="7/s")
        budgets.register([fast, slow, alone])
        shared = budgets.budget(fast)
        assert shared is budgets.budget(slow)
        assert shared.limits.rate == Rate(5.0)
        assert shared.limits.burst == 3
        assert shared.limits.concurrency == 4
        assert shared.limiter.rate == Rate(5.0)
        own = budgets.budget(alone)
        assert own is not shared
        assert (own.limits.rate, own.limits.concurrency) == (Rate(7.0), DEFAULT_CONCURRENCY)
        assert budgets.pace(fast, shared) is None  # the shared rate is below its own

    def test_settings_give_an_endpoint_its_budget(self) -> None:
        """An endpoint named in the settings gets their rate and concurrency; a policy slower
        than that keeps its own pace on top."""
        settings = Settings(
            endpoint_budgets='{"http://127.0.0.1:8084": {"rate": "50/s", "concurrency": 8}}'
        )
        budgets = EndpointBudgets(settings.endpoint_budgets)
        fast = pipeline("fast", rate="100/s")
        slow = pipeline("slow", rate="5/s", burst=2)
        budgets.register([fast, slow])
        budget = budgets.budget(fast)
        assert budget.limits.rate == Rate(50.0)
        assert budget.limits.concurrency == 8
        assert budget.limits.burst == 1  # not given: the policies' lowest
        assert budget.limits.explicit == {"rate", "concurrency"}
        assert budgets.pace(fast, budget) is None
        pace = budgets.pace(slow, budget)
        assert pace is not None and (pace.rate, pace.burst) == (Rate(5.0), 2)

    def test_a_reload_replaces_only_changed_budgets(self) -> None:
        """Registering a new policy set keeps a budget whose limits are unchanged (runs keep
        sharing it) and replaces one whose limits changed."""
        budgets = EndpointBudgets()
        a, b = pipeline("a"), pipeline("b", "http://127.0.0.1:9999")
        budgets.register([a, b])
        first_a, first_b = budgets.budget(a), budgets.budget(b)
        slower = pipeline("b", "http://127.0.0.1:9999", rate="2/s")
        budgets.register([a, slower])
        assert budgets.budget(a) is first_a
        assert budgets.budget(slower) is not first_b
        assert budgets.budget(slower).limits.rate == Rate(2.0)

    def test_bad_settings_are_refused(self) -> None:
        """Endpoint budgets must name origins (no path, no credentials) once each."""
        for value in (
            '{"http://127.0.0.1:8084/api": {"rate": "5/s"}}',
            '{"http://user:pw@127.0.0.1:8084": {"rate": "5/s"}}',
            '{"ftp://127.0.0.1": {}}',
            '{"http://h": {}, "http://h:80": {}}',
            '{"http://h": {"rate": "fast"}}',
            '{"http://h": {"speed": "5/s"}}',
            "[1, 2]",
            "not json",
        ):
            with pytest.raises(ValueError, match="endpoint_budgets"):
                Settings(endpoint_budgets=value)
        assert Settings(endpoint_budgets='{"HTTP://H/": {"burst": 2}}').endpoint_budgets == {
            "http://h:80": EndpointBudget(burst=2)
        }


class TestRateConflicts:
    def test_differing_rates_on_one_endpoint_are_reported(self) -> None:
        """Policies reaching one origin with one credential source and different rates are
        reported with the lowest; other endpoints and equal rates are not."""
        conflicts = rate_conflicts(
            [
                pipeline("a", rate="10/s"),
                pipeline("b", rate="4/s"),
                pipeline("c", rate="10/s"),
                pipeline("d", "http://127.0.0.1:9999", rate="1/s"),
            ]
        )
        [conflict] = conflicts
        assert conflict.origin == "http://127.0.0.1:8084"
        assert conflict.rates == {"a": Rate(10.0), "b": Rate(4.0), "c": Rate(10.0)}
        assert conflict.lowest == Rate(4.0)
        assert rate_conflicts([pipeline("a", rate="10/s"), pipeline("b", rate="10/s")]) == []

    def test_no_secret_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`validate` runs where the secrets are not: the check needs none, and tells two
        credentials apart by where they are read from."""
        monkeypatch.delenv("BUDGET_AK", raising=False)
        url = "https://dcs.cn-north-4.myhuaweicloud.com"
        [conflict] = rate_conflicts(
            [
                dcs("a", url, aksk("BUDGET_AK"), rate="10/s"),
                dcs("b", url, aksk("BUDGET_AK"), rate="3/s"),
                dcs("c", url, aksk("BUDGET_OTHER_AK"), rate="1/s"),
            ]
        )
        assert set(conflict.rates) == {"a", "b"}
        assert "BUDGET_AK" in conflict.credential


# --- on the wire --------------------------------------------------------------------------------


def finished_tasks(prefix: str, n: int, status: str) -> list[Any]:
    now = datetime.now(UTC)
    return [
        sim_task(f"task_2026090{prefix}_{i:06d}", status, timedelta(days=40, minutes=i), now=now)
        for i in range(n)
    ]


class InFlight(httpx.AsyncBaseTransport):
    """A real transport that counts the requests in flight through it at once."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.now = 0
        self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.now -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[AuditStore]:
    from reaper.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    upgrade(engine)
    yield AuditStore(engine)
    engine.dispose()


class TestOnTheWire:
    def two_policies(self, url: str, rate: str, **delete: Any) -> list[LoadedPolicy]:
        """Two policies on one endpoint, each deleting its own status, each at ``rate``."""
        return [
            load(
                policy_doc(
                    url,
                    name=name,
                    select={"status": [status], "older_than": "30d"},
                    delete={"batch_size": 1, "rate": rate, "verify": "never", **delete},
                )
            )
            for name, status in (("completed-30d", "completed"), ("failed-30d", "failed"))
        ]

    def test_two_policies_at_the_limit_get_no_429(
        self, data_pipeline: Start, sqlite_store: AuditStore
    ) -> None:
        """Two policies each declaring the server's limit share it: together they never
        exceed it (0 server 429s) and both delete everything they select."""
        sim, url = data_pipeline(
            finished_tasks("1", 40, "completed") + finished_tasks("2", 40, "failed"),
            faults=Faults(rate_limit=40, rate_limit_burst=2),
        )
        loaded = self.two_policies(url, "40/s")
        budgets = EndpointBudgets()
        budgets.register(loaded)

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(run_policy(item, sqlite_store, budgets=budgets) for item in loaded)
                )
            )

        runs = asyncio.run(both())
        assert [run.status for run in runs] == [RunStatus.SUCCEEDED] * 2
        assert [run.summary.deleted for run in runs] == [40, 40]
        assert sim.stats["status_429"] == 0
        assert len(sim.deleted_ids) == 80

    def test_without_a_shared_budget_the_server_refuses(
        self, data_pipeline: Start, sqlite_store: AuditStore
    ) -> None:
        """The same two policies, each with a limiter of its own, exceed the server's limit
        (this is what the test above guards against)."""
        sim, url = data_pipeline(
            finished_tasks("1", 40, "completed") + finished_tasks("2", 40, "failed"),
            faults=Faults(rate_limit=40, rate_limit_burst=2),
        )
        loaded = self.two_policies(url, "40/s")

        async def both() -> None:
            await asyncio.gather(*(run_policy(item, sqlite_store) for item in loaded))

        asyncio.run(both())
        assert sim.stats["status_429"] > 0

    def test_the_daemon_shares_budgets_too(
        self, data_pipeline: Start, sqlite_store: AuditStore, tmp_path: Path
    ) -> None:
        """`reaper serve` runs two policies of one endpoint at once under one budget."""
        sim, url = data_pipeline(
            finished_tasks("1", 40, "completed") + finished_tasks("2", 40, "failed"),
            faults=Faults(rate_limit=40, rate_limit_burst=2),
        )
        loaded = [
            load(
                {
                    **yaml.safe_load(yaml.safe_dump(item.policy.model_dump(mode="json"))),
                    "schedule": "0 3 * * *",
                }
            )
            for item in self.two_policies(url, "40/s")
        ]

        async def serve_both() -> None:
            daemon = Daemon(DaemonConfig(policies=tmp_path), sqlite_store)
            daemon.install(loaded)
            await asyncio.gather(*(daemon.run_once(item) for item in loaded))

        asyncio.run(serve_both())
        assert sim.stats["status_429"] == 0
        assert len(sim.deleted_ids) == 80

    def test_an_endpoints_in_flight_budget_holds_across_policies(
        self, data_pipeline: Start, sqlite_store: AuditStore
    ) -> None:
        """With an endpoint's concurrency set to 2, two policies of 4 workers each never have
        more than 2 requests in flight there together; without it they have more."""
        sim, url = data_pipeline(
            finished_tasks("1", 30, "completed") + finished_tasks("2", 30, "failed"),
            faults=Faults(latency_ms=30),
        )
        loaded = self.two_policies(url, "1000/s", concurrency=4)

        def peak(budgets: EndpointBudgets) -> int:
            transport = InFlight()

            async def both() -> None:
                await asyncio.gather(
                    *(
                        run_policy(item, sqlite_store, budgets=budgets, transport=transport)
                        for item in loaded
                    )
                )

            asyncio.run(both())
            return transport.peak

        limited = EndpointBudgets({origin_of(url): EndpointBudget(concurrency=2)})
        limited.register(loaded)
        assert peak(limited) == 2
        assert len(sim.deleted_ids) == 60
        sim.add_tasks(finished_tasks("3", 30, "completed") + finished_tasks("4", 30, "failed"))
        unlimited = EndpointBudgets()
        unlimited.register(loaded)
        assert peak(unlimited) > 2
