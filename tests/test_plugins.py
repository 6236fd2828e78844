"""Target kinds from other distributions: entry points in the group ``reaper.targets``.

The built-in kinds register the same way (reaper's pyproject.toml). The worked example plugin,
examples/reaper-example-target (installed beside reaper by ``make``), is run end to end against
the data_pipeline simulator; broken plugins are throwaway distributions written into a temporary
directory (a ``.dist-info`` with ``entry_points.txt``, as pip leaves one) and put on the path.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint, distribution, distributions, entry_points
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import yaml
from conftest import sim_task
from jsonschema import Draft202012Validator
from test_cli import reaper

import reaper.targets.registry as registry_module
from reaper.audit import AuditStore, runs_table
from reaper.db import make_engine
from reaper.errors import PolicyError
from reaper.policy import load_policy_text, policy_json_schema
from reaper.runner import RunStatus, run_policy
from reaper.simulators import DataPipelineSimulator
from reaper.targets import installed_kinds
from reaper.targets.aparavi import AparaviTarget
from reaper.targets.data_pipeline import DataPipelineTarget
from reaper.targets.generic_http import GenericHttpTarget
from reaper.targets.huawei_dcs import HuaweiDcsTarget
from reaper.targets.huawei_iotda import HuaweiIotdaTarget
from reaper.targets.registry import GROUP, Registry, discover

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "reaper-example-target"
COMMITTED = ROOT / "reaper" / "schema" / "policy.schema.json"
Start = Callable[..., tuple[DataPipelineSimulator, str]]

#: The built-in kinds, as the README's table of targets lists them.
BUILTINS = {
    "aparavi": AparaviTarget,
    "data_pipeline": DataPipelineTarget,
    "generic_http": GenericHttpTarget,
    "huawei_dcs": HuaweiDcsTarget,
    "huawei_iotda": HuaweiIotdaTarget,
}


def example_installed() -> None:
    """The example plugin must be installed (``make`` does): fail, never skip, if it is not."""
    try:
        distribution("reaper-example-target")
    except Exception:  # PackageNotFoundError
        pytest.fail(
            f"the example plugin is not installed: pip install -e {EXAMPLE} (make does)",
            pytrace=False,
        )


def write_distribution(
    where: Path, name: str, kinds: dict[str, str], modules: dict[str, str] | None = None
) -> Path:
    """A distribution as pip installs one: modules, and a .dist-info declaring ``kinds``."""
    info = where / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8"
    )
    lines = "".join(f"{kind} = {value}\n" for kind, value in kinds.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}", encoding="utf-8")
    for module, source in (modules or {}).items():
        (where / f"{module}.py").write_text(source, encoding="utf-8")
    return where


def points_in(where: Path) -> list[EntryPoint]:
    """The reaper.targets entry points of the distributions in ``where``."""
    return [
        point
        for dist in distributions(path=[str(where)])
        for point in dist.entry_points
        if point.group == GROUP
    ]


def installed_with(where: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The registry of this environment with the distributions in ``where`` on the path."""
    monkeypatch.syspath_prepend(str(where))
    return discover(entry_points(group=GROUP))


BROKEN = "reaper-broken-plugin"
#: A module that needs something never installed.
MISSING_DEPENDENCY = "import not_installed_anywhere\n"


def write_broken(where: Path) -> Path:
    """The distribution reaper-broken-plugin: kind broken_kind, whose module does not import."""
    return write_distribution(
        where, BROKEN, {"broken_kind": "broken_mod:Target"}, {"broken_mod": MISSING_DEPENDENCY}
    )


