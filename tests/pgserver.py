"""A throwaway PostgreSQL cluster for the test suite.

pytest-postgresql's process fixture cannot run as root, and initdb/postgres refuse to. So we start
our own cluster: as the ``postgres`` user when we are root, as ourselves otherwise, always in a
fresh temporary directory that is removed again on ``stop()``.

Cleanup happens three ways, so no postgres process outlives the test session:

- ``stop()`` (or leaving the ``with`` block) stops the server and removes the directory;
- an ``atexit`` hook does the same when the interpreter exits without calling ``stop()``;
- a small watchdog process, started in its own session, holds the read end of a pipe. When this
  process dies in a way that skips ``atexit`` (SIGKILL, a crash), the pipe closes and the watchdog
  shuts the postmaster down and removes the directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = ["PostgresNotFoundError", "PostgresServer", "find_pg_bindir"]

SUPERUSER = "postgres"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
# On ext4 with fsync off, CREATE DATABASE still takes ~300 ms and start() ~1.4 s; on tmpfs ~25 ms
# and ~0.6 s. Docker gives containers a 64 MiB /dev/shm by default, too small for a cluster.
SHM_DIR = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory inside it
SHM_MIN_FREE = 1 << 30
LOG_TAIL_LINES = 40

ShutdownMode = Literal["smart", "fast", "immediate"]

# Durability off for speed: these clusters never outlive an OS crash. synchronous_commit stays on
# (with fsync=off it costs almost nothing): with it off, an immediate stop - how tests simulate a
# database crash - silently loses the last commits, and audit durability tests would flake.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class PostgresNotFoundError(RuntimeError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) could not be found."""


