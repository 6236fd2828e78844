"""The ``reaper`` command line.

Exit codes: 0 when everything eligible was deleted (or nothing was eligible), 1 when a deletion
failed, a policy aborted or the audit database failed, 2 for configuration errors (nothing is
listed or deleted then).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import structlog
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine

from reaper import __version__
from reaper.audit import AuditStore, Mark
from reaper.budgets import EndpointBudgets, rate_conflicts
from reaper.clocks import ClockLimits
from reaper.converters import format_duration, parse_duration, parse_timestamp
from reaper.daemon import Daemon, DaemonConfig, JitteredTrigger
from reaper.db import current_revision, ensure_schema, head_revision, make_engine, upgrade
from reaper.errors import AuditError, ConfigError, PolicyError, ReaperError
from reaper.guards import GuardOverrides, check_guards
from reaper.holds import Approval, HeldStore, UnknownHeldRun
from reaper.holds import refusal as held_refusal
from reaper.leases import Leases
from reaper.logs import configure_logging, register_secret
from reaper.metrics import Metrics
from reaper.notices import NoticeStore
from reaper.notify import Notifier
from reaper.parallel import run_spread, same_tasks
from reaper.people import COMMANDS as people_commands
from reaper.pins import PinStore
from reaper.plan import Plan
from reaper.planfile import SavedPlan, diff_plan, load_saved, refusal, save_plans
from reaper.policy import LoadedPolicy, load_policies, policy_json_schema
from reaper.progress import BatchReporter, ProgressBars
from reaper.report import (
    audit_csv,
    audit_json,
    audit_table,
    diff_table,
    explain_entry,
    explain_text,
    plan_dict,
    plan_table,
    run_dict,
    runs_table,
)
from reaper.runner import (
    Mode,
    PolicyRun,
    build_target,
    plan_policy,
    reconcile_policy,
    run_policy,
    target_state,
)
from reaper.schedule import parse_cron
from reaper.settings import Settings, redact_url
from reaper.shards import Shard, parse_shard
from reaper.sinks import sink_problems
from reaper.targets import Outcome, installed_kinds
from reaper.track import track_command

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")

log = structlog.get_logger("reaper.cli")


class Context:
    """What every subcommand gets: settings and consoles."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Piped output is read by people too (CI logs, `| less`): do not squeeze it to 80 columns.
        self.out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
        self.err = Console(stderr=True, soft_wrap=True)

    def store(self, *, migrate: bool | None = None) -> AuditStore:
        """The audit store, its schema set up if the database is empty.

        An older schema is migrated only with ``--migrate`` or ``REAPER_DB_AUTO_UPGRADE``.
        """
        engine = make_engine(self.settings.database(), **_pool_size(self.settings))
        try:
            ensure_schema(
                engine, auto_upgrade=self.settings.db_auto_upgrade if migrate is None else migrate
            )
        except AuditError:
            engine.dispose()
            raise
        return AuditStore(engine)


def _pool_size(settings: Settings) -> dict[str, int]:
    """Room in the audit engine's pool for every policy that may run at once: on PostgreSQL a
    run holds a connection for its run lock and uses another for its audit (SQLAlchemy's
    default of 5 + 10 left runs waiting for it, then failing)."""
    parallel = settings.max_parallel_policies
    return {"pool_size": min(parallel, 16), "max_overflow": 2 * parallel + 5}


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"reaper: {message}", err=True)
    sys.exit(code)


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        # Never echo the input values: a database URL may carry a password.
        problems = "; ".join(
            f"REAPER_{'_'.join(str(p) for p in err['loc']).upper()}: "
            f"{str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        _fail(EXIT_CONFIG, f"invalid settings: {problems}")
    if settings.database_password is not None:
        register_secret(settings.database_password.get_secret_value())
    try:
        url = settings.database()
    except OSError as exc:
        _fail(EXIT_CONFIG, f"cannot read the database password file: {exc.strerror}")
    if url.password:
        register_secret(str(url.password))
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reaper")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    help="Log format on stderr (default: REAPER_LOG_FORMAT or auto).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Lowest level logged (default: REAPER_LOG_LEVEL or info).",
)
@click.pass_context
def cli(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """reaper: retention policies for task-management APIs, with an audit row per deletion.

    Settings come from REAPER_* environment variables or a .env file: REAPER_DATABASE_URL,
    REAPER_DATABASE_PASSWORD_FILE, REAPER_POLICIES, REAPER_LOG_FORMAT, REAPER_LOG_LEVEL,
    REAPER_DB_AUTO_UPGRADE, REAPER_NOTIFY_FILE.
    """
    settings = _settings({"log_format": log_format, "log_level": log_level})
    configure_logging(settings.log_format, settings.log_level)
    ctx.obj = Context(settings)


def _policies_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--policies",
        "policies_path",
        type=click.Path(path_type=Path),
        help="Policy file or directory (default: REAPER_POLICIES or ./policies).",
    )(fn)
    fn = click.option(
        "--policy",
        "names",
        multiple=True,
        metavar="NAME",
        help="Only this policy (repeatable; default: all). A template's name selects its "
        "instances; * and ? match any characters and one character (brackets are literal: "
        "'dcs-30d[cn-north-4/*').",
    )(fn)
    return fn


def _shard_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--shard",
        metavar="K/N|auto",
        help="Only the policies in shard K of N (K from 0 to N-1): those whose sha256(name) "
        "mod N is K. auto: K from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), N from "
        "REAPER_SHARD_COUNT.",
    )(fn)


