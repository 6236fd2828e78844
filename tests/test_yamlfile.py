"""Reading YAML with positions, refusing duplicate keys and merge keys, bounding aliases."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reaper.errors import PolicyError
from reaper.policy import load_policy_text
from reaper.yamlfile import YamlError, read_documents


def read_one(text: str) -> tuple[object, dict[tuple[str | int, ...], tuple[int, int]]]:
    [document] = read_documents(textwrap.dedent(text))
    return document.data, document.positions


class TestPositions:
    def test_nested_keys(self) -> None:
        """A scalar under nested mappings is located at its own line and column (1-based)."""
        [document] = read_documents(
            textwrap.dedent(
                """\
                name: nightly
                select:
                  status: [completed]
                  older_than: 30d
                """
            )
        )
        assert document.data == {
            "name": "nightly",
            "select": {"status": ["completed"], "older_than": "30d"},
        }
        assert document.position(("name",)) == (1, 7)
        assert document.position(("select", "older_than")) == (4, 15)

    def test_list_items(self) -> None:
        """Items of block and flow sequences are located by their index."""
        [document] = read_documents(
            textwrap.dedent(
                """\
                select:
                  status: [completed, failed]
                ids:
                  - task_20250101_000001
                  - task_20250101_000002
                """
            )
        )
        assert document.position(("select", "status", 0)) == (2, 12)
        assert document.position(("select", "status", 1)) == (2, 23)
        assert document.position(("ids", 0)) == (4, 5)
        assert document.position(("ids", 1)) == (5, 5)

    def test_mappings_inside_lists(self) -> None:
        """Keys of a mapping that is a list item are located below the item's index."""
        [document] = read_documents(
            textwrap.dedent(
                """\
                - name: first
                - name: second
                  keep: {newest: 5}
                """
            )
        )
        assert document.position((0,)) == (1, 3)
        assert document.position((1,)) == (2, 3)
        assert document.position((1, "name")) == (2, 9)
        assert document.position((1, "keep", "newest")) == (3, 18)

    def test_unknown_path_falls_back_to_nearest_ancestor(self) -> None:
        """A path that is not in the file (a missing field) is located at its nearest parent."""
        [document] = read_documents("select: {status: [completed]}\n")
        assert document.position(("select", "older_than")) == document.position(("select",))
        assert document.position(("select",)) == (1, 9)
        assert document.position(("nothing", "here")) == (1, 1)


class TestDuplicateKeys:
    def test_top_level_duplicate(self) -> None:
        """A second top-level key is refused at its own line, naming the first one's line."""
        with pytest.raises(YamlError) as caught:
            read_documents("name: a\nschedule: '1 2 * * *'\nname: b\n")
        assert caught.value.message == "duplicate key 'name' (first defined on line 1)"
        assert (caught.value.line, caught.value.column) == (3, 1)

    def test_nested_duplicate(self) -> None:
        """A key repeated inside a nested mapping is refused too."""
        with pytest.raises(YamlError) as caught:
            read_documents("select:\n  older_than: 30d\n  status: [a]\n  older_than: 7d\n")
        assert caught.value.message == "duplicate key 'older_than' (first defined on line 2)"
        assert (caught.value.line, caught.value.column) == (4, 3)

    def test_duplicate_in_flow_mapping(self) -> None:
        """Duplicates inside ``{...}`` are refused with the column of the second key."""
        with pytest.raises(YamlError) as caught:
            read_documents("match: {task_id: '^a', task_id: '^b'}\n")
        assert caught.value.message == "duplicate key 'task_id' (first defined on line 1)"
        assert (caught.value.line, caught.value.column) == (1, 24)

    def test_duplicate_inside_a_list_item(self) -> None:
        """A mapping that is a list item is checked like any other."""
        with pytest.raises(YamlError) as caught:
            read_documents("- name: a\n  keep: {}\n  name: b\n")
        assert caught.value.message == "duplicate key 'name' (first defined on line 1)"
        assert caught.value.line == 3

    def test_first_definition_of_a_section_is_the_key_line(self) -> None:
        """When the first value is a block below its key, 'first defined' names the key's line."""
        text = "select:\n  status: [completed]\nselect:\n  status: [failed]\n"
        with pytest.raises(YamlError) as caught:
            read_documents(text)
        assert caught.value.line == 3
        assert caught.value.message == "duplicate key 'select' (first defined on line 1)"

    def test_same_key_in_sibling_mappings_is_fine(self) -> None:
        """Equal keys in different mappings are not duplicates."""
        data, _ = read_one("select: {status: [a]}\nprotect: {status: [b]}\n")
        assert data == {"select": {"status": ["a"]}, "protect": {"status": ["b"]}}


