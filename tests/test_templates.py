"""Fleet templates: one policy expanded over values written inline or in CSV, JSON or YAML files.

Expected names, values and lines are written out by hand from the documented rules (README,
"Fleets"): an instance is ``template[key]``, the key is the values joined by ``/`` in the order
the variables are written (or ``instance_key``), a matrix is every combination, the first
variable varying slowest.
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import sim_task
from jsonschema import Draft202012Validator
from sqlalchemy import select

from reaper import cli as cli_module
from reaper.audit import audit_table, ledger_table
from reaper.cli import select_policies
from reaper.db import make_engine
from reaper.errors import FieldError, PolicyError
from reaper.locks import PolicyLock
from reaper.policy import LoadedPolicy, load_policies, load_policy_text, policy_json_schema
from reaper.templates import MAX_INSTANCES

# Line numbers in the tests below refer to this text (line 1 is "- name: dcs").
DCS = """\
- name: dcs
  for_each:
    region: [cn-north-4, ap-southeast-1]
    project_id: [0123456789abcdef, fedcba9876543210]
  target:
    type: huawei_dcs
    region: ${region}
    project_id: ${project_id}
    auth: {type: aksk, ak_env: 'AK_${project_id}', sk_env: 'SK_${project_id}'}
  select: {status: [SUCCESS], older_than: 30d}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def pipeline(for_each: str, *, target: str = "base_url: '${url}'", extra: str = "") -> str:
    """A data_pipeline template whose for_each block is ``for_each`` (YAML, one line)."""
    return (
        "- name: fleet\n"
        f"  for_each: {for_each}\n"
        f"  target: {{type: data_pipeline, {target}}}\n"
        "  select: {status: [completed], older_than: 30d}\n"
        f"{extra}"
    )


def errors_of(path: Path) -> tuple[list[FieldError], str]:
    with pytest.raises(PolicyError) as caught:
        load_policies([path])
    return caught.value.errors, str(caught.value)


def names(loaded: list[LoadedPolicy]) -> list[str]:
    return [item.name for item in loaded]


