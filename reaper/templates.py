"""Fleet templates: one policy written once, expanded over projects, regions, URLs or credential
references.

A policy with ``for_each`` is a template. Its values come inline or from a file, in three shapes::

    for_each:                         # a matrix: every combination (here 2 x 3 instances)
      region: [cn-north-4, ap-southeast-1]
      project_id: {file: projects.csv, column: project_id}
    for_each:                         # rows: one instance each
      - {region: cn-north-4, project_id: p1}
      - {region: ap-southeast-1, project_id: p2}
    for_each: fleet.csv               # rows from a file (CSV with a header, or a YAML/JSON list)

``${name}`` in ``target``, ``description`` and ``delete.options`` is replaced by the instance's
value (``$${`` writes a literal ``${``); a string that is exactly one placeholder takes the value
with its type (a number stays a number). Each instance is a policy of its own, named
``template[key]``: the key is ``instance_key`` with its placeholders replaced, or else the
instance's values joined with ``/`` (``dcs-finished-30d[cn-north-4/p1]``).

Everything is checked before anything runs: an unknown placeholder, a missing or empty value, a
values file that does not parse, a key with characters names cannot hold, two instances with one
name, two instances with one target (the second would only repeat the first). Problems in a
values file name that file and line. Values are not secret (they end up in names, audit
rows and errors): name credentials by reference (an environment variable or file).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reaper.yamlfile import Path_, YamlError, read_documents

__all__ = [
    "MAX_INSTANCES",
    "MAX_NAME_LENGTH",
    "TEMPLATE_KEYS",
    "Binding",
    "Expansion",
    "Instance",
    "expand",
    "is_template",
    "template_schema",
]

#: Keys that make a policy a template; they are not part of any instance.
TEMPLATE_KEYS = ("for_each", "instance_key")
#: Where placeholders are replaced. Elsewhere (selection, guards, schedule) every instance must
#: mean the same, or it would not be one policy written once.
SUBSTITUTED = (("target",), ("description",), ("delete", "options"))
#: The audit database's policy columns are 128 characters wide.
MAX_NAME_LENGTH = 128
#: A matrix multiplies: three lists of 100 would be a million policies.
MAX_INSTANCES = 10_000
#: Problems reported per template, beyond which they are counted.
MAX_PROBLEMS = 20

Scalar = str | int | float | bool
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"\$\$\{|\$\{(?P<name>[^{}]*)\}|\$\{")
_KEY = re.compile(r"[A-Za-z0-9._:@/-]+")
_FILE_KINDS = {".csv": "csv", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}


class TemplateProblem(Exception):
    """A mistake in a template, at ``path`` inside the policy."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Binding:
    """One variable's value in one instance, and where the value is written."""

    value: Scalar
    #: ``file:line`` of the value (the policy file for inline values, else the values file).
    source: str


@dataclass(frozen=True)
class Instance:
    """One policy a template expands to."""

    template: str
    key: str
    bindings: dict[str, Binding] = field(hash=False)
    #: Paths inside the policy whose value came from placeholders, and their variables.
    substituted: dict[Path_, tuple[str, ...]] = field(hash=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.template}[{self.key}]"

    def values(self) -> dict[str, Scalar]:
        """Each variable's value."""
        return {name: binding.value for name, binding in self.bindings.items()}

    def origin(self, path: Path_) -> str | None:
        """Where the value at ``path`` (or inside it) came from, if placeholders made it."""
        for where, names in self.substituted.items():
            if path[: len(where)] == where:
                return ", ".join(f"${{{n}}} from {self.bindings[n].source}" for n in names)
        return None


@dataclass
class Expansion:
    """A template's instances (each with its policy document), or the problems found."""

    instances: list[tuple[Instance, dict[str, Any]]] = field(default_factory=list)
    problems: list[tuple[Path_, str]] = field(default_factory=list)


def is_template(raw: Any) -> bool:
    """Whether a policy document is a template."""
    return isinstance(raw, dict) and any(key in raw for key in TEMPLATE_KEYS)


