"""YAML reading that remembers where every value came from and refuses duplicate keys.

PyYAML's safe loader silently lets a second ``select:`` key win; in a retention policy that is how
a filter quietly disappears. Here the node tree is walked by hand: each mapping key is checked for
duplicates and each value's line and column are recorded by its path, so validation errors can
name the exact line.

Anchors and aliases are kept (ops share a ``target`` block between the policies of one file with
``target: *pipeline``), but an alias is a copy, and copies of copies grow exponentially: 450 bytes
of nested aliases (a "billion laughs") would take hours and all memory to expand. So the values
produced by aliases are counted, and a file whose aliases expand to more than
:data:`MAX_ALIAS_VALUES` values is refused at the alias that crossed the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["MAX_ALIAS_VALUES", "Document", "Path_", "YamlError", "read_documents"]

Path_ = tuple[str | int, ...]

#: How many values (scalars, lists and mappings) the aliases of one file may expand to. Sharing a
#: 20-value target block between 500 policies stays below it; reading it costs about 10 ms.
MAX_ALIAS_VALUES = 10_000


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


class _AliasNode(yaml.Node):
    """An alias where it is written: its own position, and the anchored node it repeats.

    PyYAML's composer puts the anchored node itself in place of an alias, which loses where the
    alias was written; errors about an expansion belong on that line.
    """

    id = "alias"

    def __init__(self, target: yaml.Node, start: yaml.Mark, end: yaml.Mark) -> None:
        super().__init__(target.tag, target.value, start, end)
        self.target = target


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            target = super().compose_node(parent, index)
            assert target is not None  # an alias always names a node (or the composer raised)
            return _AliasNode(target, event.start_mark, event.end_mark)
        return super().compose_node(parent, index)


class _AliasBudget:
    """How many more values aliases may produce in one file."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, budget: _AliasBudget) -> None:
        self.loader = loader
        self.positions: dict[Path_, tuple[int, int]] = {}
        self.mappings: dict[Path_, dict[Any, Any]] = {}
        self._building: set[int] = set()
        self._budget = budget
        #: The outermost alias being expanded, and its path: where an over-budget error points.
        self._alias: tuple[_AliasNode, Path_] | None = None

    def _error(self, message: str, node: yaml.Node, path: Path_) -> YamlError:
        # The policy is the top mapping of the document, or of a list item in a list file.
        root = path[:1] if path and isinstance(path[0], int) else ()
        name = self.mappings.get(root, {}).get("name")
        return YamlError(message, *_mark(node), path, name if isinstance(name, str) else None)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.positions.setdefault(path, _mark(node))
        if isinstance(node, _AliasNode):
            return self._expand(node, path)
        if self._alias is not None:
            self._budget.left -= 1
            if self._budget.left < 0:
                alias, alias_path = self._alias
                raise self._error(
                    f"aliases in this file expand to more than {self._budget.limit} values; "
                    "share a block with one level of aliases (e.g. 'target: *pipeline'), or "
                    "write the values out",
                    alias,
                    alias_path,
                )
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if node.tag not in _PLAIN_TAGS:
            raise self._error(f"tag {node.tag!r} is not allowed in a policy", node, path)
        self._building.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self._building.discard(id(node))

    def _expand(self, alias: _AliasNode, path: Path_) -> Any:
        if id(alias.target) in self._building:
            raise self._error("an alias refers to itself", alias, path)
        if self._alias is not None:
            return self.build(alias.target, path)
        self._alias = (alias, path)
        try:
            return self.build(alias.target, path)
        finally:
            self._alias = None

    def _mapping(self, node: yaml.Node, path: Path_) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        self.mappings[path] = result
        key_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self._error(
                    "merge keys ('<<') are not supported: write the keys out, or share a whole "
                    "block with an alias (e.g. 'target: *pipeline')",
                    key_node,
                    path,
                )
            key_source = key_node.target if isinstance(key_node, _AliasNode) else key_node
            if not isinstance(key_source, yaml.ScalarNode):
                raise self._error("mapping keys must be plain scalars", key_node, path)
            key = self.loader.construct_object(key_source)
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
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # e.g. a control character: the reader refuses the text
        raise YamlError(str(exc).replace('in "<unicode string>", ', "")) from None
    documents = []
    budget = _AliasBudget(MAX_ALIAS_VALUES)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            builder = _Builder(loader, budget)
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