class TestExpansion:
    def test_a_matrix_is_every_combination_first_variable_slowest(self) -> None:
        """2 regions x 2 projects: four instances named region/project, values substituted."""
        loaded = load_policy_text(DCS, Path("dcs.yaml"))
        assert names(loaded) == [
            "dcs[cn-north-4/0123456789abcdef]",
            "dcs[cn-north-4/fedcba9876543210]",
            "dcs[ap-southeast-1/0123456789abcdef]",
            "dcs[ap-southeast-1/fedcba9876543210]",
        ]
        last = loaded[3].policy.target_config
        assert last.describe() == (
            "https://dcs.ap-southeast-1.myhuaweicloud.com project fedcba9876543210"
        )
        auth = loaded[3].policy.model_dump()["target"]["auth"]
        assert (auth["ak_env"], auth["sk_env"]) == ("AK_fedcba9876543210", "SK_fedcba9876543210")
        assert [item.template for item in loaded] == ["dcs"] * 4
        assert loaded[1].instance is not None
        assert loaded[1].instance.values() == {
            "region": "cn-north-4",
            "project_id": "fedcba9876543210",
        }
        # One line for the template; each value's own line.
        assert {item.line for item in loaded} == {1}
        assert loaded[1].instance.bindings["project_id"].source == "dcs.yaml:4"

    def test_each_instance_is_a_policy_of_its_own(self) -> None:
        """Instances differ in name and content hash; everything not substituted is shared."""
        loaded = load_policy_text(DCS, Path("dcs.yaml"))
        assert len({item.digest for item in loaded}) == 4
        assert all(item.policy.select == loaded[0].policy.select for item in loaded)

    def test_rows_inline(self, tmp_path: Path) -> None:
        """A list of rows: one instance per row, named by its values in the row's order."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "[{site: eu, url: 'http://eu.example:8084'}, "
                "{site: us, url: 'http://us.example:8084'}]"
            ),
        )
        loaded = load_policies([path])
        assert names(loaded) == [
            "fleet[eu/http://eu.example:8084]",
            "fleet[us/http://us.example:8084]",
        ]

    def test_instance_key_names_the_instances(self, tmp_path: Path) -> None:
        """instance_key picks what goes between the brackets."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "[{site: eu, url: 'http://eu.example:8084'}, "
                "{site: us, url: 'http://us.example:8084'}]",
                extra="  instance_key: '${site}'\n",
            ),
        )
        loaded = load_policies([path])
        assert names(loaded) == ["fleet[eu]", "fleet[us]"]
        assert str(loaded[1].policy.target_config.base_url) == "http://us.example:8084/"

    def test_rows_from_csv(self, tmp_path: Path) -> None:
        """A CSV file of rows: the header names the variables, each line is an instance."""
        write(
            tmp_path,
            "sites.csv",
            """\
            site,url
            eu,http://eu.example:8084

            us,http://us.example:8084
            """,
        )
        path = write(tmp_path, "p.yaml", pipeline("sites.csv", extra="  instance_key: ${site}\n"))
        loaded = load_policies([path])
        assert names(loaded) == ["fleet[eu]", "fleet[us]"]
        assert loaded[1].instance is not None
        assert loaded[1].instance.bindings["url"].source == f"{tmp_path / 'sites.csv'}:4"

    def test_csv_with_a_byte_order_mark(self, tmp_path: Path) -> None:
        """A spreadsheet's byte-order mark is not part of the first column's name."""
        (tmp_path / "sites.csv").write_bytes(b"\xef\xbb\xbfurl\nhttp://eu.example:8084\n")
        path = write(tmp_path, "p.yaml", pipeline("sites.csv"))
        assert names(load_policies([path])) == ["fleet[http://eu.example:8084]"]

    def test_rows_from_json_and_yaml(self, tmp_path: Path) -> None:
        """JSON and YAML values files are lists of rows; a source names the item's line."""
        write(
            tmp_path,
            "sites.json",
            '[\n  {"site": "eu", "url": "http://eu.example:8084"},\n'
            '  {"site": "us", "url": "http://us.example:8084"}\n]\n',
        )
        write(
            tmp_path,
            "sites.yml",
            """\
            - site: ap
              url: http://ap.example:8084
            """,
        )
        path = write(
            tmp_path,
            "p.yaml",
            pipeline("sites.json", extra="  instance_key: ${site}\n")
            + pipeline("sites.yml", extra="  instance_key: ${site}\n").replace("fleet", "more"),
        )
        loaded = load_policies([path])
        assert names(loaded) == ["fleet[eu]", "fleet[us]", "more[ap]"]
        sources = [item.instance.bindings["url"].source for item in loaded if item.instance]
        assert sources == [
            f"{tmp_path / 'sites.json'}:2",
            f"{tmp_path / 'sites.json'}:3",
            f"{tmp_path / 'sites.yml'}:1",
        ]

    def test_a_matrix_column_from_a_file(self, tmp_path: Path) -> None:
        """{file, column} takes one column of a CSV; a one-column CSV needs no column."""
        write(tmp_path, "projects.csv", "project_id,owner\n0123456789abcdef,a\nfedcba98,b\n")
        write(tmp_path, "regions.csv", "region\ncn-north-4\n")
        text = DCS.replace("[cn-north-4, ap-southeast-1]", "{file: regions.csv}").replace(
            "[0123456789abcdef, fedcba9876543210]",
            "{file: projects.csv, column: project_id}",
        )
        path = write(tmp_path, "dcs.yaml", text)
        assert names(load_policies([path])) == [
            "dcs[cn-north-4/0123456789abcdef]",
            "dcs[cn-north-4/fedcba98]",
        ]

    def test_a_matrix_column_from_a_yaml_list(self, tmp_path: Path) -> None:
        """A YAML list of plain values is one variable's values."""
        write(tmp_path, "regions.yaml", "- cn-north-4\n- ap-southeast-1\n")
        path = tmp_path / "policies" / "dcs.yaml"
        path.parent.mkdir()
        # Relative to the policy file's directory.
        write(
            path.parent,
            "dcs.yaml",
            DCS.replace("[cn-north-4, ap-southeast-1]", "{file: ../regions.yaml}"),
        )
        assert len(load_policies([path])) == 4

    def test_a_whole_placeholder_keeps_the_value_type(self, tmp_path: Path) -> None:
        """`page_size: ${size}` with a YAML number is that number."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "[{url: 'http://a.example', size: 50}, {url: 'http://b.example', size: 20}]",
                target="base_url: '${url}', page_size: '${size}'",
            ),
        )
        sizes = [item.policy.model_dump()["target"]["page_size"] for item in load_policies([path])]
        assert sizes == [50, 20]

    def test_description_and_delete_options_are_substituted(self, tmp_path: Path) -> None:
        """Placeholders also work in description and delete.options; $${ is a literal ${."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "{url: ['http://a.example']}",
                extra="  description: 'cleans ${url}, not $${url}'\n"
                "  delete: {options: {delete_database_records: true}}\n",
            ),
        )
        [item] = load_policies([path])
        assert item.policy.description == "cleans http://a.example, not ${url}"

    def test_a_policy_without_for_each_is_untouched(self) -> None:
        """Only templates substitute: a plain policy keeps a '${' in its description."""
        text = (
            "name: plain\ndescription: 'costs ${5}'\n"
            "target: {type: data_pipeline, base_url: 'http://127.0.0.1:8084'}\n"
            "select: {status: [completed], older_than: 30d}\n"
        )
        [item] = load_policy_text(text)
        assert (item.name, item.policy.description, item.template) == ("plain", "costs ${5}", None)


