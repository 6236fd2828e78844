"""Which target kinds exist: entry points in the group ``reaper.targets``, built-ins included.

A distribution makes a kind usable as ``target.type`` by declaring an entry point, name to
:class:`~reaper.targets.base.Target` subclass::

    [project.entry-points."reaper.targets"]
    example_pipeline = "reaper_example_target:ExamplePipelineTarget"

reaper's own kinds are declared the same way in its pyproject.toml, so reaper must be installed
(``pip install -e .``, as ``make`` does) for them to be found; a source tree put on ``sys.path``
without an install has no kinds, and says so.

The entry point's name is the kind's name: a class that does not set ``kind`` and its config's
``type`` to it is used through a subclass that does (so a subclass of a built-in kind needs no
more than its entry point).

The entry points are read and their classes imported on first use (loading a policy, printing the
schema), once per process. An entry point that fails to import, is not a usable ``Target``, or
takes a name it may not have (a built-in's, or one another distribution declares too) is recorded
with its distribution and the error, and logged: a policy of that kind is a configuration error
naming them, and policies of every other kind are unaffected.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import structlog
from pydantic import Field, TypeAdapter, create_model

from reaper.targets.base import DeleteOptions, Target, TargetConfig

__all__ = ["BUILTIN_DISTRIBUTION", "GROUP", "Kind", "Registry", "discover", "installed_kinds"]

log = structlog.get_logger("reaper.targets.registry")

#: The entry point group a distribution declares its target kinds in.
GROUP = "reaper.targets"
#: The distribution whose kinds are built in: no plugin may take their names.
BUILTIN_DISTRIBUTION = "reaper"
#: A kind's name is written in policies and in the audit (``reaper_runs.target_kind``, 32 chars).
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class Kind:
    """One declared target kind: where it comes from, and its class or why it is unusable."""

    name: str
    distribution: str
    version: str
    #: The entry point's value, ``module:Class``.
    source: str
    target: type[Target] | None = None
    error: str | None = None

    @property
    def builtin(self) -> bool:
        return _normalize(self.distribution) == BUILTIN_DISTRIBUTION

    def origin(self) -> str:
        """``distribution version (entry point name = module:Class)``, for messages."""
        return f"{self.distribution} {self.version} (entry point {self.name} = {self.source})"


@dataclass(frozen=True)
class Registry:
    """The declared kinds, by name (see :func:`discover`), and the entry points refused a name."""

    kinds: Mapping[str, Kind]
    #: Entry points that may not have their name: a built-in's, or one declared twice.
    refused: tuple[Kind, ...] = ()

    @cached_property
    def targets(self) -> dict[str, type[Target]]:
        """The usable kinds' classes, by name, sorted."""
        return {
            name: kind.target
            for name, kind in sorted(self.kinds.items())
            if kind.target is not None
        }

    def target(self, kind: str) -> type[Target]:
        """The class of a usable kind; KeyError for a kind that is unknown or unusable."""
        return self.targets[kind]

    def unusable(self, kind: str) -> str | None:
        """Why a declared kind cannot be used, naming its distribution; None if it can be used
        or is not declared at all."""
        entry = self.kinds.get(kind)
        if entry is None or entry.error is None:
            return None
        return f"target type {kind!r} comes from {entry.origin()}, which cannot be used: " + (
            entry.error
        )

    def unknown(self) -> str:
        """The message for a ``target.type`` that no distribution declares."""
        if not any(kind.builtin for kind in self.kinds.values()):
            return (
                "unknown target type; reaper's own target kinds are not registered: install "
                "reaper (`pip install -e .` in a source tree) so that its entry points are found"
            )
        return f"unknown target type; expected one of: {', '.join(self.targets)}"

    def problems(self) -> list[Kind]:
        """Every declared entry point that is not usable, with its error."""
        return [k for k in self.kinds.values() if k.error is not None] + list(self.refused)

    @cached_property
    def config_union(self) -> Any:
        """The type of a policy's ``target`` section: the union of the usable kinds' config
        models, told apart by ``type``."""
        configs = tuple(target.config_model for target in self.targets.values())
        if len(configs) < 2:
            # A discriminated union needs two members: with one kind or none, a member no
            # policy can select gives every other ``type`` the same "unknown tag" error.
            configs = (*configs, _NoKind)
        return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007

    @cached_property
    def config_adapter(self) -> TypeAdapter[TargetConfig]:
        """Validates a policy's ``target`` section (see :attr:`config_union`)."""
        return TypeAdapter(self.config_union)

    def builtin_only(self) -> Registry:
        """The kinds reaper ships, without any plugin's (the published schema has these)."""
        return Registry({name: kind for name, kind in self.kinds.items() if kind.builtin})


class _NoKind(TargetConfig):
    """A union member no policy can select (a discriminated union needs two)."""

    type: Literal["<no kind>"]


