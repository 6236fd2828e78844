"""The generic_http target: configurations that reproduce data_pipeline and IoTDA pass the same
end-to-end scenarios as the built-in targets; every paging style and both delete styles."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import yaml
from conftest import NOW, sim_task
from sqlalchemy import select

from reaper.audit import AuditStore, audit_table
from reaper.errors import PolicyError
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator, Faults, HuaweiIotdaSimulator
from reaper.simulators.data_pipeline import SimTask

DpStart = Callable[..., tuple[DataPipelineSimulator, str]]
IotdaStart = Callable[..., tuple[HuaweiIotdaSimulator, str]]
PROJECT = "0123456789abcdef0123456789abcdef"
FINISHED = ["Success", "Fail", "PartialSuccess", "Stopped"]
UNFINISHED = ["Initializing", "Waitting", "Processing", "Stopping"]


def data_pipeline_target(url: str, **overrides: Any) -> dict[str, Any]:
    """A generic_http configuration equivalent to the built-in data_pipeline target."""
    target: dict[str, Any] = {
        "type": "generic_http",
        "base_url": url,
        "id_pattern": r"(task|manual)_\d{8}_\d{6}",
        "list": {
            "path": "/api/v0/data_pipeline/tasks",
            "items": "data.tasks",
            "ok_when": {"path": "success", "equals": True},
            "error_message": "data.response",
            "paging": {"style": "offset", "limit": 100},
        },
        "item": {
            "id": "task_id",
            "status": "status",
            "timestamp": {"path": "created_at", "format": "iso8601", "timezone": "UTC"},
            "fields": {"task_name": "task_name"},
            "gone_when": {"path": "directory_exists", "equals": False},
        },
        "delete": {
            "style": "batch",
            "path": "/api/v0/data_pipeline/tasks",
            "method": "DELETE",
            "body": {
                "task_ids": "{ids}",
                "confirm": True,
                "delete_database_records": False,
                "continue_on_error": True,
            },
            "error_code": "data.error_type",
            "error_message": "data.response",
            "result": {
                "mode": "per_id",
                "deleted": "data.deleted_tasks",
                "failed": "data.failed_tasks",
                "id": "task_id",
                "gone_when": {"path": "directory_deleted", "equals": False},
                "failed_when": {"path": "success", "equals": False},
                "error": "error",
                "code": "error_code",
                "bytes": "deleted_size",
                "files": "deleted_files_count",
            },
        },
    }
    target.update(overrides)
    return target


def iotda_target(url: str, token_env: str, **overrides: Any) -> dict[str, Any]:
    """A generic_http configuration equivalent to huawei_iotda (token auth: no signing)."""
    target: dict[str, Any] = {
        "type": "generic_http",
        "base_url": url,
        "auth": {"type": "header", "name": "X-Auth-Token", "value_env": token_env},
        "id_pattern": "[0-9a-f]{24}",
        "deletable_statuses": FINISHED,
        "list": {
            "path": f"/v5/iot/{PROJECT}/batchtasks",
            "items": "batchtasks",
            "each": {"param": "task_type", "values": ["firmwareUpgrade", "createCommands"]},
            "paging": {
                "style": "cursor",
                "param": "marker",
                "first": "f" * 24,
                "next": "page.marker",
                "limit_param": "limit",
                "limit": 50,
                "stop_on_short_page": True,
            },
        },
        "item": {
            "id": "task_id",
            "status": "status",
            "timestamp": {"path": "create_time", "format": "%Y%m%dT%H%M%SZ"},
            "fields": {"task_name": "task_name", "task_type": "task_type"},
        },
        "delete": {
            "style": "per_id",
            "path": f"/v5/iot/{PROJECT}/batchtasks/{{id}}",
            "success": [204, 200],
            "gone": [404],
            "error_code": "error_code",
            "error_message": "error_msg",
        },
    }
    target.update(overrides)
    return target


def load(target: dict[str, Any], statuses: list[str], **sections: Any) -> LoadedPolicy:
    doc: dict[str, Any] = {
        "name": "generic",
        "target": target,
        "select": {"status": statuses, "older_than": "30d"},
        "delete": {"batch_size": 10, "rate": "200/s", "max_fraction": 1.0},
    }
    for key, value in sections.items():
        doc[key] = {"max_fraction": 1.0, **value} if key == "delete" else value
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


def dp_policy(url: str, **sections: Any) -> LoadedPolicy:
    target = sections.pop("target", None) or data_pipeline_target(url)
    return load(target, ["completed", "failed"], **sections)


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def audit_rows(store: AuditStore) -> list[dict[str, Any]]:
    with store.engine.connect() as connection:
        rows = connection.execute(select(audit_table).order_by(audit_table.c.seq))
        return [dict(row._mapping) for row in rows]


def outcomes(store: AuditStore) -> Counter[str]:
    return Counter(row["outcome"] for row in audit_rows(store))


def deleted_in_audit(store: AuditStore) -> set[str]:
    return {row["task_id"] for row in audit_rows(store) if row["outcome"] == "deleted"}


def old_tasks(count: int, status: str = "completed") -> list[SimTask]:
    return [
        sim_task(f"task_20260901_{i:06d}", status=status, age=timedelta(days=40, minutes=i))
        for i in range(count)
    ]


class TestConfig:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"delete": {"style": "per_id", "path": "/tasks"}}, "{id} exactly once"),
            ({"delete": {"style": "per_id", "path": "/t/{id}/{x}"}}, "unknown placeholder"),
            ({"delete": {"style": "per_id", "path": "http://evil/{id}"}}, "starting with '/'"),
            (
                {
                    "delete": {
                        "style": "batch",
                        "path": "/t",
                        "body": {"ids": []},
                        "result": {"mode": "all_or_nothing"},
                    }
                },
                "exactly once",
            ),
            (
                {
                    "delete": {
                        "style": "batch",
                        "path": "/t",
                        "body": {"ids": "x{ids}"},
                        "result": {"mode": "all_or_nothing"},
                    }
                },
                "whole value",
            ),
            ({"headers": {"Authorization": "Bearer x"}}, "belong in target.auth"),
            ({"auth": {"type": "bearer", "token": "x"}}, "never go in a policy file"),
            ({"id_pattern": "("}, "invalid regular expression"),
        ],
    )
    def test_bad_configurations_do_not_load(self, change: dict[str, Any], message: str) -> None:
        """Templates, placeholders, secrets and regexes are checked when the policy loads."""
        with pytest.raises(PolicyError, match="generic|" + message) as info:
            dp_policy("http://a.invalid", target=data_pipeline_target("http://a.invalid", **change))
        assert message in str(info.value)

    def test_paging_style_and_timestamp_format_are_checked(self) -> None:
        """An unknown paging style or timestamp format is refused."""
        target = data_pipeline_target("http://a.invalid")
        target["list"] = {**target["list"], "paging": {"style": "scroll"}}
        with pytest.raises(PolicyError):
            dp_policy("http://a.invalid", target=target)
        target = data_pipeline_target("http://a.invalid")
        target["item"] = {**target["item"], "timestamp": {"path": "t", "format": "unix"}}
        with pytest.raises(PolicyError, match="unknown timestamp format"):
            dp_policy("http://a.invalid", target=target)


class TestDataPipelineReproduction:
    """The built-in data_pipeline scenarios (tests/test_runner.py), through generic_http."""

    def test_audit_equals_the_servers_record(
        self, data_pipeline: DpStart, store: AuditStore
    ) -> None:
        """Every eligible task is deleted once, over several offset pages; audit == simulator."""
        tasks = [
            *old_tasks(230),
            sim_task("task_20261030_000001", age=timedelta(days=2)),
            sim_task("task_20260902_000001", status="in_progress"),
        ]
        sim, url = data_pipeline(tasks)
        result = run(dp_policy(url, protect={"status": ["pending", "in_progress"]}), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.listed == 232
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert len(sim.deleted_ids) == 230
        assert max(sim.delete_requests_by_id.values()) == 1
        assert outcomes(store) == {"deleted": 230}
        # three pages, then the same three again: generic_http re-checks by listing again
        assert sim.stats["list_requests"] == 3 + 3
        row = audit_rows(store)[0]
        assert row["reclaimed_bytes"] == 2048
        assert row["files_count"] == 3

    def test_partial_batch_failure_continues(
        self, data_pipeline: DpStart, store: AuditStore
    ) -> None:
        """Failed ids are recorded with the server's code and message; the rest go on."""
        sim, url = data_pipeline(old_tasks(60), faults=Faults(partial_failure_rate=0.2))
        result = run(dp_policy(url), store)
        failed = [r for r in audit_rows(store) if r["outcome"] == "failed"]
        assert failed
        assert all(r["error_code"] == "DELETE_FAILED" and r["error_message"] for r in failed)
        assert result.summary.deleted + result.summary.failed == 60
        assert deleted_in_audit(store) == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL

    def test_already_deleted_tasks_are_not_selected(
        self, data_pipeline: DpStart, store: AuditStore
    ) -> None:
        """gone_when (directory_exists: false): a second run deletes nothing more."""
        sim, url = data_pipeline(old_tasks(12))
        run(dp_policy(url), store)
        second = run(dp_policy(url), store)
        assert second.status is RunStatus.SUCCEEDED
        assert second.summary.deleted == 0
        assert max(sim.delete_requests_by_id.values()) == 1

    def test_keep_newest_and_oldest_first(self, data_pipeline: DpStart, store: AuditStore) -> None:
        """keep.newest spares the newest matching tasks; deletion goes oldest first."""
        tasks = old_tasks(20)
        sim, url = data_pipeline(tasks)
        loaded = dp_policy(
            url, keep={"newest": 5}, delete={"batch_size": 4, "rate": "200/s", "concurrency": 1}
        )
        run(loaded, store)
        by_age = sorted(tasks, key=lambda t: t.created_at)
        assert sim.deleted_ids == [t.task_id for t in by_age[:15]]

    def test_invalid_ids_are_recorded_never_sent(
        self, data_pipeline: DpStart, store: AuditStore
    ) -> None:
        """Ids failing the guard get skipped_invalid_id rows and never reach the server."""
        tasks = [*old_tasks(3), sim_task("task_20260902_000000/../../etc")]
        sim, url = data_pipeline(tasks)
        run(dp_policy(url), store)
        assert sim.traversal_attempts == []
        assert outcomes(store) == {"deleted": 3, "skipped_invalid_id": 1}

    def test_listing_failure_deletes_nothing(
        self, data_pipeline: DpStart, store: AuditStore
    ) -> None:
        """Malformed pages abort the policy before any deletion."""
        sim, url = data_pipeline(old_tasks(150), faults=Faults(malformed_rate=1.0))
        result = run(dp_policy(url), store)
        assert result.status is RunStatus.ABORTED
        assert sim.stats["delete_requests"] == 0

    def test_page_style_with_has_next(self, data_pipeline: DpStart, store: AuditStore) -> None:
        """POST /tasks/query with page/page_size in the body, stopped by has_next."""
        sim, url = data_pipeline(old_tasks(120))
        target = data_pipeline_target(url)
        target["list"] = {
            **target["list"],
            "path": "/api/v0/data_pipeline/tasks/query",
            "method": "POST",
            "body": {"sort_by": "created_at", "sort_order": "desc"},
            "paging_in": "body",
            "paging": {
                "style": "page",
                "size": 50,
                "has_next": "data.pagination.has_next",
                "total": "data.pagination.total",
            },
        }
        result = run(dp_policy(url, target=target), store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.listed == 120
        assert len(sim.deleted_ids) == 120


class TestIotdaReproduction:
    """The built-in huawei_iotda scenarios, through generic_http (token auth)."""

    def test_unfinished_tasks_are_protected_and_finished_deleted(
        self, iotda_sim: IotdaStart, creds: Any, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """Old finished tasks of both types go, over cursor pages; unfinished are never sent."""
        finished = [
            make_iotda_task(status, timedelta(days=40, minutes=i), task_type)
            for i, (status, task_type) in enumerate(
                (s, t) for s in FINISHED for t in ("firmwareUpgrade", "createCommands") * 8
            )
        ]
        unfinished = [make_iotda_task(s, timedelta(days=50)) for s in UNFINISHED]
        other = make_iotda_task(task_type="moduleUpgrade")
        sim, url = iotda_sim([*finished, *unfinished, other])
        target = iotda_target(url, creds.token_env)
        target["list"]["paging"] = {**target["list"]["paging"], "limit": 7}
        loaded = load(
            target,
            [*FINISHED, "Processing"],
            select={"status": FINISHED, "older_than": "30d"},
            protect={"status": UNFINISHED},
        )
        result = run(loaded, store)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert sorted(sim.deleted_ids) == sorted(t.task_id for t in finished)
        assert not {t.task_id for t in unfinished} & set(sim.delete_requests_by_id)
        assert other.task_id not in sim.delete_requests_by_id
        assert sim.refused_unfinished == []
        rows = audit_rows(store)
        assert Counter(r["outcome"] for r in rows) == {"deleted": len(finished)}
        assert {r["http_status"] for r in rows} == {204}
        markers = [q.get("marker") for q in sim.list_queries]
        assert markers[0] == "f" * 24
        assert {q["task_type"] for q in sim.list_queries} == {"firmwareUpgrade", "createCommands"}

    def test_partial_failures_and_already_gone(
        self, iotda_sim: IotdaStart, creds: Any, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """404 is already_gone; failures keep the error body and the run goes on."""
        tasks = [make_iotda_task(age=timedelta(days=40, minutes=i)) for i in range(30)]
        sim, url = iotda_sim(tasks, faults=Faults(partial_failure_rate=0.3))

        def vanish(plan: Any) -> None:
            sim.remove(tasks[0].task_id)

        loaded = load(iotda_target(url, creds.token_env), FINISHED, delete={"batch_size": 1})
        result = run(loaded, store, on_plan=vanish)
        rows = {r["task_id"]: r for r in audit_rows(store)}
        assert rows[tasks[0].task_id]["outcome"] == "already_gone"
        failed = [r for r in rows.values() if r["outcome"] == "failed"]
        assert failed
        assert all(r["error_code"] == "IOTDA.014112" and r["error_message"] for r in failed)
        assert {t for t, r in rows.items() if r["outcome"] == "deleted"} == set(sim.deleted_ids)
        assert result.status is RunStatus.PARTIAL

    def test_deletable_statuses_rail(
        self, iotda_sim: IotdaStart, creds: Any, make_iotda_task: Any, store: AuditStore
    ) -> None:
        """Without a protect rule, deletable_statuses still keeps unfinished ids unsent."""
        running = make_iotda_task("Processing")
        sim, url = iotda_sim([running])
        loaded = load(iotda_target(url, creds.token_env), ["Processing"])
        result = run(loaded, store)
        assert sim.stats["delete_requests"] == 0
        [row] = audit_rows(store)
        assert "only Success" in row["error_message"]
        assert result.status is RunStatus.PARTIAL


# --- styles only a fake API shows: Link headers, all-or-nothing deletes, broken paging ----------


class FakeApi:
    """A tiny task API behind httpx.MockTransport."""

    def __init__(self, count: int, *, page: int = 10, link_host: str = "api.test") -> None:
        created = (NOW - timedelta(days=60)).timestamp()
        self.tasks = {
            f"t{i:03d}": {"key": f"t{i:03d}", "state": "done", "at_ms": int(created * 1000) + i}
            for i in range(count)
        }
        self.page = page
        self.link_host = link_host
        self.deleted: list[str] = []
        self.requests: list[httpx.Request] = []
        self.cursor_stuck = False
        self.batch_status = 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "GET" and request.url.path == "/v1/tasks":
            ordered = sorted(self.tasks.values(), key=lambda t: t["key"])
            after = request.url.params.get("after", "")
            chunk = [t for t in ordered if t["key"] > after][: self.page]
            headers = {}
            if chunk and len(chunk) == self.page:
                nxt = "" if self.cursor_stuck else chunk[-1]["key"]
                headers["Link"] = f'<http://{self.link_host}/v1/tasks?after={nxt}>; rel="next"'
            return httpx.Response(200, json={"result": {"tasks": chunk}}, headers=headers)
        if request.method == "POST" and request.url.path == "/v1/tasks/purge":
            ids = json.loads(request.content)["keys"]
            if self.batch_status != 200:
                return httpx.Response(self.batch_status, json={"message": "purge refused"})
            for key in ids:
                self.tasks.pop(key, None)
                self.deleted.append(key)
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(404, json={"message": "no route"})


def fake_target(**overrides: Any) -> dict[str, Any]:
    target: dict[str, Any] = {
        "type": "generic_http",
        "base_url": "http://api.test",
        "list": {
            "path": "/v1/tasks",
            "items": "result.tasks[*]",
            "paging": {"style": "link"},
        },
        "item": {
            "id": "key",
            "status": "state",
            "timestamp": {"path": "at_ms", "format": "epoch_ms"},
        },
        "delete": {
            "style": "batch",
            "path": "/v1/tasks/purge",
            "body": {"keys": "{ids}"},
            "max_ids": 7,
            "result": {"mode": "all_or_nothing"},
        },
    }
    target.update(overrides)
    return target


class TestFakeApi:
    def test_link_paging_and_all_or_nothing(self, store: AuditStore) -> None:
        """Link headers are followed to the end; an all-or-nothing batch marks every id."""
        api = FakeApi(25)
        result = run(load(fake_target(), ["done"]), store, transport=httpx.MockTransport(api))
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.summary.listed == 25
        assert sorted(api.deleted) == sorted(f"t{i:03d}" for i in range(25))
        assert outcomes(store) == {"deleted": 25}
        lists = [r for r in api.requests if r.method == "GET"]
        assert len(lists) == 3 + 3  # the listing, then the re-check before deleting lists again

    def test_failed_all_or_nothing_batch(self, store: AuditStore) -> None:
        """A refused batch fails every id in it, with the server's message."""
        api = FakeApi(5)
        api.batch_status = 409
        result = run(load(fake_target(), ["done"]), store, transport=httpx.MockTransport(api))
        assert outcomes(store) == {"failed": 5}
        assert {r["error_message"] for r in audit_rows(store)} == {"purge refused"}
        assert result.status is RunStatus.PARTIAL

    def test_cross_origin_link_is_refused(self, store: AuditStore) -> None:
        """A next link to another host would carry our credentials there: nothing is deleted."""
        api = FakeApi(25, link_host="elsewhere.test")
        result = run(load(fake_target(), ["done"]), store, transport=httpx.MockTransport(api))
        assert result.status is RunStatus.ABORTED
        assert "leaves http://api.test" in (result.error or "")
        assert api.deleted == []

    def test_cursor_from_the_last_item(self, store: AuditStore) -> None:
        """next_from_item: the last item's key is sent back until an empty page."""
        api = FakeApi(25)
        target = fake_target()
        target["list"] = {
            **target["list"],
            "paging": {"style": "cursor", "param": "after", "next_from_item": "key"},
        }
        result = run(load(target, ["done"]), store, transport=httpx.MockTransport(api))
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert len(api.deleted) == 25

    def test_cursor_that_does_not_advance(self, store: AuditStore) -> None:
        """A cursor that repeats makes the listing incomplete: nothing is deleted."""
        task = {"key": "t0", "state": "done", "at_ms": 1_700_000_000_000}
        body = {"result": {"tasks": [task], "next": "same"}}
        target = fake_target()
        target["list"] = {
            **target["list"],
            "paging": {"style": "cursor", "param": "after", "next": "result.next"},
        }
        result = run(
            load(target, ["done"]),
            store,
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body)),
        )
        assert result.status is RunStatus.ABORTED
        assert "appears again" in (result.error or "")

    def test_repeated_link_is_refused(self, store: AuditStore) -> None:
        """A next link that points back at an earlier page makes the listing incomplete."""
        api = FakeApi(25)
        api.cursor_stuck = True
        result = run(load(fake_target(), ["done"]), store, transport=httpx.MockTransport(api))
        assert result.status is RunStatus.ABORTED
        assert api.deleted == []

    def test_total_is_a_cross_check_not_a_stop(self, store: AuditStore) -> None:
        """A listing shorter than the reported total is incomplete: nothing is deleted."""

        def handler(request: httpx.Request) -> httpx.Response:
            api = FakeApi(3)
            return httpx.Response(
                200, json={"result": {"tasks": list(api.tasks.values()), "total": 10}}
            )

        target = fake_target()
        target["list"] = {
            **target["list"],
            "paging": {"style": "offset", "limit": 50, "total": "result.total"},
        }
        result = run(load(target, ["done"]), store, transport=httpx.MockTransport(handler))
        assert result.status is RunStatus.ABORTED
        assert "server reports 10" in (result.error or "")

    def test_undeclared_match_field_stops_the_listing(self, store: AuditStore) -> None:
        """A protect rule on a field the config does not declare never silently matches ''."""
        api = FakeApi(3)
        loaded = load(fake_target(), ["done"], protect={"match": {"owner": "ops"}})
        result = run(loaded, store, transport=httpx.MockTransport(api))
        assert result.status is RunStatus.ABORTED
        assert "does not declare" in (result.error or "")
        assert api.deleted == []

    def test_per_id_delete_percent_encodes(self, store: AuditStore) -> None:
        """Ids are percent-encoded in the path; 404 is already_gone."""
        seen: list[str] = []
        items = [
            {"key": "a b", "state": "done", "at_ms": 1_700_000_000_000},
            {"key": "c", "state": "done", "at_ms": 1_700_000_000_000},
        ]

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                return httpx.Response(200, json={"result": {"tasks": items}})
            seen.append(request.url.raw_path.decode())
            return httpx.Response(204 if "c" in request.url.path else 404)

        target = fake_target(
            delete={"style": "per_id", "path": "/v1/tasks/{id}"},
            id_pattern="[a-z ]+",
        )
        target["list"] = {**target["list"], "paging": {"style": "none"}}
        run(load(target, ["done"]), store, transport=httpx.MockTransport(handler))
        assert sorted(seen) == ["/v1/tasks/a%20b", "/v1/tasks/c"]
        assert {r["task_id"]: r["outcome"] for r in audit_rows(store)} == {
            "a b": "already_gone",
            "c": "deleted",
        }
