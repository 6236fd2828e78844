"""Registering tasks with reaper's inventory, for APIs that cannot list their tasks (Aparavi).

Three ways in, all idempotent (registering a task twice changes nothing):

* ``reaper track aparavi --token T --type cpu [--name N] [--base-url URL]``;
* ``reaper track aparavi --from tasks.jsonl`` (JSON Lines or CSV with a header row; fields
  ``token``, ``type``, optional ``name`` and ``base_url``) — all or nothing: one bad line and
  nothing is imported;
* :func:`track` from Python, right after the program started the task.

``reaper track list`` shows the inventory; ``reaper track prune --retired-before 90d`` removes
retired entries, each with an audit row. The database is ``REAPER_DATABASE_URL``, set up on first
use if empty (an older schema needs ``reaper db upgrade`` or ``REAPER_DB_AUTO_UPGRADE``).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from sqlalchemy import Engine

from reaper.converters import parse_duration
from reaper.db import ensure_schema, make_engine
from reaper.errors import AuditError
from reaper.inventory import Inventory, Registration
from reaper.settings import Settings
from reaper.targets.aparavi import (
    DEFAULT_BASE_URL,
    TASK_TYPES,
    check_registration,
    normalize_base_url,
)
from reaper.targets.state import TrackedTask

__all__ = ["ImportReport", "import_records", "read_records", "track", "track_command"]

EXIT_FAILED, EXIT_CONFIG = 1, 2


@dataclass(frozen=True)
class Record:
    """One task to register, as read from a file (``line`` for error messages)."""

    token: str
    type: str
    name: str | None
    base_url: str
    line: int


@dataclass(frozen=True)
class ImportReport:
    """What an import did."""

    registered: int
    already_tracked: int
    retired: int

    @property
    def total(self) -> int:
        return self.registered + self.already_tracked + self.retired


def _engine(engine: Engine | None) -> tuple[Engine, bool]:
    if engine is not None:
        return engine, False
    return _settings_engine(Settings()), True


def _settings_engine(settings: Settings) -> Engine:
    """The engine of REAPER_DATABASE_URL, its schema set up if empty (see ensure_schema)."""
    engine = make_engine(settings.database())
    try:
        ensure_schema(engine, auto_upgrade=settings.db_auto_upgrade)
    except AuditError:
        engine.dispose()
        raise
    return engine


def track(
    token: str,
    type: str,
    *,
    name: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    engine: Engine | None = None,
) -> Registration:
    """Register an Aparavi task with reaper (idempotent); call it right after ``startTask``.

    ``engine`` defaults to the database of ``REAPER_DATABASE_URL``. Raises ValueError for an
    invalid token, type or URL, and AuditError when the database cannot be written.
    """
    problems = check_registration(token, type, name)
    if problems:
        raise ValueError("; ".join(problems))
    base = normalize_base_url(base_url)
    db, owned = _engine(engine)
    try:
        return Inventory(db).register(base, token, type, name)
    finally:
        if owned:
            db.dispose()


def read_records(
    text: str, fmt: str | None = None, *, base_url: str = DEFAULT_BASE_URL
) -> list[Record]:
    """Parse JSON Lines or CSV (``fmt`` None: guessed from the first character).

    Raises ValueError listing every bad line.
    """
    stripped = text.lstrip()
    fmt = fmt or ("jsonl" if stripped.startswith("{") else "csv")
    rows: list[tuple[int, Any]] = []
    problems: list[str] = []
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                rows.append((number, json.loads(line)))
            except ValueError as exc:
                problems.append(f"line {number}: not JSON ({exc.args[0]})")
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"token", "type"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"the CSV header lacks {', '.join(sorted(missing))}")
        rows.extend((reader.line_num, row) for row in reader)
    else:
        raise ValueError(f"unknown format {fmt!r}; use jsonl or csv")
    records: list[Record] = []
    for number, row in rows:
        if not isinstance(row, dict):
            problems.append(f"line {number}: expected an object with token and type")
            continue
        unknown = sorted(set(row) - {"token", "type", "name", "base_url"})
        if unknown:
            problems.append(f"line {number}: unknown field(s) {', '.join(map(str, unknown))}")
            continue
        name = row.get("name") or None
        line_problems = check_registration(row.get("token"), row.get("type"), name)
        try:
            base = normalize_base_url(row.get("base_url") or base_url)
        except ValueError as exc:
            line_problems.append(str(exc))
        if line_problems:
            problems.extend(f"line {number}: {p}" for p in line_problems)
            continue
        records.append(Record(row["token"], row["type"], name, base, number))
    if problems:
        raise ValueError("\n".join(problems))
    return records


def import_records(records: Sequence[Record], *, engine: Engine | None = None) -> ImportReport:
    """Register ``records`` (one transaction per deployment); idempotent."""
    db, owned = _engine(engine)
    inventory = Inventory(db)
    registrations: list[Registration] = []
    try:
        by_base: dict[str, list[Record]] = {}
        for record in records:
            by_base.setdefault(record.base_url, []).append(record)
        for base, items in by_base.items():
            registrations.extend(
                inventory.register_many(base, [(r.token, r.type, r.name) for r in items])
            )
    finally:
        if owned:
            db.dispose()
    states = [r.state for r in registrations]
    return ImportReport(
        states.count("registered"), states.count("already tracked"), states.count("retired")
    )


# --- the command line -------------------------------------------------------------------------


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"reaper: {message}", err=True)
    sys.exit(code)


def _inventory() -> tuple[Inventory, Engine]:
    try:
        engine = _settings_engine(Settings())
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    except (ValueError, OSError) as exc:
        _fail(EXIT_CONFIG, f"invalid settings: {exc}")
    return Inventory(engine), engine


@click.group("track", context_settings={"help_option_names": ["-h", "--help"]})
def track_command() -> None:
    """Register tasks of APIs that cannot list them (Aparavi), and inspect the inventory."""


@track_command.command("aparavi")
@click.option("--token", help="The task token startTask returned.")
@click.option("--type", "task_type", type=click.Choice(TASK_TYPES), help="cpu or gpu.")
@click.option("--name", help="A name to recognise the task by (optional).")
@click.option(
    "--base-url",
    default=DEFAULT_BASE_URL,
    show_default=True,
    help="The Aparavi deployment (must equal the policy's target.base_url).",
)
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Import many tasks from a JSON Lines or CSV file ('-': standard input).",
)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), help="Default: guessed.")
def track_aparavi(
    token: str | None,
    task_type: str | None,
    name: str | None,
    base_url: str,
    source: Path | None,
    fmt: str | None,
) -> None:
    """Register one Aparavi task (--token, --type) or import many (--from FILE). Idempotent."""
    if (source is None) == (token is None):
        _fail(EXIT_CONFIG, "give either --token and --type, or --from FILE")
    try:
        base = normalize_base_url(base_url)
    except ValueError as exc:
        _fail(EXIT_CONFIG, str(exc))
    if source is None:
        if task_type is None:
            _fail(EXIT_CONFIG, "--type is required with --token")
        problems = check_registration(token, task_type, name)
        if problems:
            _fail(EXIT_CONFIG, "; ".join(problems))
        inventory, engine = _inventory()
        try:
            registration = inventory.register(base, token or "", task_type, name)
        except AuditError as exc:
            _fail(EXIT_FAILED, str(exc))
        finally:
            engine.dispose()
        entry = registration.entry
        click.echo(f"{registration.state}: {entry.task_id} at {entry.base_url}")
        return
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(encoding="utf-8")
        records = read_records(text, fmt, base_url=base)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(EXIT_CONFIG, f"cannot read {source}: {exc}")
    except ValueError as exc:
        _fail(EXIT_CONFIG, f"{source}: nothing was imported:\n{exc}")
    _, engine = _inventory()
    try:
        report = import_records(records, engine=engine)
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        engine.dispose()
    click.echo(
        f"imported {report.total} task(s): {report.registered} registered, "
        f"{report.already_tracked} already tracked, {report.retired} retired earlier"
    )


@track_command.command("list")
@click.option("--base-url", help="Only this deployment.")
@click.option("--all", "include_retired", is_flag=True, help="Include retired entries.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def track_list(base_url: str | None, include_retired: bool, output: str) -> None:
    """Show the inventory (active entries, or all with --all)."""
    inventory, engine = _inventory()
    try:
        entries = inventory.entries(base_url, include_retired=include_retired)
    except (AuditError, ValueError) as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        engine.dispose()
    if output == "json":
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2, ensure_ascii=False))
        return
    for entry in entries:
        click.echo(_line(entry))
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


def _line(entry: TrackedTask) -> str:
    state = (
        f"retired {entry.retired_at:%Y-%m-%d}: {entry.retired_reason}"
        if (entry.retired_at)
        else f"last status {entry.last_status or '-'}"
    )
    return f"{entry.task_id}  {entry.name or '-'}  {entry.base_url}  {state}"


@track_command.command("prune")
@click.option(
    "--retired-before",
    required=True,
    help="Remove entries retired longer ago than this (e.g. 90d); each gets an audit row.",
)
def track_prune(retired_before: str) -> None:
    """Remove retired inventory entries for good (an audit row records each)."""
    try:
        cutoff = datetime.now(UTC) - parse_duration(retired_before)
    except ValueError as exc:
        _fail(EXIT_CONFIG, str(exc))
    inventory, engine = _inventory()
    try:
        pruned = inventory.prune(cutoff)
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        engine.dispose()
    click.echo(f"pruned {len(pruned)} retired entr{'y' if len(pruned) == 1 else 'ies'}")
