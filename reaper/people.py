"""The commands through which people step in: pins (legal holds), held plans and approvals.

``reaper pin``, ``reaper pin list`` and ``reaper unpin`` (:mod:`reaper.pins`); ``reaper held
list``, ``reaper held show``, ``reaper approve`` and ``reaper reject`` (:mod:`reaper.holds`;
``reaper apply --held`` is with ``apply`` in :mod:`reaper.cli`). Each change is recorded
in the audit, chained, before it takes effect. They are registered on the main command group by
:mod:`reaper.cli`.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.table import Table

from reaper.audit import AuditStore
from reaper.converters import parse_duration, parse_timestamp
from reaper.errors import AuditError, PolicyError, ReaperError
from reaper.holds import HeldPlan, HeldStore, UnknownHeldRun
from reaper.pins import Pin, PinStore, Scope
from reaper.policy import LoadedPolicy, load_policies
from reaper.targets import installed_kinds

if TYPE_CHECKING:
    from reaper.cli import Context

__all__ = ["COMMANDS"]

EXIT_FAILED, EXIT_CONFIG = 1, 2


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"reaper: {message}", err=True)
    sys.exit(code)


def _exit_code(exc: ReaperError) -> int:
    """A RUN_ID no plan is held for is a usage error (2); anything else failed (1)."""
    return EXIT_CONFIG if isinstance(exc, UnknownHeldRun) else EXIT_FAILED


def _who(by: str | None) -> str:
    """``--by``, else the operating system's user name."""
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid may have no name
        return f"uid {os.getuid()}"


def _policy(ctx: Context, path: Path | None, name: str) -> LoadedPolicy:
    try:
        loaded = load_policies([path or ctx.settings.policies])
    except PolicyError as exc:
        _fail(EXIT_CONFIG, f"invalid policy configuration; nothing was changed:\n{exc}")
    for item in loaded:
        if item.name == name:
            return item
    known = ", ".join(sorted(item.name for item in loaded))
    _fail(EXIT_CONFIG, f"no policy named {name!r}; known: {known}")


def _moment(value: str, option: str) -> datetime:
    """A time given as ISO-8601 (naive means UTC) or as a duration from now (``90d``)."""
    try:
        return datetime.now(UTC) + parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_timestamp(value)
    except ValueError:
        raise click.BadParameter(
            "use an ISO-8601 time or a duration from now such as '90d'", param_hint=option
        ) from None


def _scope(
    ctx: Context, policy: str | None, target: str | None, path: Path | None
) -> tuple[Scope, str, tuple[str, str, str]]:
    """The scope a pin command names, with the policy hash, target kind and target to record."""
    if (policy is None) == (target is None):
        raise click.UsageError("give exactly one of --policy NAME or --target KIND")
    if policy is not None:
        loaded = _policy(ctx, path, policy)
        config = loaded.policy.target_config
        return "policy", policy, (loaded.digest, config.type, config.describe())
    assert target is not None
    kinds = installed_kinds().targets
    if target not in kinds:
        _fail(EXIT_CONFIG, f"no target kind {target!r}; known: {', '.join(sorted(kinds))}")
    return "target", target, ("0" * 64, target, target)


