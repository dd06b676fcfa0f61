"""xray-ingest: ingest and query X-Ray events."""

__version__ = "0.1.0"