class TestMistakes:
    """Every mistake is a PolicyError naming the file, line, policy and field (exit 2)."""

    def test_unknown_placeholder(self, tmp_path: Path) -> None:
        """A misspelt variable is reported once, at its field, with the variables there are."""
        path = write(tmp_path, "dcs.yaml", DCS.replace("region: ${region}", "region: ${regoin}"))
        errors, rendered = errors_of(path)
        assert [(e.field, e.line, e.policy) for e in errors] == [("target.region", 7, "dcs")]
        assert errors[0].message == "unknown variable ${regoin}; for_each gives: project_id, region"
        assert f"{path}:7:13: policy 'dcs' field 'target.region': unknown variable" in rendered

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("${region", "a placeholder '${' is not closed with '}'"),
            ("${ region }", "'${ region }' is not a variable name"),
        ],
    )
    def test_malformed_placeholders(self, tmp_path: Path, text: str, message: str) -> None:
        """An unclosed or badly named placeholder is an error at its field."""
        path = write(
            tmp_path,
            "dcs.yaml",
            DCS.replace("region: ${region}", f"region: '{text}-x-${{region}}'"),
        )
        errors, _ = errors_of(path)
        assert [(e.field, e.line, e.message) for e in errors] == [("target.region", 7, message)]

    def test_placeholders_outside_target_are_refused(self, tmp_path: Path) -> None:
        """select, keep, protect, schedule...: every instance means the same there."""
        path = write(
            tmp_path,
            "dcs.yaml",
            DCS.replace("older_than: 30d}", "older_than: 30d, match: {name: '${region}'}}"),
        )
        errors, _ = errors_of(path)
        assert [(e.field, e.line) for e in errors] == [("select.match.name", 10)]
        assert errors[0].message.startswith(
            "placeholders are replaced only in target, description and delete.options"
        )

    def test_two_instances_with_one_target(self, tmp_path: Path) -> None:
        """Instances that differ only in name would repeat each other's work: refused, with a
        hint when a variable is not used in target."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "{url: ['http://a.example'], team: [a, b]}", extra="  description: for ${team}\n"
            ),
        )
        errors, _ = errors_of(path)
        assert [(e.field, e.line, e.policy) for e in errors] == [("for_each", 2, "fleet")]
        assert errors[0].message == (
            "instances 'fleet[http://a.example/a]' and 'fleet[http://a.example/b]' have the same "
            "target (target does not use 'team'): the second would only repeat the first one's "
            "work"
        )
        rows = pipeline(
            "[{site: eu, url: 'http://a.example'}, {site: us, url: 'http://a.example'}]",
            extra="  instance_key: ${site}\n",
        )
        errors, _ = errors_of(write(tmp_path, "p.yaml", rows))
        assert [e.message for e in errors] == [
            "instances 'fleet[eu]' and 'fleet[us]' have the same target (target does not use "
            "'site'): the second would only repeat the first one's work"
        ]

    def test_a_bad_value_names_the_values_file_and_line(self, tmp_path: Path) -> None:
        """A value that fails validation is reported at the field, with the file and line the
        value came from; a mistake every instance shares is reported once, for the template."""
        write(tmp_path, "projects.csv", "project_id\n0123456789abcdef\nnot_a_project\n")
        text = DCS.replace("[0123456789abcdef, fedcba9876543210]", "{file: projects.csv}").replace(
            "older_than: 30d", "older_than: 30x"
        )
        path = write(tmp_path, "dcs.yaml", text)
        errors, rendered = errors_of(path)
        csv = tmp_path / "projects.csv"
        assert [(e.field, e.line, e.policy) for e in errors] == [
            ("select.older_than", 10, "dcs"),
            ("target.project_id", 8, "dcs[cn-north-4/not_a_project]"),
            ("target.project_id", 8, "dcs[ap-southeast-1/not_a_project]"),
        ]
        assert errors[1].message.endswith(f"(the value of ${{project_id}} from {csv}:3)")
        assert "pattern" in errors[1].message
        assert f"{path}:8:17: policy 'dcs[cn-north-4/not_a_project]' field" in rendered

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            ("project_id\n0123456789abcdef\n\n,\n", ":4: 2 fields where the header has 1"),
            ('project_id\n0123456789abcdef\n""\n', ":3 (project_id): the value is missing"),
            (
                "project_id\n 0123456789abcdef\n",
                ":2 (project_id): the value ' 0123456789abcdef' has spaces",
            ),
            ("project_id,project_id\na,b\n", ":1: a column name appears twice in the header"),
            ("2nd\na\n", ":1: '2nd' is not a variable name"),
            ("", ": the file is empty: a CSV values file starts with a header"),
            ('project_id\n"abc\n', ": not valid CSV"),
        ],
        ids=["fields", "empty-value", "spaces", "duplicate-column", "bad-name", "empty", "quote"],
    )
    def test_a_broken_csv_file(self, tmp_path: Path, content: str, message: str) -> None:
        """CSV mistakes name the values file and line, at the for_each entry that reads it."""
        (tmp_path / "projects.csv").write_text(content, encoding="utf-8")
        path = write(
            tmp_path,
            "dcs.yaml",
            DCS.replace("[0123456789abcdef, fedcba9876543210]", "{file: projects.csv}"),
        )
        errors, _ = errors_of(path)
        assert [(e.field, e.line, e.policy) for e in errors] == [
            ("for_each.project_id.file", 4, "dcs")
        ]
        assert errors[0].message.startswith(str(tmp_path / "projects.csv"))
        assert message in errors[0].message

    @pytest.mark.parametrize(
        ("name", "content", "message"),
        [
            (
                "rows.json",
                '[\n  {"url": "http://a"},\n  {"url": }\n]\n',
                "rows.json:3: not valid JSON",
            ),
            (
                "rows.yaml",
                "- url: http://a\n  url: http://b\n",
                "rows.yaml:2: not valid YAML: duplicate key",
            ),
            ("rows.yaml", "url: http://a\n", "rows.yaml:1: a values file holds a list"),
            ("rows.yaml", "- url: http://a\n- site: b\n", "rows.yaml:2: this row has site"),
            (
                "rows.yaml",
                "- url: http://a\n- url: null\n",
                "rows.yaml:2 (url): the value is missing",
            ),
            ("rows.yaml", "- url: [http://a]\n", "rows.yaml:1 (url): a value must be a string"),
            ("rows.txt", "url\n", "rows.txt: a values file ends in .csv, .json, .yaml or .yml"),
            ("rows.csv", None, "cannot read the values file"),
        ],
        ids=[
            "json",
            "yaml-duplicate",
            "not-a-list",
            "other-variables",
            "null",
            "nested",
            "suffix",
            "missing",
        ],
    )
    def test_a_broken_rows_file(
        self, tmp_path: Path, name: str, content: str | None, message: str
    ) -> None:
        """Rows files are read strictly: file and line in the message, at the for_each line."""
        if content is not None:
            (tmp_path / name).write_text(content, encoding="utf-8")
        path = write(tmp_path, "p.yaml", pipeline(name))
        errors, _ = errors_of(path)
        assert [(e.field, e.line, e.policy) for e in errors] == [("for_each", 2, "fleet")]
        assert message in errors[0].message

    def test_duplicate_instance_names(self, tmp_path: Path) -> None:
        """Two rows giving one name are refused, naming where both came from."""
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                "[{site: eu, url: 'http://a.example'}, {site: eu, url: 'http://b.example'}]",
                extra="  instance_key: ${site}\n",
            ),
        )
        errors, _ = errors_of(path)
        assert [(e.field, e.line) for e in errors] == [("for_each", 2)]
        assert errors[0].message == (
            f"two instances are named 'fleet[eu]': values from {path}:2 and from {path}:2"
        )

    def test_a_key_names_cannot_hold(self, tmp_path: Path) -> None:
        """A value with characters outside letters, digits and . _ - / : @ cannot name an
        instance (brackets, spaces and glob characters would make names ambiguous)."""
        path = write(tmp_path, "p.yaml", pipeline("{url: ['http://a.example/?q=[1]']}"))
        errors, _ = errors_of(path)
        assert [(e.field, e.line) for e in errors] == [("for_each", 2)]
        assert errors[0].message.startswith("instance key 'http://a.example/?q=[1]' (values from")

    def test_many_bad_rows_are_counted_not_listed(self, tmp_path: Path) -> None:
        """A mistake in a column of a long file: the first 20 are named, the rest counted."""
        rows = "".join(f"{i},http://a{i}.example/?q=[{i}]\n" for i in range(25))
        write(tmp_path, "fleet.csv", "n,url\n" + rows)
        errors, _ = errors_of(write(tmp_path, "p.yaml", pipeline("fleet.csv")))
        assert len(errors) == 21
        assert errors[0].message.startswith("instance key '0/http://a0.example/?q=[0]'")
        assert errors[-1].message == "... and 5 more like these"

    def test_an_instance_name_longer_than_the_audit_column(self, tmp_path: Path) -> None:
        """reaper_runs.policy holds 128 characters: a longer instance name is refused."""
        long_url = "http://a.example/" + "x" * 120
        path = write(tmp_path, "p.yaml", pipeline(f"{{url: ['{long_url}']}}"))
        errors, _ = errors_of(path)
        assert [(e.field, e.line) for e in errors] == [("for_each", 2)]
        assert "is longer than 128 characters" in errors[0].message

    def test_an_empty_expansion(self, tmp_path: Path) -> None:
        """A template that expands to nothing is a mistake, not an empty fleet."""
        (tmp_path / "none.csv").write_text("url\n", encoding="utf-8")
        for for_each, field in (
            ("[]", "for_each"),
            ("{url: []}", "for_each.url"),
            ("none.csv", "for_each"),
        ):
            path = write(tmp_path, "p.yaml", pipeline(for_each))
            errors, _ = errors_of(path)
            assert [(e.field, e.line) for e in errors] == [(field, 2)], for_each
            assert "no instance" in errors[0].message or "holds no rows" in errors[0].message

    def test_a_matrix_too_large(self, tmp_path: Path) -> None:
        """Three lists of 22 are 10,648 combinations: above the bound, refused before expanding."""
        values = json.dumps([f"v{i}" for i in range(22)])
        path = write(
            tmp_path,
            "p.yaml",
            pipeline(
                f"{{a: {values}, b: {values}, c: {values}}}",
                target="base_url: 'http://${a}.${b}.${c}.example'",
            ),
        )
        errors, _ = errors_of(path)
        assert errors[0].message == (
            f"the matrix has 10648 combinations; at most {MAX_INSTANCES} instances per template "
            "(list the combinations you need as rows)"
        )

    def test_instance_key_without_for_each(self, tmp_path: Path) -> None:
        """instance_key alone makes a template without values: for_each is required."""
        text = pipeline("x").replace("  for_each: x\n", "  instance_key: '${x}'\n")
        errors, _ = errors_of(write(tmp_path, "p.yaml", text))
        assert [e.field for e in errors] == ["for_each"]
        assert errors[0].message.startswith("a template needs for_each")

    def test_a_template_and_a_policy_with_one_name(self, tmp_path: Path) -> None:
        """--policy NAME selects a template's instances, so no policy may share its name."""
        plain = (
            "- name: fleet\n  target: {type: data_pipeline, base_url: 'http://x.example'}\n"
            "  select: {status: [completed], older_than: 30d}\n"
        )
        write(tmp_path, "a.yaml", plain)
        write(tmp_path, "b.yaml", pipeline("{url: ['http://a.example']}"))
        errors, rendered = errors_of(tmp_path)
        assert [(e.field, e.policy) for e in errors] == [("name", "fleet")]
        assert "a template and a policy are both named 'fleet'" in rendered