def expand(raw: dict[str, Any], base: Path, locate: Callable[[Path_], str]) -> Expansion:
    """Expand a template document into its instances' documents.

    ``base`` is the directory values files are relative to; ``locate`` renders a path inside the
    policy as ``file:line`` (for inline values). The instances' documents still hold the
    template's ``name``: the loader validates them as that policy and names each instance.
    """
    result = Expansion()
    template = raw.get("name") if isinstance(raw.get("name"), str) else "<template>"
    try:
        variables, rows = _rows(raw.get("for_each"), base, locate)
    except TemplateProblem as problem:
        result.problems.append((problem.path, problem.message))
        return result
    body = {key: value for key, value in raw.items() if key not in TEMPLATE_KEYS}
    problems = list(_placeholder_problems(body, set(variables)))
    key_template = raw.get("instance_key")
    if "instance_key" in raw:
        if not isinstance(key_template, str) or not key_template:
            problems.append((("instance_key",), "expected a string such as '${region}/${project}'"))
        else:
            problems.extend(
                (("instance_key",), message)
                for message in _string_problems(key_template, set(variables))
            )
    if problems:
        result.problems.extend(problems)
        return result
    seen: dict[str, Instance] = {}
    targets: dict[str, Instance] = {}
    for bindings in rows:
        values = {name: binding.value for name, binding in bindings.items()}
        if isinstance(key_template, str):
            key = _substitute_string(key_template, values)
        else:
            key = "/".join(str(values[name]) for name in variables)
        sources = ", ".join(sorted({b.source for b in bindings.values()}))
        if not _KEY.fullmatch(key):
            result.problems.append(
                (
                    ("instance_key",) if isinstance(key_template, str) else ("for_each",),
                    f"instance key {key!r} (values from {sources}) may hold only letters, "
                    "digits and . _ - / : @ (set instance_key to pick the values that name "
                    "an instance)",
                )
            )
            continue
        substituted: dict[Path_, tuple[str, ...]] = {}
        document = _substitute(body, values, (), substituted)
        instance = Instance(str(template), key, bindings, substituted)
        if len(instance.name) > MAX_NAME_LENGTH:
            result.problems.append(
                (
                    ("for_each",),
                    f"instance name {instance.name!r} (values from {sources}) is longer than "
                    f"{MAX_NAME_LENGTH} characters: shorten the name, or set instance_key",
                )
            )
            continue
        first = seen.setdefault(instance.name, instance)
        if first is not instance:
            result.problems.append(
                (
                    ("for_each",),
                    f"two instances are named {instance.name!r}: values from {sources} and "
                    f"from {', '.join(sorted({b.source for b in first.bindings.values()}))}",
                )
            )
            continue
        target = json.dumps(document.get("target"), sort_keys=True, default=str)
        other = targets.setdefault(target, instance)
        if other is not instance:
            unused = [name for name in variables if not _uses(body.get("target"), name)]
            hint = f" (target does not use {', '.join(map(repr, unused))})" if unused else ""
            result.problems.append(
                (
                    ("for_each",),
                    f"instances {other.name!r} and {instance.name!r} have the same target"
                    f"{hint}: the second would only repeat the first one's work",
                )
            )
            continue
        result.instances.append((instance, document))
    if len(result.problems) > MAX_PROBLEMS:
        # A bad column in a file of thousands of rows is one mistake, not thousands.
        left = len(result.problems) - MAX_PROBLEMS
        result.problems[MAX_PROBLEMS:] = [(("for_each",), f"... and {left} more like these")]
    return result


# --- values ---------------------------------------------------------------------------------


def _rows(
    spec: Any, base: Path, locate: Callable[[Path_], str]
) -> tuple[list[str], list[dict[str, Binding]]]:
    """The variables, in order, and one binding per variable for each instance."""
    if isinstance(spec, str):
        variables, rows = _file_rows(spec, base)
    elif isinstance(spec, list):
        variables, rows = _inline_rows(spec, locate)
    elif isinstance(spec, dict):
        variables, rows = _matrix(spec, base, locate)
    elif spec is None:
        raise TemplateProblem(
            ("for_each",),
            "a template needs for_each: a mapping of variables to lists, a list of rows, or a "
            "values file (.csv, .json, .yaml)",
        )
    else:
        raise TemplateProblem(
            ("for_each",),
            "expected a mapping of variables to lists, a list of rows, or a values file name",
        )
    if not rows:
        raise TemplateProblem(
            ("for_each",), "for_each gives no values: the template has no instance"
        )
    return variables, rows


def _check_variable(name: Any, path: Path_) -> str:
    if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
        raise TemplateProblem(
            path, f"{name!r} is not a variable name (letters, digits and _, not first a digit)"
        )
    return name


