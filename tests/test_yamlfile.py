"""Reading YAML with positions, refusing duplicate keys and merge keys."""

from __future__ import annotations

import textwrap

import pytest

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
        """``<<`` merges are refused: a merged-in key would hide where a value comes from."""
        text = "base: &b {status: [completed]}\nselect:\n  <<: *b\n  older_than: 30d\n"
        with pytest.raises(YamlError) as caught:
            read_documents(text)
        assert caught.value.message == "merge keys ('<<') are not supported"
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
        """An alias to its own enclosing node is a YamlError with a line, not a crash."""
        with pytest.raises(YamlError) as caught:
            read_documents("name: x\nids: &ids [a, *ids]\n")
        assert caught.value.line == 2

    def test_plain_aliases_are_expanded(self) -> None:
        """A non-recursive alias reads as a copy of its anchor's value."""
        data, _ = read_one("a: &s [completed]\nb: *s\n")
        assert data == {"a": ["completed"], "b": ["completed"]}


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
