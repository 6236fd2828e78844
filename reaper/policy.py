"""Retention policies: the YAML files ops write, loaded strictly into frozen models.

Loading never half-succeeds. Unknown keys, duplicate keys, bad durations, bad cron, bad regular
expressions, missing fields, unknown statuses and contradictions (a status both selected and
protected) are all collected and raised together as one :class:`~reaper.errors.PolicyError`, each
naming the file, line, policy and field. Nothing is listed or deleted for a file that does not load.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SerializeAsAny,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from reaper.converters import Rate, parse_timezone
from reaper.errors import FieldError, PolicyError
from reaper.fields import INTEGRAL, Duration, JsonInt, RateValue
from reaper.schedule import parse_cron
from reaper.sinks import WebhookSink
from reaper.targets import Registry, Target, TargetConfig, installed_kinds
from reaper.templates import Instance, expand, is_template, template_schema
from reaper.yamlfile import Document, Path_, YamlError, read_documents

__all__ = [
    "DeleteSettings",
    "Keep",
    "LoadedPolicy",
    "Policy",
    "Protect",
    "Select",
    "load_policies",
    "load_policy_text",
    "policy_files",
    "policy_json_schema",
]


def _compile(pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise ValueError("expected a regular expression string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return pattern


Regex = Annotated[str, BeforeValidator(_compile)]
StatusList = Annotated[tuple[str, ...], Field(json_schema_extra={"uniqueItems": True})]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Select(_Model):
    """Which tasks a policy is about."""

    status: StatusList = Field(min_length=1, description="Statuses that may be deleted.")
    older_than: Duration = Field(description="Minimum age, measured on age_field.")
    age_field: str | None = Field(
        None, description="Timestamp the age is measured on (default: the target's first)."
    )
    match: dict[str, Regex] = Field(
        default_factory=dict,
        description="Regular expressions (re.search) every named field must match.",
    )
    allow_live: StrictBool = Field(
        False,
        description="Allow selecting statuses the target reports for running tasks.",
    )


class Keep(_Model):
    """What is kept although it matches."""

    newest: JsonInt = Field(
        0, ge=0, description="Never delete the N newest tasks matching status and match."
    )


class Protect(_Model):
    """What is never deleted, whatever ``select`` says."""

    status: StatusList = Field(default=(), description="Statuses that are never deleted.")
    ids: tuple[str, ...] = Field(default=(), description="Task ids that are never deleted.")
    match: dict[str, Regex] = Field(
        default_factory=dict, description="Tasks whose field matches one of these are protected."
    )


class Anomaly(_Model):
    """Guard: far more eligible tasks than the policy's recent runs had."""

    factor: StrictFloat = Field(10.0, gt=1, description="Trip above factor x the recent median.")
    floor: JsonInt = Field(100, ge=0, description="Eligible counts up to this never trip.")
    history: JsonInt = Field(10, ge=1, le=1000, description="How many recent runs to compare with.")


class DeleteSettings(_Model):
    """How deletions are sent."""

    # Bounds inside the Optional: on a validator-wrapped int in a union, pydantic publishes them
    # as "ge"/"le", which JSON Schema does not know (and so would not check).
    batch_size: Annotated[Annotated[StrictInt, Field(ge=1)] | None, INTEGRAL] = Field(
        None, description="Ids per delete request (default: 50, or 1 for per-id APIs)."
    )
    rate: RateValue = Field(
        Rate(10.0),
        json_schema_extra={"default": "10/s"},
        description="Requests per second to this target, listing included.",
    )
    burst: JsonInt = Field(
        1, ge=1, le=1000, description="Requests that may go at once after idling."
    )
    concurrency: Annotated[Annotated[StrictInt, Field(ge=1, le=256)] | None, INTEGRAL] = Field(
        None, description="Requests in flight; default: sized from rate x latency."
    )
    continue_on_error: StrictBool = Field(True, description="Go on after a failed deletion.")
    max_deletions: JsonInt = Field(
        1000,
        ge=1,
        description="Guard: more eligible tasks than this and the run deletes nothing.",
    )
    max_fraction: StrictFloat = Field(
        0.5,
        gt=0,
        le=1,
        description="Guard: a larger share of the listed tasks than this and nothing is deleted.",
    )
    anomaly: Anomaly = Field(default_factory=Anomaly)
    max_run_time: Duration | None = Field(
        None,
        description=(
            "No batch starts once the run has lasted this long (listing included): the run is "
            "partial and the next run deletes the rest."
        ),
    )
    verify: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "List the target again right after deleting, to catch deletions the target "
            "acknowledged but did not carry out: auto does when a listing costs at most a "
            "tenth of the requests the deletions took (the next run's listing checks anyway)."
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Target-specific delete options."
    )
    notice: Duration | None = Field(
        None,
        description=(
            "Notice before deletion, e.g. '3d': a task first found eligible is recorded as due "
            "this long after, announced, and deleted by a later run only if still eligible then."
        ),
    )


