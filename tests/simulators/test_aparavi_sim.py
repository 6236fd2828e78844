"""The Aparavi simulator behaves like the service: errors in 200 bodies, 401, no listing."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from reaper.simulators import AparaviSimTask, AparaviSimulator

KEY = "sim-key-0001"


@pytest.fixture
def sim() -> Iterator[tuple[AparaviSimulator, httpx.Client]]:
    simulator = AparaviSimulator([AparaviSimTask("tok", "gpu")], api_keys=[KEY])
    url = simulator.start()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield simulator, client
    simulator.stop()


class TestAparaviSimulator:
    def test_start_status_delete(self, sim: tuple[AparaviSimulator, httpx.Client]) -> None:
        """PUT starts a running task; GET reports it; DELETE cancels it, then it is not found."""
        simulator, client = sim
        started = client.put("/task", params={"name": "n"}, json={"pipeline": {}}).json()
        token, task_type = started["data"]["token"], started["data"]["type"]
        status = client.get("/task", params={"token": token, "type": task_type}).json()
        assert (status["status"], status["data"]["status"]) == ("OK", "Running")
        assert status["data"]["endTime"] is None
        deleted = client.delete("/task", params={"token": token, "type": task_type})
        assert deleted.json()["data"] == {"cancelled": True, "token": token}
        again = client.delete("/task", params={"token": token, "type": task_type})
        assert again.status_code == 200
        assert again.json() == {"status": "Error", "error": {"message": "Task not found"}}
        assert simulator.deleted_ids == [f"{task_type}:{token}"]

    def test_errors(self, sim: tuple[AparaviSimulator, httpx.Client]) -> None:
        """401 without the key (bare or bearer accepted), 422 without token/type, 404 listing."""
        _, client = sim
        assert client.get("/task", params={"token": "tok"}).status_code == 422
        bare = client.get(
            "/task", params={"token": "tok", "type": "gpu"}, headers={"Authorization": KEY}
        )
        assert bare.json()["data"]["status"] == "Completed"
        wrong = client.get(
            "/task", params={"token": "tok", "type": "gpu"}, headers={"Authorization": "x"}
        )
        assert wrong.status_code == 401
        assert client.get("/tasks").status_code == 404

    def test_refuse_completed(self, sim: tuple[AparaviSimulator, httpx.Client]) -> None:
        """Self-cleaning deployments answer 'Cannot delete completed task' in a 200."""
        simulator, client = sim
        simulator.refuse_completed = True
        answer = client.delete("/task", params={"token": "tok", "type": "gpu"}).json()
        assert answer["error"]["message"] == "Cannot delete completed task"
        assert simulator.task("gpu", "tok") is not None
