"""The huawei_dcs target: configuration, listing, deletion, and whole runs against the simulator."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NOW
from sqlalchemy import select

from reaper.audit import AuditStore, audit_table, runs_table
from reaper.errors import ConfigError, ListingError, PolicyError, TargetAuthError
from reaper.logs import configure_logging
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import PolicyRun, RunStatus, build_target, run_policy
from reaper.simulators import DcsSimTask, Faults, HuaweiDcsSimulator
from reaper.targets.base import ListRequest, Outcome, Target
from reaper.targets.huawei import parse_iso_millis_time
from reaper.targets.huawei_dcs import HuaweiDcsOptions, HuaweiDcsTarget, end_time_param

Sim = Callable[..., tuple[HuaweiDcsSimulator, str]]
Policy = Callable[..., LoadedPolicy]
PROJECT = "0123456789abcdef0123456789abcdef"


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def audit_rows(store: AuditStore) -> list[dict[str, Any]]:
    with store.engine.connect() as connection:
        rows = connection.execute(select(audit_table).order_by(audit_table.c.seq))
        return [dict(row._mapping) for row in rows]


def old_tasks(make: Callable[..., DcsSimTask], count: int, status: str = "SUCCESS") -> list[Any]:
    return [
        make(f"task-{status.lower()}-{i:04d}", status, timedelta(days=40, minutes=i))
        for i in range(count)
    ]


def load(doc: dict[str, Any]) -> LoadedPolicy:
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


def doc(target: dict[str, Any], **sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "dcs",
        "target": {"type": "huawei_dcs", "project_id": PROJECT, **target},
        "select": {"status": ["SUCCESS"], "older_than": "30d"},
    }
    base.update(sections)
    return base


AKSK = {"type": "aksk", "ak_env": "REAPER_TEST_HW_AK", "sk_env": "REAPER_TEST_HW_SK"}


class TestConfig:
    def test_region_gives_the_public_endpoint(self) -> None:
        """region: cn-north-4 means https://dcs.cn-north-4.myhuaweicloud.com."""
        loaded = load(doc({"region": "cn-north-4", "auth": AKSK}))
        assert loaded.policy.target_config.describe() == (
            f"https://dcs.cn-north-4.myhuaweicloud.com project {PROJECT}"
        )

    def test_endpoint_or_region(self) -> None:
        """Exactly one of endpoint and region."""
        with pytest.raises(PolicyError, match="exactly one of endpoint or region"):
            load(doc({"auth": AKSK}))
        with pytest.raises(PolicyError, match="exactly one of endpoint or region"):
            load(doc({"auth": AKSK, "region": "cn-north-4", "endpoint": "https://x.example"}))

    @pytest.mark.parametrize("key", ["ak", "sk", "token", "secret_key"])
    def test_inline_credentials_are_refused(self, key: str) -> None:
        """A key written into the policy is a validation error that does not echo it."""
        auth = {**AKSK, key: "INLINE-SECRET-VALUE-123"}
        with pytest.raises(PolicyError) as info:
            load(doc({"region": "cn-north-4", "auth": auth}))
        assert "credentials never go in a policy file" in str(info.value)
        assert "INLINE-SECRET-VALUE-123" not in str(info.value)

    def test_one_source_per_secret(self) -> None:
        """ak_env and ak_file together, or neither, are refused."""
        auth = {"type": "aksk", "ak_env": "A", "ak_file": "/x", "sk_env": "S"}
        with pytest.raises(PolicyError, match="exactly one of ak_env or ak_file"):
            load(doc({"region": "cn-north-4", "auth": auth}))
        with pytest.raises(PolicyError, match="exactly one of token_env or token_file"):
            load(doc({"region": "cn-north-4", "auth": {"type": "token"}}))

    def test_statuses(self) -> None:
        """EXECUTING is live; an undocumented status cannot be named; one id per request."""
        with pytest.raises(PolicyError, match="live status"):
            load(
                doc(
                    {"region": "r-1", "auth": AKSK},
                    select={"status": ["EXECUTING"], "older_than": "1d"},
                )
            )
        with pytest.raises(PolicyError, match="has no status 'DELETING'"):
            load(
                doc(
                    {"region": "r-1", "auth": AKSK},
                    select={"status": ["DELETING"], "older_than": "1d"},
                )
            )
        with pytest.raises(PolicyError, match="at most 1 id"):
            load(doc({"region": "r-1", "auth": AKSK}, delete={"batch_size": 2}))

    def test_missing_variable_is_a_config_error_naming_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unset variable stops the policy before anything is sent, naming the variable."""
        monkeypatch.setenv("REAPER_TEST_HW_AK", "SOME-ACCESS-KEY")
        monkeypatch.delenv("REAPER_TEST_HW_SK", raising=False)
        loaded = load(doc({"region": "cn-north-4", "auth": AKSK}))
        with pytest.raises(ConfigError, match="REAPER_TEST_HW_SK is not set"):
            build_target(loaded)

    def test_secret_files(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Keys are read from files (trailing newline stripped); a missing file is named."""
        (tmp_path / "ak").write_text("FILE-ACCESS-KEY\n")
        auth = {"type": "aksk", "ak_file": str(tmp_path / "ak"), "sk_file": str(tmp_path / "sk")}
        loaded = load(doc({"region": "cn-north-4", "auth": auth}))
        with pytest.raises(ConfigError, match=f"file {tmp_path / 'sk'}") as info:
            build_target(loaded)
        assert "FILE-ACCESS-KEY" not in str(info.value)
        (tmp_path / "sk").write_text("   \n")
        with pytest.raises(ConfigError, match="is empty"):
            build_target(loaded)


