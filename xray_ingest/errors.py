"""The errors xray_ingest raises; the HTTP layer maps them to status codes."""

from __future__ import annotations


class XrayError(Exception):
    """Something went wrong in xray-ingest."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(XrayError):
    """A setting is missing or malformed."""


class MigrationError(XrayError):
    """The migrations on disk and the ones recorded in the database disagree."""


class QueueFullError(XrayError):
    """The ingest queue is full; retry later."""


class ShuttingDownError(XrayError):
    """The server is shutting down and accepts no new events."""


class BadRequestError(XrayError):
    """The request is malformed."""

    def __init__(self, message: str | None = None, *, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


class BodyTooLargeError(XrayError):
    """The request body is larger than the configured maximum."""


class BatchTooLargeError(XrayError):
    """The batch holds more events than the configured maximum."""


class RejectedRowsError(XrayError):
    """The database refused the data of a batch (some row in it cannot be stored)."""


class UnsupportedEncodingError(XrayError):
    """The request's Content-Encoding is not supported."""


class CommitTimeoutError(XrayError):
    """The events were not committed within the durable-mode deadline; retrying is safe."""
