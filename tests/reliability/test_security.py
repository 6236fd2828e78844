"""Security: TLS verification, secrets that never leak, ids that never reach a URL unchecked.

* TLS verification is on by default (a self-signed HTTPS simulator is refused before any request),
  a CA bundle is configurable, and turning verification off is explicit and logged as a warning.
* Known secret values (AK, SK, IAM token, database password) never appear in anything reaper
  produces: stdout and stderr of every command (debug logs included), ``--help``, saved plans,
  and every column of the audit tables. Database URLs are printed with the password redacted.
* Ids from targets are checked before they go into a URL path or a body: one that fails is
  recorded as ``skipped_invalid_id`` and never sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
import pytest
import trustme
import yaml
from conftest import policy_doc, sim_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgserver import PostgresServer
from psycopg import sql
from structlog.testing import capture_logs

from reaper.audit import AuditStore
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import RunStatus, build_target, run_policy
from reaper.simulators import DataPipelineSimulator, DcsSimTask, IotdaSimTask, SimulatorBase
from reaper.targets.huawei import HuaweiTarget

from .drivers import DRIVERS, Secrets, load, pointed_policies, secrets_in_env, utcnow
from .harness import Result, audit_state, reaper

# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_sim(ca: trustme.CA) -> Iterator[tuple[DataPipelineSimulator, str]]:
    """A data_pipeline simulator serving HTTPS with a certificate from a private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    now = datetime.now(UTC)
    tasks = [sim_task(f"task_20260101_{i:06d}", now=now) for i in range(5)]
    sim = DataPipelineSimulator(tasks, timezone="UTC")
    url = sim.start(ssl_context=context)
    yield sim, url
    sim.stop()


def _https_policy(url: str, **target: Any) -> LoadedPolicy:
    doc = policy_doc(url)
    doc["target"] |= target
    [loaded] = load_policy_text(yaml.safe_dump(doc))
    return loaded


class TestTls:
    def test_verification_is_on_by_default(
        self, https_sim: tuple[DataPipelineSimulator, str], module_store: AuditStore
    ) -> None:
        """A certificate no trusted CA signed: refused during the handshake, nothing sent."""
        sim, url = https_sim
        assert url.startswith("https://")
        run = asyncio.run(run_policy(_https_policy(url), module_store))
        assert run.status is RunStatus.ABORTED
        assert run.error and "CERTIFICATE_VERIFY_FAILED" in run.error
        assert sim.stats["requests"] == 0
        assert sim.deleted_ids == []

    def test_a_ca_bundle_is_trusted(
        self,
        https_sim: tuple[DataPipelineSimulator, str],
        module_store: AuditStore,
        ca: trustme.CA,
        tmp_path: Path,
    ) -> None:
        """target.ca_bundle names the private CA: verified, and the run goes through."""
        sim, url = https_sim
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        run = asyncio.run(run_policy(_https_policy(url, ca_bundle=str(bundle)), module_store))
        assert run.status is RunStatus.SUCCEEDED, run.error
        assert len(sim.deleted_ids) == 5

    def test_another_ca_is_refused(
        self, https_sim: tuple[DataPipelineSimulator, str], module_store: AuditStore, tmp_path: Path
    ) -> None:
        """A bundle with some other CA does not make the simulator's certificate trusted."""
        sim, url = https_sim
        bundle = tmp_path / "other.pem"
        trustme.CA().cert_pem.write_to_path(str(bundle))
        loaded = _https_policy(url, ca_bundle=str(bundle))
        run = asyncio.run(run_policy(loaded, module_store))
        assert run.status is RunStatus.ABORTED
        assert sim.stats["requests"] == 0

    def test_turning_verification_off_is_explicit_and_loud(
        self, https_sim: tuple[DataPipelineSimulator, str], module_store: AuditStore
    ) -> None:
        """verify_tls: false works, and says so in a warning naming the policy and target."""
        _, url = https_sim
        with capture_logs() as logs:
            run = asyncio.run(run_policy(_https_policy(url, verify_tls=False), module_store))
        assert run.status is RunStatus.SUCCEEDED, run.error
        [warning] = [e for e in logs if e["event"] == "tls_verification_disabled"]
        assert warning["log_level"] == "warning"
        assert warning["policy"] == "test-policy" and warning["target"] == url

    def test_the_command_line_refuses_and_accepts(
        self, https_sim: tuple[DataPipelineSimulator, str], ca: trustme.CA, tmp_path: Path
    ) -> None:
        """`reaper plan` end to end: refused by default, fine with the CA, loud without checks."""
        _, url = https_sim
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        outputs = {}
        for name, extra in (
            ("default", {}),
            ("ca", {"ca_bundle": str(bundle)}),
            ("off", {"verify_tls": False}),
        ):
            doc = policy_doc(url)
            doc["target"] |= extra
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(doc), encoding="utf-8")
            outputs[name] = reaper("plan", "--policies", str(path), env={}, timeout=60)
        assert outputs["default"].code == 1
        assert "CERTIFICATE_VERIFY_FAILED" in outputs["default"].stdout
        assert outputs["ca"].code == 0, outputs["ca"].output()
        assert outputs["off"].code == 0, outputs["off"].output()
        events = [json.loads(line) for line in outputs["off"].stderr.splitlines() if line]
        assert any(
            e["event"] == "tls_verification_disabled" and e["level"] == "warning" for e in events
        )