def discover(points: Iterable[EntryPoint]) -> Registry:
    """Load the target classes of ``points``, recording each failure instead of raising."""
    declared: dict[str, list[EntryPoint]] = {}
    for point in points:
        declared.setdefault(point.name, []).append(point)
    kinds: dict[str, Kind] = {}
    refused: list[Kind] = []
    for name in sorted(declared):
        builtins = [p for p in declared[name] if _describe(name, p).builtin]
        plugins = [_describe(name, p) for p in declared[name] if p not in builtins]
        if builtins:
            kinds[name] = _load(name, builtins[0])
            error = (
                f"{name!r} is a built-in kind of reaper and a plugin cannot replace it: declare "
                "the entry point under another name"
            )
            refused.extend(replace(kind, error=error) for kind in plugins)
        elif len(plugins) > 1:
            owners = " and ".join(sorted(kind.distribution for kind in plugins))
            error = (
                f"{owners} both declare the kind {name!r}; uninstall one (reaper does not guess "
                "which is meant)"
            )
            first, *others = (replace(kind, error=error) for kind in plugins)
            kinds[name] = first
            refused.extend(others)
        else:
            [point] = declared[name]
            kinds[name] = _load(name, point)
    found = Registry(kinds, tuple(refused))
    for kind in found.problems():
        log.warning(
            "target_kind_unusable",
            kind=kind.name,
            distribution=kind.distribution,
            version=kind.version,
            entry_point=kind.source,
            error=kind.error,
        )
    return found


def _describe(name: str, point: EntryPoint) -> Kind:
    dist = point.dist
    if dist is None:
        return Kind(name, "an unknown distribution", "?", point.value)
    return Kind(name, dist.name, dist.version, point.value)


def _normalize(name: str) -> str:
    """A distribution's name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _load(name: str, point: EntryPoint) -> Kind:
    kind = _describe(name, point)
    if not _NAME.fullmatch(name):
        return replace(
            kind,
            error="a kind's name is 1-32 lowercase letters, digits and '_', starting with a letter",
        )
    try:
        loaded = point.load()
    except Exception as exc:  # a plugin's import failure is reported with its name, not raised
        return replace(kind, error=f"importing it failed: {type(exc).__name__}: {exc}")
    problem = _problem(loaded)
    if problem is not None:
        return replace(kind, error=problem)
    try:
        target = _named(name, loaded)
        target.config_model.model_json_schema()  # `reaper schema` publishes it
    except Exception as exc:  # a plugin's model that cannot be described is reported, not raised
        config = loaded.config_model.__qualname__
        return replace(kind, error=f"{config} has no JSON Schema: {type(exc).__name__}: {exc}")
    return replace(kind, target=target)


def _problem(loaded: Any) -> str | None:
    """Why ``loaded`` cannot be a target kind (None when it can)."""
    if not (isinstance(loaded, type) and issubclass(loaded, Target)):
        return f"{loaded!r} is not a subclass of reaper.targets.Target"
    what = loaded.__qualname__
    if inspect.isabstract(loaded):
        missing = ", ".join(sorted(loaded.__abstractmethods__))
        return f"{what} does not implement {missing}"
    config = getattr(loaded, "config_model", None)
    if not (isinstance(config, type) and issubclass(config, TargetConfig)):
        return f"{what}.config_model is not a subclass of reaper.targets.TargetConfig"
    time_fields = getattr(loaded, "time_fields", None)
    if not isinstance(time_fields, tuple) or not time_fields:
        return f"{what}.time_fields must name at least one timestamp field"
    options = loaded.options_model
    if not (isinstance(options, type) and issubclass(options, DeleteOptions)):
        return f"{what}.options_model is not a subclass of reaper.targets.DeleteOptions"
    return None


def _named(name: str, target: type[Target]) -> type[Target]:
    """``target`` as the kind ``name``: the entry point's name is the kind.

    A class that already says so (``kind`` and its config's ``type: Literal[name]``) is used as
    it is. Otherwise a subclass sets both, so a subclass of a built-in registered under a new
    name needs nothing but its entry point (the class itself is never changed).
    """
    config = target.config_model
    typed = config.model_fields["type"].annotation
    if getattr(target, "kind", None) == name and (
        get_origin(typed) is Literal and get_args(typed) == (name,)
    ):
        return target
    if get_origin(typed) is not Literal or get_args(typed) != (name,):
        literal: Any = Literal[name]
        config = create_model(
            "".join(part.title() for part in name.split("_")) + "Config",
            __base__=config,
            __module__=target.__module__,
            __doc__=config.__doc__,
            type=(literal, ...),
        )
    namespace = {"kind": name, "config_model": config, "__module__": target.__module__}
    named = types.new_class(target.__name__, (target,), exec_body=lambda ns: ns.update(namespace))
    return cast(type[Target], named)


_current: Registry | None = None


def installed_kinds() -> Registry:
    """The kinds of the installed distributions, found and loaded on first use."""
    global _current  # one registry per process, read at first use
    if _current is None:
        _current = discover(entry_points(group=GROUP))
    return _current