def _scalar(value: Any, where: str, path: Path_) -> Scalar:
    if value is None or value == "":
        raise TemplateProblem(path, f"{where}: the value is missing")
    if not isinstance(value, str | int | float | bool):
        raise TemplateProblem(path, f"{where}: a value must be a string, number or boolean")
    if isinstance(value, str) and value != value.strip():
        raise TemplateProblem(path, f"{where}: the value {value!r} has spaces around it")
    return value


def _inline_rows(
    spec: list[Any], locate: Callable[[Path_], str]
) -> tuple[list[str], list[dict[str, Binding]]]:
    variables: list[str] = []
    rows: list[dict[str, Binding]] = []
    for index, row in enumerate(spec):
        path: Path_ = ("for_each", index)
        if not isinstance(row, dict) or not row:
            raise TemplateProblem(path, "each row is a mapping of variables to values")
        names = [_check_variable(name, path) for name in row]
        if index == 0:
            variables = names
        elif set(names) != set(variables):
            raise TemplateProblem(
                path,
                f"this row has {', '.join(sorted(names))}; the first row has "
                f"{', '.join(sorted(variables))}: every row gives the same variables",
            )
        rows.append(
            {
                name: Binding(
                    _scalar(row[name], locate((*path, name)), (*path, name)),
                    locate((*path, name)),
                )
                for name in variables
            }
        )
    return variables, rows


def _matrix(
    spec: dict[Any, Any], base: Path, locate: Callable[[Path_], str]
) -> tuple[list[str], list[dict[str, Binding]]]:
    if not spec:
        raise TemplateProblem(("for_each",), "for_each gives no variables")
    columns: list[list[Binding]] = []
    variables: list[str] = []
    for name, values in spec.items():
        path: Path_ = ("for_each", str(name))
        variables.append(_check_variable(name, path))
        if isinstance(values, list):
            column = [
                Binding(_scalar(value, locate((*path, i)), (*path, i)), locate((*path, i)))
                for i, value in enumerate(values)
            ]
        elif isinstance(values, dict):
            column = _file_column(values, base, path)
        else:
            raise TemplateProblem(
                path, "expected a list of values, or {file: NAME, column: COLUMN}"
            )
        if not column:
            raise TemplateProblem(path, f"{name!r} has no values: the template has no instance")
        columns.append(column)
    total = 1
    for column in columns:
        total *= len(column)
    if total > MAX_INSTANCES:
        raise TemplateProblem(
            ("for_each",),
            f"the matrix has {total} combinations; at most {MAX_INSTANCES} instances per "
            "template (list the combinations you need as rows)",
        )
    rows = [
        dict(zip(variables, combination, strict=True))
        for combination in itertools.product(*columns)
    ]
    return variables, rows


def _file_column(spec: dict[Any, Any], base: Path, path: Path_) -> list[Binding]:
    unknown = sorted(str(key) for key in spec if key not in ("file", "column"))
    if unknown:
        raise TemplateProblem(
            (*path, unknown[0]), "unknown key (a values file takes file: and column:)"
        )
    name, column = spec.get("file"), spec.get("column")
    if not isinstance(name, str) or not name:
        raise TemplateProblem((*path, "file"), "expected the name of a values file")
    if column is not None and not isinstance(column, str):
        raise TemplateProblem((*path, "column"), "expected a column name")
    values = _ValuesFile(base, name, (*path, "file"))
    return list(values.column(column))


def _file_rows(name: str, base: Path) -> tuple[list[str], list[dict[str, Binding]]]:
    values = _ValuesFile(base, name, ("for_each",))
    rows = list(values.rows())
    if not rows:
        raise TemplateProblem(("for_each",), f"{values.shown} holds no rows")
    variables = list(rows[0])
    return variables, rows