def _parse_shard(ctx: Context, text: str | None) -> Shard | None:
    if text is None:
        return None
    try:
        return parse_shard(text, os.environ, ctx.settings.shard_count)
    except ConfigError as exc:
        _fail(EXIT_CONFIG, str(exc))


def _pattern(text: str) -> re.Pattern[str]:
    """``--policy`` patterns: ``*`` and ``?`` are wildcards, every other character is itself
    (fnmatch would read an instance's ``[key]`` as a character class)."""
    return re.compile(re.escape(text).replace(r"\*", ".*").replace(r"\?", "."), re.DOTALL)


def select_policies(
    loaded: Sequence[LoadedPolicy], names: Sequence[str]
) -> tuple[list[LoadedPolicy], list[str]]:
    """The policies ``--policy`` selects, in load order, and the arguments that matched none.

    An argument is a policy's name, a template's name (all its instances), or a pattern.
    """
    chosen: set[str] = set()
    unmatched: list[str] = []
    for name in names:
        pattern = _pattern(name)
        hits = {
            item.name
            for item in loaded
            if item.name == name or item.template == name or pattern.fullmatch(item.name)
        }
        if not hits:
            unmatched.append(name)
        chosen |= hits
    return [item for item in loaded if item.name in chosen], unmatched


def _known(loaded: Sequence[LoadedPolicy], limit: int = 20) -> str:
    """The selectable names, templates as ``name[*]``, for an error message."""
    names = sorted({f"{item.template}[*]" if item.template else item.name for item in loaded})
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _guard_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--confirm-anomaly",
        is_flag=True,
        help="Go ahead although far more tasks are eligible than in recent runs.",
    )(fn)
    fn = click.option(
        "--max-fraction",
        type=click.FloatRange(0, 1, min_open=True),
        help="Raise the max_fraction guard for this invocation (share of listed tasks).",
    )(fn)
    fn = click.option(
        "--max-deletions",
        type=click.IntRange(min=1),
        help="Raise the max_deletions guard for this invocation.",
    )(fn)
    return fn


def _load(
    ctx: Context, path: Path | None, names: Sequence[str], shard: Shard | None = None
) -> list[LoadedPolicy]:
    try:
        loaded = load_policies([path or ctx.settings.policies])
    except PolicyError as exc:
        _fail(EXIT_CONFIG, f"invalid policy configuration; nothing was run:\n{exc}")
    if names:
        selected, unknown = select_policies(loaded, names)
        if unknown:
            _fail(
                EXIT_CONFIG,
                f"no policy named {', '.join(map(repr, unknown))}; known: {_known(loaded)}",
            )
        loaded = selected
    if shard is not None:
        loaded = shard.select(loaded)
        log.info("shard_selected", shard=str(shard), policies=[item.name for item in loaded])
    # Secrets are read before anything runs: one missing credential stops the whole invocation
    # (exit 2) instead of failing halfway through the policies.
    missing = []
    for item in loaded:
        try:
            item.policy.target_class.client_auth(item.policy.target_config)
        except ConfigError as exc:
            missing.append(f"{item.path}: policy {item.name!r}: {exc}")
        missing.extend(f"{item.path}: {problem}" for problem in sink_problems(item))
    if missing:
        _fail(EXIT_CONFIG, "missing credentials; nothing was run:\n" + "\n".join(missing))
    return loaded


# --- validate / schema ------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--after",
    metavar="TIME",
    help="List fire times after this ISO-8601 time (naive means UTC) instead of now.",
)
@_shard_option
@click.pass_obj
def validate(
    ctx: Context, paths: tuple[Path, ...], output: str, after: str | None, shard: str | None
) -> None:
    """Check policy files without touching any target (default: REAPER_POLICIES).

    Prints each policy's next fire times: three in the table (in the policy's timezone and in
    UTC), five in JSON (UTC). A template is shown with its instances and their values. --shard
    shows only the policies that `reaper run --shard` would run.
    """
    selected = _parse_shard(ctx, shard)
    try:
        loaded = load_policies(list(paths) or [ctx.settings.policies])
    except PolicyError as exc:
        _fail(EXIT_CONFIG, f"invalid policy configuration:\n{exc}")
    if selected is not None:
        loaded = selected.select(loaded)
    try:
        start = datetime.now(UTC) if after is None else parse_timestamp(after)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--after") from None
    _warn_rate_conflicts(ctx, loaded)
    if output == "json":
        entries = []
        for item in loaded:
            entry: dict[str, Any] = {
                "name": item.name,
                "schedule": item.policy.schedule,
                "timezone": item.policy.timezone,
                "next_runs": [_utc_iso(fire) for fire in _next_runs(item, start, 5)],
            }
            if item.policy.schedule and item.policy.schedule_jitter:
                # `serve` starts each run this policy's fixed offset after its slot.
                entry["schedule_jitter"] = format_duration(item.policy.schedule_jitter)
                entry["starts"] = [
                    _utc_iso(_start_of(item, fire)) for fire in _next_runs(item, start, 5)
                ]
            if item.instance is not None:
                entry |= {"template": item.template, "values": item.instance.values()}
            entries.append(entry)
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    for group in _by_template(loaded):
        item = group[0]
        kind = item.policy.target_config.type
        if item.instance is None:
            ctx.out.print(
                f"ok  {item.name}  ({item.path}:{item.line}, {kind})", markup=False, highlight=False
            )
        else:
            ctx.out.print(
                f"ok  {item.template}  ({item.path}:{item.line}, {kind}): a template of "
                f"{len(group)} instance(s)",
                markup=False,
                highlight=False,
            )
            _print_instances(ctx, group)
        policy = item.policy
        if not policy.schedule:
            ctx.out.print(
                "    no schedule: runs only when `reaper run` is started", highlight=False
            )
            continue
        ctx.out.print(f"    schedule {policy.schedule!r} in {policy.timezone}:", highlight=False)
        for fire in _next_runs(item, start, 3):
            local = fire.astimezone(policy.zone)
            line = f"      {local:%a %Y-%m-%d %H:%M %Z}"
            if local.utcoffset():
                line += f"  ({fire:%Y-%m-%d %H:%M} UTC)"
            if policy.schedule_jitter:
                offset = _start_of(item, fire) - fire
                line += f"  starts +{format_duration(offset)} (schedule_jitter)"
            ctx.out.print(line, highlight=False)