class _DefaultGroup(click.Group):
    """A group whose arguments go to its ``default`` command unless they start with the name of
    another (``reaper pin TASK_ID ...`` is ``reaper pin add TASK_ID ...``)."""

    def __init__(self, *args: Any, default: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def _scope_options(fn: Any) -> Any:
    fn = click.option(
        "--policies",
        "policies_path",
        type=click.Path(path_type=Path),
        help="Policy file or directory, to check --policy (default: REAPER_POLICIES).",
    )(fn)
    fn = click.option("--target", metavar="KIND", help="Every policy on this kind of target.")(fn)
    fn = click.option("--policy", metavar="NAME", help="The policy the pin holds for.")(fn)
    return fn


# --- pins -------------------------------------------------------------------------------------


@click.group("pin", cls=_DefaultGroup, default="add", no_args_is_help=True)
def pin_command() -> None:
    """Pin a task (a legal hold): no policy, plan or approval deletes it until it is unpinned.

    \b
    reaper pin TASK_ID --policy NAME|--target KIND [--reason TEXT] [--until TIME] [--by NAME]
    reaper pin list [--policy NAME] [--all] [--output table|json]
    """


@pin_command.command("add")
@click.argument("task_id")
@_scope_options
@click.option("--reason", default="no reason given", help="Why (shown in every plan).")
@click.option("--until", help="Lift the pin at this ISO-8601 time, or after a duration ('90d').")
@click.option("--by", help="Who pins it (default: the operating system user).")
@click.pass_obj
def pin_add(
    ctx: Context,
    task_id: str,
    policy: str | None,
    target: str | None,
    policies_path: Path | None,
    reason: str,
    until: str | None,
    by: str | None,
) -> None:
    """Pin TASK_ID for a policy, or for every policy on a kind of target."""
    scope, name, where = _scope(ctx, policy, target, policies_path)
    now = datetime.now(UTC)
    ends = _moment(until, "--until") if until is not None else None
    if ends is not None and ends <= now:
        raise click.BadParameter("the pin would already have ended", param_hint="--until")
    store = _store(ctx)
    try:
        pin = PinStore(store).pin(
            task_id,
            scope,
            name,
            reason=reason,
            by=_who(by),
            now=now,
            until=ends,
            policy_hash=where[0],
            target_kind=where[1],
            target=where[2],
        )
    except ReaperError as exc:
        _fail(_exit_code(exc), str(exc))
    finally:
        store.engine.dispose()
    click.echo(f"pinned {task_id} for {pin.describe()} (pin {pin.id}): {pin.reason}")


@pin_command.command("list")
@click.option("--policy", metavar="NAME", help="Only pins holding for this policy by name.")
@click.option("--task-id", help="Only pins of this task.")
@click.option("--all", "include_inactive", is_flag=True, help="Include lifted and ended pins.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def pin_list(
    ctx: Context, policy: str | None, task_id: str | None, include_inactive: bool, output: str
) -> None:
    """Show the pins in force (with --all, every pin ever taken)."""
    store = _store(ctx)
    try:
        pins = PinStore(store).pins(
            now=datetime.now(UTC),
            task_id=task_id,
            scope="policy" if policy is not None else None,
            name=policy,
            include_inactive=include_inactive,
        )
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        store.engine.dispose()
    if output == "json":
        click.echo(json.dumps([pin.as_dict() for pin in pins], indent=2, ensure_ascii=False))
        return
    _pins_table(ctx, pins)


def _pins_table(ctx: Context, pins: Sequence[Pin]) -> None:
    table = Table()
    for column in ("pin", "task_id", "holds for", "reason", "by", "since", "until", "lifted"):
        # The task id whole: `reaper unpin TASK_ID` needs it.
        table.add_column(column, no_wrap=column == "task_id")
    for pin in pins:
        lifted = ""
        if pin.unpinned_at is not None:
            lifted = f"{pin.unpinned_at.isoformat()} by {pin.unpinned_by}"
        table.add_row(
            str(pin.id),
            pin.task_id,
            pin.describe(),
            pin.reason,
            pin.pinned_by,
            pin.pinned_at.isoformat(),
            pin.until.isoformat() if pin.until is not None else "",
            lifted,
        )
    ctx.out.print(table)


@click.command("unpin")
@click.argument("task_id")
@_scope_options
@click.option("--comment", help="Why the hold is lifted (recorded in the audit).")
@click.option("--by", help="Who lifts it (default: the operating system user).")
@click.pass_obj
def unpin_command(
    ctx: Context,
    task_id: str,
    policy: str | None,
    target: str | None,
    policies_path: Path | None,
    comment: str | None,
    by: str | None,
) -> None:
    """Lift the pin of TASK_ID for a policy (or a kind of target)."""
    scope, name, where = _scope(ctx, policy, target, policies_path)
    store = _store(ctx)
    try:
        pin = PinStore(store).unpin(
            task_id,
            scope,
            name,
            by=_who(by),
            now=datetime.now(UTC),
            comment=comment,
            policy_hash=where[0],
            target_kind=where[1],
            target=where[2],
        )
    except ReaperError as exc:
        _fail(_exit_code(exc), str(exc))
    finally:
        store.engine.dispose()
    click.echo(f"unpinned {task_id} for {pin.describe()} (pin {pin.id})")


# --- held plans and approvals ------------------------------------------------------------------


@click.group("held")
def held_command() -> None:
    """Plans a mass-deletion guard refused, held for a person to approve or reject."""


@held_command.command("list")
@click.option("--policy", metavar="NAME", help="Only this policy's held plans.")
@click.option("--all", "include_closed", is_flag=True, help="Include applied and rejected ones.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def held_list(ctx: Context, policy: str | None, include_closed: bool, output: str) -> None:
    """Show held plans awaiting a decision (or approved and not yet carried out), newest first."""
    store = _store(ctx)
    try:
        plans = HeldStore(store).held(include_closed=include_closed, policy=policy)
    except AuditError as exc:
        _fail(EXIT_FAILED, str(exc))
    finally:
        store.engine.dispose()
    if output == "json":
        click.echo(json.dumps([p.as_dict() for p in plans], indent=2, ensure_ascii=False))
        return
    _held_table(ctx, plans)


def _held_table(ctx: Context, plans: Sequence[HeldPlan]) -> None:
    table = Table()
    for column in ("run_id", "policy", "eligible", "guard", "held at", "status", "decision"):
        if column == "run_id":
            # Whole, however narrow the terminal: `reaper approve RUN_ID` needs all of it.
            table.add_column(column, no_wrap=True, min_width=36)
        else:
            table.add_column(column, justify="right" if column == "eligible" else "left")
    now = datetime.now(UTC)
    for held in plans:
        decision = ""
        if held.approved_by is not None and held.valid_until is not None:
            decision = f"approved by {held.approved_by}, until {held.valid_until.isoformat()}"
        if held.closed_by is not None:
            decision = f"{held.status} by {held.closed_by}"
        table.add_row(
            held.run_id,
            held.policy,
            str(held.eligible),
            held.guard,
            held.held_at.isoformat(),
            # Still listed: it may be approved again, or a newer hold supersedes it.
            "approved (expired)" if held.expired(now) else held.status,
            decision,
        )
    ctx.out.print(table)


@held_command.command("show")
@click.argument("run_id")
@click.option("--examples", type=int, default=10, show_default=True, help="Ids shown per reason.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def held_show(ctx: Context, run_id: str, examples: int, output: str) -> None:
    """Show what a held plan would delete: the guard's words, counts per reason, and ids (json:
    every id)."""
    store = _store(ctx)
    try:
        holds = HeldStore(store)
        held = holds.get(run_id)
        items = holds.items(run_id)
    except ReaperError as exc:
        _fail(_exit_code(exc), str(exc))
    finally:
        store.engine.dispose()
    if output == "json":
        document = held.as_dict() | {"items": items}
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    ctx.out.print(
        f"[bold]{held.policy}[/bold] run {held.run_id} ({held.status}), held "
        f"{held.held_at.isoformat()}: {held.eligible} of {held.listed} listed tasks eligible",
        highlight=False,
    )
    ctx.out.print(f"  {held.message}", highlight=False)
    by_reason: dict[str, list[str]] = {}
    for item in items:
        by_reason.setdefault(item["reason"], []).append(item["task_id"])
    counts = Counter({reason: len(ids) for reason, ids in by_reason.items()})
    for reason, count in counts.most_common():
        shown = ", ".join(by_reason[reason][:examples])
        ctx.out.print(f"  {count:>8}  {reason}: {shown}", highlight=False)


def _valid_for(value: str) -> timedelta:
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--valid-for") from None
    if not timedelta(minutes=1) <= duration <= timedelta(days=30):
        raise click.BadParameter("between 1m and 30d", param_hint="--valid-for")
    return duration


@click.command("approve")
@click.argument("run_id")
@click.option("--by", required=True, help="Who approves (recorded in the audit).")
@click.option("--comment", help="Why (recorded in the audit).")
@click.option(
    "--valid-for",
    default="24h",
    show_default=True,
    help="How long the next run (or `reaper apply --held`) may carry the approval out.",
)
@click.pass_obj
def approve_command(
    ctx: Context, run_id: str, by: str, comment: str | None, valid_for: str
) -> None:
    """Approve the plan a guard held in run RUN_ID: while valid, the policy's next run deletes
    exactly its ids that are still eligible, the guards lifted for them."""
    duration = _valid_for(valid_for)
    store = _store(ctx)
    try:
        approval = HeldStore(store).approve(
            run_id, by=by, now=datetime.now(UTC), valid_for=duration, comment=comment
        )
    except ReaperError as exc:
        _fail(_exit_code(exc), str(exc))
    finally:
        store.engine.dispose()
    click.echo(
        f"approved {len(approval.items)} id(s) held by run {run_id} (approval {approval.id}), "
        f"valid until {approval.valid_until.isoformat()}: the next run of {approval.policy}, "
        f"or `reaper apply --held {run_id}`, deletes those still eligible"
    )


@click.command("reject")
@click.argument("run_id")
@click.option("--by", help="Who rejects it (default: the operating system user).")
@click.option("--comment", help="Why (recorded in the audit).")
@click.pass_obj
def reject_command(ctx: Context, run_id: str, by: str | None, comment: str | None) -> None:
    """Drop the plan held in run RUN_ID (held or approved, not yet carried out)."""
    store = _store(ctx)
    try:
        held = HeldStore(store).reject(run_id, by=_who(by), now=datetime.now(UTC), comment=comment)
    except ReaperError as exc:
        _fail(_exit_code(exc), str(exc))
    finally:
        store.engine.dispose()
    click.echo(f"rejected the plan held by run {held.run_id} ({held.policy}); nothing is deleted")


def _store(ctx: Context) -> AuditStore:
    try:
        return ctx.store()
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was changed")


#: Registered on ``reaper`` by reaper.cli.
COMMANDS = [pin_command, unpin_command, held_command, approve_command, reject_command]