class TestSelection:
    """--policy: exact names, template names, and patterns where only * and ? are special."""

    @pytest.fixture
    def loaded(self, tmp_path: Path) -> list[LoadedPolicy]:
        write(
            tmp_path,
            "p.yaml",
            DCS + "- name: dcsc\n  target: {type: data_pipeline, base_url: 'http://x.example'}\n"
            "  select: {status: [completed], older_than: 30d}\n",
        )
        return load_policies([tmp_path / "p.yaml"])

    @pytest.mark.parametrize(
        ("patterns", "expected"),
        [
            (["dcs"], [0, 1, 2, 3]),
            (["dcs[*"], [0, 1, 2, 3]),
            (["dcs*"], [0, 1, 2, 3, 4]),
            (["dcs[cn-north-4/*]"], [0, 1]),
            (["dcs[*/fedcba9876543210]"], [1, 3]),
            (["dcs[ap-southeast-1/0123456789abcdef]"], [2]),
            (["dcs[c]"], []),  # fnmatch would read [c] as a class and pick dcsc
            (["dcsc"], [4]),
            (["dcs[??-north-4/0123456789abcdef]"], [0]),
            (["dcsc", "dcs[cn-north-4/*]"], [0, 1, 4]),
        ],
    )
    def test_patterns(
        self, loaded: list[LoadedPolicy], patterns: list[str], expected: list[int]
    ) -> None:
        """Each pattern selects exactly the policies listed, in load order."""
        selected, unmatched = select_policies(loaded, patterns)
        assert selected == [loaded[i] for i in expected]
        assert unmatched == ([] if expected else patterns)

    def test_unmatched_pattern_exits_2(self, loaded: list[LoadedPolicy], tmp_path: Path) -> None:
        """A --policy that selects nothing stops the run before anything is touched."""
        result = CliRunner().invoke(
            cli_module.cli,
            ["run", "--policies", str(tmp_path / "p.yaml"), "--policy", "dcs[eu-*"],
            env={"REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}"},
        )
        assert result.exit_code == 2
        assert "no policy named 'dcs[eu-*'; known: dcs[*], dcsc" in result.stderr
        assert not (tmp_path / "audit.db").exists()