def _by_template(loaded: Sequence[LoadedPolicy]) -> list[list[LoadedPolicy]]:
    """Policies one by one, a template's instances together (they load one after another)."""
    groups: list[list[LoadedPolicy]] = []
    for item in loaded:
        previous = groups[-1][0] if groups else None
        same = (
            previous is not None
            and item.template is not None
            and (previous.template, previous.path, previous.line)
            == (item.template, item.path, item.line)
        )
        if same:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _print_instances(ctx: Context, group: Sequence[LoadedPolicy]) -> None:
    """A template's instances, each with its values and where the values are written."""
    width = max(len(item.name) for item in group)
    for item in group:
        assert item.instance is not None
        values = "  ".join(f"{name}={value}" for name, value in item.instance.values().items())
        sources = ", ".join(sorted({b.source for b in item.instance.bindings.values()}))
        ctx.out.print(
            f"      {item.name:<{width}}  {values}  ({sources})", markup=False, highlight=False
        )


def _warn_rate_conflicts(ctx: Context, loaded: Sequence[LoadedPolicy]) -> None:
    """Warn (stderr) where policies sharing an endpoint's budget declare different rates."""
    for conflict in rate_conflicts(loaded, ctx.settings.endpoint_budgets):
        rates = ", ".join(f"{name} {rate}" for name, rate in conflict.rates.items())
        using = (
            f"REAPER_ENDPOINT_BUDGETS gives it {conflict.explicit}"
            if conflict.explicit is not None
            else f"they share the lowest, {conflict.lowest}"
        )
        click.echo(
            f"reaper: warning: policies reaching {conflict.origin} with one credential "
            f"({conflict.credential}) declare different rates ({rates}); {using}",
            err=True,
        )


def _next_runs(item: LoadedPolicy, start: datetime, count: int) -> list[datetime]:
    """A policy's next fire times after ``start`` (none without a schedule)."""
    if not item.policy.schedule:
        return []
    return parse_cron(item.policy.schedule, item.policy.zone).next_fire_times(start, count)


def _start_of(item: LoadedPolicy, slot: datetime) -> datetime:
    """When ``serve`` starts the run of ``slot``: later by the policy's jitter offset."""
    policy = item.policy
    if not policy.schedule or not policy.schedule_jitter:
        return slot
    schedule = parse_cron(policy.schedule, policy.zone)
    return JitteredTrigger(schedule, policy.schedule_jitter, item.name).fire_time(slot)


def _utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@cli.command()
@click.option(
    "--no-plugins",
    is_flag=True,
    help="Only the target kinds reaper ships (what reaper/schema/policy.schema.json holds).",
)
def schema(no_plugins: bool) -> None:
    """Print the JSON Schema of policy files: every installed target kind, plugins' included."""
    kinds = installed_kinds().builtin_only() if no_plugins else installed_kinds()
    click.echo(json.dumps(policy_json_schema(kinds), indent=2, ensure_ascii=False))


