"""Query and path parameters: strict parsing, and a BadRequestError naming the parameter."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, TypeVar

from xray_ingest.errors import BadRequestError
from xray_ingest.models import AnalyticsWindow, TraceFilters

METADATA_PREFIX: Final = "metadata."
# Keyset cursor for the first page: sorts after every stored trace.
FIRST_PAGE: Final = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=2**128 - 1))
_TRUE: Final = ("true", "1", "yes")
_FALSE: Final = ("false", "0", "no")


def optional_uuid(value: str | None, name: str) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadRequestError(f"{name} must be a UUID, got {value!r}", path=name) from None


def uuid_param(value: str | None, name: str) -> uuid.UUID:
    parsed = optional_uuid(value, name)
    if parsed is None:
        raise BadRequestError(f"{name} is required", path=name)
    return parsed


_N = TypeVar("_N", int, float)


def _bounded(
    params: Mapping[str, str], name: str, default: _N, kind: type[_N], low: _N, high: _N
) -> _N:
    """Parameter `name` as a `kind` within [low, high] (NaN is outside), else the default."""
    value = params.get(name)
    if value is None:
        return default
    try:
        number = kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise BadRequestError(f"{name} must be {noun}, got {value!r}", path=name) from None
    if not low <= number <= high:
        raise BadRequestError(f"{name} must be between {low} and {high}", path=name)
    return number


def int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _bounded(params, name, default, int, low, high)


def fraction_param(params: Mapping[str, str], name: str, default: float) -> float:
    # Bounds written as 0 and 1 (not 0.0 and 1.0) for the message.
    return _bounded(params, name, default, float, 0, 1)


def time_param(params: Mapping[str, str], name: str) -> datetime | None:
    """An ISO 8601 time; without an offset it is UTC."""
    value = params.get(name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequestError(
            f"{name} must be an ISO 8601 time such as 2024-01-03T10:30:00Z, got {value!r}",
            path=name,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def bool_param(params: Mapping[str, str], name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequestError(f"{name} must be true or false, got {value!r}", path=name)


def text_param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is not None and not value:
        raise BadRequestError(f"{name} must not be empty", path=name)
    return value


def metadata_params(params: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The `metadata.<key>=<value>` filters, as parallel key and value lists."""
    keys: list[str] = []
    values: list[str] = []
    for name, value in params.items():
        if name.startswith(METADATA_PREFIX):
            key = name[len(METADATA_PREFIX) :]
            if not key:
                raise BadRequestError(
                    "metadata filters look like metadata.<key>=<value>", path=name
                )
            keys.append(key)
            values.append(value)
    return keys, values


def analytics_window(params: Mapping[str, str]) -> AnalyticsWindow:
    """The `service`, `since`, `until` and `metadata.<key>` parameters."""
    keys, values = metadata_params(params)
    return AnalyticsWindow(
        service=text_param(params, "service"),
        since=time_param(params, "since"),
        until=time_param(params, "until"),
        metadata_keys=keys,
        metadata_values=values,
    )


def trace_filters(params: Mapping[str, str]) -> TraceFilters:
    """The filters of GET /v1/traces: the analytics window's, plus event_type,
    min_duration_ms and has_error."""
    window = analytics_window(params)
    min_duration = params.get("min_duration_ms")
    return TraceFilters(
        service=window.service,
        since=window.since,
        until=window.until,
        metadata_keys=window.metadata_keys,
        metadata_values=window.metadata_values,
        event_type=text_param(params, "event_type"),
        min_duration_ms=None
        if min_duration is None
        else float(int_param(params, "min_duration_ms", 0, 0, 2**31 - 1)),
        has_error=bool_param(params, "has_error"),
    )


def encode_cursor(start_time: datetime, trace_id: uuid.UUID) -> str:
    text = f"{start_time.isoformat()}|{trace_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID]:
    """Reverses encode_cursor (FIRST_PAGE for none); raises BadRequestError naming `cursor`."""
    if not cursor:
        return FIRST_PAGE
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        start_text, trace_text = text.split("|")
        start_time = datetime.fromisoformat(start_text)
        if start_time.tzinfo is None:
            raise ValueError("naive time")
        return start_time, uuid.UUID(trace_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequestError("cursor is not one this server issued", path="cursor") from None