class TestValidate:
    def test_the_table_shows_each_instance_with_its_values(self, tmp_path: Path) -> None:
        """`reaper validate` prints the template once, then every instance and its values."""
        path = write(tmp_path, "dcs.yaml", DCS)
        result = CliRunner().invoke(cli_module.cli, ["validate", str(path)])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines == [
            f"ok  dcs  ({path}:1, huawei_dcs): a template of 4 instance(s)",
            f"      dcs[cn-north-4/0123456789abcdef]      region=cn-north-4  "
            f"project_id=0123456789abcdef  ({path}:3, {path}:4)",
            f"      dcs[cn-north-4/fedcba9876543210]      region=cn-north-4  "
            f"project_id=fedcba9876543210  ({path}:3, {path}:4)",
            f"      dcs[ap-southeast-1/0123456789abcdef]  region=ap-southeast-1  "
            f"project_id=0123456789abcdef  ({path}:3, {path}:4)",
            f"      dcs[ap-southeast-1/fedcba9876543210]  region=ap-southeast-1  "
            f"project_id=fedcba9876543210  ({path}:3, {path}:4)",
            "    no schedule: runs only when `reaper run` is started",
        ]

    def test_json_has_one_entry_per_instance(self, tmp_path: Path) -> None:
        """JSON: each instance has its name, its template's name and its values."""
        path = write(tmp_path, "dcs.yaml", DCS)
        result = CliRunner().invoke(cli_module.cli, ["validate", "--output", "json", str(path)])
        assert result.exit_code == 0, result.output
        entries = json.loads(result.stdout)
        assert entries[2] == {
            "name": "dcs[ap-southeast-1/0123456789abcdef]",
            "schedule": None,
            "timezone": "UTC",
            "next_runs": [],
            "template": "dcs",
            "values": {"region": "ap-southeast-1", "project_id": "0123456789abcdef"},
        }

    def test_a_broken_values_file_exits_2(self, tmp_path: Path) -> None:
        """validate exits 2 and names the values file and line."""
        write(tmp_path, "projects.csv", "project_id\nabc,def\n")
        path = write(
            tmp_path,
            "dcs.yaml",
            DCS.replace("[0123456789abcdef, fedcba9876543210]", "{file: projects.csv}"),
        )
        result = CliRunner().invoke(cli_module.cli, ["validate", str(path)])
        assert result.exit_code == 2
        assert (
            f"{path}:4:24: policy 'dcs' field 'for_each.project_id.file': "
            f"{tmp_path / 'projects.csv'}:2: 2 fields where the header has 1"
        ) in result.stderr