@cli.command()
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def targets(ctx: Context, output: str) -> None:
    """List the target kinds and the distribution each comes from (reaper's own, or a plugin's
    entry point in the group reaper.targets). Exits 2 if one cannot be used, saying why."""
    kinds = installed_kinds()
    entries = sorted([*kinds.kinds.values(), *kinds.refused], key=lambda k: (k.name, k.source))
    if output == "json":
        documents = [
            {
                "kind": kind.name,
                "distribution": kind.distribution,
                "version": kind.version,
                "entry_point": kind.source,
                "builtin": kind.builtin,
                "error": kind.error,
            }
            for kind in entries
        ]
        click.echo(json.dumps(documents, indent=2, ensure_ascii=False))
    else:
        header = ("KIND", "DISTRIBUTION", "ENTRY POINT")
        rows = [header] + [
            (kind.name, f"{kind.distribution} {kind.version}", kind.source) for kind in entries
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for kind, row in zip([None, *entries], rows, strict=True):
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            if kind is not None and kind.error is not None:
                line += f"  UNUSABLE: {kind.error}"
            ctx.out.print(line.rstrip(), highlight=False, markup=False)
    sys.exit(EXIT_CONFIG if kinds.problems() else EXIT_OK)


# --- plan / run -------------------------------------------------------------------------------


@cli.command()
@_policies_option
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--examples", type=int, default=5, show_default=True, help="Ids shown per reason.")
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the exact ids to delete, with reasons, for review and `reaper apply`.",
)
@click.option(
    "--diff",
    "diff_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Show what changed since a saved plan.",
)
@click.pass_obj
def plan(
    ctx: Context,
    names: tuple[str, ...],
    policies_path: Path | None,
    output: str,
    examples: int,
    save: Path | None,
    diff_path: Path | None,
) -> None:
    """Show what each policy would delete and what it keeps, with reasons. Deletes nothing.

    Pinned tasks are shown protected; with delete.notice, tasks due now apart from those noticed
    and waiting (pins and notices are read from the audit database, if it exists).
    """
    loaded = _load(ctx, policies_path, names)
    engine = _database_for_targets(ctx, loaded)
    saved = {s.policy: s for s in load_saved(diff_path)} if diff_path else {}
    recorded = _recorded(ctx)
    guard_notes: dict[str, list[str]] = {}
    try:
        results = asyncio.run(_plan_all(ctx, loaded, engine, recorded, guard_notes))
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was planned")
    finally:
        if engine is not None:
            engine.dispose()
        if recorded is not None:
            recorded.engine.dispose()
    failed = any(error for _, _, error, _ in results)
    if save is not None:
        if failed:
            _fail(EXIT_FAILED, "a listing failed: no plan was saved")
        save_plans(save, [p for _, p, _, _ in results if p is not None])
    if output == "json":
        documents = []
        for item, result, error, changes in results:
            document: dict[str, Any] = (
                # `is not None`: a plan with nothing eligible is falsy (its len is 0).
                {
                    **plan_dict(result, examples),
                    "warnings": guard_notes.get(item.name, []) + _clock_notes(result),
                }
                if result is not None
                else {"policy": item.name, "error": error}
            )
            if changes:
                document["state_changes"] = list(changes)
            if result is not None and item.name in saved:
                document["diff"] = diff_plan(saved[item.name], result).as_dict()
            documents.append(document)
        click.echo(json.dumps(documents, indent=2, ensure_ascii=False))
    else:
        for item, result, error, changes in results:
            if result is None:
                ctx.out.print(f"[bold]{escape(item.name)}[/bold]: [red]{escape(error or '')}[/red]")
                continue
            plan_table(result, ctx.out, examples)
            for change in changes:
                ctx.out.print(f"  a run would also {change}", highlight=False, markup=False)
            _print_warnings(
                ctx.out, item.name, guard_notes.get(item.name, []) + _clock_notes(result)
            )
            if item.name in saved:
                diff_table(diff_plan(saved[item.name], result), ctx.out, examples)
            elif diff_path is not None:
                ctx.out.print(f"  (the saved plan has no entry for {item.name})")
        if save is not None:
            ctx.out.print(f"plan saved to {save}; review it, then `reaper apply {save}`")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _database_for_targets(ctx: Context, loaded: Sequence[LoadedPolicy]) -> Engine | None:
    """The database, set up if empty, when a selected policy's target keeps its state there
    (``Target.keeps_state``: Aparavi's inventory); other plans never touch the database, so
    they work without one. Planning only reads it."""
    if not any(item.policy.target_class.keeps_state for item in loaded):
        return None
    try:
        return ctx.store().engine
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was listed")


def _recorded(ctx: Context) -> AuditStore | None:
    """The audit store, when the database already holds reaper's schema: a plan reads pins and
    notices from it. An absent or empty database holds neither, and planning does not create it.
    """
    url = ctx.settings.database()
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).expanduser().exists():
            return None
    engine = make_engine(url)
    try:
        empty = current_revision(engine) is None
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was planned (pins are read from it)")
    finally:
        engine.dispose()
    if empty:
        return None
    try:
        return ctx.store()
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was planned (pins are read from it)")


async def _plan_all(
    ctx: Context,
    loaded: Sequence[LoadedPolicy],
    engine: Engine | None,
    recorded: AuditStore | None = None,
    guard_notes: dict[str, list[str]] | None = None,
) -> list[tuple[LoadedPolicy, Plan | None, str | None, Sequence[str]]]:
    """Each policy's plan or why there is none, and what a run would write to its target's
    state besides deleting. Pins, notices and the guards' history come from ``recorded`` (an
    AuditError stops); ``guard_notes`` gets, by policy, the guard a run would trip."""
    results: list[tuple[LoadedPolicy, Plan | None, str | None, Sequence[str]]] = []
    for item in loaded:
        now = datetime.now(UTC)
        notice = item.policy.delete.notice
        pins: dict[str, str] = {}
        first_seen: dict[str, datetime] = {}
        if recorded is not None:
            pins = PinStore(recorded).active_for(item.name, item.policy.target_class.kind, now)
            if notice is not None:
                first_seen = NoticeStore(recorded).first_seen(item.name)
        state = target_state(item, engine) if engine is not None else None
        target, client = build_target(item, state=state)
        try:
            result = await plan_policy(
                item,
                target,
                now,
                ctx.settings.min_age,
                clock=ClockLimits.from_settings(ctx.settings),
                pins=pins,
            )
            if notice is not None:
                result = result.give_notice(first_seen, now, notice)
            results.append((item, result, None, target.state_changes()))
            if guard_notes is not None:
                guard_notes[item.name] = _guard_notes(item, result, recorded)
        except ReaperError as exc:
            results.append((item, None, f"listing failed, nothing would be deleted: {exc}", ()))
        finally:
            await client.aclose()
    return results


def _guard_notes(item: LoadedPolicy, plan: Plan, recorded: AuditStore | None) -> list[str]:
    """The mass-deletion guard a run would trip on this plan (the anomaly guard only when the
    audit database holds the policy's history), said before the run is refused."""
    policy = item.policy
    history = (
        recorded.recent_eligible(item.name, policy.delete.anomaly.history)
        if recorded is not None
        else []
    )
    trip = check_guards(policy, plan.eligible, plan.listed, history)
    if trip is None:
        return []
    what, _, remedy = trip.message.partition("; nothing was deleted ")
    remedy = remedy[:-1] + ", or approve the plan it holds)" if remedy.endswith(")") else ""
    note = f"`reaper run` would refuse this policy and hold its plan for approval: {what}"
    return [f"{note} {remedy}" if remedy else note]


