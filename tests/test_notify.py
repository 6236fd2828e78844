"""Notifications: events POSTed to a real webhook receiver on 127.0.0.1, each signature checked
with the standardwebhooks package's verifier; delivery beside the run, retried, recorded and
counted, the secret never logged (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NOW, make_policy, policy_doc, sim_task
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook
from test_cli import reaper
from webhooks import SECRET, Receiver

from reaper.audit import AuditStore
from reaper.errors import ConfigError, PolicyError
from reaper.logs import configure_logging
from reaper.notify import Notifier, deliveries, sign
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import PolicyRun, RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator, Faults
from reaper.simulators.data_pipeline import SimTask
from reaper.sinks import WebhookSink, load_sinks

Start = Callable[..., tuple[DataPipelineSimulator, str]]
URL = "http://127.0.0.1:8084"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("REAPER_TEST_WEBHOOK_SECRET", SECRET)
    return "REAPER_TEST_WEBHOOK_SECRET"


def sink(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "webhook",
        "url": url,
        "secret_env": "REAPER_TEST_WEBHOOK_SECRET",
        "backoff": "0s",
        **extra,
    }


def old(n: int, start: int = 0) -> list[SimTask]:
    return [
        sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40, minutes=i))
        for i in range(start, start + n)
    ]


def run(loaded: LoadedPolicy, store: AuditStore, **kwargs: Any) -> PolicyRun:
    return asyncio.run(run_policy(loaded, store, now=NOW, **kwargs))


def with_notifier(
    loaded: LoadedPolicy,
    store: AuditStore,
    notifier: Notifier,
    wait: float = 30,
    at: timedelta = timedelta(0),
    **kwargs: Any,
) -> PolicyRun:
    """A run with an outside notifier, then its deliveries drained (as `reaper run` does)."""

    async def main() -> PolicyRun:
        try:
            return await run_policy(loaded, store, now=NOW + at, notifier=notifier, **kwargs)
        finally:
            await notifier.drain(wait)

    return asyncio.run(main())


def assert_verified(receiver: Receiver, policy: str, run_id: str | None) -> None:
    """Every request verified with standardwebhooks, and names the policy and the run."""
    assert receiver.requests
    for request in receiver:
        assert request.error is None, request.error
        assert request.verified["data"]["policy"] == policy
        assert request.verified["data"]["run_id"] == run_id


class TestSigning:
    def test_the_signature_is_the_reference_implementations(self) -> None:
        """reaper's header equals what the standardwebhooks package signs for the same id,
        time and body."""
        body = '{"type":"run.summary","data":{"policy":"p","x":"ü"}}'.encode()
        key = __import__("base64").b64decode(SECRET.removeprefix("whsec_"))
        reference = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body)
        assert sign(key, "msg_1", 1_700_000_000, body) == reference


class TestRuns:
    def test_a_run_announces_its_summary(
        self, data_pipeline: Start, store: AuditStore, receiver: Receiver, secret_env: str
    ) -> None:
        """After a run, its summary reaches the policy's webhook: signed, naming the policy
        and the run, with deleted, reclaimed and top reasons; the delivery is recorded and
        counted."""
        _, url = data_pipeline(old(4))
        loaded = make_policy(url, notify=[sink(receiver.url)])
        registry = CollectorRegistry()
        result = with_notifier(loaded, store, Notifier(store=store, registry=registry))
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert_verified(receiver, "test-policy", result.run_id)
        [summary] = receiver.of_type("run.summary")
        data = summary.verified["data"]
        assert (data["deleted"], data["reclaimed_bytes"], data["status"]) == (
            4,
            4 * 2048,
            "succeeded",
        )
        assert data["top_reasons"] == [
            {"reason": "older than 30d and status completed", "count": 4}
        ]
        assert summary.path == "/hooks/reaper"
        assert summary.headers["webhook-id"].startswith("msg_")
        [row] = deliveries(store)
        assert (row["event"], row["outcome"], row["attempts"], row["http_status"]) == (
            "run.summary",
            "delivered",
            1,
            200,
        )
        assert (row["event_id"], row["run_id"], row["sink"]) == (
            summary.headers["webhook-id"],
            result.run_id,
            "127.0.0.1",
        )
        assert (
            registry.get_sample_value(
                "reaper_notifications_total",
                {"policy": "test-policy", "event": "run.summary", "outcome": "delivered"},
            )
            == 1
        )

    def test_a_held_plan_and_failures_are_announced(
        self, data_pipeline: Start, store: AuditStore, receiver: Receiver, secret_env: str
    ) -> None:
        """A tripped guard announces the held plan; failed deletions announce the failure."""
        _, url = data_pipeline(old(5), faults=Faults(partial_failure_rate=1.0))
        held = make_policy(url, delete={"max_deletions": 3}, notify=[sink(receiver.url)])
        refused = with_notifier(held, store, Notifier(store=store))
        [event] = receiver.of_type("plan.held")
        assert (
            event.verified["data"].items()
            >= {
                "policy": "test-policy",
                "run_id": refused.run_id,
                "guard": "max_deletions",
                "eligible": 5,
                "listed": 5,
            }.items()
        )
        failing = make_policy(url, notify=[sink(receiver.url, events=["run.failed"])])
        failed = with_notifier(failing, store, Notifier(store=store))
        assert failed.status is RunStatus.PARTIAL
        [failure] = receiver.of_type("run.failed")
        assert failure.verified["data"]["run_id"] == failed.run_id
        assert failure.verified["data"]["failed"] == 5
        assert [r.error for r in receiver] == [None] * len(receiver.requests)

    def test_upcoming_and_not_carried_out_deletions(
        self, data_pipeline: Start, store: AuditStore, receiver: Receiver, secret_env: str
    ) -> None:
        """A notice announces the newly due tasks; deletions a later listing contradicts are
        announced as not carried out."""
        sim, url = data_pipeline(old(3), faults=Faults(db_update_failure_rate=1.0))
        loaded = make_policy(
            url, delete={"notice": "3d", "verify": "never"}, notify=[sink(receiver.url)]
        )
        first = with_notifier(loaded, store, Notifier(store=store))
        [upcoming] = receiver.of_type("deletions.upcoming")
        data = upcoming.verified["data"]
        assert data["run_id"] == first.run_id and data["count"] == 3
        assert data["due_at"] == (NOW + timedelta(days=3)).isoformat()
        assert sorted(data["task_ids"]) == [f"task_20260901_{i:06d}" for i in range(3)]
        with_notifier(loaded, store, Notifier(store=store), at=timedelta(days=3))
        later = with_notifier(loaded, store, Notifier(store=store), at=timedelta(days=4))
        [contradicted] = receiver.of_type("deletions.not_carried_out")
        assert contradicted.verified["data"]["run_id"] == later.run_id
        assert contradicted.verified["data"]["count"] == 3
        assert set(sim.db_update_failed) == set(data["task_ids"])  # the server's own record

    def test_slack_format(
        self, data_pipeline: Start, store: AuditStore, receiver: Receiver, secret_env: str
    ) -> None:
        """format: slack sends {"text": ...} naming the policy and the run, still signed."""
        _, url = data_pipeline(old(2))
        loaded = make_policy(url, notify=[sink(receiver.url, format="slack")])
        result = with_notifier(loaded, store, Notifier(store=store))
        [request] = list(receiver)
        assert request.error is None
        assert set(request.json) == {"text"}
        assert "policy test-policy" in request.json["text"]
        assert f"run {result.run_id}" in request.json["text"]
        assert "deleted 2 of 2 eligible" in request.json["text"]


class TestDelivery:
    def test_retries_keep_the_event_id(
        self, data_pipeline: Start, store: AuditStore, secret_env: str
    ) -> None:
        """503, 429, then 200: three attempts of one event, the same webhook-id each time, each
        signed anew; recorded once, delivered after 3 attempts."""
        receiver = Receiver(statuses=(503, 429)).start()
        try:
            _, url = data_pipeline(old(1))
            loaded = make_policy(url, notify=[sink(receiver.url, events=["run.summary"])])
            with_notifier(loaded, store, Notifier(store=store))
        finally:
            receiver.stop()
        assert len(receiver.requests) == 3
        assert len({r.headers["webhook-id"] for r in receiver}) == 1
        assert all(r.error is None for r in receiver)
        [row] = deliveries(store)
        assert (row["outcome"], row["attempts"], row["http_status"]) == ("delivered", 3, 200)

    def test_a_refusal_is_not_retried_and_fails_nothing(
        self, data_pipeline: Start, store: AuditStore, secret_env: str
    ) -> None:
        """A 400 ends the delivery at once (recorded failed); the run is not affected."""
        receiver = Receiver(statuses=(400,)).start()
        try:
            sim, url = data_pipeline(old(2))
            loaded = make_policy(url, notify=[sink(receiver.url, events=["run.summary"])])
            result = with_notifier(loaded, store, Notifier(store=store))
        finally:
            receiver.stop()
        assert result.status is RunStatus.SUCCEEDED and len(sim.deleted_ids) == 2
        [row] = deliveries(store)
        assert (row["outcome"], row["attempts"], row["http_status"], row["error"]) == (
            "failed",
            1,
            400,
            "HTTP 400",
        )

    def test_delivery_runs_beside_the_run(
        self, data_pipeline: Start, store: AuditStore, secret_env: str
    ) -> None:
        """A receiver that does not answer holds up nothing: the run has deleted everything and
        returned while its notification is still in flight; draining then abandons it (recorded,
        counted)."""
        receiver = Receiver().start()
        receiver.wait = True
        registry = CollectorRegistry()
        notifier = Notifier(store=store, registry=registry)
        try:
            sim, url = data_pipeline(old(3))
            loaded = make_policy(
                url, notify=[sink(receiver.url, events=["run.summary"], timeout="1m")]
            )

            async def main() -> tuple[PolicyRun, int]:
                result = await run_policy(loaded, store, now=NOW, notifier=notifier)
                in_flight = notifier.pending
                await notifier.drain(0.5)
                return result, in_flight

            result, in_flight = asyncio.run(main())
        finally:
            receiver.stop()
        assert result.status is RunStatus.SUCCEEDED and len(sim.deleted_ids) == 3
        assert in_flight == 1
        [row] = deliveries(store)
        assert row["outcome"] == "abandoned"
        assert (
            registry.get_sample_value(
                "reaper_notifications_total",
                {"policy": "test-policy", "event": "run.summary", "outcome": "abandoned"},
            )
            == 1
        )

    def test_an_unreachable_receiver_is_retried_then_failed(
        self, data_pipeline: Start, store: AuditStore, secret_env: str
    ) -> None:
        """Connection refused on every attempt: failed after all attempts, the run unaffected."""
        _, url = data_pipeline(old(1))
        loaded = make_policy(
            url, notify=[sink("http://127.0.0.1:9/x", events=["run.summary"], attempts=3)]
        )
        result = with_notifier(loaded, store, Notifier(store=store))
        assert result.status is RunStatus.SUCCEEDED
        [row] = deliveries(store)
        assert (row["outcome"], row["attempts"], row["http_status"], row["error"]) == (
            "failed",
            3,
            None,
            "ConnectError",
        )

    def test_the_secret_is_never_logged_or_recorded(
        self,
        data_pipeline: Start,
        store: AuditStore,
        secret_env: str,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        """Neither the signing secret nor a URL read from a file appears in the logs (debug
        level) or in the deliveries table."""
        receiver = Receiver(statuses=(500,)).start()
        stream = io.StringIO()
        configure_logging("json", "debug", stream=stream)
        url_file = tmp_path / "hook-url"
        url_file.write_text(receiver.url + "?token=hook-token-7f3a9\n")
        try:
            _, url = data_pipeline(old(1))
            hook = sink(receiver.url, events=["run.summary"])
            del hook["url"]
            loaded = make_policy(url, notify=[hook | {"url_file": str(url_file)}])
            with_notifier(loaded, store, Notifier(store=store))
        finally:
            receiver.stop()
        logged = stream.getvalue()
        recorded = json.dumps(deliveries(store), default=str)
        assert '"event": "notification"' in logged
        for secret in (SECRET, SECRET.removeprefix("whsec_"), "hook-token-7f3a9"):
            assert secret not in logged
            assert secret not in recorded
        assert receiver.requests[-1].path == "/hooks/reaper?token=hook-token-7f3a9"


class TestConfiguration:
    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ({"type": "webhook", "secret_env": "S"}, "exactly one of url, url_env, url_file"),
            ({"type": "webhook", "url": "ftp://x/y", "secret_env": "S"}, "http:// or https://"),
            ({"type": "webhook", "url": "http://x/y"}, "give secret_env or secret_file"),
            ({"type": "webhook", "url": "http://x/", "secret_env": "S", "urls": 1}, "unknown key"),
            ({"type": "email", "url": "http://x/", "secret_env": "S"}, "'webhook'"),
        ],
    )
    def test_policy_sinks_are_validated(self, entry: dict[str, Any], message: str) -> None:
        """A policy's notify entries are checked like the rest of it: file, line, field."""
        text = yaml.safe_dump(policy_doc(URL, notify=[entry]))
        with pytest.raises(PolicyError) as info:
            load_policy_text(text, Path("p.yaml"))
        assert message in str(info.value)
        assert "notify.0" in str(info.value)

    def test_the_notify_file_names_file_line_and_field(self, tmp_path: Path) -> None:
        """REAPER_NOTIFY_FILE problems name the file, the line and the field."""
        path = tmp_path / "notify.yaml"
        path.write_text(
            "- type: webhook\n  url: https://hooks.example/a\n  secret_env: S\n"
            "- type: webhook\n  url: https://hooks.example/b\n  secret_env: S\n  formt: slack\n"
        )
        with pytest.raises(PolicyError) as info:
            load_sinks(path)
        assert f"{path}:7:" in str(info.value) and "'1.formt'" in str(info.value)

    def test_a_missing_secret_names_the_variable(self) -> None:
        """A sink whose secret variable is unset cannot be used: the error names it."""
        config = WebhookSink(type="webhook", url="https://h/x", secret_env="NOT_SET_ANYWHERE")
        with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
            Notifier([config])

    def test_notify_is_not_part_of_the_policy_hash(self) -> None:
        """Adding a sink does not change what a policy deletes, nor its hash."""
        assert make_policy(URL, notify=[sink("https://h/x")]).digest == make_policy(URL).digest