class _TargetSection:
    """``target:``, validated as the config model of the kind its ``type`` names.

    The kinds come from the registry when a policy is validated (not when this module is
    imported), so the kinds of plugins installed since count too.
    """

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            lambda value: installed_kinds().config_adapter.validate_python(value)
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(installed_kinds().config_adapter.core_schema)


#: A policy's ``target``: typed as the base model, serialised as the kind's own.
TargetSettings = Annotated[SerializeAsAny[TargetConfig], _TargetSection]

_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Policy(_Model):
    """One retention policy."""

    name: str = Field(pattern=_NAME_PATTERN, description="Unique name (lowercase, digits, .-_).")
    description: str = ""
    schedule: str | None = Field(None, description="Five-field cron expression for the daemon.")
    timezone: str = Field("UTC", description="IANA timezone the schedule is evaluated in.")
    schedule_jitter: Duration | None = Field(
        None,
        description=(
            "`serve` starts each run up to this much after its scheduled time (a fixed offset "
            "per policy name, at most half the gap to the next fire): spreads policies sharing "
            "a cron line. The run still counts for its scheduled slot."
        ),
    )
    target: TargetSettings
    select: Select
    keep: Keep = Field(default_factory=Keep)
    protect: Protect = Field(default_factory=Protect)
    delete: DeleteSettings = Field(default_factory=DeleteSettings)
    notify: tuple[WebhookSink, ...] = Field(
        (),
        description=(
            "Where this policy's notifications go (besides REAPER_NOTIFY_FILE's sinks); not part "
            "of the policy's content hash."
        ),
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        parse_timezone(value)
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cron(value, UTC)  # the fields do not depend on the zone
        return value

    @property
    def zone(self) -> ZoneInfo:
        return parse_timezone(self.timezone)

    @property
    def target_config(self) -> TargetConfig:
        config: TargetConfig = self.target
        return config

    @property
    def target_class(self) -> type[Target]:
        return installed_kinds().target(self.target_config.type)

    @property
    def age_field(self) -> str:
        return self.select.age_field or self.target_class.time_fields[0]

    @property
    def batch_size(self) -> int:
        return self.delete.batch_size or min(50, self.target_class.max_batch_size)

    def canonical_json(self) -> str:
        """The policy as canonical JSON: what its content hash covers.

        Settings added after policies were first hashed are left out while unset, so a policy
        that does not use them keeps its hash (saved and held plans of it stay valid); where
        notifications go is no part of what a policy deletes, and never hashed.
        """
        data = self.model_dump(mode="json", exclude={"notify"})
        for *parents, key in _HASHED_ONLY_WHEN_SET:
            section = data
            for parent in parents:
                section = section[parent]
            if section.get(key) is None:
                del section[key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        """sha256 of the canonical JSON: changes whenever the policy's meaning can change."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


#: Optional settings added after policies were first hashed: part of the hash only when set.
_HASHED_ONLY_WHEN_SET = (("delete", "notice"), ("delete", "max_run_time"), ("schedule_jitter",))


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy and where it came from."""

    policy: Policy
    path: Path | None
    line: int
    #: The template instance this policy is (None for a policy written out).
    instance: Instance | None = None

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def template(self) -> str | None:
        """The name of the template this policy is an instance of."""
        return self.instance.template if self.instance is not None else None

    @property
    def digest(self) -> str:
        return self.policy.content_hash()


def policy_json_schema(kinds: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of one policy document (a file holds one policy or a list of them),
    ``target`` being one of ``kinds`` (default: every installed kind, plugins' included)."""
    kinds = kinds or installed_kinds()
    model = create_model(
        "Policy", __base__=Policy, __doc__=Policy.__doc__, target=(kinds.config_union, ...)
    )
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://reaper.invalid/schema/policy.schema.json"
    schema["description"] = (
        "A reaper retention policy. A policy file holds one policy, a list of policies, or "
        "several YAML documents."
    )
    schema["properties"].update(template_schema())
    return schema


# ---------------------------------------------------------------------------------------------
# Loading


def policy_files(paths: Iterable[Path]) -> list[Path]:
    """Expand directories into their ``*.yaml``/``*.yml`` files, sorted; keep files as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
            )
        else:
            files.append(path)
    return files


def load_policies(paths: Sequence[Path]) -> list[LoadedPolicy]:
    """Load every policy under ``paths``; raise PolicyError listing every problem found."""
    loaded: list[LoadedPolicy] = []
    problems: list[tuple[Path | None, FieldError]] = []
    files = policy_files(paths)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append((path, FieldError("<file>", f"cannot read the file: {exc}")))
            continue
        try:
            loaded.extend(load_policy_text(text, path))
        except PolicyError as exc:
            problems.extend((path, error) for error in exc.errors)
    seen: dict[str, LoadedPolicy] = {}
    for item in loaded:
        first = seen.setdefault(item.name, item)
        if first is not item:
            problems.append(
                (
                    item.path,
                    FieldError(
                        "name",
                        f"duplicate policy name (also defined in {first.path}:{first.line})",
                        line=item.line,
                        policy=item.name,
                    ),
                )
            )
    problems.extend(_template_clashes(loaded))
    if not files and not problems:
        where = ", ".join(str(p) for p in paths) or "<none>"
        problems.append((None, FieldError("<policies>", f"no policy files found in {where}")))
    if problems:
        raise _combined(problems)
    return loaded


def _template_clashes(loaded: list[LoadedPolicy]) -> list[tuple[Path | None, FieldError]]:
    """A template may not share its name with a policy written out: ``--policy NAME`` selects
    a template's instances by the template's name."""
    plain = {item.name: item for item in loaded if item.instance is None}
    clashes: dict[str, tuple[Path | None, FieldError]] = {}
    for item in loaded:
        if item.template is not None and item.template in plain:
            first = plain[item.template]
            clashes.setdefault(
                item.template,
                (
                    item.path,
                    FieldError(
                        "name",
                        f"a template and a policy are both named {item.template!r} (the policy "
                        f"is defined in {first.path}:{first.line})",
                        line=item.line,
                        policy=item.template,
                    ),
                ),
            )
    return list(clashes.values())


def _combined(problems: list[tuple[Path | None, FieldError]]) -> PolicyError:
    paths = {path for path, _ in problems}
    if len(paths) == 1:
        return PolicyError(next(iter(paths)), [error for _, error in problems])
    error = PolicyError(None, [error for _, error in problems])
    error.args = ("\n".join(e.render(path) for path, e in problems),)
    return error


def load_policy_text(text: str, path: Path | None = None) -> list[LoadedPolicy]:
    """Validate the policies in one file's text; raise PolicyError with every problem."""
    try:
        documents = read_documents(text)
    except YamlError as exc:
        field = ".".join(str(p) for p in exc.path if not isinstance(p, int)) or "<yaml>"
        raise PolicyError(
            path, [FieldError(field, exc.message, exc.line, exc.column, exc.policy)]
        ) from None
    errors: list[FieldError] = []
    loaded: list[LoadedPolicy] = []
    for document in documents:
        data = document.data
        if data is None:
            continue
        entries: list[tuple[Path_, Any]]
        if isinstance(data, list):
            entries = [((index,), item) for index, item in enumerate(data)]
        else:
            entries = [((), data)]
        for prefix, raw in entries:
            if is_template(raw):
                instances, problems = _load_template(raw, prefix, document, path)
                loaded.extend(instances)
                errors.extend(problems)
                continue
            policy, problems = _validate(raw, prefix, document)
            errors.extend(problems)
            if policy is not None:
                position = document.position(prefix)
                loaded.append(LoadedPolicy(policy, path, position[0] if position else 1))
    if not loaded and not errors:
        errors.append(FieldError("<yaml>", "the file holds no policy", 1))
    if errors:
        raise PolicyError(path, errors)
    return loaded


def _load_template(
    raw: dict[str, Any], prefix: Path_, document: Document, path: Path | None
) -> tuple[list[LoadedPolicy], list[FieldError]]:
    """Expand a template and validate each instance as a policy of its own."""
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    shown = str(path) if path is not None else "<policy>"

    def locate(inner: Path_) -> str:
        position = document.position((*prefix, *inner))
        return f"{shown}:{position[0]}" if position else shown

    expansion = expand(raw, path.parent if path is not None else Path(), locate)
    if expansion.problems:
        return [], [
            _located(document, prefix, where, message, name)
            for where, message in expansion.problems
        ]
    position = document.position(prefix)
    line = position[0] if position else 1
    loaded: list[LoadedPolicy] = []
    found: list[list[FieldError]] = []
    for instance, doc in expansion.instances:
        policy, problems = _validate(doc, prefix, document, instance)
        found.append(problems)
        if policy is not None:
            policy = policy.model_copy(update={"name": instance.name})
            loaded.append(LoadedPolicy(policy, path, line, instance))
    return loaded, _merge_instance_errors(found, name)


def _merge_instance_errors(found: list[list[FieldError]], template: str | None) -> list[FieldError]:
    """A mistake every instance shares is the template's: reported once, not once per instance."""

    def shared(error: FieldError) -> tuple[Any, ...]:
        return (error.field, error.line, error.column, error.message)

    counts: dict[tuple[Any, ...], int] = {}
    for problems in found:
        for key in {shared(error) for error in problems}:
            counts[key] = counts.get(key, 0) + 1
    everywhere = {key for key, count in counts.items() if count == len(found)}
    merged: list[FieldError] = []
    reported: set[tuple[Any, ...]] = set()
    for problems in found:
        for error in problems:
            key = shared(error)
            if key not in everywhere:
                merged.append(error)
            elif key not in reported:
                reported.add(key)
                merged.append(
                    FieldError(error.field, error.message, error.line, error.column, template)
                )
    return merged


def _located(
    document: Document, prefix: Path_, path: Path_, message: str, name: str | None
) -> FieldError:
    position = document.position((*prefix, *path))
    return FieldError(
        ".".join(str(p) for p in path) or "<policy>",
        message,
        position[0] if position else None,
        position[1] if position else None,
        name,
    )


def _validate(
    raw: Any, prefix: Path_, document: Document, instance: Instance | None = None
) -> tuple[Policy | None, list[FieldError]]:
    name = raw.get("name") if isinstance(raw, dict) else None
    name = name if isinstance(name, str) else None
    if instance is not None:
        name = instance.name

    def located(path: Path_, message: str) -> FieldError:
        origin = instance.origin(path) if instance is not None else None
        if origin is not None:
            message = f"{message} (the value of {origin})"
        return _located(document, prefix, path, message, name)

    if not isinstance(raw, dict):
        return None, [located((), "a policy must be a mapping of keys to values")]
    problems = [located(path, message) for path, message in _semantic_problems(raw)]
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        structural = [located(_error_path(raw, err), _message(err)) for err in exc.errors()]
        return None, structural + problems
    return (policy if not problems else None), problems


def _error_path(raw: Any, error: Any) -> Path_:
    path = _resolve(raw, error["loc"])
    if error["type"] == "union_tag_invalid":
        path = (*path, _discriminator(error))  # the discriminator is the field that is wrong
    return path


def _discriminator(error: Any) -> str:
    """The field a discriminated union's error is about (``type`` of ``target``, ``style``...)."""
    return str(error["ctx"]["discriminator"]).strip("'")


def _resolve(raw: Any, loc: tuple[int | str, ...]) -> Path_:
    """Turn a pydantic error location into a path through the raw data.

    Pydantic inserts segments that are not keys (the discriminator tag of ``target``, validator
    names); they are dropped. A final segment that is missing from the data (a missing field) is
    kept so the message names it.
    """
    path: list[str | int] = []
    current = raw
    for index, segment in enumerate(loc):
        if isinstance(current, dict) and segment in current:
            current = current[segment]
            path.append(segment)
        elif isinstance(current, list) and isinstance(segment, int) and segment < len(current):
            current = current[segment]
            path.append(segment)
        elif index == len(loc) - 1 and isinstance(segment, str):
            path.append(segment)
    return tuple(path)


def _message(error: Any) -> str:
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        if tuple(error["loc"]) == ("target",):  # the kind: say which exist, or why it is broken
            kinds = installed_kinds()
            if error["type"] == "union_tag_not_found":
                return f"target.type is required; one of: {', '.join(kinds.targets)}"
            return kinds.unusable(str(error["ctx"]["tag"])) or kinds.unknown()
        if error["type"] == "union_tag_not_found":
            return f"{_discriminator(error)} is required"
        return f"unknown value; expected one of: {error['ctx']['expected_tags']}"
    return message


def _semantic_problems(raw: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Checks that need the target kind or span several fields.

    They read the raw document defensively, so they also run when other fields failed to
    validate: one pass over a file reports every mistake in it.
    """
    problems: list[tuple[Path_, str]] = []
    target_raw = _mapping(raw.get("target"))
    kind_raw = target_raw.get("type")
    target = installed_kinds().targets.get(kind_raw) if isinstance(kind_raw, str) else None
    if target is None:
        return problems  # the structural validation names the missing or unknown type
    kind = target.kind
    select, protect = _mapping(raw.get("select")), _mapping(raw.get("protect"))

    age_field = select.get("age_field")
    if isinstance(age_field, str) and age_field not in target.time_fields:
        problems.append(
            (
                ("select", "age_field"),
                f"{kind} has no timestamp field {age_field!r}; "
                f"use one of: {', '.join(target.time_fields)}",
            )
        )
    for section, patterns in (("select", select.get("match")), ("protect", protect.get("match"))):
        problems.extend(
            (
                (section, "match", field_name),
                f"{kind} tasks have no field {field_name!r} to match; "
                f"use one of: {', '.join(sorted(target.match_fields))}",
            )
            for field_name in _mapping(patterns)
            if field_name not in target.match_fields
        )
    selected, protected = _strings(select.get("status")), _strings(protect.get("status"))
    if target.known_statuses:
        for section, statuses in (("select", selected), ("protect", protected)):
            problems.extend(
                (
                    (section, "status", index),
                    f"{kind} has no status {status!r}; known statuses: "
                    f"{', '.join(sorted(target.known_statuses))}",
                )
                for index, status in statuses
                if status not in target.known_statuses
            )
    protected_set = {status for _, status in protected}
    deletable = target.deletable_statuses
    for index, status in selected:
        if deletable is not None and status not in deletable:
            problems.append(
                (
                    ("select", "status", index),
                    f"{kind} never deletes tasks in status {status!r} (only "
                    f"{', '.join(sorted(deletable))}); no setting lifts this",
                )
            )
        elif status in protected_set:
            problems.append(
                (("select", "status", index), f"status {status!r} is both selected and protected")
            )
        elif status in target.live_statuses and select.get("allow_live") is not True:
            problems.append(
                (
                    ("select", "status", index),
                    f"{status!r} is a live status of {kind} (tasks still running); set "
                    "select.allow_live: true if deleting running tasks is really intended",
                )
            )
    for section, statuses in (("select", selected), ("protect", protected)):
        if len({status for _, status in statuses}) != len(statuses):  # the schema's uniqueItems
            problems.append(((section, "status"), "a status is listed twice"))

    delete = _mapping(raw.get("delete"))
    batch_size = delete.get("batch_size")
    if isinstance(batch_size, int | float) and not isinstance(batch_size, bool):  # 50.0 is 50
        if batch_size > target.max_batch_size:
            problems.append(
                (
                    ("delete", "batch_size"),
                    f"{kind} accepts at most {target.max_batch_size} id(s) per delete request",
                )
            )
    options = delete.get("options")
    if isinstance(options, dict):
        try:
            target.options_model.model_validate(options)
        except ValidationError as exc:
            for err in exc.errors():
                path = ("delete", "options", *(str(p) for p in err["loc"]))
                problems.append((path, _message(err)))
    return problems


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[tuple[int, str]]:
    if not isinstance(value, list):
        return []
    return [(index, item) for index, item in enumerate(value) if isinstance(item, str)]