def _clock_notes(plan: Plan) -> list[str]:
    """What ``reaper plan`` says about the clocks behind a plan (a run would refuse it)."""
    if plan.clock is None:
        return []
    notes = [warning.message for warning in plan.clock.warnings]
    if plan.clock.trip is not None:
        notes.insert(0, f"`reaper run` would refuse this policy: {plan.clock.trip.message}")
    return notes


def _clock_fields(run: PolicyRun) -> dict[str, Any]:
    """What a run's JSON says about the clocks its ages rested on (reaper.clocks)."""
    s = run.summary
    return {
        "future_timestamps": s.future_timestamps,
        "clock_skew_seconds": None
        if s.clock_skew_seconds is None
        else round(s.clock_skew_seconds, 1),
        "warnings": run.warnings,
    }


def _print_warnings(console: Console, policy: str, warnings: Sequence[str]) -> None:
    for warning in warnings:
        console.print(f"[bold yellow]{policy}: warning:[/bold yellow] {warning}", highlight=False)


@cli.command()
@click.argument(
    "plan_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--held",
    "held_run",
    metavar="RUN_ID",
    help="Carry out the approved plan a guard held in this run, instead of a plan file.",
)
@click.option(
    "--policies",
    "policies_path",
    type=click.Path(path_type=Path),
    help="Policy file or directory (default: REAPER_POLICIES or ./policies).",
)
@click.option(
    "--max-age",
    default="24h",
    show_default=True,
    help="Refuse a plan older than this (e.g. 24h, 2d).",
)
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--migrate", is_flag=True, default=None, help="Apply audit database migrations first."
)
@_guard_options
@click.pass_obj
def apply(
    ctx: Context,
    plan_file: Path | None,
    held_run: str | None,
    policies_path: Path | None,
    max_age: str,
    output: str,
    migrate: bool | None,
    max_deletions: int | None,
    max_fraction: float | None,
    confirm_anomaly: bool,
) -> None:
    """Delete exactly what a saved plan lists, and only what is still eligible now.

    Refuses a plan whose policy changed since it was saved, or that is older than --max-age.
    With --held RUN_ID, carries out the approval of a held plan (`reaper approve`) instead.
    """
    if (plan_file is None) == (held_run is None):
        raise click.UsageError("give a PLAN_FILE or --held RUN_ID (one of them)")
    if held_run is not None:
        _apply_held(ctx, held_run, policies_path, output, migrate)
    assert plan_file is not None
    try:
        limit = parse_duration(max_age)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-age") from None
    saved_plans = load_saved(plan_file)
    loaded = {item.name: item for item in _load(ctx, policies_path, ())}
    now = datetime.now(UTC)
    refusals = [
        reason
        for saved in saved_plans
        if (reason := refusal(saved, loaded.get(saved.policy), now, limit)) is not None
    ]
    if refusals:
        _fail(EXIT_FAILED, "refusing the saved plan; nothing was deleted:\n" + "\n".join(refusals))
    notifier = _notifier(ctx)
    try:
        store = ctx.store(migrate=migrate)
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was listed or deleted")
    notifier.store = store
    overrides = GuardOverrides(max_deletions, max_fraction, confirm_anomaly)
    runs = asyncio.run(
        _notified(
            ctx,
            notifier,
            _run_all(
                ctx,
                [loaded[saved.policy] for saved in saved_plans],
                store,
                Mode.APPLY,
                overrides,
                {saved.policy: saved for saved in saved_plans},
                notifier=notifier,
            ),
        )
    )
    store.engine.dispose()
    _report_runs(ctx, runs, output)


@cli.command()
@_policies_option
@click.option(
    "--dry-run", is_flag=True, help="Plan and record what would be deleted; delete nothing."
)
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--migrate", is_flag=True, default=None, help="Apply audit database migrations first."
)
@click.option(
    "--slot",
    type=click.Choice(["none", "auto"]),
    default="none",
    show_default=True,
    help="auto: claim the policy's current schedule slot in the run ledger first, so "
    "overlapping CronJob pods or replicas run each slot once (needs a schedule).",
)
@_shard_option
@_guard_options
@click.pass_obj
def run(
    ctx: Context,
    names: tuple[str, ...],
    policies_path: Path | None,
    dry_run: bool,
    output: str,
    migrate: bool | None,
    slot: str,
    shard: str | None,
    max_deletions: int | None,
    max_fraction: float | None,
    confirm_anomaly: bool,
) -> None:
    """Run the selected policies once and exit (the CronJob entry point).

    SIGTERM stops starting batches, lets in-flight ones finish, records the runs as interrupted
    and exits 0; a second signal exits at once.
    """
    selected = _parse_shard(ctx, shard)
    loaded = _load(ctx, policies_path, names, selected)
    if slot == "auto":
        unscheduled = [item.name for item in loaded if not item.policy.schedule]
        if unscheduled:
            _fail(EXIT_CONFIG, f"--slot auto needs a schedule; none in: {', '.join(unscheduled)}")
    metrics = Metrics()
    notifier = _notifier(ctx, metrics)
    try:
        store = ctx.store(migrate=migrate)
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was listed or deleted")
    notifier.store = store
    mode = Mode.DRY_RUN if dry_run else Mode.RUN
    overrides = GuardOverrides(max_deletions, max_fraction, confirm_anomaly)
    if ctx.settings.pushgateway_url or ctx.settings.metrics_file:
        _restore_metrics(metrics, store, loaded)
    runs = asyncio.run(
        _notified(
            ctx,
            notifier,
            _run_all(
                ctx,
                loaded,
                store,
                mode,
                overrides,
                slots=slot == "auto",
                metrics=metrics,
                notifier=notifier,
            ),
        )
    )
    _auto_prune(ctx, store)
    store.engine.dispose()
    _export_metrics(ctx, metrics, selected)
    _report_runs(ctx, runs, output)


