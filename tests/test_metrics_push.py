"""One-shot metrics: a Pushgateway push (or a textfile) replaces the previous one, so `reaper run`
carries over each policy's last success from the audit and its schedule interval, the two series
the "not succeeding" alert compares. A local HTTP server stands in for the Pushgateway."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from conftest import fast_retries, policy_doc
from prometheus_client.parser import text_string_to_metric_families
from test_cli import old, reaper

from reaper.audit import runs_table
from reaper.db import make_engine

LAST_SUCCESS = "reaper_last_success_timestamp_seconds"
INTERVAL = "reaper_schedule_interval_seconds"


class Pushgateway(ThreadingHTTPServer):
    """Records every push: (method, path, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.pushes: list[tuple[str, str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Receiver(BaseHTTPRequestHandler):
    server: Pushgateway

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        self.server.pushes.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def gateway() -> Iterator[Pushgateway]:
    server = Pushgateway()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def setup(tmp_path: Path, database_url: str) -> dict[str, Any]:
    (tmp_path / "policies").mkdir()
    return {
        "dir": tmp_path,
        "url": database_url,
        "env": {
            "REAPER_DATABASE_URL": database_url,
            "REAPER_POLICIES": str(tmp_path / "policies"),
        },
    }


def write_policy(setup: dict[str, Any], base_url: str) -> None:
    """The test policy, due daily at 03:00 UTC, retrying fast (a dead target fails quickly)."""
    doc = policy_doc(base_url, schedule="0 3 * * *")
    doc["target"]["retries"] = fast_retries()
    (setup["dir"] / "policies" / "p.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")


def samples(text: str, name: str) -> dict[str, float]:
    """Per-policy values of one gauge in a text exposition (Prometheus' own parser)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels["policy"]] = sample.value
    return found


def last_success_in_audit(url: str) -> datetime:
    engine = make_engine(url)
    with engine.connect() as connection:
        finished = connection.execute(
            sa.select(runs_table.c.finished_at).where(runs_table.c.status == "succeeded")
        ).scalar_one()
    engine.dispose()
    return finished


class TestPushgateway:
    def test_a_failed_run_still_pushes_the_last_success(
        self, data_pipeline: Any, gateway: Pushgateway, setup: dict[str, Any]
    ) -> None:
        """After a success, a failing run's push still carries the policy's last success (from
        the audit) and its schedule interval (a daily schedule: 86400 s)."""
        env = {**setup["env"], "REAPER_PUSHGATEWAY_URL": gateway.url}
        _, url = data_pipeline(old(3))
        write_policy(setup, url)
        assert reaper("run", env=env).returncode == 0
        succeeded = last_success_in_audit(setup["url"])

        write_policy(setup, "http://127.0.0.1:9")  # nothing listens: the listing fails
        failed = reaper("run", env=env)
        assert failed.returncode == 1
        assert len(gateway.pushes) == 2
        method, path, body = gateway.pushes[-1]
        assert (method, path) == ("PUT", "/metrics/job/reaper")
        assert samples(body, LAST_SUCCESS) == {
            "test-policy": pytest.approx(succeeded.timestamp(), abs=1e-3)
        }
        assert samples(body, INTERVAL) == {"test-policy": 86400.0}
        assert samples(body, "reaper_runs_total") == {"test-policy": 1.0}

    def test_a_policy_that_never_succeeded_has_no_last_success(
        self, gateway: Pushgateway, setup: dict[str, Any]
    ) -> None:
        """No success in the audit: no last-success sample (the "never succeeded" alert's case)."""
        write_policy(setup, "http://127.0.0.1:9")
        env = {**setup["env"], "REAPER_PUSHGATEWAY_URL": gateway.url}
        assert reaper("run", env=env).returncode == 1
        [(_, _, body)] = gateway.pushes
        assert samples(body, LAST_SUCCESS) == {}
        assert samples(body, INTERVAL) == {"test-policy": 86400.0}


class TestTextfile:
    def test_a_failed_run_keeps_the_last_success_in_the_file(
        self, data_pipeline: Any, setup: dict[str, Any]
    ) -> None:
        """REAPER_METRICS_FILE after a failing run still holds the last success from the audit."""
        metrics_file = setup["dir"] / "reaper.prom"
        env = {**setup["env"], "REAPER_METRICS_FILE": str(metrics_file)}
        _, url = data_pipeline(old(2))
        write_policy(setup, url)
        assert reaper("run", env=env).returncode == 0
        succeeded = last_success_in_audit(setup["url"])
        write_policy(setup, "http://127.0.0.1:9")
        assert reaper("run", env=env).returncode == 1
        text = metrics_file.read_text(encoding="utf-8")
        assert samples(text, LAST_SUCCESS) == {
            "test-policy": pytest.approx(succeeded.timestamp(), abs=1e-3)
        }