class TestParsing:
    def test_timestamp_exact(self) -> None:
        """2020-06-17T07:38:42.503Z is parsed to the millisecond, as UTC."""
        assert parse_iso_millis_time("2020-06-17T07:38:42.503Z") == datetime(
            2020, 6, 17, 7, 38, 42, 503000, tzinfo=UTC
        )
        assert parse_iso_millis_time("2020-06-17T07:38:42Z") == datetime(
            2020, 6, 17, 7, 38, 42, tzinfo=UTC
        )

    @pytest.mark.parametrize(
        "text",
        ["2020-06-17 07:38:42.503Z", "2020-06-17T07:38:42.503", "2020-02-30T00:00:00Z", "", None],
    )
    def test_timestamp_refused(self, text: Any) -> None:
        """Anything but the documented form is a ValueError (the record becomes unusable)."""
        with pytest.raises(ValueError):
            parse_iso_millis_time(text)

    def test_end_time_rounds_up(self) -> None:
        """end_time is the cutoff rounded up to the second, so no eligible task is filtered out."""
        assert end_time_param(datetime(2026, 10, 2, 12, 0, 0, tzinfo=UTC)) == "20261002120000"
        assert end_time_param(datetime(2026, 10, 2, 12, 0, 0, 1, tzinfo=UTC)) == "20261002120001"

    @pytest.mark.parametrize("task_id", ["a/b", "..", "x" * 65, "", "id\n", "a b"])
    def test_id_guard(self, task_id: str) -> None:
        """Ids that could change the URL path are refused."""
        assert HuaweiDcsTarget.invalid_id_reason(None, task_id) is not None  # type: ignore[arg-type]

    def test_id_guard_accepts_uuids(self) -> None:
        """UUID-like ids pass."""
        reason = HuaweiDcsTarget.invalid_id_reason(None, "ff808081-72cf-1a2b-0173-0b1e2c3d4e5f")  # type: ignore[arg-type]
        assert reason is None


