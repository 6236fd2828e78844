"""Loading policy files strictly: every mistake is named by file, line, policy and field."""

from __future__ import annotations

import re
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reaper import cli as cli_module
from reaper.errors import FieldError, PolicyError
from reaper.policy import (
    LoadedPolicy,
    load_policies,
    load_policy_text,
    policy_files,
    policy_json_schema,
)
from reaper.targets import installed_kinds
from reaper.targets.data_pipeline import DataPipelineConfig
from reaper.yamlfile import read_documents

EXAMPLES = Path(__file__).resolve().parent.parent / "policies"
PATH = Path("policies/nightly.yaml")
DURATION_PATTERN = (
    r"^(?!.*w.*w)(?!.*d.*d)(?!.*h.*h)(?!.*m.*m)(?!.*s.*s)"
    r"([0-9]{1,4}w|[0-9]{1,5}d|[0-9]{1,6}h|[0-9]{1,7}m|[0-9]{1,9}s)+$"
)

# Line numbers below refer to this text.
VALID = """\
name: nightly
schedule: "15 3 * * *"
target:
  type: data_pipeline
  base_url: http://127.0.0.1:8084
select:
  status: [completed]
  older_than: 30d
  match: {task_id: "^task_"}
protect:
  status: [failed]
delete:
  batch_size: 50
  options: {delete_database_records: false}
"""


def small(name: str, older_than: str = "30d") -> str:
    """A minimal valid policy as flow-style YAML, three lines long."""
    return (
        f"name: {name}\n"
        "target: {type: data_pipeline, base_url: 'http://127.0.0.1:8084'}\n"
        f"select: {{status: [completed], older_than: {older_than}}}\n"
    )


def item(text: str) -> str:
    """``text`` as one item of a YAML list."""
    return "- " + textwrap.indent(text, "  ")[2:]


def edited(old: str, new: str, text: str = VALID) -> str:
    """``text`` with the one occurrence of ``old`` replaced."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def load_errors(text: str, path: Path = PATH) -> tuple[list[FieldError], str]:
    """The problems loading ``text`` reports, and the rendered message."""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, path)
    assert caught.value.path == path
    return caught.value.errors, str(caught.value)


class TestLoading:
    def test_one_policy(self) -> None:
        """A file holding one mapping loads as one policy located at line 1."""
        [loaded] = load_policy_text(VALID, PATH)
        assert isinstance(loaded, LoadedPolicy)
        assert (loaded.name, loaded.path, loaded.line) == ("nightly", PATH, 1)
        policy = loaded.policy
        assert policy.select.status == ("completed",)
        assert policy.select.older_than == timedelta(days=30)
        assert policy.select.match == {"task_id": "^task_"}
        assert policy.protect.status == ("failed",)
        assert policy.delete.batch_size == 50
        assert policy.delete.options == {"delete_database_records": False}

    def test_defaults(self) -> None:
        """Omitted sections take documented defaults; age_field defaults to the target's first."""
        [loaded] = load_policy_text(small("p"))
        policy = loaded.policy
        assert loaded.path is None
        assert policy.keep.newest == 0
        assert policy.protect.status == ()
        assert policy.protect.ids == ()
        assert policy.delete.max_deletions == 1000
        assert policy.delete.continue_on_error is True
        assert policy.delete.rate.per_second == 10.0
        assert policy.batch_size == 50
        assert policy.age_field == "created_at"
        assert policy.timezone == "UTC"
        assert policy.select.allow_live is False

    def test_list_of_policies(self) -> None:
        """A file may hold a list; each policy is located at its list item."""
        text = "# two policies\n" + item(small("a")) + item(small("b"))
        loaded = load_policy_text(text, PATH)
        assert [(item.name, item.line) for item in loaded] == [("a", 2), ("b", 5)]

    def test_several_documents(self) -> None:
        """A file may hold several YAML documents, one policy (or list) each."""
        text = small("a") + "---\n" + small("b") + "---\n" + item(small("c"))
        loaded = load_policy_text(text)
        assert [(item.name, item.line) for item in loaded] == [("a", 1), ("b", 5), ("c", 9)]

    def test_empty_documents_are_skipped(self) -> None:
        """An empty document beside a policy is ignored."""
        [loaded] = load_policy_text("---\n---\n" + small("a"))
        assert loaded.line == 3

    @pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n", "[]\n"])
    def test_a_file_without_policies_is_an_error(self, text: str) -> None:
        """A file that holds no policy at all is refused rather than silently doing nothing."""
        errors, _ = load_errors(text)
        assert errors == [FieldError("<yaml>", "the file holds no policy", 1)]

    @pytest.mark.parametrize("older_than", ["30d", "12h", "90m", "45s", "2w", "1w2d"])
    def test_duration_units(self, older_than: str) -> None:
        """older_than takes every unit s, m, h, d, w, also combined."""
        [loaded] = load_policy_text(small("p", older_than))
        expected = {
            "30d": timedelta(days=30),
            "12h": timedelta(hours=12),
            "90m": timedelta(minutes=90),
            "45s": timedelta(seconds=45),
            "2w": timedelta(weeks=2),
            "1w2d": timedelta(days=9),
        }[older_than]
        assert loaded.policy.select.older_than == expected

    def test_live_status_with_opt_in(self) -> None:
        """A live status may be selected once select.allow_live is true."""
        text = edited("status: [completed]", "status: [completed, in_progress]\n  allow_live: true")
        [loaded] = load_policy_text(text)
        assert loaded.policy.select.status == ("completed", "in_progress")
        assert loaded.policy.select.allow_live is True


