"""Bad input: arbitrary policy files, arbitrary target answers, oversized bodies.

* The policy loader, fed any YAML (or any text), either loads or raises PolicyError whose every
  problem names a field; nothing else escapes. Duplicate keys are an error.
* Every target's parsers, fed any body (JSON or not) with any status, raise only reaper's own
  errors, never yield a task that is not in the body, and never make a run delete anything.
* A 200 MB body or a page of ten million ids is cut off at ``target.max_response_bytes``
  without being read into memory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reaper.audit import AuditStore
from reaper.errors import PolicyError, ReaperError
from reaper.policy import LoadedPolicy, load_policy_text
from reaper.runner import RunStatus, build_target, run_policy
from reaper.targets.base import ListRequest

from .drivers import DRIVERS, example_policies, pointed_policies, secrets_in_env

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- the policy loader ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["30d", "1h", "5/s", "completed", "data_pipeline", "huawei_dcs", "^task_"])
)
keys = st.sampled_from(
    [
        "name",
        "target",
        "type",
        "select",
        "status",
        "older_than",
        "keep",
        "newest",
        "protect",
        "delete",
        "match",
        "rate",
        "auth",
        "base_url",
        "filters",
    ]
) | st.text(max_size=10)
yaml_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)


def _check_policy_error(exc: PolicyError) -> None:
    assert exc.errors, "a PolicyError names at least one problem"
    for error in exc.errors:
        assert error.field, f"a problem without a field: {error!r}"
        assert error.message
    assert "Traceback" not in str(exc)


class TestPolicyLoader:
    @FUZZ
    @given(yaml_values)
    def test_any_yaml_document_loads_or_names_the_field(self, value: Any) -> None:
        """Any YAML value: loaded, or a PolicyError whose every problem names a field."""
        text = yaml.safe_dump(value, allow_unicode=True)
        try:
            load_policy_text(text)
        except PolicyError as exc:
            _check_policy_error(exc)

    @FUZZ
    @given(st.text(max_size=300))
    def test_any_text_loads_or_names_the_field(self, text: str) -> None:
        """Any text at all (YAML syntax errors, tabs, tags, anchors): only PolicyError."""
        try:
            load_policy_text(text)
        except PolicyError as exc:
            _check_policy_error(exc)

    @FUZZ
    @given(
        st.sampled_from(sorted(DRIVERS)),
        st.data(),
    )
    def test_mutated_example_policies_name_the_mutated_field(
        self, kind: str, data: st.DataObject
    ) -> None:
        """An example policy with one value replaced: loads, or the error names that field."""
        doc = example_policies(DRIVERS[kind])[0]
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths))
        new = data.draw(yaml_values)
        mutated = _replace(doc, path, new)
        try:
            load_policy_text(yaml.safe_dump(mutated, allow_unicode=True))
        except PolicyError as exc:
            _check_policy_error(exc)
            named = {e.field for e in exc.errors}
            dotted = ".".join(str(p) for p in path)
            assert any(
                dotted.startswith(f) or f.startswith(dotted) or f in ("<policy>", "<yaml>")
                for f in named
            ) or any(_crosses(path, f) for f in named), (dotted, named)

    def test_duplicate_keys_are_an_error(self) -> None:
        """A second `select:` (or any repeated key) does not silently win: it is refused."""
        text = """\
name: dup
target: {type: data_pipeline, base_url: "http://127.0.0.1:1"}
select:
  status: [completed]
  older_than: 30d
delete: {rate: 5/s}
select:
  status: [completed, failed]
  older_than: 1d
"""
        with pytest.raises(PolicyError) as caught:
            load_policy_text(text)
        [error] = caught.value.errors
        assert error.field == "select"
        assert "duplicate key 'select'" in error.message and "line 3" in error.message
        assert error.line == 7

    def test_nested_duplicate_keys_are_an_error(self) -> None:
        """Duplicates inside a section too: `protect.status` given twice."""
        text = """\
name: dup
target: {type: data_pipeline, base_url: "http://127.0.0.1:1"}
select: {status: [completed], older_than: 30d}
protect:
  status: [pending]
  status: []
