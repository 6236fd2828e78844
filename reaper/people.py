"""The commands through which people step in: pins (legal holds), held plans and approvals.

``reaper pin``, ``reaper pin list`` and ``reaper unpin`` (:mod:`reaper.pins`); ``reaper held
list``, ``reaper approve`` and ``reaper reject`` (:mod:`reaper.holds`). Each change is recorded
in the audit, chained, before it takes effect. They are registered on the main command group by
:mod:`reaper.cli`.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.table import Table

from reaper.audit import AuditStore
from reaper.converters import parse_duration, parse_timestamp
from reaper.errors import AuditError, PolicyError, ReaperError
from reaper.pins import Pin, PinStore, Scope
from reaper.policy import LoadedPolicy, load_policies
from reaper.targets import TARGETS

if TYPE_CHECKING:
    from reaper.cli import Context

__all__ = ["COMMANDS"]

EXIT_FAILED, EXIT_CONFIG = 1, 2


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"reaper: {message}", err=True)
    sys.exit(code)


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
    if target not in TARGETS:
        _fail(EXIT_CONFIG, f"no target kind {target!r}; known: {', '.join(sorted(TARGETS))}")
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
        _fail(EXIT_FAILED, str(exc))
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
        table.add_column(column)
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
        _fail(EXIT_FAILED, str(exc))
    finally:
        store.engine.dispose()
    click.echo(f"unpinned {task_id} for {pin.describe()} (pin {pin.id})")


def _store(ctx: Context) -> AuditStore:
    try:
        return ctx.store()
    except AuditError as exc:
        _fail(EXIT_FAILED, f"{exc}; nothing was changed")


#: Registered on ``reaper`` by reaper.cli.
COMMANDS = [pin_command, unpin_command]