class TestExamples:
    @pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.y*ml")), ids=lambda p: p.name)
    def test_every_example_file_validates(self, path: Path) -> None:
        """Each file in policies/ loads without a single problem."""
        assert load_policies([path])

    def test_the_data_pipeline_example(self) -> None:
        """The shipped example means what its comments say."""
        finished, failed = load_policies([EXAMPLES / "data_pipeline.yaml"])
        assert (finished.name, finished.line) == ("pipeline-finished-30d", 3)
        assert (failed.name, failed.line) == ("pipeline-failed-7d", 28)
        target = finished.policy.target_config
        assert isinstance(target, DataPipelineConfig)
        assert target.timestamps_timezone == "Asia/Shanghai"
        assert finished.policy.select.status == ("completed", "partial_completed")
        assert finished.policy.select.older_than == timedelta(days=30)
        assert finished.policy.keep.newest == 5
        assert finished.policy.delete.options == {"delete_database_records": False}
        assert failed.policy.age_field == "completed_at"
        assert failed.policy.protect.match == {"task_name": "(?i)keep"}
        assert failed.policy.batch_size == 100


class TestRealisticMistakes:
    @pytest.mark.parametrize(
        ("old", "new", "field", "line", "message"),
        [
            pytest.param(
                "status: [completed]",
                "status: [complete]",
                "select.status.0",
                7,
                "data_pipeline has no status 'complete'; known statuses: "
                "completed, failed, in_progress, partial_completed, pending",
                id="status-typo",
            ),
            pytest.param(
                "status: [completed]",
                "status: complete",
                "select.status",
                7,
                "Input should be a valid tuple",
                id="status-not-a-list",
            ),
            pytest.param(
                "older_than: 30d",
                "older_than: 30",
                "select.older_than",
                8,
                "a bare number (30) is ambiguous; write it with a unit, e.g. '30d'",
                id="bare-number",
            ),
            pytest.param(
                "older_than: 30d",
                "older_than: 30 days",
                "select.older_than",
                8,
                "invalid duration '30 days'; use a number and a unit, e.g. '30d', '12h', "
                "'1w2d' (units s, m, h, d, w)",
                id="duration-in-words",
            ),
            pytest.param(
                "older_than: 30d",
                "older_than: 1.5d",
                "select.older_than",
                8,
                "invalid duration '1.5d'",
                id="fractional-duration",
            ),
            pytest.param(
                "older_than: 30d",
                "older_than: 30y",
                "select.older_than",
                8,
                "invalid duration '30y'",
                id="unknown-unit",
            ),
            pytest.param(
                '"15 3 * * *"',
                '"61 3 * * *"',
                "schedule",
                2,
                "invalid cron expression '61 3 * * *'",
                id="cron-minute-61",
            ),
            pytest.param(
                '"15 3 * * *"',
                '"* * *"',
                "schedule",
                2,
                "invalid cron expression '* * *': expected 5 fields",
                id="cron-three-fields",
            ),
            pytest.param(
                '{task_id: "^task_"}',
                '{task_id: "^task_("}',
                "select.match.task_id",
                9,
                "invalid regular expression '^task_('",
                id="bad-regex",
            ),
            pytest.param(
                '{task_id: "^task_"}',
                '{job_id: "^task_"}',
                "select.match.job_id",
                9,
                "data_pipeline tasks have no field 'job_id' to match",
                id="unknown-match-field",
            ),
            pytest.param(
                "older_than: 30d\n",
                "older_than: 30d\n  age_field: finished_at\n",
                "select.age_field",
                9,
                "data_pipeline has no timestamp field 'finished_at'; use one of: "
                "created_at, started_at, completed_at, updated_at",
                id="unknown-age-field",
            ),
            pytest.param(
                "status: [failed]",
                "status: [failed, crashed]",
                "protect.status.1",
                11,
                "data_pipeline has no status 'crashed'",
                id="unknown-protected-status",
            ),
            pytest.param(
                "status: [failed]",
                "status: [completed]",
                "select.status.0",
                7,
                "status 'completed' is both selected and protected",
                id="selected-and-protected",
            ),
            pytest.param(
                "status: [completed]",
                "status: [completed, in_progress]",
                "select.status.1",
                7,
                "'in_progress' is a live status of data_pipeline (tasks still running); set "
                "select.allow_live: true if deleting running tasks is really intended",
                id="live-in-progress",
            ),
            pytest.param(
                "status: [completed]",
                "status: [pending]",
                "select.status.0",
                7,
                "'pending' is a live status of data_pipeline",
                id="live-pending",
            ),
            pytest.param(
                "status: [completed]",
                "status: [completed, completed]",
                "select.status",
                7,
                "a status is listed twice",
                id="status-twice",
            ),
            pytest.param(
                "type: data_pipeline",
                "type: jenkins",
                "target.type",
                4,
                f"unknown target type; expected one of: {', '.join(installed_kinds().targets)}",
                id="unknown-target-type",
            ),
            pytest.param(
                "http://127.0.0.1:8084",
                "127.0.0.1 port 8084",
                "target.base_url",
                5,
                "Input should be a valid URL",
                id="url-not-a-url",
            ),
            pytest.param(
                "http://127.0.0.1:8084",
                "ftp://127.0.0.1:8084",
                "target.base_url",
                5,
                "URL scheme should be 'http' or 'https'",
                id="url-scheme",
            ),
            pytest.param(
                "http://127.0.0.1:8084",
                "http://127.0.0.1:8084/?token=x",
                "target.base_url",
                5,
                "base_url must not have a query or fragment",
                id="url-query",
            ),
            pytest.param(
                "base_url: http://127.0.0.1:8084\n",
                "base_url: http://127.0.0.1:8084\n  page_size: 500\n",
                "target.page_size",
                6,
                "Input should be less than or equal to 100",
                id="page-size",
            ),
            pytest.param(
                "{delete_database_records: false}",
                "{delete_database_records: false, purge: true}",
                "delete.options.purge",
                14,
                "unknown key (check its spelling and indentation)",
                id="unknown-delete-option",
            ),
            pytest.param(
                "batch_size: 50",
                "batch_size: 1001",
                "delete.batch_size",
                13,
                "data_pipeline accepts at most 1000 id(s) per delete request",
                id="batch-too-big",
            ),
            pytest.param(
                "batch_size: 50",
                "batch_size: 0",
                "delete.batch_size",
                13,
                "Input should be greater than or equal to 1",
                id="batch-zero",
            ),
            pytest.param(
                "name: nightly\n",
                "name: nightly\ntimezone: Europe/Atlantis\n",
                "timezone",
                2,
                "unknown timezone 'Europe/Atlantis'",
                id="timezone",
            ),
            pytest.param(
                "protect:\n",
                "keep: {newest: -1}\nprotect:\n",
                "keep.newest",
                10,
                "Input should be greater than or equal to 0",
                id="negative-keep",
            ),
            pytest.param(
                '  match: {task_id: "^task_"}',
                'match: {task_id: "^task_"}',
                "match",
                9,
                "unknown key (check its spelling and indentation)",
                id="dedented-key",
            ),
        ],
    )
    def test_one_mistake(self, old: str, new: str, field: str, line: int, message: str) -> None:
        """Each mistake yields one error naming the file, line, policy and field."""
        errors, rendered = load_errors(edited(old, new))
        assert len(errors) == 1, rendered
        [error] = errors
        assert (error.field, error.line, error.policy) == (field, line, "nightly")
        assert error.message.startswith(message)
        assert rendered.startswith(f"{PATH}:{line}:{error.column}: policy 'nightly' field ")
        assert f"field '{field}': {message}" in rendered

    def test_misspelled_key(self) -> None:
        """`older_then:` is an unknown key on its line, and older_than is reported missing."""
        errors, rendered = load_errors(edited("older_than: 30d", "older_then: 30d"))
        by_field = {error.field: error for error in errors}
        assert sorted(by_field) == ["select.older_than", "select.older_then"]
        unknown = by_field["select.older_then"]
        assert (unknown.line, unknown.policy) == (8, "nightly")
        assert unknown.message == "unknown key (check its spelling and indentation)"
        missing = by_field["select.older_than"]
        assert (missing.message, missing.policy) == ("required field is missing", "nightly")
        assert f"{PATH}:8:" in rendered

    def test_missing_field_in_a_flow_mapping(self) -> None:
        """A missing field is located at the mapping it belongs in."""
        text = small("p").replace(", older_than: 30d", "")
        errors, _ = load_errors(text)
        assert errors == [FieldError("select.older_than", "required field is missing", 3, 9, "p")]

    def test_missing_section(self) -> None:
        """A policy without ``target`` names the missing field at the policy's line."""
        text = edited("target:\n  type: data_pipeline\n  base_url: http://127.0.0.1:8084\n", "")
        errors, _ = load_errors(text)
        assert [(e.field, e.line, e.policy, e.message) for e in errors] == [
            ("target", 1, "nightly", "required field is missing")
        ]

    def test_missing_target_type(self) -> None:
        """A target without ``type`` says which types exist."""
        errors, _ = load_errors(edited("  type: data_pipeline\n", ""))
        assert [(e.field, e.message) for e in errors] == [
            ("target", f"target.type is required; one of: {', '.join(installed_kinds().targets)}")
        ]

    def test_an_unknown_style_is_not_called_an_unknown_target_type(self) -> None:
        """A wrong value of a target's own tagged setting (generic_http paging.style) names that
        field, its line and the values it takes; a missing one names the key it lacks."""
        text = (EXAMPLES / "generic_http.yaml").read_text(encoding="utf-8")
        errors, _ = load_errors(edited("style: offset ", "style: offsets ", text))
        assert [(e.field, e.line, e.message) for e in errors] == [
            (
                "target.list.paging.style",
                20,
                "unknown value; expected one of: 'offset', 'page', 'cursor', 'link', 'none'",
            )
        ]
        errors, _ = load_errors(edited("style: batch ", "# style: batch ", text))
        assert [(e.field, e.message) for e in errors] == [("target.delete", "style is required")]

    def test_misspelled_section_is_reported_on_its_own_line(self) -> None:
        """`protcet:` is reported on the line where the misspelled key is written."""
        errors, _ = load_errors(edited("protect:\n", "protcet:\n"))
        [error] = errors
        assert (error.field, error.message) == (
            "protcet",
            "unknown key (check its spelling and indentation)",
        )
        assert error.line == 10

    def test_credentials_in_the_url_are_refused_without_echoing_them(self) -> None:
        """A password in base_url is refused, and the message does not repeat it."""
        errors, rendered = load_errors(
            edited("http://127.0.0.1:8084", "http://reaper:s3cret@127.0.0.1:8084")
        )
        assert [(e.field, e.line, e.message) for e in errors] == [
            ("target.base_url", 5, "credentials do not belong in base_url")
        ]
        assert "s3cret" not in rendered

    def test_every_problem_is_reported_at_once(self) -> None:
        """Several mistakes in one policy are all reported together, not just the first."""
        text = edited('"15 3 * * *"', '"* * *"')
        text = edited("batch_size: 50", "batch_size: 9999", text)
        text = edited("status: [failed]", "status: [completed]", text)
        errors, _ = load_errors(text)
        assert sorted((e.field, e.line) for e in errors) == [
            ("delete.batch_size", 13),
            ("schedule", 2),
            ("select.status.0", 7),
        ]

    def test_a_type_error_does_not_hide_other_mistakes(self) -> None:
        """A bad duration is reported together with a bad cron and a too-large batch."""
        text = edited("older_than: 30d", "older_than: 30")
        text = edited('"15 3 * * *"', '"* * *"', text)
        text = edited("batch_size: 50", "batch_size: 9999", text)
        errors, _ = load_errors(text)
        assert sorted((e.field, e.line) for e in errors) == [
            ("delete.batch_size", 13),
            ("schedule", 2),
            ("select.older_than", 8),
        ]

    def test_a_policy_that_is_not_a_mapping(self) -> None:
        """A list item that is a plain string is reported at its line."""
        errors, _ = load_errors(item(small("a")) + "- oops\n")
        assert errors == [
            FieldError("<policy>", "a policy must be a mapping of keys to values", 4, 3)
        ]

    def test_invalid_name(self) -> None:
        """Names are lowercase letters, digits and . _ -."""
        errors, _ = load_errors(edited("name: nightly", "name: Nightly Run"))
        [error] = errors
        assert (error.field, error.line, error.policy) == ("name", 1, "Nightly Run")