"""
        with pytest.raises(PolicyError) as caught:
            load_policy_text(text)
        assert [e.field for e in caught.value.errors] == ["protect.status"]


def _paths(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _replace(value: Any, path: tuple[str | int, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)  # type: ignore[index]
    return copy


def _crosses(path: tuple[str | int, ...], field: str) -> bool:
    """A cross-field rule may name the other field (e.g. a status both selected and protected,
    or select.status when target.type changed): accept a field in the same top-level section,
    or any field when the target type itself was replaced."""
    top = str(path[0])
    # A status both selected and protected is reported at select.status, whichever was changed.
    status_rule = {top, field.split(".")[0]} == {"select", "protect"} and "status" in field
    return (
        field.split(".")[0] == top
        or path[:2] == ("target", "type")
        or top == "target"
        or status_rule
    )


# --- target answers -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "data",
                    "tasks",
                    "task_id",
                    "id",
                    "status",
                    "success",
                    "batchtasks",
                    "page",
                    "marker",
                    "task_count",
                    "pagination",
                    "total",
                    "deleted_tasks",
                    "failed_tasks",
                    "created_at",
                    "create_time",
                    "directory_exists",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)
bodies = json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
statuses = st.sampled_from([200, 200, 200, 201, 204, 302, 400, 404, 409, 500, 503])


class _Cap(Exception):
    """The listing asked for more pages than any body here can justify."""


def _transport(answer: Callable[[httpx.Request], tuple[int, bytes]], sent: list[httpx.Request]):  # type: ignore[no-untyped-def]
    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) > 200:
            raise _Cap(f"{len(sent)} requests: the listing does not end")
        status, body = answer(request)
        return httpx.Response(status, content=body)

    return httpx.MockTransport(handler)


class TestTargetAnswers:
    @FUZZ
    @given(kind=st.sampled_from(sorted(DRIVERS)), status=statuses, body=bodies)
    def test_listing_parsers_raise_only_reported_errors(
        self, policies: dict[str, LoadedPolicy], kind: str, status: int, body: bytes
    ) -> None:
        """Any listing answer: tasks that are in the body, or a ReaperError; nothing else."""
        sent: list[httpx.Request] = []

        async def list_all() -> list[str]:
            with secrets_in_env():
                target, client = build_target(
                    policies[kind], transport=_transport(lambda _r: (status, body), sent)
                )
            try:
                request = ListRequest(age_field=policies[kind].policy.age_field)
                return [task.id async for task in target.list_tasks(request)]
            finally:
                await client.aclose()

        try:
            ids = asyncio.run(list_all())
        except ReaperError:
            return
        text = body.decode("utf-8", "replace")
        for task_id in ids:
            assert json.dumps(task_id)[1:-1] in text or task_id in text

    @FUZZ
    @given(kind=st.sampled_from(sorted(DRIVERS)), status=statuses, body=bodies)
    def test_broken_listings_never_delete(
        self,
        policies: dict[str, LoadedPolicy],
        module_store: AuditStore,
        kind: str,
        status: int,
        body: bytes,
    ) -> None:
        """A run over any such answer finishes with a status and sends no delete request."""
        sent: list[httpx.Request] = []
        run = asyncio.run(
            _run(policies[kind], module_store, _transport(lambda _r: (status, body), sent))
        )
        assert [r for r in sent if r.method == "DELETE"] == []
        assert run.status in (RunStatus.ABORTED, RunStatus.SUCCEEDED), run.error
        if run.status is RunStatus.ABORTED:
            assert run.error and "listing failed" in run.error
        else:
            assert run.summary.eligible == 0

    @FUZZ
    @given(kind=st.sampled_from(sorted(DRIVERS)), status=statuses, body=bodies)
    def test_delete_answers_are_never_read_as_a_deletion_they_do_not_report(
        self,
        policies: dict[str, LoadedPolicy],
        module_store: AuditStore,
        kind: str,
        status: int,
        body: bytes,
    ) -> None:
        """A valid listing, then any answer to the delete: the run reports it, and records a
        deletion only when the answer documents one (a Huawei 200/204 with an empty or JSON
        body; a data_pipeline deleted_tasks entry naming the id)."""
        sent: list[httpx.Request] = []
        listing = VALID_LISTING[kind]

        def answer(request: httpx.Request) -> tuple[int, bytes]:
            if request.method == "DELETE":
                return status, body
            return listing(request)

        run = asyncio.run(_run(policies[kind], module_store, _transport(answer, sent)))
        deletes = [r for r in sent if r.method == "DELETE"]
        assert deletes, run.error
        assert run.summary.eligible == 1
        assert run.status is not RunStatus.FAILED, run.error
        if run.summary.deleted:
            assert _documents_deletion(kind, status, body), (status, body)


async def _run(loaded: LoadedPolicy, store: AuditStore, transport: httpx.MockTransport) -> Any:
    with secrets_in_env():
        return await run_policy(loaded, store, transport=transport)


def _documents_deletion(kind: str, status: int, body: bytes) -> bool:
    try:
        data = json.loads(body) if body.strip() else None
        is_json = True
    except ValueError:
        data, is_json = None, False
    if kind != "data_pipeline":
        return status in (200, 204) and is_json
    if status != 200 or not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        return False
    entries = data["data"].get("deleted_tasks")
    return isinstance(entries, list) and any(
        isinstance(e, dict) and e.get("task_id") == ONE_ID["data_pipeline"] for e in entries
    )


ONE_ID = {
    "data_pipeline": "task_20240101_000000",
    "huawei_dcs": "0f0e0d0c-0000-4000-8000-000000000001",
    "huawei_iotda": "5e0000000000000000000001",
}


def _dp_listing(request: httpx.Request) -> tuple[int, bytes]:
    if request.url.path.endswith("/query"):
        return 200, json.dumps({"data": {"pagination": {"total": 1}}}).encode()
    task = {
        "task_id": ONE_ID["data_pipeline"],
        "status": "completed",
        "task_name": "t",
        "created_at": "2024-01-01 00:00:00",
        "directory_exists": True,
    }
    if request.url.path.endswith(ONE_ID["data_pipeline"]):
        # GET one task (the re-check before deleting): no directory_exists in this answer.
        one = {key: value for key, value in task.items() if key != "directory_exists"}
        return 200, json.dumps({"success": True, "data": one}).encode()
    status = request.url.params.get("status")
    tasks = (
        [task]
        if request.url.params.get("offset") == "0" and status in (None, task["status"])
        else []
    )
    return 200, json.dumps({"success": True, "data": {"tasks": tasks}}).encode()


def _dcs_listing(_request: httpx.Request) -> tuple[int, bytes]:
    task = {
        "id": ONE_ID["huawei_dcs"],
        "status": "SUCCESS",
        "name": "backup",
        "created_at": "2024-01-01T00:00:00.000Z",
        "updated_at": "2024-01-01T00:00:00.000Z",
    }
    return 200, json.dumps({"task_count": "1", "tasks": [task]}).encode()


def _iotda_listing(request: httpx.Request) -> tuple[int, bytes]:
    task = {
        "task_id": ONE_ID["huawei_iotda"],
        "task_type": "firmwareUpgrade",
        "task_name": "rollout",
        "status": "Success",
        "status_desc": "",
        "create_time": "20240101T000000Z",
    }
    tasks = [task] if request.url.params.get("task_type") == "firmwareUpgrade" else []
    return 200, json.dumps({"batchtasks": tasks, "page": {"count": len(tasks)}}).encode()


VALID_LISTING: dict[str, Callable[[httpx.Request], tuple[int, bytes]]] = {
    "data_pipeline": _dp_listing,
    "huawei_dcs": _dcs_listing,
    "huawei_iotda": _iotda_listing,
}


# --- oversized answers --------------------------------------------------------------------------

MAX = 1024 * 1024
CHUNK = 64 * 1024


class _Endless(httpx.AsyncByteStream):
    """A body produced on demand, counting what the client pulled."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk


def _zeros(total: int) -> Iterator[bytes]:
    block = b"0" * CHUNK
    for _ in range(total // CHUNK):
        yield block


def _ten_million_ids() -> Iterator[bytes]:
    yield b'{"success": true, "data": {"tasks": ['
    for start in range(0, 10_000_000, 1000):
        yield b",".join(
            b'{"task_id": "task_20240101_%06d", "status": "completed", '
            b'"created_at": "2024-01-01 00:00:00"}' % (i % 1_000_000)
            for i in range(start, start + 1000)
        )
    yield b"]}}"


class TestOversizedAnswers:
    @pytest.mark.parametrize("shape", ["200MB-undeclared", "200MB-declared", "10M-ids"])
    def test_cut_off_at_the_maximum(self, shape: str, module_store: AuditStore) -> None:
        """The body is abandoned past max_response_bytes: the run aborts, memory stays small."""
        [doc] = [
            d
            for d in pointed_policies(DRIVERS["data_pipeline"], "http://sim.invalid", Path())
            if d["name"] == "pipeline-finished-30d"
        ]
        doc["target"] |= {"max_response_bytes": MAX, "verify_total": False}
        [loaded] = load_policy_text(yaml.safe_dump(doc))
        streams: list[_Endless] = []

        def handler(request: httpx.Request) -> httpx.Response:
            stream = _Endless(_ten_million_ids() if shape == "10M-ids" else _zeros(200 * 2**20))
            streams.append(stream)
            headers = {"Content-Length": str(200 * 2**20)} if shape == "200MB-declared" else {}
            return httpx.Response(200, headers=headers, stream=stream)

        tracemalloc.start()
        try:
            run = asyncio.run(
                run_policy(loaded, module_store, transport=httpx.MockTransport(handler))
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert run.status is RunStatus.ABORTED
        assert run.error and "exceeds the maximum" in run.error
        assert len(streams) == 1, "a too-large answer is not retried"
        assert streams[0].pulled <= MAX + CHUNK
        assert peak < 16 * MAX

    def test_cut_off_over_real_http(self) -> None:
        """Over a real socket, the server gets to send little more than the maximum."""
        sent = [0]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"0" * CHUNK
                try:
                    for _ in range(200 * 2**20 // CHUNK):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                        sent[0] += len(block)
                except OSError:
                    return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            host, port = server.server_address[:2]
            [doc] = [
                d
                for d in pointed_policies(
                    DRIVERS["data_pipeline"], f"http://{host!s}:{port}", Path()
                )
                if d["name"] == "pipeline-finished-30d"
            ]
            doc["target"] |= {"max_response_bytes": MAX, "verify_total": False}
            [loaded] = load_policy_text(yaml.safe_dump(doc))

            async def list_once() -> None:
                target, client = build_target(loaded)
                try:
                    async for _ in target.list_tasks(ListRequest(age_field="created_at")):
                        pass
                finally:
                    await client.aclose()

            with pytest.raises(ReaperError, match="exceeds the maximum"):
                asyncio.run(list_once())
        finally:
            server.shutdown()
            server.server_close()
        # Socket buffers on both sides hold a few MB at most; 200 MB were never sent.
        assert sent[0] < 32 * MAX