class TestRegistry:
    def test_builtins_register_through_entry_points(self) -> None:
        """reaper's own distribution declares exactly the built-in kinds, each to its class."""
        declared = {
            p.name: p.value for p in distribution("reaper").entry_points if p.group == GROUP
        }
        assert sorted(declared) == sorted(BUILTINS)
        kinds = installed_kinds()
        for name, cls in BUILTINS.items():
            assert kinds.target(name) is cls
            assert kinds.kinds[name].builtin
            assert kinds.kinds[name].distribution == "reaper"

    def test_a_plugin_kind_is_usable(self) -> None:
        """The installed example plugin's kind is found, from its distribution."""
        example_installed()
        from reaper_example_target import ExamplePipelineTarget

        kind = installed_kinds().kinds["example_pipeline"]
        assert (kind.target, kind.distribution, kind.builtin) == (
            ExamplePipelineTarget,
            "reaper-example-target",
            False,
        )

    def test_import_failure_is_recorded_with_the_distribution(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A plugin that fails to import is recorded (distribution, error), logged, and the
        other kinds stay usable."""
        write_broken(tmp_path)
        with structlog.testing.capture_logs() as logs:
            kinds = installed_with(tmp_path, monkeypatch)
        problem = kinds.unusable("broken_kind")
        assert problem is not None
        assert BROKEN in problem
        assert "ModuleNotFoundError: No module named 'not_installed_anywhere'" in problem
        assert "broken_kind" not in kinds.targets
        assert kinds.target("data_pipeline") is DataPipelineTarget
        [logged] = [e for e in logs if e["event"] == "target_kind_unusable"]
        assert (logged["kind"], logged["distribution"]) == ("broken_kind", BROKEN)

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            pytest.param("def Target(): pass\n", "is not a subclass of", id="a-function"),
            pytest.param("class Target: pass\n", "is not a subclass of", id="not-a-target"),
            pytest.param(
                "from reaper.targets import Target as Base\nclass Target(Base):\n"
                "    kind = 'wrong_kind'\n",
                "does not implement delete, list_tasks",
                id="abstract",
            ),
            pytest.param(
                "from reaper.targets.data_pipeline import DataPipelineTarget\n"
                "class Target(DataPipelineTarget):\n    time_fields = ()\n",
                "Target.time_fields must name at least one timestamp field",
                id="no-time-fields",
            ),
            pytest.param(
                "from reaper.targets.data_pipeline import DataPipelineTarget\n"
                "class Target(DataPipelineTarget):\n    config_model = dict\n",
                "Target.config_model is not a subclass of reaper.targets.TargetConfig",
                id="config-not-a-model",
            ),
        ],
    )
    def test_a_class_that_is_not_a_usable_target_is_recorded(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
    ) -> None:
        """Anything but a complete Target subclass named for its kind is unusable, and says
        why; the built-ins are unaffected."""
        module = f"wrong_{tmp_path.name}"  # its own per case: sys.modules keeps each import
        write_distribution(tmp_path, BROKEN, {"wrong_kind": f"{module}:Target"}, {module: source})
        kinds = installed_with(tmp_path, monkeypatch)
        assert expected in (kinds.unusable("wrong_kind") or "")
        assert set(BUILTINS) <= set(kinds.targets)

    def test_a_subclass_of_a_builtin_needs_only_its_entry_point(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        store: AuditStore,
        data_pipeline: Start,
    ) -> None:
        """An empty subclass of the data_pipeline target, registered as acme_pipeline, is that
        kind: policies write type: acme_pipeline with data_pipeline's settings, the audit
        records the kind, and the built-in class is unchanged."""
        module = f"acme_{tmp_path.name}"
        source = (
            "from reaper.targets.data_pipeline import DataPipelineTarget\n"
            "class AcmePipeline(DataPipelineTarget): pass\n"
        )
        entry_point = {"acme_pipeline": f"{module}:AcmePipeline"}
        write_distribution(tmp_path, "acme-targets", entry_point, {module: source})
        kinds = installed_with(tmp_path, monkeypatch)
        monkeypatch.setattr(registry_module, "_current", kinds)
        acme = kinds.target("acme_pipeline")
        assert issubclass(acme, importlib.import_module(module).AcmePipeline)
        assert (acme.kind, DataPipelineTarget.kind) == ("acme_pipeline", "data_pipeline")
        now = datetime.now(UTC)
        sim, url = data_pipeline([sim_task("task_20250101_000001", now=now)])
        document = example_policy(url)
        document["target"] = {"type": "acme_pipeline", "base_url": url}
        [loaded] = load_policy_text(yaml.safe_dump(document))
        assert loaded.policy.target_class is acme
        result = asyncio.run(run_policy(loaded, store, now=now))
        assert (result.status, sim.deleted_ids) == (RunStatus.SUCCEEDED, ["task_20250101_000001"])
        with store.engine.connect() as connection:
            recorded = connection.execute(sa.select(runs_table.c.target_kind)).scalars().all()
        assert recorded == ["acme_pipeline"]
        schema = policy_json_schema()["$defs"]["AcmePipelineConfig"]
        assert schema["properties"]["type"]["const"] == "acme_pipeline"
        assert "base_url" in schema["properties"]

    def test_a_builtin_kind_cannot_be_replaced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A plugin declaring a built-in's name is refused; the built-in keeps it."""
        example_installed()
        write_distribution(
            tmp_path, "reaper-impostor", {"data_pipeline": "reaper_example_target:Anything"}
        )
        kinds = installed_with(tmp_path, monkeypatch)
        assert kinds.target("data_pipeline") is DataPipelineTarget
        [refused] = kinds.refused
        assert refused.distribution == "reaper-impostor"
        assert "'data_pipeline' is a built-in kind of reaper" in (refused.error or "")

    def test_a_kind_two_plugins_declare_is_unusable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two distributions declaring one name: neither is guessed, both are named."""
        example_installed()
        value = "reaper_example_target:ExamplePipelineTarget"
        write_distribution(tmp_path / "a", "reaper-twin-a", {"example_pipeline": value})
        write_distribution(tmp_path / "b", "reaper-twin-b", {"example_pipeline": value})
        kinds = discover([*points_in(tmp_path / "a"), *points_in(tmp_path / "b")])
        problem = kinds.unusable("example_pipeline") or ""
        assert "reaper-twin-a and reaper-twin-b both declare" in problem
        assert "example_pipeline" not in kinds.targets

    def test_the_plugin_api_is_importable_from_one_place(self) -> None:
        """reaper.targets exports what a kind is written with (README, "Writing a target")."""
        targets = importlib.import_module("reaper.targets")  # `reaper` is the CLI helper here
        documented = {
            "Target", "TargetConfig", "DeleteOptions", "Task", "ListRequest", "DeleteResult",
            "BatchResult", "Outcome", "Recheck", "RecheckRequest", "task_reader", "TargetState",
            "TaskInventory", "TrackedTask",
        }  # fmt: skip
        assert documented <= set(targets.__all__)
        assert all(hasattr(targets, name) for name in targets.__all__)

    def test_no_kinds_without_reaper_installed(self) -> None:
        """Without reaper's own entry points (a source tree, never installed), an unknown type
        says how to fix it."""
        assert "install reaper" in Registry({}).unknown()

    def test_kinds_are_loaded_on_first_use_only(self) -> None:
        """Importing reaper imports no plugin; loading a policy does."""
        example_installed()
        code = (
            "import sys, reaper, reaper.cli\n"
            "before = 'reaper_example_target' in sys.modules\n"
            "reaper.policy.policy_json_schema()\n"
            "print(before, 'reaper_example_target' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert result.stdout.split() == ["False", "True"]


class TestPolicies:
    def test_a_policy_of_a_broken_kind_names_the_distribution(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The policy naming a broken kind fails at target.type with the distribution and the
        error; a policy of another kind in the same file set still loads."""
        write_broken(tmp_path)
        monkeypatch.setattr(registry_module, "_current", installed_with(tmp_path, monkeypatch))
        text = (
            "name: p\ntarget:\n  type: broken_kind\nselect:\n  status: [done]\n  older_than: 1d\n"
        )
        with pytest.raises(PolicyError) as caught:
            load_policy_text(text)
        [error] = caught.value.errors
        assert (error.field, error.line) == ("target.type", 3)
        assert f"comes from {BROKEN} 0.1" in error.message
        assert "No module named 'not_installed_anywhere'" in error.message
        good = text.replace(
            "type: broken_kind", "type: data_pipeline\n  base_url: http://127.0.0.1:1"
        ).replace("[done]", "[completed]")
        [loaded] = load_policy_text(good)
        assert loaded.policy.target_class is DataPipelineTarget

    def test_the_schema_includes_plugin_kinds(self) -> None:
        """`reaper schema` describes the plugin's settings (an independent validator accepts
        its policy and refuses a bad id_prefix); --no-plugins is the published file."""
        example_installed()
        schema = policy_json_schema()
        config = schema["$defs"]["ExamplePipelineConfig"]
        assert config["properties"]["type"]["const"] == "example_pipeline"
        assert config["properties"]["id_prefix"]["enum"] == ["task_", "manual_"]
        validator = Draft202012Validator(schema)
        policy = {
            "name": "p",
            "target": {"type": "example_pipeline", "base_url": "http://127.0.0.1:1"},
            "select": {"status": ["completed"], "older_than": "30d"},
        }
        assert list(validator.iter_errors(policy)) == []
        policy["target"]["id_prefix"] = "job_"
        assert list(validator.iter_errors(policy)) != []
        assert (
            "ExamplePipelineConfig"
            not in policy_json_schema(installed_kinds().builtin_only())["$defs"]
        )
        published = reaper("schema", "--no-plugins")
        assert published.returncode == 0, published.stderr
        assert published.stdout == COMMITTED.read_text(encoding="utf-8")
        everything = json.loads(reaper("schema").stdout)
        assert "ExamplePipelineConfig" in everything["$defs"]


def example_policy(url: str) -> dict[str, Any]:
    return {
        "name": "scheduled-runs-30d",
        "target": {
            "type": "example_pipeline",
            "base_url": url,
            "timestamps_timezone": "UTC",
            "id_prefix": "task_",
        },
        "select": {"status": ["completed", "failed"], "older_than": "30d"},
        "delete": {"batch_size": 10, "rate": "200/s", "max_fraction": 1.0},
    }


class TestEndToEnd:
    def test_reaper_targets_lists_kinds_and_distributions(self) -> None:
        """`reaper targets` names every kind's distribution, the plugin's included."""
        example_installed()
        result = reaper("targets", "--output", "json")
        assert result.returncode == 0, result.stderr
        rows = {row["kind"]: row for row in json.loads(result.stdout)}
        assert {name: rows[name]["distribution"] for name in BUILTINS} == dict.fromkeys(
            BUILTINS, "reaper"
        )
        example = rows["example_pipeline"]
        assert (example["distribution"], example["version"], example["error"]) == (
            "reaper-example-target",
            "0.1.0",
            None,
        )
        table = reaper("targets").stdout.splitlines()
        assert any(
            line.split()[:3] == ["example_pipeline", "reaper-example-target", "0.1.0"]
            for line in table
        )

    def test_a_plugin_policy_runs_end_to_end(
        self, data_pipeline: Start, tmp_path: Path, database_url: str
    ) -> None:
        """validate, plan and run a policy of the example kind against the simulator over HTTP:
        the old scheduled tasks are deleted, the manual one and the young one are not, and the
        audit records exactly what the simulator deleted."""
        example_installed()
        now = datetime.now(UTC)
        old = [sim_task(f"task_20250101_00000{i}", age=timedelta(days=40), now=now) for i in (1, 2)]
        manual = sim_task("manual_20250101_000003", age=timedelta(days=40), now=now)
        young = sim_task("task_20250101_000004", age=timedelta(days=2), now=now)
        sim, url = data_pipeline([*old, manual, young])
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "example.yaml").write_text(yaml.safe_dump(example_policy(url)))
        env = {"REAPER_DATABASE_URL": database_url, "REAPER_POLICIES": str(tmp_path / "policies")}
        validated = reaper("validate", env=env)
        assert validated.returncode == 0, validated.stderr
        assert "scheduled-runs-30d" in validated.stdout
        assert "example_pipeline" in validated.stdout
        planned = reaper("plan", "--output", "json", env=env)
        assert planned.returncode == 0, planned.stderr
        [document] = json.loads(planned.stdout)
        assert (document["listed"], document["to_delete"]) == (3, 2)  # never the manual task
        result = reaper("run", "--output", "json", env=env)
        assert result.returncode == 0, result.stderr
        [summary] = json.loads(result.stdout)
        assert (summary["status"], summary["deleted"]) == ("succeeded", 2)
        assert sorted(sim.deleted_ids) == sorted(t.task_id for t in old)
        engine = make_engine(database_url)
        try:
            with engine.connect() as connection:
                audited = connection.execute(
                    sa.text("SELECT task_id FROM reaper_audit WHERE outcome = 'deleted'")
                ).scalars()
                kinds = connection.execute(
                    sa.text("SELECT DISTINCT target_kind FROM reaper_runs")
                ).scalars()
                assert (sorted(audited), list(kinds)) == (
                    sorted(sim.deleted_ids),
                    ["example_pipeline"],
                )
        finally:
            engine.dispose()

    def test_the_examples_own_tests_pass(self) -> None:
        """The example's tests (how to test a target against a simulator) pass as written."""
        example_installed()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
            capture_output=True,
            text=True,
            cwd=EXAMPLE,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert " passed" in result.stdout

    def test_a_broken_plugin_is_a_configuration_error_without_traceback(
        self, tmp_path: Path, data_pipeline: Start
    ) -> None:
        """validate, plan and run of a policy of a broken kind exit 2 naming the distribution and
        the error, with no traceback and nothing listed; policies of other kinds still run,
        and `reaper targets` exits 2 showing the broken entry."""
        site = write_broken(tmp_path / "site")
        pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        sim, url = data_pipeline([sim_task("task_20250101_000001", now=datetime.now(UTC))])
        policies = tmp_path / "policies"
        policies.mkdir()
        broken = {
            "name": "broken",
            "target": {"type": "broken_kind", "base_url": url},
            "select": {"status": ["completed"], "older_than": "30d"},
        }
        (policies / "broken.yaml").write_text(yaml.safe_dump(broken))
        env = {
            "PYTHONPATH": pythonpath,
            "REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "REAPER_POLICIES": str(policies),
        }
        for command in (["validate"], ["plan"], ["run"]):
            result = reaper(*command, env=env)
            assert result.returncode == 2, (command, result.stderr)
            assert f"comes from {BROKEN} 0.1" in result.stderr
            assert "No module named 'not_installed_anywhere'" in result.stderr
            assert "Traceback" not in result.stderr
        assert sim.stats["requests"] == 0
        listed = reaper("targets", env=env)
        assert listed.returncode == 2
        [line] = [row for row in listed.stdout.splitlines() if row.startswith("broken_kind")]
        assert BROKEN in line
        assert "UNUSABLE: importing it failed: ModuleNotFoundError" in line
        (policies / "broken.yaml").unlink()
        (policies / "fine.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "fine",
                    "target": {"type": "data_pipeline", "base_url": url},
                    "select": {"status": ["completed"], "older_than": "30d"},
                    "delete": {"max_fraction": 1.0},
                }
            )
        )
        fine = reaper("run", "--output", "json", env=env)
        assert fine.returncode == 0, fine.stderr
        assert json.loads(fine.stdout)[0]["deleted"] == 1
        assert "target_kind_unusable" in fine.stderr  # still said, once per process