class TestListing:
    def test_pages_with_offset(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, make_dcs_task: Any
    ) -> None:
        """25 tasks in pages of 10: three requests, every task once."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 25))
        tasks = lister(dcs_policy(url, target={"page_size": 10}))
        assert len({t.id for t in tasks}) == len(tasks) == 25
        assert [q["offset"] for q in sim.list_queries] == ["0", "10", "20"]
        assert {q["limit"] for q in sim.list_queries} == {"10"}

    def test_task_count_ends_an_exact_multiple(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, make_dcs_task: Any
    ) -> None:
        """The true total (task_count, a string) saves the empty page after 20 of 20."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 20))
        assert len(lister(dcs_policy(url, target={"page_size": 10}))) == 20
        assert sim.stats["list_requests"] == 2

    def test_end_time_is_pushed_to_the_server(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, make_dcs_task: Any
    ) -> None:
        """With created_before, the server filters: young tasks are never even listed."""
        tasks = [*old_tasks(make_dcs_task, 5), make_dcs_task("young-1", age=timedelta(days=2))]
        sim, url = dcs_sim(tasks)
        cutoff = NOW - timedelta(days=30)
        listed = lister(dcs_policy(url), ListRequest("created_at", created_before=cutoff))
        assert {t.id for t in listed} == {t.id for t in tasks[:5]}
        assert sim.list_queries[0]["end_time"] == cutoff.strftime("%Y%m%d%H%M%S")

    def test_fields_timestamps_and_problems(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, make_dcs_task: Any
    ) -> None:
        """created_at parses exactly; a bad one is a problem; match fields are carried."""
        good = make_dcs_task("good", name="backup", user_name="ops")
        bad = make_dcs_task("bad", raw_created_at="2020/06/17 07:38:42")
        _, url = dcs_sim([good, bad])
        request = ListRequest("created_at", frozenset({"name", "user_name"}))
        by_id = {t.id: t for t in lister(dcs_policy(url), request)}
        assert by_id["good"].timestamp == good.created_at.replace(
            microsecond=good.created_at.microsecond // 1000 * 1000
        )
        assert by_id["good"].fields == {"name": "backup", "user_name": "ops"}
        assert by_id["bad"].timestamp is None and "does not parse" in (by_id["bad"].problem or "")

    def test_token_authentication(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, make_dcs_task: Any, creds: Any
    ) -> None:
        """An IAM token from the environment works as well as AK/SK."""
        _, url = dcs_sim(old_tasks(make_dcs_task, 3))
        assert len(lister(dcs_policy(url, target={"auth": creds.token_auth()}))) == 3

    def test_wrong_secret_is_an_auth_error(
        self, dcs_sim: Sim, dcs_policy: Policy, lister: Any, creds: Any
    ) -> None:
        """A signature made with the wrong SK is refused with 401: TargetAuthError."""
        sim, url = dcs_sim([], credentials={creds.ak: "another-secret-key"})
        with pytest.raises(TargetAuthError, match="refused our credentials"):
            lister(dcs_policy(url))
        assert sim.auth.refused == 1

    def test_listing_error_on_5xx(self, dcs_sim: Sim, dcs_policy: Policy, lister: Any) -> None:
        """A page that keeps failing makes the listing fail, naming the page."""
        _, url = dcs_sim([], faults=Faults(error_rate=1.0))
        retries = {"attempts": 2, "backoff": "0s", "max_backoff": "0s"}
        with pytest.raises(ListingError, match="listing page 1"):
            lister(dcs_policy(url, target={"retries": retries}))


class TestDelete:
    def _delete(
        self, loaded: LoadedPolicy, with_target: Any, ids: list[str], **options: Any
    ) -> Any:
        async def use(target: Target) -> Any:
            return await target.delete(ids, HuaweiDcsOptions(**options))

        return with_target(loaded, use).results

    def test_outcomes(
        self, dcs_sim: Sim, dcs_policy: Policy, with_target: Any, make_dcs_task: Any
    ) -> None:
        """200 is deleted, 404 is already_gone (with the service's error code kept)."""
        sim, url = dcs_sim([make_dcs_task("t-1")])
        [deleted] = self._delete(dcs_policy(url), with_target, ["t-1"])
        [gone] = self._delete(dcs_policy(url), with_target, ["t-1"])
        assert (deleted.outcome, deleted.http_status) == (Outcome.DELETED, 200)
        assert (gone.outcome, gone.http_status, gone.error_code) == (
            Outcome.ALREADY_GONE,
            404,
            "DCS.4133",
        )
        assert sim.deleted_ids == ["t-1"]

    def test_message_body_is_sent_and_signed(
        self, dcs_sim: Sim, dcs_policy: Policy, with_target: Any, make_dcs_task: Any
    ) -> None:
        """delete.options.message goes in the body; the signature covers it."""
        sim, url = dcs_sim([make_dcs_task("t-1")])
        [result] = self._delete(dcs_policy(url), with_target, ["t-1"], message="retention ✓")
        assert result.outcome is Outcome.DELETED
        assert sim.auth.refused == 0

    def test_error_body_is_kept(
        self, dcs_sim: Sim, dcs_policy: Policy, with_target: Any, make_dcs_task: Any
    ) -> None:
        """A refused deletion keeps the service's error_code and error_msg."""
        _, url = dcs_sim([make_dcs_task("t-1")], faults=Faults(partial_failure_rate=1.0))
        [result] = self._delete(dcs_policy(url), with_target, ["t-1"])
        assert (result.outcome, result.http_status, result.error_code) == (
            Outcome.FAILED,
            400,
            "DCS.4980",
        )
        assert result.error_message == "Failed to delete the background task"

    def test_gateway_404_is_not_already_gone(
        self, dcs_sim: Sim, dcs_policy: Policy, with_target: Any
    ) -> None:
        """A 404 from the gateway (no such API: wrong endpoint) is a failure, not 'gone'."""
        _, url = dcs_sim([])
        [result] = self._delete(dcs_policy(url + "/wrong-prefix"), with_target, ["t-1"])
        assert result.outcome is Outcome.FAILED
        assert result.error_code == "APIGW.0101"