def _apply_held(
    ctx: Context, run_id: str, policies_path: Path | None, output: str, migrate: bool | None
) -> NoReturn:
    """`reaper apply --held RUN_ID`: the approved plan held in RUN_ID, if its approval is valid
    and its policy unchanged; guards are lifted for exactly the approved ids (reaper.holds)."""
    loaded = {item.name: item for item in _load(ctx, policies_path, ())}
    notifier = _notifier(ctx)
    try:
        store = ctx.store(migrate=migrate)
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was listed or deleted")
    notifier.store = store
    holds = HeldStore(store)
    try:
        held = holds.get(run_id)
        why = held_refusal(held, loaded.get(held.policy), datetime.now(UTC))
        if why is not None:
            _fail(EXIT_FAILED, f"refusing the held plan; nothing was deleted: {why}")
        approval = holds.approval(held)
    except ReaperError as exc:
        store.engine.dispose()
        code = EXIT_CONFIG if isinstance(exc, UnknownHeldRun) else EXIT_FAILED
        _fail(code, f"{exc}; nothing was deleted")
    runs = asyncio.run(
        _notified(
            ctx,
            notifier,
            _run_all(
                ctx,
                [loaded[held.policy]],
                store,
                Mode.APPLY,
                GuardOverrides(),
                {held.policy: approval.saved_plan()},
                approvals={held.policy: approval},
                notifier=notifier,
            ),
        )
    )
    store.engine.dispose()
    _report_runs(ctx, runs, output)


def _notifier(ctx: Context, metrics: Metrics | None = None) -> Notifier:
    """The notifier of a run or apply: REAPER_NOTIFY_FILE's sinks (its deliveries are recorded
    once it is given the store); a bad file or a missing secret is a configuration error (exit
    2), found before anything is touched."""
    try:
        return Notifier.from_settings(
            ctx.settings.notify_file, None, metrics.registry if metrics is not None else None
        )
    except ConfigError as exc:
        _fail(EXIT_CONFIG, f"invalid notification settings; nothing was run:\n{exc}")


async def _notified(ctx: Context, notifier: Notifier, work: Awaitable[T]) -> T:
    """Do ``work``, then wait (up to REAPER_NOTIFY_WAIT) for notifications still in flight:
    a one-shot process must not exit from under them."""
    try:
        return await work
    finally:
        await notifier.drain(ctx.settings.notify_wait.total_seconds())


def _restore_metrics(metrics: Metrics, store: AuditStore, loaded: Sequence[LoadedPolicy]) -> None:
    """A push (or textfile) replaces the last one: carry over what the staleness alerts use,
    or a policy whose run fails would lose its last success and never alert."""
    try:
        metrics.restore_last_success(store.last_successes())
    except AuditError as exc:
        log.warning("last_success_unknown", error=str(exc))
    metrics.schedule_intervals(loaded)


def _export_metrics(ctx: Context, metrics: Metrics, shard: Shard | None = None) -> None:
    try:
        if ctx.settings.pushgateway_url:
            group = {"shard": str(shard.index)} if shard is not None else None
            metrics.push(ctx.settings.pushgateway_url, grouping_key=group)
        if ctx.settings.metrics_file:
            metrics.write(str(ctx.settings.metrics_file))
    except OSError as exc:
        log.error("metrics_export_failed", error=str(exc))


def _auto_prune(ctx: Context, store: AuditStore) -> None:
    retention = ctx.settings.audit_retention
    if retention is None:
        return
    try:
        runs, rows = store.prune(datetime.now(UTC) - retention)
    except AuditError as exc:
        log.error("audit_prune_failed", error=str(exc))
        return
    if runs:
        log.info("audit_pruned", runs=runs, rows=rows, retention=str(retention))


def _report_runs(ctx: Context, runs: Sequence[PolicyRun], output: str) -> NoReturn:
    if output == "json":
        documents = [{**run_dict(r), **_clock_fields(r)} for r in runs]
        click.echo(json.dumps(documents, indent=2, ensure_ascii=False))
    else:
        runs_table(runs, ctx.out)
        for r in runs:
            _print_warnings(ctx.out, r.policy, r.warnings)
    sys.exit(EXIT_OK if all(r.ok for r in runs) else EXIT_FAILED)


