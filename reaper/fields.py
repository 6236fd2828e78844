"""Pydantic field types for configuration, accepting exactly what their JSON Schema allows.

``Duration`` accepts ``30d``/``12h``/``90m``/``45s``/``2w`` and serialises back to that form;
``RateValue`` accepts ``5/s``, ``300/min``, ``0.5/sec`` or ``1000/h`` (or a bare number of
requests per second). Both publish the pattern the loader itself matches, not pydantic's ISO-8601
default. ``JsonInt`` is an integer as JSON Schema means it: pydantic's lax ``int`` would also take
``"5"`` and ``true``, which the published schema refuses (``StrictBool``/``StrictFloat`` do the
same for booleans and numbers).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, Strict, WithJsonSchema

from reaper.converters import (
    DURATION_PATTERN,
    RATE_NUMBER_LIMIT,
    RATE_NUMBER_MIN,
    RATE_PATTERN,
    Rate,
    format_duration,
    parse_duration,
    parse_rate,
)

__all__ = ["INTEGRAL", "Duration", "JsonInt", "RateValue"]

Duration = Annotated[
    timedelta,
    BeforeValidator(lambda v: parse_duration(v) if isinstance(v, str) else _reject_number(v)),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": (
                "Numbers with a unit, each unit at most once: s, m, h, d, w (e.g. '30d', "
                "'12h', '1w2d'); at most 9999w, 99999d, 999999h, 9999999m or 999999999s."
            ),
        }
    ),
]

RateValue = Annotated[
    Rate,
    BeforeValidator(lambda v: v if isinstance(v, Rate) else parse_rate(v)),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": RATE_PATTERN},
                {
                    "type": "number",
                    "minimum": RATE_NUMBER_MIN,
                    "exclusiveMaximum": RATE_NUMBER_LIMIT,
                },
            ],
            "description": (
                "Requests per second ('5/s', '0.5/sec'), per minute ('300/m', '300/min') or per "
                "hour ('1000/h', '1000/hour'); a bare number is per second."
            ),
        }
    ),
]


def _integral(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5 to a JSON Schema validator, and to us.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Reads 5.0 as 5; put it on a field whose type is (or contains) a strict int.
INTEGRAL = BeforeValidator(_integral)

JsonInt = Annotated[int, INTEGRAL, Strict()]


def _reject_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30d'")
    if isinstance(value, int | float):
        raise ValueError(f"a bare number ({value}) is ambiguous; write it with a unit, e.g. '30d'")
    return value