class TestDurations:
    @pytest.mark.parametrize(
        ("old", "new", "field", "line"),
        [
            ("older_than: 30d", "older_than: 30", "select.older_than", 8),
            (
                "base_url: http://127.0.0.1:8084\n",
                "base_url: http://127.0.0.1:8084\n  timeout: 30\n",
                "target.timeout",
                6,
            ),
            (
                "base_url: http://127.0.0.1:8084\n",
                "base_url: http://127.0.0.1:8084\n  retries: {backoff: 2}\n",
                "target.retries.backoff",
                6,
            ),
        ],
        ids=["older_than", "timeout", "retries.backoff"],
    )
    def test_every_duration_refuses_a_bare_number(
        self, old: str, new: str, field: str, line: int
    ) -> None:
        """A duration without a unit is ambiguous wherever it appears in a policy."""
        errors, _ = load_errors(edited(old, new))
        assert [(e.field, e.line) for e in errors] == [(field, line)]
        assert "bare number" in errors[0].message

    def test_target_durations_take_units(self) -> None:
        """target.timeout and retries take the same unit form as older_than."""
        text = edited(
            "base_url: http://127.0.0.1:8084\n",
            "base_url: http://127.0.0.1:8084\n  timeout: 1m\n  retries: {backoff: 2s}\n",
        )
        [loaded] = load_policy_text(text)
        assert loaded.policy.target_config.timeout == timedelta(minutes=1)
        assert loaded.policy.target_config.retries.backoff == timedelta(seconds=2)


