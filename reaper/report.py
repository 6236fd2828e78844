"""Rendering plans, run summaries and audit rows for people (tables) and programs (JSON, CSV)."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reaper.audit import AuditRow
from reaper.converters import format_duration
from reaper.holds import HeldPlan
from reaper.plan import Notice, Plan, Verdict
from reaper.planfile import PlanDiff
from reaper.runner import PolicyRun

__all__ = [
    "audit_csv",
    "audit_json",
    "audit_table",
    "diff_table",
    "explain_entry",
    "explain_text",
    "format_bytes",
    "notice_dict",
    "plan_dict",
    "plan_table",
    "run_dict",
    "runs_table",
]

_VERDICT_ORDER = list(Verdict)


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def plan_dict(plan: Plan, examples: int = 10) -> dict[str, Any]:
    """A plan as a JSON-ready dict: counts per reason, examples, oldest and newest eligible."""
    reasons = []
    for (verdict, reason), count in sorted(
        plan.counts.items(), key=lambda item: (_VERDICT_ORDER.index(item[0][0]), -item[1])
    ):
        reasons.append(
            {
                "verdict": verdict.value,
                "reason": reason,
                "count": count,
                "examples": [
                    {"task_id": e.task_id, "status": e.status, "timestamp": _iso(e.timestamp)}
                    for e in plan.examples.get((verdict, reason), [])[:examples]
                ],
            }
        )
    oldest, newest = plan.oldest(), plan.newest()
    return {
        "policy": plan.policy.name,
        "policy_hash": plan.policy.digest,
        "created_at": _iso(plan.created_at),
        "cutoff": _iso(plan.cutoff),
        "listed": plan.listed,
        "to_delete": plan.eligible,
        "oldest_to_delete": (
            {"task_id": oldest.task_id, "timestamp": _iso(oldest.timestamp)} if oldest else None
        ),
        "newest_to_delete": (
            {"task_id": newest.task_id, "timestamp": _iso(newest.timestamp)} if newest else None
        ),
        "reasons": reasons,
        "notice": notice_dict(plan.notice, examples) if plan.notice is not None else None,
    }


def notice_dict(notice: Notice, examples: int = 10) -> dict[str, Any]:
    """How a plan stands with ``delete.notice``: due now, noticed and waiting, noticed now."""
    waiting = sorted(notice.waiting.items(), key=lambda item: (item[1], item[0]))
    return {
        "notice": format_duration(notice.notice),
        "due_now": notice.due,
        "waiting": len(notice.waiting),
        "noticed_now": len(notice.new),
        "noticed_now_due_at": _iso(notice.new_due) if notice.new else None,
        "next_due": _iso(notice.next_due),
        "waiting_examples": [
            {"task_id": task_id, "due_at": _iso(due)} for task_id, due in waiting[:examples]
        ],
        "noticed_now_examples": notice.new[:examples],
    }


def plan_table(plan: Plan, console: Console, examples: int = 5) -> None:
    """Print a plan for review."""
    data = plan_dict(plan, examples)
    console.print(
        f"[bold]{escape(plan.policy.name)}[/bold]: listed {plan.listed}, "
        f"[bold red]delete {plan.eligible}[/bold red], cutoff {data['cutoff']}"
    )
    notice = data["notice"]
    if notice is not None:
        line = (
            f"  notice {notice['notice']}: [bold]{notice['due_now']} due now[/bold], "
            f"{notice['waiting']} noticed and waiting"
        )
        if notice["waiting"]:
            line += f" (next due {notice['waiting_examples'][0]['due_at']})"
        if notice["noticed_now"]:
            line += (
                f", {notice['noticed_now']} newly eligible: noticed by the next run, due "
                f"{notice['noticed_now_due_at']} at the earliest"
            )
        console.print(line)
    if data["oldest_to_delete"]:
        console.print(
            f"  oldest to delete {data['oldest_to_delete']['task_id']} "
            f"({data['oldest_to_delete']['timestamp']}), newest to delete "
            f"{data['newest_to_delete']['task_id']} ({data['newest_to_delete']['timestamp']})"
        )
    table = Table(show_lines=False)
    table.add_column("decision")
    table.add_column("reason")
    table.add_column("tasks", justify="right")
    table.add_column("examples")
    for entry in data["reasons"]:
        table.add_row(
            entry["verdict"],
            entry["reason"],
            str(entry["count"]),
            ", ".join(e["task_id"] for e in entry["examples"]),
        )
    console.print(table)


def diff_table(diff: PlanDiff, console: Console, examples: int = 5) -> None:
    """Print how a fresh plan differs from a saved one."""
    console.print(
        f"  since the saved plan: [green]+{len(diff.added)}[/green] newly eligible, "
        f"[yellow]-{len(diff.removed)}[/yellow] no longer eligible, {diff.unchanged} unchanged"
    )
    if diff.added:
        console.print("    added: " + ", ".join(diff.added[:examples]))
    if diff.removed:
        console.print("    removed: " + ", ".join(diff.removed[:examples]))


def run_dict(run: PolicyRun) -> dict[str, Any]:
    s = run.summary
    return {
        "policy": run.policy,
        "run_id": run.run_id,
        "mode": run.mode.value,
        "status": run.status.value,
        "listed": s.listed,
        "eligible": s.eligible,
        "kept": s.kept,
        "deleted": s.deleted,
        "already_gone": s.already_gone,
        "failed": s.failed,
        "unknown": s.unknown,
        "refused_ids": s.skipped,
        "dry_run": s.dry_run,
        "reclaimed_bytes": s.reclaimed_bytes,
        "error": run.error,
        "not_eligible": run.not_eligible,
        "approval_id": run.approval_id,
        "held": run.held,
        "notice": (
            notice_dict(run.plan.notice)
            if run.plan is not None and run.plan.notice is not None
            else None
        ),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
    }


def runs_table(runs: Sequence[PolicyRun], console: Console) -> None:
    table = Table(title="reaper run summary")
    for name in (
        "policy",
        "status",
        "listed",
        "deleted",
        "gone",
        "failed",
        "unknown",
        "refused ids",
        "kept",
        "reclaimed",
    ):
        table.add_column(name, justify="left" if name in ("policy", "status") else "right")
    for run in runs:
        s = run.summary
        # `apply` deletes as `run` does; only a dry run deletes nothing.
        deleted = f"{s.dry_run} (dry run)" if run.mode.value == "dry_run" else str(s.deleted)
        table.add_row(
            escape(run.policy),  # template instances' names hold brackets, as markup does
            run.status.value,
            str(s.listed),
            deleted,
            str(s.already_gone),
            str(s.failed),
            str(s.unknown),
            str(s.skipped),
            str(s.kept),
            format_bytes(s.reclaimed_bytes),
        )
    console.print(table)
    for run in runs:
        if run.error:
            console.print(f"[red]{escape(run.policy)}[/red]: {escape(run.error)}")


_AUDIT_COLUMNS = (
    "recorded_at",
    "policy",
    "task_id",
    "outcome",
    "task_status",
    "reason",
    "http_status",
    "error_message",
    "run_id",
)


def audit_table(rows: Sequence[AuditRow], console: Console) -> None:
    table = Table()
    for name in _AUDIT_COLUMNS:
        table.add_column(name)
    for row in rows:
        values = row.as_dict()
        table.add_row(
            *("" if values[c] is None else escape(str(values[c])) for c in _AUDIT_COLUMNS)
        )
    console.print(table)


def explain_entry(
    row: AuditRow, run: dict[str, Any] | None, approval: HeldPlan | None = None
) -> dict[str, Any]:
    """One audit row about a task, with the run and policy version behind it, the approval it
    carried out (who approved, when, why) and the task's record as listed."""
    run = run or {}
    approved: dict[str, Any] | None = None
    if row.approval_id is not None:
        approved = {"approval_id": row.approval_id}
        if approval is not None:
            approved |= {
                "held_run": approval.run_id,
                "approved_by": approval.approved_by,
                "approved_at": _iso(approval.approved_at),
                "comment": approval.comment,
            }
    return {
        "when": _iso(row.decided_at or row.recorded_at),
        "task_id": row.task_id,
        "outcome": row.outcome,
        "policy": row.policy,
        "policy_hash": run.get("policy_hash"),
        "policy_json": run.get("policy_json"),
        "run_id": row.run_id,
        "mode": run.get("mode"),
        "rule": row.reason,
        "task_status": row.task_status,
        "task_timestamp": _iso(row.task_timestamp),
        "target": row.target,
        "http_status": row.http_status,
        "error_code": row.error_code,
        "error_message": row.error_message,
        "note": row.note,
        "reclaimed_bytes": row.reclaimed_bytes,
        "approval": approved,
        "snapshot": _snapshot(row.snapshot),
    }