class TestRuns:
    """Each instance runs as a policy of its own: run, lock, ledger slot, audit rows, metrics."""

    def test_instances_run_against_their_own_targets(
        self, tmp_path: Path, data_pipeline: Any
    ) -> None:
        """A template over two simulators deletes in each exactly its own old tasks."""
        now = datetime.now(UTC)
        sims = []
        rows = []
        for site in ("eu", "us"):
            tasks = [
                sim_task(f"task_20260901_{i:06d}", age=timedelta(days=40 + i), now=now)
                for i in range(3)
            ] + [sim_task("task_20261201_000001", age=timedelta(days=1), now=now)]
            sim, url = data_pipeline(tasks)
            sims.append(sim)
            rows.append(f"{site},{url}")
        write(tmp_path, "sites.csv", "site,url\n" + "\n".join(rows) + "\n")
        write(
            tmp_path,
            "p.yaml",
            pipeline(
                "sites.csv",
                target="base_url: '${url}', timestamps_timezone: UTC",
                extra="  instance_key: ${site}\n  schedule: '0 * * * *'\n"
                "  delete: {batch_size: 10, rate: 200/s, max_fraction: 1.0}\n",
            ),
        )
        database = tmp_path / "audit.db"
        env = {
            "REAPER_DATABASE_URL": f"sqlite:///{database}",
            "REAPER_METRICS_FILE": str(tmp_path / "reaper.prom"),
        }
        runner = CliRunner()
        args = ["run", "--policies", str(tmp_path / "p.yaml"), "--output", "json"]
        result = runner.invoke(cli_module.cli, [*args, "--slot", "auto"], env=env)
        assert result.exit_code == 0, result.output
        runs = json.loads(result.stdout)
        assert [(r["policy"], r["deleted"]) for r in runs] == [("fleet[eu]", 3), ("fleet[us]", 3)]
        for sim in sims:
            assert sorted(sim.deleted_ids) == [f"task_20260901_{i:06d}" for i in range(3)]
        engine = make_engine(f"sqlite:///{database}")
        with engine.connect() as connection:
            audit = connection.execute(select(audit_table.c.policy)).scalars().all()
            ledger = connection.execute(select(ledger_table.c.policy)).scalars().all()
        engine.dispose()
        assert sorted(audit) == ["fleet[eu]"] * 3 + ["fleet[us]"] * 3
        assert sorted(ledger) == ["fleet[eu]", "fleet[us]"]
        metrics = (tmp_path / "reaper.prom").read_text(encoding="utf-8")
        assert 'reaper_runs_total{policy="fleet[us]",status="succeeded"} 1.0' in metrics
        # The same slot again: each instance's slot is taken.
        again = runner.invoke(cli_module.cli, [*args, "--slot", "auto"], env=env)
        assert again.exit_code == 0, again.output
        assert [r["status"] for r in json.loads(again.stdout)] == ["skipped", "skipped"]
        # One instance by name.
        only = runner.invoke(cli_module.cli, [*args, "--policy", "fleet[eu]"], env=env)
        assert [r["policy"] for r in json.loads(only.stdout)] == ["fleet[eu]"]

    def test_the_summary_table_prints_instance_names_as_written(
        self, tmp_path: Path, data_pipeline: Any
    ) -> None:
        """Brackets in a name are not read as console markup."""
        _, url = data_pipeline([])
        write(
            tmp_path,
            "p.yaml",
            pipeline(f"{{url: ['{url}']}}", extra="  instance_key: cn-north-4\n"),
        )
        result = CliRunner().invoke(
            cli_module.cli,
            ["run", "--dry-run", "--policies", str(tmp_path / "p.yaml")],
            env={"REAPER_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}"},
        )
        assert result.exit_code == 0, result.output
        assert "fleet[cn-north-4]" in result.stdout

    def test_similar_instance_names_have_separate_sqlite_locks(self, tmp_path: Path) -> None:
        """'p[a/b]' and 'p[a_b]' clean up to one file name; their locks stay apart."""
        engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
        first, second = PolicyLock(engine, "p[a/b]"), PolicyLock(engine, "p[a_b]")
        try:
            assert first.acquire()
            assert second.acquire()
            assert not PolicyLock(engine, "p[a/b]").acquire()
        finally:
            first.release()
            second.release()
            engine.dispose()