# --- secrets ------------------------------------------------------------------------------------

ROLE = "reaper_rlb"


@pytest.fixture
def password_database(pg_server: PostgresServer) -> str:
    """A database owned by a role with a password; its URL carries no password."""
    secrets = Secrets()
    admin = urlsplit(pg_server.url().replace("postgresql+psycopg", "http"))
    assert admin.hostname and admin.username
    with psycopg.connect(
        host=admin.hostname,
        port=admin.port,
        user=admin.username,
        dbname="postgres",
        autocommit=True,
    ) as connection:
        connection.execute(
            sql.SQL(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {r}) THEN "
                "CREATE ROLE {i} LOGIN PASSWORD {p}; END IF; END $$"
            ).format(
                r=sql.Literal(ROLE), i=sql.Identifier(ROLE), p=sql.Literal(secrets.db_password)
            )
        )
        name = f"rlb_{utcnow().strftime('%H%M%S%f')}"
        connection.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(ROLE)
            )
        )
    return f"postgresql://{ROLE}@{admin.hostname}:{admin.port}/{name}"


@pytest.mark.slow
def test_secrets_never_appear(password_database: str, tmp_path: Path) -> None:
    """Every command, with known secrets: none appears in any output, file or audit column."""
    secrets = Secrets()
    policies = tmp_path / "policies"
    policies.mkdir()
    (tmp_path / "secrets").mkdir()
    sims: list[SimulatorBase] = []
    task_ids: list[str] = []
    try:
        for kind, driver in DRIVERS.items():
            sim, records = driver.build(40, utcnow(), 3, _no_faults(), secrets)
            url = sim.start()
            sims.append(sim)
            driver.write_secrets(secrets, tmp_path / "secrets")
            docs = pointed_policies(driver, url, tmp_path / "secrets", delete={"rate": "200/s"})
            (policies / f"{kind}.yaml").write_text(yaml.safe_dump(docs), encoding="utf-8")
            task_ids.extend(sorted(driver_ids for driver_ids in _deletable(driver, docs, records)))
        # A gateway that does not know our AK: the refusal must not echo it either.
        stranger, _ = DRIVERS["huawei_dcs"].build(
            5, utcnow(), 4, _no_faults(), Secrets(ak="X" * 20)
        )
        sims.append(stranger)
        refused = tmp_path / "refused.yaml"
        refused.write_text(
            yaml.safe_dump(
                pointed_policies(DRIVERS["huawei_dcs"], stranger.start(), tmp_path / "secrets")
            ),
            encoding="utf-8",
        )
        outputs = _every_command(password_database, policies, refused, tmp_path, task_ids)
    finally:
        for sim in sims:
            sim.stop()

    leaks = []
    for result in outputs:
        for name, value in secrets.values().items():
            if value in result.output():
                leaks.append(f"{name} in `reaper {' '.join(result.args)}`")
    for path in tmp_path.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        leaks.extend(f"{n} in {path.name}" for n, v in secrets.values().items() if v in text)
    state = audit_state(password_database.replace(ROLE, f"{ROLE}:{secrets.db_password}"))
    for table, rows in (("reaper_runs", state.runs), ("reaper_audit", state.rows)):
        text = json.dumps(rows, default=str)
        leaks.extend(f"{n} in {table}" for n, v in secrets.values().items() if v in text)
    assert not leaks, leaks
    assert state.ids("deleted"), "the run deleted something (so its rows were checked)"
    # The password is redacted, not dropped: a reader sees that there is one.
    shown = [r for r in outputs if r.args == ("db", "current")]
    assert shown and all("***" in r.stdout for r in shown if r.code == 0), shown
    crashed = [r.args for r in outputs if "Traceback" in r.stderr]
    assert not crashed, crashed


