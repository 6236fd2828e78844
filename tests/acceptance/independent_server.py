"""An independent data_pipeline server for the delete-time-truth acceptance scenarios.

Written from ../shared/TARGETS.md section 1, the seed document and a reading of the real server
(``unified_api.py``: the task routes and ``delete_task_directory_simple``;
``simple_db_manager.py``: ``update_task_status``, ``get_tasks_list``, ``query_tasks_advanced``),
*not* from reaper's own simulator, so that the two cannot share a misreading.

The server holds an in-memory table of task rows and a separate set of task directories (the real
service keeps both: a PostgreSQL row and ``training_data/<task_id>/``), and it keeps its own
record of what it actually did: directories removed, row updates made or lost, ids received while
their task was live, acknowledgements whose row update failed, batches answered 504 after acting,
and DELETE requests that overlapped. Scenarios judge reaper's audit against that record only.

Behaviours that can be switched on (all off by default), each what the real service or the
gateway in front of it does:

- ``rerun_on_list``: a task is re-executed right after a ``GET /tasks`` page shows it (someone
  clicks "execute" on a finished task). It goes back to ``in_progress`` the way
  ``update_task_status`` does it (``started_at`` kept, ``completed_at`` kept,
  ``directory_exists`` not reset) and its directory is recreated; with an end status it also
  finishes at once (``completed``/``failed`` set ``completed_at = now``; ``partial_completed``
  sets no time; ``zombie``: the zombie check marks it ``failed`` without a ``completed_at``).
- ``rerun_on_delete``: the same, triggered when the n-th DELETE request arrives.
- ``row_update_fails``: the directory is removed but the row update (a new connection per id)
  fails; the error is swallowed and the id is still reported in ``deleted_tasks``.
- ``ack_without_effect``: the id is reported deleted but neither directory nor row changes.
- ``act_then_504``: a batch holding one of these ids is carried out in full, then answered 504
  by the gateway (the first time only).
- ``gateway_timeout``: a gateway answers 504 once a DELETE has taken this long; the server keeps
  working on it in the background.
- ``per_id_seconds``: each id of a DELETE takes this long (a file walk and a connection per id).
- ``gate``: a DELETE starts its work only once this event is set (stop() sets it).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

PREFIX = "/api/v0/data_pipeline/tasks"
UTC_ZONE = ZoneInfo("UTC")
LIVE = ("pending", "in_progress")
# The database constraint on data_pipeline_tasks.status.
STATUSES = ("pending", "in_progress", "partial_completed", "completed", "failed")
# What POST /tasks/query accepts as a status filter (it rejects two real statuses).
QUERY_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
QUERY_SORT_FIELDS = ("created_at", "started_at", "completed_at", "task_name", "status")
STEPS = ("ddl_generation", "qa_generation", "sql_validation", "training_load")


class _ServerError(Exception):
    """What the real service answers 500 for (an exception inside its try block)."""


@dataclass
class Row:
    """One data_pipeline_tasks row; timestamps naive, in the database session's zone."""

    task_id: str
    task_name: str
    status: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None = None
    by_user: str = "ops"
    db_name: str = "highway_db"
    business_context: str | None = "retention acceptance"
    directory_exists: bool | None = None  # NULL in old rows; listed as true (COALESCE)
    steps: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Directory:
    """training_data/<task_id>/ on the server's disk."""

    files: int
    size: int


@dataclass(frozen=True)
class Processed:
    """What one DELETE request did to one id, as the server itself knows it."""

    request: int
    task_id: str
    status_then: str | None  # the row's status when the server reached the id (None: no row)
    directory_removed: bool
    files: int
    size: int
    row_updated: bool  # the directory_exists/updated_at update (or row delete) took effect
    acknowledged: bool  # reported in deleted_tasks


@dataclass
class DeleteRequest:
    """One DELETE request as the server saw it."""

    number: int
    task_ids: list[str]
    started: float
    finished: float | None = None
    answered: int | None = None