async def _run_all(
    ctx: Context,
    loaded: Sequence[LoadedPolicy],
    store: AuditStore,
    mode: Mode,
    overrides: GuardOverrides,
    approved: dict[str, SavedPlan] | None = None,
    *,
    slots: bool = False,
    metrics: Metrics | None = None,
    approvals: dict[str, Approval] | None = None,
    notifier: Notifier | None = None,
) -> list[PolicyRun]:
    """Run the policies concurrently (reaper.parallel), sharing their endpoints' budgets."""
    stop = asyncio.Event()
    _graceful_signals(stop)
    budgets = EndpointBudgets(ctx.settings.endpoint_budgets)
    budgets.register(loaded)
    endpoints = {name: key for key, names in budgets.keys().items() for name in names}
    bars = ProgressBars(ctx.err)

    async def one(item: LoadedPolicy) -> PolicyRun:
        slot = None
        if slots:
            assert item.policy.schedule is not None
            now = await asyncio.to_thread(store.db_now)
            slot = parse_cron(item.policy.schedule, item.policy.zone).previous_fire_time(now)
        reporter = BatchReporter(ctx.err, bars)
        try:
            result = await run_policy(
                item,
                store,
                mode=mode,
                on_batch=reporter.batch,
                on_plan=reporter.plan,
                overrides=overrides,
                min_age=ctx.settings.min_age,
                approved=(approved or {}).get(item.name),
                approval=(approvals or {}).get(item.name),
                notifier=notifier,
                slot=slot,
                stop=stop,
                clock=ClockLimits.from_settings(ctx.settings),
                budgets=budgets,
            )
        finally:
            reporter.close()
        if metrics is not None:
            metrics.observe(result, item.policy.target_config.type)
        return result

    try:
        return await run_spread(
            loaded,
            one,
            limit=ctx.settings.max_parallel_policies,
            group=lambda item: endpoints.get(item.name),
            exclusive=same_tasks,
            stop=stop,
        )
    finally:
        bars.close()