class _ValuesFile:
    """A CSV (with a header row), JSON or YAML file of values, read strictly."""

    def __init__(self, base: Path, name: str, path: Path_) -> None:
        self.path = path
        self.file = base / name
        self.shown = str(self.file)
        kind = _FILE_KINDS.get(self.file.suffix.lower())
        if kind is None:
            raise TemplateProblem(path, f"{name}: a values file ends in .csv, .json, .yaml or .yml")
        self.kind = kind
        try:
            # utf-8-sig: spreadsheets put a byte-order mark before the header.
            self.text = self.file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise TemplateProblem(
                path, f"cannot read the values file {self.shown}: {reason}"
            ) from None

    def _problem(self, line: int | None, message: str) -> TemplateProblem:
        return TemplateProblem(self.path, f"{self._at(line)}: {message}")

    def _at(self, line: int | None) -> str:
        return f"{self.shown}:{line}" if line is not None else self.shown

    def _value(self, value: Any, line: int | None, what: str) -> Binding:
        return Binding(_scalar(value, f"{self._at(line)} ({what})", self.path), self._at(line))

    # -- rows: one mapping per instance --------------------------------------------------------

    def rows(self) -> Iterator[dict[str, Binding]]:
        if self.kind == "csv":
            yield from self._csv_rows()
            return
        variables: list[str] | None = None
        for item, line in self._items():
            if not isinstance(item, dict) or not item:
                raise self._problem(line, "each row is a mapping of variables to values")
            names = [_check_in_file(name, self, line) for name in item]
            if variables is None:
                variables = names
            elif set(names) != set(variables):
                raise self._problem(
                    line,
                    f"this row has {', '.join(sorted(names))}; the first row has "
                    f"{', '.join(sorted(variables))}: every row gives the same variables",
                )
            yield {name: self._value(item[name], line, name) for name in variables}

    def _csv_rows(self) -> Iterator[dict[str, Binding]]:
        header, records = self._csv()
        for line, record in records:
            yield {
                name: self._value(value, line, name)
                for name, value in zip(header, record, strict=True)
            }

    def _csv(self) -> tuple[list[str], list[tuple[int, list[str]]]]:
        reader = csv.reader(self.text.splitlines(keepends=True), strict=True)
        records: list[tuple[int, list[str]]] = []
        header: list[str] | None = None
        start = 1
        try:
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record:
                    continue  # a blank line
                if header is None:
                    header = [_check_in_file(name, self, line) for name in record]
                    if len(set(header)) != len(header):
                        raise self._problem(line, "a column name appears twice in the header")
                    continue
                if len(record) != len(header):
                    raise self._problem(
                        line, f"{len(record)} fields where the header has {len(header)}"
                    )
                records.append((line, record))
        except csv.Error as exc:
            raise self._problem(reader.line_num, f"not valid CSV: {exc}") from None
        if header is None:
            raise self._problem(None, "the file is empty: a CSV values file starts with a header")
        return header, records

    def _items(self) -> list[tuple[Any, int | None]]:
        """The file's list items, each with its line where known."""
        if self.kind == "json":
            try:
                data = json.loads(self.text)
            except json.JSONDecodeError as exc:
                raise self._problem(exc.lineno, f"not valid JSON: {exc.msg}") from None
            positions = _positions(self.text)
        else:
            try:
                documents = read_documents(self.text)
            except YamlError as exc:
                raise self._problem(exc.line, f"not valid YAML: {exc.message}") from None
            if len(documents) != 1:
                raise self._problem(None, "a YAML values file holds one document: a list")
            data, positions = documents[0].data, documents[0].positions
        if not isinstance(data, list):
            raise self._problem(1, "a values file holds a list")
        return [
            (item, (positions.get((index,)) or (None, None))[0]) for index, item in enumerate(data)
        ]

    # -- one column: the values of one matrix variable -----------------------------------------

    def column(self, column: str | None) -> Iterator[Binding]:
        if self.kind == "csv":
            header, records = self._csv()
            if column is None:
                if len(header) != 1:
                    raise self._problem(
                        1, f"the file has columns {', '.join(header)}: say which with column:"
                    )
                column = header[0]
            if column not in header:
                raise self._problem(1, f"no column {column!r}; the header has {', '.join(header)}")
            index = header.index(column)
            for line, record in records:
                yield self._value(record[index], line, column)
            return
        for item, at in self._items():
            if column is None:
                if isinstance(item, dict | list):
                    raise self._problem(
                        at, "the items are not plain values: say which key with column:"
                    )
                yield self._value(item, at, "value")
            else:
                if not isinstance(item, dict):
                    raise self._problem(at, f"expected a mapping with the key {column!r}")
                if column not in item:
                    raise self._problem(at, f"this item has no key {column!r}")
                yield self._value(item[column], at, column)


def _check_in_file(name: Any, values: _ValuesFile, line: int | None) -> str:
    if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
        raise values._problem(
            line, f"{name!r} is not a variable name (letters, digits and _, not first a digit)"
        )
    return name