ROOT = Path(__file__).resolve().parent.parent
PROJECTS = "project_id\n0123456789abcdef0123456789abcdef\nfedcba9876543210fedcba9876543210\n"


class TestExamples:
    """The templates the documentation shows load as they are written."""

    def test_the_commented_example_in_huawei_dcs_yaml(self, tmp_path: Path) -> None:
        """policies/huawei_dcs.yaml's commented template, uncommented: 2 regions x 2 projects."""
        text = (ROOT / "policies" / "huawei_dcs.yaml").read_text(encoding="utf-8")
        block = text[text.index("# - name: dcs-finished-30d") :]
        policy = "".join(line[2:] + "\n" for line in block.splitlines())
        write(tmp_path, "projects.csv", PROJECTS)
        loaded = load_policies([write(tmp_path, "dcs.yaml", policy)])
        assert (
            names(loaded)[-1] == "dcs-finished-30d[ap-southeast-1/fedcba9876543210fedcba9876543210]"
        )
        assert len(loaded) == 4

    def test_the_readme_example(self, tmp_path: Path) -> None:
        """README "Fleets": the template under "Templates" expands to 2 x 2 instances."""
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        section = readme[readme.index("### Templates") :]
        policy = section[section.index("```yaml\n") + 8 : section.index("```\n")]
        write(tmp_path, "projects.csv", PROJECTS)
        loaded = load_policies([write(tmp_path, "dcs.yaml", policy)])
        assert names(loaded)[0] == "dcs-finished-30d[cn-north-4/0123456789abcdef0123456789abcdef]"
        assert len(loaded) == 4


class TestSchema:
    """The published JSON Schema (checked by the jsonschema package) knows the template keys."""

    @pytest.mark.parametrize(
        ("for_each", "valid"),
        [
            ({"url": ["http://a.example", "http://b.example"]}, True),
            ({"url": {"file": "urls.csv", "column": "url"}}, True),
            ([{"site": "eu", "url": "http://a.example"}], True),
            ("fleet.csv", True),
            ("fleet.txt", False),
            ({"url": []}, False),
            ({"url": {"file": "urls.csv", "sheet": 1}}, False),
            ({"2url": ["http://a.example"]}, False),
            ([], False),
            (5, False),
        ],
    )
    def test_for_each(self, for_each: Any, valid: bool) -> None:
        """Matrix, rows and file forms pass; the shapes the loader refuses fail."""
        policy = {
            "name": "fleet",
            "for_each": for_each,
            "instance_key": "${url}",
            "target": {"type": "data_pipeline", "base_url": "${url}"},
            "select": {"status": ["completed"], "older_than": "30d"},
        }
        assert Draft202012Validator(policy_json_schema()).is_valid(policy) is valid