def _no_faults() -> Any:
    from reaper.simulators import Faults

    return Faults()


def _deletable(driver: Any, docs: list[dict[str, Any]], records: list[Any]) -> set[str]:
    from .drivers import expected

    return set(sorted(expected(driver, load(docs), records, utcnow()))[:2])


def _every_command(
    database: str, policies: Path, refused: Path, tmp_path: Path, task_ids: list[str]
) -> list[Result]:
    secrets = Secrets()
    password_file = tmp_path / "db_password"
    password_file.write_text(secrets.db_password + "\n", encoding="utf-8")
    env = {
        "REAPER_DATABASE_URL": database,
        "REAPER_DATABASE_PASSWORD": secrets.db_password,
        "REAPER_POLICIES": str(policies),
        "REAPER_LOG_LEVEL": "debug",
        **DRIVERS["huawei_dcs"].env(secrets),
    }
    plan = str(tmp_path / "plan.json")
    commands: list[tuple[str, ...]] = [
        ("--help",),
        *((c, "--help") for c in ("validate", "schema", "plan", "apply", "run", "audit")),
        *((c, "--help") for c in ("reconcile", "explain", "db")),
        ("audit", "verify", "--help"),
        ("audit", "prune", "--help"),
        ("db", "upgrade", "--help"),
        ("db", "current", "--help"),
        ("db", "upgrade"),
        ("db", "current"),
        ("validate",),
        ("schema",),
        ("plan",),
        ("plan", "--output", "json"),
        ("plan", "--save", plan),
        ("run", "--dry-run", "--output", "json"),
        ("apply", plan),
        ("run",),
        ("run", "--output", "json"),
        ("audit",),
        ("audit", "--output", "json"),
        ("audit", "--output", "csv"),
        ("audit", "verify"),
        ("reconcile",),
        ("reconcile", "--output", "json"),
        ("run", "--policies", str(refused)),
        ("plan", "--policies", str(refused)),
        *(("explain", task_id) for task_id in task_ids[:3]),
        *(("explain", task_id, "--show-policy", "--output", "json") for task_id in task_ids[:3]),
    ]
    results = [reaper(*args, env=env, timeout=90) for args in commands]
    # The password from a file, and inline in the URL: printed redacted.
    no_env_password = {k: v for k, v in env.items() if k != "REAPER_DATABASE_PASSWORD"}
    results.append(
        reaper(
            "db",
            "current",
            env={**no_env_password, "REAPER_DATABASE_PASSWORD_FILE": str(password_file)},
        )
    )
    inline = database.replace(f"{ROLE}@", f"{ROLE}:{secrets.db_password}@")
    results.append(reaper("db", "current", env={**no_env_password, "REAPER_DATABASE_URL": inline}))
    results.append(reaper("audit", env={**no_env_password, "REAPER_DATABASE_URL": inline}))
    # Unreachable and invalid databases: the errors name the URL, redacted.
    unreachable = f"postgresql://{ROLE}:{secrets.db_password}@127.0.0.1:1/nowhere"
    results.append(reaper("db", "current", env={**env, "REAPER_DATABASE_URL": unreachable}))
    results.append(reaper("run", env={**env, "REAPER_DATABASE_URL": unreachable}))
    results.append(reaper("db", "upgrade", env={**env, "REAPER_DATABASE_URL": unreachable}))
    invalid = f"mysql://{ROLE}:{secrets.db_password}@127.0.0.1/db"
    results.append(reaper("validate", env={**env, "REAPER_DATABASE_URL": invalid}))
    # Missing secrets: the error names the variable, never another secret's value.
    missing = {k: v for k, v in env.items() if k != "HUAWEICLOUD_SDK_SK"}
    results.append(reaper("run", env=missing))
    return results