class TestRefusedFeatures:
    def test_merge_keys(self) -> None:
        """``<<`` merges are refused, saying what to write instead, at the ``<<`` key."""
        text = "base: &b {status: [completed]}\nselect:\n  <<: *b\n  older_than: 30d\n"
        with pytest.raises(YamlError) as caught:
            read_documents(text)
        assert caught.value.message == (
            "merge keys ('<<') are not supported: write the keys out, or share a whole block "
            "with an alias (e.g. 'target: *pipeline')"
        )
        assert (caught.value.line, caught.value.column) == (3, 3)

    @pytest.mark.parametrize(
        "text", ["? [a, b]\n: 1\n", "~: 1\n", "? {a: 1}\n: 2\n"], ids=["list", "null", "mapping"]
    )
    def test_non_scalar_or_null_keys(self, text: str) -> None:
        """Keys must be plain scalars; lists, mappings and null are refused."""
        with pytest.raises(YamlError, match="mapping keys must be plain scalars") as caught:
            read_documents(text)
        assert caught.value.line == 1

    def test_python_tag_on_a_scalar(self) -> None:
        """Only safe YAML is read: a python tag on a scalar is an error, not code."""
        with pytest.raises(YamlError, match="could not determine a constructor") as caught:
            read_documents("name: x\na: !!python/name:os.system ''\n")
        assert caught.value.line == 2

    @pytest.mark.parametrize(
        "text",
        ["a: !!python/object/apply:os.system ['true']\n", "select: !defaults {status: [a]}\n"],
        ids=["python-apply-on-list", "local-tag-on-mapping"],
    )
    def test_tag_on_a_collection(self, text: str) -> None:
        """A tag on a list or mapping is refused like one on a scalar, not silently dropped."""
        with pytest.raises(YamlError) as caught:
            read_documents(text)
        assert caught.value.line == 1

    def test_recursive_alias(self) -> None:
        """An alias to its own enclosing node is a YamlError at the alias, not a crash."""
        with pytest.raises(YamlError) as caught:
            read_documents("name: x\nids: &ids [a, *ids]\n")
        assert caught.value.message == "an alias refers to itself"
        assert (caught.value.line, caught.value.column) == (2, 15)