def _positions(text: str) -> dict[Path_, tuple[int, int]]:
    """Where each item of a JSON list starts, read by the YAML reader (JSON is YAML); none if
    the reader disagrees (the values are json's either way)."""
    try:
        documents = read_documents(text)
    except YamlError:
        return {}
    return documents[0].positions if len(documents) == 1 else {}


# --- placeholders -----------------------------------------------------------------------------


def _sections(path: Path_) -> bool:
    return any(path[: len(section)] == section for section in SUBSTITUTED)


def _walk(node: Any, path: Path_) -> Iterator[tuple[Path_, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, index))


def _placeholder_problems(body: dict[str, Any], variables: set[str]) -> Iterator[tuple[Path_, str]]:
    for path, node in _walk(body, ()):
        if isinstance(node, dict):
            for key in node:
                if isinstance(key, str) and "${" in key:
                    yield (*path, key), "placeholders go in values, not in keys"
        if not isinstance(node, str) or "${" not in node:
            continue
        if not _sections(path):
            yield (
                path,
                (
                    "placeholders are replaced only in target, description and delete.options "
                    "(write $${ for a literal ${)"
                ),
            )
            continue
        for message in _string_problems(node, variables):
            yield path, message


def _string_problems(text: str, variables: set[str]) -> Iterator[str]:
    for match in _TOKEN.finditer(text):
        if match.group(0) == "$${":
            continue
        name = match.group("name")
        if name is None:
            yield "a placeholder '${' is not closed with '}'"
        elif not _VARIABLE.fullmatch(name):
            yield f"'${{{name}}}' is not a variable name"
        elif name not in variables:
            known = ", ".join(sorted(variables))
            yield f"unknown variable ${{{name}}}; for_each gives: {known}"


def _uses(node: Any, name: str) -> bool:
    return any(
        isinstance(value, str) and any(m.group("name") == name for m in _TOKEN.finditer(value))
        for _, value in _walk(node, ())
    )


def _substitute_string(text: str, values: dict[str, Scalar]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        return str(values[match.group("name")])

    return _TOKEN.sub(replace, text)


def _substitute(
    node: Any, values: dict[str, Scalar], path: Path_, substituted: dict[Path_, tuple[str, ...]]
) -> Any:
    if isinstance(node, dict):
        return {
            key: _substitute(value, values, (*path, str(key)), substituted)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [
            _substitute(value, values, (*path, index), substituted)
            for index, value in enumerate(node)
        ]
    if not isinstance(node, str) or "${" not in node or not _sections(path):
        return copy.deepcopy(node)
    names = tuple(dict.fromkeys(m.group("name") for m in _TOKEN.finditer(node) if m.group("name")))
    if names:
        substituted[path] = names
    whole = _TOKEN.fullmatch(node)
    if whole is not None and whole.group("name"):
        return values[whole.group("name")]  # the value with its type: page_size: ${size}
    return _substitute_string(node, values)


# --- the published schema ---------------------------------------------------------------------


def template_schema() -> dict[str, Any]:
    """JSON Schema of the template keys (added to the policy schema's properties)."""
    scalar = {"type": ["string", "number", "boolean"]}
    values_file = {
        "type": "string",
        "pattern": r"\.(csv|json|ya?ml)$",
        "description": "A values file, relative to the policy file.",
    }
    variable = "^[A-Za-z_][A-Za-z0-9_]*$"
    return {
        "for_each": {
            "description": (
                "Makes the policy a template: one instance per row, or per combination of a "
                "matrix. ${name} in target, description and delete.options takes each "
                "instance's value. Fields holding a placeholder are checked per instance by "
                "the loader, after substitution."
            ),
            "oneOf": [
                {
                    "type": "object",
                    "description": "A matrix: every combination of the variables' values.",
                    "minProperties": 1,
                    "propertyNames": {"pattern": variable},
                    "additionalProperties": {
                        "oneOf": [
                            {"type": "array", "minItems": 1, "items": scalar},
                            {
                                "type": "object",
                                "properties": {
                                    "file": values_file,
                                    "column": {"type": "string"},
                                },
                                "required": ["file"],
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
                {
                    "type": "array",
                    "description": "Rows: one instance each.",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "minProperties": 1,
                        "propertyNames": {"pattern": variable},
                        "additionalProperties": scalar,
                    },
                },
                values_file,
            ],
        },
        "instance_key": {
            "type": "string",
            "minLength": 1,
            "description": (
                "What names an instance, between brackets after the template's name, e.g. "
                "'${region}/${project_id}' (default: every value, joined with '/')."
            ),
        },
    }