# --- ids ----------------------------------------------------------------------------------------

BAD_IDS = {
    "data_pipeline": [
        "task_20240101_000000/../../etc",
        "task_../../x",
        "task_20240101_000001\n",
        "task_20240101_00000\uff12",  # a fullwidth digit: \d in Python matches it
        "task_%2e%2e%2fetc",
        "task_20240101_000002 ",
    ],
    "huawei_dcs": [
        "../../v2/other/tasks/x",
        "a/b",
        "x%2Fy",
        "..",
        "id with space",
        "ünïcode",
        "a" * 65,
        "tab\tid",
        "q?x=1",
        "h#frag",
    ],
    "huawei_iotda": [
        "../5e0000000000000000000",
        "5e000000000000000000000/",
        "5E0000000000000000000001",
        "5e00000000000000000000012",
        "5e000000000000000000%2f1",
    ],
}


def _add_bad(kind: str, sim: Any, ids: list[str]) -> None:
    created = utcnow() - timedelta(days=200)
    if kind == "data_pipeline":
        sim.add_tasks(
            [
                sim_task(i, "completed", timedelta(days=200), now=utcnow(), task_name="x")
                for i in ids
            ]
        )
    elif kind == "huawei_dcs":
        sim.add_tasks([DcsSimTask(id=i, status="SUCCESS", created_at=created) for i in ids])
    else:
        # The simulator refuses such ids itself; a broken server would not.
        with sim.lock:
            for i in ids:
                sim._tasks[i] = IotdaSimTask(
                    i, "firmwareUpgrade", "Success", created.replace(microsecond=0), task_name="x"
                )
            sim._by_type = None


@pytest.mark.parametrize("kind", sorted(DRIVERS))
def test_invalid_ids_are_recorded_never_sent(
    kind: str, module_store: AuditStore, tmp_path: Path
) -> None:
    """Ids that could escape their URL segment or body: skipped_invalid_id rows, no request."""
    driver, secrets = DRIVERS[kind], Secrets()
    sim, _ = driver.build(30, utcnow(), 5, _no_faults(), secrets)
    _add_bad(kind, sim, BAD_IDS[kind])
    url = sim.start()
    try:
        driver.write_secrets(secrets, tmp_path)
        [doc, *_] = pointed_policies(driver, url, tmp_path, delete={"rate": "500/s"})
        doc.pop("keep", None)
        [loaded] = load_policy_text(yaml.safe_dump(doc))
        with secrets_in_env(secrets):
            run = asyncio.run(run_policy(loaded, module_store))
    finally:
        sim.stop()
    assert run.status is RunStatus.PARTIAL, run.error
    assert run.summary.deleted > 0
    rows = module_store.rows(run_id=run.run_id, limit=None)
    skipped = {row.task_id for row in rows if row.outcome == "skipped_invalid_id"}
    assert skipped == set(BAD_IDS[kind])
    sent = set(sim.delete_requests_by_id)
    assert not sent & set(BAD_IDS[kind])
    assert not any(unquote(s) in BAD_IDS[kind] for s in sent)
    assert sim.traversal_attempts == []


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(sorted(DRIVERS)), task_id=st.text(max_size=70))
def test_an_id_the_guard_accepts_is_one_url_segment(
    policies: dict[str, LoadedPolicy], kind: str, task_id: str
) -> None:
    """Whatever the guard lets through has no '/', '..', control characters, and (for per-id
    APIs) becomes exactly one percent-encoded path segment of the delete URL."""
    with secrets_in_env():
        target, client = build_target(policies[kind])
    asyncio.run(client.aclose())
    if target.invalid_id_reason(task_id) is not None:
        return
    assert task_id and "/" not in task_id and "\\" not in task_id and ".." not in task_id
    assert task_id.isprintable() and task_id.strip() == task_id
    if isinstance(target, HuaweiTarget):
        url = target.delete_url(task_id)
        path = urlsplit(url).path
        assert path.endswith("/" + quote(task_id, safe=""))
        assert unquote(path.rsplit("/", 1)[1]) == task_id