@dataclass
class Record:
    """The server's own account of what happened, for scenarios to compare audits with."""

    deletes: list[DeleteRequest] = field(default_factory=list)
    processed: list[Processed] = field(default_factory=list)
    reruns: list[tuple[str, str]] = field(default_factory=list)  # (task_id, trigger)
    overlaps: list[tuple[int, int, frozenset[str]]] = field(default_factory=list)
    lists: int = 0
    queries: int = 0
    gets: int = 0

    def sent(self) -> set[str]:
        """Every id that arrived in a DELETE request."""
        return {i for d in self.deletes for i in d.task_ids}

    def overlapping(self) -> list[tuple[int, int, frozenset[str]]]:
        """Pairs of DELETE requests the server worked on at once that shared ids."""
        return [o for o in self.overlaps if o[2]]

    def deleted_while_live(self) -> set[str]:
        """Ids the server worked on while their task was pending or in progress."""
        return {p.task_id for p in self.processed if p.status_then in LIVE}

    def directories_removed(self) -> dict[str, int]:
        """Task id -> files removed from its directory, over all requests."""
        out: dict[str, int] = {}
        for p in self.processed:
            if p.directory_removed:
                out[p.task_id] = out.get(p.task_id, 0) + p.files
        return out

    def acknowledged_not_done(self) -> set[str]:
        """Ids reported in deleted_tasks whose row was not updated by that request."""
        return {p.task_id for p in self.processed if p.acknowledged and not p.row_updated}

    def acted_then_5xx(self) -> set[str]:
        """Ids the server worked on in a request whose client got a 5xx answer."""
        answered = {d.number: d.answered for d in self.deletes}
        return {
            p.task_id
            for p in self.processed
            if (answered.get(p.request) or 0) >= 500 and (p.directory_removed or p.row_updated)
        }


@dataclass
class Behaviour:
    """Switchable behaviours (see the module docstring)."""

    rerun_on_list: dict[str, str | None] = field(default_factory=dict)
    rerun_on_delete: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    row_update_fails: dict[str, int] = field(default_factory=dict)  # id -> times it fails
    ack_without_effect: dict[str, int] = field(default_factory=dict)  # id -> times
    act_then_504: set[str] = field(default_factory=set)
    gateway_timeout: float | None = None
    per_id_seconds: float = 0.0
    #: When set, a DELETE starts its work only once this event is set (a server busy for as
    #: long as a test needs, without sleeping for it).
    gate: threading.Event | None = None


