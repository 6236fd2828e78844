"""Logging for the process: JSON lines in production, a readable console on a TTY.

Logs go to stderr; command output (tables, JSON) goes to stdout. Secret values registered with
:func:`register_secret` are replaced by ``***`` in every log line, whatever field they hide in.

A line is written to whatever ``sys.stderr`` is *when it is logged*, as the logging module's own
last-resort handler does: while rich draws a progress bar it replaces ``sys.stderr`` with a proxy
that prints each line through its console, above the bar (``Live(redirect_stderr=True)``, rich's
documented way), so a log line never splits the bar into fragments.

structlog's events and the standard ``logging`` module's records (APScheduler's job errors,
Alembic's migrations, httpx) leave through one ``logging`` handler whose
``structlog.stdlib.ProcessorFormatter`` gives both the same fields, the same redaction and the
same renderer; this is structlog's documented way to render foreign records.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

__all__ = ["configure_logging", "redact_secrets", "register_secret", "reset_logging"]

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in a log line."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _SECRETS:
            if secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return _scrub(str(value))
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace registered secrets in every field."""
    if not _SECRETS:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub(value)
    return event_dict


#: Libraries whose INFO lines are one per HTTP request: shown only when debugging.
_CHATTY = ("httpx", "httpcore")

#: The handler :func:`configure_logging` put on the root logger, replaced on each call.
_handler: logging.Handler | None = None


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler on the current ``sys.stderr``, not the one it was created with."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # always sys.stderr


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: Any = None,
) -> None:
    """Send structlog's events and the ``logging`` module's records to ``stream`` (default:
    whatever ``sys.stderr`` is when a line is written)."""
    global _handler
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    number = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # A foreign record's message (its %-arguments merged in) becomes the event; its
            # logger's name says which library wrote it.
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(number)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(number if number <= logging.DEBUG else logging.WARNING)
    _handler = handler


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests): structlog's defaults, no handler of ours."""
    global _handler
    structlog.reset_defaults()
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    logging.getLogger().setLevel(logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET)
