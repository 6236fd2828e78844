"""The published policy JSON Schema: current, valid, and accepting exactly what the loader accepts.

The schema is checked with the `jsonschema` package (an independent Draft 2020-12 validator), and
every expectation in the tables below is written from the documented rule, not computed by
either side. One caveat of the validator: Python's ``re`` lets a pattern's ``$`` match before a
final newline (ECMA-262, the schema's regex dialect, does not), so no value here ends in one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from reaper.cli import cli
from reaper.errors import PolicyError
from reaper.policy import load_policies, load_policy_text, policy_json_schema
from reaper.yamlfile import read_documents

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reaper" / "schema" / "policy.schema.json"
EXAMPLES = sorted((ROOT / "policies").glob("*.y*ml"))

BASE: dict[str, Any] = {
    "name": "nightly",
    "target": {"type": "data_pipeline", "base_url": "http://127.0.0.1:8084"},
    "select": {"status": ["completed"], "older_than": "30d"},
}


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    return Draft202012Validator(policy_json_schema())


def with_value(path: str, value: Any) -> dict[str, Any]:
    """BASE with ``value`` at the dotted ``path`` (sections created as needed)."""
    policy = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    node = policy
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return policy


def loader_accepts(policy: dict[str, Any]) -> bool:
    """Whether the policy loader accepts the policy, written out as a YAML file."""
    try:
        load_policy_text(yaml.safe_dump(policy, sort_keys=False))
    except PolicyError:
        return False
    return True


class TestPublishedSchema:
    def test_committed_file_is_what_reaper_schema_prints(self) -> None:
        """reaper/schema/policy.schema.json is byte for byte the output of `reaper schema
        --no-plugins` (reaper's own kinds, whatever plugins are installed)."""
        result = CliRunner().invoke(cli, ["schema", "--no-plugins"])
        assert result.exit_code == 0, result.output
        assert result.stdout == COMMITTED.read_text(encoding="utf-8")

    def test_schema_is_valid_draft_2020_12(self) -> None:
        """The schema itself passes the Draft 2020-12 meta-schema."""
        Draft202012Validator.check_schema(policy_json_schema())

    def test_only_json_schema_keywords(self) -> None:
        """Every keyword is one Draft 2020-12 defines (pydantic can leak its own, e.g. ``ge``,
        which a validator ignores), or the OpenAPI ``discriminator`` annotation."""
        known = set(Draft202012Validator.VALIDATORS) | {
            "$schema", "$id", "$defs", "title", "description", "default", "examples", "format",
            "discriminator",
        }  # fmt: skip
        found: set[str] = set()

        def walk(schema: dict[str, Any]) -> None:
            found.update(schema)
            for key, value in schema.items():
                if key in {"properties", "$defs", "patternProperties"}:
                    for sub in value.values():
                        walk(sub)
                elif key in {"anyOf", "oneOf", "allOf", "prefixItems"}:
                    for sub in value:
                        walk(sub)
                elif key in {"items", "additionalProperties", "not", "propertyNames"}:
                    if isinstance(value, dict):
                        walk(value)

        walk(policy_json_schema())
        assert {"pattern", "minimum", "maximum", "exclusiveMinimum", "uniqueItems"} <= found
        assert found - known == set()

    @pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
    def test_every_example_policy_validates(
        self, path: Path, validator: Draft202012Validator
    ) -> None:
        """Each policy of each example file is valid against the schema (and loads)."""
        assert load_policies([path])
        policies = []
        for document in read_documents(path.read_text(encoding="utf-8")):
            data = document.data
            policies.extend(data if isinstance(data, list) else [data])
        assert policies
        for policy in policies:
            errors = [
                f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(policy)
            ]
            assert errors == [], policy["name"]

    def test_examples_are_all_checked(self) -> None:
        """The example directory holds every target kind (a guard against an empty glob)."""
        kinds = {loaded.policy.target_config.type for loaded in load_policies(EXAMPLES)}
        assert kinds == {"data_pipeline", "huawei_dcs", "huawei_iotda", "aparavi", "generic_http"}


# (dotted field, value, accepted?) — the expectation is the documented rule for the field.
AGREEMENT: list[tuple[str, Any, bool]] = [
    # rates: a count above zero (<= 9 digits either side of the point) / a unit, or a bare number
    # of requests per second from 1e-9 up to (not including) 1e9
    ("delete.rate", "5/s", True),
    ("delete.rate", "300/m", True),
    ("delete.rate", "300/min", True),
    ("delete.rate", "1/minute", True),
    ("delete.rate", "0.5/sec", True),
    ("delete.rate", "2/second", True),
    ("delete.rate", "1000/h", True),
    ("delete.rate", "1000/hour", True),
    ("delete.rate", "0.000000001/s", True),
    ("delete.rate", "999999999/s", True),
    ("delete.rate", "007/s", True),
    ("delete.rate", 20, True),
    ("delete.rate", 0.5, True),
    ("delete.rate", 1e-9, True),
    ("delete.rate", "0/s", False),
    ("delete.rate", "0.0/min", False),
    ("delete.rate", "-1/s", False),
    ("delete.rate", "5", False),
    ("delete.rate", "5/d", False),
    ("delete.rate", "5/ms", False),
    ("delete.rate", "5/S", False),
    ("delete.rate", "5/secs", False),
    ("delete.rate", "5 / s", False),
    ("delete.rate", " 5/s", False),
    ("delete.rate", ".5/s", False),
    ("delete.rate", "5./s", False),
    ("delete.rate", "1e3/s", False),
    ("delete.rate", "1,000/h", False),
    ("delete.rate", "1000000000/s", False),
    ("delete.rate", "0.0000000001/s", False),
    ("delete.rate", "fast", False),
    ("delete.rate", 0, False),
    ("delete.rate", -1, False),
    ("delete.rate", 1e-10, False),
    ("delete.rate", 1_000_000_000, False),
    ("delete.rate", float("inf"), False),
    ("delete.rate", True, False),
    ("delete.rate", None, False),
    ("delete.rate", ["5/s"], False),
    # durations: numbers with units s, m, h, d, w, each unit at most once, within 9999w,
    # 99999d, 999999h, 9999999m, 999999999s; never a bare number
    ("select.older_than", "30d", True),
    ("select.older_than", "12h", True),
    ("select.older_than", "90m", True),
    ("select.older_than", "45s", True),
    ("select.older_than", "2w", True),
    ("select.older_than", "0s", True),
    ("select.older_than", "1w2d", True),
    ("select.older_than", "2d1w", True),
    ("select.older_than", "1d12h30m15s", True),
    ("select.older_than", "9999w99999d999999h9999999m999999999s", True),
    ("select.older_than", "", False),
    ("select.older_than", "30", False),
    ("select.older_than", "30D", False),
    ("select.older_than", "30 d", False),
    ("select.older_than", " 30d", False),
    ("select.older_than", "30 days", False),
    ("select.older_than", "1d1d", False),
    ("select.older_than", "12h1d3h", False),
    ("select.older_than", "1.5d", False),
    ("select.older_than", "-5d", False),
    ("select.older_than", "P30D", False),
    ("select.older_than", "10000w", False),
    ("select.older_than", "100000d", False),
    ("select.older_than", "1000000h", False),
    ("select.older_than", "10000000m", False),
    ("select.older_than", "1000000000s", False),
    ("select.older_than", "99999999999999999999d", False),
    ("select.older_than", "\u0663\u0660d", False),  # Arabic-Indic digits: not [0-9]
    ("select.older_than", 30, False),
    ("select.older_than", 30.0, False),
    ("select.older_than", True, False),
    ("select.older_than", None, False),
    ("target.timeout", "45s", True),
    ("target.timeout", "1m30s", True),
    ("target.timeout", "30", False),
    ("target.timeout", "1m1m", False),
    ("target.retries.backoff", "500s", True),
    ("target.retries.backoff", "0.5s", False),
    ("target.retries.max_backoff", "2m", True),
    ("target.retries.max_backoff", 120, False),
    # counts: integers as JSON means them (5.0 is 5), never a string or a boolean
    ("delete.batch_size", 1, True),
    ("delete.batch_size", 50, True),
    ("delete.batch_size", 50.0, True),
    ("delete.batch_size", None, True),
    ("delete.batch_size", 0, False),
    ("delete.batch_size", -1, False),
    ("delete.batch_size", 1.5, False),
    ("delete.batch_size", "50", False),
    ("delete.batch_size", True, False),
    ("delete.burst", 1, True),
    ("delete.burst", 1000, True),
    ("delete.burst", 0, False),
    ("delete.burst", 1001, False),
    ("delete.burst", "1", False),
    ("delete.concurrency", 256, True),
    ("delete.concurrency", None, True),
    ("delete.concurrency", 257, False),
    ("delete.concurrency", 0, False),
    ("delete.max_deletions", 1, True),
    ("delete.max_deletions", 0, False),
    ("delete.max_deletions", "1000", False),
    ("delete.anomaly.floor", 0, True),
    ("delete.anomaly.floor", -1, False),
    ("delete.anomaly.history", 1000, True),
    ("delete.anomaly.history", 1001, False),
    ("delete.anomaly.history", 0, False),
    ("keep.newest", 0, True),
    ("keep.newest", 5, True),
    ("keep.newest", -1, False),
    ("keep.newest", 5.5, False),
    ("keep.newest", "5", False),
    ("keep.newest", False, False),
    # fractions and factors: numbers, never strings or booleans
    ("delete.max_fraction", 0.5, True),
    ("delete.max_fraction", 1, True),
    ("delete.max_fraction", 0, False),
    ("delete.max_fraction", 1.5, False),
    ("delete.max_fraction", "0.5", False),
    ("delete.max_fraction", True, False),
    ("delete.anomaly.factor", 10, True),
    ("delete.anomaly.factor", 1.5, True),
    ("delete.anomaly.factor", 1, False),
    ("delete.anomaly.factor", "10", False),
    # switches: true or false only (YAML's own yes/no are booleans before either side sees them)
    ("delete.continue_on_error", True, True),
    ("delete.continue_on_error", False, True),
    ("delete.continue_on_error", "false", False),
    ("delete.continue_on_error", "yes", False),
    ("delete.continue_on_error", 0, False),
    ("delete.continue_on_error", None, False),
    ("select.allow_live", False, True),
    ("select.allow_live", "true", False),
    ("select.allow_live", 1, False),
    # names: lowercase letters, digits, '.', '_', '-', starting with a letter or digit, <= 63
    ("name", "nightly", True),
    ("name", "a", True),
    ("name", "pipeline.finished_30d-v2", True),
    ("name", "a" * 63, True),
    ("name", "a" * 64, False),
    ("name", "Nightly", False),
    ("name", "-nightly", False),
    ("name", "night ly", False),
    ("name", "", False),
    ("name", 5, False),
    # status lists: at least one in select, each status once
    ("select.status", ["completed", "failed"], True),
    ("select.status", [], False),
    ("select.status", ["completed", "completed"], False),
    ("select.status", "completed", False),
    ("select.status", [5], False),
    ("protect.status", ["pending", "in_progress"], True),
    ("protect.status", [], True),
    ("protect.status", ["pending", "pending"], False),
    ("protect.ids", ["task_20250101_000000", "task_20250101_000000"], True),
    # schedule and timezone: strings (the loader also checks them, see below); schedule optional
    ("schedule", "15 3 * * *", True),
    ("schedule", None, True),
    ("schedule", 5, False),
    ("timezone", "Asia/Shanghai", True),
    ("timezone", 8, False),
    # sections: closed, and of the right kind
    ("select.older_then", "30d", False),
    ("delete.rates", "5/s", False),
    ("keep", [], False),
    ("target.type", "jenkins", False),
]


class TestLoaderAndSchemaAgree:
    @pytest.mark.parametrize(
        ("path", "value", "accepted"),
        AGREEMENT,
        ids=[f"{path}={value!r}" for path, value, _ in AGREEMENT],
    )
    def test_value(
        self, path: str, value: Any, accepted: bool, validator: Draft202012Validator
    ) -> None:
        """The loader and the published schema both accept, or both refuse, the value."""
        policy = with_value(path, value)
        assert loader_accepts(policy) is accepted
        assert validator.is_valid(policy) is accepted

    def test_base_policy_is_valid(self, validator: Draft202012Validator) -> None:
        """The policy every row edits is valid on both sides (so a refusal is the value's)."""
        assert loader_accepts(BASE)
        assert validator.is_valid(BASE)

    @pytest.mark.parametrize(
        ("path", "value"),
        [
            ("timezone", "Mars/Olympus"),  # the tz database decides
            ("schedule", "61 3 * * *"),  # cron's ranges
            ("select.match", {"task_id": "("}),  # a regular expression that does not compile
            ("select.status", ["exploded"]),  # not a data_pipeline status
            ("select.status", ["pending"]),  # a live status, without allow_live
            ("select.age_field", "finished_at"),  # not a data_pipeline timestamp
            ("protect.status", ["completed"]),  # both selected and protected
            ("delete.batch_size", 5001),  # above data_pipeline's 5000 ids per request
        ],
    )
    def test_what_only_the_loader_can_check(
        self, path: str, value: Any, validator: Draft202012Validator
    ) -> None:
        """Rules that need the tz database, cron, a regex engine or the target kind are the
        loader's alone: the schema accepts these values, the loader refuses them."""
        policy = with_value(path, value)
        assert validator.is_valid(policy)
        assert not loader_accepts(policy)


def test_committed_schema_is_json() -> None:
    """The committed file parses as JSON and ends with a newline (as `reaper schema` prints)."""
    text = COMMITTED.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text)["$id"].endswith("policy.schema.json")
