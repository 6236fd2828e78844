"""YAML reading that remembers where every value came from and refuses duplicate keys.

PyYAML's safe loader silently lets a second ``select:`` key win; in a retention policy that is how
a filter quietly disappears. Here the node tree is walked by hand: each mapping key is checked for
duplicates and each value's line and column are recorded by its path, so validation errors can
name the exact line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["Document", "Path_", "YamlError", "read_documents"]

Path_ = tuple[str | int, ...]


class YamlError(Exception):
    """The text is not YAML we accept (syntax, duplicate key, unsupported feature)."""

    def __init__(
        self,
        message: str,
        line: int | None = None,
        column: int | None = None,
        path: Path_ = (),
        policy: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        #: Where in the document the problem is (empty when unknown).
        self.path = path
        #: The ``name`` of the enclosing policy, when it was read before the problem.
        self.policy = policy


@dataclass(frozen=True)
class Document:
    """One YAML document: its plain data, where each path starts, and its source text."""

    data: Any
    positions: dict[Path_, tuple[int, int]]
    line: int

    def position(self, path: Path_) -> tuple[int, int] | None:
        """The (line, column) of ``path``, or of its nearest located ancestor."""
        for end in range(len(path), -1, -1):
            found = self.positions.get(path[:end])
            if found is not None:
                return found
        return None


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})


class _Builder:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.positions: dict[Path_, tuple[int, int]] = {}
        self.mappings: dict[Path_, dict[Any, Any]] = {}
        self._building: set[int] = set()

    def _error(self, message: str, node: yaml.Node, path: Path_) -> YamlError:
        # The policy is the top mapping of the document, or of a list item in a list file.
        root = path[:1] if path and isinstance(path[0], int) else ()
        name = self.mappings.get(root, {}).get("name")
        return YamlError(message, *_mark(node), path, name if isinstance(name, str) else None)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.positions.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if node.tag not in _PLAIN_TAGS:
            raise self._error(f"tag {node.tag!r} is not allowed in a policy", node, path)
        if id(node) in self._building:
            raise self._error("an alias refers to itself", node, path)
        self._building.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self._building.discard(id(node))

    def _mapping(self, node: yaml.Node, path: Path_) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        self.mappings[path] = result
        key_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self._error("merge keys ('<<') are not supported", key_node, path)
            if not isinstance(key_node, yaml.ScalarNode):
                raise self._error("mapping keys must be plain scalars", key_node, path)
            key = self.loader.construct_object(key_node)
            if key is None or not isinstance(key, str | int | bool | float):
                raise self._error("mapping keys must be plain scalars", key_node, path)
            child = (*path, str(key))
            if key in result:
                raise self._error(
                    f"duplicate key {key!r} (first defined on line {key_lines[key]})",
                    key_node,
                    child,
                )
            key_lines[key] = _mark(key_node)[0]
            # A block value starts on the line below its key; errors about it belong on the key.
            if value_node.start_mark.line != key_node.start_mark.line:
                self.positions[child] = _mark(key_node)
            result[key] = self.build(value_node, child)
        return result


def read_documents(text: str) -> list[Document]:
    """Parse every YAML document in ``text``; raises YamlError with a line number."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # e.g. a control character: the reader refuses the text
        raise YamlError(str(exc).replace('in "<unicode string>", ', "")) from None
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            builder = _Builder(loader)
            data = builder.build(node, ())
            documents.append(Document(data, builder.positions, _mark(node)[0]))
    except RecursionError:
        raise YamlError("the document nests too deeply") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        if mark is None:
            raise YamlError(message) from exc
        raise YamlError(message, mark.line + 1, mark.column + 1) from exc
    except yaml.YAMLError as exc:
        raise YamlError(str(exc)) from exc
    finally:
        loader.dispose()
    return documents
