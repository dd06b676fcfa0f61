"""The analytics endpoints over decision events: high drops, drop reasons, funnels, and the
values metadata keys take. SQL computes and renders each answer; these only parse parameters."""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from xray_ingest import db
from xray_ingest.errors import BadRequestError
from xray_ingest.models import ErrorBody
from xray_ingest.params import (
    analytics_window,
    fraction_param,
    int_param,
    optional_uuid,
    text_param,
    uuid_param,
)
from xray_ingest.routes import MsgspecResponse, RawJsonResponse, pool_of

DEFAULT_THRESHOLD: Final = 0.9
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 10_000


def _limit(request: Request) -> int:
    return int_param(request.query_params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)


async def high_drop_traces(request: Request) -> Response:
    """GET /v1/analytics/high-drop-traces?threshold=0.9: decision events dropping at least
    that share of their input, highest first."""
    threshold = fraction_param(request.query_params, "threshold", DEFAULT_THRESHOLD)
    window, limit = analytics_window(request.query_params), _limit(request)
    document = await db.fetch_high_drop_decisions(pool_of(request), threshold, window, limit)
    return RawJsonResponse(document)


async def drop_reasons(request: Request) -> Response:
    """GET /v1/analytics/drop-reasons: dropped counts summed by reason."""
    trace_id = optional_uuid(request.query_params.get("trace_id"), "trace_id")
    window, limit = analytics_window(request.query_params), _limit(request)
    document = await db.fetch_drop_reasons(pool_of(request), window, trace_id, limit)
    return RawJsonResponse(document)


async def funnel_stats(request: Request) -> Response:
    """GET /v1/analytics/funnel-stats?trace_id=: one trace's decision steps in time order."""
    trace_id = uuid_param(request.query_params.get("trace_id"), "trace_id")
    document = await db.fetch_funnel(pool_of(request), trace_id)
    if document is None:
        message = f"trace {trace_id} has no decision events"
        return MsgspecResponse(ErrorBody(message), status_code=404)
    return RawJsonResponse(document)


async def metadata_values(request: Request) -> Response:
    """GET /v1/analytics/metadata-values?field=: the values of metadata.<field>, with counts."""
    field = text_param(request.query_params, "field")
    if field is None:
        raise BadRequestError("field is required", path="field")
    event_type = text_param(request.query_params, "event_type")
    document = await db.fetch_metadata_values(pool_of(request), field, event_type, _limit(request))
    return RawJsonResponse(document)