def find_pg_bindir() -> Path:
    """Return the directory holding initdb, pg_ctl and postgres: pg_config's, else the newest."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    # Debian/Ubuntu keep the server binaries off PATH, and the pg_config on PATH may come from
    # libpq-dev without any server installed next to it.
    candidates += sorted(DEBIAN_PG_ROOT.glob("*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    searched = ", ".join(str(c) for c in candidates) or "nothing"
    raise PostgresNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; searched "
        f"pg_config --bindir and {DEBIAN_PG_ROOT}/*/bin ({searched}). "
        "Install the server, e.g. `apt-get install postgresql-15`."
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


class PostgresServer:
    """A throwaway PostgreSQL cluster for tests."""

    def __init__(
        self, base_dir: Path | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        # base_dir is where the temporary directory is created (default: /dev/shm when it is
        # roomy, else the system temp dir). Keep it short: a Unix socket path has at most 107 bytes.
        self._base_dir = base_dir if base_dir is not None else _default_base_dir()
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._bindir: Path | None = None
        self._root: Path | None = None
        self._port: int | None = None
        self._running = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    # -- paths and identity -------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The temporary directory holding the data dir, the socket dir and the log."""
        if self._root is None:
            raise RuntimeError("PostgresServer has not been started")
        return self._root

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        """The postmaster's log file."""
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's Unix socket."""
        return self.root / "sock"

    @property
    def port(self) -> int:
        """The TCP port the server listens on at 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("PostgresServer has not been started")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the postmaster is up (as far as this object started it)."""
        return self._running

    @property
    def postmaster_pid(self) -> int | None:
        """The postmaster's process id, read from postmaster.pid; None when it is not running."""
        return _read_postmaster_pid(self.data_dir) if self._root is not None else None

    def url(self, database: str = "postgres") -> str:
        """Return the SQLAlchemy URL of `database` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{quote(database, safe='')}"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Create a fresh cluster in a temporary directory and start it."""
        if self._root is not None:
            raise RuntimeError(f"PostgresServer already started in {self._root}")
        self._bindir = find_pg_bindir()
        self._root = self._make_root()
        atexit.register(self.stop)
        try:
            self._start_watchdog()
            self._initdb()
            # Another process may take the port between picking and binding it; pick again.
            for attempt in range(3):
                self._port = _free_port()
                try:
                    self.start_server()
                except RuntimeError:
                    if attempt == 2 or "could not bind" not in self._log_tail():
                        raise
                else:
                    break
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server immediately and remove its directory; safe to call twice."""
        atexit.unregister(self.stop)
        if self._root is None:
            return
        try:
            if self.data_dir.exists():
                self.stop_server(mode="immediate")
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
            self._port = None
            self._running = False
            self._stop_watchdog()

    def stop_server(self, mode: ShutdownMode = "fast") -> None:
        """Stop the postmaster but keep the data directory, so `start_server()` can resume."""
        pid = _read_postmaster_pid(self.data_dir)
        self._run(
            [self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30"],
            check=False,
        )
        # pg_ctl can give up (timeout, odd state); never leave a postmaster behind.
        if pid is not None and _process_alive(pid):
            _kill(pid)
            _remove_stale_pidfile(self.data_dir)
        self._running = False

    def start_server(self) -> None:
        """Start the postmaster on the existing data directory and wait until it accepts logins."""
        if self._running:
            raise RuntimeError("PostgreSQL is already running")
        argv = ["-k", str(self.socket_dir), "-p", str(self.port), "-h", HOST]
        for name, value in self._settings.items():
            argv += ["-c", f"{name}={value}"]
        options = shlex.join(argv)
        result = self._run(
            [
                self._bin("pg_ctl"), "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_file),
                "-o", options,
                "-w", "-t", str(int(STARTUP_TIMEOUT)),
            ],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            # A postmaster that pg_ctl gave up on may still be starting.
            pid = _read_postmaster_pid(self.data_dir)
            if pid is not None and _process_alive(pid):
                _kill(pid)
                _remove_stale_pidfile(self.data_dir)
            raise RuntimeError(
                f"PostgreSQL failed to start on {HOST}:{self._port} "
                f"(pg_ctl exit {result.returncode}): {result.stdout.strip()}\n"
                f"--- tail of {self.log_file} ---\n{self._log_tail()}"
            )
        self._running = True
        self._wait_for_connection()

    def restart(self) -> None:
        """Stop and start the postmaster on the same port, keeping the data."""
        self.stop_server()
        self.start_server()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a unique random name if None) and return its SQLAlchemy URL."""
        name = name or f"test_{secrets.token_hex(6)}"
        with self._admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating its connections first; a missing database is fine."""
        with self._admin_connection() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- internals ----------------------------------------------------------------------------

    def _admin_connection(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=HOST, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        )

    def _wait_for_connection(self) -> None:
        # pg_ctl -w already polls, but confirm a real login over TCP before handing the URL out.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with self._admin_connection() as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL on {HOST}:{self._port} did not accept connections: {exc}\n"
                        f"--- tail of {self.log_file} ---\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.05)

    def _make_root(self) -> Path:
        if self._as_postgres:
            try:
                owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, but there is no {SUPERUSER!r} user to run PostgreSQL as"
                ) from None
        root = Path(tempfile.mkdtemp(prefix="reaper-pg-", dir=self._base_dir))
        try:
            # mkdtemp makes 0700; the postgres user must be able to enter it.
            root.chmod(0o755)
            (root / "sock").mkdir()
            if self._as_postgres:
                _check_traversable(root)
                for path in (root, root / "sock"):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return root

    def _initdb(self) -> None:
        result = self._run(
            [
                self._bin("initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "-A", "trust",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{result.stdout}")

    def _run(self, argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        if self._as_postgres:
            argv = [_runuser(), "-u", SUPERUSER, "--", *argv]
        return subprocess.run(
            argv,
            cwd=self.root,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=check,
            timeout=STARTUP_TIMEOUT + 30,
        )

    def _bin(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def _start_watchdog(self) -> None:
        # Its own session: a Ctrl-C aimed at pytest must not kill the watchdog before it cleans up.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # EOF tells it to clean up; there is nothing left to clean up
        try:
            watchdog.wait(timeout=15)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


# Runs in a separate interpreter; kept dependency-free. argv[1] is the server's root directory.
_WATCHDOG = """
import os, shutil, signal, sys, time
root = sys.argv[1]
sys.stdin.buffer.read()  # returns at EOF: our owner closed the pipe or died
try:
    with open(os.path.join(root, "data", "postmaster.pid")) as f:
        pid = int(f.readline())
except (OSError, ValueError):
    pid = None
if pid is not None:
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except OSError:
            break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)
        else:
            continue
        break
shutil.rmtree(root, ignore_errors=True)
"""


def _runuser() -> str:
    # /usr/sbin is often missing from a non-login root shell's PATH.
    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(
            f"running as root, but runuser (util-linux) is missing: cannot run PostgreSQL as "
            f"the {SUPERUSER} user"
        )
    return found


def _default_base_dir() -> Path | None:
    """Return SHM_DIR if it is there, world-writable and roomy; None means the system temp dir."""
    try:
        mode = SHM_DIR.stat().st_mode
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    world_writable = stat.S_ISDIR(mode) and mode & 0o1777 == 0o1777
    if world_writable and stats.f_bavail * stats.f_frsize >= SHM_MIN_FREE:
        return SHM_DIR
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from the developer's shell must not steer our cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first_line)
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie counts as dead (the postmaster is not our child to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int) -> None:
    """SIGKILL `pid` and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _process_alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"postmaster {pid} survived SIGKILL")
        time.sleep(0.05)


def _remove_stale_pidfile(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "postmaster.pid").unlink()


def _check_traversable(path: Path) -> None:
    """Fail early if the postgres user could not reach `path` (e.g. a TMPDIR under /root)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{parent} is not traversable by the {SUPERUSER} user (mode "
                f"{stat.filemode(mode)}); pass base_dir= or set TMPDIR to e.g. /tmp"
            )
