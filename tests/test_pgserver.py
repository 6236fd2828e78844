"""Tests for the throwaway PostgreSQL server the test suite runs against."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pgserver
import psycopg
import pytest
import sqlalchemy as sa
from pgserver import PostgresNotFoundError, PostgresServer, find_pg_bindir

try:
    find_pg_bindir()
except PostgresNotFoundError as exc:
    if os.environ.get("REAPER_TEST_SKIP_POSTGRES") != "1":
        raise
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer() as srv:
        yield srv


def scalar(url: str, query: str) -> object:
    """Run one query through SQLAlchemy on a fresh engine and return the single value."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query)).scalar_one()
    finally:
        engine.dispose()


def cluster_pids(postmaster_pid: int) -> set[int]:
    """The postmaster and its children, as they run right now."""
    pids = {postmaster_pid}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue  # the process exited while we looked
        if f"PPid:\t{postmaster_pid}" in lines:
            pids.add(int(status.parent.name))
    return pids


def still_running(pids: set[int]) -> set[int]:
    """Those of `pids` that still run; a zombie has exited, it is only waiting to be reaped."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.add(pid)
    return running


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


OWNER_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from pgserver import PostgresServer
srv = PostgresServer()
srv.start()
print(srv.root, srv.postmaster_pid, flush=True)
sys.stdin.readline()  # the test looks at the cluster's processes meanwhile
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_owner(how: str) -> tuple[Path, set[int], int]:
    """Start a server in a child interpreter that then exits `how`; return root, pids, status."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(Path(pgserver.__file__).parent), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdin is not None and owner.stdout is not None
    root, postmaster = owner.stdout.readline().split()
    pids = cluster_pids(int(postmaster))
    owner.stdin.close()
    owner.stdout.close()
    return Path(root), pids, owner.wait(timeout=60)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary directory the postgres user can enter (pytest's tmp_path is 0700 for root)."""
    path = Path(tempfile.mkdtemp(prefix="reaper-pgtest-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestFindPgBindir:
    def test_finds_server_binaries(self) -> None:
        """The directory found holds initdb, pg_ctl and postgres."""
        bindir = find_pg_bindir()

        assert {"initdb", "pg_ctl", "postgres"} <= {p.name for p in bindir.iterdir()}

    def test_clear_error_when_missing(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Without pg_config and without a Debian layout, the error says what was searched."""
        monkeypatch.setattr(shutil, "which", lambda name: None)
        monkeypatch.setattr(pgserver, "DEBIAN_PG_ROOT", tmp_path)

        with pytest.raises(PostgresNotFoundError, match="initdb, pg_ctl, postgres"):
            find_pg_bindir()

    def test_prefers_newest_debian_version(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Among /usr/lib/postgresql/<version>/bin, the highest version wins (10 beats 9.6)."""
        for version in ("9.6", "10", "15", "16-broken"):
            bindir = tmp_path / version / "bin"
            bindir.mkdir(parents=True)
            if version != "16-broken":  # a directory without the binaries is passed over
                for name in ("initdb", "pg_ctl", "postgres"):
                    (bindir / name).touch()
        monkeypatch.setattr(shutil, "which", lambda name: None)
        monkeypatch.setattr(pgserver, "DEBIAN_PG_ROOT", tmp_path)

        assert find_pg_bindir() == tmp_path / "15" / "bin"


class TestStart:
    def test_url_works_with_sqlalchemy(self, server: PostgresServer) -> None:
        """The URL is a psycopg SQLAlchemy URL on 127.0.0.1 that answers queries."""
        url = server.url()

        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/postgres"
        assert scalar(url, "SELECT 1") == 1

    def test_server_is_utf8(self, server: PostgresServer) -> None:
        """The cluster is created with UTF8 encoding."""
        assert scalar(server.url(), "SHOW server_encoding") == "UTF8"

    def test_speed_settings(self, server: PostgresServer) -> None:
        """Crash safety is traded for speed and there is room for many connections."""
        assert scalar(server.url(), "SHOW fsync") == "off"
        assert scalar(server.url(), "SHOW full_page_writes") == "off"
        assert scalar(server.url(), "SHOW max_connections") == "200"

    def test_commits_are_not_deferred(self, server: PostgresServer) -> None:
        """synchronous_commit stays on, so a simulated crash keeps every committed row."""
        assert scalar(server.url(), "SHOW synchronous_commit") == "on"

    def test_extra_settings(self) -> None:
        """Settings passed to the constructor reach the server and override the defaults."""
        settings = {"max_connections": "20", "application_name": "reaper-tests"}
        with PostgresServer(settings=settings) as srv:
            assert scalar(srv.url(), "SHOW max_connections") == "20"
            assert scalar(srv.url(), "SHOW fsync") == "off"

    def test_data_dir_in_private_temp_dir(self, server: PostgresServer) -> None:
        """The cluster lives in its own temporary directory, owned by postgres when we are root."""
        assert server.root.name.startswith("reaper-pg-")
        assert (server.data_dir / "PG_VERSION").exists()
        if os.geteuid() == 0:
            assert server.data_dir.stat().st_uid == pwd.getpwnam("postgres").pw_uid

    def test_prefers_roomy_dev_shm(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """By default the cluster goes to /dev/shm, unless it is missing or small."""
        shm = pgserver.SHM_DIR
        monkeypatch.setattr(pgserver, "SHM_MIN_FREE", 1)
        if shm.is_dir():
            assert pgserver._default_base_dir() == shm
        monkeypatch.setattr(pgserver, "SHM_MIN_FREE", 1 << 60)
        assert pgserver._default_base_dir() is None
        monkeypatch.setattr(pgserver, "SHM_DIR", tmp_path / "missing")
        assert pgserver._default_base_dir() is None

    def test_retries_when_port_is_taken(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """If another process grabs the chosen port first, start() picks another one."""
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            ports = iter([taken])
            free_port = pgserver._free_port
            monkeypatch.setattr(pgserver, "_free_port", lambda: next(ports, None) or free_port())

            with PostgresServer() as srv:
                assert srv.port != taken
                assert scalar(srv.url(), "SELECT 1") == 1

    def test_failure_reports_log_and_cleans_up(
        self, monkeypatch: pytest.MonkeyPatch, public_tmp: Path
    ) -> None:
        """A server that cannot start raises with the log tail and leaves no directory behind."""
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = blocker.getsockname()[1]
            monkeypatch.setattr(pgserver, "_free_port", lambda: taken)
            srv = PostgresServer(base_dir=public_tmp)

            with pytest.raises(RuntimeError, match=r"(?s)failed to start.*could not bind"):
                srv.start()

        assert list(public_tmp.iterdir()) == []


class TestDatabases:
    def test_create_random_database(self, server: PostgresServer) -> None:
        """Without a name, each call creates a new, empty database with a unique name."""
        first, second = server.create_database(), server.create_database()

        assert first != second
        for url in (first, second):
            tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            assert scalar(url, tables) == 0
            server.drop_database(sa.make_url(url).database or "")

    def test_create_named_database(self, server: PostgresServer) -> None:
        """A given name is used as is and the URL points at it."""
        url = server.create_database("Named-DB")

        assert url == server.url("Named-DB")
        assert scalar(url, "SELECT current_database()") == "Named-DB"
        server.drop_database("Named-DB")

    def test_drop_terminates_connections(self, server: PostgresServer) -> None:
        """Dropping works while a connection is still open, and the database is gone afterwards."""
        url = server.create_database("busy")
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                server.drop_database("busy")

                with pytest.raises(sa.exc.OperationalError):
                    conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
        query = "SELECT count(*) FROM pg_database WHERE datname = 'busy'"
        assert scalar(server.url(), query) == 0

    def test_drop_missing_database(self, server: PostgresServer) -> None:
        """Dropping a database that does not exist is not an error (teardown may race)."""
        server.drop_database("never_created")


class TestStopStartServer:
    def test_data_survives_stop_and_start(self, server: PostgresServer) -> None:
        """While stopped, connections fail; after start_server() the data is still there."""
        url = server.create_database()
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE kept (id int)"))
            conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
        engine.dispose()
        port = server.port

        server.stop_server()
        try:
            assert not server.running
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=2)
        finally:
            server.start_server()

        assert server.port == port
        assert scalar(url, "SELECT id FROM kept") == 42

    def test_immediate_stop_keeps_committed_data(self, server: PostgresServer) -> None:
        """An immediate (crash-like) stop still keeps committed rows after crash recovery."""
        url = server.create_database()
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE kept AS SELECT 7 AS id"))
        engine.dispose()

        server.stop_server(mode="immediate")
        server.start_server()

        assert scalar(url, "SELECT id FROM kept") == 7

    def test_restart_keeps_port_and_data(self, server: PostgresServer) -> None:
        """restart() brings the server back on the same port with the same databases."""
        url = server.create_database()
        pid_before, port = server.postmaster_pid, server.port

        server.restart()

        assert server.port == port
        assert server.postmaster_pid not in (None, pid_before)
        assert scalar(url, "SELECT 1") == 1

    def test_start_server_twice_is_an_error(self, server: PostgresServer) -> None:
        """Starting a running server is refused rather than silently ignored."""
        with pytest.raises(RuntimeError, match="already running"):
            server.start_server()


class TestStop:
    def test_stop_removes_everything(self) -> None:
        """stop() ends the postmaster and all its children and deletes the directory."""
        srv = PostgresServer()
        srv.start()
        root, postmaster = srv.root, srv.postmaster_pid
        assert postmaster is not None
        pids = cluster_pids(postmaster)
        assert len(pids) > 1  # the postmaster and its background processes

        srv.stop()

        assert not root.exists()
        assert wait_until(lambda: not still_running(pids))
        srv.stop()  # a second stop is harmless

    def test_context_manager_stops(self) -> None:
        """Leaving the with block stops the server and removes its directory."""
        with PostgresServer() as srv:
            root = srv.root

        assert not root.exists()
        with pytest.raises(RuntimeError, match="not been started"):
            _ = srv.port

    def test_interpreter_exit_without_stop(self) -> None:
        """A session that exits without calling stop() still stops the server (atexit)."""
        root, pids, status = run_owner("exit")

        assert status == 0
        assert not root.exists()  # already gone when the interpreter has exited
        assert wait_until(lambda: not still_running(pids))

    def test_owner_killed_outright(self) -> None:
        """Even if the test process is SIGKILLed (no atexit), the watchdog removes the server."""
        root, pids, status = run_owner("kill")

        assert status == -signal.SIGKILL
        assert wait_until(lambda: not root.exists())
        assert wait_until(lambda: not still_running(pids))