class TestCommandLine:
    def test_run_waits_for_its_notifications(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """`reaper run` with REAPER_NOTIFY_FILE: the receiver gets the signed summary before the
        process exits, and the delivery is in the database."""
        receiver = Receiver().start()
        try:
            sim, url = data_pipeline(old(2))
            (tmp_path / "policies").mkdir()
            (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(policy_doc(url)))
            notify = tmp_path / "notify.yaml"
            notify.write_text(yaml.safe_dump([sink(receiver.url)]))
            env = {
                "REAPER_DATABASE_URL": database_url,
                "REAPER_POLICIES": str(tmp_path / "policies"),
                "REAPER_NOTIFY_FILE": str(notify),
                "REAPER_TEST_WEBHOOK_SECRET": SECRET,
            }
            result = reaper("run", "--output", "json", env=env)
        finally:
            receiver.stop()
        assert result.returncode == 0, result.stderr
        [summary] = json.loads(result.stdout)
        assert len(sim.deleted_ids) == 2
        assert [r.json["type"] for r in receiver] == ["run.summary"]
        assert_verified(receiver, "test-policy", summary["run_id"])
        assert SECRET not in result.stderr
        missing = reaper("run", env=env | {"REAPER_TEST_WEBHOOK_SECRET": ""})
        assert missing.returncode == 2
        assert "REAPER_TEST_WEBHOOK_SECRET" in missing.stderr


class TestDaemon:
    def test_scheduled_runs_notify_and_count(
        self,
        data_pipeline: Start,
        store: AuditStore,
        receiver: Receiver,
        secret_env: str,
        tmp_path: Path,
    ) -> None:
        """`reaper serve`'s runs send their events through the daemon's notifier, counted in
        the daemon's own metrics; shutting down drains it."""
        from reaper.daemon import Daemon, DaemonConfig

        _, url = data_pipeline(old(2))
        loaded = make_policy(url, schedule="0 3 * * *", notify=[sink(receiver.url)])
        daemon = Daemon(DaemonConfig(policies=tmp_path), store)

        async def main() -> None:
            await daemon.run_once(loaded)
            await daemon.notifier.drain(30)

        asyncio.run(main())
        [summary] = receiver.of_type("run.summary")
        assert summary.error is None and summary.verified["data"]["deleted"] == 2
        assert (
            daemon.metrics.registry.get_sample_value(
                "reaper_notifications_total",
                {"policy": "test-policy", "event": "run.summary", "outcome": "delivered"},
            )
            == 1
        )