def laughs(levels: int) -> str:
    """The "billion laughs": each anchor is a list of ten aliases to the one before it."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


class TestAliases:
    def test_plain_aliases_are_expanded(self) -> None:
        """A non-recursive alias reads as a copy of its anchor's value."""
        data, _ = read_one("a: &s [completed]\nb: *s\n")
        assert data == {"a": ["completed"], "b": ["completed"]}

    def test_a_shared_target_block(self) -> None:
        """The usual use: policies of one list file share a target block through an alias."""
        data, _ = read_one(
            """\
            - name: finished
              target: &pipeline {type: data_pipeline, base_url: "http://127.0.0.1:8084"}
            - name: failed
              target: *pipeline
            """
        )
        assert data == [
            {
                "name": "finished",
                "target": {"type": "data_pipeline", "base_url": "http://127.0.0.1:8084"},
            },
            {
                "name": "failed",
                "target": {"type": "data_pipeline", "base_url": "http://127.0.0.1:8084"},
            },
        ]

    def test_alias_as_a_key(self) -> None:
        """An alias to a scalar may be used as a mapping key."""
        data, _ = read_one("k: &k name\n*k : 2\n")
        assert data == {"k": "name", "name": 2}

    def test_billion_laughs_is_refused_at_an_alias(self) -> None:
        """Exponentially nested aliases are refused with a line, before expanding them.

        Twelve levels of ten would be 10**12 values: unbounded, this test would never end. The
        limit is 10,000 values produced by aliases: lines 2 and 3 produce 10 x 11 and 10 x 111
        (1,220), the ten aliases on line 4 produce 1,111 each, and the eighth of them crosses
        10,000 (at column 10 + 7 x 5).
        """
        text = laughs(12)
        assert len(text) < 1000
        with pytest.raises(YamlError) as caught:
            read_documents(text)
        assert caught.value.message == (
            "aliases in this file expand to more than 10000 values; share a block with one "
            "level of aliases (e.g. 'target: *pipeline'), or write the values out"
        )
        assert (caught.value.line, caught.value.column) == (4, 45)
        assert caught.value.path == ("l3", 7)

    def test_the_limit_is_exact(self) -> None:
        """Aliases that produce exactly 10,000 values are read; one value more is refused there."""
        anchor = "a: &a [" + ", ".join(["x"] * 99) + "]\n"  # a list of 99: 100 values
        within = anchor + "b:\n" + "  - *a\n" * 100
        [document] = read_documents(within)
        assert len(document.data["b"]) == 100
        assert document.data["b"][99] == ["x"] * 99
        with pytest.raises(YamlError, match="more than 10000 values") as caught:
            read_documents(within + "  - *a\n")
        assert (caught.value.line, caught.value.column) == (103, 5)

    def test_the_limit_spans_documents(self) -> None:
        """The limit is per file: splitting the aliases over documents does not reset it."""
        anchor = "a: &a [" + ", ".join(["x"] * 99) + "]\n"  # 100 values
        document = anchor + "b: [" + ", ".join(["*a"] * 60) + "]\n"  # 6,000 values
        assert len(read_documents(document)) == 1
        with pytest.raises(YamlError, match="more than 10000 values") as caught:
            read_documents(document + "---\n" + document)
        # 6,000 + 40 x 100 is the limit: the 41st alias of line 5 crosses it.
        assert (caught.value.line, caught.value.column) == (5, 5 + 40 * 4)

    def test_refusal_names_the_file(self) -> None:
        """Through the policy loader, the refusal names file, line and field, like any error."""
        with pytest.raises(PolicyError) as caught:
            load_policy_text(laughs(12), Path("policies/lol.yaml"))
        assert str(caught.value) == (
            "policies/lol.yaml:4:45: field 'l3': aliases in this file expand to more than 10000 "
            "values; share a block with one level of aliases (e.g. 'target: *pipeline'), or "
            "write the values out"
        )


class TestSyntaxErrors:
    def test_unclosed_flow_sequence(self) -> None:
        """A syntax error carries the line and column where the parser gave up."""
        with pytest.raises(YamlError) as caught:
            read_documents("a: 1\nb: [1, 2\nc: 3\n")
        assert (caught.value.line, caught.value.column) == (3, 2)
        assert "flow sequence" in caught.value.message

    def test_tab_indentation(self) -> None:
        """A tab used for indentation is reported on its line."""
        with pytest.raises(YamlError) as caught:
            read_documents("select:\n  status: [a]\n\tolder_than: 30d\n")
        assert caught.value.line == 3
        assert "'\\t'" in caught.value.message

    def test_unterminated_quote(self) -> None:
        """An unterminated quoted string is an error, located at the end of the input."""
        with pytest.raises(YamlError, match="quoted scalar") as caught:
            read_documents("name: 'abc\n")
        assert caught.value.line == 2


class TestDocuments:
    def test_several_documents(self) -> None:
        """Each ``---`` document is read separately, with positions in file lines."""
        documents = read_documents("a: 1\n---\nb:\n  - x\n  - y: 2\n")
        assert [d.data for d in documents] == [{"a": 1}, {"b": ["x", {"y": 2}]}]
        assert [d.line for d in documents] == [1, 3]
        assert documents[1].position(("b", 1, "y")) == (5, 8)

    def test_empty_text(self) -> None:
        """Empty text has no documents."""
        assert read_documents("") == []
        assert read_documents("# only a comment\n") == []

    def test_empty_documents_are_null(self) -> None:
        """An empty document between separators reads as None, the next one as data."""
        documents = read_documents("---\n---\na: 1\n")
        assert [d.data for d in documents] == [None, {"a": 1}]

    def test_a_later_document_error_fails_the_whole_text(self) -> None:
        """A duplicate key in the second document fails the read, with its absolute line."""
        with pytest.raises(YamlError) as caught:
            read_documents("a: 1\n---\nb: 1\nb: 2\n")
        assert caught.value.line == 4