def _graceful_signals(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: stop starting batches; the second: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if stop.is_set():
            os._exit(1)
        log.warning("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


# --- audit ------------------------------------------------------------------------------------


#: Rows the audit table shows unless --limit says otherwise (json and csv return all).
TABLE_LIMIT = 100


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.now(UTC) - parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_timestamp(value)
    except ValueError:
        raise click.BadParameter(
            "use a duration such as '7d' or an ISO-8601 timestamp", param_hint="--since"
        ) from None


@cli.group(invoke_without_command=True)
@click.option("--policy", help="Only rows of this policy.")
@click.option("--task-id", help="Only rows about this task.")
@click.option("--run-id", help="Only rows of this run.")
@click.option(
    "--outcome",
    type=click.Choice([o.value for o in Outcome] + [m.value for m in Mark]),
    help="Only rows with this outcome.",
)
@click.option("--since", help="Only rows since a duration ago ('7d') or an ISO-8601 time.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    help=f"At most this many rows (default: all for json and csv, {TABLE_LIMIT} for the table).",
)
@click.option(
    "--output", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)
@click.pass_context
def audit(
    click_ctx: click.Context,
    policy: str | None,
    task_id: str | None,
    run_id: str | None,
    outcome: str | None,
    since: str | None,
    limit: int | None,
    output: str,
) -> None:
    """Query the audit log (newest first); json and csv return every matching row unless --limit."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx: Context = click_ctx.obj
    filters: dict[str, Any] = {
        "policy": policy,
        "task_id": task_id,
        "run_id": run_id,
        "outcome": outcome,
        "since": _since(since),
    }
    try:
        store = ctx.store()
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    try:
        if output == "table":
            shown = TABLE_LIMIT if limit is None else limit
            rows = store.rows(**filters, limit=shown)
            matching = store.count_rows(**filters) if len(rows) == shown else len(rows)
        else:
            # A database error mid-stream leaves the output cut short, and exits 1.
            writer = audit_json if output == "json" else audit_csv
            _to_stdout(lambda out: writer(store.stream_rows(**filters, limit=limit), out))
            return
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        store.engine.dispose()
    audit_table(rows, ctx.out)
    if matching > len(rows):
        click.echo(
            f"reaper: showing the newest {len(rows)} of {matching} matching rows; "
            f"{matching - len(rows)} left out (--limit N, or --output json|csv for all)",
            err=True,
        )


def _to_stdout(write: Callable[[Any], None]) -> None:
    """Stream to stdout; a reader that stops early (``| head``) ends the command quietly."""
    try:
        write(sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)


@audit.command("verify")
@click.pass_obj
def audit_verify(ctx: Context) -> None:
    """Check the hash chain of every run: edited or deleted rows are reported (exit 1)."""
    try:
        store = ctx.store()
        problems = store.verify()
        runs = len(store.runs(limit=1_000_000_000))
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    if not problems:
        click.echo(f"audit chains verified: {runs} run(s), no edited or missing rows")
        return
    for problem in problems:
        click.echo(f"run {problem.run_id}: {problem.message}")
    sys.exit(EXIT_FAILED)


@audit.command("prune")
@click.option(
    "--older-than",
    help="Delete runs finished longer ago than this (default: REAPER_AUDIT_RETENTION).",
)
@click.pass_obj
def audit_prune(ctx: Context, older_than: str | None) -> None:
    """Delete old runs with their audit rows, recording that it did so."""
    retention = _retention(ctx, older_than)
    if retention is None:
        _fail(EXIT_CONFIG, "give --older-than or set REAPER_AUDIT_RETENTION")
    try:
        runs, rows = ctx.store().prune(datetime.now(UTC) - retention)
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    click.echo(f"pruned {runs} run(s) and {rows} audit row(s) older than {older_than or retention}")


def _retention(ctx: Context, older_than: str | None) -> timedelta | None:
    if older_than is None:
        return ctx.settings.audit_retention
    try:
        return parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None


# --- reconcile / explain ------------------------------------------------------------------------


@cli.command()
@_policies_option
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def reconcile(
    ctx: Context, names: tuple[str, ...], policies_path: Path | None, output: str
) -> None:
    """Resolve pending/unknown audit rows of interrupted runs against the targets."""
    loaded = _load(ctx, policies_path, names)
    try:
        store = ctx.store()
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))

    async def all_policies() -> list[dict[str, Any]]:
        reports: list[dict[str, Any]] = []
        for item in loaded:
            try:
                report = await reconcile_policy(item, store)
            except ReaperError as exc:
                reports.append({"policy": item.name, "error": str(exc)})
                continue
            reports.append(
                {
                    "policy": item.name,
                    "deleted": report.deleted,
                    "not_deleted": report.not_deleted,
                    "runs": len(report.runs),
                    "interrupted_runs": report.interrupted_runs,
                }
            )
        return reports

    reports = asyncio.run(all_policies())
    store.engine.dispose()
    if output == "json":
        click.echo(json.dumps(reports, indent=2))
    else:
        for entry in reports:
            if "error" in entry:
                ctx.out.print(f"{escape(entry['policy'])}: [red]{escape(entry['error'])}[/red]")
            else:
                ctx.out.print(
                    f"{escape(entry['policy'])}: {entry['deleted']} confirmed deleted, "
                    f"{entry['not_deleted']} not deleted, in {entry['runs']} run(s); "
                    f"{entry['interrupted_runs']} run(s) marked interrupted"
                )
    sys.exit(EXIT_FAILED if any("error" in entry for entry in reports) else EXIT_OK)


@cli.command()
@click.argument("task_id")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--show-policy", is_flag=True, help="Print the exact policy text each run used.")
@click.pass_obj
def explain(ctx: Context, task_id: str, output: str, show_policy: bool) -> None:
    """Explain from the audit log what reaper did to a task, when, why and by which policy:
    who pinned or approved it, and its record as the target listed it."""
    try:
        store = ctx.store()
        rows = list(reversed(store.rows(task_id=task_id, limit=None)))
        runs = {row.run_id: store.run(row.run_id) for row in rows}
        approvals = HeldStore(store).approvals([r.approval_id for r in rows if r.approval_id])
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    entries = [
        explain_entry(row, runs[row.run_id], approvals.get(row.approval_id or "")) for row in rows
    ]
    if output == "json":
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    if not entries:
        click.echo(
            f"no audit row mentions {task_id!r}: reaper never acted on it (tasks that are kept "
            "are not recorded; `reaper plan` shows what the policies decide now)"
        )
        return
    for entry in entries:
        explain_text(entry, ctx.out, show_policy)


@cli.command()
@click.option(
    "--policies",
    "policies_path",
    type=click.Path(path_type=Path),
    help="Policy file or directory (default: REAPER_POLICIES or ./policies).",
)
@click.option(
    "--metrics-host",
    help="Address of /metrics, /healthz, /readyz (default: REAPER_METRICS_HOST or 127.0.0.1).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Their port (default: REAPER_METRICS_PORT or 9464; 0 picks a free one).",
)
@click.option(
    "--migrate", is_flag=True, default=None, help="Apply audit database migrations first."
)
@click.pass_obj
def serve(
    ctx: Context,
    policies_path: Path | None,
    metrics_host: str | None,
    metrics_port: int | None,
    migrate: bool | None,
) -> None:
    """Run the scheduler: each policy on its cron schedule, until SIGTERM (the systemd service).

    SIGHUP reloads the policy files (kept as they were if any is invalid). Replicas on one
    PostgreSQL share the policies through leases (REAPER_LEASE_TTL).
    """
    settings = ctx.settings
    path = policies_path or settings.policies
    _load(ctx, path, ())  # validate (and check credentials) before taking any port
    notifier = _notifier(ctx)
    try:
        store = ctx.store(migrate=migrate)
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    notifier.store = store
    config = DaemonConfig(
        policies=path,
        metrics_host=metrics_host or settings.metrics_host,
        metrics_port=settings.metrics_port if metrics_port is None else metrics_port,
        grace=settings.shutdown_grace,
        misfire_grace=settings.misfire_grace,
        min_age=settings.min_age,
        clock=ClockLimits.from_settings(settings),
        max_parallel=settings.max_parallel_policies,
        endpoint_budgets=settings.endpoint_budgets,
    )

    # Replicas on one PostgreSQL share the policies; on SQLite (one host) one process runs all.
    leases = None
    if store.engine.dialect.name == "postgresql":
        leases = Leases(store.engine, settings.lease_ttl)

    async def main() -> int:
        return await Daemon(config, store, leases=leases, notifier=notifier).serve()

    try:
        code = asyncio.run(main())
    except OSError as exc:
        _fail(
            EXIT_FAILED,
            f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc.strerror}",
        )
    store.engine.dispose()
    sys.exit(code)


# --- db ---------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Manage the audit database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(ctx: Context) -> None:
    """Apply pending migrations (idempotent)."""
    url = ctx.settings.database()
    try:
        before, after = upgrade(make_engine(url))
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    state = "already at" if before == after else f"upgraded from {before or 'empty'} to"
    click.echo(f"{redact_url(url)}: {state} revision {after}")


@db.command("current")
@click.pass_obj
def db_current(ctx: Context) -> None:
    """Show the schema revision of the audit database."""
    url = ctx.settings.database()
    try:
        current = current_revision(make_engine(url))
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    click.echo(f"{redact_url(url)}: revision {current or 'none'} (head {head_revision()})")


cli.add_command(track_command)
for _command in people_commands:
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``reaper`` console script."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="reaper")
    except ConfigError as exc:
        _fail(EXIT_CONFIG, str(exc))
    except ReaperError as exc:
        _fail(EXIT_FAILED, str(exc))