class TestYamlMistakes:
    def test_duplicated_section_is_located(self) -> None:
        """A second ``select:`` is refused at its line, naming the first one."""
        text = VALID + "select:\n  status: [failed]\n  older_than: 7d\n"
        errors, rendered = load_errors(text)
        [error] = errors
        assert error.line == 15
        assert error.message.startswith("duplicate key 'select'")
        assert rendered.startswith(f"{PATH}:15:1: ")

    def test_duplicated_section_names_policy_and_field(self) -> None:
        """The duplicate-key error names the policy and the duplicated field, like any other."""
        text = VALID + "select:\n  status: [failed]\n  older_than: 7d\n"
        errors, _ = load_errors(text)
        [error] = errors
        assert (error.field, error.policy) == ("select", "nightly")

    def test_duplicated_nested_key(self) -> None:
        """A repeated ``older_than`` inside select is refused rather than silently overriding."""
        errors, _ = load_errors(edited("older_than: 30d\n", "older_than: 30d\n  older_than: 7d\n"))
        assert [(e.field, e.line, e.message) for e in errors] == [
            ("select.older_than", 9, "duplicate key 'older_than' (first defined on line 8)")
        ]

    def test_tab_indentation(self) -> None:
        """A tab before a key is a YAML error on that line."""
        errors, rendered = load_errors(edited("  older_than", "\tolder_than"))
        [error] = errors
        assert (error.field, error.line) == ("<yaml>", 8)
        assert "'\\t'" in error.message
        assert rendered.startswith(f"{PATH}:8:1: field '<yaml>': ")

    def test_over_indented_key(self) -> None:
        """One space too many before a key is a YAML error on that line."""
        errors, _ = load_errors(edited("  older_than", "   older_than"))
        assert [(e.field, e.line) for e in errors] == [("<yaml>", 8)]

    def test_merge_keys_are_refused(self) -> None:
        """``<<:`` merges are refused with their line."""
        text = "- &base\n" + textwrap.indent(small("a"), "  ") + "- <<: *base\n  name: b\n"
        errors, _ = load_errors(text)
        assert [(e.field, e.line, e.message) for e in errors] == [
            (
                "<yaml>",
                5,
                "merge keys ('<<') are not supported: write the keys out, or share a whole "
                "block with an alias (e.g. 'target: *pipeline')",
            )
        ]

    def test_recursive_alias_is_a_policy_error(self) -> None:
        """A self-referencing alias is a located policy error, not a crash."""
        errors, _ = load_errors(small("a") + "protect: {ids: &ids [x, *ids]}\n")
        assert [(e.field, e.line) for e in errors] == [("protect.ids", 4)]