class TestEndToEnd:
    def test_run_deletes_what_is_eligible(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """Old SUCCESS/FAILED go, EXECUTING and young ones stay; the audit equals the server."""
        tasks = [
            *old_tasks(make_dcs_task, 12),
            *old_tasks(make_dcs_task, 3, "FAILED"),
            make_dcs_task("running", "EXECUTING"),
            make_dcs_task("young", age=timedelta(days=3)),
            make_dcs_task("odd", "QUEUED"),
        ]
        sim, url = dcs_sim(tasks)
        result = run(dcs_policy(url, target={"page_size": 5}), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.deleted == 15
        rows = audit_rows(store)
        assert {r["task_id"] for r in rows if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 15
        assert {"running", "young", "odd"} & set(sim.deleted_ids) == set()
        listing = [q for q in sim.list_queries if "start_time" not in q]
        assert all(q.get("end_time") == "20261002120000" for q in listing)
        # The re-check before deleting lists the creation window of the 15 candidates: created
        # 40 days (+ 0..11 minutes) before NOW = 2026-11-01T12:00Z.
        recheck = [q for q in sim.list_queries if "start_time" in q]
        assert {(q["start_time"], q["end_time"]) for q in recheck} == {
            ("20260922114900", "20260922120000")
        }
        assert max(sim.delete_requests_by_id.values()) == 1
        assert rows[-1]["target"] == f"{url} project {PROJECT}"

    def test_unparseable_timestamp_is_never_deleted(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """A record whose created_at does not parse is reported (by id), never sent."""
        bad = make_dcs_task("bad-time", raw_created_at="17/06/2020")
        sim, url = dcs_sim([bad, *old_tasks(make_dcs_task, 2)])
        result = run(dcs_policy(url), store)
        assert "bad-time" not in sim.delete_requests_by_id
        if result.plan is not None:  # reported as unusable in the plan...
            assert any(verdict == "unusable" for verdict, _ in result.plan.counts)
        else:  # ...or the core refuses to plan around it and names it
            assert "bad-time" in (result.error or "")
            assert "does not parse" in (result.error or "")

    def test_partial_failures_continue(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """Refused deletions are recorded with the service's error and the run goes on."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 30), faults=Faults(partial_failure_rate=0.3))
        result = run(dcs_policy(url), store)
        rows = audit_rows(store)
        failed = [r for r in rows if r["outcome"] == "failed"]
        assert failed and result.summary.deleted
        assert result.summary.deleted + result.summary.failed == 30
        assert all(r["error_code"] == "DCS.4980" and r["http_status"] == 400 for r in failed)
        assert {r["task_id"] for r in rows if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL

    def test_stop_on_error(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """continue_on_error: false stops after the first refused deletion."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 10), faults=Faults(partial_failure_rate=1.0))
        delete = {
            "rate": "200/s",
            "max_fraction": 1.0,
            "concurrency": 1,
            "continue_on_error": False,
        }
        result = run(dcs_policy(url, delete=delete), store)
        assert result.status is RunStatus.ABORTED
        assert sim.stats["delete_requests"] == 1

    def test_bad_credentials_delete_nothing(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore, creds: Any
    ) -> None:
        """A wrong AK stops the policy at the first listing request, with a clear error."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 5), credentials={"OTHERAK": creds.sk})
        result = run(dcs_policy(url), store)
        assert result.status is RunStatus.ABORTED
        assert "refused our credentials (HTTP 401: APIGW.0301" in (result.error or "")
        assert sim.stats["delete_requests"] == 0

    def test_credentials_revoked_mid_run(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """A 401 on a deletion stops the run: no further deletion is attempted (the next batch,
        its intent already written, is recorded as never sent)."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 10))
        delete = {"rate": "200/s", "max_fraction": 1.0, "concurrency": 1}
        result = run(
            dcs_policy(url, delete=delete),
            store,
            on_batch=lambda event: sim.auth.credentials.clear(),
        )
        assert result.status is RunStatus.ABORTED
        assert sim.stats["delete_requests"] == 2
        assert Counter(r["outcome"] for r in audit_rows(store)) == {
            "deleted": 1,
            "failed": 1,
            "not_deleted": 1,
        }

    def test_credentials_revoked_before_the_recheck(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """A 401 on the re-check before the first deletion stops the run with nothing sent."""
        sim, url = dcs_sim(old_tasks(make_dcs_task, 10))
        delete = {"rate": "200/s", "max_fraction": 1.0, "concurrency": 1}
        result = run(
            dcs_policy(url, delete=delete), store, on_plan=lambda plan: sim.auth.credentials.clear()
        )
        assert result.status is RunStatus.ABORTED
        assert "refused our credentials (HTTP 401" in (result.error or "")
        assert sim.stats["delete_requests"] == 0
        assert Counter(r["outcome"] for r in audit_rows(store)) == {"not_deleted": 2}

    def test_rate_limit_and_retries(
        self, dcs_sim: Sim, dcs_policy: Policy, make_dcs_task: Any, store: AuditStore
    ) -> None:
        """429 with Retry-After and 5xx are retried (each retry re-signed) until all are deleted."""
        sim, url = dcs_sim(
            old_tasks(make_dcs_task, 15),
            faults=Faults(rate_limit=20, rate_limit_burst=1, error_rate=0.2),
        )
        retries = {"attempts": 10, "backoff": "0s", "max_backoff": "1s"}
        delete = {"rate": "100/s", "burst": 5, "concurrency": 4, "max_fraction": 1.0}
        result = run(dcs_policy(url, target={"retries": retries}, delete=delete), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sim.stats["status_429"] > 0 and sim.stats["status_5xx"] > 0
        assert len(sim.deleted_ids) == 15
        assert sim.auth.refused == 0


class TestSecrets:
    def test_credentials_never_leak(
        self,
        dcs_sim: Sim,
        dcs_policy: Policy,
        make_dcs_task: Any,
        store: AuditStore,
        creds: Any,
    ) -> None:
        """AK, SK and token appear in no log line, audit row, run row or error message."""
        stream = io.StringIO()
        configure_logging("json", "debug", stream)
        sim, url = dcs_sim(old_tasks(make_dcs_task, 8), faults=Faults(partial_failure_rate=0.3))
        outputs = [run(dcs_policy(url), store)]
        sim.auth.credentials.clear()  # now every request is refused
        outputs.append(run(dcs_policy(url), store))
        token_policy = dcs_policy(url, target={"auth": creds.token_auth()})
        sim.auth.tokens.clear()
        outputs.append(run(token_policy, store))
        assert [o.status for o in outputs][1:] == [RunStatus.ABORTED, RunStatus.ABORTED]
        with store.engine.connect() as connection:
            runs = [dict(r._mapping) for r in connection.execute(select(runs_table))]
        haystack = "\n".join(
            [
                stream.getvalue(),
                json.dumps(audit_rows(store), default=str),
                json.dumps(runs, default=str),
                *(str(o.error) for o in outputs),
            ]
        )
        assert "run_finished" in haystack and "failed" in haystack
        for secret in (creds.ak, creds.sk, creds.token):
            assert secret not in haystack
