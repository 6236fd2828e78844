"""The Huawei simulators over real HTTP: the gateway's authentication, paging, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from pydantic import SecretStr

from reaper.simulators import (
    DcsSimTask,
    Faults,
    HuaweiDcsSimulator,
    HuaweiIotdaSimulator,
    IotdaSimTask,
    generate_dcs_tasks,
    generate_iotda_tasks,
)
from reaper.targets.huawei_signing import AkSkAuth, TokenAuth

AK, SK, TOKEN = "SIMTESTAK00000000001", "sim-test-secret-key-0001", "sim-test-token-0001"
PROJECT = "0123456789abcdef0123456789abcdef"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def dcs() -> Iterator[tuple[HuaweiDcsSimulator, str]]:
    tasks = [
        DcsSimTask(f"t-{i:03d}", "SUCCESS", NOW - timedelta(days=i, seconds=1)) for i in range(30)
    ]
    sim = HuaweiDcsSimulator(tasks, project_id=PROJECT, credentials={AK: SK}, tokens=[TOKEN])
    with sim.serve() as url:
        yield sim, url


@pytest.fixture
def iotda() -> Iterator[tuple[HuaweiIotdaSimulator, str]]:
    tasks = generate_iotda_tasks(40, seed=2, now=NOW)
    sim = HuaweiIotdaSimulator(tasks, project_id=PROJECT, credentials={AK: SK})
    with sim.serve() as url:
        yield sim, url


def client(url: str, auth: httpx.Auth | None = None, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=url, auth=auth or AkSkAuth(SecretStr(AK), SecretStr(SK)), **kwargs)


class TestGatewayAuthentication:
    def test_signed_request_is_accepted(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """A request signed with a known AK/SK is served."""
        _, url = dcs
        with client(url) as c:
            response = c.get(f"/v2/{PROJECT}/tasks", params={"limit": 5, "q": "a b+c"})
        assert response.status_code == 200
        assert len(response.json()["tasks"]) == 5

    def test_sdk_signed_request_is_accepted(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """The simulator verifies what the official SDK signs, as the real gateway does."""
        _, url = dcs
        host = url.removeprefix("http://")
        request = SdkRequest(
            method="GET",
            schema="http",
            host=host,
            resource_path=f"/v2/{PROJECT}/tasks",
            query_params=[("limit", 3), ("offset", 1), ("name", "x y~*")],
            header_params={
                "Content-Type": "application/json",
                "X-Project-Id": PROJECT,
                "User-Agent": "huaweicloud-usdk-python/3.0",
                "X-Sdk-Date": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            },
            body="",
        )
        Signer(BasicCredentials(AK, SK)).sign(request)
        response = httpx.get(request.url, headers=request.header_params)
        assert response.status_code == 200, response.text
        assert len(response.json()["tasks"]) == 3

    @pytest.mark.parametrize(
        ("auth", "why"),
        [
            (AkSkAuth(SecretStr(AK), SecretStr("wrong-secret")), "signature does not match"),
            (AkSkAuth(SecretStr("UNKNOWNAK"), SecretStr(SK)), "access key is unknown"),
            (
                AkSkAuth(
                    SecretStr(AK),
                    SecretStr(SK),
                    clock=lambda: datetime.now(UTC) - timedelta(minutes=16),
                ),
                "15 minutes",
            ),
            (TokenAuth(SecretStr("expired-token")), "token is invalid"),
        ],
        ids=["bad signature", "wrong AK", "stale date", "bad token"],
    )
    def test_refused_with_401(
        self, dcs: tuple[HuaweiDcsSimulator, str], auth: httpx.Auth, why: str
    ) -> None:
        """Bad signature, unknown AK, stale X-Sdk-Date, bad token: 401 in the gateway's shape."""
        sim, url = dcs
        with client(url, auth) as c:
            response = c.get(f"/v2/{PROJECT}/tasks")
        assert response.status_code == 401
        body = response.json()
        assert body["error_code"] == "APIGW.0301"
        assert why in body["error_msg"]
        assert sim.auth.refused == 1

    def test_tampered_request_is_refused(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """Changing a signed query parameter after signing breaks the signature."""
        _, url = dcs
        signed = next(
            AkSkAuth(SecretStr(AK), SecretStr(SK)).auth_flow(
                httpx.Request("GET", f"{url}/v2/{PROJECT}/tasks?limit=1")
            )
        )
        tampered = signed.url.copy_with(query=b"limit=1000")
        response = httpx.get(tampered, headers=dict(signed.headers))
        assert response.status_code == 401

    def test_no_credentials_is_401(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """A request without any credential is refused."""
        _, url = dcs
        assert httpx.get(f"{url}/v2/{PROJECT}/tasks").status_code == 401

    def test_other_project_is_403(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """The project in the path must be the credentials' project."""
        _, url = dcs
        with client(url) as c:
            assert c.get("/v2/another-project/tasks").status_code == 403

    def test_token(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """A known IAM token is accepted."""
        _, url = dcs
        with client(url, TokenAuth(SecretStr(TOKEN))) as c:
            assert c.get(f"/v2/{PROJECT}/tasks").status_code == 200


class TestDcs:
    def test_offset_paging_and_count(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """Newest first; task_count is the true total, as a string."""
        _, url = dcs
        with client(url) as c:
            first = c.get(f"/v2/{PROJECT}/tasks", params={"limit": 10, "offset": 0}).json()
            last = c.get(f"/v2/{PROJECT}/tasks", params={"limit": 10, "offset": 25}).json()
        assert first["task_count"] == "30"
        assert [t["id"] for t in first["tasks"]] == [f"t-{i:03d}" for i in range(10)]
        assert len(last["tasks"]) == 5
        assert first["tasks"][0]["created_at"].endswith("Z")

    def test_end_time_filters_on_creation(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """end_time (UTC yyyyMMddHHmmss) keeps tasks created up to that second."""
        _, url = dcs
        end = (NOW - timedelta(days=20)).strftime("%Y%m%d%H%M%S")
        with client(url) as c:
            body = c.get(f"/v2/{PROJECT}/tasks", params={"limit": 100, "end_time": end}).json()
        assert body["task_count"] == "10"
        assert {t["id"] for t in body["tasks"]} == {f"t-{i:03d}" for i in range(20, 30)}

    @pytest.mark.parametrize("params", [{"limit": 1001}, {"limit": 0}, {"end_time": "2026-01-01"}])
    def test_bad_parameters_are_400(
        self, dcs: tuple[HuaweiDcsSimulator, str], params: dict[str, Any]
    ) -> None:
        """limit outside 1..1000 and malformed times are refused in the DCS error shape."""
        _, url = dcs
        with client(url) as c:
            response = c.get(f"/v2/{PROJECT}/tasks", params=params)
        assert response.status_code == 400
        assert set(response.json()) == {"error_code", "error_msg", "error_ext_msg"}

    def test_delete(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """200 with an empty body, then 404 with a DCS error body."""
        sim, url = dcs
        with client(url) as c:
            first = c.delete(f"/v2/{PROJECT}/tasks/t-003")
            second = c.delete(f"/v2/{PROJECT}/tasks/t-003")
        assert (first.status_code, first.content) == (200, b"")
        assert second.status_code == 404
        assert second.json()["error_code"] == "DCS.4133"
        assert sim.deleted_ids == ["t-003"]

    def test_acted_then_504(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """act_then_504_rate: the task is deleted, the gateway answers 504; a retry gets 404."""
        sim, url = dcs
        sim.set_faults(Faults(act_then_504_rate=1.0))
        with client(url) as c:
            first = c.delete(f"/v2/{PROJECT}/tasks/t-004")
            retry = c.delete(f"/v2/{PROJECT}/tasks/t-004")
        assert first.status_code == 504
        assert retry.status_code == 404
        assert sim.deleted_ids == ["t-004"]

    def test_acknowledged_without_effect(self, dcs: tuple[HuaweiDcsSimulator, str]) -> None:
        """ack_without_effect_rate: 200, and the task is still listed."""
        sim, url = dcs
        sim.set_faults(Faults(ack_without_effect_rate=1.0))
        with client(url) as c:
            answer = c.delete(f"/v2/{PROJECT}/tasks/t-005")
            listed = c.get(f"/v2/{PROJECT}/tasks", params={"limit": 1000}).json()["tasks"]
        assert answer.status_code == 200
        assert "t-005" in {t["id"] for t in listed}
        assert sim.deleted_ids == []
        assert sim.acknowledged_not_done == ["t-005"]

    def test_rate_limit_is_the_gateway_429(self) -> None:
        """Over the limit: 429 with Retry-After and APIGW.0308."""
        sim = HuaweiDcsSimulator(
            credentials={AK: SK}, faults=Faults(rate_limit=1, rate_limit_burst=1)
        )
        with sim.serve() as url, client(url) as c:
            c.get(f"/v2/{PROJECT}/tasks")
            response = c.get(f"/v2/{PROJECT}/tasks")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error_code"] == "APIGW.0308"


class TestIotda:
    def test_task_type_is_required(self, iotda: tuple[HuaweiIotdaSimulator, str]) -> None:
        """Listing without task_type is a 400."""
        _, url = iotda
        with client(url) as c:
            assert c.get(f"/v5/iot/{PROJECT}/batchtasks").status_code == 400

    def test_marker_paging(self, iotda: tuple[HuaweiIotdaSimulator, str]) -> None:
        """Descending ids below the marker; page.marker is the last id; count is the total."""
        sim, url = iotda
        of_type = sorted(
            (t.task_id for t in sim.tasks if t.task_type == "firmwareUpgrade"), reverse=True
        )
        seen: list[str] = []
        marker = None
        with client(url) as c:
            while True:
                params: dict[str, Any] = {"task_type": "firmwareUpgrade", "limit": 7}
                if marker:
                    params["marker"] = marker
                body = c.get(f"/v5/iot/{PROJECT}/batchtasks", params=params).json()
                assert body["page"]["count"] == len(of_type)
                seen.extend(t["task_id"] for t in body["batchtasks"])
                if len(body["batchtasks"]) < 7:
                    break
                marker = body["page"]["marker"]
                assert marker == seen[-1]
        assert seen == of_type

    def test_unfinished_tasks_are_not_deleted(
        self, iotda: tuple[HuaweiIotdaSimulator, str]
    ) -> None:
        """Only Success, Fail, PartialSuccess and Stopped tasks may be deleted: 400 otherwise."""
        sim, url = iotda
        running = next(
            t
            for t in sim.tasks
            if t.status in ("Processing", "Waitting", "Stopping", "Initializing")
        )
        done = next(t for t in sim.tasks if t.status == "Success")
        with client(url) as c:
            refused = c.delete(f"/v5/iot/{PROJECT}/batchtasks/{running.task_id}")
            deleted = c.delete(f"/v5/iot/{PROJECT}/batchtasks/{done.task_id}")
            unknown = c.delete(f"/v5/iot/{PROJECT}/batchtasks/{'0' * 24}")
        assert refused.status_code == 400
        assert refused.json()["error_code"] == "IOTDA.014111"
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert unknown.status_code == 404
        assert sim.deleted_ids == [done.task_id]
        assert sim.refused_unfinished == [running.task_id]

    def test_acted_then_504_and_acknowledged_without_effect(
        self, iotda: tuple[HuaweiIotdaSimulator, str]
    ) -> None:
        """The same two faults on IoTDA: 504 after deleting; 204 without deleting."""
        sim, url = iotda
        done = [t for t in sim.tasks if t.status == "Success"][:2]
        with client(url) as c:
            sim.set_faults(Faults(act_then_504_rate=1.0))
            acted = c.delete(f"/v5/iot/{PROJECT}/batchtasks/{done[0].task_id}")
            sim.set_faults(Faults(ack_without_effect_rate=1.0))
            acknowledged = c.delete(f"/v5/iot/{PROJECT}/batchtasks/{done[1].task_id}")
        assert acted.status_code == 504
        assert acknowledged.status_code == 204
        assert sim.deleted_ids == [done[0].task_id]
        assert sim.acknowledged_not_done == [done[1].task_id]

    def test_instance_id(self) -> None:
        """A simulator with an instance id insists on the Instance-Id header."""
        sim = HuaweiIotdaSimulator(
            [IotdaSimTask("a" * 24, "createDevices", "Success", NOW)],
            credentials={AK: SK},
            instance_id="inst-1",
        )
        params = {"task_type": "createDevices"}
        with sim.serve() as url, client(url) as c:
            assert c.get(f"/v5/iot/{PROJECT}/batchtasks", params=params).status_code == 403
            ok = c.get(
                f"/v5/iot/{PROJECT}/batchtasks", params=params, headers={"Instance-Id": "inst-1"}
            )
        assert ok.status_code == 200
        assert ok.json()["batchtasks"][0]["create_time"] == NOW.strftime("%Y%m%dT%H%M%SZ")


class TestGenerationAndProcess:
    def test_generated_tasks(self) -> None:
        """Generated tasks are deterministic, valid, and mostly finished."""
        dcs = generate_dcs_tasks(200, seed=4, now=NOW)
        iotda = generate_iotda_tasks(200, seed=4, now=NOW)
        assert [t.id for t in dcs] == [t.id for t in generate_dcs_tasks(200, seed=4, now=NOW)]
        assert len({t.task_id for t in iotda}) == 200
        assert (
            sum(t.status in ("Success", "Fail", "PartialSuccess", "Stopped") for t in iotda) > 150
        )

    @pytest.mark.parametrize("kind", ["huawei_dcs", "huawei_iotda"])
    def test_standalone_process(self, kind: str) -> None:
        """python -m reaper.simulators KIND serves with the SK taken from the environment."""
        env = {**os.environ, "HUAWEI_SIM_SK": SK}
        path = f"/v2/{PROJECT}/tasks" if kind == "huawei_dcs" else f"/v5/iot/{PROJECT}/batchtasks"
        params = {} if kind == "huawei_dcs" else {"task_type": "firmwareUpgrade"}
        with subprocess.Popen(
            [sys.executable, "-m", "reaper.simulators", kind, "--tasks", "20", "--ak", AK],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        ) as process:
            try:
                assert process.stdout is not None
                info = json.loads(process.stdout.readline())
                with client(info["url"]) as c:
                    assert c.get(path, params=params).status_code == 200
                with client(info["url"], AkSkAuth(SecretStr(AK), SecretStr("other"))) as c:
                    assert c.get(path, params=params).status_code == 401
            finally:
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == 0