def _snapshot(text: str | None) -> Any:
    """A row's snapshot as JSON data (its text, if it ever is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


#: Rows recording what people did (reaper.people): no request went to the target.
_PEOPLE_OUTCOMES = frozenset({"pinned", "unpinned", "approved", "rejected"})


def explain_text(entry: dict[str, Any], console: Console, show_policy: bool) -> None:
    """Print one explained row for a person."""
    answer = f"HTTP {entry['http_status']}" if entry["http_status"] else "no answer"
    if entry["error_code"] or entry["error_message"]:
        answer += f": {entry['error_code'] or ''} {entry['error_message'] or ''}".rstrip()
    person = entry["outcome"] in _PEOPLE_OUTCOMES  # the note says who; the policy is the scope
    console.print(
        f"[bold]{entry['when']}[/bold] {entry['task_id']}: [bold]{entry['outcome']}[/bold] "
        f"{'for' if person else 'by'} policy {escape(entry['policy'])} "
        f"(version {str(entry['policy_hash'])[:12]}, "
        f"{entry['mode']} {entry['run_id']})"
    )
    listed = ""
    if entry["task_status"] is not None or entry["task_timestamp"] is not None:
        listed = f"; listed as {entry['task_status']}, {entry['task_timestamp']}"
    console.print(f"  rule: {entry['rule']}{listed}")
    if not person:  # a person's decision: the target was not asked
        console.print(f"  target {entry['target']} answered {answer}")
    if entry["note"]:
        console.print(f"  note: {entry['note']}")
    approval = entry["approval"]
    if approval is not None:
        if approval.get("approved_by"):
            text = (
                f"  approved by {approval['approved_by']} at {approval['approved_at']} "
                f"(plan held by run {approval['held_run']}, approval {approval['approval_id']})"
            )
            console.print(text + (f": {approval['comment']}" if approval["comment"] else ""))
        else:
            console.print(f"  carried out approval {approval['approval_id']}")
    if entry["snapshot"] is not None:
        shown = json.dumps(entry["snapshot"], ensure_ascii=False, sort_keys=True)
        console.print(f"  record as listed: {shown}", highlight=False, markup=False)
    if show_policy and entry["policy_json"]:
        # A person's run records what was decided there, not a policy.
        label = "recorded" if person else "policy"
        console.print(f"  {label}: {entry['policy_json']}")


def audit_json(rows: Iterable[AuditRow], out: TextIO) -> None:
    """Write rows as one JSON array (as ``json.dumps(..., indent=2)`` would), a row at a time."""
    first = True
    for row in rows:
        # JSON strings hold no raw newline: re-indenting every line nests the object in the array.
        item = json.dumps(row.as_dict(), ensure_ascii=False, indent=2).replace("\n", "\n  ")
        out.write(("[\n  " if first else ",\n  ") + item)
        first = False
    out.write("[]\n" if first else "\n]\n")


def audit_csv(rows: Iterable[AuditRow], out: TextIO) -> None:
    """Write rows as CSV with a header row, a row at a time."""
    writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(AuditRow)])
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_dict())
