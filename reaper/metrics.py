"""Prometheus metrics and the health endpoints of ``reaper serve``.

One registry per process (not the global one, so tests can make their own). ``reaper serve``
exposes it on ``/metrics`` beside ``/healthz`` (the process is alive) and ``/readyz`` (the audit
database answers and the policies are loaded). A one-shot ``reaper run`` can push the same
metrics to a Pushgateway or write them to a file for node_exporter's textfile collector. Either
replaces what the previous run exported, so such a run first restores what the alerts compare
against: each policy's last success (from the audit) and its schedule interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    push_to_gateway,
    write_to_textfile,
)

from reaper.policy import LoadedPolicy
from reaper.runner import PolicyRun, RunStatus
from reaper.schedule import parse_cron

__all__ = ["HealthServer", "Metrics"]


class Metrics:
    """reaper's metrics. Labels are policy names, target kinds, outcomes and status codes only:
    never URLs, ids or anything that could carry a secret."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.deletions = Counter(
            "reaper_deletions",
            "Tasks acted on, by outcome.",
            ["policy", "target", "outcome"],
            registry=r,
        )
        self.requests = Counter(
            "reaper_http_requests",
            "Requests to targets, by HTTP status (0: no answer).",
            ["policy", "target", "status"],
            registry=r,
        )
        self.retries = Counter(
            "reaper_http_retries",
            "Retried requests to targets.",
            ["policy", "target"],
            registry=r,
        )
        self.throttled = Counter(
            "reaper_http_429", "429 answers from targets.", ["policy", "target"], registry=r
        )
        self.runs = Counter(
            "reaper_runs", "Policy runs, by status.", ["policy", "status"], registry=r
        )
        self.duration = Histogram(
            "reaper_run_duration_seconds",
            "Wall time of policy runs.",
            ["policy"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf")),
            registry=r,
        )
        self.last_success = Gauge(
            "reaper_last_success_timestamp_seconds",
            "When the policy last finished with everything eligible deleted.",
            ["policy"],
            registry=r,
        )
        self.backlog = Gauge(
            "reaper_eligible_backlog",
            "Tasks eligible for deletion at the last plan.",
            ["policy"],
            registry=r,
        )
        self.remaining = Gauge(
            "reaper_eligible_remaining",
            "Eligible tasks the last run did not get to (its max_run_time was up, it was "
            "stopped, or a guard refused): left for the next run.",
            ["policy"],
            registry=r,
        )
        self.reclaimed = Counter(
            "reaper_reclaimed_bytes",
            "Space the targets reported reclaimed.",
            ["policy"],
            registry=r,
        )
        self.acknowledged_not_deleted = Counter(
            "reaper_acknowledged_not_deleted",
            "Deletions the target acknowledged that a later listing still showed present.",
            ["policy", "target"],
            registry=r,
        )
        self.future_timestamps = Gauge(
            "reaper_future_timestamps",
            "Tasks whose age field lay in the future at the last plan: a zone or clock is wrong.",
            ["policy"],
            registry=r,
        )
        self.policies = Gauge("reaper_policies_loaded", "Policies scheduled.", registry=r)
        self.interval = Gauge(
            "reaper_schedule_interval_seconds",
            "Seconds between a policy's next two scheduled runs (for staleness alerts).",
            ["policy"],
            registry=r,
        )

    def observe(self, run: PolicyRun, target: str) -> None:
        """Record one finished policy run."""
        policy = run.policy
        s = run.summary
        self.runs.labels(policy, run.status.value).inc()
        if run.status is RunStatus.SKIPPED:
            return
        for outcome, count in (
            ("deleted", s.deleted),
            ("already_gone", s.already_gone),
            ("failed", s.failed),
            ("unknown", s.unknown),
            ("skipped_invalid_id", s.skipped),
            ("skipped_changed", s.skipped_changed),
            ("dry_run", s.dry_run),
        ):
            if count:
                self.deletions.labels(policy, target, outcome).inc(count)
        if run.http is not None:
            for status, count in run.http.status.items():
                self.requests.labels(policy, target, str(status)).inc(count)
            if run.http.transport_errors:
                self.requests.labels(policy, target, "0").inc(run.http.transport_errors)
            if run.http.retries:
                self.retries.labels(policy, target).inc(run.http.retries)
            if run.http.status.get(429):
                self.throttled.labels(policy, target).inc(run.http.status[429])
        if s.acknowledged_not_deleted:
            self.acknowledged_not_deleted.labels(policy, target).inc(s.acknowledged_not_deleted)
        if run.plan is not None:
            self.backlog.labels(policy).set(run.plan.eligible)
            self.future_timestamps.labels(policy).set(run.plan.future_timestamps)
        if run.remaining is not None:
            self.remaining.labels(policy).set(run.remaining)
        if s.reclaimed_bytes:
            self.reclaimed.labels(policy).inc(s.reclaimed_bytes)
        if run.finished_at is not None:
            self.duration.labels(policy).observe((run.finished_at - run.started_at).total_seconds())
            if run.status is RunStatus.SUCCEEDED:
                self.last_success.labels(policy).set(run.finished_at.timestamp())

    def restore_last_success(self, finished: Mapping[str, datetime]) -> None:
        """Start the last-success gauges from the audit (before runs that may move them on)."""
        for policy, when in finished.items():
            self.last_success.labels(policy).set(when.timestamp())

    def schedule_intervals(
        self, loaded: Iterable[LoadedPolicy], now: datetime | None = None
    ) -> None:
        """Set each scheduled policy's interval: the gap between its next two fire times."""
        now = now or datetime.now(UTC)
        for item in loaded:
            policy = item.policy
            if not policy.schedule:
                continue
            schedule = parse_cron(policy.schedule, policy.zone)
            first = schedule.next_fire_time(now)
            second = schedule.next_fire_time(first) if first is not None else None
            if first is not None and second is not None:
                self.interval.labels(item.name).set((second - first).total_seconds())

    def push(
        self, gateway: str, job: str = "reaper", grouping_key: Mapping[str, str] | None = None
    ) -> None:
        """Push to a Prometheus Pushgateway (one-shot runs). A push replaces its group: shards
        push to a group each (``grouping_key``), or each would erase the others' metrics."""
        group = dict(grouping_key) if grouping_key is not None else None
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key=group)

    def write(self, path: str) -> None:
        """Write the text exposition to a file (node_exporter textfile collector)."""
        write_to_textfile(path, self.registry)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            ready, why = self.server.ready()
            self._send(200 if ready else 503, (why + "\n").encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes every few seconds are not worth a log line


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.ready = ready


class HealthServer:
    """Serves /metrics, /healthz and /readyz on a background thread."""

    def __init__(
        self, host: str, port: int, metrics: Metrics, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        self._server = _Server((host, port), metrics, ready)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="reaper-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
