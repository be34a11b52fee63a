"""Data access: the documented modules, a streaming JSON parser and the data client.

Framework-free like :mod:`airflow_papertrail.oauth`: nothing here imports Airflow at import
time (``extract`` imports ``airflow.sdk.ObjectStoragePath`` only for URL destinations).
"""

from __future__ import annotations

from airflow_papertrail.api.client import DataClient, PapertrailApiError, TransientApiError, WriteOutcomeUnknown
from airflow_papertrail.api.jsonstream import JsonStreamError, RecordStream
from airflow_papertrail.api.modules import MODULES, QuerySpec, is_write, validate

__all__ = [
    "MODULES",
    "DataClient",
    "JsonStreamError",
    "PapertrailApiError",
    "QuerySpec",
    "RecordStream",
    "TransientApiError",
    "WriteOutcomeUnknown",
    "is_write",
    "validate",
]