class IndependentServer:
    """The data_pipeline task API on 127.0.0.1 (random port), with its own record."""

    def __init__(self, zone: str = "UTC", behaviour: Behaviour | None = None) -> None:
        self.zone = ZoneInfo(zone)
        self.behaviour = behaviour or Behaviour()
        self.rows: dict[str, Row] = {}
        self.directories: dict[str, Directory] = {}
        self.record = Record()
        self._lock = threading.RLock()
        self._in_flight: dict[int, DeleteRequest] = {}
        self._rerun_done: set[str] = set()
        self._workers: list[threading.Thread] = []
        self._httpd: ThreadingHTTPServer | None = None
        self.url: str | None = None
        self._thread: threading.Thread | None = None

    # --- the clock and the table --------------------------------------------------------------

    def now(self) -> datetime:
        """CURRENT_TIMESTAMP as the session's zone writes it into a TIMESTAMP column."""
        return datetime.now(self.zone).replace(tzinfo=None)

    def add(
        self,
        task_id: str,
        status: str,
        age: timedelta,
        *,
        files: int = 3,
        size: int = 4096,
        task_name: str | None = None,
        directory: bool = True,
    ) -> Row:
        """A task created ``age`` ago; finished ones finished ten minutes after starting."""
        assert status in STATUSES
        created = self.now() - age
        finished = status in ("completed", "failed")
        row = Row(
            task_id=task_id,
            task_name=task_name or f"pipeline {task_id}",
            status=status,
            created_at=created,
            started_at=None if status == "pending" else created + timedelta(seconds=2),
            completed_at=created + timedelta(minutes=10) if finished else None,
            steps=dict.fromkeys(STEPS, "completed" if finished else "pending"),
        )
        with self._lock:
            self.rows[task_id] = row
            if directory:
                self.directories[task_id] = Directory(files, size)
        return row

    def execute(self, task_id: str, trigger: str = "api") -> bool:
        """POST .../tasks/{id}/execute and the executor's first status update."""
        with self._lock:
            row = self.rows.get(task_id)
            if row is None:
                return False
            # update_task_status('in_progress'): started_at only if unset; completed_at kept.
            row.status = "in_progress"
            if row.started_at is None:
                row.started_at = self.now()
            row.steps = dict.fromkeys(STEPS, "running")
            # The executor writes into training_data/<task_id>/ again; directory_exists is not
            # reset by anything.
            self.directories.setdefault(task_id, Directory(1, 100))
            self.record.reruns.append((task_id, trigger))
        return True

    def finish(self, task_id: str, status: str) -> None:
        """update_task_status(status) at the end of an execution."""
        assert status in STATUSES and status not in LIVE
        with self._lock:
            row = self.rows[task_id]
            row.status = status
            if status in ("completed", "failed"):
                row.completed_at = self.now()
            row.steps = dict.fromkeys(STEPS, "failed" if status == "failed" else "completed")

    def zombie(self, task_id: str) -> None:
        """check_zombie_data_pipeline_tasks(): an in_progress task whose started_at is older
        than the timeout becomes failed, with no completed_at. A re-executed task keeps its old
        started_at, so it qualifies at once."""
        with self._lock:
            row = self.rows[task_id]
            assert row.status == "in_progress"
            row.status = "failed"

    def _rerun(self, task_id: str, end: str | None, trigger: str) -> None:
        self._rerun_done.add(task_id)
        self.execute(task_id, trigger)
        if end == "zombie":
            self.zombie(task_id)
        elif end is not None:
            self.finish(task_id, end)

    # --- serving ------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a random port; return the base URL."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._dispatch(self, "GET")

            def do_POST(self) -> None:
                server._dispatch(self, "POST")

            def do_DELETE(self) -> None:
                server._dispatch(self, "DELETE")

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        return self.url

    def finish_work(self) -> None:
        """Open the gate and wait until every DELETE the server started has been worked off."""
        if self.behaviour.gate is not None:
            self.behaviour.gate.set()
        for worker in list(self._workers):
            worker.join(timeout=30)

    def stop(self) -> None:
        """Stop serving and wait for background deletions to end."""
        if self.behaviour.gate is not None:
            self.behaviour.gate.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for worker in self._workers:
            worker.join(timeout=30)

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        is_json = (handler.headers.get("Content-Type") or "").startswith("application/json")
        query = parse_qs(parts.query, keep_blank_values=True)
        path = parts.path.rstrip("/") if parts.path != "/" else parts.path
        try:
            if path == PREFIX and method == "GET":
                status, body = self._list(query)
            elif path == PREFIX + "/query" and method == "POST":
                status, body = self._query(_json_or_empty(raw, is_json))
            elif path == PREFIX and method == "DELETE":
                status, body = self._delete(_json_or_empty(raw, is_json), query)
            elif path.startswith(PREFIX + "/") and path.endswith("/execute") and method == "POST":
                task_id = path[len(PREFIX) + 1 : -len("/execute")]
                found = self.execute(task_id)
                status, body = (
                    (202, _success("任务执行已启动", {"task_id": task_id}, self.zone))
                    if found
                    else (404, _error(f"任务不存在: {task_id}", 404, "resource_not_found"))
                )
            elif path.startswith(PREFIX + "/") and method == "GET" and path.count("/") == 5:
                status, body = self._get_one(path[len(PREFIX) + 1 :])
            else:
                _send(handler, 404, b"<h1>Not Found</h1>", "text/html")
                return
        except _ServerError as exc:
            status, body = 500, _error(str(exc), 500, "database_error")
        if isinstance(body, bytes):
            _send(handler, status, body, "text/html")
        else:
            _send(
                handler, status, json.dumps(body, ensure_ascii=False).encode(), "application/json"
            )

    # --- GET /tasks ---------------------------------------------------------------------------

    def _list(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        limit = _flask_int(query, "limit", 50)
        offset = _flask_int(query, "offset", 0)
        status = (query.get("status") or [""])[0]
        limit = min(limit, 100)
        if limit < 0 or offset < 0:
            raise _ServerError("LIMIT/OFFSET must not be negative")
        with self._lock:
            self.record.lists += 1
            rows = [r for r in self.rows.values() if not status or r.status == status]
            rows.sort(key=lambda r: r.created_at, reverse=True)
            page = rows[offset : offset + limit]
            tasks = [self._listed(r) for r in page]
            self._after_listing(page)
        data = {"tasks": tasks, "total": len(tasks), "limit": limit, "offset": offset}
        return 200, _success("获取任务列表成功", data, self.zone)

    def _after_listing(self, page: list[Row]) -> None:
        for row in page:
            if row.task_id in self._rerun_done or row.status in LIVE:
                continue
            if row.task_id in self.behaviour.rerun_on_list:
                self._rerun(row.task_id, self.behaviour.rerun_on_list[row.task_id], "listing")

    def _listed(self, row: Row) -> dict[str, Any]:
        return {
            "task_id": row.task_id,
            "task_name": row.task_name,
            "status": row.status,
            "step_status": _step_summary(row.steps),
            "created_at": _iso(row.created_at),
            "started_at": _iso(row.started_at),
            "completed_at": _iso(row.completed_at),
            "created_by": row.by_user,
            "db_name": row.db_name,
            "business_context": row.business_context,
            "directory_exists": True if row.directory_exists is None else row.directory_exists,
            "updated_at": _iso(row.updated_at),
        }

    # --- POST /tasks/query --------------------------------------------------------------------

    def _query(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        page = req.get("page", 1)
        page_size = req.get("page_size", 20)
        status = req.get("status")
        sort_by = req.get("sort_by", "created_at")
        sort_order = req.get("sort_order", "desc")
        # Every validation branch calls bad_request_response(..., invalid_params=[...]), which
        # takes no such argument: the TypeError makes each of them a 500.
        try:
            bad = (
                page < 1
                or page_size < 1
                or page_size > 100
                or sort_by not in QUERY_SORT_FIELDS
                or sort_order.lower() not in ("asc", "desc")
                or (status and status not in QUERY_STATUSES)
            )
        except (TypeError, AttributeError) as exc:
            raise _ServerError(str(exc)) from None
        if bad:
            raise _ServerError("bad_request_response() got an unexpected keyword argument")
        bounds = []
        for name in ("created", "started", "completed"):
            for end, keep in (("start", _at_or_after), ("end", _at_or_before)):
                value = req.get(f"{name}_time_{end}")
                if value:
                    bounds.append((f"{name}_at", _pg_timestamp(value), keep))
        with self._lock:
            self.record.queries += 1
            rows = [
                r
                for r in self.rows.values()
                if (not status or r.status == status)
                and all(keep(getattr(r, column), bound) for column, bound, keep in bounds)
            ]
            total = len(rows)
            rows = _pg_sorted(rows, sort_by, sort_order.lower() == "desc")
            offset = (page - 1) * page_size
            chunk = rows[offset : offset + page_size]
            tasks = [self._listed(r) for r in chunk]
        total_pages = (total + page_size - 1) // page_size
        data = {
            "tasks": tasks,
            "pagination": {
                "page": page,
                "page_size": page_size,
                "total": total,
                "total_pages": total_pages,
                "has_next": page < total_pages,
                "has_prev": page > 1,
            },
            "filters_applied": {
                k: v for k, v in req.items() if (k == "status" or "_time_" in k) and v
            },
            "sort_applied": {"sort_by": sort_by, "sort_order": sort_order},
            "query_time": "0.001s",
        }
        return 200, _success("查询任务列表成功", data, self.zone)

    # --- GET /tasks/{id} ----------------------------------------------------------------------

    def _get_one(self, task_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.record.gets += 1
            row = self.rows.get(task_id)
            if row is None:
                return 404, _error(f"任务不存在: {task_id}", 404, "resource_not_found")
            data = {
                "task_id": row.task_id,
                "task_name": row.task_name,
                "status": row.status,
                "step_status": dict(row.steps),
                "created_at": _iso(row.created_at),
                "started_at": _iso(row.started_at),
                "completed_at": _iso(row.completed_at),
                "parameters": {},
                "result": None,
                "error_message": None,
                "current_step": None,
                "total_steps": len(row.steps),
                "steps": [
                    {"step_name": s, "step_status": v, "started_at": None, "completed_at": None}
                    for s, v in row.steps.items()
                ],
            }
        return 200, _success("获取任务状态成功", data, self.zone)

    # --- DELETE /tasks ------------------------------------------------------------------------

    def _delete(
        self, body: dict[str, Any], query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any] | bytes]:
        def parameter(name: str) -> Any:
            if name in body:
                return body[name]
            if name in query:
                value = query[name][0]
                return {"true": True, "1": True, "yes": True, "false": False, "0": False}.get(
                    value.lower(), value
                )
            return None

        task_ids = parameter("task_ids")
        if task_ids is None and "task_ids[]" in query:
            task_ids = query["task_ids[]"]
        confirm = parameter("confirm")
        if not task_ids:
            return 400, _error("缺少必需参数: task_ids", 400, "missing_required_params")
        if not confirm:
            return 400, _error("缺少必需参数: confirm", 400, "missing_required_params")
        if confirm is not True:
            return 400, _error("confirm参数必须为true以确认删除操作", 400, "x")
        if not isinstance(task_ids, list):
            return 400, _error("task_ids必须是非空的任务ID列表", 400, "missing_required_params")
        drop_rows = bool(parameter("delete_database_records") or False)
        keep_going = parameter("continue_on_error")
        keep_going = True if keep_going is None else keep_going

        with self._lock:
            number = len(self.record.deletes) + 1
            request = DeleteRequest(number, [str(i) for i in task_ids], time.monotonic())
            self.record.deletes.append(request)
            for other in self._in_flight.values():
                shared = frozenset(other.task_ids) & frozenset(request.task_ids)
                self.record.overlaps.append((other.number, number, shared))
            self._in_flight[number] = request
            for task_id, (nth, end) in self.behaviour.rerun_on_delete.items():
                if nth == number and task_id not in self._rerun_done:
                    self._rerun(task_id, end, f"delete request {nth}")

        outcome: dict[str, Any] = {}

        def work() -> None:
            outcome["answer"] = self._delete_batch(request, drop_rows, bool(keep_going))

        worker = threading.Thread(target=work, daemon=True)
        self._workers.append(worker)
        worker.start()
        worker.join(self.behaviour.gateway_timeout)
        if worker.is_alive():
            # The gateway gives up; the server carries on with the batch.
            return self._answered(request, 504), _GATEWAY_504
        answer = outcome["answer"]
        if set(request.task_ids) & self.behaviour.act_then_504:
            self.behaviour.act_then_504 -= set(request.task_ids)
            return self._answered(request, 504), _GATEWAY_504
        return self._answered(request, 200), answer

    def _answered(self, request: DeleteRequest, status: int) -> int:
        with self._lock:
            request.answered = status
        return status

    def _delete_batch(
        self, request: DeleteRequest, drop_rows: bool, keep_going: bool
    ) -> dict[str, Any]:
        deleted: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        if self.behaviour.gate is not None:
            self.behaviour.gate.wait()
        for raw_id in request.task_ids:
            task_id = str(raw_id)
            if self.behaviour.per_id_seconds:
                time.sleep(self.behaviour.per_id_seconds)
            result = self._delete_one(request.number, task_id, drop_rows)
            if result["success"]:
                deleted.append(result)
            else:
                failed.append(
                    {"task_id": task_id, "error": result["error"], "error_code": "DELETE_FAILED"}
                )
                if not keep_going:
                    break
        with self._lock:
            request.finished = time.monotonic()
            self._in_flight.pop(request.number, None)
        removed = sum(1 for d in deleted if d["directory_deleted"])
        if not failed:
            message = f"批量删除完成: 成功删除{removed}个目录"
        elif not deleted:
            message = f"批量删除失败: {len(failed)}个任务处理失败"
        else:
            message = f"批量删除部分完成: 成功{len(deleted)}个, 失败{len(failed)}个"
        data = {
            "deleted_tasks": deleted,
            "failed_tasks": failed,
            "summary": {
                "total_requested": len(request.task_ids),
                "successfully_deleted": len(deleted),
                "failed": len(failed),
            },
            "deleted_at": _iso(self.now()),
        }
        return _success(message, data, self.zone)

    def _delete_one(self, number: int, task_id: str, drop_rows: bool) -> dict[str, Any]:
        with self._lock:
            row = self.rows.get(task_id)
            status_then = row.status if row is not None else None
            no_effect = self.behaviour.ack_without_effect.get(task_id, 0) > 0
            if no_effect:
                self.behaviour.ack_without_effect[task_id] -= 1
            directory = self.directories.get(task_id)
            if no_effect:
                directory_deleted, files, size = True, 3, 4096
                removed = False
            elif directory is not None:
                del self.directories[task_id]
                directory_deleted, files, size = True, directory.files, directory.size
                removed = True
            else:
                directory_deleted, files, size = False, 0, 0
                removed = False
            # A new database connection: an error here is logged and swallowed.
            fails = self.behaviour.row_update_fails.get(task_id, 0) > 0
            if fails:
                self.behaviour.row_update_fails[task_id] -= 1
            row_updated = False
            records_deleted = False
            if drop_rows:
                records_deleted = True  # set before the commit, and for unknown ids too
                if not (fails or no_effect) and row is not None:
                    del self.rows[task_id]
                    row_updated = True
            elif not (fails or no_effect) and row is not None:
                row.directory_exists = False
                row.updated_at = self.now()
                row_updated = True
            self.record.processed.append(
                Processed(
                    request=number,
                    task_id=task_id,
                    status_then=status_then,
                    directory_removed=removed,
                    files=files if removed else 0,
                    size=size if removed else 0,
                    row_updated=row_updated,
                    acknowledged=True,
                )
            )
        return {
            "success": True,
            "task_id": task_id,
            "directory_deleted": directory_deleted,
            "database_records_deleted": records_deleted,
            "deleted_files_count": files,
            "deleted_size": _format_size(size),
            "deleted_at": _iso(self.now()),
            "operation_message": "目录删除成功" if directory_deleted else "目录不存在, 无需删除",
        }


# --- helpers ------------------------------------------------------------------------------------

_GATEWAY_504 = b"<html><head><title>504 Gateway Time-out</title></head></html>"


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _json_or_empty(raw: bytes, is_json: bool) -> dict[str, Any]:
    if not is_json or not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise _ServerError("invalid JSON body") from None
    return value if isinstance(value, dict) else {}


def _flask_int(query: dict[str, list[str]], name: str, default: int) -> int:
    """request.args.get(name, default, type=int): a value that is not an int gives the default."""
    try:
        return int(query[name][0])
    except (KeyError, ValueError):
        return default


def _success(text: str, data: dict[str, Any], zone: ZoneInfo = UTC_ZONE) -> dict[str, Any]:
    # data.timestamp is the Flask host's datetime.now(): naive local time.
    now = datetime.now(zone).replace(tzinfo=None).isoformat()
    return {
        "code": 200,
        "success": True,
        "message": "操作成功",
        "data": {**data, "response": text, "timestamp": now},
    }


def _error(text: str, code: int, error_type: str) -> dict[str, Any]:
    message = {400: "请求参数错误", 404: "资源未找到", 500: "系统内部错误"}.get(code, "处理失败")
    return {
        "code": code,
        "success": False,
        "message": message,
        "data": {"response": text, "error_type": error_type},
    }


def _iso(value: datetime | None) -> str | None:
    """datetime.isoformat(): no fraction when the microseconds are 0."""
    return value.isoformat() if value is not None else None


def _pg_timestamp(text: str) -> datetime:
    """A string compared with a TIMESTAMP WITHOUT TIME ZONE column: any offset is ignored."""
    try:
        return datetime.fromisoformat(str(text).replace(" ", "T")).replace(tzinfo=None)
    except ValueError:
        raise _ServerError(f"invalid input syntax for type timestamp: {text!r}") from None


def _at_or_after(value: datetime | None, bound: datetime) -> bool:
    return value is not None and value >= bound


def _at_or_before(value: datetime | None, bound: datetime) -> bool:
    return value is not None and value <= bound


def _pg_sorted(rows: list[Row], column: str, descending: bool) -> list[Row]:
    """ORDER BY column: NULLs sort as larger than any value (first when descending)."""
    present = [r for r in rows if getattr(r, column) is not None]
    missing = [r for r in rows if getattr(r, column) is None]
    present.sort(key=lambda r: getattr(r, column), reverse=descending)
    return missing + present if descending else present + missing


def _step_summary(steps: dict[str, str]) -> str | None:
    values = list(steps.values())
    if not values:
        return None
    if "failed" in values:
        return "failed"
    if "running" in values:
        return "running"
    if all(v == "completed" for v in values):
        return "all_completed"
    if "completed" in values:
        return "partial_completed"
    return "pending"


def _format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KB"
    if size < 1024**3:
        return f"{size / 1024**2:.1f} MB"
    return f"{size / 1024**3:.1f} GB"
