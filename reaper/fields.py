"""Pydantic field types for configuration: durations and rates written the way ops write them.

``Duration`` accepts ``30d``/``12h``/``90m``/``45s``/``2w`` and serialises back to that form;
``RateValue`` accepts ``5/s``, ``300/m`` or ``1000/h``. Both publish a JSON Schema that shows
the accepted form, not pydantic's ISO-8601 default.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from reaper.converters import Rate, format_duration, parse_duration, parse_rate

__all__ = ["Duration", "RateValue"]

_DURATION_PATTERN = r"^(\d+[smhdw])+$"

Duration = Annotated[
    timedelta,
    BeforeValidator(lambda v: parse_duration(v) if isinstance(v, str) else _reject_number(v)),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _DURATION_PATTERN,
            "description": "A number and a unit: s, m, h, d, w (e.g. '30d', '12h', '1w2d').",
        }
    ),
]

RateValue = Annotated[
    Rate,
    BeforeValidator(lambda v: v if isinstance(v, Rate) else parse_rate(v)),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^\d+(\.\d+)?/(s|m|h)$",
            "description": "Requests per second ('5/s'), per minute ('300/m') or per hour.",
        }
    ),
]


def _reject_number(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"a bare number ({value}) is ambiguous; write it with a unit, e.g. '30d'")
    return value