class TestAllOrNothing:
    def test_one_bad_policy_fails_its_file(self, tmp_path: Path) -> None:
        """A file with one good and one bad policy loads neither."""
        path = tmp_path / "two.yaml"
        path.write_text("---\n" + small("good") + "---\n" + small("bad", "30"))
        with pytest.raises(PolicyError) as caught:
            load_policies([path])
        assert [(e.field, e.line, e.policy) for e in caught.value.errors] == [
            ("select.older_than", 8, "bad")
        ]
        assert str(caught.value).startswith(f"{path}:8:43: policy 'bad' ")

    def test_problems_in_several_policies_are_collected(self) -> None:
        """Every policy in a file is checked; all their problems come together."""
        text = "---\n" + small("a", "30") + "---\n" + small("b", "3x")
        errors, _ = load_errors(text)
        assert [(e.field, e.line, e.policy) for e in errors] == [
            ("select.older_than", 4, "a"),
            ("select.older_than", 8, "b"),
        ]

    def test_a_bad_file_fails_the_whole_load(self, tmp_path: Path) -> None:
        """A good file next to a bad one is not loaded either; both files are named."""
        (tmp_path / "a.yaml").write_text(small("a"))
        (tmp_path / "b.yaml").write_text(small("b", "30"))
        (tmp_path / "c.yaml").write_text("name: c\nname: c\n")
        with pytest.raises(PolicyError) as caught:
            load_policies([tmp_path])
        lines = str(caught.value).splitlines()
        assert lines == [
            f"{tmp_path / 'b.yaml'}:3:43: policy 'b' field 'select.older_than': "
            "a bare number (30) is ambiguous; write it with a unit, e.g. '30d'",
            f"{tmp_path / 'c.yaml'}:2:1: policy 'c' field 'name': "
            "duplicate key 'name' (first defined on line 1)",
        ]

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is a located problem, not a crash."""
        path = tmp_path / "latin1.yaml"
        path.write_bytes(small("caf\xe9").encode("latin-1"))
        with pytest.raises(PolicyError) as caught:
            load_policies([path])
        [error] = caught.value.errors
        assert error.field == "<file>"
        assert error.message.startswith("cannot read the file: ")

    def test_no_files(self, tmp_path: Path) -> None:
        """A directory without policy files is an error, so a wrong path cannot pass silently."""
        (tmp_path / "README.md").write_text("not a policy")
        with pytest.raises(PolicyError, match=f"no policy files found in {tmp_path}"):
            load_policies([tmp_path])


class TestPolicyFiles:
    def test_directories_expand_to_yaml_files_sorted(self, tmp_path: Path) -> None:
        """A directory means its *.yaml and *.yml files, by name; other files are ignored."""
        for name in ("b.yml", "a.yaml", "c.txt", "d.yaml.bak"):
            (tmp_path / name).write_text(small(name[0]))
        (tmp_path / "sub.yaml").mkdir()
        assert policy_files([tmp_path]) == [tmp_path / "a.yaml", tmp_path / "b.yml"]

    def test_files_are_kept_as_given(self, tmp_path: Path) -> None:
        """A file named explicitly is read whatever its suffix."""
        path = tmp_path / "policy.conf"
        path.write_text(small("conf"))
        assert policy_files([path]) == [path]
        assert [item.name for item in load_policies([path])] == ["conf"]


class TestDuplicateNames:
    def test_across_files(self, tmp_path: Path) -> None:
        """The same name in two files is an error at the second, naming the first."""
        (tmp_path / "a.yaml").write_text(small("nightly"))
        (tmp_path / "b.yaml").write_text("# again\n" + small("nightly"))
        with pytest.raises(PolicyError) as caught:
            load_policies([tmp_path])
        assert caught.value.path == tmp_path / "b.yaml"
        assert caught.value.errors == [
            FieldError(
                "name",
                f"duplicate policy name (also defined in {tmp_path / 'a.yaml'}:1)",
                line=2,
                policy="nightly",
            )
        ]

    def test_within_one_file(self, tmp_path: Path) -> None:
        """The same name twice in one file is an error too."""
        path = tmp_path / "p.yaml"
        path.write_text("---\n" + small("x") + "---\n" + small("x"))
        with pytest.raises(PolicyError) as caught:
            load_policies([path])
        assert [(e.field, e.line, e.policy) for e in caught.value.errors] == [("name", 6, "x")]

    def test_distinct_names_load_in_file_order(self, tmp_path: Path) -> None:
        """Distinct names across files all load, in sorted file order."""
        (tmp_path / "b.yaml").write_text(small("second"))
        (tmp_path / "a.yaml").write_text(small("first"))
        assert [item.name for item in load_policies([tmp_path])] == ["first", "second"]


class TestJsonSchema:
    def test_sections_are_described_and_closed(self) -> None:
        """The schema names every section and forbids unknown keys at each level."""
        schema = policy_json_schema()
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert {"name", "target", "select", "keep", "protect", "delete"} <= set(
            schema["properties"]
        )
        assert sorted(schema["required"]) == ["name", "select", "target"]
        for section in ("Select", "Keep", "Protect", "DeleteSettings", "DataPipelineConfig"):
            assert schema["$defs"][section]["additionalProperties"] is False, section

    def test_durations_are_strings_with_units(self) -> None:
        """older_than is described as a string with a unit, never a number."""
        older_than = policy_json_schema()["$defs"]["Select"]["properties"]["older_than"]
        assert older_than["type"] == "string"
        assert older_than["pattern"] == DURATION_PATTERN

    def test_duration_defaults_match_their_own_pattern(self) -> None:
        """Every duration default the schema publishes is written the way the loader reads it."""
        schema = policy_json_schema()
        defaults = {
            f"{name}.{key}": prop["default"]
            for name, definition in schema["$defs"].items()
            for key, prop in definition.get("properties", {}).items()
            if prop.get("pattern") == DURATION_PATTERN and "default" in prop
        }
        assert {
            "DataPipelineConfig.timeout",
            "RetrySettings.backoff",
            "RetrySettings.max_backoff",
        } <= set(defaults)
        unreadable = {k: v for k, v in defaults.items() if not re.fullmatch(DURATION_PATTERN, v)}
        assert unreadable == {}

    def test_examples_use_only_described_keys(self) -> None:
        """Every key in the example files is a property the schema describes."""
        schema = policy_json_schema()

        def check(value: Any, node: dict[str, Any], where: str) -> None:
            if "$ref" in node:
                node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
            if "oneOf" in node:
                # a discriminated union (target type, paging style...): pick this value's branch
                tag = node.get("discriminator", {}).get("propertyName", "type")
                kind = value.get(tag) if isinstance(value, dict) else None
                branches = [schema["$defs"][n["$ref"].rsplit("/", 1)[-1]] for n in node["oneOf"]]
                [node] = [b for b in branches if b["properties"][tag].get("const") == kind]
            if not isinstance(value, dict) or "properties" not in node:
                return
            for key, item in value.items():
                assert key in node["properties"], f"{where}.{key}"
                check(item, node["properties"][key], f"{where}.{key}")

        checked = 0
        for path in sorted(EXAMPLES.glob("*.y*ml")):
            for document in read_documents(path.read_text()):
                data = document.data if isinstance(document.data, list) else [document.data]
                for raw in data:
                    check(raw, schema, raw["name"])
                    checked += 1
        assert checked >= 2


class TestCommandLine:
    @pytest.fixture
    def runner(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
        """A CLI runner in an empty directory with a throwaway SQLite audit database."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("REAPER_DATABASE_URL", f"sqlite:///{tmp_path / 'audit.db'}")
        return CliRunner()

    @pytest.fixture
    def no_work(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """Record any attempt to reach a target or the audit database."""
        calls: list[str] = []

        def build_target(item: Any, **kwargs: Any) -> Any:
            calls.append(f"build_target {item.name}")
            raise AssertionError("a target was built")

        def store(self: Any, **kwargs: Any) -> Any:
            calls.append("store")
            raise AssertionError("the audit store was opened")

        monkeypatch.setattr(cli_module, "build_target", build_target)
        monkeypatch.setattr(cli_module.Context, "store", store)
        return calls

    def test_validate_examples(self, runner: CliRunner) -> None:
        """`reaper validate policies/` lists each policy with its location and exits 0."""
        result = runner.invoke(cli_module.cli, ["validate", str(EXAMPLES)])
        assert result.exit_code == 0, result.output
        path = EXAMPLES / "data_pipeline.yaml"
        lines = result.stdout.splitlines()
        assert f"ok  pipeline-finished-30d  ({path}:3, data_pipeline)" in lines
        assert f"ok  pipeline-failed-7d  ({path}:28, data_pipeline)" in lines
        # Each policy's line starts with "ok"; its next fire times follow, indented.
        assert all(line.startswith(("ok  ", "    ")) for line in lines)
        assert len([line for line in lines if line.startswith("ok  ")]) == len(
            load_policies([EXAMPLES])
        )

    def test_validate_reports_and_exits_2(self, runner: CliRunner, tmp_path: Path) -> None:
        """An invalid file makes `reaper validate` exit 2 with the located problem on stderr."""
        path = tmp_path / "bad.yaml"
        path.write_text(edited("status: [completed]", "status: [complete]"))
        result = runner.invoke(cli_module.cli, ["validate", str(path)])
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr.startswith("reaper: invalid policy configuration:\n")
        assert f"{path}:7:12: policy 'nightly' field 'select.status.0': " in result.stderr

    def test_validate_duplicate_names_exits_2(self, runner: CliRunner, tmp_path: Path) -> None:
        """Duplicate names across files fail validation."""
        (tmp_path / "a.yaml").write_text(small("same"))
        (tmp_path / "b.yaml").write_text(small("same"))
        result = runner.invoke(cli_module.cli, ["validate", str(tmp_path)])
        assert result.exit_code == 2
        assert "duplicate policy name" in result.stderr

    @pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
    def test_run_with_a_bad_policy_touches_nothing(
        self, runner: CliRunner, tmp_path: Path, no_work: list[str], dry_run: bool
    ) -> None:
        """`reaper run` exits 2 before any target or the audit database is touched."""
        (tmp_path / "good.yaml").write_text(small("good"))
        (tmp_path / "bad.yaml").write_text(small("bad", "30"))
        args = ["run", "--policies", str(tmp_path)] + (["--dry-run"] if dry_run else [])
        result = runner.invoke(cli_module.cli, args)
        assert result.exit_code == 2
        assert result.stderr.startswith("reaper: invalid policy configuration; nothing was run:\n")
        assert f"{tmp_path / 'bad.yaml'}:3:43: policy 'bad'" in result.stderr
        assert no_work == []
        assert not (tmp_path / "audit.db").exists()

    def test_plan_with_a_bad_policy_lists_nothing(
        self, runner: CliRunner, tmp_path: Path, no_work: list[str]
    ) -> None:
        """`reaper plan` refuses a bad policy file before listing any target."""
        path = tmp_path / "bad.yaml"
        path.write_text(VALID + "select:\n  status: [failed]\n  older_than: 7d\n")
        result = runner.invoke(cli_module.cli, ["plan", "--policies", str(path)])
        assert result.exit_code == 2
        assert f"{path}:15:1:" in result.stderr
        assert no_work == []
